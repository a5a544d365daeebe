"""blkback: the host half of a Xen virtual disk.

Lifecycle (reference/protocols.md §1.4, sysfs.md §2.3): publish features and limits, go
InitWait; when the frontend is Initialised (or Connected), read its transport keys, map the
ring pages through the grant table, bind the event channel, publish ``sectors``/``info``/
``sector-size``/``physical-sector-size`` and go Connected; on frontend Closing, stop the
ring, unmap everything and follow it through Closing to Closed.

Everything on the ring is untrusted. A request slot is copied out before it is looked at
(``RING_COPY_REQUEST``); each request is validated completely — operation, segment count,
sector bounds inside a frame, grant references and their read-only flag against the
direction, indirect pages, the sector range against the disk, logical-block alignment —
and a bad one is answered with ``BLKIF_RSP_ERROR`` (or ``EOPNOTSUPP`` for an operation not
offered) without touching the image. A frontend that publishes more requests than the ring
holds (``RING_REQUEST_PROD_OVERFLOW``) gets its ring halted, as Linux blkback does.

Valid requests become :class:`~backends.storage.executor.Request`s for the image executor,
which owns ordering, flush semantics, the inline fast path and the I/O thread; blkback only
maps blkif onto it: ``FLUSH_DISKCACHE`` is a flush (with data: a write made durable),
``WRITE_BARRIER`` a flush (with data: a write preceded by a flush and made durable). The
notification is handled directly when the ring is idle (see
:class:`~vbusfs.platform.doorbell.Doorbell`); while the executor has a batch out, nothing new
is taken off the ring, so requests run in ring order.
"""

from __future__ import annotations

import errno
import functools
import logging
import math
import operator
import struct
from collections.abc import Callable
from dataclasses import dataclass

import trio

from backends.storage.executor import ImageExecutor, Request, StorageOp
from backends.storage.raw import RawImage
from backends.xen.xenstore import Store
from vbusfs.config.xen import VbdConfig
from vbusfs.platform.memory import PAGE_SIZE, GuestMemory
from vbusfs.platform.xen.event_channel import EventChannels
from vbusfs.platform.xen.grant_table import GrantError, GrantTable
from vbusfs.protocols.xen import blkif
from vbusfs.protocols.xen.blkif import Op, Status
from vbusfs.protocols.xen.ring import BackRing
from vbusfs.protocols.xen.xenbus import PROTOCOL_NATIVE, State

log = logging.getLogger(__name__)

__all__ = ["Blkback", "MAX_PERSISTENT_GRANTS"]

MAX_PERSISTENT_GRANTS = 1056           # Linux xen_blkif_max_pgrants default
SECTORS_PER_PAGE = PAGE_SIZE // blkif.SECTOR
_SRING_HEADER = 64
#: a request with one segment: blkif_request's head and its first blkif_request_segment
_ONE_SEGMENT = struct.Struct(blkif.REQUEST_HEAD.format + blkif.SEGMENT.format[1:])
_FULL_PAGES = bytes([SECTORS_PER_PAGE - 1]) * blkif.SEGMENTS_PER_INDIRECT_PAGE * \
    blkif.MAX_INDIRECT_PAGES


class _Bad(Exception):
    """A request that gets an error response; ``status`` is the blkif status."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


@dataclass(slots=True)
class _Work(Request):
    """A request taken off the ring: what the executor needs, and how to answer it."""

    id: int = 0
    wire_op: int = 0             # the operation the response names
    mapped: tuple[int, ...] = ()  # grant refs to unmap after the I/O


def _status(err: int) -> int:
    """The executor's errno as a blkif status (BLKIF_RSP_*)."""
    return Status.OKAY if not err else Status.EOPNOTSUPP if err == errno.EOPNOTSUPP \
        else Status.ERROR


class Blkback:
    def __init__(self, store: Store, grants: GrantTable, evtchn: EventChannels,
                 memory: GuestMemory, spec: VbdConfig, fe_domid: int = 1, domid: int = 0) -> None:
        self.store = store
        self.grants = grants
        self.evtchn = evtchn
        self.memory = memory
        self.spec = spec
        self.domid = domid
        self.fe_domid = fe_domid
        n = spec.vdev.number
        self.path = f"/local/domain/{domid}/backend/vbd/{fe_domid}/{n}"
        self.fe_path = f"/local/domain/{fe_domid}/device/vbd/{n}"
        self.image: RawImage | None = None
        self.sectors = 0
        self.ring: BackRing | None = None
        self.ring_refs: list[int] = []
        self.port = 0
        self.persistent = False
        self._pgrants: dict[int, int] = {}      # ref -> pfn, mapped writable for good
        self._pviews: dict[int, memoryview] = {}   # ref -> a view of its page
        self.broken = ""
        self.requests = 0
        self.errors = 0
        self._ring_scope: trio.CancelScope | None = None
        self.executor: ImageExecutor | None = None
        self._pumping = False
        self._answer: Callable[[list[_Work]], None] | None = None   # _done on this ring

    # -- xenstore ----------------------------------------------------------------------------
    def _w(self, key: str, value: object) -> None:
        self.store.write(f"{self.path}/{key}", str(value))

    def _fe(self, key: str, default: str | None = None) -> str:
        try:
            return self.store.read(f"{self.fe_path}/{key}")
        except FileNotFoundError:
            if default is None:
                raise OSError(errno.ENOENT, f"frontend did not write {key}") from None
            return default

    def _fe_int(self, key: str, default: int | None = None) -> int:
        text = self._fe(key, None if default is None else str(default))
        try:
            return int(text)
        except ValueError:
            raise OSError(errno.EINVAL, f"frontend {key} {text!r} is not a number") from None

    def state(self) -> int:
        try:
            return int(self.store.read(f"{self.path}/state"))
        except (OSError, ValueError):
            return State.UNKNOWN

    def _switch(self, state: State) -> None:
        self._w("state", int(state))

    def open_image(self) -> None:
        spec = self.spec
        flushable = bool({"flush", "barrier"} & spec.features)
        self.image = RawImage(spec.image, size=spec.size, readonly=spec.readonly,
                              sync=not flushable, sector_size=spec.sector_size)
        self.sectors = self.image.size // blkif.SECTOR
        self.executor = ImageExecutor(self.image, f"blkback {spec.vdev.name}")

    def publish_features(self) -> None:
        f = self.spec.features
        self._w("feature-flush-cache", int("flush" in f))
        self._w("feature-barrier", int("barrier" in f))
        self._w("feature-discard", int("discard" in f))
        if "discard" in f:
            self._w("discard-granularity", self.spec.sector_size)
            self._w("discard-alignment", 0)
            self._w("discard-secure", 0)
        self._w("feature-persistent", int("persistent" in f))
        if self.spec.indirect_segments:
            self._w("feature-max-indirect-segments", self.spec.indirect_segments)
        self._w("max-ring-page-order", self.spec.max_ring_page_order)
        self._switch(State.INIT_WAIT)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        send, recv = trio.open_memory_channel[str](math.inf)
        watch = self.store.watch(f"{self.fe_path}/state", "blkback", lambda p, t:
                                 send.send_nowait(p))
        try:
            self.open_image()
            self.publish_features()
            task_status.started()
            async with trio.open_nursery() as nursery:
                async for _ in recv:
                    await self._frontend_changed(nursery)
        finally:
            self.store.unwatch(watch)
            self._disconnect()
            if self.executor is not None:
                self.executor.close()
            if self.image is not None:
                self.image.close()

    async def _frontend_changed(self, nursery: trio.Nursery) -> None:
        try:
            fe_state = int(self._fe("state", "0"))
        except ValueError:
            return
        mine = self.state()
        if fe_state in (State.INITIALISED, State.CONNECTED) and mine != State.CONNECTED:
            if mine != State.INIT_WAIT:
                return
            try:
                self._connect()
            except (OSError, GrantError) as e:
                log.warning("%s: cannot connect: %s", self.path, e)
                self._disconnect()
                self._w("hotplug-error", str(e))
                self._switch(State.CLOSING)
                return
            nursery.start_soon(self._serve_ring)
        elif fe_state == State.CLOSING and mine not in (State.CLOSING, State.CLOSED):
            await self._quiesce()
            self._switch(State.CLOSING)
        elif fe_state == State.CLOSED and mine != State.CLOSED:
            await self._quiesce()
            self._switch(State.CLOSED)
        elif fe_state in (State.INITIALISING, State.UNKNOWN) and mine == State.CLOSED:
            self.publish_features()          # the frontend reconnects

    # -- connect / disconnect ---------------------------------------------------------------
    def _connect(self) -> None:
        proto = self._fe("protocol", PROTOCOL_NATIVE)
        if proto != PROTOCOL_NATIVE:
            raise OSError(errno.EPROTONOSUPPORT, f"protocol {proto!r} is not supported "
                          f"(only {PROTOCOL_NATIVE})")
        order = self._fe_int("ring-page-order", 0)
        if not 0 <= order <= self.spec.max_ring_page_order:
            raise OSError(errno.EINVAL, f"ring-page-order {order} exceeds "
                          f"max-ring-page-order {self.spec.max_ring_page_order}")
        pages = 1 << order
        refs = [self._fe_int("ring-ref")] if order == 0 and \
            self.store.exists(f"{self.fe_path}/ring-ref") else \
            [self._fe_int(f"ring-ref{i}") for i in range(pages)]
        fe_port = self._fe_int("event-channel")
        self.persistent = "persistent" in self.spec.features and \
            self._fe_int("feature-persistent", 0) == 1
        pfns: list[int] = []
        try:
            for ref in refs:
                pfns.append(self.grants.map(ref, self.domid, write=True))
                self.ring_refs.append(ref)
        except GrantError:
            self._unmap_ring()
            raise
        if pfns != list(range(pfns[0], pfns[0] + pages)):
            self._unmap_ring()
            raise OSError(errno.EINVAL, "ring pages are not contiguous in guest memory "
                          "(a limitation of this backend)")
        view = self.memory.view(pfns[0], pages)
        # BACK_RING_ATTACH: start from the indices the shared page holds (0 on a new ring)
        self.ring = BackRing(view, blkif.SLOT_SIZE, start=int.from_bytes(view[8:12], "little"))
        self._answer = functools.partial(self._done, self.ring)
        self.port = self.evtchn.bind_interdomain(self.domid, self.fe_domid, fe_port)
        self.broken = ""
        info = blkif.VDISK_READONLY if self.spec.readonly else 0
        self._w("sectors", self.sectors)
        self._w("info", info)
        self._w("sector-size", self.spec.sector_size)
        self._w("physical-sector-size", self.spec.sector_size)
        self._switch(State.CONNECTED)

    def _unmap_ring(self) -> None:
        for ref in self.ring_refs:
            self.grants.unmap(ref)
        self.ring_refs = []

    async def _quiesce(self) -> None:
        """Stop the ring: let a batch being executed finish and answer, then disconnect."""
        if self._ring_scope is not None:
            self._ring_scope.cancel()
            self._ring_scope = None
        if self.executor is not None:
            await self.executor.wait_idle()
        self._disconnect()

    def _disconnect(self) -> None:
        if self._ring_scope is not None:
            self._ring_scope.cancel()
            self._ring_scope = None

        for ref in self._pgrants:
            self.grants.unmap(ref)
        self._pgrants.clear()
        self._pviews.clear()
        self._unmap_ring()
        self.ring = None
        self._answer = None
        if self.port:
            self.evtchn.close(self.domid, self.port)
            self.port = 0

    # -- the ring ---------------------------------------------------------------------------
    async def _serve_ring(self) -> None:
        """Install the direct handler and stay as its fallback: a ring the handler left
        pending (it failed) is served from here."""
        bell = self.evtchn.get(self.domid, self.port).bell
        with trio.CancelScope() as scope:
            self._ring_scope = scope
            bell.handler = self._pump
            try:
                self._pump()                 # requests posted before we were connected
                while True:
                    await bell.wait()
                    self._pump()
            finally:
                bell.handler = None

    def _pump(self) -> bool:
        """Take what the frontend posted and hand it to the executor. Runs directly from the
        frontend's notification (see :class:`~vbusfs.platform.doorbell.Doorbell`), from the
        ring task, and again when the executor's batch comes back. While a batch is out,
        nothing else is taken, so requests run in ring order and a flush or barrier is
        ordered after everything before it. Never runs nested: a notification that arrives
        while it runs (its own responses can bring new requests at once) is found by its
        ``RING_FINAL_CHECK_FOR_REQUESTS``."""
        ring, ex, answer = self.ring, self.executor, self._answer
        if ring is None or ex is None or answer is None or self._ring_scope is None or \
                self.broken or ex.busy or self._pumping:
            return True
        self._pumping = True
        try:
            while True:
                # nothing published since the last look: nothing to consume (and, as
                # req_cons never runs ahead of the responses by more than the ring, no
                # overflow to find)
                work = self._consume(ring) if ring.req_prod != ring.req_cons else []
                if self.broken:
                    return True
                if work and not ex.submit(work, answer):
                    self._notify(ring)
                    return True              # _done pumps again when the batch is back
                self._notify(ring)
                if not ring.final_check_for_requests():
                    return True
        finally:
            self._pumping = False

    def _done(self, ring: BackRing, work: list[_Work]) -> None:
        """The executor finished ``work``: answer it. When it came back from the I/O
        thread (not inside the pump), publish the answers and take what waited."""
        if ring is not self.ring:            # disconnected meanwhile: nothing to answer on
            for w in work:
                for ref in w.mapped:
                    self.grants.unmap(ref)
            return
        self._finish(ring, work)
        if not self._pumping:
            self._notify(ring)
            self._pump()

    def _notify(self, ring: BackRing) -> None:
        if ring.push_responses_and_check_notify():
            self.evtchn.send(self.domid, self.port)

    def _consume(self, ring: BackRing) -> list[_Work]:
        prod = ring.req_prod
        if ring.request_prod_overflow(prod):
            self.broken = (f"frontend produced {(prod - ring.rsp_prod_pvt) & 0xFFFFFFFF} "
                           f"requests on a {ring.size}-entry ring")
            log.warning("%s: %s; ring processing halted", self.path, self.broken)
            self._w("hotplug-error", self.broken)
            return []
        work: list[_Work] = []
        view, mask, size = ring.view, ring.mask, ring.size
        sectors, align = self.sectors, self.spec.sector_size // blkif.SECTOR - 1
        readonly = self.spec.readonly
        pviews = self._pviews
        while ring.req_cons != prod and (ring.req_cons - ring.rsp_prod_pvt) & 0xFFFFFFFF \
                < size:
            off = _SRING_HEADER + (ring.req_cons & mask) * blkif.SLOT_SIZE
            raw = bytes(view[off:off + blkif.SLOT_SIZE])      # RING_COPY_REQUEST
            ring.req_cons = (ring.req_cons + 1) & 0xFFFFFFFF
            self.requests += 1
            # The common request first: a read or write of one whole-from-sector-0 segment
            # whose grant is mapped persistently. Every check _parse makes for it is made
            # here; anything else (or anything that fails a check) takes _parse.
            op, nseg, _handle, req_id, sector, gref, first, last = _ONE_SEGMENT.unpack_from(raw)
            if nseg == 1 and op <= Op.WRITE and first == 0 and last < SECTORS_PER_PAGE:
                page = pviews.get(gref)
                nsec = last + 1
                if page is not None and sector + nsec <= sectors and \
                        not (sector | nsec) & align and (op == Op.READ or not readonly):
                    n = nsec * blkif.SECTOR
                    work.append(_Work(StorageOp.WRITE if op else StorageOp.READ,
                                      sector * blkif.SECTOR, n,
                                      (page if n == PAGE_SIZE else page[:n],),
                                      False, False, 0, req_id, op))
                    continue
            try:
                work.append(self._parse(raw, req_id))
            except _Bad as e:
                self.errors += 1
                log.debug("%s: request %#x rejected: %s", self.path, req_id, e)
                self._respond(ring, req_id, raw[0], e.status)
        return work

    def _respond(self, ring: BackRing, req_id: int, op: int, status: int) -> None:
        blkif.RESPONSE.pack_into(ring.view, ring.slot_offset(ring.rsp_prod_pvt),
                                 req_id, op, status)
        ring.rsp_prod_pvt = (ring.rsp_prod_pvt + 1) & 0xFFFFFFFF

    def _finish(self, ring: BackRing, work: list[_Work]) -> None:
        view, mask, pack = ring.view, ring.mask, blkif.RESPONSE.pack_into
        prod = ring.rsp_prod_pvt
        for w in work:
            if w.mapped:
                for ref in w.mapped:
                    self.grants.unmap(ref)
            status = w.status
            if status:
                self.errors += 1
                status = _status(status)
            pack(view, _SRING_HEADER + (prod & mask) * blkif.SLOT_SIZE, w.id, w.wire_op,
                 status)
            prod = (prod + 1) & 0xFFFFFFFF
        ring.rsp_prod_pvt = prod

    # -- validation -------------------------------------------------------------------------
    def _parse(self, raw: bytes, req_id: int) -> _Work:
        op = raw[0]
        f = self.spec.features
        if op in (Op.READ, Op.WRITE, Op.FLUSH_DISKCACHE, Op.WRITE_BARRIER):
            _, nseg, _handle, _, sector = blkif.REQUEST_HEAD.unpack_from(raw)
            if (op == Op.FLUSH_DISKCACHE and "flush" not in f) or \
                    (op == Op.WRITE_BARRIER and "barrier" not in f):
                raise _Bad(Status.EOPNOTSUPP, f"operation {op} not offered")
            if nseg > blkif.MAX_SEGMENTS_PER_REQUEST:
                raise _Bad(Status.ERROR, f"{nseg} segments in a direct request")
            if nseg == 0 and op in (Op.READ, Op.WRITE):
                raise _Bad(Status.ERROR, "read or write without segments")
            segs = blkif.unpack_segments(raw[blkif.REQUEST_HEAD.size:], nseg)
            return self._rw(req_id, op, op, sector, *segs)
        if op == Op.INDIRECT:
            _, iop, nseg, _, sector, _handle, *grefs = blkif.INDIRECT.unpack_from(raw)
            if not self.spec.indirect_segments:
                raise _Bad(Status.EOPNOTSUPP, "indirect requests not offered")
            if iop not in (Op.READ, Op.WRITE):
                raise _Bad(Status.ERROR, f"indirect operation {iop}")
            if not 1 <= nseg <= self.spec.indirect_segments:
                raise _Bad(Status.ERROR, f"{nseg} indirect segments (max "
                           f"{self.spec.indirect_segments})")
            pages = -(-nseg // blkif.SEGMENTS_PER_INDIRECT_PAGE)
            table = bytearray()
            for ref in grefs[:pages]:
                pfn = self._map(ref, write=False)
                table += self.memory.view(pfn)        # copy, then validate the copy
                self.grants.unmap(ref)
            segs = blkif.unpack_segments(table, nseg)
            return self._rw(req_id, iop, iop, sector, *segs)  # Linux answers with indirect_op
        if op == Op.DISCARD:
            _, flag, _handle, _, sector, nsec = blkif.DISCARD.unpack_from(raw)
            if "discard" not in f or flag & blkif.DISCARD_SECURE:
                raise _Bad(Status.EOPNOTSUPP, "discard not offered")
            if self.spec.readonly:
                raise _Bad(Status.ERROR, "discard on a read-only disk")
            self._check_range(sector, nsec)
            return _Work(StorageOp.DISCARD, sector * blkif.SECTOR, nsec * blkif.SECTOR,
                         id=req_id, wire_op=op)
        raise _Bad(Status.EOPNOTSUPP, f"unknown operation {op}")

    def _check_range(self, sector: int, nsec: int) -> None:
        if sector + nsec > self.sectors:
            raise _Bad(Status.ERROR, f"sectors {sector}+{nsec} lie beyond the disk "
                       f"({self.sectors})")
        per_block = self.spec.sector_size // blkif.SECTOR
        if (sector | nsec) & (per_block - 1):
            raise _Bad(Status.ERROR, f"sectors {sector}+{nsec} are not aligned to "
                       f"{self.spec.sector_size}-byte blocks")

    def _map(self, ref: int, write: bool) -> int:
        try:
            return self.grants.map(ref, self.domid, write)
        except GrantError as e:
            raise _Bad(Status.ERROR, str(e)) from None

    def _rw(self, req_id: int, op: int, kind: int, sector: int, refs: list[int],
            firsts: bytes, lasts: bytes) -> _Work:
        writes_disk = kind != Op.READ
        nseg = len(refs)
        if writes_disk and self.spec.readonly and nseg:
            raise _Bad(Status.ERROR, "write to a read-only disk")
        # whole-array checks (a 1 MiB request has 256 segments)
        if nseg and (max(lasts) >= SECTORS_PER_PAGE or any(map(operator.gt, firsts, lasts))):
            bad = next(i for i in range(nseg)
                       if lasts[i] >= SECTORS_PER_PAGE or lasts[i] < firsts[i])
            raise _Bad(Status.ERROR, f"segment sectors {firsts[bad]}..{lasts[bad]}")
        nsec = sum(lasts) - sum(firsts) + nseg
        self._check_range(sector, nsec)
        # Map: the backend writes guest pages on READ, reads them otherwise.
        if self.persistent and nseg and not any(firsts) and \
                lasts[:-1] == _FULL_PAGES[:nseg - 1]:
            pfns = list(map(self._pgrants.get, refs))
            p0 = pfns[0]
            if p0 is not None and pfns == list(range(p0, p0 + nseg)):
                # persistently mapped whole pages, contiguous in guest memory: one extent
                n = nsec * blkif.SECTOR
                iov: tuple[memoryview, ...] = (self.memory.gpa_view(p0 * PAGE_SIZE, n),)
                if kind == Op.READ:          # the hot path: positional, no helper
                    return _Work(StorageOp.READ, sector * blkif.SECTOR, n, iov, False, False,
                                 0, req_id, op)
                return self._work(req_id, op, kind, sector, nsec, iov, ())
        mapped: list[int] = []
        extents: list[list[int]] = []       # [gpa, length], merged when contiguous
        try:
            for ref, first, last in zip(refs, firsts, lasts, strict=True):
                pfn = self._persistent(ref)
                if pfn is None:
                    pfn = self._map(ref, write=not writes_disk)
                    mapped.append(ref)
                gpa = pfn * PAGE_SIZE + first * blkif.SECTOR
                n = (last - first + 1) * blkif.SECTOR
                if extents and extents[-1][0] + extents[-1][1] == gpa:
                    extents[-1][1] += n
                else:
                    extents.append([gpa, n])
        except _Bad:
            for ref in mapped:
                self.grants.unmap(ref)
            raise
        iov = tuple(self.memory.gpa_view(g, n) for g, n in extents)
        return self._work(req_id, op, kind, sector, nsec, iov, tuple(mapped))

    @staticmethod
    def _work(req_id: int, op: int, kind: int, sector: int, nsec: int,
              iov: tuple[memoryview, ...], mapped: tuple[int, ...]) -> _Work:
        """blkif's data operations in the executor's words."""
        offset, length = sector * blkif.SECTOR, nsec * blkif.SECTOR
        if kind == Op.READ:                  # positional: the hot path
            return _Work(StorageOp.READ, offset, length, iov, False, False, 0, req_id, op,
                         mapped)
        if kind == Op.WRITE:
            return _Work(StorageOp.WRITE, offset, length, iov, False, False, 0, req_id, op,
                         mapped)
        if not iov:                          # an empty flush or barrier: a flush
            return _Work(StorageOp.FLUSH, id=req_id, wire_op=op)
        # with data: a write made durable, after a flush of what came before for a barrier
        return _Work(StorageOp.WRITE, offset, length, iov, preflush=kind == Op.WRITE_BARRIER,
                     fua=True, id=req_id, wire_op=op, mapped=mapped)

    def _persistent(self, ref: int) -> int | None:
        """A persistently mapped frame for ``ref``, mapping it the first time (writable, as
        Linux maps persistent grants); None when not persistent or not grantable so."""
        if not self.persistent:
            return None
        pfn = self._pgrants.get(ref)
        if pfn is None and len(self._pgrants) < MAX_PERSISTENT_GRANTS:
            try:
                pfn = self.grants.map(ref, self.domid, write=True)
            except GrantError:
                return None          # e.g. a read-only grant: map per request instead
            self._pgrants[ref] = pfn
            self._pviews[ref] = self.memory.view(pfn)
        return pfn
