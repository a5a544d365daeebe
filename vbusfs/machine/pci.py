"""The PCI half of a machine: the root complex both halves share; the host bridge and the
virtio functions with their device models and images (host side); the PCI bus with the
virtio-pci driver registered, and the virtio bus with virtio-blk and the drivers without a
data path (guest side), joined only by configuration cycles, BAR accesses, guest memory and
MSI."""

from __future__ import annotations

import errno

import trio

from backends.virtio.host import PciHost
from vbusfs.config.common import MachineConfig
from vbusfs.config.pci import PciConfig
from vbusfs.drivers.pci.bus import PciBus
from vbusfs.drivers.virtio.blk import POOL_PAGES, VirtioBlkDriver
from vbusfs.drivers.virtio.core import VirtioBus
from vbusfs.drivers.virtio.pci import VirtioPciDriver
from vbusfs.drivers.virtio.simple import simple_drivers
from vbusfs.platform.memory import GuestMemory
from vbusfs.platform.pci import PciRoot
from vbusfs.sysfs import Directory, Tree

__all__ = ["PciMachine"]


class PciMachine:
    def __init__(self, cfg: PciConfig, machine: MachineConfig, memory: GuestMemory,
                 tree: Tree, block_control: Directory | None,
                 force_legacy: bool = False, blk_pool_pages: int = POOL_PAGES) -> None:
        self.root = PciRoot()
        self.host = PciHost(self.root, memory, cfg)
        self.virtio = VirtioBus(tree)
        self.virtio.register(VirtioBlkDriver(memory, tree, block_control, machine.cpus,
                                             blk_pool_pages))
        for drv in simple_drivers():
            self.virtio.register(drv)
        self.pci = PciBus(tree, self.root, machine.cpus)
        self.pci.register(VirtioPciDriver(memory, self.virtio, force_legacy))

    async def start(self, nursery: trio.Nursery) -> None:
        """Host first (functions in their slots), then the guest: returns once every
        driver has probed."""
        await nursery.start(self.host.run)
        await nursery.start(self.virtio.run)
        await nursery.start(self.pci.run)
        if self.virtio.probe_failures:
            raise OSError(errno.EIO, "pci: a device failed to probe: " +
                          ", ".join(self.virtio.probe_failures))

    async def stop(self, deadline: float) -> None:
        await self.pci.unbind_all(deadline)
