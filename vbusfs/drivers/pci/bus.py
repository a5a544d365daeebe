"""The guest's PCI bus (Linux ``drivers/pci/probe.c``, ``pci-driver.c``, and the firmware's
resource assignment that runs before them).

At start the root bus is scanned as Linux does: function 0 of every slot, and functions 1–7
of a multi-function device; a vendor id of 0xffff (or 0) means nothing answers. Each BAR is
sized (write all ones, read back, restore) and given an address — I/O from 0xc000, memory
from 0xfe000000, each aligned to its size, as SeaBIOS lays out a small machine — and decode
is enabled. Each function gets its directory under ``/sys/devices/pci0000:00/`` with the
attributes of :mod:`~vbusfs.drivers.pci.sysfs`, and is offered to the registered PCI
drivers (:class:`~vbusfs.drivers.core.DriverTable`, ``driver_override`` first); the bus
starts once every probe has finished.

Hot-plug as root does it through sysfs (``pci-sysfs.c``): ``echo 1 > DEV/remove`` unbinds
the function's driver and takes it out of the tree (the function itself stays in its slot);
``echo 1 > /sys/bus/pci/rescan`` (or a device's or the root bus's ``rescan``) scans again and
publishes and probes what answers and is not known. A function found again keeps the BAR
addresses it was given, as Linux claims the resources a BAR already holds.
"""

from __future__ import annotations

import logging

import trio

from vbusfs.drivers.core import Driver, DriverTable
from vbusfs.drivers.pci import sysfs as pci_sysfs
from vbusfs.drivers.pci.device import PciDev, Resource
from vbusfs.platform.pci import PciRoot
from vbusfs.protocols import pci
from vbusfs.sysfs import Attribute, Directory, Symlink, Tree
from vbusfs.sysfs.driver_core import Bus, kstrtoul

log = logging.getLogger(__name__)

__all__ = ["PciBus", "IO_BASE", "MEM_BASE"]

IO_BASE = 0xC000
MEM_BASE = 0xFE000000
MEM_LIMIT = 0xFEC00000        # the IOAPIC lives above


class PciBus:
    def __init__(self, tree: Tree, root: PciRoot, cpus: int = 1) -> None:
        self.tree = tree
        self.root = root
        self.cpus = cpus
        name = f"pci{root.domain:04x}:{root.bus:02x}"
        self.root_dir = tree.root.makedirs(f"sys/devices/{name}")
        self.sysfs = Bus(tree, "pci")
        self.drivers = DriverTable[PciDev](self.sysfs)
        self.devices: dict[str, PciDev] = {}
        self._nursery: trio.Nursery | None = None
        self._io = IO_BASE
        self._mem = MEM_BASE
        self._add_root_bus_files()
        self.sysfs.match_hook = self._match
        self.sysfs.bind_hook = self._bind_by_name
        self.sysfs.unbind_hook = self._unbind_by_name

    def _add_root_bus_files(self) -> None:
        """``pci_bus/DDDD:BB`` under the root device, and its class link."""
        busname = f"{self.root.domain:04x}:{self.root.bus:02x}"
        d = self.root_dir.makedirs(f"pci_bus/{busname}")
        d.add(Attribute("cpuaffinity", lambda: pci_sysfs.cpumask(self.cpus) + "\n", static=True))
        d.add(Attribute("cpulistaffinity", lambda: pci_sysfs.cpulist(self.cpus) + "\n",
                        static=True))
        d.add(Attribute("rescan", None, self._store_rescan))
        self.sysfs.dir.add(Attribute("rescan", None, self._store_rescan))
        cls = self.tree.root.makedirs("sys/class/pci_bus")
        cls.add(Symlink(busname, d))
        d.add(Symlink("subsystem", cls))
        d.add(Symlink("device", self.root_dir))

    def register(self, drv: Driver[PciDev]) -> None:
        """``pci_register_driver``."""
        self.drivers.register(drv)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Scan, assign, publish and probe; ``started`` once every probe finished."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self.rescan()
            task_status.started()
            await trio.sleep_forever()     # bindings (bind, rescan) start here until the end

    async def rescan(self) -> None:
        """``pci_rescan_bus``: assign, publish and probe every function that answers and is
        not known yet."""
        new = self._scan()
        for dev in new:
            self._assign(dev)
            self._publish(dev)
        self.devices = dict(sorted(self.devices.items(), key=lambda kv: kv[1].devfn))
        for dev in new:
            if self.sysfs.autoprobe:
                await self._probe(dev)

    async def remove(self, dev: PciDev) -> None:
        """``pci_stop_and_remove_bus_device``: its driver lets go, then it leaves the tree."""
        await self.drivers.unbind(dev)
        if self.devices.get(dev.name) is dev:
            del self.devices[dev.name]
            self.sysfs.remove_device(dev.name)

    async def _store_rescan(self, text: str) -> None:
        if kstrtoul(text):
            await self.rescan()

    async def unbind_all(self, deadline: float) -> None:
        """Shutdown: every driver removes its device, in reverse probe order."""
        with trio.move_on_after(deadline):
            for dev in reversed(list(self.devices.values())):
                await self.drivers.unbind(dev)

    # -- enumeration ---------------------------------------------------------------------------
    def _scan(self) -> list[PciDev]:
        """The functions that answer and are not published yet."""
        found: list[PciDev] = []
        for slot in range(32):
            for func in range(8):
                vendor = self.root.config_read(slot << 3 | func, pci.VENDOR_ID, 2)
                if vendor in (0xFFFF, 0x0000):
                    if func == 0:
                        break
                    continue
                dev = PciDev(self.root, slot, func, self.cpus)
                if dev.name not in self.devices:
                    found.append(dev)
                if func == 0 and not dev.multifunction:
                    break
        return found

    def _assign(self, dev: PciDev) -> None:
        """Size every BAR and give it an address (the firmware's job on a real machine)."""
        i = 0
        while i < 6:
            at = pci.BASE_ADDRESS_0 + 4 * i
            orig = dev.read_config(at, 4)
            dev.write_config(at, 4, 0xFFFFFFFF)
            sized = dev.read_config(at, 4)
            dev.write_config(at, 4, orig)
            if sized in (0, 0xFFFFFFFF):
                i += 1
                continue
            io = bool(orig & pci.BAR_SPACE_IO)
            mem64 = not io and orig & 0x6 == pci.BAR_MEM_TYPE_64
            if io:
                size = (~(sized & pci.BAR_IO_MASK) & 0xFFFF) + 1
            else:
                mask = sized & pci.BAR_MEM_MASK
                if mem64 and i < 5:
                    orig_hi = dev.read_config(at + 4, 4)
                    dev.write_config(at + 4, 4, 0xFFFFFFFF)
                    mask |= dev.read_config(at + 4, 4) << 32
                    dev.write_config(at + 4, 4, orig_hi)
                    size = (~mask & 0xFFFFFFFFFFFFFFFF) + 1
                else:
                    size = (~mask & 0xFFFFFFFF) + 1
            if size & (size - 1) or size == 0:
                log.warning("pci %s: BAR %d reports an impossible size %#x; ignored",
                            dev.name, i, size)
                i += 2 if mem64 else 1
                continue
            held = orig & (pci.BAR_IO_MASK if io else pci.BAR_MEM_MASK)
            if mem64:
                held |= dev.read_config(at + 4, 4) << 32
            base = held if self._assigned(io, held, size) else self._allocate(io, size)
            if base is None:
                log.warning("pci %s: no room for BAR %d (%#x bytes)", dev.name, i, size)
            else:
                dev.write_config(at, 4, (base & 0xFFFFFFFF) | (orig & (0x3 if io else 0xF)))
                if mem64:
                    dev.write_config(at + 4, 4, base >> 32)
                dev.resources[i] = Resource(base, base + size - 1,
                                            pci.resource_flags(orig & 0xF, io))
            i += 2 if mem64 else 1
        cmd = dev.read_config(pci.COMMAND, 2)
        if any(r.flags and r.io for r in dev.resources[:6]):
            cmd |= pci.COMMAND_IO
        if any(r.flags and not r.io for r in dev.resources[:6]):
            cmd |= pci.COMMAND_MEMORY
        dev.write_config(pci.COMMAND, 2, cmd)

    def _assigned(self, io: bool, base: int, size: int) -> bool:
        """Whether a BAR already holds an address this bus handed out (a function found
        again after ``remove``)."""
        if io:
            return IO_BASE <= base and base + size <= self._io
        return MEM_BASE <= base and base + size <= self._mem

    def _allocate(self, io: bool, size: int) -> int | None:
        if io:
            base = -(-self._io // size) * size
            if base + size > 0x10000:
                return None
            self._io = base + size
            return base
        base = -(-self._mem // size) * size
        if base + size > MEM_LIMIT:
            return None
        self._mem = base + size
        return base

    def _publish(self, dev: PciDev) -> None:
        dev.dir = self.root_dir.mkdir(dev.name)
        self.devices[dev.name] = dev
        self.sysfs.add_device(dev.dir, lambda: pci_sysfs.uevent(dev))
        pci_sysfs.add_device_files(dev, pci.CFG_SPACE_SIZE)

        async def store_remove(text: str) -> None:
            if kstrtoul(text):
                await self.remove(dev)
        dev.dir.add(Attribute("remove", None, store_remove))
        dev.dir.add(Attribute("rescan", None, self._store_rescan))

    # -- binding -------------------------------------------------------------------------------
    async def _probe(self, dev: PciDev, raise_errors: bool = False) -> None:
        if dev.driver is not None or self._nursery is None:
            return
        drv = self.drivers.match(dev, dev.driver_override)
        if drv is None:
            return
        try:
            await self.drivers.bind(self._nursery, dev, drv)
        except OSError as e:
            log.error("pci %s: probe of %s failed: %s", dev.name, drv.name, e)
            if raise_errors:
                raise

    def _match(self, name: str, driver: str) -> bool:
        dev = self.devices.get(name)
        drv = self.drivers.match(dev, dev.driver_override) if dev is not None else None
        return drv is not None and driver in ("", drv.name)

    async def _bind_by_name(self, name: str) -> None:
        dev = self.devices.get(name)
        if dev is not None:
            await self._probe(dev, raise_errors=True)

    async def _unbind_by_name(self, name: str) -> None:
        dev = self.devices.get(name)
        if dev is not None:
            await self.drivers.unbind(dev)

    def device_dir(self, name: str) -> Directory:
        dev = self.devices[name]
        assert dev.dir is not None
        return dev.dir

