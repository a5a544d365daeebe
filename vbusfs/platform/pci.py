"""The PCI hardware both halves share: a root complex that routes the guest's configuration
cycles to the functions in its slots and decodes memory and I/O accesses to their BARs, and
the interrupt controller MSI messages are delivered to.

The host side implements :class:`PciFunction` for each function and attaches it to a slot;
the guest side reaches a function only through :class:`PciRoot` — configuration space by
bus/device/function (as through ECAM), BARs by the addresses it programmed into them — as a
kernel reaches real hardware. A function's BARs decode only while its COMMAND register
enables memory or I/O space; the root keeps a decode cache that any configuration write to a
function drops, so a queue notification costs one dictionary lookup, as an ioeventfd would.

MSI: a message is a write of ``data`` to ``address``; on x86 the local APIC range
(0xFEE00000–0xFEEFFFFF) turns it into interrupt vector ``data & 0xFF``. The guest binds a
vector to a doorbell (its handler); a message to a vector nobody bound, or to an address
outside the APIC range, is dropped, as lost interrupts are.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

from vbusfs.platform.doorbell import Doorbell

log = logging.getLogger(__name__)

__all__ = ["PciFunction", "PciRoot", "MsiController", "Bar", "APIC_BASE", "APIC_SIZE",
           "FIRST_VECTOR", "LAST_VECTOR"]

APIC_BASE = 0xFEE00000
APIC_SIZE = 0x100000
FIRST_VECTOR = 0x30        # below are exceptions and legacy IRQs
LAST_VECTOR = 0xEF


class Bar(Protocol):
    """A BAR that decodes: its index, space, base address and size."""

    @property
    def index(self) -> int: ...
    @property
    def io(self) -> bool: ...
    @property
    def base(self) -> int: ...
    @property
    def size(self) -> int: ...


class PciFunction(Protocol):
    """A PCI function as the host side implements it. Offsets and sizes of configuration
    accesses are checked by the root: naturally aligned 1, 2 or 4 bytes inside the space."""

    config_size: int

    def config_read(self, offset: int, size: int) -> int: ...
    def config_write(self, offset: int, size: int, value: int) -> None: ...
    def decoded_bars(self) -> Sequence[Bar]: ...
    def bar_read(self, bar: int, offset: int, size: int) -> int: ...
    def bar_write(self, bar: int, offset: int, size: int, value: int) -> None: ...


class MsiController:
    """The local APIC, as far as MSI goes: vectors bound to doorbells."""

    def __init__(self) -> None:
        self._vectors: dict[int, Doorbell] = {}
        self.lost = 0                 # messages nobody was bound to

    def bind(self, bell: Doorbell) -> int:
        """A free vector that rings ``bell``; its MSI message is (APIC_BASE, vector)."""
        for v in range(FIRST_VECTOR, LAST_VECTOR + 1):
            if v not in self._vectors:
                self._vectors[v] = bell
                return v
        raise OSError(28, "no free interrupt vector")      # ENOSPC

    def unbind(self, vector: int) -> None:
        self._vectors.pop(vector, None)

    def message(self, address: int, data: int) -> None:
        """A device wrote an MSI message."""
        bell = self._vectors.get(data & 0xFF) if APIC_BASE <= address < APIC_BASE + \
            APIC_SIZE else None
        if bell is None:
            self.lost += 1
            return
        bell.ring()


class PciRoot:
    """Root bus ``domain:bus`` (one bus; functions by device/function number)."""

    def __init__(self, domain: int = 0, bus: int = 0) -> None:
        self.domain = domain
        self.bus = bus
        self.functions: dict[int, PciFunction] = {}        # devfn → function
        self.msi = MsiController()
        self._decode: dict[tuple[bool, int], tuple[PciFunction, int, int] | None] = {}

    # -- the host side ------------------------------------------------------------------------
    def attach(self, slot: int, func: int, fn: PciFunction) -> None:
        devfn = slot << 3 | func
        if not 0 <= slot < 32 or not 0 <= func < 8 or devfn in self.functions:
            raise ValueError(f"slot {slot}.{func} is taken or out of range")
        self.functions[devfn] = fn
        self._decode.clear()

    def detach(self, slot: int, func: int) -> None:
        self.functions.pop(slot << 3 | func, None)
        self._decode.clear()

    # -- the guest side: configuration space ----------------------------------------------------
    @staticmethod
    def _valid(fn: PciFunction, offset: int, size: int) -> bool:
        return size in (1, 2, 4) and offset % size == 0 and 0 <= offset <= \
            fn.config_size - size

    def config_read(self, devfn: int, offset: int, size: int) -> int:
        """A configuration read; all ones where no function answers (master abort)."""
        fn = self.functions.get(devfn)
        if fn is None or not self._valid(fn, offset, size):
            return (1 << (8 * size)) - 1
        return fn.config_read(offset, size) & ((1 << (8 * size)) - 1)

    def config_write(self, devfn: int, offset: int, size: int, value: int) -> None:
        fn = self.functions.get(devfn)
        if fn is None or not self._valid(fn, offset, size):
            return
        fn.config_write(offset, size, value & ((1 << (8 * size)) - 1))
        self._decode.clear()             # BARs or the COMMAND register may have changed

    # -- the guest side: memory and I/O space ----------------------------------------------------
    def _find(self, io: bool, addr: int) -> tuple[PciFunction, int, int] | None:
        key = (io, addr)
        try:
            return self._decode[key]
        except KeyError:
            pass
        hit = None
        for fn in self.functions.values():
            for bar in fn.decoded_bars():
                if bar.io == io and bar.base <= addr < bar.base + bar.size:
                    hit = (fn, bar.index, addr - bar.base)
        if len(self._decode) > 4096:
            self._decode.clear()
        self._decode[key] = hit
        return hit

    def read(self, io: bool, addr: int, size: int) -> int:
        """A memory (or I/O port) read; all ones where nothing decodes it."""
        hit = self._find(io, addr)
        if hit is None:
            return (1 << (8 * size)) - 1
        fn, bar, off = hit
        return fn.bar_read(bar, off, size) & ((1 << (8 * size)) - 1)

    def write(self, io: bool, addr: int, size: int, value: int) -> None:
        hit = self._find(io, addr)
        if hit is not None:
            fn, bar, off = hit
            fn.bar_write(bar, off, size, value & ((1 << (8 * size)) - 1))
