"""Hyper-V integration-component (IC) messages as carried on util channels.

Payload = ``vmbuspipe_hdr`` (8) + ``icmsg_hdr`` (20) + body at offset 28
(reference/hv-services.md §1). Only what the framework and heartbeat need lives here:
version negotiation (§1.7) and the heartbeat body (§2.1).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = [
    "ICMSG_HDR", "ICMSGTYPE_NEGOTIATE", "ICMSGTYPE_HEARTBEAT", "ICMSGTYPE_SHUTDOWN",
    "ICMSGTYPE_TIMESYNC", "ICMSGTYPE_KVPEXCHANGE", "ICMSGTYPE_VSS", "ICMSGTYPE_FCOPY",
    "ICFLAG_TRANSACTION", "ICFLAG_REQUEST", "ICFLAG_RESPONSE", "IcHeader",
    "negotiate_request", "parse_versions", "guest_negotiate", "heartbeat_request",
    "HEARTBEAT_SEQ", "PIPE_PACKET_TYPE_DATA",
]

PIPE = struct.Struct("<II")                 # vmbuspipe_hdr: flags, msgsize
HDR = struct.Struct("<HHHHHHIBBxx")         # icmsg_hdr, 20 bytes
ICMSG_HDR = PIPE.size + HDR.size            # 28
NEGOTIATE = struct.Struct("<HHI")           # icframe_vercnt, icmsg_vercnt, reserved
PIPE_PACKET_TYPE_DATA = 1

ICMSGTYPE_NEGOTIATE = 0
ICMSGTYPE_HEARTBEAT = 1
ICMSGTYPE_KVPEXCHANGE = 2
ICMSGTYPE_SHUTDOWN = 3
ICMSGTYPE_TIMESYNC = 4
ICMSGTYPE_VSS = 5
ICMSGTYPE_FCOPY = 7

ICFLAG_TRANSACTION = 0x01
ICFLAG_REQUEST = 0x02
ICFLAG_RESPONSE = 0x04

#: offset of heartbeat ``seq_num`` (u64) in the payload
HEARTBEAT_SEQ = ICMSG_HDR
HEARTBEAT_BODY = 8 + 4 * 8                  # seq_num + reserved[8]


@dataclass(frozen=True)
class IcHeader:
    frame_major: int
    frame_minor: int
    msgtype: int
    msg_major: int
    msg_minor: int
    msgsize: int
    status: int
    transaction_id: int
    flags: int

    @classmethod
    def unpack(cls, payload: bytes) -> IcHeader:
        if len(payload) < ICMSG_HDR:
            raise ValueError(f"IC payload of {len(payload)} bytes has no icmsg_hdr")
        return cls(*HDR.unpack_from(payload, PIPE.size))

    def pack(self) -> bytes:
        return HDR.pack(self.frame_major, self.frame_minor, self.msgtype, self.msg_major,
                        self.msg_minor, self.msgsize, self.status, self.transaction_id,
                        self.flags)


def _message(msgtype: int, body: bytes, frame: tuple[int, int] = (0, 0),
             msg: tuple[int, int] = (0, 0)) -> bytes:
    hdr = IcHeader(frame[0], frame[1], msgtype, msg[0], msg[1], len(body), 0, 0,
                   ICFLAG_TRANSACTION | ICFLAG_REQUEST)
    return PIPE.pack(PIPE_PACKET_TYPE_DATA, HDR.size + len(body)) + hdr.pack() + body


def negotiate_request(frameworks: list[tuple[int, int]],
                      services: list[tuple[int, int]]) -> bytes:
    """The host's first message on an IC channel: the versions it can speak."""
    body = NEGOTIATE.pack(len(frameworks), len(services), 0) + b"".join(
        struct.pack("<HH", maj, mnr) for maj, mnr in frameworks + services)
    return _message(ICMSGTYPE_NEGOTIATE, body)


def parse_versions(payload: bytes) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(framework versions, service versions) of a negotiate message or reply."""
    fcount, mcount, _ = NEGOTIATE.unpack_from(payload, ICMSG_HDR)
    base = ICMSG_HDR + NEGOTIATE.size
    if fcount > 100 or mcount > 100 or base + 4 * (fcount + mcount) > len(payload):
        raise ValueError("negotiate message with impossible version counts")
    vers = [struct.unpack_from("<HH", payload, base + 4 * i) for i in range(fcount + mcount)]
    return [tuple(v) for v in vers[:fcount]], [tuple(v) for v in vers[fcount:]]


def guest_negotiate(payload: bytes, fw_pref: list[tuple[int, int]],
                    srv_pref: list[tuple[int, int]]) -> tuple[bytearray, tuple[int, int] | None]:
    """What Linux ``vmbus_prep_negotiate_resp`` does to a negotiate request, in place.

    Returns the reply (same length as the request) and the chosen service version, or None
    when no common version exists (counts set to 0, reference §1.7).
    """
    buf = bytearray(payload)
    struct.pack_into("<H", buf, PIPE.size + 10, 0x10)   # icmsgsize
    buf[PIPE.size + 17] = ICFLAG_TRANSACTION | ICFLAG_RESPONSE
    try:
        host_fw, host_srv = parse_versions(payload)
    except (ValueError, struct.error):
        return buf, None
    fw = next((v for v in fw_pref if v in host_fw), None)
    srv = next((v for v in srv_pref if v in host_srv), None)
    base = ICMSG_HDR + NEGOTIATE.size
    if fw is None or srv is None:
        fcount, mcount, _ = NEGOTIATE.unpack_from(payload, ICMSG_HDR)
        NEGOTIATE.pack_into(buf, ICMSG_HDR, 0, 0, 0)
        struct.pack_into("<HHHH", buf, base, fcount, 0, mcount, 0)
        return buf, None
    NEGOTIATE.pack_into(buf, ICMSG_HDR, 1, 1, 0)
    struct.pack_into("<HHHH", buf, base, fw[0], fw[1], srv[0], srv[1])
    return buf, srv


def heartbeat_request(seq: int, frame: tuple[int, int], msg: tuple[int, int]) -> bytes:
    return _message(ICMSGTYPE_HEARTBEAT, struct.pack("<Q8I", seq, *([0] * 8)), frame, msg)
