"""The VMBus half of a machine: the Hyper-V host's VMBus server with a device model per
configured channel (host side), the guest's VMBus bus with the Linux drivers registered
(guest side), joined only by guest memory and the SynIC. The synthetic SCSI controllers'
disks are opened by their storvsp models before the host offers anything, and the guest
comes up only once storvsc has scanned every controller."""

from __future__ import annotations

import trio

from backends.vmbus.host import VmbusHost
from backends.vmbus.registry import vmbus_channel_specs
from backends.vmbus.storvsp import Storvsp
from vbusfs.config.common import MachineConfig
from vbusfs.config.vmbus import VmbusConfig
from vbusfs.drivers.scsi.host import ScsiBus
from vbusfs.drivers.vmbus.bus import VmbusBus
from vbusfs.drivers.vmbus.drivers import linux_drivers
from vbusfs.drivers.vmbus.storvsc import StorvscDriver
from vbusfs.platform.memory import GuestMemory
from vbusfs.platform.vmbus.synic import Synic
from vbusfs.sysfs import Tree

__all__ = ["VmbusMachine"]


class VmbusMachine:
    def __init__(self, config: VmbusConfig, machine: MachineConfig, memory: GuestMemory,
                 tree: Tree, scsi: ScsiBus | None = None) -> None:
        self.synic = Synic()
        specs = vmbus_channel_specs(config.devices)
        self.storvsps = [s.model for s in specs if isinstance(s.model, Storvsp)]
        self.host = VmbusHost(self.synic, memory, specs, config.version)
        self.bus = VmbusBus(self.synic, memory, tree, machine.cpus)
        self.drivers = linux_drivers(scsi, machine.cpus)
        for drv in self.drivers:
            self.bus.register(drv)

    async def start(self, nursery: trio.Nursery) -> None:
        """The disks' images, the host (its offers ready), then the guest: returns once
        every matched driver has opened its channel and every SCSI controller is scanned."""
        for model in self.storvsps:
            await nursery.start(model.serve_images)
        await nursery.start(self.host.run)
        await nursery.start(self.bus.run)
        for drv in self.drivers:
            if isinstance(drv, StorvscDriver):
                await drv.settle()
