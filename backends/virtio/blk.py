"""The virtio-blk device (virtio 1.x §5.2; QEMU ``hw/block/virtio-blk.c`` for its answers;
reference/protocols.md §2.2–2.3).

Configuration: capacity, seg_max (queue size − 2, as QEMU), blk_size, topology, num_queues,
discard and write-zeroes limits; features as configured. Requests come from the split
virtqueues through :class:`~backends.virtio.virtqueue.DeviceQueue`, which has already
refused malformed chains; here each chain is read as header (the first 16 device-readable
bytes), data, and status (the last device-writable byte). A chain too short for a header or a
status is the driver breaking the protocol: the device needs a reset, as QEMU's
``virtio_error`` says. A well-formed request the device will not do gets a status: IOERR for
a range outside the disk or not in whole blocks, a write to a read-only disk; UNSUPP for an
operation not offered or unknown. Everything else becomes a neutral request for the shared
image executor (``backends/storage/executor.py``), straight from guest memory.

Requests found on one notification, across all queues, go to the executor as one batch, in
order; while the executor has a batch out, nothing new is taken (so a flush is ordered after
what came before it), and its completion takes what waited. Used elements are published and
the driver interrupted once per batch, as ``vring_need_event`` allows.

A reset does not return while a batch may still write into guest memory (the executor is
drained, as QEMU's reset drains the block backend), and answers of a batch taken before it
are dropped: each start of the device is a generation of its own.

Nothing is copied out of a chain before its size is known to be what the request needs:
only the 16 header bytes and a discard's one 16-byte segment are ever read into Python.
"""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

from backends.storage.executor import ImageExecutor, Request, StorageOp
from backends.virtio.transport import VirtioPciFunction
from backends.virtio.virtqueue import MAX_BUFFERS, DeviceQueue, Element, QueueError
from vbusfs.protocols.virtio import blk, ids

log = logging.getLogger(__name__)

__all__ = ["VirtioBlkDevice", "BlkParams"]

#: the limits QEMU's defaults come to (hw/block/virtio-blk.c): one segment per discard or
#: write-zeroes request, at most 1 GiB each
MAX_DISCARD_SECTORS = (1 << 30) // blk.SECTOR
MAX_DISCARD_SEG = 1
_OUTHDR_SIZE = blk.OUTHDR.size
_OUTHDR_UNPACK = blk.OUTHDR.unpack
_T_IN, _T_OUT, _SECTOR = blk.T_IN, blk.T_OUT, blk.SECTOR
_READ, _WRITE = StorageOp.READ, StorageOp.WRITE


@dataclass(frozen=True)
class BlkParams:
    """What the configuration says about one virtio-blk device."""

    sector_size: int
    physical_block_size: int
    serial: str
    readonly: bool
    features: frozenset[str]       # flush discard write-zeroes topology multi-queue
    indirect: bool
    event_idx: bool
    num_queues: int
    queue_size: int


@dataclass(slots=True)
class _Work(Request):
    """A request taken off a queue: what the executor needs, and how to answer it."""

    queue: DeviceQueue | None = None
    head: int = 0
    status_byte: memoryview | None = None    # where the answer goes in guest memory
    written: int = 1                          # bytes written into the chain: data, status


class VirtioBlkDevice:
    device_id: int = ids.DeviceId.BLOCK

    def __init__(self, executor: ImageExecutor, params: BlkParams) -> None:
        self.executor = executor
        self.p = params
        self.num_queues = params.num_queues
        self.queue_size = params.queue_size
        self.sectors = executor.image.size // blk.SECTOR
        self.fn: VirtioPciFunction | None = None
        self.generation = 0
        self._pumping = False
        self._answer: Callable[[list[_Work]], None] | None = None
        self.requests = 0
        self.errors = 0

    # -- VirtioModel ------------------------------------------------------------------------------
    def features(self) -> int:
        f = self.p.features
        bits = [blk.F_SEG_MAX, blk.F_BLK_SIZE]
        bits += [blk.F_RO] if self.p.readonly else []
        bits += [blk.F_FLUSH] if "flush" in f else []
        bits += [blk.F_TOPOLOGY] if "topology" in f else []
        bits += [blk.F_MQ] if "multi-queue" in f or self.num_queues > 1 else []
        bits += [blk.F_DISCARD] if "discard" in f and not self.p.readonly else []
        bits += [blk.F_WRITE_ZEROES] if "write-zeroes" in f and not self.p.readonly else []
        bits += [ids.F_INDIRECT_DESC] if self.p.indirect else []
        bits += [ids.F_EVENT_IDX] if self.p.event_idx else []
        return sum(1 << b for b in bits)

    def config(self) -> bytes:
        lbs = self.p.sector_size
        exp = (self.p.physical_block_size // lbs).bit_length() - 1
        return blk.CONFIG.pack(
            self.sectors, 0, min(self.queue_size, MAX_BUFFERS) - 2, 0, 0, 0, lbs, exp, 0,
            1, 0, 1,
            self.num_queues, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, lbs // blk.SECTOR,
            MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, 1)

    def config_write(self, offset: int, data: bytes) -> None:
        """Nothing is writable (CONFIG_WCE is not offered): ignored, as the spec allows."""

    def start(self, fn: VirtioPciFunction) -> None:
        self.fn = fn
        self._answer = functools.partial(self._done, fn, self.generation)
        for q in fn.queues:
            q.bell.handler = self.pump

    def reset(self) -> None:
        if self.fn is not None:
            for q in self.fn.queues:
                q.bell.handler = None
        self.fn = None
        self._answer = None
        self.generation += 1
        self.executor.drain()

    def _negotiated(self, bit: int) -> bool:
        return self.fn is not None and bool(self.fn.features >> bit & 1)

    # -- the queues -----------------------------------------------------------------------------
    def pump(self) -> bool:
        """Take every available request on every queue and hand them to the executor.
        Runs from a queue's notification (directly, as an interrupt handler would), from
        the queue task, and again when the executor's batch comes back; never nested."""
        fn, ex, answer = self.fn, self.executor, self._answer
        if fn is None or answer is None or fn.broken or ex.busy or self._pumping:
            return True
        self._pumping = True
        queues = fn.queues
        parse = self._parse
        try:
            while True:
                work: list[_Work] = []
                for q in queues:
                    while (elem := q.pop()) is not None:
                        w = parse(q, elem)
                        if w is not None:
                            work.append(w)
                if work and not ex.submit(work, answer):
                    self._publish(fn)
                    return True                # _done pumps again when the batch is back
                self._publish(fn)
                more = False
                for q in queues:
                    if q.rearm():
                        more = True
                if not more:
                    return True
        except QueueError as e:
            fn.fail(str(e))
            return True
        finally:
            self._pumping = False

    def _done(self, fn: VirtioPciFunction, generation: int, work: list[_Work]) -> None:
        if generation != self.generation or fn.broken:
            # reset meanwhile (the queues are someone else's now), or broken: no answers;
            # a device started again since then may have requests waiting for the executor
            if self.fn is not None and not self._pumping:
                self.pump()
            return
        for w in work:
            self._complete(w, blk.S_OK if not w.status else
                           blk.S_UNSUPP if w.status == errno.EOPNOTSUPP else blk.S_IOERR)
        if not self._pumping:
            self._publish(fn)
            self.pump()

    def _publish(self, fn: VirtioPciFunction) -> None:
        for q in fn.queues:
            if q.ready and q.flush():
                fn.interrupt(q)

    def _complete(self, w: _Work, status: int) -> None:
        assert w.queue is not None and isinstance(w.status_byte, memoryview)
        w.status_byte[0] = status
        if status != blk.S_OK:
            self.errors += 1
            w.written = 1
        w.queue.push(w.head, w.written)

    def _answer_now(self, q: DeviceQueue, elem: Element, status_byte: memoryview,
                    status: int, written: int = 1) -> None:
        status_byte[0] = status
        if status != blk.S_OK:
            self.errors += 1
        q.push(elem.head, written)

    # -- parsing ----------------------------------------------------------------------------------
    def _parse(self, q: DeviceQueue, elem: Element) -> _Work | None:
        """One chain → a request for the executor, or None when it was answered here."""
        self.requests += 1
        out, into = elem.out, elem.into
        hdr: bytes | memoryview
        if out and into and len(out[0]) == _OUTHDR_SIZE and len(into[-1]) == 1:
            # the layout every driver uses: the header alone, the status byte alone
            hdr, data_out = out[0], out[1:]
            status_byte, data_in = into[-1], into[:-1]
        else:
            if sum(map(len, out)) < _OUTHDR_SIZE:
                raise QueueError("virtio-blk request header too short")
            if not into or len(into[-1]) < 1:
                raise QueueError("virtio-blk request without a status byte")
            hdr, data_out = _split(out, _OUTHDR_SIZE)      # ANY_LAYOUT: it may be split
            status_byte = into[-1][-1:]
            data_in = [*into[:-1], into[-1][:-1]] if len(into[-1]) > 1 else into[:-1]
        rtype, _ioprio, sector = _OUTHDR_UNPACK(hdr)
        p = self.p
        if rtype == _T_IN or rtype == _T_OUT:
            iov = tuple(filter(len, data_in if rtype == _T_IN else data_out))
            n = sum(map(len, iov))
            lbs = p.sector_size
            offset = sector * _SECTOR
            if n == 0 or offset % lbs or n % lbs or offset + n > self.sectors * _SECTOR:
                self._answer_now(q, elem, status_byte, blk.S_IOERR)
                return None
            if rtype == _T_OUT:
                if p.readonly:
                    self._answer_now(q, elem, status_byte, blk.S_IOERR)
                    return None
                return _Work(_WRITE, offset, n, iov, False, False, 0, q, elem.head,
                             status_byte, 1)
            return _Work(_READ, offset, n, iov, False, False, 0, q, elem.head, status_byte,
                         n + 1)
        if rtype in (blk.T_FLUSH, blk.T_FLUSH_OUT):
            if "flush" not in p.features:
                self._answer_now(q, elem, status_byte, blk.S_UNSUPP)
                return None
            return self._work(StorageOp.FLUSH, 0, 0, (), q, elem, status_byte, 1)
        if rtype == blk.T_GET_ID:
            room = sum(map(len, data_in))
            ident = p.serial.encode()[:blk.ID_BYTES].ljust(blk.ID_BYTES, b"\0")[:room]
            at = 0
            for b in data_in:
                take = ident[at:at + len(b)]
                b[:len(take)] = take
                at += len(take)
            self._answer_now(q, elem, status_byte, blk.S_OK, len(ident) + 1)
            return None
        if rtype in (blk.T_DISCARD, blk.T_WRITE_ZEROES):
            return self._discard(rtype, data_out, q, elem, status_byte)
        self._answer_now(q, elem, status_byte, blk.S_UNSUPP)
        return None

    def _discard(self, rtype: int, data_out: list[memoryview], q: DeviceQueue, elem: Element,
                 status_byte: memoryview) -> _Work | None:
        bit = blk.F_DISCARD if rtype == blk.T_DISCARD else blk.F_WRITE_ZEROES
        if not self._negotiated(bit) or self.p.readonly:
            self._answer_now(q, elem, status_byte, blk.S_UNSUPP)
            return None
        if sum(map(len, data_out)) != blk.DISCARD_SEG.size * MAX_DISCARD_SEG:
            self._answer_now(q, elem, status_byte, blk.S_UNSUPP)     # QEMU: one segment
            return None
        sector, nsec, flags = blk.DISCARD_SEG.unpack(_split(data_out, blk.DISCARD_SEG.size)[0])
        allowed = 0 if rtype == blk.T_DISCARD else blk.WRITE_ZEROES_FLAG_UNMAP
        if flags & ~allowed or nsec > MAX_DISCARD_SECTORS:
            self._answer_now(q, elem, status_byte, blk.S_UNSUPP)
            return None
        if not self._range_ok(sector, nsec * blk.SECTOR) or nsec == 0:
            self._answer_now(q, elem, status_byte, blk.S_IOERR)
            return None
        # a discard, or zeroes allowed to unmap, deallocates; otherwise zero in place
        op = StorageOp.DISCARD if rtype == blk.T_DISCARD or flags else StorageOp.WRITE_ZEROES
        return self._work(op, sector * blk.SECTOR, nsec * blk.SECTOR, (), q, elem,
                          status_byte, 1)

    def _range_ok(self, sector: int, nbytes: int) -> bool:
        lbs = self.p.sector_size
        return (sector * blk.SECTOR) % lbs == 0 and nbytes % lbs == 0 and \
            sector * blk.SECTOR + nbytes <= self.sectors * blk.SECTOR

    @staticmethod
    def _work(op: StorageOp, offset: int, length: int, iov: tuple[memoryview, ...],
              q: DeviceQueue, elem: Element, status_byte: memoryview, written: int) -> _Work:
        return _Work(op, offset, length, iov, False, False, 0, q, elem.head, status_byte,
                     written)


def _split(bufs: list[memoryview], n: int) -> tuple[bytes, list[memoryview]]:
    """The first ``n`` bytes of ``bufs`` (which hold at least that many), copied, and views
    of the rest; nothing beyond the ``n`` bytes is copied."""
    head = bytearray()
    i = 0
    while len(head) < n:
        take = n - len(head)
        b = bufs[i]
        head += b[:take]
        if len(b) > take:
            return bytes(head), [b[take:], *bufs[i + 1:]]
        i += 1
    return bytes(head), bufs[i:]
