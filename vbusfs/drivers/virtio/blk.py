"""virtio-blk, the guest driver (Linux ``drivers/block/virtio_blk.c``; virtio 1.x §5.2) on
the shared block engine.

Probe reads the configuration (capacity, seg_max, size_max, blk_size, topology, num_queues,
discard limits) as one consistent snapshot, sets up one request queue per queue the device
offers (at most one per CPU), and turns the configuration into the engine's
:class:`~vbusfs.block.contract.Limits` exactly as ``virtblk_probe`` does: max segments
``seg_max`` (at least 1), segment size ``size_max`` or unlimited, transfer unlimited, logical
block ``blk_size``, physical ``blk_size << physical_block_exp``, discard granularity
``discard_sector_alignment`` sectors, write cache when FLUSH was negotiated, rotational (the
driver does not say otherwise). The disk is ``vdX`` with the first dynamic block major (254),
16 minors a disk; ``serial`` is what GET_ID answers (no newline, as Linux prints it) and
``cache_type`` says whether there is a cache to flush.

:class:`VirtioBlkTransport` puts engine commands on the virtqueues: a 16-byte header, the
data (contiguous pages merged into one buffer), a status byte — in an indirect table when
INDIRECT_DESC was negotiated (one ring slot a request), else as a chain. Headers and status
bytes live in a per-command area in guest memory; a command's ``priv`` is its queue. The
used ring is untrusted: a used element that names no request in flight breaks the queue and
fails the disk's I/O rather than completing the wrong command.
"""

from __future__ import annotations

import errno
import logging

import trio

from vbusfs.block.contract import SECTOR, Command, Limits, Op
from vbusfs.block.engine import Engine
from vbusfs.block.gendisk import Disk, add_disk, del_disk
from vbusfs.drivers.virtio.core import VirtioDevice, VirtioDriver
from vbusfs.drivers.virtio.virtqueue import DriverQueue, QueueBroken
from vbusfs.platform.doorbell import Doorbell
from vbusfs.platform.memory import PAGE_SIZE, GuestMemory
from vbusfs.protocols.virtio import blk, ids
from vbusfs.sysfs import Attribute, Directory, Tree

log = logging.getLogger(__name__)

__all__ = ["VirtioBlkDriver", "VirtioBlkTransport", "VIRTBLK_MAJOR", "disk_name"]

#: register_blkdev(0, "virtblk") takes the first free dynamic major, counting down from 254
VIRTBLK_MAJOR = 254
PART_BITS = 4                    # 16 minors a disk
POOL_PAGES = 1024                # data pages a disk may have in flight (4 MiB)
DRAIN_DEADLINE = 5.0
_SLOT = 64                       # header 16, discard segment 16, status 1, padding
_STATUS_AT = 32
_UINT_MAX = 0xFFFFFFFF
_OP_TYPE = {Op.READ: blk.T_IN, Op.WRITE: blk.T_OUT, Op.FLUSH: blk.T_FLUSH,
            Op.DISCARD: blk.T_DISCARD}
_READ, _WRITE, _DRV_IN, _DISCARD = Op.READ, Op.WRITE, Op.DRV_IN, Op.DISCARD
_OUTHDR_PACK = blk.OUTHDR.pack_into
_OUTHDR_SIZE = blk.OUTHDR.size
#: status byte → errno (virtblk_result)
_ERRNO = {blk.S_OK: 0, blk.S_UNSUPP: errno.EOPNOTSUPP}


def disk_name(index: int) -> str:
    """``virtblk_name_format("vd", index)``: vda … vdz, vdaa … (as sd names)."""
    name = ""
    n = index
    while True:
        name = chr(ord("a") + n % 26) + name
        n = n // 26 - 1
        if n < 0:
            return "vd" + name


class VirtioBlkTransport:
    def __init__(self, memory: GuestMemory, queues: list[DriverQueue], limits: Limits,
                 nr_commands: int, indirect: bool) -> None:
        self.memory = memory
        self.queues = queues
        self.limits = limits
        self.indirect = indirect
        self.pages = -(-nr_commands * _SLOT // PAGE_SIZE)
        self.pfn = memory.alloc(self.pages)
        self.area = memory.view(self.pfn, self.pages)
        self.area_gpa = self.pfn * PAGE_SIZE
        self.engine: Engine | None = None
        self._touched: set[int] = set()
        self.bogus = 0

    def release(self) -> None:
        if self.pfn:
            self.memory.free(self.pfn, self.pages)
            self.pfn = 0

    def _queue(self, cmd: Command) -> DriverQueue:
        return self.queues[cmd.id % len(self.queues)]

    def _segments(self, cmd: Command) -> list[tuple[int, int]]:
        """The data as (gpa, length) buffers: pages contiguous in guest memory merged, up to
        the segment size; only the last may be short."""
        left = cmd.nbytes
        maxseg = self.limits.max_segment_size
        pages = cmd.pages
        if left <= 0 or not pages:
            return []
        first = pages[0]
        if len(pages) == 1:                      # one page: one buffer (a page ≤ maxseg)
            if PAGE_SIZE <= maxseg:
                return [(first * PAGE_SIZE, min(left, PAGE_SIZE))]
        elif len(pages) * PAGE_SIZE <= maxseg and pages == list(range(first,
                                                                      first + len(pages))):
            return [(first * PAGE_SIZE, min(left, len(pages) * PAGE_SIZE))]
        out: list[tuple[int, int]] = []
        i = 0
        while left > 0 and i < len(pages):
            start = pages[i]
            j = i + 1
            while j < len(pages) and pages[j] == pages[j - 1] + 1 and \
                    (j - i + 1) * PAGE_SIZE <= maxseg:
                j += 1
            n = min(left, (j - i) * PAGE_SIZE)
            out.append((start * PAGE_SIZE, n))
            left -= n
            i = j
        return out

    # -- Transport ----------------------------------------------------------------------------
    def can_post(self, cmd: Command) -> bool:
        q = self._queue(cmd)
        if not q.indirect:
            nbufs = 2 + (len(self._segments(cmd)) if cmd.nbytes else 0) + \
                (1 if cmd.op == Op.DISCARD else 0)
            return q.num_free >= nbufs
        return q.num_free >= 1

    def extra_pages_for(self, op: Op, npages: int) -> int:
        return 1 if self.indirect else 0            # the indirect table

    def post(self, cmd: Command) -> None:
        queues = self.queues
        cid = cmd.id
        q = queues[cid % len(queues)]
        slot = _SLOT * cid
        gpa = self.area_gpa + slot
        area = self.area
        area[slot + _STATUS_AT] = 0xFF             # not answered yet
        op = cmd.op
        status = [(gpa + _STATUS_AT, 1)]
        if op == _READ:
            _OUTHDR_PACK(area, slot, blk.T_IN, 0, cmd.sector)
            out = [(gpa, _OUTHDR_SIZE)]
            into = self._segments(cmd) + status
        elif op == _WRITE:
            _OUTHDR_PACK(area, slot, blk.T_OUT, 0, cmd.sector)
            out = [(gpa, _OUTHDR_SIZE), *self._segments(cmd)]
            into = status
        elif op == _DRV_IN:
            _OUTHDR_PACK(area, slot, cmd.code, 0, 0)
            out = [(gpa, _OUTHDR_SIZE)]
            into = self._segments(cmd) + status
        else:
            _OUTHDR_PACK(area, slot, _OP_TYPE[op], 0, cmd.sector)
            out = [(gpa, _OUTHDR_SIZE)]
            into = status
            if op == _DISCARD:
                blk.DISCARD_SEG.pack_into(area, slot + 16, cmd.sector, cmd.nsectors, 0)
                out.append((gpa + 16, blk.DISCARD_SEG.size))
        table = cmd.extra_pages[0] * PAGE_SIZE if self.indirect else None
        q.add(out, into, cid, table)
        cmd.priv = q.index
        self._touched.add(q.index)

    def push(self) -> None:
        for i in self._touched:
            self.queues[i].kick()
        self._touched.clear()

    def retire(self, cmd: Command) -> None:
        cmd.priv = None

    # -- completions ---------------------------------------------------------------------------
    def interrupt(self, q: DriverQueue) -> bool:
        """``virtblk_done``: take every used request, complete it with its status, re-arm,
        and look once more (a request that completed meanwhile would otherwise wait)."""
        engine = self.engine
        if engine is None or not engine.connected:
            return True
        area = self.area
        try:
            while True:
                while (used := q.get_used()) is not None:
                    cid, _written = used
                    engine.complete(cid, _ERRNO.get(area[_SLOT * cid + _STATUS_AT],
                                                    errno.EIO))
                if not q.enable_cb():
                    break
        except QueueBroken as e:
            self.bogus += 1
            log.error("virtio_blk: %s; failing the disk's I/O", e)
            engine.fail_all()
            return True
        engine.startio()
        return True


class VirtioBlkDriver(VirtioDriver):
    name = "virtio_blk"
    module = "virtio_blk"
    device_ids = frozenset({ids.DeviceId.BLOCK})
    #: virtblk_features (those the device may offer and the driver understands)
    feature_table = (blk.F_SEG_MAX, blk.F_SIZE_MAX, blk.F_GEOMETRY, blk.F_RO, blk.F_BLK_SIZE,
                     blk.F_FLUSH, blk.F_TOPOLOGY, blk.F_MQ, blk.F_DISCARD,
                     blk.F_WRITE_ZEROES)

    def __init__(self, memory: GuestMemory, tree: Tree, control: Directory | None,
                 cpus: int = 1, pool_pages: int = POOL_PAGES) -> None:
        self.memory = memory
        self.pool_pages = pool_pages
        self.tree = tree
        self.control = control
        self.cpus = cpus
        self._indices: set[int] = set()

    async def setup(self, dev: VirtioDevice) -> None:
        state = _DiskState(self, dev)
        dev.drvdata = state
        try:
            await state.probe()
        except BaseException:
            if state.disk is not None and not state.disk.dead:
                del_disk(self.tree, state.disk, self.control)
            dev.transport.reset()              # the device lets go of our memory first
            dev.transport.del_queues()
            state.release()
            dev.drvdata = None
            raise

    async def serve(self, dev: VirtioDevice) -> None:
        state = dev.drvdata
        assert isinstance(state, _DiskState)
        await state.serve()

    async def teardown(self, dev: VirtioDevice) -> None:
        state = dev.drvdata
        if isinstance(state, _DiskState):
            await state.close()

    async def remove(self, dev: VirtioDevice) -> None:
        """Teardown, reset, then give back the memory the device may have been using."""
        state = dev.drvdata
        await super().remove(dev)
        if isinstance(state, _DiskState):
            state.release()
        dev.drvdata = None


class _DiskState:
    """One bound virtio-blk device: its queues, engine and disk."""

    def __init__(self, drv: VirtioBlkDriver, dev: VirtioDevice) -> None:
        self.drv = drv
        self.dev = dev
        self.index = -1
        self.transport: VirtioBlkTransport | None = None
        self.engine: Engine | None = None
        self.disk: Disk | None = None
        self.bells: list[Doorbell] = []
        self.config_bell = Doorbell(f"{dev.name}-config")
        self.serial = ""

    async def probe(self) -> None:
        dev, drv = self.dev, self.drv
        fields = [(0, 8)]
        has = dev.has
        wanted = {"size_max": (8, 4, blk.F_SIZE_MAX), "seg_max": (12, 4, blk.F_SEG_MAX),
                  "blk_size": (20, 4, blk.F_BLK_SIZE), "exp": (24, 1, blk.F_TOPOLOGY),
                  "min_io": (26, 2, blk.F_TOPOLOGY), "opt_io": (28, 4, blk.F_TOPOLOGY),
                  "num_queues": (34, 2, blk.F_MQ),
                  "max_discard": (36, 4, blk.F_DISCARD), "discard_align": (44, 4, blk.F_DISCARD)}
        names = [n for n, (_o, _s, bit) in wanted.items() if has(bit)]
        fields += [wanted[n][:2] for n in names]
        values = dev.read_config(fields)
        capacity = values[0]
        cfg = dict(zip(names, values[1:], strict=True))
        lbs = cfg.get("blk_size", SECTOR)
        if lbs < 512 or lbs > PAGE_SIZE or lbs & (lbs - 1):
            raise OSError(errno.EINVAL, f"{dev.name}: invalid block size {lbs:#x}")
        exp = cfg.get("exp", 0)
        if exp > 12:
            raise OSError(errno.EINVAL, f"{dev.name}: physical_block_exp {exp} too large")
        nq = max(1, min(cfg.get("num_queues", 1) or 1, drv.cpus))
        self.bells = [Doorbell(f"{dev.name}-req.{i}") for i in range(nq)]
        indirect = has(ids.F_INDIRECT_DESC)
        queues = dev.transport.find_queues(self.bells, self.config_bell,
                                           event_idx=has(ids.F_EVENT_IDX), indirect=indirect)
        qsize = queues[0].size
        if qsize < 3:                       # header + data + status must fit a chain
            raise OSError(errno.ENODEV, f"{dev.name}: queue of {qsize} entries is too small")
        sg_elems = max(1, min(cfg.get("seg_max", 1), qsize - 2))
        size_max = cfg.get("size_max", 0) or _UINT_MAX
        if size_max < PAGE_SIZE:
            raise OSError(errno.EINVAL, f"{dev.name}: size_max {size_max} is below a page")
        discard = has(blk.F_DISCARD) and not has(blk.F_RO)
        limits = Limits(
            max_segments=sg_elems, max_segment_size=size_max,
            max_transfer=_UINT_MAX * SECTOR, logical_block_size=lbs,
            physical_block_size=lbs << exp, dma_alignment=511,
            discard_granularity=(cfg.get("discard_align", 0) * SECTOR or lbs) if discard
            else 0,
            max_discard_bytes=(cfg.get("max_discard", 0) or _UINT_MAX) * SECTOR
            if discard else 0,
            flush=has(blk.F_FLUSH), rotational=True)
        depth = qsize if indirect else qsize // 2           # virtblk_probe's queue_depth
        nr = depth * nq
        t = VirtioBlkTransport(drv.memory, queues, limits, nr, indirect)
        self.transport = t
        per_cmd = sg_elems + t.extra_pages_for(Op.WRITE, sg_elems)
        self.engine = Engine(drv.memory, t, nr, min(nr * per_cmd, drv.pool_pages))
        t.engine = self.engine
        for bell, q in zip(self.bells, queues, strict=True):
            bell.handler = lambda q=q: t.interrupt(q)
        self.config_bell.handler = self._config_changed
        dev.add_status(ids.Status.DRIVER_OK)        # virtio_device_ready, before any I/O
        try:
            ident = await self.engine.drv_in(blk.T_GET_ID, blk.ID_BYTES)
            self.serial = ident.split(b"\0", 1)[0].decode("ascii", "replace")
        except OSError as e:
            log.info("%s: no serial (%s)", dev.name, e)
        self.index = next(i for i in range(len(drv._indices) + 1) if i not in drv._indices)
        drv._indices.add(self.index)
        name = disk_name(self.index)
        self.disk = Disk(name, VIRTBLK_MAJOR, self.index << PART_BITS, 1 << PART_BITS,
                         capacity, self.engine, readonly=has(blk.F_RO), removable=False,
                         ext_range=256)
        assert dev.dir is not None
        add_disk(drv.tree, dev.dir, self.disk, drv.control)
        assert self.disk.dir is not None
        self.disk.dir.add(Attribute("serial", lambda: self.serial))
        self.disk.dir.add(Attribute("cache_type", lambda: "write back\n" if has(blk.F_FLUSH)
                                    else "write through\n"))

    def _config_changed(self) -> bool:
        """``virtblk_config_changed``: a new capacity is the disk's new size."""
        self.dev.config_changes += 1
        if self.dev.status & ids.Status.DEVICE_NEEDS_RESET:
            log.error("%s: the device needs a reset; its I/O fails", self.dev.name)
            if self.engine is not None:
                self.engine.fail_all()
            return True
        try:
            (capacity,) = self.dev.read_config([(0, 8)])
        except OSError as e:
            log.warning("%s: configuration unreadable: %s", self.dev.name, e)
            return True
        if self.disk is not None and capacity != self.disk.sectors:
            log.info("%s: new size %d sectors", self.disk.name, capacity)
            self.disk.sectors = capacity
        return True

    async def serve(self) -> None:
        """The fallback for interrupt handlers that could not finish (design: doorbells)."""
        async with trio.open_nursery() as n:
            for bell in [*self.bells, self.config_bell]:
                n.start_soon(self._wait, bell)

    async def _wait(self, bell: Doorbell) -> None:
        while True:
            await bell.wait()
            if bell.handler is not None:
                try:
                    bell.handler()
                except Exception:
                    log.exception("%s: interrupt handler failed; failing the disk's I/O",
                                  self.dev.name)
                    if self.engine is not None:
                        self.engine.fail_all()

    async def close(self) -> None:
        """Remove: no new I/O, drain what is in flight, then fail what is left."""
        if self.disk is not None and not self.disk.dead:
            del_disk(self.drv.tree, self.disk, self.drv.control)
        if self.engine is not None:
            if not await self.engine.drain(DRAIN_DEADLINE):
                log.warning("%s: I/O still in flight after %.0f s; failing it",
                            self.dev.name, DRAIN_DEADLINE)
            self.engine.fail_all()

    def release(self) -> None:
        """After the reset: the device has let go of every buffer, so the memory goes back."""
        for bell in [*self.bells, self.config_bell]:
            bell.handler = None
        if self.transport is not None:
            self.transport.release()
            self.transport = None
        if self.engine is not None:
            self.engine.pool.close()
        if self.index >= 0:
            self.drv._indices.discard(self.index)
            self.index = -1
