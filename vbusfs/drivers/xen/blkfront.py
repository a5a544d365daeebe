"""blkfront: the Xen virtual-disk frontend (Linux ``xen-blkfront.c``, the seed).

Connection (reference/sysfs.md §2.3): wait for the backend's InitWait; negotiate the ring
size (min of ``max-ring-page-order`` and ours), allocate and grant the ring pages, allocate
an event channel, write ``ring-ref``/``ring-refN``, ``ring-page-order``, ``event-channel``,
``protocol`` and ``feature-persistent`` in one transaction and go Initialised; when the
backend is Connected read ``sectors``/``info``/``sector-size``/``physical-sector-size`` and
the features, create the gendisk and go Connected. Backend Closing, device removal or
shutdown: stop new I/O, drain what is in flight (with a deadline), end every grant, free the
ring, go Closing then Closed.

:class:`BlkifTransport` puts engine commands on the blkif ring: up to 11 direct segments, or
an indirect request whose segment tables sit in granted pages; ordered writes become
``WRITE_BARRIER`` when the backend offers barriers; flush is ``FLUSH_DISKCACHE`` or an empty
barrier. With persistent grants every pool page is granted once for the life of the
connection; otherwise each command grants its pages (read-only when the backend only reads
them) and ends those grants when its response arrives.
"""

from __future__ import annotations

import errno
import logging
import struct
from dataclasses import dataclass

import trio

from vbusfs.block.contract import Command, Limits
from vbusfs.block.contract import Op as BlockOp
from vbusfs.block.engine import Engine
from vbusfs.block.gendisk import Disk, add_disk, del_disk
from vbusfs.drivers.xen.xenbus import XenbusDevice
from vbusfs.drivers.xen.xenstore_client import XenstoreClient
from vbusfs.platform.memory import PAGE_SIZE, GuestMemory
from vbusfs.platform.xen.event_channel import EventChannels
from vbusfs.platform.xen.grant_table import GrantTable
from vbusfs.protocols.xen import blkif
from vbusfs.protocols.xen.blkif import Op, Status
from vbusfs.protocols.xen.ring import FrontRing, sring_init
from vbusfs.protocols.xen.xenbus import PROTOCOL_NATIVE, XENVBD_MAJOR, State, parse_vdev
from vbusfs.sysfs import Directory, Tree

log = logging.getLogger(__name__)

__all__ = ["BlkifTransport", "BlkfrontEnv", "BlkfrontDriver", "MAX_RING_PAGE_ORDER",
           "MAX_INDIRECT_SEGMENTS"]

MAX_RING_PAGE_ORDER = 4          # XENBUS_MAX_RING_GRANT_ORDER
MAX_INDIRECT_SEGMENTS = 256      # what this frontend asks for at most
POOL_PAGES = 1024                # data pages per disk (4 MiB); more in flight waits
DRAIN_DEADLINE = 5.0
TRANSACTION_ATTEMPTS = 10         # xenstore EAGAINs in a row before connect gives up
_M32 = 0xFFFFFFFF
_SRING_HEADER = 64
#: a request with one segment: blkif_request's head and its first blkif_request_segment
_ONE_SEGMENT = struct.Struct(blkif.REQUEST_HEAD.format + blkif.SEGMENT.format[1:])


@dataclass
class BlkfrontEnv:
    memory: GuestMemory
    grants: GrantTable
    evtchn: EventChannels
    client: XenstoreClient
    tree: Tree
    domid: int
    control: Directory | None = None      # MNT/.vbusfs/block, for per-disk control files
    ring_start: int = 0                   # first ring index (tests start near 2**32)
    pool_pages: int = POOL_PAGES          # data pages per disk


#: blkif response status → errno (BLKIF_RSP_*; anything else is an error)
_ERRNO = {Status.OKAY: 0, Status.EOPNOTSUPP: errno.EOPNOTSUPP}


class BlkifTransport:
    """Engine commands on the blkif ring. A command's ``priv`` holds the grant references of
    its data pages, then of its indirect pages."""

    def __init__(self, env: BlkfrontEnv, ring: FrontRing, port: int, backend_id: int,
                 handle: int, limits: Limits, persistent: bool) -> None:
        self.env = env
        self.ring = ring
        self.port = port
        self.backend_id = backend_id
        self.handle = handle & 0xFFFF
        self.limits = limits
        self.persistent = persistent
        self.pgrants: dict[int, int] = {}          # pfn -> ref (persistent)
        self.leaked_grants = 0
        self.notifications = 0

    def grant_pool(self, first: int, count: int) -> None:
        for pfn in range(first, first + count):
            self.pgrants[pfn] = self.env.grants.grant_access(self.backend_id, pfn, False)

    def end_pool(self) -> None:
        for ref in self.pgrants.values():
            if not self.env.grants.end_access(ref):
                self.leaked_grants += 1
        self.pgrants.clear()

    def can_post(self, cmd: Command) -> bool:
        ring = self.ring                             # every command is one slot
        return (ring.req_prod_pvt - ring.rsp_cons) & _M32 < ring.size

    def extra_pages_for(self, op: BlockOp, npages: int) -> int:
        """Indirect segment pages, for more data pages than a direct request carries."""
        if npages <= blkif.MAX_SEGMENTS_PER_REQUEST:
            return 0
        return -(-npages // blkif.SEGMENTS_PER_INDIRECT_PAGE)

    def _grant(self, cmd: Command) -> list[int]:
        g = self.env.grants
        if self.persistent:
            get = self.pgrants.__getitem__
            return list(map(get, cmd.pages)) + list(map(get, cmd.extra_pages))
        ro = cmd.op != BlockOp.READ          # the backend only reads what we write
        return [g.grant_access(self.backend_id, p, ro) for p in cmd.pages] + \
            [g.grant_access(self.backend_id, p, True) for p in cmd.extra_pages]

    def retire(self, cmd: Command) -> None:
        if not self.persistent:
            for ref in cmd.priv:
                if not self.env.grants.end_access(ref):
                    self.leaked_grants += 1       # still mapped by the backend
        cmd.priv = None

    def post(self, cmd: Command) -> None:
        ring = self.ring
        view = ring.view
        prod = ring.req_prod_pvt
        off = _SRING_HEADER + (prod & ring.mask) * blkif.SLOT_SIZE
        pages = cmd.pages
        if self.persistent and len(pages) == 1 and not cmd.extra_pages:
            # the 4 KiB request: its persistent grant and one segment, one struct call
            cmd.priv = refs = [self.pgrants[pages[0]]]
            kind = cmd.op
            op = Op.READ if kind == BlockOp.READ else Op.WRITE_BARRIER \
                if cmd.ordered and self.limits.barrier else Op.WRITE
            if kind == BlockOp.READ or kind == BlockOp.WRITE:
                _ONE_SEGMENT.pack_into(view, off, op, 1, self.handle, cmd.id, cmd.sector,
                                       refs[0], 0, cmd.nsectors - 1)
                ring.req_prod_pvt = (prod + 1) & _M32
                return
        else:
            cmd.priv = refs = self._grant(cmd)
        if cmd.op == BlockOp.DISCARD:
            blkif.DISCARD.pack_into(view, off, Op.DISCARD, 0, self.handle, cmd.id, cmd.sector,
                                    cmd.nsectors)
        elif cmd.op == BlockOp.FLUSH:
            op = Op.FLUSH_DISKCACHE if self.limits.flush else Op.WRITE_BARRIER
            blkif.REQUEST_HEAD.pack_into(view, off, op, 0, self.handle, cmd.id, cmd.sector)
        else:
            # Data always starts at sector 0 of a page; only the last page may be partial.
            op = Op.READ if cmd.op == BlockOp.READ else \
                Op.WRITE_BARRIER if cmd.ordered and self.limits.barrier else Op.WRITE
            nseg = len(cmd.pages)
            drefs = refs[:nseg]
            if nseg <= blkif.MAX_SEGMENTS_PER_REQUEST:
                blkif.REQUEST_HEAD.pack_into(view, off, op, nseg, self.handle, cmd.id,
                                             cmd.sector)
                at = off + blkif.REQUEST_HEAD.size
                blkif.pack_segments(view[at:at + 8 * nseg], drefs, cmd.nsectors)
            else:
                mem = self.env.memory
                per = blkif.SEGMENTS_PER_INDIRECT_PAGE
                left = cmd.nsectors
                for i, pfn in enumerate(cmd.extra_pages):
                    part = drefs[i * per:(i + 1) * per]
                    nsec = min(left, len(part) * (PAGE_SIZE // blkif.SECTOR))
                    blkif.pack_segments(mem.view(pfn), part, nsec)
                    left -= nsec
                irefs = refs[nseg:]
                grefs = irefs + [0] * (blkif.MAX_INDIRECT_PAGES - len(irefs))
                blkif.INDIRECT.pack_into(view, off, Op.INDIRECT, op, nseg, cmd.id,
                                         cmd.sector, self.handle, *grefs)
        ring.req_prod_pvt = (prod + 1) & _M32

    def push(self) -> None:
        if self.ring.push_requests_and_check_notify():
            self.notifications += 1
            self.env.evtchn.send(self.env.domid, self.port)


class BlkfrontDriver:
    """``xen-blkfront`` as a xenbus driver: it takes ``vbd`` devices."""

    name = "vbd"
    module = "xen_blkfront"

    def __init__(self, env: BlkfrontEnv) -> None:
        self.env = env

    def match(self, dev: XenbusDevice) -> bool:
        return dev.devtype == "vbd"

    async def probe(self, dev: XenbusDevice, *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await Blkfront(self.env, dev).run(task_status=task_status)

    async def remove(self, dev: XenbusDevice) -> None:
        front = dev.drvdata
        if isinstance(front, Blkfront):
            await front.close()


class Blkfront:
    def __init__(self, env: BlkfrontEnv, dev: XenbusDevice) -> None:
        self.env = env
        self.dev = dev
        dev.drvdata = self
        self.client: XenstoreClient = env.client
        self.backend = ""
        self.backend_id = 0
        self.backend_state = State.UNKNOWN
        self._be_changed = trio.Event()
        self.ring_pfn = 0
        self.ring_pages = 0
        self.ring_refs: list[int] = []
        self.port = 0
        self.transport: BlkifTransport | None = None
        self.engine: Engine | None = None
        self.disk: Disk | None = None
        self._closing = False
        self._closed = trio.Event()

    # -- helpers ----------------------------------------------------------------------------
    async def _be_int(self, key: str, default: int) -> int:
        return await self.client.read_int(f"{self.backend}/{key}", default)

    async def _wait_backend(self, *states: State) -> None:
        while self.backend_state not in states:
            if self.backend_state in (State.CLOSING, State.CLOSED) and \
                    State.CLOSING not in states:
                raise OSError(errno.ENODEV, f"{self.backend} closed during negotiation")
            await self._be_changed.wait()

    async def _follow_backend(self, watch: trio.MemoryReceiveChannel[str]) -> None:
        async for _ in watch:
            try:
                self.backend_state = State(await self._be_int("state", State.UNKNOWN))
            except (OSError, ValueError):
                self.backend_state = State.UNKNOWN
            self._be_changed.set()
            self._be_changed = trio.Event()
            if self.backend_state == State.CLOSING and self.disk is not None and \
                    not self._closing:
                log.info("%s: backend is closing; removing the disk", self.dev.name)
                await self.close()

    # -- lifecycle --------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        dev = self.dev
        self.backend = await self.client.read(f"{dev.nodename}/backend")
        self.backend_id = await self.client.read_int(f"{dev.nodename}/backend-id", 0)
        dev.otherend, dev.otherend_id = self.backend, self.backend_id
        token = f"otherend-{dev.name}"
        watch = await self.client.watch(f"{self.backend}/state", token)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._follow_backend, watch)
                await self._wait_backend(State.INIT_WAIT, State.CONNECTED)
                await self._talk_to_blkback()
                await self._wait_backend(State.CONNECTED)
                await self._connect()
                nursery.start_soon(self._interrupt)
                task_status.started()
                await self._closed.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._teardown()
            # best effort: the xenstore connection may be going away with us
            with trio.CancelScope(shield=True, deadline=trio.current_time() + 1):
                try:
                    await self.client.unwatch(f"{self.backend}/state", token)
                except OSError:
                    pass

    async def _talk_to_blkback(self) -> None:
        env, dev = self.env, self.dev
        be_order = await self._be_int("max-ring-page-order", 0)
        order = max(0, min(be_order, MAX_RING_PAGE_ORDER))
        self.ring_pages = 1 << order
        self.ring_pfn = env.memory.alloc(self.ring_pages)
        sview = env.memory.view(self.ring_pfn, self.ring_pages)
        sring_init(sview)
        if env.ring_start:
            start = env.ring_start & _M32
            for off, value in ((0, start), (4, start + 1), (8, start), (12, start + 1)):
                sview[off:off + 4] = (value & _M32).to_bytes(4, "little")
        self.ring_refs = [env.grants.grant_access(self.backend_id, self.ring_pfn + i, False)
                          for i in range(self.ring_pages)]
        self.port = env.evtchn.alloc_unbound(env.domid, self.backend_id)
        dev.port = self.port
        persistent = await self._be_int("feature-persistent", 0)
        node = dev.nodename
        for _attempt in range(TRANSACTION_ATTEMPTS):
            try:
                async with self.client.transaction() as tx:
                    if self.ring_pages == 1:
                        await tx.write(f"{node}/ring-ref", str(self.ring_refs[0]))
                    else:
                        await tx.write(f"{node}/ring-page-order", str(order))
                        for i, ref in enumerate(self.ring_refs):
                            await tx.write(f"{node}/ring-ref{i}", str(ref))
                    await tx.write(f"{node}/event-channel", str(self.port))
                    await tx.write(f"{node}/protocol", PROTOCOL_NATIVE)
                    await tx.write(f"{node}/feature-persistent", "1" if persistent else "0")
                break
            except OSError as e:
                if e.errno != errno.EAGAIN:
                    raise
        else:                 # never committed: the backend must not see a half-set node
            raise OSError(errno.EAGAIN, f"{node}: the xenstore transaction publishing the "
                          f"ring conflicted {TRANSACTION_ATTEMPTS} times in a row; giving up")
        await dev.switch_state(State.INITIALISED)

    async def _connect(self) -> None:
        env, dev = self.env, self.dev
        sectors = await self._be_int("sectors", 0)
        info = await self._be_int("info", 0)
        sector_size = await self._be_int("sector-size", blkif.SECTOR)
        physical = await self._be_int("physical-sector-size", sector_size)
        if sector_size < 512 or sector_size & (sector_size - 1) or sector_size > PAGE_SIZE:
            raise OSError(errno.EINVAL, f"backend sector-size {sector_size} is not usable")
        flush = await self._be_int("feature-flush-cache", 0) == 1
        barrier = await self._be_int("feature-barrier", 0) == 1
        discard = await self._be_int("feature-discard", 0) == 1
        persistent = await self._be_int("feature-persistent", 0) == 1
        indirect = await self._be_int("feature-max-indirect-segments", 0)
        segs = min(indirect, MAX_INDIRECT_SEGMENTS) \
            if indirect > blkif.MAX_SEGMENTS_PER_REQUEST else blkif.MAX_SEGMENTS_PER_REQUEST
        granularity = await self._be_int("discard-granularity", sector_size) if discard else 0
        ring = FrontRing(env.memory.view(self.ring_pfn, self.ring_pages), blkif.SLOT_SIZE,
                         start=env.ring_start)
        vdev = parse_vdev(dev.devid)
        limits = Limits(
            max_segments=segs, max_segment_size=PAGE_SIZE, max_transfer=segs * PAGE_SIZE,
            logical_block_size=sector_size, physical_block_size=physical,
            discard_granularity=granularity,
            # blk_queue_max_discard_sectors(rq, get_capacity(gd))
            max_discard_bytes=sectors * blkif.SECTOR if discard else 0,
            flush=flush, barrier=barrier, fua=barrier)
        self.transport = t = BlkifTransport(env, ring, self.port, self.backend_id,
                                            vdev.number, limits, persistent)
        per_cmd = segs + t.extra_pages_for(BlockOp.WRITE, segs)
        self.engine = Engine(env.memory, t, ring.size, min(ring.size * per_cmd, env.pool_pages))
        if persistent:
            t.grant_pool(self.engine.pool.base, self.engine.pool.nr_pages)
        self.disk = Disk(vdev.name, XENVBD_MAJOR, vdev.minor, vdev.range, sectors,
                         self.engine, readonly=bool(info & blkif.VDISK_READONLY),
                         removable=bool(info & blkif.VDISK_REMOVABLE))
        assert dev.dir is not None
        add_disk(env.tree, dev.dir, self.disk, env.control)
        await dev.switch_state(State.CONNECTED)

    async def _interrupt(self) -> None:
        """The event channel's handler runs directly when the backend notifies (a doorbell
        handler, like an interrupt taken on the spot); this task only picks up what the
        handler could not, e.g. a notification that arrived while it was running."""
        bell = self.env.evtchn.get(self.env.domid, self.port).bell
        bell.handler = self._responses
        try:
            while True:
                await bell.wait()
                self._responses()
        finally:
            bell.handler = None

    def _responses(self) -> bool:
        """``blkif_interrupt``: consume responses, re-arm, restart the queue."""
        t, engine = self.transport, self.engine
        if t is None or engine is None or not engine.connected:
            return True
        ring = t.ring
        unpack, complete, errnos = blkif.RESPONSE.unpack_from, engine.complete, _ERRNO
        view, mask = ring.view, ring.mask
        while True:
            rp = ring.rsp_prod
            cons = ring.rsp_cons
            if (rp - cons) & _M32 > ((ring.req_prod_pvt - cons) & _M32):
                log.error("%s: backend produced responses for requests never sent "
                          "(rsp_prod %d); disk failed", self.dev.name, rp)
                engine.fail_all()
                return True
            while cons != rp:
                rid, _op, status = unpack(view, _SRING_HEADER + (cons & mask) *
                                          blkif.SLOT_SIZE)
                cons = ring.rsp_cons = (cons + 1) & _M32
                complete(rid, 0 if status == 0 else errnos.get(status, errno.EIO))
            if not ring.final_check_for_responses():
                break
        if engine.ready:
            engine.startio()
        return True

    async def close(self) -> None:
        """Closing → drain → Closed (``blkfront_closing`` / ``xenbus_dev_shutdown``)."""
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        dev = self.dev
        # No new I/O (the disk goes from /dev and sysfs; open files get ENXIO), let what is
        # in flight finish while the backend is still connected, then announce Closing.
        if self.disk is not None:
            del_disk(self.env.tree, self.disk, self.env.control)
        if self.engine is not None and not await self.engine.drain(DRAIN_DEADLINE):
            log.warning("%s: I/O still in flight after %.0f s; failing it", dev.name,
                        DRAIN_DEADLINE)
        await dev.switch_state(State.CLOSING)
        with trio.move_on_after(DRAIN_DEADLINE):
            await self._wait_backend(State.CLOSING, State.CLOSED)
        if self.engine is not None:
            self.engine.fail_all()
        await dev.switch_state(State.CLOSED)
        self._closed.set()

    def _teardown(self) -> None:
        """End every grant and free the ring (the backend has unmapped by now)."""
        env = self.env
        if self.engine is not None:
            self.engine.fail_all()
        if self.disk is not None and not self.disk.dead:
            del_disk(env.tree, self.disk, env.control)
        if self.transport is not None:
            self.transport.end_pool()
            if self.engine is not None:
                if self.transport.leaked_grants:
                    log.warning("%s: %d pool grants still mapped by the backend; their "
                                "pages stay allocated", self.dev.name,
                                self.transport.leaked_grants)
                else:
                    self.engine.pool.close()
        for ref in self.ring_refs:
            if not env.grants.end_access(ref):
                log.warning("%s: ring grant %d still mapped by the backend", self.dev.name,
                            ref)
        self.ring_refs = []
        if self.port:
            env.evtchn.close(env.domid, self.port)
            self.port = self.dev.port = 0
        if self.ring_pfn:
            env.memory.free(self.ring_pfn, self.ring_pages)
            self.ring_pfn = 0
