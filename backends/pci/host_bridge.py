"""The host bridge at 00:00.0: Intel 440FX (PMC), as QEMU's ``pc`` machine models it
(``hw/pci-host/i440fx.c``: 8086:1237, revision 2, class 0x060000, QEMU's default subsystem
1af4:1100). It has configuration space only."""

from __future__ import annotations

from backends.pci.device import PciDevice
from vbusfs.platform.pci import MsiController
from vbusfs.protocols import pci

__all__ = ["HostBridge"]


class HostBridge(PciDevice):
    def __init__(self, msi: MsiController) -> None:
        super().__init__(msi, vendor=0x8086, device=0x1237, class_code=0x060000, revision=0x02,
                         subsystem_vendor=pci.VENDOR_ID_REDHAT_QUMRANET,
                         subsystem_id=pci.SUBDEVICE_ID_QEMU)
