"""virtio drivers that bind, negotiate and set up their queues, with no data path (issue:
net, console, rng, balloon): ``virtio_net``, ``virtio_console``, ``virtio_rng``,
``virtio_balloon``. What the device returns on a queue is taken off the used ring and
dropped, so the rings stay consistent."""

from __future__ import annotations

import logging

import trio

from vbusfs.drivers.virtio.core import VirtioDevice, VirtioDriver
from vbusfs.drivers.virtio.virtqueue import DriverQueue, QueueBroken
from vbusfs.platform.doorbell import Doorbell
from vbusfs.protocols.virtio import ids

log = logging.getLogger(__name__)

__all__ = ["SimpleDriver", "simple_drivers"]

VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_STATUS = 16


class SimpleDriver(VirtioDriver):
    def __init__(self, name: str, device_id: int, queues: int,
                 feature_table: tuple[int, ...] = ()) -> None:
        self.name = name
        self.module = name
        self.device_ids = frozenset({device_id})
        self.feature_table = feature_table
        self.nqueues = queues

    async def setup(self, dev: VirtioDevice) -> None:
        bells = [Doorbell(f"{dev.name}-vq{i}") for i in range(self.nqueues)]
        config = Doorbell(f"{dev.name}-config")
        queues = dev.transport.find_queues(bells, config, event_idx=dev.has(ids.F_EVENT_IDX),
                                           indirect=dev.has(ids.F_INDIRECT_DESC))
        for bell, q in zip(bells, queues, strict=True):
            bell.handler = lambda q=q: self._drain(q)
        dev.drvdata = [*bells, config]

    @staticmethod
    def _drain(q: DriverQueue) -> bool:
        try:
            while q.get_used() is not None:
                pass
            q.enable_cb()
        except QueueBroken as e:
            log.error("virtio: %s", e)
        return True

    @staticmethod
    def _bells(dev: VirtioDevice) -> list[Doorbell]:
        bells = dev.drvdata
        return [b for b in bells if isinstance(b, Doorbell)] if isinstance(bells, list) else []

    async def serve(self, dev: VirtioDevice) -> None:
        async with trio.open_nursery() as n:
            for bell in self._bells(dev):
                n.start_soon(self._wait, bell)

    @staticmethod
    async def _wait(bell: Doorbell) -> None:
        while True:
            await bell.wait()
            if bell.handler is not None:
                bell.handler()

    async def teardown(self, dev: VirtioDevice) -> None:
        for bell in self._bells(dev):
            bell.handler = None
        dev.drvdata = None


def simple_drivers() -> list[SimpleDriver]:
    """A fresh set of the drivers without a data path."""
    return [
        SimpleDriver("virtio_net", ids.DeviceId.NET, 2, (VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS)),
        SimpleDriver("virtio_console", ids.DeviceId.CONSOLE, 2),
        SimpleDriver("virtio_rng", ids.DeviceId.RNG, 1),
        SimpleDriver("virtio_balloon", ids.DeviceId.BALLOON, 2),
    ]
