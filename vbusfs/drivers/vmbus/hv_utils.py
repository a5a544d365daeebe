"""Guest-side ``hv_utils``: the driver of the util channels, answering integration-component
requests on them.

Like Linux ``drivers/hv/hv_util.c``: the host speaks first; the guest answers every negotiate
request with ``vmbus_prep_negotiate_resp`` semantics and every heartbeat with ``seq_num + 1``,
replying with the received buffer modified in place (reference/hv-services.md §1.7, §2.1).
Other services are negotiated; their later requests are answered with HV_E_FAIL until those
services are emulated.
"""

from __future__ import annotations

import logging
import struct

from vbusfs.drivers.vmbus.device import VmbusDevice
from vbusfs.drivers.vmbus.driver import VmbusDriver, ring_size
from vbusfs.platform.memory import PAGE_SIZE
from vbusfs.platform.vmbus.ring_endpoint import RingEndpoint
from vbusfs.protocols.vmbus import hv_ic
from vbusfs.protocols.vmbus.ring import PacketType

log = logging.getLogger(__name__)

__all__ = ["HvUtils", "UtilService", "SERVICE_VERSIONS"]

HV_E_FAIL = 0x80004005
FW_VERSIONS = [(3, 0), (1, 0)]
#: Linux's preference lists (reference/hv-services.md §1.7)
SERVICE_VERSIONS: dict[str, tuple[list[tuple[int, int]], list[tuple[int, int]]]] = {
    "heartbeat": (FW_VERSIONS, [(3, 0), (1, 0)]),
    "shutdown": (FW_VERSIONS, [(3, 2), (3, 1), (3, 0), (1, 0)]),
    "timesync": (FW_VERSIONS, [(4, 0), (3, 0), (1, 0)]),
    "kvp": (FW_VERSIONS, [(4, 0), (3, 0), (1, 0)]),
    "vss": ([(3, 0)], [(5, 0)]),
    "fcopy": ([(3, 0)], [(1, 1)]),
}


class UtilService:
    def __init__(self, service: str) -> None:
        self.service = service
        self.fw_pref, self.srv_pref = SERVICE_VERSIONS[service]
        self.version: tuple[int, int] | None = None
        self.heartbeats = 0

    async def run(self, ep: RingEndpoint) -> None:
        while True:
            for pkt in await ep.receive():
                reply = self.answer(bytes(pkt.payload))
                if reply is not None:
                    await ep.send(PacketType.DATA_INBAND, 0, pkt.trans_id, bytes(reply))

    def answer(self, payload: bytes) -> bytearray | None:
        if len(payload) < hv_ic.ICMSG_HDR:
            log.warning("%s: IC packet of %d bytes dropped", self.service, len(payload))
            return None
        hdr = hv_ic.IcHeader.unpack(payload)
        if hdr.msgtype == hv_ic.ICMSGTYPE_NEGOTIATE:
            reply, chosen = hv_ic.guest_negotiate(payload, self.fw_pref, self.srv_pref)
            self.version = chosen
            if chosen:
                log.info("hv_utils: %s IC version %d.%d", self.service, *chosen)
            return reply
        buf = bytearray(payload)
        buf[hv_ic.PIPE.size + 17] = hv_ic.ICFLAG_TRANSACTION | hv_ic.ICFLAG_RESPONSE
        if hdr.msgtype == hv_ic.ICMSGTYPE_HEARTBEAT and self.service == "heartbeat" \
                and len(payload) >= hv_ic.ICMSG_HDR + 8:
            (seq,) = struct.unpack_from("<Q", buf, hv_ic.HEARTBEAT_SEQ)
            struct.pack_into("<Q", buf, hv_ic.HEARTBEAT_SEQ, (seq + 1) & (2**64 - 1))
            self.heartbeats += 1
        else:
            struct.pack_into("<I", buf, hv_ic.PIPE.size + 12, HV_E_FAIL)
        return buf


class HvUtils(VmbusDriver):
    """``hv_utils``: 3-page rings each way (``HV_UTIL_RING_SEND_SIZE``/``_RECV_SIZE``), and
    the IC protocol of the device's service on the open channel."""

    def __init__(self) -> None:
        super().__init__("hv_utils", ring_size(3 * PAGE_SIZE), ring_size(3 * PAGE_SIZE))

    async def serve(self, dev: VmbusDevice, ep: RingEndpoint) -> None:
        cls = dev.device_class
        if cls is None or cls.type not in SERVICE_VERSIONS:     # a dynamic id: drain
            await super().serve(dev, ep)
            return
        service = UtilService(cls.type)
        dev.drvdata = service
        await service.run(ep)
