"""virtio over PCI, the device half (virtio 1.x §4.1; QEMU ``hw/virtio/virtio-pci.c``, the
seed ``qemu-virtio-pci.c``): a PCI function with QEMU's identity and BAR layout, the legacy
register file and the modern capabilities, feature negotiation, the device-status state
machine, queue set-up, notifications, the ISR and MSI-X interrupts.

Identity (reference/sysfs.md §3.3): a *transitional* function has PCI device id 0x1000 + n,
revision 0, subsystem 1af4:<virtio id> and a legacy I/O BAR 0; a *modern* one has device id
0x1040 + virtio id, revision 1, QEMU's subsystem 1af4:1100. Both have MSI-X in BAR 1 (table
at 0, PBA at 0x800) and the modern registers in a 64-bit prefetchable BAR 4 of 16 KiB:
common configuration at 0x0, ISR at 0x1000, device configuration at 0x2000, notifications at
0x3000 (``notify_off_multiplier`` 4). The vendor capabilities go in QEMU's order (common,
ISR, device, notify, PCI_CFG at 0x40 … 0x84), then MSI-X at 0x98, each prepended to the
list, so the list starts at MSI-X as on QEMU.

State machine (§2.1, §3.1): writing 0 resets; FEATURES_OK sticks only if the driver chose a
subset of what was offered and, through the modern interface, VERSION_1 (the driver re-reads
it to learn); DRIVER_OK starts the device model on the queues the driver set up; a queue the
driver broke sets DEVICE_NEEDS_RESET and a configuration interrupt, and the device stops
serving until reset. Device configuration reads see a generation counter that moves when the
configuration changes.
"""

from __future__ import annotations

import logging
import struct
from typing import Protocol

from backends.pci.device import BarSpec, PciDevice
from backends.virtio.virtqueue import DeviceQueue, QueueError
from vbusfs.platform.memory import GuestMemory
from vbusfs.platform.pci import MsiController
from vbusfs.protocols import pci
from vbusfs.protocols.virtio import ids, ring
from vbusfs.protocols.virtio import pci as vp

log = logging.getLogger(__name__)

__all__ = ["VirtioModel", "VirtioPciFunction", "LEGACY_BAR", "MSIX_BAR", "MODERN_BAR",
           "COMMON_OFF", "ISR_OFF", "DEVICE_OFF", "NOTIFY_OFF", "NOTIFY_MULT"]

LEGACY_BAR, MSIX_BAR, MODERN_BAR = 0, 1, 4
COMMON_OFF, ISR_OFF, DEVICE_OFF, NOTIFY_OFF = 0x0000, 0x1000, 0x2000, 0x3000
REGION = 0x1000
_DRIVER_OK = int(ids.Status.DRIVER_OK)     # an int: ``int & IntFlag`` builds a flag each time
NOTIFY_MULT = 4              # QEMU without page-per-vq
MODERN_BAR_SIZE = 0x4000
MSIX_BAR_SIZE = 0x1000
PBA_OFF = 0x800


class VirtioModel(Protocol):
    """A virtio device behind the transport."""

    device_id: int
    num_queues: int
    queue_size: int

    def features(self) -> int: ...                  # what the device offers (u64)
    def config(self) -> bytes: ...                   # the device configuration, current
    def config_write(self, offset: int, data: bytes) -> None: ...
    def start(self, fn: VirtioPciFunction) -> None: ...   # DRIVER_OK: queues are ready
    def reset(self) -> None: ...


def _pow2ceil(n: int) -> int:
    return 1 << (n - 1).bit_length()


class VirtioPciFunction(PciDevice):
    def __init__(self, msi: MsiController, memory: GuestMemory, model: VirtioModel,
                 vtype: ids.VirtioType, transitional: bool) -> None:
        self.model = model
        self.memory = memory
        self.transitional = transitional
        bars = [BarSpec(MSIX_BAR, MSIX_BAR_SIZE),
                BarSpec(MODERN_BAR, MODERN_BAR_SIZE, mem64=True, prefetch=True)]
        if transitional:
            legacy_size = _pow2ceil(vp.legacy_config_offset(True) + len(model.config()))
            bars.insert(0, BarSpec(LEGACY_BAR, max(legacy_size, 0x20), io=True))
            super().__init__(msi, vendor=ids.VENDOR, device=vtype.transitional_pci_id,
                             class_code=vtype.class_code, revision=0,
                             subsystem_vendor=ids.VENDOR, subsystem_id=vtype.device_id,
                             bars=tuple(bars), interrupt_pin=1)
        else:
            super().__init__(msi, vendor=ids.VENDOR, device=vtype.modern_pci_id,
                             class_code=vtype.class_code, revision=1,
                             subsystem_vendor=ids.VENDOR, subsystem_id=ids.SUBSYSTEM_QEMU,
                             bars=tuple(bars), interrupt_pin=1)
        for cfg_type, off in ((vp.CAP_COMMON_CFG, COMMON_OFF), (vp.CAP_ISR_CFG, ISR_OFF),
                              (vp.CAP_DEVICE_CFG, DEVICE_OFF)):
            self._vendor_cap(vp.CAP.pack(0, 0, vp.CAP.size, cfg_type, MODERN_BAR, 0, off,
                                         REGION))
        self._vendor_cap(vp.NOTIFY_CAP.pack(0, 0, vp.NOTIFY_CAP.size, vp.CAP_NOTIFY_CFG,
                                            MODERN_BAR, 0, NOTIFY_OFF, REGION, NOTIFY_MULT))
        self._pci_cfg_cap = at = self._vendor_cap(vp.PCI_CFG_CAP.pack(
            0, 0, vp.PCI_CFG_CAP.size, vp.CAP_PCI_CFG, 0, 0, 0, 0, bytes(4)))
        self.wmask[at + 4] = 0xFF                       # bar
        self.wmask[at + 8:at + 20] = b"\xff" * 12      # offset, length, pci_cfg_data
        self.add_msix(model.num_queues + 1, MSIX_BAR, 0, PBA_OFF)
        self.queues = [DeviceQueue(memory, i, model.queue_size)
                       for i in range(model.num_queues)]
        self.device_features = model.features() | 1 << ids.F_VERSION_1
        self.reset_device()

    def _vendor_cap(self, packed: bytes) -> int:
        return self.add_capability(pci.CAP_ID_VNDR, packed[2:])

    # -- state ----------------------------------------------------------------------------------
    def reset_device(self) -> None:
        self.status = 0
        self.driver_features = 0
        self.dfselect = self.gfselect = 0
        self.queue_sel = 0
        self.isr = 0
        self.generation = 0
        self.config_vector = vp.MSI_NO_VECTOR
        self.broken = ""
        self.model.reset()                 # first: it drains what is in flight
        for q in self.queues:
            q.reset()
            q.vector = vp.MSI_NO_VECTOR
        if self.msix is not None:
            self.msix.clear_pending()

    @property
    def features(self) -> int:
        """What is in effect: what the driver wrote, of what was offered (QEMU masks the
        driver's word with the host's features as it is written; the register reads back
        as written)."""
        return self.driver_features & self.device_features

    @property
    def legacy_mode(self) -> bool:
        """Driven through the legacy interface (VERSION_1 was not negotiated)."""
        return not self.features >> ids.F_VERSION_1 & 1

    def _set_status(self, value: int, legacy: bool) -> None:
        if value == 0:
            self.reset_device()
            return
        st = ids.Status
        if value & st.FEATURES_OK and not self.status & st.FEATURES_OK:
            offered = self.device_features
            ok = not self.driver_features & ~offered and (
                legacy or self.driver_features >> ids.F_VERSION_1 & 1)
            if not ok:
                log.info("virtio %s: features %#x refused (offered %#x)", self._name,
                         self.driver_features, offered)
                value &= ~st.FEATURES_OK
        old = self.status
        self.status = int(value) & 0xFF          # an int, whatever the driver wrote
        if value & st.DRIVER_OK and not old & st.DRIVER_OK and not self.broken:
            self._start()

    def _start(self) -> None:
        event_idx = bool(self.features >> ids.F_EVENT_IDX & 1)
        indirect = bool(self.features >> ids.F_INDIRECT_DESC & 1)
        try:
            for q in self.queues:
                if q.enabled or (q.desc_addr and self.legacy_mode):
                    q.activate(event_idx, indirect)
        except QueueError as e:
            self.fail(str(e))
            return
        self.model.start(self)

    def fail(self, why: str) -> None:
        """The driver broke a queue: DEVICE_NEEDS_RESET and a configuration interrupt
        (``virtio_error``); nothing more is served until the driver resets the device."""
        if self.broken:
            return
        self.broken = why
        log.warning("virtio %s: %s; device needs reset", self._name, why)
        self.status |= ids.Status.DEVICE_NEEDS_RESET
        self.config_changed()

    @property
    def _name(self) -> str:
        return f"{self.model.device_id}"

    # -- interrupts -----------------------------------------------------------------------------
    def interrupt(self, q: DeviceQueue) -> None:
        self.isr |= vp.ISR_QUEUE
        if self.msix is not None and q.vector != vp.MSI_NO_VECTOR:
            self.msix.notify(q.vector)

    def config_changed(self) -> None:
        self.generation = (self.generation + 1) & 0xFF
        self.isr |= vp.ISR_CONFIG
        if self.msix is not None and self.config_vector != vp.MSI_NO_VECTOR:
            self.msix.notify(self.config_vector)

    # -- BAR regions ----------------------------------------------------------------------------
    def region_read(self, bar: int, offset: int, size: int) -> int:
        if bar == LEGACY_BAR and self.transitional:
            return self._legacy_read(offset, size)
        if bar != MODERN_BAR:
            return 0
        if COMMON_OFF <= offset < COMMON_OFF + vp.COMMON_CFG_SIZE:
            return self._common_read(offset - COMMON_OFF, size)
        if ISR_OFF <= offset < ISR_OFF + REGION:
            isr, self.isr = self.isr, 0            # reading clears it, at any offset (QEMU)
            return isr
        if DEVICE_OFF <= offset < DEVICE_OFF + REGION:
            return self._config_read(offset - DEVICE_OFF, size)
        return 0

    def region_write(self, bar: int, offset: int, size: int, value: int) -> None:
        if bar == LEGACY_BAR and self.transitional:
            self._legacy_write(offset, size, value)
        elif bar != MODERN_BAR:
            return
        elif COMMON_OFF <= offset < COMMON_OFF + vp.COMMON_CFG_SIZE:
            self._common_write(offset - COMMON_OFF, size, value)
        elif DEVICE_OFF <= offset < DEVICE_OFF + REGION:
            self.model.config_write(offset - DEVICE_OFF, value.to_bytes(size, "little"))
        elif NOTIFY_OFF <= offset < NOTIFY_OFF + REGION:
            self._notify((offset - NOTIFY_OFF) // NOTIFY_MULT)

    def _notify(self, index: int) -> None:
        if 0 <= index < len(self.queues) and self.status & _DRIVER_OK and \
                not self.broken:
            self.queues[index].bell.ring()

    def _config_read(self, offset: int, size: int) -> int:
        data = self.model.config()
        return int.from_bytes(data[offset:offset + size].ljust(size, b"\0"), "little")

    # -- modern common configuration --------------------------------------------------------------
    def _queue(self) -> DeviceQueue | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def _common_read(self, off: int, size: int) -> int:
        if vp.COMMON_WIDTHS.get(off) != size:
            return 0                                # not a field, or not its width
        q = self._queue()
        if off == vp.C_DFSELECT:
            return self.dfselect
        if off == vp.C_DF:
            return self.device_features >> 32 * self.dfselect & 0xFFFFFFFF \
                if self.dfselect < 2 else 0
        if off == vp.C_GFSELECT:
            return self.gfselect
        if off == vp.C_GF:
            return self.driver_features >> 32 * self.gfselect & 0xFFFFFFFF \
                if self.gfselect < 2 else 0
        if off == vp.C_MSIX:
            return self.config_vector
        if off == vp.C_NUMQ:
            return len(self.queues)
        if off == vp.C_STATUS:
            return self.status
        if off == vp.C_CFGGENERATION:
            return self.generation
        if off == vp.C_Q_SELECT:
            return self.queue_sel
        if q is None:
            return 0
        if off == vp.C_Q_SIZE:
            return q.size
        if off == vp.C_Q_MSIX:
            return q.vector
        if off == vp.C_Q_ENABLE:
            return int(q.enabled)
        if off == vp.C_Q_NOFF:
            return q.index
        addr = {vp.C_Q_DESCLO: q.desc_addr, vp.C_Q_AVAILLO: q.avail_addr,
                vp.C_Q_USEDLO: q.used_addr}
        if off in addr:
            return addr[off] & 0xFFFFFFFF
        return {vp.C_Q_DESCHI: q.desc_addr, vp.C_Q_AVAILHI: q.avail_addr,
                vp.C_Q_USEDHI: q.used_addr}[off] >> 32

    def _common_write(self, off: int, size: int, value: int) -> None:
        if vp.COMMON_WIDTHS.get(off) != size:
            return
        q = self._queue()
        if off == vp.C_DFSELECT:
            self.dfselect = value
        elif off == vp.C_GFSELECT:
            self.gfselect = value
        elif off == vp.C_GF:
            if self.gfselect < 2 and not self.status & ids.Status.FEATURES_OK:
                shift = 32 * self.gfselect
                self.driver_features = self.driver_features & ~(0xFFFFFFFF << shift) | \
                    value << shift
        elif off == vp.C_MSIX:
            self.config_vector = self._vector(value)
        elif off == vp.C_STATUS:
            self._set_status(value, legacy=False)
        elif off == vp.C_Q_SELECT:
            self.queue_sel = value
        elif q is None or q.enabled:
            return                          # a live queue's registers are not writable
        elif off == vp.C_Q_SIZE:
            q.size = value
        elif off == vp.C_Q_MSIX:
            q.vector = self._vector(value)
        elif off == vp.C_Q_ENABLE:
            if value == 1:
                try:
                    q.activate(bool(self.features >> ids.F_EVENT_IDX & 1),
                               bool(self.features >> ids.F_INDIRECT_DESC & 1))
                except QueueError as e:
                    self.fail(str(e))
        elif off in (vp.C_Q_DESCLO, vp.C_Q_DESCHI, vp.C_Q_AVAILLO, vp.C_Q_AVAILHI,
                     vp.C_Q_USEDLO, vp.C_Q_USEDHI):
            name = {vp.C_Q_DESCLO: "desc_addr", vp.C_Q_DESCHI: "desc_addr",
                    vp.C_Q_AVAILLO: "avail_addr", vp.C_Q_AVAILHI: "avail_addr",
                    vp.C_Q_USEDLO: "used_addr", vp.C_Q_USEDHI: "used_addr"}[off]
            shift = 32 if off in (vp.C_Q_DESCHI, vp.C_Q_AVAILHI, vp.C_Q_USEDHI) else 0
            old = getattr(q, name)
            setattr(q, name, old & ~(0xFFFFFFFF << shift) | value << shift)

    def _vector(self, value: int) -> int:
        """A vector the function has, else NO_VECTOR (what the driver reads back to learn
        the assignment failed)."""
        n = self.msix.vectors if self.msix is not None else 0
        return value if value < n else vp.MSI_NO_VECTOR

    # -- legacy register file (BAR 0) -----------------------------------------------------------
    def _legacy_config_base(self) -> int:
        return vp.legacy_config_offset(self.msix is not None and self.msix.enabled)

    def _legacy_read(self, off: int, size: int) -> int:
        base = self._legacy_config_base()
        if off >= base:
            return self._config_read(off - base, size)
        q = self._queue()
        if off == vp.HOST_FEATURES and size == 4:
            return self.device_features & 0xFFFFFFFF        # bit 32 (VERSION_1) is out of reach
        if off == vp.GUEST_FEATURES and size == 4:
            return self.driver_features & 0xFFFFFFFF
        if off == vp.QUEUE_PFN and size == 4:
            return q.desc_addr >> vp.QUEUE_ADDR_SHIFT if q else 0
        if off == vp.QUEUE_NUM and size == 2:
            return q.max_size if q else 0
        if off == vp.QUEUE_SEL and size == 2:
            return self.queue_sel
        if off == vp.STATUS and size == 1:
            return self.status
        if off == vp.ISR and size == 1:
            isr, self.isr = self.isr, 0
            return isr
        if off == vp.MSI_CONFIG_VECTOR and size == 2:
            return self.config_vector
        if off == vp.MSI_QUEUE_VECTOR and size == 2:
            return q.vector if q else vp.MSI_NO_VECTOR
        return 0

    def _legacy_write(self, off: int, size: int, value: int) -> None:
        base = self._legacy_config_base()
        if off >= base:
            self.model.config_write(off - base, value.to_bytes(size, "little"))
            return
        q = self._queue()
        if off == vp.GUEST_FEATURES and size == 4:
            self.driver_features = value & self.device_features & 0xFFFFFFFF
        elif off == vp.QUEUE_PFN and size == 4 and q is not None:
            if value == 0:                  # QEMU: a PFN of 0 resets the whole device
                self.reset_device()
                return
            if q.enabled:
                return                      # a live queue is not moved under the device
            # the legacy layout: one contiguous ring, VRING_ALIGN 4096, the device's size
            q.size = q.max_size
            q.desc_addr = value << vp.QUEUE_ADDR_SHIFT
            avail, used, _ = ring.legacy_layout(q.size)
            q.avail_addr, q.used_addr = q.desc_addr + avail, q.desc_addr + used
            try:
                q.activate(bool(self.features >> ids.F_EVENT_IDX & 1),
                           bool(self.features >> ids.F_INDIRECT_DESC & 1))
            except QueueError as e:
                self.fail(str(e))
        elif off == vp.QUEUE_SEL and size == 2:
            self.queue_sel = value
        elif off == vp.QUEUE_NOTIFY and size == 2:
            self._notify(value)
        elif off == vp.STATUS and size == 1:
            self._set_status(value, legacy=True)
        elif off == vp.MSI_CONFIG_VECTOR and size == 2:
            self.config_vector = self._vector(value)
        elif off == vp.MSI_QUEUE_VECTOR and size == 2 and q is not None:
            q.vector = self._vector(value)

    # -- the PCI configuration access capability (VIRTIO_PCI_CAP_PCI_CFG) ------------------------
    def config_written(self, offset: int, size: int) -> None:
        """A write to ``pci_cfg_data`` is a write to the BAR window the capability names."""
        data_at = self._pci_cfg_cap + 16
        if not data_at <= offset < data_at + 4:
            return
        bar, off, length = self._cfg_window()
        if length in (1, 2, 4):
            value = int.from_bytes(self.cfg[data_at:data_at + length], "little")
            self.region_write(bar, off, length, value)

    def config_read(self, offset: int, size: int) -> int:
        data_at = self._pci_cfg_cap + 16
        if data_at <= offset < data_at + 4:
            bar, off, length = self._cfg_window()
            if length in (1, 2, 4):
                value = self.region_read(bar, off, length)
                self.cfg[data_at:data_at + 4] = value.to_bytes(4, "little")
        return super().config_read(offset, size)

    def _cfg_window(self) -> tuple[int, int, int]:
        at = self._pci_cfg_cap
        bar = self.cfg[at + 4]
        off, length = struct.unpack_from("<II", self.cfg, at + 8)
        return bar, off, length
