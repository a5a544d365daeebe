"""virtio over PCI: the legacy I/O register file and the modern capabilities and common
configuration (``virtio_pci.h``, virtio 1.x §4.1; reference/sysfs.md §3.4 and
reference/protocols.md §2.6)."""

from __future__ import annotations

import struct

__all__ = [
    "HOST_FEATURES", "GUEST_FEATURES", "QUEUE_PFN", "QUEUE_NUM", "QUEUE_SEL", "QUEUE_NOTIFY",
    "STATUS", "ISR", "MSI_CONFIG_VECTOR", "MSI_QUEUE_VECTOR", "legacy_config_offset",
    "QUEUE_ADDR_SHIFT", "MSI_NO_VECTOR", "ISR_QUEUE", "ISR_CONFIG", "CAP_COMMON_CFG",
    "CAP_NOTIFY_CFG", "CAP_ISR_CFG", "CAP_DEVICE_CFG", "CAP_PCI_CFG", "CAP", "NOTIFY_CAP",
    "PCI_CFG_CAP", "COMMON_CFG_SIZE", "C_DFSELECT", "C_DF", "C_GFSELECT", "C_GF", "C_MSIX",
    "C_NUMQ", "C_STATUS", "C_CFGGENERATION", "C_Q_SELECT", "C_Q_SIZE", "C_Q_MSIX",
    "C_Q_ENABLE", "C_Q_NOFF", "C_Q_DESCLO", "C_Q_DESCHI", "C_Q_AVAILLO", "C_Q_AVAILHI",
    "C_Q_USEDLO", "C_Q_USEDHI", "COMMON_WIDTHS",
]

# -- legacy I/O BAR 0 ------------------------------------------------------------------------
HOST_FEATURES = 0           # u32 R: device features 0..31
GUEST_FEATURES = 4          # u32 RW
QUEUE_PFN = 8               # u32 RW: ring address >> 12
QUEUE_NUM = 12              # u16 R
QUEUE_SEL = 14              # u16 RW
QUEUE_NOTIFY = 16           # u16 RW
STATUS = 18                 # u8 RW
ISR = 19                    # u8 R, read clears
MSI_CONFIG_VECTOR = 20      # u16, only while MSI-X is enabled
MSI_QUEUE_VECTOR = 22       # u16, only while MSI-X is enabled


def legacy_config_offset(msix_enabled: bool) -> int:
    """``VIRTIO_PCI_CONFIG_OFF``: device config starts after the MSI vectors when MSI-X is
    on."""
    return 24 if msix_enabled else 20


QUEUE_ADDR_SHIFT = 12       # VIRTIO_PCI_QUEUE_ADDR_SHIFT
MSI_NO_VECTOR = 0xFFFF      # VIRTIO_MSI_NO_VECTOR
ISR_QUEUE = 0x1
ISR_CONFIG = 0x2            # VIRTIO_PCI_ISR_CONFIG

# -- modern: vendor capabilities -----------------------------------------------------------
CAP_COMMON_CFG = 1
CAP_NOTIFY_CFG = 2
CAP_ISR_CFG = 3
CAP_DEVICE_CFG = 4
CAP_PCI_CFG = 5
#: ``struct virtio_pci_cap``: cap_vndr, cap_next, cap_len, cfg_type, bar, id, padding[2],
#: offset le32, length le32 (16 bytes)
CAP = struct.Struct("<BBBBBB2xII")
#: ``struct virtio_pci_notify_cap``: the cap, then notify_off_multiplier le32
NOTIFY_CAP = struct.Struct("<BBBBBB2xIII")
#: ``struct virtio_pci_cfg_cap``: the cap, then pci_cfg_data[4]
PCI_CFG_CAP = struct.Struct("<BBBBBB2xII4s")

# -- modern: struct virtio_pci_common_cfg -----------------------------------------------------
COMMON_CFG_SIZE = 56        # through queue_used_hi (the 1.0 structure)
C_DFSELECT = 0              # u32 device_feature_select
C_DF = 4                    # u32 device_feature
C_GFSELECT = 8              # u32 driver_feature_select
C_GF = 12                   # u32 driver_feature
C_MSIX = 16                 # u16 config_msix_vector
C_NUMQ = 18                 # u16 num_queues
C_STATUS = 20               # u8 device_status
C_CFGGENERATION = 21        # u8 config_generation
C_Q_SELECT = 22             # u16
C_Q_SIZE = 24               # u16
C_Q_MSIX = 26               # u16
C_Q_ENABLE = 28             # u16
C_Q_NOFF = 30               # u16 queue_notify_off
C_Q_DESCLO = 32
C_Q_DESCHI = 36
C_Q_AVAILLO = 40
C_Q_AVAILHI = 44
C_Q_USEDLO = 48
C_Q_USEDHI = 52
#: the width of each common-config field; accesses of another width are ignored
COMMON_WIDTHS = {C_DFSELECT: 4, C_DF: 4, C_GFSELECT: 4, C_GF: 4, C_MSIX: 2, C_NUMQ: 2,
                 C_STATUS: 1, C_CFGGENERATION: 1, C_Q_SELECT: 2, C_Q_SIZE: 2, C_Q_MSIX: 2,
                 C_Q_ENABLE: 2, C_Q_NOFF: 2, C_Q_DESCLO: 4, C_Q_DESCHI: 4, C_Q_AVAILLO: 4,
                 C_Q_AVAILHI: 4, C_Q_USEDLO: 4, C_Q_USEDHI: 4}
