"""Host-side device models that run on an open VMBus channel.

* :class:`IdleDevice` — consumes whatever the guest sends and completes packets that ask for
  a completion; the model for devices whose own protocol is not emulated yet (NIC, SCSI,
  keyboard, ...). The channel is still opened the real way and its rings are real.
* :class:`IcDevice` — an integration-component service (reference/hv-services.md §1): sends
  the version-negotiation request as soon as the channel opens and, for heartbeat, a
  heartbeat request every ``interval`` seconds, checking the guest's reply.
"""

from __future__ import annotations

import logging
import struct

import trio

from backends.vmbus.channel import HostChannel
from vbusfs.protocols.vmbus import hv_ic
from vbusfs.protocols.vmbus.ring import COMPLETION_REQUESTED, Packet, PacketType

log = logging.getLogger(__name__)

__all__ = ["PacketDevice", "IdleDevice", "IcDevice", "IC_SERVICES"]


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


#: host-side version lists per IC service (framework versions, service versions), in the
#: order openvmm offers them (reference/hv-services.md §1.7); heartbeat uses the Linux set.
IC_SERVICES: dict[str, tuple[int, list[tuple[int, int]]]] = {
    "heartbeat": (hv_ic.ICMSGTYPE_HEARTBEAT, [(1, 0), (3, 0)]),
    "shutdown": (hv_ic.ICMSGTYPE_SHUTDOWN, [(1, 0), (3, 0), (3, 1), (3, 2)]),
    "timesync": (hv_ic.ICMSGTYPE_TIMESYNC, [(4, 0)]),
    "kvp": (hv_ic.ICMSGTYPE_KVPEXCHANGE, [(3, 0), (4, 0), (5, 0)]),
    "vss": (hv_ic.ICMSGTYPE_VSS, [(5, 0)]),
    "fcopy": (hv_ic.ICMSGTYPE_FCOPY, [(1, 1)]),
}
_FRAMEWORKS = [(1, 0), (3, 0)]


class IcDevice(PacketDevice):
    def __init__(self, service: str, heartbeat_interval: float = 2.0) -> None:
        self.service = service
        self.msgtype, self.versions = IC_SERVICES[service]
        self.interval = heartbeat_interval
        self.framework: tuple[int, int] | None = None
        self.version: tuple[int, int] | None = None
        self.heartbeats_acked = 0
        self._seq = 0

    async def run(self, chan: HostChannel) -> None:
        frameworks = [(3, 0)] if self.service in ("vss", "fcopy") else _FRAMEWORKS
        await chan.send(PacketType.DATA_INBAND, 0, 0,
                        hv_ic.negotiate_request(frameworks, self.versions))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(super().run, chan)
            if self.service == "heartbeat":
                nursery.start_soon(self._beat, chan)

    async def _beat(self, chan: HostChannel) -> None:
        while True:
            await trio.sleep(self.interval)
            if self.version is None:
                continue
            assert self.framework is not None
            self._seq += 1
            await chan.send(PacketType.DATA_INBAND, 0, 0,
                            hv_ic.heartbeat_request(self._seq, self.framework, self.version))

    async def handle(self, chan: HostChannel, pkt: Packet) -> None:
        try:
            hdr = hv_ic.IcHeader.unpack(pkt.payload)
        except ValueError as e:
            log.warning("%s: dropping malformed IC reply: %s", chan.name, e)
            return
        if not (hdr.flags & hv_ic.ICFLAG_RESPONSE and hdr.flags & hv_ic.ICFLAG_TRANSACTION):
            log.warning("%s: IC packet without TRANSACTION|RESPONSE flags", chan.name)
            return
        if hdr.msgtype == hv_ic.ICMSGTYPE_NEGOTIATE:
            try:
                fws, srvs = hv_ic.parse_versions(pkt.payload)
            except (ValueError, struct.error):
                log.warning("%s: malformed negotiate reply", chan.name)
                return
            if len(fws) == 1 and len(srvs) == 1:
                self.framework, self.version = fws[0], srvs[0]
                log.info("%s: IC negotiated framework %d.%d, service %d.%d", chan.name,
                         *fws[0], *srvs[0])
        elif hdr.msgtype == hv_ic.ICMSGTYPE_HEARTBEAT and len(pkt.payload) >= 36:
            (seq,) = struct.unpack_from("<Q", pkt.payload, hv_ic.HEARTBEAT_SEQ)
            if seq == self._seq + 1:
                self.heartbeats_acked += 1
            else:
                log.warning("%s: heartbeat reply %d, expected %d", chan.name, seq,
                            self._seq + 1)
