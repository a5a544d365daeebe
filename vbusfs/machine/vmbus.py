"""The VMBus half of a machine: the Hyper-V host's VMBus server with a device model per
configured channel (host side), the guest's VMBus bus with the Linux drivers registered
(guest side), joined only by guest memory, the SynIC and the partition reference counter.

The synthetic SCSI controllers' disks are opened by their storvsp models before the host
offers anything, and the guest comes up only once storvsc has scanned every controller
(its disks go on the machine's SCSI midlayer, ``scsi``).

The integration services are wired here too: the host's IC models get the ``[vmbus.ic]``
settings, the guest's hv_utils gets its platform (the reference counter, whether it can
hibernate, the tree for its files, and who acts on a power request it accepts), and the
host's controls go under ``MNT/.vbusfs/host/`` (:mod:`~vbusfs.machine.ic_control`).
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from backends.vmbus.host import VmbusHost
from backends.vmbus.ic import IcDevice, IcHostSettings
from backends.vmbus.registry import vmbus_channel_specs
from backends.vmbus.storvsp import Storvsp
from vbusfs.config.common import MachineConfig
from vbusfs.config.vmbus import VmbusConfig
from vbusfs.drivers.scsi.host import ScsiBus
from vbusfs.drivers.vmbus.bus import VmbusBus
from vbusfs.drivers.vmbus.drivers import linux_drivers
from vbusfs.drivers.vmbus.hv_utils import HvUtilsPlatform
from vbusfs.drivers.vmbus.storvsc import StorvscDriver
from vbusfs.machine.ic_control import add_host_controls
from vbusfs.platform.memory import GuestMemory
from vbusfs.platform.vmbus.reference_time import ReferenceTime
from vbusfs.platform.vmbus.synic import Synic
from vbusfs.sysfs import Directory, Tree

__all__ = ["VmbusMachine"]


class VmbusMachine:
    def __init__(self, config: VmbusConfig, machine: MachineConfig, memory: GuestMemory,
                 tree: Tree, control: Directory | None = None,
                 power: Callable[[str], None] | None = None,
                 scsi: ScsiBus | None = None) -> None:
        self.config = config
        self.synic = Synic()
        self.reference_time = ReferenceTime()
        ic = config.ic
        settings = IcHostSettings(
            heartbeat_interval=ic.heartbeat_interval, timesync_interval=ic.timesync_interval,
            timesync_skew_ns=ic.timesync_skew_ns,
            kvp_items=[(0, k, v) for k, v in ic.kvp_external] +
                      [(3, k, v) for k, v in ic.kvp_auto_external],
            reference_time=self.reference_time)
        specs = vmbus_channel_specs(config.devices, settings)
        #: the host's IC model of each service (the first device of its type)
        self.ics: dict[str, IcDevice] = {}
        for spec in specs:
            if isinstance(spec.model, IcDevice):
                self.ics.setdefault(spec.model.service, spec.model)
        self.storvsps = [s.model for s in specs if isinstance(s.model, Storvsp)]
        self.host = VmbusHost(self.synic, memory, specs, config.version)
        self.bus = VmbusBus(self.synic, memory, tree, machine.cpus, hibernation=ic.hibernation)
        self.utils = HvUtilsPlatform(
            reference_time=self.reference_time, hibernation=ic.hibernation, power=power,
            root=tree.root, status=control.mkdir("hv_utils") if control is not None else None)
        self.drivers = linux_drivers(self.utils, scsi, machine.cpus)
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

    def add_control_files(self, control: Directory) -> None:
        """``MNT/.vbusfs/host/``: the host's integration-service controls."""
        ic = self.config.ic

        def reaction(kind: str) -> str:
            return {"shutdown": ic.on_shutdown, "reboot": ic.on_reboot}.get(kind, "log")
        add_host_controls(control.mkdir("host"), self.ics, reaction)
