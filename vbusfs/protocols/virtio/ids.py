"""virtio device IDs (``virtio_ids.h``), their PCI identities and QEMU's class codes
(reference/sysfs.md §3.3), and the device-status and transport feature bits common to every
device (``virtio_config.h``; reference/protocols.md §2.4, §2.5)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from vbusfs.protocols import pci

__all__ = ["VENDOR", "SUBSYSTEM_QEMU", "DeviceId", "VirtioType", "TYPES", "type_by_name",
           "Status", "F_NOTIFY_ON_EMPTY", "F_ANY_LAYOUT", "F_INDIRECT_DESC", "F_EVENT_IDX",
           "F_VERSION_1", "F_ACCESS_PLATFORM", "TRANSITIONAL_BASE", "MODERN_BASE",
           "virtio_modalias"]

#: Red Hat / Qumranet: vendor of every virtio PCI function
VENDOR = pci.VENDOR_ID_REDHAT_QUMRANET
#: QEMU's default subsystem id, which modern-only functions keep
SUBSYSTEM_QEMU = pci.SUBDEVICE_ID_QEMU
TRANSITIONAL_BASE = 0x1000    # transitional PCI device ids 0x1000..0x103f
MODERN_BASE = 0x1040          # PCI_DEVICE_ID_VIRTIO_10_BASE: 0x1040 + virtio id


class DeviceId(enum.IntEnum):
    NET = 1
    BLOCK = 2
    CONSOLE = 3
    RNG = 4
    BALLOON = 5


@dataclass(frozen=True)
class VirtioType:
    """One virtio device type as vbusfs configures it."""

    name: str                 # config type
    device_id: DeviceId
    transitional_pci_id: int  # the legacy/transitional PCI device id (QEMU's table)
    class_code: int           # QEMU's class (base << 16 | sub << 8 | prog-if)
    driver: str               # the Linux virtio driver that binds it
    queues: int               # virtqueues a driver sets up by default

    @property
    def modern_pci_id(self) -> int:
        return MODERN_BASE + self.device_id


#: reference/sysfs.md §3.3 (QEMU hw/virtio/virtio-*-pci.c, include/hw/pci/pci.h)
TYPES: tuple[VirtioType, ...] = (
    VirtioType("virtio-net", DeviceId.NET, 0x1000, 0x020000, "virtio_net", 2),
    VirtioType("virtio-blk", DeviceId.BLOCK, 0x1001, 0x010000, "virtio_blk", 1),
    VirtioType("virtio-console", DeviceId.CONSOLE, 0x1003, 0x078000, "virtio_console", 2),
    VirtioType("virtio-rng", DeviceId.RNG, 0x1005, 0xFF0000, "virtio_rng", 1),
    VirtioType("virtio-balloon", DeviceId.BALLOON, 0x1002, 0xFF0000, "virtio_balloon", 2),
)
_BY_NAME = {t.name: t for t in TYPES}


def type_by_name(name: str) -> VirtioType | None:
    return _BY_NAME.get(name)


class Status(enum.IntFlag):
    """Device status bits (VIRTIO_CONFIG_S_*)."""

    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 0x40
    FAILED = 0x80


# transport feature bits (virtio_config.h, virtio_ring.h)
F_NOTIFY_ON_EMPTY = 24
F_ANY_LAYOUT = 27
F_INDIRECT_DESC = 28
F_EVENT_IDX = 29
F_VERSION_1 = 32
F_ACCESS_PLATFORM = 33


def virtio_modalias(device: int, vendor: int) -> str:
    """``virtio:d%08Xv%08X`` (drivers/virtio/virtio.c ``modalias_show``)."""
    return f"virtio:d{device:08X}v{vendor:08X}"
