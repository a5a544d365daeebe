"""The VMBus half of a machine: the Hyper-V host's VMBus server with a device model per
configured channel (host side), the guest's VMBus bus with the Linux drivers registered
(guest side), joined only by guest memory and the SynIC."""

from __future__ import annotations

import trio

from backends.vmbus.host import VmbusHost
from backends.vmbus.registry import vmbus_channel_specs
from vbusfs.config.common import MachineConfig
from vbusfs.config.vmbus import VmbusConfig
from vbusfs.drivers.vmbus.bus import VmbusBus
from vbusfs.drivers.vmbus.drivers import linux_drivers
from vbusfs.platform.memory import GuestMemory
from vbusfs.platform.vmbus.synic import Synic
from vbusfs.sysfs import Tree

__all__ = ["VmbusMachine"]


class VmbusMachine:
    def __init__(self, config: VmbusConfig, machine: MachineConfig, memory: GuestMemory,
                 tree: Tree) -> None:
        self.synic = Synic()
        self.host = VmbusHost(self.synic, memory, vmbus_channel_specs(config.devices),
                              config.version)
        self.bus = VmbusBus(self.synic, memory, tree, machine.cpus)
        for drv in linux_drivers():
            self.bus.register(drv)

    async def start(self, nursery: trio.Nursery) -> None:
        """The host first (its offers ready), then the guest: returns once every matched
        driver has opened its channel."""
        await nursery.start(self.host.run)
        await nursery.start(self.bus.run)
