"""Host-side device models that run on an open VMBus channel.

* :class:`IdleDevice` — consumes whatever the guest sends and completes packets that ask for
  a completion; the model for devices whose own protocol is not emulated yet (NIC, SCSI,
  keyboard, ...). The channel is still opened the real way and its rings are real.

The integration-component services (heartbeat, shutdown, timesync, KVP, VSS, fcopy) are
:mod:`backends.vmbus.ic`.
"""

from __future__ import annotations

from backends.vmbus.channel import HostChannel
from vbusfs.protocols.vmbus.ring import COMPLETION_REQUESTED, Packet, PacketType

__all__ = ["PacketDevice", "IdleDevice"]


class PacketDevice:
    """A device model that takes the guest's packets one by one (``handle``); the default
    completes those that ask for a completion."""

    async def run(self, chan: HostChannel) -> None:
        while True:
            for pkt in await chan.receive():
                await self.handle(chan, pkt)

    async def handle(self, chan: HostChannel, pkt: Packet) -> None:
        if pkt.flags & COMPLETION_REQUESTED:
            await chan.send(PacketType.COMP, 0, pkt.trans_id, b"")


class IdleDevice(PacketDevice):
    pass
