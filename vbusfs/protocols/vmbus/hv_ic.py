"""Hyper-V integration-component (IC) messages as carried on util channels.

Payload = ``vmbuspipe_hdr`` (8) + ``icmsg_hdr`` (20) + body at offset 28
(reference/hv-services.md §1). Here: the framework (header, flags, status codes, version
negotiation with Linux ``vmbus_prep_negotiate_resp`` semantics, §1.3–1.7) and the bodies of
heartbeat, shutdown and timesync (§2.1–2.3), VSS (§2.5) and fcopy (§2.6). KVP, the largest,
is :mod:`vbusfs.protocols.vmbus.hv_kvp`.

Offsets and sizes of the bodies Linux shares with user space (VSS, fcopy) are those of
``/usr/include/linux/hyperv.h`` (checked by tests/test_hv_ic_layout.py, which compiles it);
``icmsg_hdr``, heartbeat, shutdown and timesync live in the kernel-internal header and are
checked against the reference's offsets.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = [
    "PIPE", "HDR", "ICMSG_HDR", "NEGOTIATE", "PIPE_PACKET_TYPE_DATA", "HDR_STATUS", "HDR_FLAGS",
    "ICMSGTYPE_NEGOTIATE", "ICMSGTYPE_HEARTBEAT", "ICMSGTYPE_KVPEXCHANGE", "ICMSGTYPE_SHUTDOWN",
    "ICMSGTYPE_TIMESYNC", "ICMSGTYPE_VSS", "ICMSGTYPE_FCOPY", "ICFLAG_TRANSACTION",
    "ICFLAG_REQUEST", "ICFLAG_RESPONSE", "HV_S_OK", "HV_E_FAIL", "HV_S_CONT",
    "HV_ERROR_NOT_SUPPORTED", "HV_ERROR_MACHINE_LOCKED", "HV_ERROR_DEVICE_NOT_CONNECTED",
    "HV_INVALIDARG", "HV_GUID_NOTFOUND", "HV_ERROR_ALREADY_EXISTS", "HV_ERROR_DISK_FULL",
    "status_name", "IC_VERSION_NEGOTIATION_MAX_VER_COUNT", "IcHeader", "ic_message",
    "negotiate_request", "parse_versions", "guest_negotiate", "Negotiated",
    "HEARTBEAT_SEQ", "HEARTBEAT_BODY", "heartbeat_request",
    "SHUTDOWN_BODY", "SHUTDOWN_FLAG_FORCE", "SHUTDOWN_FLAG_RESTART", "SHUTDOWN_FLAG_HIBERNATE",
    "SHTDN_REASON_FLAG_PLANNED", "shutdown_request",
    "WLTIMEDELTA", "ICTIMESYNCFLAG_PROBE", "ICTIMESYNCFLAG_SYNC", "ICTIMESYNCFLAG_SAMPLE",
    "TIMESYNC_V1", "TIMESYNC_V1_LINUX_SIZE", "TIMESYNC_V4", "TIMESYNC_V4_LINUX_SIZE",
    "timesync_request",
    "VSS_MSG", "VSS_OP_CREATE", "VSS_OP_DELETE", "VSS_OP_HOT_BACKUP", "VSS_OP_GET_DM_INFO",
    "VSS_OP_BU_COMPLETE", "VSS_OP_FREEZE", "VSS_OP_THAW", "VSS_OP_AUTO_RECOVER", "VSS_OPS",
    "VSS_HBU_NO_AUTO_RECOVERY", "vss_request",
    "FCOPY_HDR", "FCOPY_START", "FCOPY_WRITE", "START_FILE_COPY", "WRITE_TO_FILE",
    "COMPLETE_FCOPY", "CANCEL_FCOPY", "FCOPY_OPS", "W_MAX_PATH", "DATA_FRAGMENT",
    "FCOPY_OVER_WRITE", "FCOPY_CREATE_PATH", "fcopy_request",
]

PIPE = struct.Struct("<II")                 # vmbuspipe_hdr: flags (packet type), msgsize
HDR = struct.Struct("<HHHHHHIBBxx")         # icmsg_hdr, 20 bytes (§1.3)
ICMSG_HDR = PIPE.size + HDR.size            # 28: where every service body starts
NEGOTIATE = struct.Struct("<HHI")           # icframe_vercnt, icmsg_vercnt, reserved
#: vmbuspipe_hdr.flags the host writes: PIPE_PACKET_TYPE_DATA (§1.2)
PIPE_PACKET_TYPE_DATA = 1
#: payload offsets of icmsg_hdr.status and .icflags
HDR_STATUS = PIPE.size + 12
HDR_FLAGS = PIPE.size + 17
_HDR_MSGSIZE = PIPE.size + 10

# icmsgtype (§1.4, Linux include/linux/hyperv.h)
ICMSGTYPE_NEGOTIATE = 0
ICMSGTYPE_HEARTBEAT = 1
ICMSGTYPE_KVPEXCHANGE = 2
ICMSGTYPE_SHUTDOWN = 3
ICMSGTYPE_TIMESYNC = 4
ICMSGTYPE_VSS = 5
ICMSGTYPE_FCOPY = 7

# icflags (§1.5)
ICFLAG_TRANSACTION = 0x01
ICFLAG_REQUEST = 0x02
ICFLAG_RESPONSE = 0x04

# icmsg_hdr.status, HRESULTs (§1.6, uapi linux/hyperv.h)
HV_S_OK = 0x00000000
HV_E_FAIL = 0x80004005
HV_S_CONT = 0x80070103
HV_ERROR_NOT_SUPPORTED = 0x80070032
HV_ERROR_MACHINE_LOCKED = 0x800704F7
HV_ERROR_DEVICE_NOT_CONNECTED = 0x8007048F
HV_INVALIDARG = 0x80070057
HV_GUID_NOTFOUND = 0x80041002
HV_ERROR_ALREADY_EXISTS = 0x80070050
HV_ERROR_DISK_FULL = 0x80070070

_STATUS_NAMES = {
    HV_S_OK: "S_OK", HV_E_FAIL: "E_FAIL", HV_S_CONT: "S_CONT",
    HV_ERROR_NOT_SUPPORTED: "ERROR_NOT_SUPPORTED", HV_ERROR_MACHINE_LOCKED: "ERROR_MACHINE_LOCKED",
    HV_ERROR_DEVICE_NOT_CONNECTED: "ERROR_DEVICE_NOT_CONNECTED", HV_INVALIDARG: "INVALIDARG",
    HV_GUID_NOTFOUND: "GUID_NOTFOUND", HV_ERROR_ALREADY_EXISTS: "ERROR_ALREADY_EXISTS",
    HV_ERROR_DISK_FULL: "ERROR_DISK_FULL",
}


def status_name(status: int) -> str:
    """``S_OK``, ``E_FAIL``, ... or the hex value of an HRESULT this table does not name."""
    return _STATUS_NAMES.get(status, f"{status:#010x}")


#: the most versions of either kind a negotiate message may carry (linux/hyperv.h)
IC_VERSION_NEGOTIATION_MAX_VER_COUNT = 100


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
    def unpack(cls, payload: bytes | bytearray | memoryview) -> IcHeader:
        if len(payload) < ICMSG_HDR:
            raise ValueError(f"IC payload of {len(payload)} bytes has no icmsg_hdr")
        return cls(*HDR.unpack_from(payload, PIPE.size))

    def pack(self) -> bytes:
        return HDR.pack(self.frame_major, self.frame_minor, self.msgtype, self.msg_major,
                        self.msg_minor, self.msgsize, self.status, self.transaction_id,
                        self.flags)


def ic_message(msgtype: int, body: bytes, frame: tuple[int, int] = (0, 0),
               msg: tuple[int, int] = (0, 0),
               flags: int = ICFLAG_TRANSACTION | ICFLAG_REQUEST) -> bytes:
    """A host request as openvmm writes one (§1.7, O-ic ``write_message``): a data pipe
    header, the negotiated versions (0.0 before negotiation), status 0, transaction id 0."""
    hdr = IcHeader(frame[0], frame[1], msgtype, msg[0], msg[1], len(body), 0, 0, flags)
    return PIPE.pack(PIPE_PACKET_TYPE_DATA, HDR.size + len(body)) + hdr.pack() + body


# -- version negotiation (§1.7) ------------------------------------------------------------

def negotiate_request(frameworks: list[tuple[int, int]],
                      services: list[tuple[int, int]]) -> bytes:
    """The host's first message on an IC channel: the versions it can speak."""
    body = NEGOTIATE.pack(len(frameworks), len(services), 0) + b"".join(
        struct.pack("<HH", maj, mnr) for maj, mnr in frameworks + services)
    return ic_message(ICMSGTYPE_NEGOTIATE, body)


def parse_versions(payload: bytes | bytearray | memoryview
                   ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(framework versions, service versions) of a negotiate message or reply; ValueError
    when the counts are impossible or the versions do not fit in the payload."""
    if len(payload) < ICMSG_HDR + NEGOTIATE.size:
        raise ValueError("negotiate message without its counts")
    fcount, mcount, _ = NEGOTIATE.unpack_from(payload, ICMSG_HDR)
    base = ICMSG_HDR + NEGOTIATE.size
    if fcount > IC_VERSION_NEGOTIATION_MAX_VER_COUNT or \
            mcount > IC_VERSION_NEGOTIATION_MAX_VER_COUNT or \
            base + 4 * (fcount + mcount) > len(payload):
        raise ValueError("negotiate message with impossible version counts")
    vers = [struct.unpack_from("<HH", payload, base + 4 * i) for i in range(fcount + mcount)]
    return [(v[0], v[1]) for v in vers[:fcount]], [(v[0], v[1]) for v in vers[fcount:]]


@dataclass(frozen=True)
class Negotiated:
    """What ``vmbus_prep_negotiate_resp`` decided: ``ok`` is its return value; the versions
    are what it wrote into ``icversion_data[0]``/``[1]`` (on failure, the odd values of §1.7
    step 6)."""

    ok: bool
    framework: tuple[int, int]
    service: tuple[int, int]


def guest_negotiate(payload: bytes | bytearray, fw_pref: list[tuple[int, int]],
                    srv_pref: list[tuple[int, int]]) -> tuple[bytearray, Negotiated | None]:
    """What Linux ``vmbus_prep_negotiate_resp`` does to a negotiate request, in place
    (reference §1.7; the reply keeps the request's length, so nothing past it is written).

    Returns the reply with flags TRANSACTION|RESPONSE (set by every caller) and the outcome,
    or None when the request is too short to hold the counts (nothing else is touched).
    """
    buf = bytearray(payload)
    buf[HDR_FLAGS] = ICFLAG_TRANSACTION | ICFLAG_RESPONSE
    if len(buf) < ICMSG_HDR + 4:             # offsetof(struct icmsg_negotiate, reserved)
        return buf, None
    struct.pack_into("<H", buf, _HDR_MSGSIZE, 0x10)
    fcount, mcount = struct.unpack_from("<HH", buf, ICMSG_HDR)
    base = ICMSG_HDR + NEGOTIATE.size
    framework = (fcount, 0)
    service = (mcount, 0)
    found = False
    if fcount <= IC_VERSION_NEGOTIATION_MAX_VER_COUNT and \
            mcount <= IC_VERSION_NEGOTIATION_MAX_VER_COUNT and \
            base + 4 * (fcount + mcount) <= len(buf):
        offered = [(struct.unpack_from("<HH", buf, base + 4 * i)) for i in range(fcount + mcount)]
        host_fw = [(v[0], v[1]) for v in offered[:fcount]]
        host_srv = [(v[0], v[1]) for v in offered[fcount:]]
        fw = next((v for v in fw_pref if v in host_fw), None)
        if fw is not None:
            framework = fw
            srv = next((v for v in srv_pref if v in host_srv), None)
            if srv is not None:
                service = srv
                found = True
    struct.pack_into("<HH", buf, ICMSG_HDR, 1 if found else 0, 1 if found else 0)
    # icversion_data[0] and [1] are written whatever happened; bytes past the request's
    # length are not part of the reply.
    versions = struct.pack("<HHHH", framework[0] & 0xFFFF, framework[1], service[0] & 0xFFFF,
                           service[1])
    end = min(len(buf), base + 8)
    if end > base:
        buf[base:end] = versions[:end - base]
    return buf, Negotiated(found, framework, service)


# -- heartbeat (§2.1) --------------------------------------------------------------------------

#: offset of heartbeat ``seq_num`` (u64) in the payload
HEARTBEAT_SEQ = ICMSG_HDR
HEARTBEAT_BODY = 8 + 4 * 8                  # heartbeat_msg_data: seq_num + reserved[8]


def heartbeat_request(seq: int, frame: tuple[int, int], msg: tuple[int, int]) -> bytes:
    return ic_message(ICMSGTYPE_HEARTBEAT, struct.pack("<Q8I", seq, *([0] * 8)), frame, msg)


# -- shutdown (§2.2) ---------------------------------------------------------------------------

#: shutdown_msg_data: reason_code, timeout_seconds, flags, display_message[2048]
SHUTDOWN_BODY = struct.Struct("<III2048s")
SHUTDOWN_FLAG_FORCE = 0x1
SHUTDOWN_FLAG_RESTART = 0x2
SHUTDOWN_FLAG_HIBERNATE = 0x4
#: the reason openvmm sends, from the Windows SDK (O-ic shutdown.rs)
SHTDN_REASON_FLAG_PLANNED = 0x80000000


def shutdown_request(flags: int, frame: tuple[int, int], msg: tuple[int, int],
                     reason: int = SHTDN_REASON_FLAG_PLANNED, timeout: int = 0,
                     message: bytes = b"") -> bytes:
    return ic_message(ICMSGTYPE_SHUTDOWN, SHUTDOWN_BODY.pack(reason, timeout, flags, message),
                      frame, msg)


# -- timesync (§2.3) ---------------------------------------------------------------------------

#: 100-ns ticks from 1601-01-01 to 1970-01-01 (linux/hyperv.h WLTIMEDELTA)
WLTIMEDELTA = 116444736000000000
ICTIMESYNCFLAG_PROBE = 0
ICTIMESYNCFLAG_SYNC = 1
ICTIMESYNCFLAG_SAMPLE = 2
#: before 4.0: parenttime, childtime, roundtriptime, flags (+ 3 reserved in openvmm's form)
TIMESYNC_V1 = struct.Struct("<QQQB3x")
TIMESYNC_V1_LINUX_SIZE = 25                 # sizeof(struct ictimesync_data)
#: 4.0: parenttime, vmreferencetime, flags, leapflags, stratum (+ 5 reserved in openvmm's)
TIMESYNC_V4 = struct.Struct("<QQBBB5x")
TIMESYNC_V4_LINUX_SIZE = 22                 # sizeof(struct ictimesync_ref_data)


def timesync_request(parent_time: int, reference_time: int, flags: int,
                     frame: tuple[int, int], msg: tuple[int, int]) -> bytes:
    """A sample in the form the negotiated version uses (the 4.0 form from 4.0 on), with
    openvmm's body sizes (§2.3)."""
    if msg >= (4, 0):
        body = TIMESYNC_V4.pack(parent_time, reference_time, flags, 0, 0)
    else:
        body = TIMESYNC_V1.pack(parent_time, 0, 0, flags)
    return ic_message(ICMSGTYPE_TIMESYNC, body, frame, msg)


# -- VSS (§2.5, uapi linux/hyperv.h) -----------------------------------------------------------

#: struct hv_vss_msg: operation, reserved[7], then the vss_cf / dm_info flags
VSS_MSG = struct.Struct("<B7xI")
VSS_OP_CREATE = 0
VSS_OP_DELETE = 1
VSS_OP_HOT_BACKUP = 2
VSS_OP_GET_DM_INFO = 3
VSS_OP_BU_COMPLETE = 4
VSS_OP_FREEZE = 5
VSS_OP_THAW = 6
VSS_OP_AUTO_RECOVER = 7
VSS_OPS = {"create": VSS_OP_CREATE, "delete": VSS_OP_DELETE, "hot_backup": VSS_OP_HOT_BACKUP,
           "get_dm_info": VSS_OP_GET_DM_INFO, "bu_complete": VSS_OP_BU_COMPLETE,
           "freeze": VSS_OP_FREEZE, "thaw": VSS_OP_THAW, "auto_recover": VSS_OP_AUTO_RECOVER}
VSS_HBU_NO_AUTO_RECOVERY = 0x00000005


def vss_request(op: int, frame: tuple[int, int], msg: tuple[int, int], flags: int = 0) -> bytes:
    return ic_message(ICMSGTYPE_VSS, VSS_MSG.pack(op, flags), frame, msg)


# -- fcopy (§2.6, uapi linux/hyperv.h) ---------------------------------------------------------

W_MAX_PATH = 260
DATA_FRAGMENT = 6 * 1024
#: struct hv_fcopy_hdr: operation, service_id0, service_id1
FCOPY_HDR = struct.Struct("<I16s16s")
#: struct hv_start_fcopy: hdr, file_name[260] u16, path_name[260] u16, copy_flags, file_size
FCOPY_START = struct.Struct(f"<I16s16s{2 * W_MAX_PATH}s{2 * W_MAX_PATH}sIQ")
#: struct hv_do_fcopy: hdr, pad, offset, size, data[6144] (the u32 pad puts offset at payload
#: 68, not the 64 of reference §2.6, which leaves it out; the compiled header has it)
FCOPY_WRITE = struct.Struct(f"<I16s16sIQI{DATA_FRAGMENT}s")
START_FILE_COPY = 0
WRITE_TO_FILE = 1
COMPLETE_FCOPY = 2
CANCEL_FCOPY = 3
FCOPY_OPS = {"start": START_FILE_COPY, "write": WRITE_TO_FILE, "complete": COMPLETE_FCOPY,
             "cancel": CANCEL_FCOPY}
FCOPY_OVER_WRITE = 0x1
FCOPY_CREATE_PATH = 0x2


def _utf16z(text: str, units: int) -> bytes:
    data = text.encode("utf-16-le")
    if len(data) + 2 > 2 * units:
        raise ValueError(f"{text!r} is longer than {units - 1} UTF-16 units")
    return data


def fcopy_request(op: int, frame: tuple[int, int], msg: tuple[int, int], *,
                  file_name: str = "", path_name: str = "", copy_flags: int = 0,
                  file_size: int = 0, offset: int = 0, data: bytes = b"") -> bytes:
    """START_FILE_COPY and WRITE_TO_FILE with their bodies; the other operations are the
    bare header, as the host sends them."""
    if op == START_FILE_COPY:
        body = FCOPY_START.pack(op, b"", b"", _utf16z(file_name, W_MAX_PATH),
                                _utf16z(path_name, W_MAX_PATH), copy_flags, file_size)
    elif op == WRITE_TO_FILE:
        if len(data) > DATA_FRAGMENT:
            raise ValueError(f"a fragment carries at most {DATA_FRAGMENT} bytes")
        body = FCOPY_WRITE.pack(op, b"", b"", 0, offset, len(data), data)
    else:
        body = FCOPY_HDR.pack(op, b"", b"")
    return ic_message(ICMSGTYPE_FCOPY, body, frame, msg)
