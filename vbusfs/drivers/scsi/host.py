"""SCSI hosts, their scan, and the devices in sysfs (Linux ``hosts.c``, ``scsi_scan.c``,
``scsi_sysfs.c``; reference/hv-services.md §4.8–4.9, reference/sysfs.md §4).

:class:`ScsiBus` is the midlayer of one guest: ``/sys/bus/scsi`` (hosts, targets and
devices are all on it; ``sd`` is its driver), the ``scsi_host``/``scsi_device``/
``scsi_disk`` classes, and the numbers (``host%d`` and sd's disk index, each the lowest
free). :class:`ScsiHost` is one host adapter's ``Scsi_Host``:

* the scan (``scsi_scan_host``): for every channel and target, INQUIRY to LUN 0 (36 bytes,
  then as much as the additional length says), then REPORT LUNS, then INQUIRY to each LUN
  it names; a LUN with peripheral qualifier 0 becomes a device;
* a device (``scsi_add_lun``): its INQUIRY strings, type, SCSI level (version + 1), tagged
  queueing, the driver's ``slave_configure``, then the VPD pages (``scsi_attach_vpd``:
  page 0, then 0x80, 0x83, 0x89, 0xB0, 0xB1, 0xB2 among those it lists, each read as a
  4-byte header first and then whole);
* sd probes a disk device and puts a gendisk under it;
* a rescan (``storvsc_host_scan``) sends TEST UNIT READY to every device, removes those that
  are gone, and scans again; removal takes the disk away, drains its I/O and removes the
  directories.

The tree, under the host adapter's device directory (real directories, which
WALinuxAgent walks)::

    host<H>/{uevent,subsystem,power/,scsi_host/host<H>/}
    host<H>/target<H>:<C>:<T>/{uevent,subsystem,power/}
    host<H>/target<H>:<C>:<T>/<H>:<C>:<T>:<L>/{scsi_device attributes, inquiry, vpd_pg*,
        uevent, subsystem, driver, power/, block/sdX/, scsi_device/<H:C:T:L>/,
        scsi_disk/<H:C:T:L>/}
"""

from __future__ import annotations

import errno
import heapq
import logging
import re
import struct
from collections.abc import Awaitable, Callable

import trio

from vbusfs.block.engine import Engine
from vbusfs.block.gendisk import Disk, add_disk, del_disk
from vbusfs.drivers.scsi import sysfs as scsi_sysfs
from vbusfs.drivers.scsi.device import (
    Direction,
    HostAdapter,
    HostByte,
    ScsiDevice,
    execute,
)
from vbusfs.drivers.scsi.sd import SD_MINORS, SdDisk
from vbusfs.platform.memory import GuestMemory
from vbusfs.protocols import scsi
from vbusfs.protocols.scsi import Status
from vbusfs.sysfs import Attribute, Directory, Symlink, Tree, add_group
from vbusfs.sysfs.driver_core import Bus, add_power_dir

log = logging.getLogger(__name__)

__all__ = ["ScsiBus", "ScsiHost", "POOL_PAGES", "DRAIN_DEADLINE"]

POOL_PAGES = 1024                # data pages per disk's engine (4 MiB); more in flight waits
DRAIN_DEADLINE = 5.0
#: the pages scsi_attach_vpd keeps (Linux 6.1), after page 0
_VPD_KEPT = (0x80, 0x83, 0x89, 0xB0, 0xB1, 0xB2)
_INQUIRY_FIRST = 36              # scsi_probe_lun's first try
_REPORT_LUNS_LEN = 4096          # (511 + 1) 8-byte entries


#: simple_strtoull with base 0, the whole field: hex after 0x, octal after 0, else decimal
_STRTOULL = re.compile(r"0[xX]([0-9a-fA-F]+)|(0[0-7]*)|([1-9][0-9]*)")

class _Ida:
    """``ida_alloc``: the lowest free number. Numbers given back wait in a heap and the
    rest are above ``_next``, so taking one does not walk the numbers in use (a machine
    with thousands of SCSI hosts took a quadratic time numbering them)."""

    def __init__(self) -> None:
        self._next = 0                   # every number from here up is free
        self._given: list[int] = []      # free numbers below _next (a heap)

    def take(self) -> int:
        if self._given:
            return heapq.heappop(self._given)
        self._next += 1
        return self._next - 1

    def give(self, n: int) -> None:
        if 0 <= n < self._next and n not in self._given:     # else it was not taken
            heapq.heappush(self._given, n)


def _class_device(parent: Directory, name: str, cls: Directory) -> Directory:
    """A class device below ``parent`` (``scsi_host/host0``, ``scsi_device/0:0:0:0``), and
    its ``/sys/class/<class>/<name>`` link."""
    d = parent.dir(cls.name).mkdir(name)
    d.add(Attribute("uevent", lambda: "", lambda _t: None))
    d.add(Symlink("subsystem", cls))
    d.add(Symlink("device", parent))
    add_power_dir(d)
    cls.add(Symlink(name, d))
    return d


def _drop(cls: Directory, name: str) -> None:
    if name in cls.children:
        cls.remove(name)


class ScsiBus:
    """The guest's SCSI midlayer. ``control`` is where each disk's control files go
    (``MNT/.vbusfs/block``); ``pool_pages`` sizes each disk's data pages."""

    def __init__(self, tree: Tree, memory: GuestMemory, control: Directory | None = None,
                 pool_pages: int = POOL_PAGES) -> None:
        self.tree = tree
        self.memory = memory
        self.control = control
        self.pool_pages = pool_pages
        self.sysfs = Bus(tree, "scsi")
        self.sysfs.driver("sd", "sd_mod")
        self.sysfs.match_hook = self._match
        self.sysfs.bind_hook = self._bind
        self.sysfs.unbind_hook = self._unbind
        root = tree.root
        self.host_class = root.makedirs("sys/class/scsi_host")
        self.device_class = root.makedirs("sys/class/scsi_device")
        self.disk_class = root.makedirs("sys/class/scsi_disk")
        self._host_ids = _Ida()
        self._sd_ids = _Ida()
        self.hosts: dict[int, ScsiHost] = {}
        self._sdevs: dict[str, ScsiDevice] = {}

    def add_host(self, parent: Directory, adapter: HostAdapter) -> ScsiHost:
        """``scsi_host_alloc`` + ``scsi_add_host``: ``host<N>`` under ``parent``."""
        host = ScsiHost(self, self._host_ids.take(), adapter, parent)
        self.hosts[host.host_no] = host
        return host

    async def remove_host(self, host: ScsiHost) -> None:
        """``scsi_remove_host``: every device, then the host's directories."""
        host.state = "cancel"
        for sdev in list(host.devices.values()):
            await host.remove_device(sdev)
        _drop(self.host_class, host.name)
        self.sysfs.remove_device(host.name)
        del self.hosts[host.host_no]
        self._host_ids.give(host.host_no)
        host.state = "deleted"

    # -- sd ----------------------------------------------------------------------------------
    async def sd_probe(self, sdev: ScsiDevice) -> None:
        """``sd_probe``: revalidate, a gendisk on the driver's transport, ``scsi_disk``."""
        index = self._sd_ids.take()
        sd = SdDisk(sdev, index, self.memory)
        try:
            await sd.revalidate()
        except OSError as e:
            self._sd_ids.give(index)
            log.error("%s: sd probe failed: %s", sdev.name, e)
            return
        a = sdev.adapter
        transport = a.block_transport(sdev, sd, sd.limits())
        sd.engine = Engine(self.memory, transport, a.can_queue, self.pool_pages)
        sd.disk = Disk(sd.name, sd.major, sd.minor, SD_MINORS, sd.sectors, sd.engine,
                       readonly=sd.write_prot, removable=sdev.removable)
        assert sdev.dir is not None
        add_disk(self.tree, sdev.dir, sd.disk, self.control)
        d = _class_device(sdev.dir, sdev.name, self.disk_class)
        add_group(d, sd, scsi_sysfs.SD_DISK_GROUP)
        sdev.disk = sd
        self.sysfs.bind(sdev.name, "sd")
        log.info("%s: [%s] %d %d-byte logical blocks", sdev.name, sd.name, sd.blocks,
                 sd.block_size)

    async def sd_remove(self, sdev: ScsiDevice, deadline: float = DRAIN_DEADLINE) -> None:
        """``sd_remove``: the disk leaves /dev and sysfs, its I/O drains (then fails)."""
        sd = sdev.disk
        if not isinstance(sd, SdDisk):
            return
        sdev.disk = None
        if sd.disk is not None and not sd.disk.dead:
            del_disk(self.tree, sd.disk, self.control)
        if sd.engine is not None:
            drained = await sd.engine.drain(deadline)
            if drained and sd.wce and sdev.running:
                try:                            # sd_shutdown: SYNCHRONIZE CACHE
                    with trio.move_on_after(deadline):
                        await sd.engine.flush()
                except OSError as e:
                    log.info("%s: synchronize cache failed: %s", sd.name, e)
            if not drained:
                log.warning("%s: I/O still in flight after %.0f s; failing it; its pages "
                            "stay allocated", sd.name, deadline)
            sd.engine.fail_all()
            if drained:
                # nothing in flight: the host no longer names a page of the pool
                sd.engine.pool.close()
        assert sdev.dir is not None
        if "scsi_disk" in sdev.dir.children:
            sdev.dir.remove("scsi_disk")
        _drop(self.disk_class, sdev.name)
        if sdev.name in self.sysfs.devices_by_name:
            self.sysfs.unbind(sdev.name)
        self._sd_ids.give(sd.index)

    # -- /sys/bus/scsi/drivers/sd/{bind,unbind} -----------------------------------------------
    def _match(self, name: str, driver: str) -> bool:
        sdev = self._sdevs.get(name)
        return sdev is not None and sdev.type == scsi.TYPE_DISK and driver in ("", "sd")

    async def _bind(self, name: str) -> None:
        sdev = self._sdevs.get(name)
        if sdev is None or sdev.disk is not None:
            raise OSError(errno.ENODEV, name)
        await self.sd_probe(sdev)

    async def _unbind(self, name: str) -> None:
        sdev = self._sdevs.get(name)
        if sdev is None:
            raise OSError(errno.ENODEV, name)
        await self.sd_remove(sdev)


class ScsiHost:
    """One ``Scsi_Host``: the adapter's limits, its targets and devices, the scan."""

    def __init__(self, bus: ScsiBus, host_no: int, adapter: HostAdapter,
                 parent: Directory) -> None:
        self.bus = bus
        self.host_no = host_no
        self.adapter = adapter
        self.state = "running"
        self.eh_deadline: int | None = None
        self.name = f"host{host_no}"
        self.devices: dict[tuple[int, int, int], ScsiDevice] = {}
        self.targets: dict[tuple[int, int], Directory] = {}
        self._lock = trio.Lock()                 # shost->scan_mutex
        self._removing: dict[tuple[int, int, int], trio.Event] = {}
        #: where the host's background work (removals) runs; the driver sets it
        self.nursery: trio.Nursery | None = None
        self.dir = parent.mkdir(self.name)
        bus.sysfs.add_device(self.dir, lambda: "DEVTYPE=scsi_host\n")
        d = _class_device(self.dir, self.name, bus.host_class)
        add_group(d, self, scsi_sysfs.SHOST_GROUP)

    # what the host attributes show
    @property
    def proc_name(self) -> str:
        return self.adapter.proc_name

    @property
    def can_queue(self) -> int:
        return self.adapter.can_queue

    @property
    def cmd_per_lun(self) -> int:
        return self.adapter.cmd_per_lun

    @property
    def sg_tablesize(self) -> int:
        return self.adapter.sg_tablesize

    @property
    def nr_hw_queues(self) -> int:
        return self.adapter.nr_hw_queues

    def host_busy(self) -> int:
        return self.adapter.host_busy()

    def scan_store(self, text: str) -> Awaitable[None]:
        """``scan``: "CHANNEL TARGET LUN", each a number or '-' for all (``scsi_scan``)."""
        # sscanf("%10s %10s %10s %c"), then check_set's simple_strtoull(s, &last, 0) with
        # nothing left over: no sign, no '_', at most 10 characters a field, nothing after
        parts = text.split()
        vals: list[int | None] = []
        for p in parts if len(parts) == 3 else ():
            if p == "-":
                vals.append(None)
            elif len(p) <= 10 and (m := _STRTOULL.fullmatch(p)) is not None:
                vals.append(int(m[1], 16) if m[1] else int(m[2], 8) if m[2] else int(m[3]))
        if len(vals) != 3:
            raise OSError(errno.EINVAL, "scan takes 'CHANNEL TARGET LUN' ('-' for all)")
        return self.scan(*vals)

    # -- commands of the midlayer's own ---------------------------------------------------------
    async def _inquire(self, probe: ScsiDevice, page: int | None, length: int) -> bytes | None:
        cdb = scsi.cdb_inquiry(length, page)
        r = await execute(probe, cdb, Direction.FROM_DEVICE, length)
        if r.host != HostByte.DID_OK or r.status != Status.GOOD:
            return None
        return r.data

    async def _probe_lun(self, channel: int, target: int, lun: int,
                         probe: ScsiDevice | None = None) -> bytes | None:
        """``scsi_probe_lun``: the INQUIRY data of a LUN, or None when nothing answers.
        ``probe`` is the temporary device to send it to (one is made when not given)."""
        if probe is None:
            probe = ScsiDevice(self.adapter, self.host_no, channel, target, lun)
        data = await self._inquire(probe, None, _INQUIRY_FIRST)
        if data is None or len(data) < _INQUIRY_FIRST:
            return None
        full = min(data[4] + 5, 255)
        if full > _INQUIRY_FIRST:
            more = await self._inquire(probe, None, full)
            if more is not None and len(more) >= _INQUIRY_FIRST:
                data = more
        return data

    async def _vpd(self, sdev: ScsiDevice, page: int) -> bytes | None:
        """``scsi_get_vpd_buf``: the header for the length, then the page."""
        head = await self._inquire(sdev, page, 4)
        if head is None or len(head) < 4 or head[1] != page:
            return None
        # the page's length plus its header, but no more than an INQUIRY can ask for (the
        # allocation length is 16 bits; a page that claims 0xFFFF bytes is cut there)
        length = min(struct.unpack_from(">H", head, 2)[0] + 4, 0xFFFF)
        data = await self._inquire(sdev, page, length)
        if data is None or len(data) < 4 or data[1] != page:
            return None
        return data

    async def _report_luns(self, probe: ScsiDevice) -> list[int] | None:
        """REPORT LUNS, sent to the target's LUN 0 (``probe``)."""
        r = await execute(probe, scsi.cdb_report_luns(_REPORT_LUNS_LEN),
                          Direction.FROM_DEVICE, _REPORT_LUNS_LEN)
        if r.host != HostByte.DID_OK or r.status != Status.GOOD or len(r.data) < 8:
            return None
        return scsi.parse_report_luns(r.data)

    # -- scan ----------------------------------------------------------------------------------
    async def scan(self, channel: int | None = None, target: int | None = None,
                   lun: int | None = None) -> None:
        """``scsi_scan_host_selected``: every channel and target (or the ones named)."""
        a = self.adapter
        if (channel is not None and not 0 <= channel <= a.max_channel) or \
                (target is not None and not 0 <= target < a.max_id) or \
                (lun is not None and not 0 <= lun < a.max_lun):
            raise OSError(errno.EINVAL, "no such channel, target or LUN on this host")
        for c in range(a.max_channel + 1) if channel is None else (channel,):
            for t in range(a.max_id) if target is None else (target,):
                await self.scan_target(c, t, lun)
        # A driver whose host answers from its doorbell handler runs a whole scan without
        # waiting (a few ms): one checkpoint for it, not one per command or target, since
        # each costs a turn of the event loop and a machine may scan hundreds of hosts.
        await trio.lowlevel.checkpoint()

    async def _scan_lock(self) -> None:
        """``scan_mutex``, taken without a turn of the event loop when it is free."""
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()

    async def scan_target(self, channel: int, target: int, only: int | None = None) -> None:
        await self._scan_lock()
        try:
            # one temporary LUN 0 device for the target's INQUIRY and REPORT LUNS, as
            # __scsi_scan_target keeps the sdev scsi_probe_and_add_lun allocated for LUN 0
            probe = ScsiDevice(self.adapter, self.host_no, channel, target, 0)
            lun0 = await self._probe_lun(channel, target, 0, probe)
            if lun0 is None:
                return
            luns = await self._report_luns(probe) or []
            for lun in sorted({0, *luns}):
                if lun >= self.adapter.max_lun or (only is not None and lun != only) or \
                        (channel, target, lun) in self.devices:
                    continue
                data = lun0 if lun == 0 else await self._probe_lun(channel, target, lun)
                if data is None or data[0] >> 5 != 0 or data[0] & 0x1F == 0x1F:
                    continue                  # peripheral qualifier: no device here
                await self._add_lun(channel, target, lun, data)
        finally:
            self._lock.release()

    async def _add_lun(self, channel: int, target: int, lun: int, data: bytes) -> None:
        """``scsi_add_lun`` + ``scsi_sysfs_add_sdev`` (+ sd for a disk)."""
        inq = scsi.parse_inquiry(data)
        a = self.adapter
        level = data[2] & 0x0F
        if level >= 2 or (level == 1 and data[3] & 0x0F == 1):
            level += 1
        sdev = ScsiDevice(a, self.host_no, channel, target, lun, inquiry=bytes(data),
                          vendor=inq.vendor, model=inq.product, rev=inq.revision,
                          type=inq.device_type, scsi_level=level, tagged=inq.cmdque,
                          removable=inq.removable)
        # scsi_alloc_sdev: cmd_per_lun, clamped by scsi_change_queue_depth to
        # min(can_queue, 4096)
        sdev.queue_depth = max(1, min(a.cmd_per_lun or 1, a.can_queue, 4096))
        a.slave_configure(sdev)
        page0 = await self._vpd(sdev, scsi.VPD_SUPPORTED)
        if page0 is not None:
            sdev.vpd[scsi.VPD_SUPPORTED] = page0
            listed = set(page0[4:4 + page0[3]])
            for page in _VPD_KEPT:
                if page in listed:
                    got = await self._vpd(sdev, page)
                    if got is not None:
                        sdev.vpd[page] = got
        tdir = self.targets.get((channel, target))
        if tdir is None:
            tdir = self.dir.mkdir(f"target{self.host_no}:{channel}:{target}")
            self.bus.sysfs.add_device(tdir, lambda: "DEVTYPE=scsi_target\n")
            self.targets[(channel, target)] = tdir
        sdev.dir = tdir.mkdir(sdev.name)

        def uevent() -> str:
            drv = "DRIVER=sd\n" if sdev.disk is not None else ""
            return f"DEVTYPE=scsi_device\n{drv}MODALIAS=scsi:t-0x{sdev.type:02x}\n"

        self.bus.sysfs.add_device(sdev.dir, uevent)
        add_group(sdev.dir, sdev, scsi_sysfs.SDEV_GROUP)
        sdev.dir.add(Attribute("rescan", None,
                               lambda _t: self._background(self.rescan_device, sdev)))
        sdev.dir.add(Attribute("delete", None, lambda _t: self.remove_device(sdev)))
        scsi_sysfs.add_vpd_files(sdev.dir, sdev)
        _class_device(sdev.dir, sdev.name, self.bus.device_class)
        sdev.state = "running"
        self.devices[(channel, target, lun)] = sdev
        self.bus._sdevs[sdev.name] = sdev
        log.info("scsi %s: Direct-Access %s %s %s PQ: 0 ANSI: %d", sdev.name,
                 inq.vendor.decode("latin-1"), inq.product.decode("latin-1"),
                 inq.revision.decode("latin-1"), level - 1)
        if sdev.type == scsi.TYPE_DISK:
            await self.bus.sd_probe(sdev)

    # -- removal and rescan --------------------------------------------------------------------
    async def remove_device(self, sdev: ScsiDevice) -> None:
        """``__scsi_remove_device``: the disk first, then the directories; the target goes
        with its last device. A removal already under way (a second ``delete``, the
        driver's and a rescan's) is waited for, not done twice."""
        key = (sdev.channel, sdev.id, sdev.lun)
        if self.devices.get(key) is not sdev:
            return
        going = self._removing.get(key)
        if going is not None:
            await going.wait()
            return
        going = self._removing[key] = trio.Event()
        try:
            await self.bus.sd_remove(sdev)   # a running device's cache is flushed first
            sdev.state = "cancel"
            del self.devices[key]
            self.bus._sdevs.pop(sdev.name, None)
            _drop(self.bus.device_class, sdev.name)
            self.bus.sysfs.remove_device(sdev.name)
            sdev.state = "deleted"
            if not any((c, t) == key[:2] for c, t, _ in self.devices):
                tdir = self.targets.pop(key[:2])
                self.bus.sysfs.remove_device(tdir.name)
        finally:
            del self._removing[key]
            going.set()

    def lun_gone(self, sdev: ScsiDevice) -> None:
        """The driver saw the LUN vanish (``storvsc_remove_lun``): remove it in the
        background."""
        if self.nursery is not None and sdev.state == "running":
            sdev.state = "offline"
            self.nursery.start_soon(self._background, self.remove_device, sdev)

    def rescan_device_soon(self, sdev: ScsiDevice) -> None:
        """The driver saw the device change (``storvsc_device_scan``): rescan it in the
        background."""
        if self.nursery is not None:
            self.nursery.start_soon(self._background, self.rescan_device, sdev)

    @staticmethod
    async def _background(work: Callable[[ScsiDevice], Awaitable[None]],
                          sdev: ScsiDevice) -> None:
        """Work the driver queued for a device: a failure is logged, as a work item's
        is, and never ends the nursery (the controller) it runs in."""
        try:
            await work(sdev)
        except OSError as e:
            log.warning("%s: %s failed: %s", sdev.name, work.__name__.replace("_device", ""),
                        e)

    async def rescan_device(self, sdev: ScsiDevice) -> None:
        """``scsi_rescan_device``: the VPD pages and sd's view of the disk again."""
        sd = sdev.disk
        if isinstance(sd, SdDisk):
            await sd.revalidate()
            if sd.disk is not None:
                sd.disk.sectors = sd.sectors

    async def rescan(self) -> None:
        """What a host-initiated rescan does (``storvsc_host_scan``): TEST UNIT READY to every
        known device, removing those the host no longer has, then a scan for new ones."""
        async with self._lock:
            gone: list[ScsiDevice] = []
            for sdev in list(self.devices.values()):
                r = await execute(sdev, bytes(6), Direction.NONE, 0)
                if r.host == HostByte.DID_NO_CONNECT:
                    gone.append(sdev)
        for sdev in gone:
            await self.remove_device(sdev)
        await self.scan()

