"""The PCI device attributes, as rows (Linux ``drivers/pci/pci-sysfs.c``; reference/sysfs.md
§3.2 and the real guest's tree in reference/real-virtio-pci-sysfs.txt): formats exactly as
Linux prints them, ``config`` a binary attribute of the real size that non-root readers see
only 64 bytes of, ``resourceN`` for each BAR."""

from __future__ import annotations

import errno
from collections.abc import Callable

from vbusfs.drivers.pci.device import PciDev
from vbusfs.protocols import pci
from vbusfs.sysfs import Attr, BinAttribute, Group, add_group
from vbusfs.sysfs.driver_core import kstrtoint, kstrtoul
from vbusfs.sysfs.nodes import ATTR_SIZE

__all__ = ["add_device_files", "uevent", "DEVICE_GROUP", "cpumask", "cpulist"]


def cpumask(cpus: int) -> str:
    """``cpumap_print_to_pagebuf(false)``: hex, 32-bit groups separated by commas."""
    mask = (1 << cpus) - 1
    groups = []
    while True:
        groups.append(mask & 0xFFFFFFFF)
        mask >>= 32
        if not mask:
            break
    out = [f"{groups[-1]:x}"] + [f"{g:08x}" for g in reversed(groups[:-1])]
    return ",".join(out)


def cpulist(cpus: int) -> str:
    return "0" if cpus == 1 else f"0-{cpus - 1}"


def _resource(d: PciDev) -> str:
    return "".join(f"0x{r.start:016x} 0x{r.end:016x} 0x{r.flags:016x}\n" if r.flags else
                   f"0x{0:016x} 0x{0:016x} 0x{0:016x}\n" for r in d.resources)


def _modalias(d: PciDev) -> str:
    return pci.modalias(d.vendor, d.device, d.subsystem_vendor, d.subsystem_device,
                        d.class_code)


def uevent(d: PciDev) -> str:
    """``pci_uevent``."""
    lines = [f"DRIVER={d.driver}"] if d.driver else []
    lines += [f"PCI_CLASS={d.class_code:X}", f"PCI_ID={d.vendor:04X}:{d.device:04X}",
              f"PCI_SUBSYS_ID={d.subsystem_vendor:04X}:{d.subsystem_device:04X}",
              f"PCI_SLOT_NAME={d.name}", f"MODALIAS={_modalias(d)}"]
    return "\n".join(lines) + "\n"


def _flag_store(name: str) -> Callable[[PciDev, str], None]:
    """``msi_bus``, ``broken_parity_status``, ``d3cold_allowed``: a number (kstrtoul); any
    but 0 sets the flag."""
    def store(d: PciDev, text: str) -> None:
        setattr(d, name, int(kstrtoul(text) != 0))
    return store


def _store_enable(d: PciDev, text: str) -> None:
    """``enable_store``: a number (kstrtoul); not while a driver holds the function (EBUSY);
    non-zero enables once more (``enable`` counts), 0 disables, EIO when not enabled."""
    value = kstrtoul(text)
    if d.driver is not None:
        raise OSError(errno.EBUSY, f"{d.name} is bound to {d.driver}")
    if value:
        d.enable()
    elif d.enable_cnt:
        d.disable()
    else:
        raise OSError(errno.EIO, f"{d.name} is not enabled")


def _store_numa_node(d: PciDev, text: str) -> None:
    node = kstrtoint(text)
    if node != -1 and node != 0:
        raise OSError(errno.EINVAL, f"node {node} is not online")
    d.numa_node = node


def _store_override(d: PciDev, text: str) -> None:
    if len(text.encode()) >= ATTR_SIZE:
        raise OSError(errno.EINVAL, "driver_override too long")
    value = text[:-1] if text.endswith("\n") else text
    d.driver_override = value or None


DEVICE_GROUP: Group[PciDev] = Group([
    Attr("vendor", lambda d: f"0x{d.vendor:04x}\n", static=True),
    Attr("device", lambda d: f"0x{d.device:04x}\n", static=True),
    Attr("subsystem_vendor", lambda d: f"0x{d.subsystem_vendor:04x}\n", static=True),
    Attr("subsystem_device", lambda d: f"0x{d.subsystem_device:04x}\n", static=True),
    Attr("revision", lambda d: f"0x{d.revision:02x}\n", static=True),
    Attr("class", lambda d: f"0x{d.class_code:06x}\n", static=True),
    Attr("irq", lambda d: f"{d.irq}\n"),
    Attr("resource", _resource),
    Attr("modalias", lambda d: _modalias(d) + "\n", static=True),
    Attr("local_cpus", lambda d: cpumask(d.cpus) + "\n", static=True),
    Attr("local_cpulist", lambda d: cpulist(d.cpus) + "\n", static=True),
    Attr("numa_node", lambda d: f"{d.numa_node}\n", _store_numa_node),
    Attr("dma_mask_bits", lambda d: f"{d.dma_mask_bits}\n"),
    Attr("consistent_dma_mask_bits", lambda d: f"{d.dma_mask_bits}\n"),
    Attr("enable", lambda d: f"{d.enable_cnt}\n", _store_enable),
    Attr("broken_parity_status", lambda d: f"{d.broken_parity_status}\n",
         _flag_store("broken_parity_status")),
    Attr("msi_bus", lambda d: f"{d.msi_bus}\n", _flag_store("msi_bus")),
    Attr("d3cold_allowed", lambda d: f"{d.d3cold_allowed}\n", _flag_store("d3cold_allowed")),
    Attr("driver_override",
         lambda d: f"{d.driver_override if d.driver_override is not None else '(null)'}\n",
         _store_override),
    Attr("ari_enabled", lambda d: "0\n", static=True),
    Attr("power_state", lambda d: "D0\n", static=True),
])


def _cycles(offset: int, size: int) -> list[tuple[int, int]]:
    """The configuration cycles ``pci_read_config``/``pci_write_config`` split an access
    into: a byte to reach a word boundary, a word to reach a dword boundary, dwords, then
    a word and a byte for what is left."""
    out: list[tuple[int, int]] = []
    if offset & 1 and size:
        out.append((offset, 1))
        offset, size = offset + 1, size - 1
    if offset & 3 and size > 2:
        out.append((offset, 2))
        offset, size = offset + 2, size - 2
    while size > 3:
        out.append((offset, 4))
        offset, size = offset + 4, size - 4
    if size >= 2:
        out.append((offset, 2))
        offset, size = offset + 2, size - 2
    if size:
        out.append((offset, 1))
    return out


def _config_reader(d: PciDev) -> Callable[[int, int], bytes]:
    def read(offset: int, size: int) -> bytes:
        return b"".join(d.read_config(at, n).to_bytes(n, "little")
                        for at, n in _cycles(offset, size))
    return read


def _config_writer(d: PciDev) -> Callable[[int, bytes], int]:
    def write(offset: int, data: bytes) -> int:
        for at, n in _cycles(offset, len(data)):
            d.write_config(at, n, int.from_bytes(data[at - offset:at - offset + n], "little"))
        return len(data)
    return write


def _resource_io(d: PciDev, bar: int) -> tuple[Callable[[int, int], bytes],
                                              Callable[[int, bytes], int]]:
    """``pci_read_resource_io``/``pci_write_resource_io``: I/O BARs are readable and writable
    through the file in 1, 2 or 4-byte accesses; memory BARs only by mmap (not here): EIO."""
    r = d.resources[bar]

    def read(offset: int, size: int) -> bytes:
        if not r.io:
            raise OSError(errno.EIO, "memory BARs are only mapped, not read")
        if size not in (1, 2, 4) or offset % size:
            raise OSError(errno.EINVAL, "I/O BAR reads are 1, 2 or 4 aligned bytes")
        return d.bar_read(bar, offset, size).to_bytes(size, "little")

    def write(offset: int, data: bytes) -> int:
        if not r.io:
            raise OSError(errno.EIO, "memory BARs are only mapped, not written")
        if len(data) not in (1, 2, 4) or offset % len(data):
            raise OSError(errno.EINVAL, "I/O BAR writes are 1, 2 or 4 aligned bytes")
        d.bar_write(bar, offset, len(data), int.from_bytes(data, "little"))
        return len(data)
    return read, write


def add_device_files(d: PciDev, config_size: int) -> None:
    assert d.dir is not None
    add_group(d.dir, d, DEVICE_GROUP)
    d.dir.add(BinAttribute("config", config_size, _config_reader(d), _config_writer(d),
                           perm=0o644, public_length=64))
    for i, r in enumerate(d.resources[:6]):
        if r.flags:
            read, write = _resource_io(d, i)
            d.dir.add(BinAttribute(f"resource{i}", r.size, read, write, perm=0o600))
