"""PCI configuration space: register offsets, bits and formats (Linux ``pci_regs.h``, the PCI
Local Bus Specification 3.0 §6), the resource flags sysfs prints (``ioport.h``), and the
``resource``/``modalias`` formats (reference/sysfs.md §3.2). Pure constants and helpers."""

from __future__ import annotations

__all__ = [
    "VENDOR_ID", "DEVICE_ID", "COMMAND", "STATUS", "REVISION_ID", "CLASS_PROG", "CLASS_DEVICE",
    "CACHE_LINE_SIZE", "LATENCY_TIMER", "HEADER_TYPE", "BIST", "BASE_ADDRESS_0",
    "SUBSYSTEM_VENDOR_ID", "SUBSYSTEM_ID", "ROM_ADDRESS", "CAPABILITY_LIST", "INTERRUPT_LINE",
    "INTERRUPT_PIN", "CFG_SPACE_SIZE", "CFG_SPACE_EXP_SIZE", "COMMAND_IO", "COMMAND_MEMORY",
    "COMMAND_MASTER", "COMMAND_INTX_DISABLE", "STATUS_CAP_LIST", "HEADER_TYPE_NORMAL",
    "HEADER_TYPE_MULTI", "BAR_SPACE_IO", "BAR_MEM_TYPE_64", "BAR_MEM_PREFETCH",
    "BAR_IO_MASK", "BAR_MEM_MASK", "CAP_ID_VNDR", "CAP_ID_MSIX", "MSIX_FLAGS",
    "MSIX_FLAGS_ENABLE", "MSIX_FLAGS_MASKALL", "MSIX_FLAGS_QSIZE", "MSIX_TABLE", "MSIX_PBA",
    "MSIX_ENTRY_SIZE", "MSIX_ENTRY_VECTOR_CTRL_MASKBIT", "IORESOURCE_IO", "IORESOURCE_MEM",
    "IORESOURCE_PREFETCH", "IORESOURCE_SIZEALIGN", "IORESOURCE_MEM_64", "RESOURCE_LINES",
    "bdf_name", "modalias", "resource_flags", "VENDOR_ID_REDHAT_QUMRANET", "SUBDEVICE_ID_QEMU",
]

#: QEMU's vendor and default subsystem device (include/hw/pci/pci.h): every virtio function's
#: vendor, and the subsystem QEMU gives functions that set none
VENDOR_ID_REDHAT_QUMRANET = 0x1AF4
SUBDEVICE_ID_QEMU = 0x1100

# -- type 0 header (pci_regs.h) ------------------------------------------------------------
VENDOR_ID = 0x00            # u16
DEVICE_ID = 0x02            # u16
COMMAND = 0x04              # u16
STATUS = 0x06               # u16
REVISION_ID = 0x08          # u8
CLASS_PROG = 0x09           # u8: programming interface
CLASS_DEVICE = 0x0A         # u16: base class << 8 | subclass
CACHE_LINE_SIZE = 0x0C
LATENCY_TIMER = 0x0D
HEADER_TYPE = 0x0E
BIST = 0x0F
BASE_ADDRESS_0 = 0x10       # six u32 BARs up to 0x24
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
ROM_ADDRESS = 0x30
CAPABILITY_LIST = 0x34      # u8: offset of the first capability
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D

CFG_SPACE_SIZE = 256        # conventional PCI (PCI_CFG_SPACE_SIZE)
CFG_SPACE_EXP_SIZE = 4096   # PCI Express (PCI_CFG_SPACE_EXP_SIZE)

COMMAND_IO = 0x1
COMMAND_MEMORY = 0x2
COMMAND_MASTER = 0x4
COMMAND_INTX_DISABLE = 0x400
STATUS_CAP_LIST = 0x10

HEADER_TYPE_NORMAL = 0x00
HEADER_TYPE_MULTI = 0x80    # the multi-function bit

BAR_SPACE_IO = 0x1
BAR_MEM_TYPE_64 = 0x4
BAR_MEM_PREFETCH = 0x8
BAR_IO_MASK = ~0x3 & 0xFFFFFFFF
BAR_MEM_MASK = ~0xF & 0xFFFFFFFF

# -- capabilities ---------------------------------------------------------------------------
CAP_ID_VNDR = 0x09          # vendor specific (virtio's structures)
CAP_ID_MSIX = 0x11
MSIX_FLAGS = 2              # u16 message control, from the capability's start
MSIX_FLAGS_ENABLE = 0x8000
MSIX_FLAGS_MASKALL = 0x4000
MSIX_FLAGS_QSIZE = 0x07FF   # table size - 1
MSIX_TABLE = 4              # u32: table offset | BIR
MSIX_PBA = 8                # u32: PBA offset | BIR
MSIX_ENTRY_SIZE = 16        # address lo, address hi, data, vector control
MSIX_ENTRY_VECTOR_CTRL_MASKBIT = 0x1

# -- what sysfs prints (include/linux/ioport.h, drivers/pci/pci-sysfs.c) -------------------
IORESOURCE_IO = 0x00000100
IORESOURCE_MEM = 0x00000200
IORESOURCE_PREFETCH = 0x00002000
IORESOURCE_SIZEALIGN = 0x00040000
IORESOURCE_MEM_64 = 0x00100000
#: lines of ``resource`` for a non-bridge without SR-IOV: six BARs and the ROM
RESOURCE_LINES = 7


def resource_flags(bar_low_bits: int, io: bool) -> int:
    """``decode_bar`` + SIZEALIGN: the flags of a BAR as ``resource`` prints them (the BAR's
    low bits are kept: 2 for I/O, 4 for memory)."""
    if io:
        return IORESOURCE_IO | IORESOURCE_SIZEALIGN | (bar_low_bits & 0x3)
    flags = IORESOURCE_MEM | IORESOURCE_SIZEALIGN | (bar_low_bits & 0xF)
    if bar_low_bits & BAR_MEM_PREFETCH:
        flags |= IORESOURCE_PREFETCH
    if bar_low_bits & BAR_MEM_TYPE_64:
        flags |= IORESOURCE_MEM_64
    return flags


def bdf_name(domain: int, bus: int, slot: int, func: int) -> str:
    """``DDDD:BB:SS.F``, the name of a PCI device directory (pci_setup_device)."""
    return f"{domain:04x}:{bus:02x}:{slot:02x}.{func}"


def modalias(vendor: int, device: int, subvendor: int, subdevice: int, class_code: int) -> str:
    """``pci:v%08Xd%08Xsv%08Xsd%08Xbc%02Xsc%02Xi%02X`` (pci-sysfs.c ``modalias_show``)."""
    return (f"pci:v{vendor:08X}d{device:08X}sv{subvendor:08X}sd{subdevice:08X}"
            f"bc{class_code >> 16 & 0xFF:02X}sc{class_code >> 8 & 0xFF:02X}"
            f"i{class_code & 0xFF:02X}")
