"""IC negotiation and heartbeat against the worked example in reference/hv-services.md §1.7."""

import struct

from tests.conftest import Logs
from vbusfs.drivers.vmbus.hv_utils import UtilService
from vbusfs.protocols.vmbus import hv_ic

# host→guest heartbeat negotiation, 52 bytes, from the reference (hex offsets there)
HOST_REQ = bytes.fromhex(
    "01000000" "2c000000"
    "0000" "0000" "0000" "0000" "0000" "1800"
    "00000000" "00" "03" "0000"
    "0200" "0200" "00000000"
    "01000000" "03000000" "01000000" "03000000")


def test_host_negotiate_request_bytes() -> None:
    assert hv_ic.negotiate_request([(1, 0), (3, 0)], [(1, 0), (3, 0)]) == HOST_REQ


def test_guest_reply_matches_reference() -> None:
    padded = HOST_REQ + bytes(4)                      # VMBus pads the payload to 56
    reply, chosen = hv_ic.guest_negotiate(padded, [(3, 0), (1, 0)], [(3, 0), (1, 0)])
    expect = bytearray(padded)
    expect[0x12:0x14] = b"\x10\x00"                   # icmsgsize 16
    expect[0x19] = 0x05                               # TRANSACTION | RESPONSE
    expect[0x1C:0x20] = b"\x01\x00\x01\x00"           # one version each
    expect[0x24:0x28] = b"\x03\x00\x00\x00"           # framework 3.0
    expect[0x28:0x2C] = b"\x03\x00\x00\x00"           # heartbeat 3.0
    assert bytes(reply) == bytes(expect) and chosen == (3, 0)
    assert len(reply) == 56


def test_no_common_version() -> None:
    req = hv_ic.negotiate_request([(1, 0)], [(9, 9)])
    reply, chosen = hv_ic.guest_negotiate(req, [(3, 0), (1, 0)], [(3, 0)])
    assert chosen is None
    assert struct.unpack_from("<HH", reply, 28) == (0, 0)


def test_heartbeat_adds_one() -> None:
    svc = UtilService("heartbeat")
    req = hv_ic.heartbeat_request(0x10, (3, 0), (3, 0))
    reply = svc.answer(req)
    assert reply is not None
    assert struct.unpack_from("<Q", reply, 28)[0] == 0x11
    assert reply[25] == 0x05 and len(reply) == len(req)


def test_truncated_ic_packet_dropped(logs: Logs) -> None:
    logs.expect(r"heartbeat: IC packet of 2 bytes dropped")
    assert UtilService("heartbeat").answer(b"\x01\x00") is None
