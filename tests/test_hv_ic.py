"""The guest's IC answers, one packet at a time, against reference/hv-services.md §1.7 (the
worked negotiation example, ``vmbus_prep_negotiate_resp``'s rules) and §2 (heartbeat,
shutdown flags table, timesync bodies, VSS and fcopy without their daemons). Offsets and
values are the reference's, written out here, not taken from the code under test."""

from __future__ import annotations

import errno
import logging
import struct

import pytest

from tests.conftest import Logs
from vbusfs.drivers.vmbus.hv_utils import (
    FcopyService,
    HeartbeatService,
    HvUtilsPlatform,
    ShutdownService,
    TimesyncService,
    VssService,
    make_service,
)
from vbusfs.platform.vmbus.reference_time import ReferenceTime
from vbusfs.protocols.vmbus import hv_ic

# host→guest heartbeat negotiation, 52 bytes, from the reference (hex offsets there)
HOST_REQ = bytes.fromhex(
    "01000000" "2c000000"
    "0000" "0000" "0000" "0000" "0000" "1800"
    "00000000" "00" "03" "0000"
    "0200" "0200" "00000000"
    "01000000" "03000000" "01000000" "03000000")
HV_S_OK, HV_E_FAIL = 0x00000000, 0x80004005            # §1.6
FLAGS_OFF, STATUS_OFF, BODY = 0x19, 0x14, 28           # §1.3: icflags, status, body
LINUX_FW, LINUX_HB = [(3, 0), (1, 0)], [(3, 0), (1, 0)]


class FakeClock:
    def __init__(self) -> None:
        self.ns = 0

    def __call__(self) -> int:
        return self.ns


def platform(**kw: object) -> HvUtilsPlatform:
    return HvUtilsPlatform(**kw)  # type: ignore[arg-type]


def message(msgtype: int, body: bytes, flags: int = 0x03, pad: int = 0) -> bytes:
    """A host request laid out by hand from §1.2–1.3 (pipe header, icmsg_hdr, body)."""
    hdr = struct.pack("<HHHHHHIBBxx", 3, 0, msgtype, 3, 0, len(body), 0, 0, flags)
    return struct.pack("<II", 1, 20 + len(body)) + hdr + body + bytes(pad)


def negotiated(svc: object, version: tuple[int, int]) -> None:
    svc.version = version  # type: ignore[attr-defined]
    svc.framework = (3, 0)  # type: ignore[attr-defined]


# -- negotiation (§1.7) ------------------------------------------------------------------------

def test_host_negotiate_request_bytes() -> None:
    assert hv_ic.negotiate_request([(1, 0), (3, 0)], [(1, 0), (3, 0)]) == HOST_REQ


def test_guest_reply_matches_reference() -> None:
    padded = HOST_REQ + bytes(4)                      # VMBus pads the payload to 56
    reply, out = hv_ic.guest_negotiate(padded, LINUX_FW, LINUX_HB)
    expect = bytearray(padded)
    expect[0x12:0x14] = b"\x10\x00"                   # icmsgsize 16
    expect[0x19] = 0x05                               # TRANSACTION | RESPONSE
    expect[0x1C:0x20] = b"\x01\x00\x01\x00"           # one version each
    expect[0x24:0x28] = b"\x03\x00\x00\x00"           # framework 3.0
    expect[0x28:0x2C] = b"\x03\x00\x00\x00"           # heartbeat 3.0
    assert bytes(reply) == bytes(expect) and len(reply) == 56
    assert out is not None and out.ok and out.service == (3, 0) and out.framework == (3, 0)


def test_framework_miss_writes_the_counts_as_versions() -> None:
    # step 6: on a framework miss, data[0] = {icframe_vercnt, 0}, data[1] = {icmsg_vercnt, 0}
    req = hv_ic.negotiate_request([(2, 0)], [(3, 0), (1, 0)])
    reply, out = hv_ic.guest_negotiate(req, LINUX_FW, LINUX_HB)
    assert out is not None and not out.ok
    assert struct.unpack_from("<HH", reply, 28) == (0, 0)
    assert struct.unpack_from("<HHHH", reply, 36) == (1, 0, 2, 0)
    assert reply[FLAGS_OFF] == 0x05 and struct.unpack_from("<I", reply, STATUS_OFF)[0] == 0


def test_service_miss_keeps_the_framework_found() -> None:
    # Linux keeps icframe_major/minor from the framework match and writes {icmsg_vercnt, 0}
    req = hv_ic.negotiate_request([(1, 0), (3, 0)], [(9, 9)])
    reply, out = hv_ic.guest_negotiate(req, LINUX_FW, LINUX_HB)
    assert out is not None and not out.ok
    assert struct.unpack_from("<HH4xHHHH", reply, 28) == (0, 0, 3, 0, 1, 0)


def test_host_order_does_not_matter_guest_preference_does() -> None:
    req = hv_ic.negotiate_request([(3, 0), (1, 0)], [(1, 0), (3, 2), (3, 0)])
    reply, out = hv_ic.guest_negotiate(req, LINUX_FW, [(3, 2), (3, 1), (3, 0), (1, 0)])
    assert out is not None and out.service == (3, 2)
    assert struct.unpack_from("<HHHH", reply, 36) == (3, 0, 3, 2)
    # what follows icversion_data[1] (further offered versions) goes back unchanged
    assert reply[44:] == req[44:]


@pytest.mark.parametrize("counts", [(101, 1), (1, 101), (2, 200)])
def test_too_many_versions_fails_with_counts_as_versions(counts: tuple[int, int]) -> None:
    req = bytearray(hv_ic.negotiate_request([(3, 0)], [(3, 0)]) + bytes(8))
    struct.pack_into("<HH", req, 28, *counts)
    reply, out = hv_ic.guest_negotiate(req, LINUX_FW, LINUX_HB)
    assert out is not None and not out.ok
    assert struct.unpack_from("<HH4xHHHH", reply, 28) == (0, 0, counts[0], 0, counts[1], 0)


def test_versions_past_the_packet_fail() -> None:
    req = bytearray(hv_ic.negotiate_request([(3, 0)], [(3, 0)]))
    struct.pack_into("<HH", req, 28, 2, 2)            # 28 + 8 + 16 > 44
    reply, out = hv_ic.guest_negotiate(req, LINUX_FW, LINUX_HB)
    assert out is not None and not out.ok and len(reply) == 44
    assert struct.unpack_from("<HH4xHHHH", reply, 28) == (0, 0, 2, 0, 2, 0)


def test_short_negotiate_is_only_flagged() -> None:
    # step 1: recvlen < 28 + 4: nothing is modified, the caller still sets the flags
    req = HOST_REQ[:31]
    reply, out = hv_ic.guest_negotiate(req, LINUX_FW, LINUX_HB)
    expect = bytearray(req)
    expect[FLAGS_OFF] = 0x05
    assert out is None and reply == expect
    # 32..35 bytes: the counts fit and are zeroed; the versions lie past the reply
    reply, out = hv_ic.guest_negotiate(HOST_REQ[:34], LINUX_FW, LINUX_HB)
    assert out is not None and not out.ok and len(reply) == 34
    assert reply[28:32] == bytes(4) and reply[0x12:0x14] == b"\x10\x00"


def test_service_answers_negotiation_and_logs_the_version(caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    svc = HeartbeatService("heartbeat", platform())
    with caplog.at_level(logging.INFO):
        reply = svc.answer(HOST_REQ + bytes(4))
    assert reply is not None and svc.version == (3, 0)
    assert "hv_utils: Heartbeat IC version 3.0" in caplog.text


# -- framework checks every callback makes (§1.8) -----------------------------------------------

def test_truncated_ic_packet_dropped(logs: Logs) -> None:
    logs.expect(r"Heartbeat request received\. Packet length too small: 2")
    assert HeartbeatService("heartbeat", platform()).answer(b"\x01\x00") is None


def test_packet_larger_than_the_buffer_silences_the_channel(logs: Logs) -> None:
    logs.expect(r"Heartbeat request received\. Could not read into recv buf")
    svc = HeartbeatService("heartbeat", platform())
    big = message(hv_ic.ICMSGTYPE_HEARTBEAT, bytes(8), pad=4096)
    assert svc.answer(big) is None
    # the packet stays in the ring in Linux: nothing after it is answered
    assert svc.answer(message(hv_ic.ICMSGTYPE_HEARTBEAT, bytes(40))) is None
    assert svc.stalled


@pytest.mark.parametrize("service,limit", [("heartbeat", 4096), ("shutdown", 4096),
                                           ("timesync", 4096), ("vss", 8192),
                                           ("fcopy", 8192), ("kvp", 16384)])
def test_receive_buffers(service: str, limit: int) -> None:
    assert make_service(service, platform()).recv_limit == limit       # §1.8


# -- heartbeat (§2.1) --------------------------------------------------------------------------

def test_heartbeat_adds_one_in_place() -> None:
    svc = HeartbeatService("heartbeat", platform())
    req = hv_ic.heartbeat_request(0x10, (3, 0), (3, 0))
    reply = svc.answer(req)
    assert reply is not None and len(reply) == len(req)
    assert struct.unpack_from("<Q", reply, 28)[0] == 0x11 and reply[FLAGS_OFF] == 0x05
    expect = bytearray(req)
    expect[28] = 0x11
    expect[FLAGS_OFF] = 0x05
    assert reply == expect                                # nothing else changes


def test_heartbeat_reference_example_and_wrap() -> None:
    # §2.1's openvmm-sized body: 44 bytes padded to 48, seq 0x10
    req = bytes.fromhex("0100000024000000" "0300000001000300000010000000000000030000"
                        "1000000000000000" "0100000000000000" "00000000")
    reply = HeartbeatService("heartbeat", platform()).answer(req)
    assert reply is not None and len(reply) == 48 and reply[28] == 0x11
    req = message(hv_ic.ICMSGTYPE_HEARTBEAT, struct.pack("<Q", 2**64 - 1))
    reply = HeartbeatService("heartbeat", platform()).answer(req)
    assert reply is not None and struct.unpack_from("<Q", reply, 28)[0] == 0


def test_heartbeat_without_seq_dropped(logs: Logs) -> None:
    logs.expect(r"Invalid heartbeat msg data\. Packet length too small: 35")
    req = message(hv_ic.ICMSGTYPE_HEARTBEAT, bytes(7))
    assert HeartbeatService("heartbeat", platform()).answer(req) is None


@pytest.mark.parametrize("cls", [HeartbeatService, ShutdownService, TimesyncService])
def test_wrong_type_answered_e_fail(cls: type, logs: Logs) -> None:
    logs.expect(r"request received\. Invalid msg type: 7")
    svc = cls(cls.__name__.removesuffix("Service").lower(), platform())
    req = message(7, bytes(64))
    reply = svc.answer(req)
    assert reply is not None and struct.unpack_from("<I", reply, STATUS_OFF)[0] == HV_E_FAIL
    assert reply[FLAGS_OFF] == 0x05 and len(reply) == len(req)


@pytest.mark.parametrize("cls", [VssService, FcopyService])
def test_wrong_type_unanswered(cls: type, logs: Logs) -> None:
    logs.expect(r"request received\. Invalid msg type: 1")
    svc = cls(cls.__name__.removesuffix("Service").lower(), platform())
    assert svc.answer(message(1, bytes(64))) is None


# -- shutdown (§2.2) ---------------------------------------------------------------------------

SHUTDOWN_TABLE = [        # flags: status, action Linux takes (§2.2 table)
    (0, HV_S_OK, "poweroff"), (1, HV_S_OK, "poweroff"), (2, HV_S_OK, "reboot"),
    (3, HV_S_OK, "reboot"), (4, HV_E_FAIL, None), (5, HV_E_FAIL, None),
    (6, HV_E_FAIL, None), (8, HV_E_FAIL, None), (0xFFFFFFFF, HV_E_FAIL, None),
]


def shutdown_body(flags: int) -> bytes:
    # reason_code @28, timeout_seconds @32, flags @36, display_message[2048] @40
    return struct.pack("<III", 0x80000000, 0, flags) + bytes(2048)


@pytest.mark.parametrize("flags,status,action", SHUTDOWN_TABLE)
def test_shutdown_flags(flags: int, status: int, action: str | None) -> None:
    actions: list[str] = []
    svc = ShutdownService("shutdown", platform(power=actions.append))
    req = message(hv_ic.ICMSGTYPE_SHUTDOWN, shutdown_body(flags))
    assert len(req) == 2088                                       # §2.2: packet 2088 B
    reply = svc.answer(req)
    assert reply is not None and len(reply) == 2088
    assert struct.unpack_from("<I", reply, STATUS_OFF)[0] == status
    assert reply[FLAGS_OFF] == 0x05
    assert actions == []                                # the action waits for the reply
    svc.after_reply()
    assert actions == ([action] if action else [])


@pytest.mark.parametrize("flags", [4, 5])
def test_hibernate_when_the_platform_supports_it(flags: int) -> None:
    actions: list[str] = []
    svc = ShutdownService("shutdown", platform(power=actions.append, hibernation=True))
    reply = svc.answer(message(hv_ic.ICMSGTYPE_SHUTDOWN, shutdown_body(flags)))
    assert reply is not None and struct.unpack_from("<I", reply, STATUS_OFF)[0] == HV_S_OK
    svc.after_reply()
    assert actions == ["hibernate"] and svc.last_request == "hibernate"


def test_shutdown_body_too_short(logs: Logs) -> None:
    logs.expect(r"Invalid shutdown msg data\. Packet length too small: 2087")
    req = message(hv_ic.ICMSGTYPE_SHUTDOWN, shutdown_body(0)[:-1])
    assert ShutdownService("shutdown", platform()).answer(req) is None


# -- timesync (§2.3) ---------------------------------------------------------------------------

WLTIMEDELTA = 116444736000000000                      # §2.3, 100-ns ticks 1601→1970


def timesync_platform(clock: FakeClock, guest_ns: int) -> HvUtilsPlatform:
    return platform(reference_time=ReferenceTime(clock), realtime_ns=lambda: guest_ns)


def test_timesync_v4_sample_offset_and_reference_correction() -> None:
    clock = FakeClock()
    guest_ns = 1_700_000_000 * 10**9
    svc = TimesyncService("timesync", timesync_platform(clock, guest_ns))
    negotiated(svc, (4, 0))
    host_ns = guest_ns + 3600 * 10**9                  # the host runs an hour ahead
    parent = host_ns // 100 + WLTIMEDELTA
    clock.ns = 5_000_000                               # the counter now reads 50000 ticks
    # the host read its clock 1000 ticks (100 µs) before the guest handles the sample
    body = struct.pack("<QQBBB5x", parent, 49000, 2, 0, 0)   # ictimesync_ref_data + pad
    reply = svc.answer(message(hv_ic.ICMSGTYPE_TIMESYNC, body))
    assert reply is not None and reply[FLAGS_OFF] == 0x05
    assert struct.unpack_from("<I", reply, STATUS_OFF)[0] == 0
    s = svc.sample
    assert s is not None and s.parent_time == parent and s.reference_time == 49000
    assert s.host_time == parent + 1000
    assert s.offset_ns == 3600 * 10**9 + 100_000
    assert svc.syncs == 0
    clock.ns += 10**9                                  # one second later
    assert svc.host_time_ns() == host_ns + 100_000 + 10**9


def test_timesync_sync_flag_counted() -> None:
    svc = TimesyncService("timesync", timesync_platform(FakeClock(), 0))
    negotiated(svc, (4, 0))
    svc.answer(message(hv_ic.ICMSGTYPE_TIMESYNC, struct.pack("<QQB", WLTIMEDELTA, 0, 1)
                       + bytes(5)))
    assert svc.syncs == 1 and svc.sample is not None and svc.sample.flags == 1


def test_timesync_before_4_0_uses_the_older_body(logs: Logs) -> None:
    logs.expect(r"Invalid ictimesync data\. Packet length too small: 52")
    svc = TimesyncService("timesync", timesync_platform(FakeClock(), 0))
    negotiated(svc, (3, 0))
    # ictimesync_data: parenttime, childtime, roundtriptime, flags = 25 bytes (Linux)
    assert svc.answer(message(hv_ic.ICMSGTYPE_TIMESYNC, bytes(24))) is None
    reply = svc.answer(message(hv_ic.ICMSGTYPE_TIMESYNC,
                               struct.pack("<QQQB", WLTIMEDELTA + 7, 0, 0, 2)))
    assert reply is not None and svc.sample is not None
    assert svc.sample.parent_time == WLTIMEDELTA + 7 and svc.sample.flags == 2


def test_timesync_v4_needs_22_bytes(logs: Logs) -> None:
    logs.expect(r"Invalid ictimesync ref data\. Packet length too small: 49")
    svc = TimesyncService("timesync", timesync_platform(FakeClock(), 0))
    negotiated(svc, (4, 0))
    assert svc.answer(message(hv_ic.ICMSGTYPE_TIMESYNC, bytes(21))) is None
    assert svc.answer(message(hv_ic.ICMSGTYPE_TIMESYNC, bytes(22))) is not None


def test_host_time_needs_a_fresh_sample() -> None:
    clock = FakeClock()
    svc = TimesyncService("timesync", timesync_platform(clock, 0))
    negotiated(svc, (4, 0))
    with pytest.raises(OSError) as e:
        svc.host_time_ns()
    assert e.value.errno == errno.ENODATA
    svc.answer(message(hv_ic.ICMSGTYPE_TIMESYNC, struct.pack("<QQB", WLTIMEDELTA, 0, 2)
                       + bytes(5)))
    clock.ns = 601 * 10**9                             # over 600 s old (hv_util.c)
    with pytest.raises(OSError) as e:
        svc.host_time_ns()
    assert e.value.errno == errno.ESTALE


# -- VSS and fcopy without their daemons (§2.5, §2.6) ------------------------------------------

VSS_TABLE = [  # operation: status a guest without hv_vss_daemon answers
    (0, HV_S_OK), (1, HV_S_OK), (2, HV_E_FAIL), (3, HV_S_OK), (4, HV_S_OK),
    (5, HV_E_FAIL), (6, HV_E_FAIL), (7, HV_S_OK), (200, HV_S_OK)]


@pytest.mark.parametrize("op,status", VSS_TABLE)
def test_vss_without_daemon(op: int, status: int) -> None:
    svc = VssService("vss", platform())
    # hv_vss_msg: operation @28, reserved[7], flags @36 (12 bytes)
    req = message(hv_ic.ICMSGTYPE_VSS, struct.pack("<B7xI", op, 0xAAAAAAAA))
    reply = svc.answer(req)
    assert reply is not None and len(reply) == len(req) and reply[FLAGS_OFF] == 0x05
    assert struct.unpack_from("<I", reply, STATUS_OFF)[0] == status
    flags = struct.unpack_from("<I", reply, 36)[0]
    assert flags == (0 if op == 3 else 0xAAAAAAAA)      # GET_DM_INFO answers flags 0


def test_vss_short_dropped(logs: Logs) -> None:
    logs.expect(r"Invalid VSS msg\. Packet length too small: 39")
    assert VssService("vss", platform()).answer(
        message(hv_ic.ICMSGTYPE_VSS, bytes(11))) is None


@pytest.mark.parametrize("op", [0, 1, 2, 3, 99])
def test_fcopy_without_daemon(op: int) -> None:
    svc = FcopyService("fcopy", platform())
    req = message(hv_ic.ICMSGTYPE_FCOPY, struct.pack("<I32x", op))   # hv_fcopy_hdr, 36 B
    reply = svc.answer(req)
    assert reply is not None and struct.unpack_from("<I", reply, STATUS_OFF)[0] == HV_E_FAIL
    assert reply[FLAGS_OFF] == 0x05 and len(reply) == len(req)


def test_fcopy_short_dropped(logs: Logs) -> None:
    logs.expect(r"Invalid Fcopy hdr\. Packet length too small: 63")
    assert FcopyService("fcopy", platform()).answer(
        message(hv_ic.ICMSGTYPE_FCOPY, bytes(35))) is None
