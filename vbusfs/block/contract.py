"""What a block transport is to the engine, in the engine's own words (design.md §1).

A transport (a Xen block ring, a virtio-blk queue, a storvsc channel) is whatever puts
a :class:`Command` on its ring, tells the engine when it completes, and says up front what
its device can take (:class:`Limits`). The engine never sees the transport's words: an
operation is an :class:`Op`, a completion status is an errno, and whatever the transport
needs to remember about a command between posting it and retiring it lives in the one
opaque slot :attr:`Command.priv`.

The life of a command on the transport::

    can_post(cmd)   room on the ring for it now? (the engine freezes the queue if not)
    post(cmd)       encode it on the ring, taking what it needs (kept in cmd.priv)
    push()          publish what was posted and notify the device, once per batch
    ... the transport's interrupt handler calls Engine.complete(cmd.id, errno) ...
    retire(cmd)     give back what post took; also called for a command failed because
                    the ring went away
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Protocol

import trio

__all__ = ["Op", "STAT_GROUP", "Limits", "Queue", "Command", "Transport", "SECTOR"]

#: the block layer's unit of position and length, whatever the logical block size
SECTOR = 512


class Op(enum.IntEnum):
    """The block operations, numbered as Linux's ``REQ_OP_*`` (include/linux/blk_types.h);
    used from the ``/dev`` file down to the transport."""

    READ = 0
    WRITE = 1
    FLUSH = 2
    DISCARD = 3
    DRV_IN = 34         # a driver-private request that reads data (virtio-blk GET_ID)


#: ``op_stat_group``: which of /sys/block/*/stat's groups (read, write, discard, flush) an
#: operation is counted in
STAT_GROUP = {Op.READ: 0, Op.WRITE: 1, Op.DISCARD: 2, Op.FLUSH: 3, Op.DRV_IN: 0}


@dataclass(frozen=True)
class Limits:
    """What the device behind a transport can take: the part of Linux's ``queue_limits``
    a driver sets. They flow unchanged into ``/sys/block/<disk>/queue/``; the engine splits
    and sizes commands by them. Sizes are in bytes."""

    max_segments: int                    # data segments per command
    max_segment_size: int                # bytes one segment may cover
    max_transfer: int                    # data bytes per command (max_hw_sectors_kb * 1024)
    logical_block_size: int = 512
    physical_block_size: int = 512
    dma_alignment: int = 511             # a data buffer's start must be aligned to this + 1
    discard_granularity: int = 0         # 0: the device cannot discard
    max_discard_bytes: int = 0
    flush: bool = False                  # a FLUSH command empties a volatile cache
    barrier: bool = False                # ordered writes (a write is a barrier when asked)
    fua: bool = False                    # writes can be forced to stable storage
    rotational: bool = False

    @property
    def write_cache(self) -> bool:
        """Whether the device has a cache a flush must empty (``queue/write_cache``)."""
        return self.flush or self.barrier


class Queue(enum.IntEnum):
    NONE = 0
    FREE = 1
    READY = 2
    BUSY = 3
    COMPLETE = 4


class Command:
    """One entry of the engine's shadow table; its index is its id on the ring."""

    __slots__ = ("id", "op", "sector", "nsectors", "pages", "extra_pages", "ordered",
                 "status", "done", "queue", "single_step", "priv", "nbytes", "abandoned",
                 "code")

    def __init__(self, cid: int) -> None:
        self.id = cid
        self.op = Op.READ
        self.sector = 0                     # in 512-byte units
        self.nsectors = 0
        self.nbytes = 0                     # data bytes (a multiple of the block size)
        self.pages: list[int] = []          # data pages (guest frame numbers), in order
        self.extra_pages: list[int] = []    # pages the transport asked for (extra_pages_for)
        self.ordered = False                # nothing may pass it, nor it anything
        self.single_step = False
        self.status = 0                     # errno; 0 is success
        self.done: trio.Event | None = None   # made only when the caller has to wait
        self.queue = Queue.FREE
        #: the transport's own state for this command between post and retire (an opaque
        #: slot: the engine never looks inside)
        self.priv: Any = None
        self.abandoned = False              # its caller was cancelled while it was BUSY
        self.code = 0                       # DRV_IN: which driver request it is


class Transport(Protocol):
    limits: Limits

    def can_post(self, cmd: Command) -> bool: ...
    def extra_pages_for(self, op: Op, npages: int) -> int: ...
    def post(self, cmd: Command) -> None: ...
    def push(self) -> None: ...
    def retire(self, cmd: Command) -> None: ...
