"""The VMBus drivers a Linux guest binds, for whoever assembles a machine to register
(``for drv in linux_drivers(scsi): bus.register(drv)``); the bus itself knows none of them.
Ring sizes follow the Linux drivers' defaults."""

from __future__ import annotations

from vbusfs.drivers.scsi.host import ScsiBus
from vbusfs.drivers.vmbus.driver import VmbusDriver, ring_size
from vbusfs.drivers.vmbus.hv_utils import HvUtils, HvUtilsPlatform
from vbusfs.drivers.vmbus.storvsc import StorvscDriver
from vbusfs.platform.memory import PAGE_SIZE

__all__ = ["linux_drivers"]


def linux_drivers(utils: HvUtilsPlatform | None = None, scsi: ScsiBus | None = None,
                  cpus: int = 2) -> list[VmbusDriver]:
    """A fresh set (drivers keep per-bus state: dynamic ids, bound devices); ``utils`` is
    what hv_utils learns from the platform (defaults: no files, no power actions). With the
    guest's SCSI midlayer (``scsi``), ``hv_storvsc`` speaks storvsc and its disks appear;
    without it, it only opens its channels and drains them."""
    storvsc = StorvscDriver(scsi, cpus=cpus) if scsi is not None else \
        VmbusDriver("hv_storvsc", ring_size(128 * 1024), ring_size(128 * 1024))
    return [
        HvUtils(utils),
        storvsc,
        VmbusDriver("hv_netvsc", ring_size(128 * PAGE_SIZE), ring_size(128 * PAGE_SIZE)),
        VmbusDriver("hyperv_keyboard", ring_size(36 * 1024), ring_size(36 * 1024)),
        VmbusDriver("hid_hyperv", ring_size(36 * 1024), ring_size(36 * 1024)),
        VmbusDriver("hyperv_fb", 256 * 1024, 256 * 1024),
        VmbusDriver("hv_balloon", ring_size(16 * 1024), ring_size(16 * 1024)),
        VmbusDriver("hv_pci", ring_size(16 * 1024), ring_size(16 * 1024)),
    ]
