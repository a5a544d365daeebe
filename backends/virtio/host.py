"""The machine's PCI functions, host side: the 440FX host bridge at 00:00.0 and one virtio
function per configured device, attached to the root complex in their slots, with their
image files and executors (the one explicit map from config types to device models is
:func:`build`).

:meth:`PciHost.run` opens every image first (a locked or missing image fails the start,
naming it), attaches the functions, and keeps one task per queue as the fallback for
notifications whose direct handler could not finish; when it ends, the functions leave
their slots and every executor and image is closed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from backends.pci.host_bridge import HostBridge
from backends.storage.executor import ImageExecutor
from backends.storage.raw import RawImage
from backends.virtio.blk import BlkParams, VirtioBlkDevice
from backends.virtio.simple import balloon_device, console_device, net_device, rng_device
from backends.virtio.transport import VirtioModel, VirtioPciFunction
from vbusfs.config.pci import PciConfig, PciDeviceConfig
from vbusfs.platform.doorbell import Doorbell
from vbusfs.platform.memory import GuestMemory
from vbusfs.platform.pci import PciRoot
from vbusfs.protocols.virtio import ids

log = logging.getLogger(__name__)

__all__ = ["PciHost", "build"]


def _blk(dev: PciDeviceConfig, opened: list[Callable[[], None]]) -> VirtioModel:
    assert dev.image is not None
    flushable = "flush" in dev.features
    image = RawImage(dev.image, size=dev.size, readonly=dev.readonly, sync=not flushable,
                     sector_size=dev.sector_size)
    opened.append(image.close)
    ex = ImageExecutor(image, f"virtio-blk {dev.slot:02x}.0")
    opened.insert(0, ex.close)                  # the thread stops before the image closes
    phys = 4096 if "topology" in dev.features and dev.sector_size < 4096 else \
        dev.sector_size
    return VirtioBlkDevice(ex, BlkParams(
        sector_size=dev.sector_size, physical_block_size=phys, serial=dev.serial,
        readonly=dev.readonly, features=dev.features, indirect="indirect" in dev.features,
        event_idx="event-idx" in dev.features, num_queues=dev.num_queues,
        queue_size=dev.queue_size))


def build(dev: PciDeviceConfig, opened: list[Callable[[], None]]) -> VirtioModel:
    """The device model a ``[[pci.device]]`` asks for; what must be closed later is put in
    ``opened``."""
    if dev.type == "virtio-blk":
        return _blk(dev, opened)
    if dev.type == "virtio-net":
        return net_device(dev.mac)
    if dev.type == "virtio-console":
        return console_device()
    if dev.type == "virtio-rng":
        return rng_device()
    if dev.type == "virtio-balloon":
        return balloon_device()
    raise ValueError(f"no model for {dev.type}")     # config validation prevents it


class PciHost:
    def __init__(self, root: PciRoot, memory: GuestMemory, config: PciConfig) -> None:
        self.root = root
        self.memory = memory
        self.config = config
        self.functions: dict[int, VirtioPciFunction] = {}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        opened: list[Callable[[], None]] = []
        try:
            self.root.attach(0, 0, HostBridge(self.root.msi))
            for dev in self.config.devices:
                vtype = ids.type_by_name(dev.type)
                assert vtype is not None
                try:
                    model = build(dev, opened)
                except OSError as e:
                    raise OSError(e.errno, f"{dev.key}: {e.strerror or e}") from None
                fn = VirtioPciFunction(self.root.msi, self.memory, model, vtype,
                                       dev.transitional)
                self.root.attach(dev.slot, 0, fn)
                self.functions[dev.slot] = fn
            async with trio.open_nursery() as nursery:
                for fn in self.functions.values():
                    for q in fn.queues:
                        nursery.start_soon(self._fallback, fn, q.bell)
                task_status.started()
        finally:
            for slot in list(self.functions):
                self.root.detach(slot, 0)
            self.root.detach(0, 0)
            for close in opened:
                close()

    @staticmethod
    async def _fallback(fn: VirtioPciFunction, bell: Doorbell) -> None:
        """A device model that fails on what a driver gave it stops that function (its
        driver sees DEVICE_NEEDS_RESET), never the host."""
        while True:
            await bell.wait()
            if bell.handler is not None:
                try:
                    bell.handler()
                except Exception as e:
                    log.exception("virtio %s: the device model failed", bell.name)
                    fn.fail(f"internal error: {e!r}")
