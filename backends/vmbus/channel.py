"""One offered channel as the host sees it, what the config asks the host to offer, and
what a device model on a channel is.

Below both the VMBus server (host.py) and the device models (devices.py), so neither imports
the other: the server runs whatever :class:`DeviceModel` a :class:`ChannelSpec` names.
"""

from __future__ import annotations

import errno
import uuid
from dataclasses import dataclass
from typing import Protocol

import trio

from vbusfs.platform.doorbell import Doorbell
from vbusfs.platform.memory import GuestMemory
from vbusfs.platform.vmbus.ring_endpoint import RingEndpoint
from vbusfs.protocols.vmbus import messages as m
from vbusfs.protocols.vmbus.ring import Packet

__all__ = ["DeviceModel", "ChannelSpec", "HostChannel", "CONNECTION_ID_BASE"]

#: channel connection ids are relid + this (any value the host picks works; the guest uses
#: what the offer says)
CONNECTION_ID_BASE = 0x10000


class DeviceModel(Protocol):
    """A host-side device: ``run`` is started when the guest opens the channel and
    cancelled when it closes it. A model with a true ``reads_ring_directly`` attribute
    drains the inbound ring itself, from its doorbell handler (see
    :meth:`~vbusfs.platform.vmbus.ring_endpoint.RingEndpoint.poll`); the others receive
    what the server's pump task drained (:meth:`HostChannel.receive`)."""

    async def run(self, chan: HostChannel) -> None: ...


@dataclass
class ChannelSpec:
    """What the machine config asks the host to offer."""

    name: str
    if_type: uuid.UUID
    if_instance: uuid.UUID
    model: DeviceModel
    monitor: bool = False
    chn_flags: int = 0
    user_defined: bytes = b""


class HostChannel:
    """One offered channel as the host sees it."""

    def __init__(self, spec: ChannelSpec, relid: int, monitorid: int | None) -> None:
        self.spec = spec
        self.relid = relid
        self.connection_id = CONNECTION_ID_BASE + relid
        self.monitorid = monitorid
        self.name = f"vmbus relid {relid} ({spec.name})"
        self.doorbell = Doorbell(self.name)
        self.endpoint: RingEndpoint | None = None
        self.target_vp = 0
        self.gpadl_in_use: int | None = None
        #: while open: guest memory, and the guest frames of the ring GPADL (which no data
        #: transfer may name)
        self.memory: GuestMemory | None = None
        self.ring_pfns: range = range(0)
        self._cancel: trio.CancelScope | None = None
        self.opened = 0   # how many times the guest opened it

    def offer(self) -> m.OfferChannel:
        return m.OfferChannel(
            if_type=self.spec.if_type, if_instance=self.spec.if_instance,
            chn_flags=self.spec.chn_flags, mmio_megabytes=0,
            user_defined=self.spec.user_defined, sub_channel_index=0,
            child_relid=self.relid, monitorid=self.monitorid if self.monitorid is not None else 0,
            monitor_allocated=self.monitorid is not None, is_dedicated_interrupt=False,
            connection_id=self.connection_id)

    @property
    def is_open(self) -> bool:
        return self.endpoint is not None

    async def receive(self) -> list[Packet]:
        ep = self.endpoint
        if ep is None:                    # closed (or rescinded) before the model saw it
            raise OSError(errno.ENOTCONN, f"{self.name}: the channel is closed")
        return await ep.receive()

    async def send(self, ptype: int, flags: int, trans_id: int, payload: bytes) -> None:
        ep = self.endpoint
        if ep is None:
            raise OSError(errno.ENOTCONN, f"{self.name}: the channel is closed")
        await ep.send(ptype, flags, trans_id, payload)
