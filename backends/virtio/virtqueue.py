"""A split virtqueue as the device sees it (virtio 1.x §2.7; QEMU ``hw/virtio/virtio.c``
``virtqueue_pop``/``virtqueue_push`` is the model): pop a descriptor chain, validating every
descriptor, and push a used element.

Everything in the rings is untrusted. :meth:`DeviceQueue.pop` copies each descriptor before
looking at it and refuses, with :class:`QueueError`, what a careful device refuses: a head or
``next`` index outside the queue, a chain longer than the queue (a loop), an address range
outside guest memory, a readable buffer after a writable one, an indirect table of a size
that is not whole descriptors or nested in another, INDIRECT together with NEXT, an indirect
descriptor without the feature, or a driver that made more buffers available than the queue
holds. A device that meets one stops trusting the queue (DEVICE_NEEDS_RESET), as QEMU's
``virtio_error`` does; it never guesses.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from vbusfs.platform.doorbell import Doorbell
from vbusfs.platform.memory import GuestMemory, MemoryError_
from vbusfs.protocols.virtio import ring

__all__ = ["DeviceQueue", "Element", "QueueError", "MAX_BUFFERS"]

#: VIRTQUEUE_MAX_SIZE: the most buffers one element may have (QEMU's limit)
MAX_BUFFERS = 1024
_U16 = struct.Struct("<H")
_DESC_UNPACK = ring.DESC.unpack_from
_F_NEXT, _F_WRITE, _F_INDIRECT = ring.DESC_F_NEXT, ring.DESC_F_WRITE, ring.DESC_F_INDIRECT


def _outside(gpa: int, length: int) -> str:
    """What :meth:`GuestMemory.gpa_view` says of a range outside guest memory."""
    return f"GPA range {gpa:#x}+{length:#x} is outside guest memory"


class QueueError(Exception):
    """The driver broke the queue's rules; the device must be reset."""


@dataclass(slots=True)
class Element:
    head: int
    out: list[memoryview] = field(default_factory=list)    # device-readable, in order
    into: list[memoryview] = field(default_factory=list)   # device-writable, in order


class DeviceQueue:
    def __init__(self, memory: GuestMemory, index: int, max_size: int) -> None:
        self.memory = memory
        self.index = index
        self.max_size = max_size
        self.bell = Doorbell(f"virtqueue {index}")          # the driver's notifications
        self.vector = 0xFFFF                                 # MSI-X vector, NO_VECTOR
        self.reset()

    def reset(self) -> None:
        self.size = self.max_size
        self.enabled = False
        self.desc_addr = self.avail_addr = self.used_addr = 0
        self.last_avail = 0
        self.used_idx = 0
        self.signalled_used = 0
        self.event_idx = False
        self.indirect = False
        self._desc: memoryview | None = None
        self._avail: memoryview | None = None
        self._used: memoryview | None = None
        # guest memory as one view, and its size: a buffer's range is checked against it
        # and sliced from it in the descriptor walk (what ``gpa_view`` checks, inline)
        self._ram = self.memory.gpa_view(0, self.memory.size)
        self._ram_size = len(self._ram)
        self._used_event_at = ring.used_event_offset(self.size)
        self._avail_event_at = ring.avail_event_offset(self.size)

    def activate(self, event_idx: bool, indirect: bool) -> None:
        """Map the three areas (the driver enabled the queue or set DRIVER_OK)."""
        qsz = self.size
        if qsz == 0 or qsz & (qsz - 1) or qsz > self.max_size:
            raise QueueError(f"queue size {qsz} is not a power of two up to {self.max_size}")
        if self.desc_addr % ring.DESC_ALIGN or self.avail_addr % ring.AVAIL_ALIGN or \
                self.used_addr % ring.USED_ALIGN:
            raise QueueError("queue areas are misaligned")
        try:
            self._desc = self.memory.gpa_view(self.desc_addr, ring.desc_size(qsz))
            self._avail = self.memory.gpa_view(self.avail_addr, ring.avail_size(qsz))
            self._used = self.memory.gpa_view(self.used_addr, ring.used_size(qsz))
        except MemoryError_ as e:
            raise QueueError(f"queue {self.index}: {e}") from None
        self.event_idx = event_idx
        self.indirect = indirect
        self._used_event_at = ring.used_event_offset(qsz)
        self._avail_event_at = ring.avail_event_offset(qsz)
        self.enabled = True

    @property
    def ready(self) -> bool:
        return self.enabled and self._avail is not None

    # -- the available ring ---------------------------------------------------------------------
    def _avail_idx(self) -> int:
        assert self._avail is not None
        return int(_U16.unpack_from(self._avail, 2)[0])

    def pending(self) -> int:
        """Buffers made available and not yet popped; QueueError when the driver claims
        more than the queue holds."""
        n = (self._avail_idx() - self.last_avail) & 0xFFFF
        if n > self.size:
            raise QueueError(f"queue {self.index}: avail index moved {n} past last_avail "
                             f"on a {self.size}-entry queue")
        return n

    def pop(self) -> Element | None:
        """The next available chain, validated; None when there is none."""
        avail = self._avail
        if avail is None or not self.enabled:
            return None
        last, size = self.last_avail, self.size
        n = (_U16.unpack_from(avail, 2)[0] - last) & 0xFFFF
        if not n:
            return None
        if n > size:
            raise QueueError(f"queue {self.index}: avail index moved {n} past last_avail "
                             f"on a {size}-entry queue")
        (head,) = _U16.unpack_from(avail, 4 + 2 * (last % size))
        self.last_avail = (last + 1) & 0xFFFF
        if head >= size:
            raise QueueError(f"queue {self.index}: head {head} outside the queue")
        assert self._desc is not None
        out: list[memoryview] = []
        into: list[memoryview] = []
        table: memoryview | bytes = self._desc
        limit, i = size, head
        seen = nbufs = 0
        nested = False
        ram, ram_size = self._ram, self._ram_size
        unpack = _DESC_UNPACK
        while True:
            addr, length, flags, nxt = unpack(table, 16 * i)
            seen += 1
            if seen > limit:
                raise QueueError(f"queue {self.index}: descriptor chain loops or is longer "
                                 f"than {limit}")
            if flags & _F_INDIRECT:
                if nested:
                    raise QueueError("an indirect descriptor inside an indirect table")
                if not self.indirect:
                    raise QueueError("indirect descriptor without VIRTIO_F_INDIRECT_DESC")
                if flags & _F_NEXT:
                    raise QueueError("descriptor with both INDIRECT and NEXT")
                if length == 0 or length % 16 or length // 16 > MAX_BUFFERS:
                    raise QueueError(f"indirect table of {length} bytes")
                if addr + length > ram_size:
                    raise QueueError(_outside(addr, length))
                table = bytes(ram[addr:addr + length])        # copied, then walked
                nested, limit, i, seen = True, length // 16, 0, 0
                continue
            if addr + length > ram_size:
                raise QueueError(f"queue {self.index}: {_outside(addr, length)}")
            nbufs += 1
            if flags & _F_WRITE:
                into.append(ram[addr:addr + length])
            elif into:
                raise QueueError("a device-readable buffer after a device-writable one")
            else:
                out.append(ram[addr:addr + length])
            if nbufs > MAX_BUFFERS:
                raise QueueError(f"more than {MAX_BUFFERS} buffers in one chain")
            if not flags & _F_NEXT:
                return Element(head, out, into)
            if nxt >= limit:
                raise QueueError(f"queue {self.index}: next {nxt} outside the table")
            i = nxt

    # -- the used ring --------------------------------------------------------------------------
    def push(self, head: int, written: int) -> None:
        """Record ``head`` as used, ``written`` bytes written into its writable buffers;
        :meth:`flush` publishes."""
        assert self._used is not None
        ring.USED_ELEM.pack_into(self._used, 4 + 8 * (self.used_idx % self.size), head,
                                 written)
        self.used_idx = (self.used_idx + 1) & 0xFFFF

    def flush(self) -> bool:
        """Publish the used index; True when the driver wants an interrupt for what was
        published since the last one (``vring_need_event`` on ``used_event``, or the
        NO_INTERRUPT flag without EVENT_IDX)."""
        assert self._used is not None and self._avail is not None
        new, old = self.used_idx, self.signalled_used
        if new == old:
            return False
        _U16.pack_into(self._used, 2, new)
        if self.event_idx:
            (event,) = _U16.unpack_from(self._avail, self._used_event_at)
            want = ring.need_event(event, new, old)
        else:
            (flags,) = _U16.unpack_from(self._avail, 0)
            want = not flags & ring.AVAIL_F_NO_INTERRUPT
        self.signalled_used = new
        return want

    def rearm(self) -> bool:
        """:meth:`notify_on`, then whether buffers were made available meanwhile (the
        driver did not kick for those: the caller must pop again)."""
        if self._used is None or not self.enabled:
            return False
        self.notify_on()
        return self.pending() > 0

    def notify_on(self) -> None:
        """Ask the driver to kick for anything after what was popped (``avail_event``, or
        clear NO_NOTIFY)."""
        if self._used is None:
            return
        if self.event_idx:
            _U16.pack_into(self._used, self._avail_event_at, self.last_avail)
        else:
            _U16.pack_into(self._used, 0, 0)
