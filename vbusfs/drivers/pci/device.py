"""One PCI function as the guest kernel sees it (Linux ``struct pci_dev``): identity read
from configuration space, the resources its BARs were given, the capability list, and the
accessors a driver uses — configuration cycles and BAR reads and writes through the root
complex (:class:`~vbusfs.platform.pci.PciRoot`), MSI-X set-up (``pci_alloc_irq_vectors``).

Everything read from a function is untrusted: the capability walk stops at a loop or a
pointer outside the header, and a capability or BAR that does not make sense is ignored."""

from __future__ import annotations

import errno
import logging

from vbusfs.platform.doorbell import Doorbell
from vbusfs.platform.pci import APIC_BASE, PciRoot
from vbusfs.protocols import pci
from vbusfs.sysfs import Directory

log = logging.getLogger(__name__)

__all__ = ["PciDev", "Resource"]

#: the most capabilities a 256-byte space can hold (PCI_FIND_CAP_TTL)
_CAP_TTL = 48


class Resource:
    """One ``resource`` line: start, end (inclusive), flags; all zero when unused."""

    __slots__ = ("start", "end", "flags")

    def __init__(self, start: int = 0, end: int = 0, flags: int = 0) -> None:
        self.start, self.end, self.flags = start, end, flags

    @property
    def size(self) -> int:
        return self.end - self.start + 1 if self.flags else 0

    @property
    def io(self) -> bool:
        return bool(self.flags & pci.IORESOURCE_IO)


class PciDev:
    def __init__(self, root: PciRoot, slot: int, func: int, cpus: int = 1) -> None:
        self.root = root
        self.cpus = cpus                 # what local_cpus shows (no NUMA: every CPU)
        self.devfn = slot << 3 | func
        self.slot, self.func = slot, func
        self.name = pci.bdf_name(root.domain, root.bus, slot, func)
        self.vendor = self.read_config(pci.VENDOR_ID, 2)
        self.device = self.read_config(pci.DEVICE_ID, 2)
        self.revision = self.read_config(pci.REVISION_ID, 1)
        self.class_code = self.read_config(pci.REVISION_ID, 4) >> 8
        self.header_type = self.read_config(pci.HEADER_TYPE, 1)
        self.subsystem_vendor = self.read_config(pci.SUBSYSTEM_VENDOR_ID, 2)
        self.subsystem_device = self.read_config(pci.SUBSYSTEM_ID, 2)
        self.irq = 0
        self.resources = [Resource() for _ in range(pci.RESOURCE_LINES)]
        self.driver: str | None = None
        self.driver_override: str | None = None
        self.dir: Directory | None = None
        self.drvdata: object = None
        self.enable_cnt = 0
        self.dma_mask_bits = 32
        self.broken_parity_status = 0
        self.msi_bus = 1
        self.d3cold_allowed = 0
        self.numa_node = -1
        self._vectors: list[int] = []

    @property
    def multifunction(self) -> bool:
        return bool(self.header_type & pci.HEADER_TYPE_MULTI)

    # -- configuration space ----------------------------------------------------------------------
    def read_config(self, offset: int, size: int) -> int:
        return self.root.config_read(self.devfn, offset, size)

    def write_config(self, offset: int, size: int, value: int) -> None:
        self.root.config_write(self.devfn, offset, size, value)

    def capabilities(self) -> list[tuple[int, int]]:
        """(id, offset) of every capability, in list order (``pci_find_capability``)."""
        out: list[tuple[int, int]] = []
        if not self.read_config(pci.STATUS, 2) & pci.STATUS_CAP_LIST:
            return out
        at = self.read_config(pci.CAPABILITY_LIST, 1) & ~3
        seen: set[int] = set()
        while at >= 0x40 and at not in seen and len(out) < _CAP_TTL:
            seen.add(at)
            cap_id = self.read_config(at, 1)
            if cap_id == 0xFF:
                break
            out.append((cap_id, at))
            at = self.read_config(at + 1, 1) & ~3
        return out

    # -- resources --------------------------------------------------------------------------------
    def bar_read(self, bar: int, offset: int, size: int) -> int:
        r = self.resources[bar]
        if not r.flags or not 0 <= offset <= r.size - size:
            raise OSError(errno.EINVAL, f"{self.name}: BAR {bar} has no byte {offset:#x}")
        return self.root.read(r.io, r.start + offset, size)

    def bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        r = self.resources[bar]
        if not r.flags or not 0 <= offset <= r.size - size:
            raise OSError(errno.EINVAL, f"{self.name}: BAR {bar} has no byte {offset:#x}")
        self.root.write(r.io, r.start + offset, size, value)

    def enable(self) -> None:
        """``pci_enable_device`` + ``pci_set_master``: decode what it has, master DMA."""
        cmd = self.read_config(pci.COMMAND, 2)
        if any(r.flags and r.io for r in self.resources[:6]):
            cmd |= pci.COMMAND_IO
        if any(r.flags and not r.io for r in self.resources[:6]):
            cmd |= pci.COMMAND_MEMORY
        self.write_config(pci.COMMAND, 2, cmd | pci.COMMAND_MASTER)
        self.enable_cnt += 1
        self.dma_mask_bits = 64

    def disable(self) -> None:
        if self.enable_cnt:
            self.enable_cnt -= 1
        if not self.enable_cnt:
            cmd = self.read_config(pci.COMMAND, 2)
            self.write_config(pci.COMMAND, 2, cmd & ~pci.COMMAND_MASTER)

    # -- MSI-X -------------------------------------------------------------------------------------
    def enable_msix(self, bells: list[Doorbell]) -> bool:
        """One MSI-X vector per doorbell (entry i rings ``bells[i]``); False when the function
        has no usable MSI-X capability or too few entries."""
        cap = next((at for cid, at in self.capabilities() if cid == pci.CAP_ID_MSIX), None)
        if cap is None:
            return False
        ctrl = self.read_config(cap + pci.MSIX_FLAGS, 2)
        nvec = (ctrl & pci.MSIX_FLAGS_QSIZE) + 1
        table = self.read_config(cap + pci.MSIX_TABLE, 4)
        bir, off = table & 7, table & ~7
        if nvec < len(bells) or bir >= 6 or not self.resources[bir].flags or \
                self.resources[bir].io or off + 16 * len(bells) > self.resources[bir].size:
            return False
        self.write_config(cap + pci.MSIX_FLAGS, 2, ctrl | pci.MSIX_FLAGS_ENABLE |
                          pci.MSIX_FLAGS_MASKALL)
        try:
            for i, bell in enumerate(bells):
                vector = self.root.msi.bind(bell)
                self._vectors.append(vector)
                at = off + 16 * i
                self.bar_write(bir, at, 4, APIC_BASE)
                self.bar_write(bir, at + 4, 4, 0)
                self.bar_write(bir, at + 8, 4, vector)
                self.bar_write(bir, at + 12, 4, 0)                 # unmasked
        except BaseException:
            self.disable_msix()               # no vector half-assigned outlives the failure
            raise
        self.write_config(cap + pci.MSIX_FLAGS, 2, (ctrl | pci.MSIX_FLAGS_ENABLE) &
                          ~pci.MSIX_FLAGS_MASKALL)
        return True

    def disable_msix(self) -> None:
        cap = next((at for cid, at in self.capabilities() if cid == pci.CAP_ID_MSIX), None)
        if cap is not None:
            ctrl = self.read_config(cap + pci.MSIX_FLAGS, 2)
            self.write_config(cap + pci.MSIX_FLAGS, 2, ctrl & ~pci.MSIX_FLAGS_ENABLE)
        for v in self._vectors:
            self.root.msi.unbind(v)
        self._vectors = []

    @property
    def msix_enabled(self) -> bool:
        return bool(self._vectors)
