"""The virtio bus and core (Linux ``drivers/virtio/virtio.c``): devices named ``virtioN`` in
probe order (one index space for every transport, lowest free first), their sysfs
attributes (reference/sysfs.md §3.1), drivers matched by device id (``virtio:d%08Xv%08X``
modalias), and the probe sequence every driver goes through (``virtio_dev_probe``):
ACKNOWLEDGE at registration, DRIVER, the features both sides have (the driver's table plus
the ring's own: VERSION_1, INDIRECT_DESC, EVENT_IDX), FEATURES_OK checked by reading it back
(modern), the driver's own set-up, then DRIVER_OK. A probe that fails sets FAILED. Removing
resets the device and leaves ACKNOWLEDGE, as Linux does.
"""

from __future__ import annotations

import errno
import logging
from typing import Protocol

import trio

from vbusfs.drivers.core import DriverTable
from vbusfs.drivers.virtio.virtqueue import DriverQueue
from vbusfs.platform.doorbell import Doorbell
from vbusfs.protocols.virtio import ids
from vbusfs.sysfs import Attr, Directory, Group, Tree, add_group
from vbusfs.sysfs.driver_core import Bus

log = logging.getLogger(__name__)

__all__ = ["VirtioTransport", "VirtioDevice", "VirtioBus", "VirtioDriver", "FEATURE_BITS"]

#: how many feature bits ``features`` shows (64 on x86_64 since 3.19; 128 on the newest
#: kernels, reference/sysfs.md §3.1 — vbusfs shows what the real guest capture shows)
FEATURE_BITS = 128
#: what the virtio ring offers every driver (vring_transport_features)
RING_FEATURES = (ids.F_INDIRECT_DESC, ids.F_EVENT_IDX, ids.F_VERSION_1)


class VirtioTransport(Protocol):
    """What a virtio transport (virtio-pci modern or legacy) gives the core."""

    modern: bool

    def get_status(self) -> int: ...
    def set_status(self, status: int) -> None: ...
    def reset(self) -> None: ...
    def get_features(self) -> int: ...
    def set_features(self, features: int) -> None: ...
    def generation(self) -> int: ...
    def config_read(self, offset: int, size: int) -> int: ...
    def config_write(self, offset: int, size: int, value: int) -> None: ...
    def find_queues(self, bells: list[Doorbell], config_bell: Doorbell, event_idx: bool,
                    indirect: bool) -> list[DriverQueue]: ...
    def del_queues(self) -> None: ...


class VirtioDevice:
    def __init__(self, device_id: int, vendor: int, transport: VirtioTransport) -> None:
        self.device_id = device_id
        self.vendor = vendor
        self.transport = transport
        self.index = -1
        self.name = ""
        self.features = 0                 # negotiated
        self.driver: str | None = None
        self.dir: Directory | None = None
        self.drvdata: object = None
        self.config_changes = 0

    def add_status(self, bits: int) -> None:
        self.transport.set_status(self.transport.get_status() | bits)

    @property
    def status(self) -> int:
        return self.transport.get_status()

    def has(self, bit: int) -> bool:
        return bool(self.features >> bit & 1)

    def read_config(self, fields: list[tuple[int, int]]) -> list[int]:
        """Read config fields (offset, size) as one consistent snapshot: again while the
        generation moves (``virtio_cread_bytes``)."""
        for _ in range(100):
            gen = self.transport.generation()
            values = [self.transport.config_read(off, size) for off, size in fields]
            if self.transport.generation() == gen:
                return values
        raise OSError(errno.EIO, f"{self.name}: configuration never stopped changing")


def _features(d: VirtioDevice) -> str:
    return "".join("1" if d.features >> i & 1 else "0" for i in range(FEATURE_BITS)) + "\n"


DEVICE_GROUP: Group[VirtioDevice] = Group([
    Attr("device", lambda d: f"0x{d.device_id:04x}\n", static=True),
    Attr("vendor", lambda d: f"0x{d.vendor:04x}\n", static=True),
    Attr("status", lambda d: f"0x{d.status:08x}\n"),
    Attr("modalias", lambda d: ids.virtio_modalias(d.device_id, d.vendor) + "\n", static=True),
    Attr("features", _features),
])


class VirtioDriver:
    """A virtio driver: its id table and feature table; subclasses set the device up in
    :meth:`setup` and undo it in :meth:`teardown`."""

    name = ""
    module = ""
    device_ids: frozenset[int] = frozenset()
    feature_table: tuple[int, ...] = ()

    def match(self, dev: VirtioDevice) -> bool:
        return dev.device_id in self.device_ids

    async def probe(self, dev: VirtioDevice, *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            dev.add_status(ids.Status.DRIVER)
            self._negotiate(dev)
            await self.setup(dev)
            if not dev.status & ids.Status.DRIVER_OK:
                dev.add_status(ids.Status.DRIVER_OK)       # virtio_device_ready
        except BaseException:
            dev.add_status(ids.Status.FAILED)
            raise
        task_status.started()
        await self.serve(dev)

    def _negotiate(self, dev: VirtioDevice) -> None:
        t = dev.transport
        offered = t.get_features()
        wanted = sum(1 << b for b in (*self.feature_table, *RING_FEATURES))
        features = offered & wanted
        if not t.modern:
            features &= 0xFFFFFFFF
        elif not features >> ids.F_VERSION_1 & 1:
            raise OSError(errno.ENODEV, f"{dev.name}: a modern device must offer VERSION_1")
        t.set_features(features)
        dev.features = features
        if t.modern:
            dev.add_status(ids.Status.FEATURES_OK)
            if not dev.status & ids.Status.FEATURES_OK:
                raise OSError(errno.ENODEV, f"{dev.name}: the device did not accept our "
                              f"features {features:#x}")

    async def setup(self, dev: VirtioDevice) -> None:
        """The driver's probe proper (find queues, read config, create what it exports)."""

    async def serve(self, dev: VirtioDevice) -> None:
        await trio.sleep_forever()

    async def teardown(self, dev: VirtioDevice) -> None:
        """Stop using the device (before it is reset)."""

    async def remove(self, dev: VirtioDevice) -> None:
        await self.teardown(dev)
        dev.transport.reset()
        dev.transport.del_queues()
        dev.add_status(ids.Status.ACKNOWLEDGE)


class VirtioBus:
    def __init__(self, tree: Tree) -> None:
        self.tree = tree
        self.sysfs = Bus(tree, "virtio")
        self.drivers = DriverTable[VirtioDevice](self.sysfs)
        self.devices: dict[str, VirtioDevice] = {}
        self._nursery: trio.Nursery | None = None
        self.probe_failures: list[str] = []

    def register(self, drv: VirtioDriver) -> None:
        """``register_virtio_driver``."""
        self.drivers.register(drv)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def _free_index(self) -> int:
        used = {d.index for d in self.devices.values()}
        return next(i for i in range(len(used) + 1) if i not in used)

    async def add(self, dev: VirtioDevice, parent: Directory) -> None:
        """``register_virtio_device``: name it, publish it, ACKNOWLEDGE, and probe the
        driver that matches; returns once that driver is ready (or has failed)."""
        assert self._nursery is not None, "the virtio bus is not running"
        dev.index = self._free_index()
        dev.name = f"virtio{dev.index}"
        dev.transport.reset()
        dev.add_status(ids.Status.ACKNOWLEDGE)
        dev.dir = parent.mkdir(dev.name)
        self.devices[dev.name] = dev
        self.sysfs.add_device(dev.dir, lambda: self._uevent(dev))
        add_group(dev.dir, dev, DEVICE_GROUP)
        drv = self.drivers.match(dev)
        if drv is None:
            return
        try:
            await self.drivers.bind(self._nursery, dev, drv)
        except OSError as e:
            self.probe_failures.append(f"{dev.name} ({e})")
            log.error("%s %s: probe failed: %s", drv.name, dev.name, e)

    async def remove(self, dev: VirtioDevice) -> None:
        """``unregister_virtio_device``."""
        await self.drivers.unbind(dev)
        if dev.name in self.sysfs.devices_by_name:
            self.sysfs.remove_device(dev.name)
        self.devices.pop(dev.name, None)

    @staticmethod
    def _uevent(dev: VirtioDevice) -> str:
        lines = [f"DRIVER={dev.driver}"] if dev.driver else []
        lines.append(f"MODALIAS={ids.virtio_modalias(dev.device_id, dev.vendor)}")
        return "\n".join(lines) + "\n"
