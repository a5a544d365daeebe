"""One PCI function's hardware, as a VMM models it (QEMU ``hw/pci/pci.c``, ``msix.c``):
configuration space with write masks, BARs that size themselves, a capability list, and
MSI-X.

* Every configuration byte has a write mask, so read-only fields stay put and a BAR written
  with all ones reads back its size mask (``~(size - 1)`` plus its read-only type bits): the
  sizing protocol falls out of the masks. The COMMAND register's I/O and memory bits decide
  whether BARs decode.
* Capabilities are prepended to the list, as ``pci_add_capability`` does, at offsets from
  0x40 upward.
* MSI-X: the table and the pending-bit array live in a BAR; a vector that is masked (or the
  function masked) when it fires is marked pending and delivered when unmasked.

A subclass serves its own BAR regions by overriding :meth:`PciDevice.region_read` and
:meth:`PciDevice.region_write`; accesses outside any region read as zeros and are dropped.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass

from vbusfs.platform.pci import MsiController
from vbusfs.protocols import pci

#: an MSI-X table entry's message: address, data
_MSIX_MESSAGE = struct.Struct("<QI")

log = logging.getLogger(__name__)

__all__ = ["BarSpec", "DecodedBar", "PciDevice", "Msix"]


@dataclass(frozen=True)
class BarSpec:
    index: int
    size: int                  # a power of two
    io: bool = False
    mem64: bool = False
    prefetch: bool = False

    @property
    def low_bits(self) -> int:
        if self.io:
            return pci.BAR_SPACE_IO
        return (pci.BAR_MEM_TYPE_64 if self.mem64 else 0) | \
            (pci.BAR_MEM_PREFETCH if self.prefetch else 0)


@dataclass(frozen=True)
class DecodedBar:
    index: int
    io: bool
    base: int
    size: int


class Msix:
    """MSI-X state of a function: ``vectors`` entries at ``table_offset`` and the PBA at
    ``pba_offset`` of BAR ``bar``."""

    def __init__(self, dev: PciDevice, vectors: int, bar: int, table_offset: int,
                 pba_offset: int) -> None:
        self.dev = dev
        self.vectors = vectors
        self.bar = bar
        self.table_offset = table_offset
        self.pba_offset = pba_offset
        self.table = bytearray(vectors * pci.MSIX_ENTRY_SIZE)
        for v in range(vectors):           # every vector starts masked (PCI 3.0 §6.8.2.9)
            self.table[v * 16 + 12] = pci.MSIX_ENTRY_VECTOR_CTRL_MASKBIT
        self.pending = bytearray((vectors + 63) // 64 * 8)
        body = struct.pack("<HII", vectors - 1, table_offset | bar, pba_offset | bar)
        self.cap = dev.add_capability(pci.CAP_ID_MSIX, body)
        ctrl = self.cap + pci.MSIX_FLAGS + 1   # the high byte holds ENABLE and MASKALL
        dev.wmask[ctrl] = (pci.MSIX_FLAGS_ENABLE | pci.MSIX_FLAGS_MASKALL) >> 8

    @property
    def _control(self) -> int:
        return int.from_bytes(self.dev.cfg[self.cap + 2:self.cap + 4], "little")

    @property
    def enabled(self) -> bool:
        return bool(self._control & pci.MSIX_FLAGS_ENABLE)

    def _masked(self, v: int) -> bool:
        return bool(self._control & pci.MSIX_FLAGS_MASKALL or
                    self.table[v * 16 + 12] & pci.MSIX_ENTRY_VECTOR_CTRL_MASKBIT)

    def notify(self, vector: int) -> bool:
        """Fire ``vector``; False when MSI-X is off or the vector does not exist (the caller
        may then fall back to INTx)."""
        control = self._control
        if not control & pci.MSIX_FLAGS_ENABLE or not 0 <= vector < self.vectors:
            return False
        if control & pci.MSIX_FLAGS_MASKALL or \
                self.table[vector * 16 + 12] & pci.MSIX_ENTRY_VECTOR_CTRL_MASKBIT:
            self.pending[vector // 8] |= 1 << (vector % 8)
            return True
        addr, data = _MSIX_MESSAGE.unpack_from(self.table, vector * 16)
        self.dev.msi.message(addr, data)
        return True

    def owns(self, bar: int, offset: int) -> bool:
        return bar == self.bar and (
            self.table_offset <= offset < self.table_offset + len(self.table) or
            self.pba_offset <= offset < self.pba_offset + len(self.pending))

    def read(self, offset: int, size: int) -> int:
        if self.table_offset <= offset < self.table_offset + len(self.table):
            at = offset - self.table_offset
            return int.from_bytes(self.table[at:at + size], "little")
        at = offset - self.pba_offset
        return int.from_bytes(self.pending[at:at + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        if not self.table_offset <= offset < self.table_offset + len(self.table):
            return                                   # the PBA is read-only
        at = offset - self.table_offset
        self.table[at:at + size] = value.to_bytes(size, "little")[:len(self.table) - at]
        self.config_changed()

    def clear_pending(self) -> None:
        """Forget interrupts that were held back (QEMU's ``msix_unuse_all_vectors`` when
        the device is reset): a stale one must not fire at the next driver's unmask."""
        self.pending[:] = bytes(len(self.pending))

    def config_changed(self) -> None:
        """Deliver what became unmasked while pending."""
        if not self.enabled:
            return
        for v in range(self.vectors):
            if self.pending[v // 8] & (1 << (v % 8)) and not self._masked(v):
                self.pending[v // 8] &= ~(1 << (v % 8)) & 0xFF
                addr, data = struct.unpack_from("<QI", self.table, v * 16)
                self.dev.msi.message(addr, data)


class PciDevice:
    """A type 0 function. ``class_code`` is base << 16 | sub << 8 | prog-if."""

    config_size = pci.CFG_SPACE_SIZE

    def __init__(self, msi: MsiController, *, vendor: int, device: int, class_code: int,
                 revision: int, subsystem_vendor: int = 0, subsystem_id: int = 0,
                 bars: tuple[BarSpec, ...] = (), interrupt_pin: int = 0,
                 multifunction: bool = False) -> None:
        self.msi = msi
        self.cfg = bytearray(self.config_size)
        self.wmask = bytearray(self.config_size)
        self.bars = {b.index: b for b in bars}
        self.msix: Msix | None = None
        c = self.cfg
        struct.pack_into("<HH", c, pci.VENDOR_ID, vendor, device)
        c[pci.REVISION_ID] = revision
        c[pci.CLASS_PROG] = class_code & 0xFF
        struct.pack_into("<H", c, pci.CLASS_DEVICE, class_code >> 8)
        c[pci.HEADER_TYPE] = pci.HEADER_TYPE_NORMAL | (pci.HEADER_TYPE_MULTI if multifunction
                                                       else 0)
        struct.pack_into("<HH", c, pci.SUBSYSTEM_VENDOR_ID, subsystem_vendor, subsystem_id)
        c[pci.INTERRUPT_PIN] = interrupt_pin
        self.wmask[pci.INTERRUPT_LINE] = 0xFF
        self.wmask[pci.CACHE_LINE_SIZE] = 0xFF
        self.wmask[pci.LATENCY_TIMER] = 0xFF
        cmd = pci.COMMAND_IO | pci.COMMAND_MEMORY | pci.COMMAND_MASTER | \
            pci.COMMAND_INTX_DISABLE
        struct.pack_into("<H", self.wmask, pci.COMMAND, cmd)
        for b in bars:
            at = pci.BASE_ADDRESS_0 + 4 * b.index
            c[at] = b.low_bits
            mask = ~(b.size - 1) & (pci.BAR_IO_MASK if b.io else pci.BAR_MEM_MASK)
            struct.pack_into("<I", self.wmask, at, mask & 0xFFFFFFFF)
            if b.mem64:
                struct.pack_into("<I", self.wmask, at + 4, (~(b.size - 1) >> 32) & 0xFFFFFFFF)
        self._next_cap = 0x40

    # -- building -------------------------------------------------------------------------------
    def add_capability(self, cap_id: int, body: bytes) -> int:
        """Put a capability (``cap_id``, next, then ``body``) in the list, first, as
        ``pci_add_capability`` does; returns its offset."""
        at = self._next_cap
        size = 2 + len(body)
        if at + size > self.config_size:
            raise ValueError("no room for the capability")
        self.cfg[at] = cap_id
        self.cfg[at + 1] = self.cfg[pci.CAPABILITY_LIST]
        self.cfg[at + 2:at + size] = body
        self.cfg[pci.CAPABILITY_LIST] = at
        struct.pack_into("<H", self.cfg, pci.STATUS,
                         int.from_bytes(self.cfg[pci.STATUS:pci.STATUS + 2], "little") |
                         pci.STATUS_CAP_LIST)
        self._next_cap = (at + size + 3) & ~3
        return at

    def add_msix(self, vectors: int, bar: int, table_offset: int, pba_offset: int) -> Msix:
        self.msix = Msix(self, vectors, bar, table_offset, pba_offset)
        return self.msix

    # -- PciFunction ----------------------------------------------------------------------------
    def config_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.cfg[offset:offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        for i, byte in enumerate(value.to_bytes(size, "little")):
            m = self.wmask[offset + i]
            self.cfg[offset + i] = (self.cfg[offset + i] & ~m | byte & m) & 0xFF
        if self.msix is not None and offset <= self.msix.cap + 3 and \
                offset + size > self.msix.cap + 2:
            self.msix.config_changed()
        self.config_written(offset, size)

    def config_written(self, offset: int, size: int) -> None:
        """For subclasses: a configuration write landed (after the masks)."""

    @property
    def command(self) -> int:
        return int.from_bytes(self.cfg[pci.COMMAND:pci.COMMAND + 2], "little")

    def bar_address(self, index: int) -> int:
        b = self.bars[index]
        at = pci.BASE_ADDRESS_0 + 4 * index
        low = int.from_bytes(self.cfg[at:at + 4], "little")
        addr = low & (pci.BAR_IO_MASK if b.io else pci.BAR_MEM_MASK)
        if b.mem64:
            addr |= int.from_bytes(self.cfg[at + 4:at + 8], "little") << 32
        return addr

    def decoded_bars(self) -> list[DecodedBar]:
        cmd = self.command
        out = []
        for b in self.bars.values():
            if not cmd & (pci.COMMAND_IO if b.io else pci.COMMAND_MEMORY):
                continue
            base = self.bar_address(b.index)
            if base == 0 or base == (~(b.size - 1) & (pci.BAR_IO_MASK if b.io
                                                       else pci.BAR_MEM_MASK)):
                continue               # unassigned, or left at its sizing value
            out.append(DecodedBar(b.index, b.io, base, b.size))
        return out

    def bar_read(self, bar: int, offset: int, size: int) -> int:
        if self.msix is not None and self.msix.owns(bar, offset):
            return self.msix.read(offset, size)
        return self.region_read(bar, offset, size)

    def bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        if self.msix is not None and self.msix.owns(bar, offset):
            self.msix.write(offset, size, value)
            return
        self.region_write(bar, offset, size, value)

    def region_read(self, bar: int, offset: int, size: int) -> int:
        return 0

    def region_write(self, bar: int, offset: int, size: int, value: int) -> None:
        pass
