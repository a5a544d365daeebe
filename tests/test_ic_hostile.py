"""Hostile IC messages, generated (hypothesis, over 10,000 cases each way).

Host → guest: whatever the host puts on a util channel, the guest's service answers as Linux
does or not at all, never raises: a reply has the request's length, flags
TRANSACTION|RESPONSE, and the request's pipe header, message type, versions and transaction
id; a packet shorter than ``icmsg_hdr`` or longer than the receive buffer gets nothing (the
latter silences the channel); KVP, VSS and fcopy drop other message types, the other three
answer them HV_E_FAIL; the KVP pool files stay whole records.

Guest → host: whatever the guest answers, the host's IC never raises: it takes a well-formed
negotiation answer whose versions it offered, drops other message types while negotiating,
and stops (state ``failed``, the request in flight failed with EPROTO) on anything openvmm
refuses; a KVP answer it cannot parse stops it the same way.

Also generated: the contents users may leave in the pool files (the daemon still answers,
and rewrites whole records) and the text users may write to the host's control files (a
bad request is EINVAL before anything is sent).

Warnings the hostile input provokes are checked against the list of what each side may say
(anything else fails the test), rather than declared one by one.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import re
import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends.vmbus.ic import (
    FRAMEWORKS,
    IC_SERVICES,
    IcDevice,
    IcHostSettings,
    KvpIc,
    _Pending,
    make_ic,
)
from tests.hostile_cases import cases
from vbusfs.drivers.vmbus.hv_kvp import KvpService
from vbusfs.drivers.vmbus.hv_utils import make_service
from vbusfs.drivers.vmbus.kvp_daemon import KvpDaemon, OsIdentity
from vbusfs.drivers.vmbus.util_service import HvUtilsPlatform, UtilService
from vbusfs.protocols.vmbus import hv_ic, hv_kvp
from vbusfs.protocols.vmbus.ring import Packet, PacketType
from vbusfs.sysfs import Attribute, DataFile, Tree

EXAMPLES = cases(10_500)
SERVICES = ["heartbeat", "shutdown", "timesync", "kvp", "vss", "fcopy"]
MSGTYPE = {"heartbeat": 1, "kvp": 2, "shutdown": 3, "timesync": 4, "vss": 5, "fcopy": 7}
LIMIT = {"heartbeat": 4096, "shutdown": 4096, "timesync": 4096, "vss": 8192, "fcopy": 8192,
         "kvp": 16384}                                                  # reference §1.8
E_FAIL = 0x80004005
GUEST_SAYS = [r"request received\. (Packet length too small|Invalid msg type|Could not read)",
              r"^Invalid \w[\w ]* (msg data|ref data|data|msg|hdr)\. Packet length too small",
              r"invalid icmsg negotiate", r"^KVP: pool \d+ does not exist"]
HOST_SAYS = [r"IC: protocol error, the IC stops", r"IC: dropping a type \d+ reply while "
             r"negotiating", r"IC: dropping a reply to no request"]


@contextlib.contextmanager
def only_logs(name: str, allowed: list[str]) -> Iterator[None]:
    """Warnings from ``name`` must match one of ``allowed``; they stay out of the test-wide
    log check, which would otherwise want each declared pattern to appear."""
    seen: list[logging.LogRecord] = []

    class Check(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    logger = logging.getLogger(name)
    handler = Check(logging.WARNING)
    logger.addHandler(handler)
    old = logger.propagate
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = old
    for r in seen:
        msg = r.getMessage()
        assert any(re.search(p, msg) for p in allowed), f"unexpected warning: {msg}"


# -- host → guest ----------------------------------------------------------------------------

def _guest(service: str) -> tuple[UtilService, Tree]:
    tree = Tree()
    svc = make_service(service, HvUtilsPlatform(power=lambda _: None))
    if isinstance(svc, KvpService):
        svc.daemon = KvpDaemon(OsIdentity("L", "1", "", "6", "6-x", "x86_64"), fqdn="g")
        svc.daemon.attach(tree.root)
    return svc, tree


def _header(msgtype: int, body_len: int, flags: int, status: int, txid: int,
            pipe_type: int, pipe_size: int | None) -> bytes:
    hdr = struct.pack("<HHHHHHIBBxx", 3, 0, msgtype, 3, 0, body_len & 0xFFFF, status, txid,
                      flags)
    size = 20 + body_len if pipe_size is None else pipe_size
    return struct.pack("<II", pipe_type, size & 0xFFFFFFFF) + hdr


@st.composite
def host_messages(draw: st.DrawFn) -> tuple[str, bytes, int | None]:
    """(service, payload, the version the guest has negotiated)."""
    service = draw(st.sampled_from(SERVICES))
    own = MSGTYPE[service]
    msgtype = draw(st.one_of(st.just(own), st.just(0), st.integers(0, 9),
                             st.integers(0, 0xFFFF)))
    kind = draw(st.sampled_from(["random", "negotiate", "shaped"]))
    if kind == "negotiate":
        msgtype = 0
        f, m = draw(st.integers(0, 120)), draw(st.integers(0, 120))
        n = draw(st.integers(0, 8))
        versions = b"".join(struct.pack("<HH", draw(st.integers(0, 6)), draw(st.integers(0, 3)))
                            for _ in range(n))
        body = struct.pack("<HHI", f, m, 0) + versions
    elif kind == "shaped" and msgtype == 2:
        body = bytearray(draw(st.sampled_from([2580, 7428, 520, 8, 0])))
        if len(body) >= 2:
            body[0] = draw(st.integers(0, 10))
            body[1] = draw(st.integers(0, 7))
        for off in (4, 8, 12, 16):
            if off + 4 <= len(body) and draw(st.booleans()):
                struct.pack_into("<I", body, off, draw(st.sampled_from(
                    [0, 1, 2, 4, 8, 11, 510, 512, 2048, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF])))
        for off in (16, 20, 528, 532):
            if off < len(body) and draw(st.booleans()):
                text = draw(st.binary(max_size=64))
                body[off:off + len(text)] = text[:len(body) - off]
        body = bytes(body)
    elif kind == "shaped":
        size = {1: 40, 3: 2060, 4: 24, 5: 12, 7: 1088}.get(msgtype, 16)
        body = bytearray(draw(st.binary(min_size=size, max_size=size)))
        if msgtype == 3:
            struct.pack_into("<I", body, 8, draw(st.integers(0, 8)))
        if msgtype == 5:
            body[0] = draw(st.integers(0, 9))
        body = bytes(body[:draw(st.integers(0, len(body)))]) if draw(st.booleans()) else \
            bytes(body)
    else:
        body = draw(st.binary(max_size=300))
    msg = _header(msgtype, len(body), draw(st.integers(0, 255)), draw(st.integers(0, 2**32 - 1)),
                  draw(st.integers(0, 255)), draw(st.sampled_from([1, 0, 2, 5])),
                  draw(st.one_of(st.none(), st.integers(0, 2**32 - 1)))) + body
    cut = draw(st.one_of(st.none(), st.integers(0, len(msg))))
    if cut is not None:
        msg = msg[:cut]
    msg += bytes(draw(st.sampled_from([0, 0, 4, 7, 16400])))          # VMBus padding, or way
    version = draw(st.sampled_from([None, (1, 0), (3, 0), (4, 0)]))
    return service, msg, version


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(host_messages())
def test_guest_answers_anything_the_host_sends(case: tuple[str, bytes, int | None]) -> None:
    service, payload, version = case
    svc, tree = _guest(service)
    svc.version = version  # type: ignore[assignment]
    with only_logs("vbusfs.drivers.vmbus.hv_utils", GUEST_SAYS):
        reply = svc.answer(payload)
        svc.after_reply()
        again = svc.answer(payload[:64])
    if len(payload) > LIMIT[service]:
        assert reply is None and svc.stalled and again is None
        return
    if len(payload) < 28:
        assert reply is None
        return
    (msgtype,) = struct.unpack_from("<H", payload, 12)
    if msgtype not in (0, MSGTYPE[service]) and service in ("kvp", "vss", "fcopy"):
        assert reply is None
        return
    if reply is None:
        # only a body too short for the service's message goes unanswered
        assert msgtype == MSGTYPE[service] and service != "kvp"
        return
    assert len(reply) == len(payload) and reply[25] == 0x05
    assert reply[:18] == payload[:18] and reply[24] == payload[24]     # txid echoed
    assert reply[26:28] == payload[26:28]
    if msgtype != 0:
        assert reply[18:20] == payload[18:20]                           # icmsgsize kept
    if msgtype not in (0, MSGTYPE[service]):
        assert struct.unpack_from("<I", reply, 20)[0] == E_FAIL
    if service == "heartbeat" and msgtype == 1:
        seq = struct.unpack_from("<Q", payload, 28)[0]
        assert struct.unpack_from("<Q", reply, 28)[0] == (seq + 1) % 2**64
    if service == "shutdown" and msgtype == 3:
        flags = struct.unpack_from("<I", payload, 36)[0]
        want = 0 if flags in (0, 1, 2, 3) else E_FAIL       # no hibernation on this platform
        assert struct.unpack_from("<I", reply, 20)[0] == want
    if service == "kvp":
        for n in range(5):
            f = tree.resolve(f"var/lib/hyperv/.kvp_pool_{n}")
            assert isinstance(f, DataFile) and len(f.data) % hv_kvp.KVP_RECORD_SIZE == 0


# -- guest → host ----------------------------------------------------------------------------

def _host(service: str, negotiating: bool) -> tuple[IcDevice, _Pending | None]:
    ic = make_ic(service, IcHostSettings())
    if negotiating:
        ic.state = "negotiating"
        return ic, None
    ic.state, ic.framework, ic.version = "ready", (3, 0), IC_SERVICES[service][1][-1]
    pending = _Pending()
    ic._pending = pending
    return ic, pending


@st.composite
def guest_replies(draw: st.DrawFn) -> tuple[str, bool, bytes]:
    service = draw(st.sampled_from(SERVICES))
    negotiating = draw(st.booleans())
    msgtype, offered = IC_SERVICES[service]
    if negotiating and draw(st.booleans()):
        # a real answer, then perhaps spoiled
        req = hv_ic.negotiate_request(FRAMEWORKS, offered)
        fw = [draw(st.sampled_from([(3, 0), (1, 0), (2, 0)]))]
        srv = [draw(st.sampled_from([*offered, (9, 9)]))]
        reply, _ = hv_ic.guest_negotiate(req, fw, srv)
        payload = bytearray(reply)
    else:
        body = draw(st.binary(max_size=3000))
        hdr = _header(draw(st.sampled_from([msgtype, 0, 1, 2, 3, 4])), len(body),
                      draw(st.sampled_from([0x05, 0x05, 0x01, 0x04, 0x03, 0xFF])),
                      draw(st.sampled_from([0, 0x80070103, 0x80004005, 1])),
                      draw(st.sampled_from([0, 0, 1])), draw(st.sampled_from([1, 1, 2])),
                      draw(st.one_of(st.none(), st.integers(0, 2**32 - 1))))
        payload = bytearray(hdr + body)
    for _ in range(draw(st.integers(0, 3))):
        if payload:
            payload[draw(st.integers(0, len(payload) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.one_of(st.none(), st.integers(0, len(payload))))
    return service, negotiating, bytes(payload if cut is None else payload[:cut])


def _packet(payload: bytes) -> Packet:
    return Packet(PacketType.DATA_INBAND, 0, 0, b"", payload)


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(guest_replies())
def test_host_takes_anything_the_guest_answers(case: tuple[str, bool, bytes]) -> None:
    service, negotiating, payload = case
    ic, pending = _host(service, negotiating)
    parse_failed = False
    with only_logs("backends.vmbus.ic", HOST_SAYS):
        ic.handle_packet(_packet(payload))
        if isinstance(ic, KvpIc) and ic.state == "ready" and pending is not None and \
                pending.reply is not None:
            # what KvpIc.enumerate does with the answer it got
            try:
                ic._parse(pending.reply.payload, hv_kvp.ENUM_DATA, None)
            except OSError as e:
                assert e.errno == errno.EPROTO and ic.state == "failed"
                parse_failed = True
    assert ic.state in ("negotiating", "ready", "failed")
    if ic.state == "failed":
        assert isinstance(ic.failure, str)
        if pending is not None and not parse_failed:
            assert pending.error is not None and pending.error.errno == errno.EPROTO
        if not parse_failed:
            return
    if negotiating and ic.state == "ready":
        assert ic.framework in FRAMEWORKS and ic.version in IC_SERVICES[service][1]
        fws, srvs = hv_ic.parse_versions(payload)
        assert (fws, srvs) == ([ic.framework], [ic.version])
    if not negotiating:
        assert pending is not None and pending.reply is not None
        assert pending.reply.payload == payload
        # what it took passes openvmm's checks
        ptype, size = struct.unpack_from("<II", payload)
        assert ptype == 1 and 20 <= size <= len(payload) - 8 and payload[25] & 0x05 == 0x05
        assert payload[24] == 0


# -- what users write into the pool files ------------------------------------------------------

@st.composite
def pool_contents(draw: st.DrawFn) -> bytes:
    out = b""
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.one_of(st.binary(max_size=40), st.just(b"K" * 512),
                             st.text(max_size=20).map(str.encode)))
        value = draw(st.one_of(st.binary(max_size=40), st.just(b"V" * 2048)))
        out += key[:512].ljust(512, draw(st.sampled_from([b"\0", b"\xff", b"A"]))) + \
            value[:2048].ljust(2048, b"\0")
    return out + draw(st.binary(max_size=100))            # and a partial record


@settings(max_examples=2000, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(pool_contents(), st.sampled_from([0, 1, 2, 3]), st.integers(0, 5),
       st.text(min_size=1, max_size=8).filter(lambda k: "\0" not in k))
def test_the_daemon_takes_any_pool_file(contents: bytes, op: int, index: int,
                                        key: str) -> None:
    """Whatever a user left in a pool file, the daemon answers (S_OK, S_CONT or E_FAIL for
    what it cannot convert) and rewrites only whole records."""
    svc, tree = _guest("kvp")
    f = tree.resolve("var/lib/hyperv/.kvp_pool_1")
    assert isinstance(f, DataFile)
    f.write(0, contents)
    if op == hv_kvp.KvpOp.ENUMERATE:
        req = hv_kvp.kvp_request(op, 1, (3, 0), (4, 0), index=index)
    else:
        req = hv_kvp.kvp_request(op, 1, (3, 0), (4, 0), key=key, value="v")
    with only_logs("vbusfs.drivers.vmbus.hv_utils", GUEST_SAYS):
        reply = svc.answer(req)
    assert reply is not None and len(reply) == len(req)
    assert struct.unpack_from("<I", reply, 20)[0] in (0, 0x80070103, E_FAIL)
    if op in (hv_kvp.KvpOp.SET, hv_kvp.KvpOp.DELETE) and \
            struct.unpack_from("<I", reply, 20)[0] == 0:
        assert len(f.data) % hv_kvp.KVP_RECORD_SIZE == 0


# -- what users write into the host's control files ----------------------------------------------

@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["shutdown", "kvp", "vss", "fcopy", "timesync_skew"]),
       st.one_of(st.text(max_size=60), st.sampled_from([
           "set 0 k v", "set 9 k v", "get external k", "list auto", "enumerate 1 -1",
           "set 0 'k v' 5 dword", "set 0 k 99999999999 dword", "reboot force", "freeze",
           "start a b 1 2", "write 0 hi", "complete extra", "nan", "1e99", "-5"])))
def test_control_files_take_any_text(name: str, text: str) -> None:
    """A request is either refused as EINVAL before anything is sent, or sent; here no IC
    is negotiated, so a request that would be sent fails with ENOTCONN."""
    import trio
    node = _controls().resolve(name)
    assert isinstance(node, Attribute)

    async def write() -> object:
        return await node.write(text.encode())  # type: ignore[misc]
    try:
        trio.run(write)
    except OSError as e:
        assert e.errno in (errno.EINVAL, errno.ENOTCONN), e
    else:
        assert name == "timesync_skew"        # a valid skew is kept until the IC is up


BAD_REQUESTS = {
    "kvp": ["set 9 k v", "set 0 k", "get", "frob 0", "enumerate 1 -1", "enumerate 1 x",
            "set 0 k 99999999999 dword", "set 0 k v float", "", "'unbalanced", "list 0 extra",
            "set 0 '' v", "set external " + "k" * 256 + " v"],
    "shutdown": ["", "halt", "reboot now", "shutdown force force"],
    "vss": ["", "melt", "256", "-1"],
    "fcopy": ["complete extra", "write x y", "start a", "cancel 1", "write 0 " + "x" * 6145],
    "timesync_skew": ["nan", "1e99", "soon", "", "inf"],
}
GOOD_REQUESTS = {
    "kvp": ["set 0 k v", "set guest 'a key' 'a value' string", "get auto_external k",
            "delete 4 k", "enumerate 2 9", "list 1", "set 0 n 4294967295 dword"],
    "shutdown": ["shutdown", "reboot force", "hibernate"],
    "vss": ["freeze", "7", "get_dm_info"],
    "fcopy": ["start a.txt /tmp 3 1", "write 0 hello", "complete", "cancel"],
}


@pytest.mark.parametrize("name,text", [(n, t) for n, ts in BAD_REQUESTS.items() for t in ts])
async def test_bad_control_requests_are_einval(name: str, text: str) -> None:
    node = _controls().resolve(name)
    with pytest.raises(OSError) as e:
        await node.write(text.encode())  # type: ignore[attr-defined, misc]
    assert e.value.errno == errno.EINVAL


@pytest.mark.parametrize("name,text", [(n, t) for n, ts in GOOD_REQUESTS.items() for t in ts])
async def test_good_control_requests_reach_the_ic(name: str, text: str) -> None:
    node = _controls().resolve(name)
    with pytest.raises(OSError) as e:                  # no IC is negotiated here
        await node.write(text.encode())  # type: ignore[attr-defined, misc]
    assert e.value.errno == errno.ENOTCONN


def _controls() -> Tree:
    from backends.vmbus.ic import FcopyIc, KvpIc, ShutdownIc, TimesyncIc, VssIc
    from vbusfs.machine.ic_control import add_host_controls
    from vbusfs.platform.vmbus.reference_time import ReferenceTime
    ics: dict[str, IcDevice] = {"shutdown": ShutdownIc(), "kvp": KvpIc(), "vss": VssIc(),
                                "fcopy": FcopyIc(), "timesync": TimesyncIc(ReferenceTime())}
    tree = Tree()
    add_host_controls(tree.root, ics, lambda kind: "log")
    return tree
