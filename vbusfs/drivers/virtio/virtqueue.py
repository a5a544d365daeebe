"""A split virtqueue as the driver sees it (Linux ``drivers/virtio/virtio_ring.c``; virtio 1.x
§2.7): the descriptor table, the available ring and the used ring in guest memory, free
descriptors, the token each chain carries, and the notification rules both ways.

The used ring is written by the device, so it is untrusted: an index that moves further than
there are buffers in flight, or a used element naming a head that is not one, marks the
queue broken (Linux's ``BAD_RING``) and raises :class:`QueueBroken`; the driver then fails
what was in flight instead of trusting anything more from the device.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable, Sequence

from vbusfs.platform.memory import PAGE_SIZE, GuestMemory
from vbusfs.protocols.virtio import ring

__all__ = ["DriverQueue", "QueueBroken"]

_U16 = struct.Struct("<H")
_DESC_PACK = ring.DESC.pack_into
_USED_ELEM_UNPACK = ring.USED_ELEM.unpack_from
_F_NEXT = ring.DESC_F_NEXT
_F_WRITE_NEXT = ring.DESC_F_WRITE | ring.DESC_F_NEXT


@functools.cache
def _table(n: int) -> struct.Struct:
    """An indirect table of ``n`` descriptors, packed at once."""
    return struct.Struct("<" + ring.DESC.format.lstrip("<") * n)


class QueueBroken(Exception):
    """The device broke the queue's rules."""


class DriverQueue:
    def __init__(self, memory: GuestMemory, index: int, size: int, *, legacy: bool,
                 event_idx: bool, indirect: bool, notify: Callable[[], None]) -> None:
        if size == 0 or size & (size - 1) or size > ring.MAX_QUEUE_SIZE:
            raise OSError(22, f"queue {index}: size {size} is not a power of two")  # EINVAL
        self.memory = memory
        self.index = index
        self.size = size
        self.event_idx = event_idx
        self.indirect = indirect
        self.notify = notify
        if legacy:
            avail_off, used_off, total = ring.legacy_layout(size)
        else:
            avail_off = ring.desc_size(size)
            used_off = (avail_off + ring.avail_size(size) + 3) & ~3
            total = used_off + ring.used_size(size)
        self.pages = -(-total // PAGE_SIZE)
        self.pfn = memory.alloc(self.pages)
        view = memory.view(self.pfn, self.pages)
        base = self.pfn * PAGE_SIZE
        self.desc_addr, self.avail_addr, self.used_addr = base, base + avail_off, \
            base + used_off
        self._desc = view[:ring.desc_size(size)]
        self._avail = view[avail_off:avail_off + ring.avail_size(size)]
        self._used = view[used_off:used_off + ring.used_size(size)]
        self._free = list(range(size - 1, -1, -1))      # a stack of free descriptors
        self._chains: list[list[int] | None] = [None] * size
        self.tokens: list[int | None] = [None] * size
        self.avail_idx = 0          # the driver's shadow of avail.idx
        self._kicked = 0            # avail.idx at the last notification decision
        self.last_used = 0
        self._used_event_at = ring.used_event_offset(size)
        self._avail_event_at = ring.avail_event_offset(size)
        self.broken = ""
        self.kicks = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def in_flight(self) -> int:
        return self.size - len(self._free)

    def release(self) -> None:
        """Give the ring's pages back (after the device was reset)."""
        if self.pfn:
            self.memory.free(self.pfn, self.pages)
            self.pfn = 0

    # -- adding buffers -----------------------------------------------------------------------
    def descriptors_for(self, nbufs: int) -> int:
        """How many ring descriptors a chain of ``nbufs`` buffers takes (one when it goes in
        an indirect table, as ``virtqueue_add_split`` decides)."""
        return 1 if self.indirect and nbufs > 1 else nbufs

    def add(self, out: Sequence[tuple[int, int]], into: Sequence[tuple[int, int]], token: int,
            table_gpa: int | None = None) -> int:
        """Make a chain of device-readable ``out`` then device-writable ``into`` buffers
        (guest-physical address, length) available, carrying ``token``; with indirect
        descriptors the chain goes in the table at ``table_gpa``. Published by
        :meth:`publish`."""
        nb = len(out) + len(into)
        if self.indirect and nb > 1:
            if table_gpa is None:
                raise ValueError("an indirect chain needs a table")
            # the whole table in one pack: (addr, len, flags, next) per buffer, each but
            # the last chained to the one after it
            fields: list[int] = []
            i = 0
            for a, n in out:
                i += 1
                fields += (a, n, _F_NEXT, i)
            for a, n in into:
                i += 1
                fields += (a, n, _F_WRITE_NEXT, i)
            fields[-2] &= ~_F_NEXT
            fields[-1] = 0
            _table(nb).pack_into(self.memory.gpa_view(table_gpa, 16 * nb), 0, *fields)
            head = self._free.pop()
            _DESC_PACK(self._desc, 16 * head, table_gpa, 16 * nb, ring.DESC_F_INDIRECT, 0)
            chain = [head]
        else:
            bufs = [(a, n, 0) for a, n in out] + [(a, n, ring.DESC_F_WRITE) for a, n in into]
            pack = _DESC_PACK
            if nb > len(self._free):
                raise ValueError("not enough free descriptors")
            chain = [self._free.pop() for _ in range(nb)]
            for i, (a, n, f) in enumerate(bufs):
                last = i == nb - 1
                pack(self._desc, 16 * chain[i], a, n, f | (0 if last else ring.DESC_F_NEXT),
                     0 if last else chain[i + 1])
            head = chain[0]
        self._chains[head] = chain
        self.tokens[head] = token
        _U16.pack_into(self._avail, 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        return head

    def publish(self) -> bool:
        """Publish what was added; True when the device wants a notification for it
        (``virtqueue_kick_prepare``)."""
        new, old = self.avail_idx, self._kicked
        if new == old:
            return False
        _U16.pack_into(self._avail, 2, new)
        self._kicked = new
        if self.event_idx:
            (event,) = _U16.unpack_from(self._used, self._avail_event_at)
            return ring.need_event(event, new, old)
        (flags,) = _U16.unpack_from(self._used, 0)
        return not flags & ring.USED_F_NO_NOTIFY

    def kick(self) -> None:
        if self.publish():
            self.kicks += 1
            self.notify()

    # -- used buffers --------------------------------------------------------------------------
    def get_used(self) -> tuple[int, int] | None:
        """The next used (token, bytes written), or None; QueueBroken when the device
        answered what was not asked."""
        if self.broken:
            raise QueueBroken(self.broken)
        used = self._used
        (used_idx,) = _U16.unpack_from(used, 2)
        last, size = self.last_used, self.size
        if used_idx == last:
            return None
        if (used_idx - last) & 0xFFFF > size - len(self._free):
            return self._bad(f"used index {used_idx} is ahead of the buffers in flight")
        head, length = _USED_ELEM_UNPACK(used, 4 + 8 * (last % size))
        tokens = self.tokens
        if head >= size or (token := tokens[head]) is None:
            return self._bad(f"used id {head} is not a head in flight")
        chain = self._chains[head]
        assert chain is not None
        tokens[head] = None
        self._chains[head] = None
        if len(chain) == 1:
            self._free.append(chain[0])
        else:
            self._free.extend(reversed(chain))
        self.last_used = (last + 1) & 0xFFFF
        return token, length

    def _bad(self, why: str) -> tuple[int, int]:
        self.broken = f"queue {self.index}: {why}"
        raise QueueBroken(self.broken)

    def enable_cb(self) -> bool:
        """Ask for an interrupt at the next used buffer (``virtqueue_enable_cb``); True if
        some are already there, so the caller must look again."""
        if self.event_idx:
            _U16.pack_into(self._avail, self._used_event_at, self.last_used)
        else:
            (flags,) = _U16.unpack_from(self._avail, 0)
            _U16.pack_into(self._avail, 0, flags & ~ring.AVAIL_F_NO_INTERRUPT)
        used_idx: int = _U16.unpack_from(self._used, 2)[0]
        return used_idx != self.last_used

    def tokens_in_flight(self) -> list[int]:
        return [t for t in self.tokens if t is not None]
