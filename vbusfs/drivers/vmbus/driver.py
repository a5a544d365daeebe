"""What a VMBus device driver is (Linux ``struct hv_driver``): it matches devices by class
GUID (its static ids, from reference/sysfs.md §1.5, and the dynamic ids written to its
``new_id``), opens the channel with its own ring sizes in ``probe``, serves it, and closes it
in ``remove`` (``vmbus_open``/``vmbus_close`` from a driver's probe and remove)."""

from __future__ import annotations

import logging
import uuid

import trio

from vbusfs.drivers.vmbus.device import VmbusDevice
from vbusfs.platform.memory import PAGE_SIZE
from vbusfs.platform.vmbus.ring_endpoint import ChannelBroken, RingEndpoint
from vbusfs.protocols.vmbus import messages as m

log = logging.getLogger(__name__)

__all__ = ["VmbusDriver", "ring_size"]


def ring_size(payload_bytes: int) -> int:
    """VMBUS_RING_SIZE: one header page plus the payload rounded up to pages."""
    return PAGE_SIZE + (payload_bytes + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE


class VmbusDriver:
    """A driver whose device protocol is not emulated: it opens the channel as the Linux
    driver would (ring sizes modelled on its defaults) and drains what arrives. Drivers that
    speak their protocol override :meth:`serve`."""

    def __init__(self, name: str, send_ring: int, recv_ring: int,
                 module: str | None = None) -> None:
        self.name = name
        self.module = module or name
        self.send_ring = send_ring
        self.recv_ring = recv_ring
        #: the id_table: every class whose Linux driver this is (reference/sysfs.md §1.5)
        self.class_ids = frozenset(c.guid for c in m.DEVICE_CLASSES if c.driver == name)
        self.dynids: set[uuid.UUID] = set()      # new_id / remove_id
        self._serving: dict[str, tuple[trio.CancelScope, trio.Event]] = {}

    def match(self, dev: VmbusDevice) -> bool:
        """``hv_vmbus_get_id``: the dynamic ids first, then the static ones."""
        return dev.offer.if_type in self.dynids or dev.offer.if_type in self.class_ids

    async def probe(self, dev: VmbusDevice, *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await dev.channel.open(self.send_ring, self.recv_ring)
        ep = dev.channel.endpoint
        assert ep is not None
        stopped = trio.Event()
        try:
            with trio.CancelScope() as scope:
                self._serving[dev.name] = (scope, stopped)
                task_status.started()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(ep.run)
                    try:
                        await self.serve(dev, ep)
                    except ChannelBroken as e:
                        log.error("vmbus: %s: %s", dev.name, e)
        finally:
            self._serving.pop(dev.name, None)
            stopped.set()

    async def serve(self, dev: VmbusDevice, ep: RingEndpoint) -> None:
        while True:
            await ep.receive()

    async def remove(self, dev: VmbusDevice) -> None:
        """Stop serving, then ``vmbus_close``."""
        serving = self._serving.get(dev.name)
        if serving is not None:
            scope, stopped = serving
            scope.cancel()
            await stopped.wait()
        await dev.channel.close()
