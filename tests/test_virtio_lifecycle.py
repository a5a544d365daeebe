"""Nothing outlives its device, and nothing a driver asks for costs more than the request:
reset, queue teardown, feature negotiation gone wrong, unbind, remove and rescan. Each test
is a case a review found by trying (the expected behaviour is QEMU's or Linux's, named in
the test).

The device half runs with an executor the test drives: a batch stays "on the I/O thread"
until the test lets it run, and its completion comes back only when the test delivers it,
so a reset can land between the two as it does on a loaded host."""

from __future__ import annotations

import logging
import struct
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from backends.storage.executor import StorageOp
from backends.virtio.blk import BlkParams, VirtioBlkDevice
from backends.virtio.transport import COMMON_OFF, ISR_OFF, MODERN_BAR, VirtioPciFunction
from tests.conftest import Logs
from tests.pci_rig import pci_machine
from vbusfs.platform.doorbell import Doorbell
from vbusfs.platform.memory import PAGE_SIZE, GuestMemory
from vbusfs.platform.pci import MsiController
from vbusfs.protocols.virtio import blk, ids, ring
from vbusfs.protocols.virtio import pci as vp

QSZ = 16
MEM = 4 << 20
DESC_AT, AVAIL_AT, USED_AT = 0x10000, 0x11000, 0x12000
DATA_AT = 0x20000
SENTINEL = 0xEE


class DeferredExecutor:
    """The executor's interface, with the I/O thread played by the test: ``run_thread``
    does a batch's memory effects (a read fills its buffers with 0x5A), ``deliver`` hands
    its completion back as the trio thread would."""

    class _Image:
        size = 1 << 20
        readonly = False

    def __init__(self) -> None:
        self.image = self._Image()
        self.busy = False
        self.batch: list[Any] = []
        self.done: Callable[[list[Any]], None] | None = None
        self.ran = False
        self.seen: list[tuple[StorageOp, int, int]] = []

    def submit(self, reqs: list[Any], done: Callable[[list[Any]], None]) -> bool:
        assert not self.busy
        self.batch, self.done, self.ran, self.busy = reqs, done, False, True
        self.seen += [(r.op, r.offset, r.length) for r in reqs]
        return False

    def run_thread(self) -> None:
        if self.busy and not self.ran:
            for r in self.batch:
                if r.op == StorageOp.READ:
                    for b in r.iov:
                        b[:] = b"\x5a" * len(b)
            self.ran = True

    def drain(self) -> None:
        self.run_thread()

    def deliver(self) -> None:
        assert self.done is not None and self.ran
        self.busy = False
        self.done(self.batch)


def _device(features: frozenset[str] = frozenset({"flush", "discard", "write-zeroes"}),
            transitional: bool = False) -> tuple[GuestMemory, VirtioPciFunction,
                                                  VirtioBlkDevice, DeferredExecutor]:
    mem = GuestMemory(MEM)
    ex = DeferredExecutor()
    model = VirtioBlkDevice(ex, BlkParams(  # type: ignore[arg-type]
        sector_size=512, physical_block_size=512, serial="life", readonly=False,
        features=features, indirect=True, event_idx=False, num_queues=1, queue_size=QSZ))
    vtype = ids.type_by_name("virtio-blk")
    assert vtype is not None
    fn = VirtioPciFunction(MsiController(), mem, model, vtype, transitional=transitional)
    return mem, fn, model, ex


def _common(fn: VirtioPciFunction, field: int, size: int, value: int | None = None) -> int:
    if value is None:
        return fn.region_read(MODERN_BAR, COMMON_OFF + field, size)
    fn.region_write(MODERN_BAR, COMMON_OFF + field, size, value)
    return 0


def _bring_up(mem: GuestMemory, fn: VirtioPciFunction, features: int | None = None,
              features_ok: bool = True) -> None:
    """A modern driver's init through common configuration, with fresh rings."""
    mem.gpa_view(DESC_AT, 3 * PAGE_SIZE)[:] = bytes(3 * PAGE_SIZE)
    _common(fn, vp.C_STATUS, 1, 0)
    _common(fn, vp.C_STATUS, 1, ids.Status.ACKNOWLEDGE | ids.Status.DRIVER)
    want = fn.device_features & ~(1 << ids.F_EVENT_IDX) if features is None else features
    for sel in (0, 1):
        _common(fn, vp.C_GFSELECT, 4, sel)
        _common(fn, vp.C_GF, 4, want >> 32 * sel & 0xFFFFFFFF)
    status = ids.Status.ACKNOWLEDGE | ids.Status.DRIVER
    if features_ok:
        status |= ids.Status.FEATURES_OK
        _common(fn, vp.C_STATUS, 1, status)
    _common(fn, vp.C_Q_SELECT, 2, 0)
    _common(fn, vp.C_Q_SIZE, 2, QSZ)
    for lo, addr in ((vp.C_Q_DESCLO, DESC_AT), (vp.C_Q_AVAILLO, AVAIL_AT),
                     (vp.C_Q_USEDLO, USED_AT)):
        _common(fn, lo, 4, addr)
        _common(fn, lo + 4, 4, 0)
    _common(fn, vp.C_Q_ENABLE, 2, 1)
    _common(fn, vp.C_STATUS, 1, status | ids.Status.DRIVER_OK)


def _post(mem: GuestMemory, fn: VirtioPciFunction, descs: list[tuple[int, int, int]],
          slot: int = 0) -> None:
    """Descriptors chained from 0, made available in ``slot``, and a kick."""
    table = mem.gpa_view(DESC_AT, 16 * QSZ)
    for i, (addr, length, flags) in enumerate(descs):
        nxt = i + 1 if i + 1 < len(descs) else 0
        ring.DESC.pack_into(table, 16 * i, addr, length,
                            flags | (ring.DESC_F_NEXT if i + 1 < len(descs) else 0), nxt)
    avail = mem.gpa_view(AVAIL_AT, 4 + 2 * QSZ)
    struct.pack_into("<H", avail, 4 + 2 * slot, 0)
    struct.pack_into("<H", avail, 2, slot + 1)
    fn.queues[0].bell.ring()


def _used_idx(mem: GuestMemory) -> int:
    return int(struct.unpack_from("<H", mem.gpa_view(USED_AT, 4), 2)[0])


def _read_request(mem: GuestMemory, sector: int = 8) -> list[tuple[int, int, int]]:
    blk.OUTHDR.pack_into(mem.gpa_view(DATA_AT, 16), 0, blk.T_IN, 0, sector)
    mem.gpa_view(DATA_AT + 0x1000, PAGE_SIZE)[:] = b"\xaa" * PAGE_SIZE
    mem.gpa_view(DATA_AT + 0x3000, 1)[0] = SENTINEL
    return [(DATA_AT, 16, 0), (DATA_AT + 0x1000, PAGE_SIZE, ring.DESC_F_WRITE),
            (DATA_AT + 0x3000, 1, ring.DESC_F_WRITE)]


def test_reset_waits_for_the_io_thread_and_drops_what_it_answers_late() -> None:
    """QEMU's reset drains the block backend before the rings are forgotten, and Linux
    frees them once status reads 0: after that no write may land in them, and a completion
    from before the reset must not be pushed onto the rings of the next start."""
    mem, fn, _model, ex = _device()
    _bring_up(mem, fn)
    _post(mem, fn, _read_request(mem))
    assert ex.busy and not ex.ran                           # out on the "thread"
    _common(fn, vp.C_STATUS, 1, 0)                          # the driver resets
    assert _common(fn, vp.C_STATUS, 1) == 0
    assert ex.ran                                           # ... only once the I/O ran
    _bring_up(mem, fn)                                      # a new start on new rings
    ex.deliver()                                            # the old answer comes back
    assert _used_idx(mem) == 0                              # and is not pushed
    assert mem.gpa_view(DATA_AT + 0x3000, 1)[0] == SENTINEL  # nor its status written
    _post(mem, fn, _read_request(mem))                      # the new start serves
    ex.run_thread()
    ex.deliver()
    assert _used_idx(mem) == 1 and mem.gpa_view(DATA_AT + 0x3000, 1)[0] == blk.S_OK


def test_a_legacy_queue_pfn_of_zero_resets_the_device() -> None:
    """QEMU's legacy register file: QUEUE_PFN 0 resets the whole device (with the drain);
    a PFN written to a live queue does not move it."""
    mem, fn, _model, ex = _device(transitional=True)
    io = 0                                                  # the legacy I/O BAR

    def reg(off: int, size: int, value: int | None = None) -> int:
        if value is None:
            return fn.region_read(io, off, size)
        fn.region_write(io, off, size, value)
        return 0

    mem.gpa_view(DESC_AT, 3 * PAGE_SIZE)[:] = bytes(3 * PAGE_SIZE)
    reg(vp.STATUS, 1, ids.Status.ACKNOWLEDGE | ids.Status.DRIVER)
    reg(vp.GUEST_FEATURES, 4, 1 << blk.F_FLUSH)
    reg(vp.QUEUE_SEL, 2, 0)
    assert reg(vp.QUEUE_NUM, 2) == QSZ
    reg(vp.QUEUE_PFN, 4, DESC_AT >> vp.QUEUE_ADDR_SHIFT)
    reg(vp.STATUS, 1, ids.Status.ACKNOWLEDGE | ids.Status.DRIVER | ids.Status.DRIVER_OK)
    avail_at = DESC_AT + ring.legacy_layout(QSZ)[0]
    blk.OUTHDR.pack_into(mem.gpa_view(DATA_AT, 16), 0, blk.T_IN, 0, 8)
    for i, (a, n, f) in enumerate([(DATA_AT, 16, 0),
                                   (DATA_AT + 0x1000, PAGE_SIZE, ring.DESC_F_WRITE),
                                   (DATA_AT + 0x3000, 1, ring.DESC_F_WRITE)]):
        ring.DESC.pack_into(mem.gpa_view(DESC_AT, 16 * QSZ), 16 * i, a, n,
                            f | (ring.DESC_F_NEXT if i < 2 else 0), i + 1 if i < 2 else 0)
    struct.pack_into("<HH", mem.gpa_view(avail_at, 6), 2, 1, 0)
    reg(vp.QUEUE_NOTIFY, 2, 0)
    assert ex.busy
    reg(vp.QUEUE_PFN, 4, 0x77)                              # live: not moved
    assert fn.queues[0].desc_addr == DESC_AT
    reg(vp.QUEUE_PFN, 4, 0)
    assert reg(vp.STATUS, 1) == 0 and ex.ran and not fn.queues[0].enabled
    ex.deliver()                                            # dropped, no error
    assert not fn.broken


def test_a_discard_with_huge_buffers_is_refused_without_copying_them() -> None:
    """A discard's payload is one 16-byte segment (QEMU reads just that): buffers that add
    up to more are UNSUPP, and never read into the service's memory."""
    mem, fn, _model, ex = _device()
    _bring_up(mem, fn)
    blk.OUTHDR.pack_into(mem.gpa_view(DATA_AT, 16), 0, blk.T_DISCARD, 0, 0)
    mem.gpa_view(DATA_AT + 0x3000, 1)[0] = SENTINEL
    descs = [(DATA_AT, 16, 0)] + [(0, MEM, 0)] * 8 + [(DATA_AT + 0x3000, 1,
                                                      ring.DESC_F_WRITE)]
    tracemalloc.start()
    try:
        _post(mem, fn, descs)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MEM // 4, f"{peak} bytes allocated for a refused discard"
    assert _used_idx(mem) == 1 and mem.gpa_view(DATA_AT + 0x3000, 1)[0] == blk.S_UNSUPP
    assert not ex.seen and not fn.broken


def test_a_header_split_across_buffers_is_read_in_place() -> None:
    """VIRTIO_F_ANY_LAYOUT: the 16-byte header may come in pieces; the data after it is
    taken as views, in order."""
    mem, fn, _model, ex = _device()
    _bring_up(mem, fn)
    hdr = blk.OUTHDR.pack(blk.T_OUT, 0, 24)
    mem.gpa_view(DATA_AT, 8)[:] = hdr[:8]
    mem.gpa_view(DATA_AT + 0x100, 8)[:] = hdr[8:]
    _post(mem, fn, [(DATA_AT, 8, 0), (DATA_AT + 0x100, 8, 0), (DATA_AT + 0x1000, 1024, 0),
                    (DATA_AT + 0x3000, 1, ring.DESC_F_WRITE)])
    assert ex.seen == [(StorageOp.WRITE, 24 * 512, 1024)]


def test_features_not_offered_do_not_take_effect() -> None:
    """QEMU masks what the driver writes with what the device offers: a driver that skips
    FEATURES_OK and claims DISCARD on a disk without it gets UNSUPP, and the image is not
    touched."""
    mem, fn, _model, ex = _device(features=frozenset({"flush"}))
    assert not fn.device_features >> blk.F_DISCARD & 1
    _bring_up(mem, fn, features=1 << ids.F_VERSION_1 | 1 << blk.F_DISCARD, features_ok=False)
    assert fn.status & ids.Status.DRIVER_OK
    _common(fn, vp.C_GFSELECT, 4, 0)
    assert _common(fn, vp.C_GF, 4) == 1 << blk.F_DISCARD    # reads back as written
    blk.OUTHDR.pack_into(mem.gpa_view(DATA_AT, 16), 0, blk.T_DISCARD, 0, 0)
    blk.DISCARD_SEG.pack_into(mem.gpa_view(DATA_AT + 0x100, 16), 0, 0, 8, 0)
    _post(mem, fn, [(DATA_AT, 16, 0), (DATA_AT + 0x100, 16, 0),
                    (DATA_AT + 0x3000, 1, ring.DESC_F_WRITE)])
    assert mem.gpa_view(DATA_AT + 0x3000, 1)[0] == blk.S_UNSUPP and not ex.seen


def test_isr_reads_at_any_offset_and_reset_forgets_pending_vectors() -> None:
    """QEMU answers the ISR at any offset of its region (reading clears it), and a reset
    clears the MSI-X pending bits (``msix_unuse_all_vectors``)."""
    mem, fn, _model, _ex = _device()
    _bring_up(mem, fn)
    fn.config_changed()
    assert fn.region_read(MODERN_BAR, ISR_OFF + 1, 1) == vp.ISR_CONFIG
    assert fn.region_read(MODERN_BAR, ISR_OFF, 1) == 0
    assert fn.msix is not None
    fn.msix.pending[0] = 0xFF
    _common(fn, vp.C_STATUS, 1, 0)
    assert not any(fn.msix.pending)


# -- the guest side, over the real host --------------------------------------------------------

async def test_remove_and_rescan_give_every_frame_back(tmp_path: Path) -> None:
    """Twenty remove/rescan cycles of a virtio-blk function: guest memory ends where it
    started (the engine's page pool had leaked 4 MiB a cycle until none was left)."""
    async with pci_machine(tmp_path, [{"type": "virtio-blk", "size": "1M"}]) as rig:
        bus = rig.pm.pci
        name = next(n for n, d in bus.devices.items() if d.driver == "virtio-pci")
        free = rig.memory.free_frames()
        for _ in range(20):
            await bus.remove(bus.devices[name])
            await bus.rescan()
        assert rig.memory.free_frames() == free
        state = next(iter(rig.pm.virtio.devices.values())).drvdata
        assert await state.disk.read(0, 512) == bytes(512)


async def test_the_last_function_can_be_removed_and_found_again(tmp_path: Path) -> None:
    """With nothing bound the bus still binds what a rescan finds (the bus's task had
    ended with its last binding)."""
    async with pci_machine(tmp_path, [{"type": "virtio-rng"}]) as rig:
        bus = rig.pm.pci
        (name,) = [n for n, d in bus.devices.items() if d.driver == "virtio-pci"]
        await bus.remove(bus.devices[name])
        await trio.sleep(0)
        await bus.rescan()
        assert bus.devices[name].driver == "virtio-pci"


async def test_two_removes_at_once_remove_once(tmp_path: Path) -> None:
    """Linux holds the device lock around ``remove``: a second unbind of the same device
    waits for the first instead of running the driver's remove again."""
    async with pci_machine(tmp_path, [{"type": "virtio-rng"}]) as rig:
        vdev = next(iter(rig.pm.virtio.devices.values()))
        drv = rig.pm.virtio.drivers.drivers[vdev.driver]
        calls = 0
        real = drv.remove

        async def counting(dev: Any) -> None:
            nonlocal calls
            calls += 1
            await trio.sleep(0.01)
            await real(dev)
        drv.remove = counting  # type: ignore[method-assign]
        async with trio.open_nursery() as n:
            n.start_soon(rig.pm.virtio.drivers.unbind, vdev)
            n.start_soon(rig.pm.virtio.drivers.unbind, vdev)
        assert calls == 1 and vdev.driver is None


async def test_a_failed_msix_setup_leaves_no_vector_behind(tmp_path: Path, logs: Logs) -> None:
    """When the platform runs out of vectors part-way, the ones already taken are given
    back and MSI-X is left disabled (Linux unwinds ``pci_alloc_irq_vectors`` the same)."""
    logs.expect(r"virtio_blk virtio\d+: probe failed: .*no free interrupt vector",
                logging.ERROR)
    async with pci_machine(tmp_path, [{"type": "virtio-blk", "size": "1M"}]) as rig:
        bus = rig.pm.pci
        (name,) = [n for n, d in bus.devices.items() if d.driver == "virtio-pci"]
        pdev = bus.devices[name]
        await bus.drivers.unbind(pdev)
        msi = rig.root.msi
        hogs = []
        while True:                                   # leave one vector: blk needs two
            try:
                hogs.append(msi.bind(Doorbell("hog")))
            except OSError:
                break
        msi.unbind(hogs.pop())
        bound = len(hogs)
        await bus._bind_by_name(name)              # virtio-pci binds; virtio_blk cannot
        vdev = next(iter(rig.pm.virtio.devices.values()))
        assert vdev.driver is None and vdev.status & ids.Status.FAILED
        assert not pdev.msix_enabled and not pdev._vectors
        assert msi.bind(Doorbell("the one left")) is not None      # still free
        assert len(hogs) == bound
