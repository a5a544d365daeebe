"""virtio devices that enumerate and negotiate with their real identities and configuration
spaces, without a data path (issue: net, console, rng, balloon): the configuration layouts
are ``virtio_net.h``, ``virtio_console.h`` and ``virtio_balloon.h``.

Their queues follow the one rule a device must: buffers the driver offers to the device to
fill (receive queues) are left available, as a device with nothing to say leaves them;
buffers the driver sends (transmit queues) are consumed and returned at once. virtio-rng
serves bytes: each device-writable buffer it gets back is filled from ``os.urandom``.
"""

from __future__ import annotations

import logging
import os
import struct

from backends.virtio.transport import VirtioPciFunction
from backends.virtio.virtqueue import QueueError
from vbusfs.protocols.virtio import ids

log = logging.getLogger(__name__)

__all__ = ["SimpleDevice", "net_device", "console_device", "rng_device", "balloon_device"]

VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_S_LINK_UP = 1
VIRTIO_NET_CONFIG = struct.Struct("<6sHHH")       # mac, status, max_virtqueue_pairs, mtu
VIRTIO_CONSOLE_CONFIG = struct.Struct("<HHII")    # cols, rows, max_nr_ports, emerg_wr
VIRTIO_BALLOON_CONFIG = struct.Struct("<IIII")    # num_pages, actual, free_page_hint, poison


class SimpleDevice:
    """A device with ``queues``, each either filled by the device (``fill``: rng), kept for
    later (``hold``: receive queues) or drained (``drain``: transmit queues)."""

    queue_size = 256

    def __init__(self, device_id: int, features: int, config: bytes,
                 queues: tuple[str, ...]) -> None:
        self.device_id = device_id
        self._features = features
        self._config = config
        self.kinds = queues
        self.num_queues = len(queues)
        self.fn: VirtioPciFunction | None = None
        self.served = 0

    def features(self) -> int:
        return self._features | 1 << ids.F_EVENT_IDX | 1 << ids.F_INDIRECT_DESC

    def config(self) -> bytes:
        return self._config

    def config_write(self, offset: int, data: bytes) -> None:
        """Only the balloon's ``actual`` is the driver's to write; the rest is read-only."""

    def start(self, fn: VirtioPciFunction) -> None:
        self.fn = fn
        for q, kind in zip(fn.queues, self.kinds, strict=True):
            if kind != "hold":
                q.bell.handler = self.pump

    def reset(self) -> None:
        if self.fn is not None:
            for q in self.fn.queues:
                q.bell.handler = None
        self.fn = None

    def pump(self) -> bool:
        fn = self.fn
        if fn is None or fn.broken:
            return True
        try:
            for q, kind in zip(fn.queues, self.kinds, strict=True):
                if kind == "hold" or not q.ready:
                    continue
                while (elem := q.pop()) is not None:
                    written = 0
                    if kind == "fill":
                        for buf in elem.into:
                            buf[:] = os.urandom(len(buf))
                            written += len(buf)
                    q.push(elem.head, written)
                    self.served += 1
                q.notify_on()
                if q.flush():
                    fn.interrupt(q)
        except QueueError as e:
            fn.fail(str(e))
        return True


def net_device(mac: bytes) -> SimpleDevice:
    cfg = VIRTIO_NET_CONFIG.pack(mac, VIRTIO_NET_S_LINK_UP, 1, 1500)
    return SimpleDevice(ids.DeviceId.NET, 1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_STATUS,
                        cfg, ("hold", "drain"))


def console_device() -> SimpleDevice:
    return SimpleDevice(ids.DeviceId.CONSOLE, 0, VIRTIO_CONSOLE_CONFIG.pack(0, 0, 1, 0),
                        ("hold", "drain"))


def rng_device() -> SimpleDevice:
    return SimpleDevice(ids.DeviceId.RNG, 0, b"", ("fill",))


def balloon_device() -> SimpleDevice:
    return SimpleDevice(ids.DeviceId.BALLOON, 0, VIRTIO_BALLOON_CONFIG.pack(0, 0, 0, 0),
                        ("drain", "drain"))
