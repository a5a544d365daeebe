"""virtio-pci, the guest half (Linux ``drivers/virtio/virtio_pci_{common,modern,legacy}.c``,
``virtio_pci_modern_dev.c``; virtio 1.x §4.1): a PCI driver that binds virtio functions
(vendor 0x1af4, device 0x1000–0x107f), finds the transport, and registers a virtio device.

* **Modern** (tried first, as Linux does): the vendor capabilities give the common
  configuration, notification, ISR and device configuration regions; each must lie inside a
  memory BAR the function has, or the modern transport is refused. The virtio device id is
  ``device - 0x1040`` for modern ids, else the subsystem device.
* **Legacy** (no usable capabilities, a transitional id, or ``force_legacy`` as Linux's
  ``virtio_pci.force_legacy``): the I/O register file in BAR 0; the device id is the
  subsystem device; queues are one contiguous ring whose page frame goes in QUEUE_PFN.

Interrupts are MSI-X, one vector for configuration changes and one per queue
(``vp_find_vqs_msix``); a vector the device does not take back (it reads NO_VECTOR) fails the
set-up. Notifications are writes to the queue's notify address (modern) or QUEUE_NOTIFY.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable

import trio

from vbusfs.drivers.pci.device import PciDev
from vbusfs.drivers.virtio.core import VirtioBus, VirtioDevice
from vbusfs.drivers.virtio.virtqueue import DriverQueue
from vbusfs.platform.doorbell import Doorbell
from vbusfs.platform.memory import PAGE_SIZE, GuestMemory
from vbusfs.protocols import pci
from vbusfs.protocols.virtio import ids
from vbusfs.protocols.virtio import pci as vp

log = logging.getLogger(__name__)

__all__ = ["VirtioPciDriver", "ModernTransport", "LegacyTransport"]


class _Msix:
    """The vectors of one function: config first, then one per queue."""

    def __init__(self, pdev: PciDev) -> None:
        self.pdev = pdev
        self.enabled = False

    def enable(self, config_bell: Doorbell, bells: list[Doorbell]) -> None:
        if not self.pdev.enable_msix([config_bell, *bells]):
            raise OSError(errno.ENODEV, f"{self.pdev.name}: no MSI-X with "
                          f"{len(bells) + 1} vectors")
        self.enabled = True

    def disable(self) -> None:
        if self.enabled:
            self.pdev.disable_msix()
            self.enabled = False


class ModernTransport:
    modern = True

    def __init__(self, pdev: PciDev, memory: GuestMemory) -> None:
        self.pdev = pdev
        self.memory = memory
        self._notify_cap = 0
        caps = self._caps()
        missing = [n for n, t in (("common", vp.CAP_COMMON_CFG), ("notify", vp.CAP_NOTIFY_CFG),
                                  ("isr", vp.CAP_ISR_CFG)) if t not in caps]
        if missing:
            raise OSError(errno.ENODEV, f"{pdev.name}: no modern {', '.join(missing)} "
                          "capability")
        self.common = caps[vp.CAP_COMMON_CFG][:2]
        self.isr = caps[vp.CAP_ISR_CFG][:2]
        self.device = caps[vp.CAP_DEVICE_CFG][:2] if vp.CAP_DEVICE_CFG in caps else None
        self.device_len = caps[vp.CAP_DEVICE_CFG][2] if vp.CAP_DEVICE_CFG in caps else 0
        nbar, noff, nlen = caps[vp.CAP_NOTIFY_CFG][:3]
        self.notify = (nbar, noff, nlen)
        at = self._notify_cap
        self.notify_mult = pdev.read_config(at + 16, 4)
        self.msix = _Msix(pdev)
        self.queues: list[DriverQueue] = []

    def _caps(self) -> dict[int, tuple[int, int, int]]:
        """The first valid capability of each type (``virtio_pci_find_capability``)."""
        found: dict[int, tuple[int, int, int]] = {}
        d = self.pdev
        for cap_id, at in d.capabilities():
            if cap_id != pci.CAP_ID_VNDR or d.read_config(at + 2, 1) < vp.CAP.size:
                continue
            cfg_type, bar = d.read_config(at + 3, 1), d.read_config(at + 4, 1)
            off, length = d.read_config(at + 8, 4), d.read_config(at + 12, 4)
            if cfg_type in found or cfg_type == vp.CAP_PCI_CFG or bar >= 6:
                continue
            r = d.resources[bar]
            if not r.flags or r.io or off + length > r.size or length == 0:
                log.info("%s: virtio capability %d outside BAR %d; ignored", d.name,
                         cfg_type, bar)
                continue
            if cfg_type == vp.CAP_NOTIFY_CFG:
                if d.read_config(at + 2, 1) < vp.NOTIFY_CAP.size:
                    continue
                self._notify_cap = at
            found[cfg_type] = (bar, off, length)
        return found

    # -- common configuration ---------------------------------------------------------------
    def _cr(self, field: int, size: int) -> int:
        bar, off = self.common
        return self.pdev.bar_read(bar, off + field, size)

    def _cw(self, field: int, size: int, value: int) -> None:
        bar, off = self.common
        self.pdev.bar_write(bar, off + field, size, value)

    def get_status(self) -> int:
        return self._cr(vp.C_STATUS, 1)

    def set_status(self, status: int) -> None:
        self._cw(vp.C_STATUS, 1, status)

    def reset(self) -> None:
        """Write 0 and wait until it reads back 0 (``vp_modern_set_status`` + poll)."""
        self._cw(vp.C_STATUS, 1, 0)
        for _ in range(1000):
            if self._cr(vp.C_STATUS, 1) == 0:
                return
        raise OSError(errno.EIO, f"{self.pdev.name}: the device does not reset")

    def get_features(self) -> int:
        self._cw(vp.C_DFSELECT, 4, 0)
        low = self._cr(vp.C_DF, 4)
        self._cw(vp.C_DFSELECT, 4, 1)
        return low | self._cr(vp.C_DF, 4) << 32

    def set_features(self, features: int) -> None:
        self._cw(vp.C_GFSELECT, 4, 0)
        self._cw(vp.C_GF, 4, features & 0xFFFFFFFF)
        self._cw(vp.C_GFSELECT, 4, 1)
        self._cw(vp.C_GF, 4, features >> 32 & 0xFFFFFFFF)

    def generation(self) -> int:
        return self._cr(vp.C_CFGGENERATION, 1)

    def config_read(self, offset: int, size: int) -> int:
        if self.device is None or offset + size > self.device_len:
            raise OSError(errno.EINVAL, f"{self.pdev.name}: no config byte {offset}")
        bar, off = self.device
        return self.pdev.bar_read(bar, off + offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        if self.device is None or offset + size > self.device_len:
            raise OSError(errno.EINVAL, f"{self.pdev.name}: no config byte {offset}")
        bar, off = self.device
        self.pdev.bar_write(bar, off + offset, size, value)

    # -- queues -------------------------------------------------------------------------------
    def find_queues(self, bells: list[Doorbell], config_bell: Doorbell, event_idx: bool,
                    indirect: bool) -> list[DriverQueue]:
        """``vp_modern_find_vqs`` with a vector per queue."""
        if len(bells) > self._cr(vp.C_NUMQ, 2):
            raise OSError(errno.ENOENT, f"{self.pdev.name}: the device has only "
                          f"{self._cr(vp.C_NUMQ, 2)} queues")
        self.msix.enable(config_bell, bells)
        self._cw(vp.C_MSIX, 2, 0)
        if self._cr(vp.C_MSIX, 2) == vp.MSI_NO_VECTOR:
            raise OSError(errno.EBUSY, f"{self.pdev.name}: the config vector was refused")
        try:
            for i in range(len(bells)):
                self._cw(vp.C_Q_SELECT, 2, i)
                size = self._cr(vp.C_Q_SIZE, 2)
                if size == 0 or self._cr(vp.C_Q_ENABLE, 2):
                    raise OSError(errno.ENOENT, f"{self.pdev.name}: queue {i} is not "
                                  "available")
                noff = self._cr(vp.C_Q_NOFF, 2)
                q = DriverQueue(self.memory, i, size, legacy=False, event_idx=event_idx,
                                indirect=indirect, notify=self._notifier(i, noff))
                self.queues.append(q)
                self._cw(vp.C_Q_SIZE, 2, size)
                for lo, addr in ((vp.C_Q_DESCLO, q.desc_addr), (vp.C_Q_AVAILLO, q.avail_addr),
                                 (vp.C_Q_USEDLO, q.used_addr)):
                    self._cw(lo, 4, addr & 0xFFFFFFFF)
                    self._cw(lo + 4, 4, addr >> 32)
                self._cw(vp.C_Q_MSIX, 2, i + 1)
                if self._cr(vp.C_Q_MSIX, 2) != i + 1:
                    raise OSError(errno.EBUSY, f"{self.pdev.name}: queue {i}'s vector was "
                                  "refused")
                self._cw(vp.C_Q_ENABLE, 2, 1)
        except BaseException:
            self.del_queues()
            raise
        return list(self.queues)

    def _notifier(self, index: int, noff: int) -> Callable[[], None]:
        bar, off, length = self.notify
        at = off + noff * self.notify_mult
        if at + 2 > off + length:
            raise OSError(errno.EINVAL, f"{self.pdev.name}: queue {index}'s notify offset "
                          "is outside the notify region")
        addr = self.pdev.resources[bar].start + at
        write = self.pdev.root.write

        def notify() -> None:
            write(False, addr, 2, index)
        return notify

    def del_queues(self) -> None:
        self.msix.disable()
        for q in self.queues:
            q.release()
        self.queues = []


class LegacyTransport:
    modern = False

    def __init__(self, pdev: PciDev, memory: GuestMemory) -> None:
        r = pdev.resources[0]
        if not r.flags or not r.io or r.size < 0x14:
            raise OSError(errno.ENODEV, f"{pdev.name}: no legacy I/O BAR 0")
        self.pdev = pdev
        self.memory = memory
        self.msix = _Msix(pdev)
        self.queues: list[DriverQueue] = []

    def _r(self, off: int, size: int) -> int:
        return self.pdev.bar_read(0, off, size)

    def _w(self, off: int, size: int, value: int) -> None:
        self.pdev.bar_write(0, off, size, value)

    def get_status(self) -> int:
        return self._r(vp.STATUS, 1)

    def set_status(self, status: int) -> None:
        self._w(vp.STATUS, 1, status)

    def reset(self) -> None:
        self._w(vp.STATUS, 1, 0)
        self._r(vp.STATUS, 1)           # flush the write (vp_legacy_reset)

    def get_features(self) -> int:
        return self._r(vp.HOST_FEATURES, 4)

    def set_features(self, features: int) -> None:
        self._w(vp.GUEST_FEATURES, 4, features & 0xFFFFFFFF)

    def generation(self) -> int:
        return 0

    def _config_base(self) -> int:
        return vp.legacy_config_offset(self.msix.enabled)

    def config_read(self, offset: int, size: int) -> int:
        at = self._config_base() + offset
        if at + size > self.pdev.resources[0].size:
            raise OSError(errno.EINVAL, f"{self.pdev.name}: no config byte {offset}")
        return self._r(at, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        at = self._config_base() + offset
        if at + size > self.pdev.resources[0].size:
            raise OSError(errno.EINVAL, f"{self.pdev.name}: no config byte {offset}")
        self._w(at, size, value)

    def find_queues(self, bells: list[Doorbell], config_bell: Doorbell, event_idx: bool,
                    indirect: bool) -> list[DriverQueue]:
        self.msix.enable(config_bell, bells)
        self._w(vp.MSI_CONFIG_VECTOR, 2, 0)
        if self._r(vp.MSI_CONFIG_VECTOR, 2) == vp.MSI_NO_VECTOR:
            raise OSError(errno.EBUSY, f"{self.pdev.name}: the config vector was refused")
        try:
            for i in range(len(bells)):
                self._w(vp.QUEUE_SEL, 2, i)
                size = self._r(vp.QUEUE_NUM, 2)
                if size == 0 or self._r(vp.QUEUE_PFN, 4):
                    raise OSError(errno.ENOENT, f"{self.pdev.name}: queue {i} is not "
                                  "available")
                q = DriverQueue(self.memory, i, size, legacy=True, event_idx=event_idx,
                                indirect=indirect, notify=self._notifier(i))
                self.queues.append(q)
                self._w(vp.MSI_QUEUE_VECTOR, 2, i + 1)
                if self._r(vp.MSI_QUEUE_VECTOR, 2) != i + 1:
                    raise OSError(errno.EBUSY, f"{self.pdev.name}: queue {i}'s vector was "
                                  "refused")
                self._w(vp.QUEUE_PFN, 4, q.desc_addr // PAGE_SIZE)
        except BaseException:
            self.del_queues()
            raise
        return list(self.queues)

    def _notifier(self, index: int) -> Callable[[], None]:
        addr = self.pdev.resources[0].start + vp.QUEUE_NOTIFY
        write = self.pdev.root.write

        def notify() -> None:
            write(True, addr, 2, index)
        return notify

    def del_queues(self) -> None:
        for i in range(len(self.queues)):
            self._w(vp.QUEUE_SEL, 2, i)
            self._w(vp.QUEUE_PFN, 4, 0)
        self.msix.disable()
        for q in self.queues:
            q.release()
        self.queues = []


class VirtioPciDriver:
    """``virtio-pci`` (module ``virtio_pci``)."""

    name = "virtio-pci"
    module = "virtio_pci"

    def __init__(self, memory: GuestMemory, bus: VirtioBus, force_legacy: bool = False) -> None:
        self.memory = memory
        self.bus = bus
        self.force_legacy = force_legacy

    def match(self, dev: PciDev) -> bool:
        return dev.vendor == ids.VENDOR and ids.TRANSITIONAL_BASE <= dev.device <= 0x107F

    async def probe(self, dev: PciDev, *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        dev.enable()
        try:
            transport: ModernTransport | LegacyTransport
            if self.force_legacy and dev.device < ids.MODERN_BASE:
                transport = LegacyTransport(dev, self.memory)
            else:
                try:
                    transport = ModernTransport(dev, self.memory)
                except OSError:
                    if dev.device >= ids.MODERN_BASE:
                        raise
                    transport = LegacyTransport(dev, self.memory)
            device_id = dev.device - ids.MODERN_BASE if dev.device >= ids.MODERN_BASE and \
                transport.modern else dev.subsystem_device
            vdev = VirtioDevice(device_id, dev.subsystem_vendor, transport)
            dev.drvdata = vdev
            assert dev.dir is not None
            await self.bus.add(vdev, dev.dir)
        except BaseException:
            dev.disable()
            raise
        task_status.started()
        await trio.sleep_forever()

    async def remove(self, dev: PciDev) -> None:
        vdev = dev.drvdata
        if isinstance(vdev, VirtioDevice):
            await self.bus.remove(vdev)
            vdev.transport.reset()
            vdev.transport.del_queues()
        dev.drvdata = None
        dev.disable()
