"""The host's IC models against a hand-played guest on a fake channel: the bytes the host
sends (openvmm's negotiation, shutdown, timesync and KVP requests, reference/hv-services.md
§1.7, §2.2–2.4) and what it does with each kind of answer (openvmm's checks, §1.5)."""

from __future__ import annotations

import errno
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing

from backends.vmbus.ic import IcDevice, KvpIc, KvpItem, ShutdownIc, TimesyncIc
from tests.conftest import Logs
from vbusfs.platform.vmbus.reference_time import ReferenceTime
from vbusfs.protocols.vmbus.ring import Packet, PacketType

MockClock = trio.testing.MockClock
WLTIMEDELTA = 116444736000000000


@dataclass
class FakeChannel:
    """What the IC model sees of its channel; the test plays the guest."""

    name: str = "fake"
    sent: list[bytes] = field(default_factory=list)
    got_one: trio.Event = field(default_factory=trio.Event)
    inbox: list[Packet] = field(default_factory=list)
    arrived: trio.Event = field(default_factory=trio.Event)

    async def send(self, ptype: int, flags: int, trans_id: int, payload: bytes) -> None:
        assert (ptype, flags, trans_id) == (PacketType.DATA_INBAND, 0, 0)   # §1.1
        self.sent.append(payload)
        self.got_one.set()

    async def receive(self) -> list[Packet]:
        while not self.inbox:
            await self.arrived.wait()
            self.arrived = trio.Event()
        batch, self.inbox = self.inbox, []
        return batch

    def answer(self, payload: bytes) -> None:
        self.inbox.append(Packet(PacketType.DATA_INBAND, 0, 0, b"", payload))
        self.arrived.set()

    async def next_request(self) -> bytes:
        while not self.sent:
            await self.got_one.wait()
            self.got_one = trio.Event()
        return self.sent.pop(0)


def reply_to(req: bytes, **fields: int) -> bytes:
    """The request as a Linux guest returns it: flags 0x05, status as given."""
    buf = bytearray(req)
    buf[25] = fields.get("flags", 0x05)
    struct.pack_into("<I", buf, 20, fields.get("status", 0))
    buf[24] = fields.get("txid", 0)
    return bytes(buf)


def negotiated_reply(req: bytes, fw: tuple[int, int], srv: tuple[int, int],
                     counts: tuple[int, int] = (1, 1)) -> bytes:
    buf = bytearray(reply_to(req))
    struct.pack_into("<HH4xHHHH", buf, 28, *counts, *fw, *srv)
    return bytes(buf)


async def running(nursery: trio.Nursery, ic: IcDevice) -> FakeChannel:
    chan = FakeChannel()
    nursery.start_soon(ic.run, chan)        # type: ignore[arg-type]
    return chan


async def negotiate(chan: FakeChannel, fw: tuple[int, int], srv: tuple[int, int]) -> bytes:
    req = await chan.next_request()
    chan.answer(negotiated_reply(req, fw, srv))
    await trio.sleep(0.01)
    return req


@pytest.fixture
async def shutdown(nursery: trio.Nursery) -> AsyncIterator[tuple[ShutdownIc, FakeChannel]]:
    ic = ShutdownIc()
    yield ic, await running(nursery, ic)


async def test_negotiation_request_is_openvmms(
        shutdown: tuple[ShutdownIc, FakeChannel], autojump_clock: MockClock) -> None:
    ic, chan = shutdown
    req = await chan.next_request()
    # pipe DATA, msgsize; header 0.0 / type 0 / 0.0 / size; status 0, txid 0, flags 0x03
    assert struct.unpack_from("<II", req) == (1, len(req) - 8)
    assert struct.unpack_from("<HHHHHHIBB", req, 8) == (0, 0, 0, 0, 0, 8 + 4 * 6, 0, 0, 3)
    assert struct.unpack_from("<HH", req, 28) == (2, 4)
    assert struct.unpack_from("<12H", req, 36) == (1, 0, 3, 0, 1, 0, 3, 0, 3, 1, 3, 2)
    chan.answer(negotiated_reply(req, (3, 0), (3, 2)))
    await trio.sleep(0.01)
    assert ic.state == "ready" and (ic.framework, ic.version) == ((3, 0), (3, 2))


@pytest.mark.parametrize("kind,force,flags", [("shutdown", False, 0), ("shutdown", True, 1),
                                              ("reboot", False, 2), ("hibernate", True, 5)])
async def test_shutdown_request_bytes(shutdown: tuple[ShutdownIc, FakeChannel],
                                      autojump_clock: MockClock, kind: str, force: bool,
                                      flags: int) -> None:
    ic, chan = shutdown
    await negotiate(chan, (3, 0), (3, 2))
    async with trio.open_nursery() as n:
        result: list[int] = []

        async def ask() -> None:
            result.append(await ic.request(kind, force))
        n.start_soon(ask)
        req = await chan.next_request()
        assert len(req) == 2088                                       # §2.2
        assert struct.unpack_from("<HHHHHH", req, 8) == (3, 0, 3, 3, 2, 2060)
        assert req[25] == 0x03 and req[24] == 0
        assert struct.unpack_from("<III", req, 28) == (0x80000000, 0, flags)
        assert req[40:] == bytes(2048)
        chan.answer(reply_to(req, status=0x80004005))
    assert result == [0x80004005]


async def test_timesync_sends_sync_then_samples(nursery: trio.Nursery,
                                                autojump_clock: MockClock) -> None:
    ref = ReferenceTime(lambda: int(trio.current_time() * 1e9))
    wall = 1_700_000_000 * 10**9
    ic = TimesyncIc(ref, skew_ns=5 * 10**9, interval=5.0,
                    wall_ns=lambda: wall + int(trio.current_time() * 1e9))
    chan = await running(nursery, ic)
    await negotiate(chan, (3, 0), (4, 0))
    last = None
    for flags in (1, 2, 2):                                      # SYNC, then SAMPLEs
        req = await chan.next_request()
        assert len(req) == 28 + 24 and struct.unpack_from("<H", req, 12)[0] == 4
        parent, vmref, f = struct.unpack_from("<QQB", req, 28)
        assert f == flags
        # the clock and the counter are read together: the counter's ticks are the
        # virtual time here, so parent time is the host clock at that same instant
        assert parent == (wall + vmref * 100 + 5 * 10**9) // 100 + WLTIMEDELTA
        if last is not None:                                     # 5 s after the reply
            assert 5 * 10**7 <= vmref - last <= 5 * 10**7 + 10**6
        last = vmref
        chan.answer(reply_to(req))


async def test_kvp_set_request_bytes(nursery: trio.Nursery, autojump_clock: MockClock) -> None:
    ic = KvpIc()
    chan = await running(nursery, ic)
    await negotiate(chan, (3, 0), (4, 0))
    async with trio.open_nursery() as n:
        n.start_soon(ic.set, 3, KvpItem("Kéy", "välue"))
        req = await chan.next_request()
        # op @28, pool @29, value_type @32, key_size @36, value_size @40, key @44, value @556
        assert len(req) == 28 + 2580 and req[28:30] == b"\x01\x03"
        assert struct.unpack_from("<III", req, 32) == (1, 8, 12)
        assert req[44:52] == "Kéy\0".encode("utf-16-le")
        assert req[556:568] == "välue\0".encode("utf-16-le")
        chan.answer(reply_to(req))


async def test_counts_other_than_one_each_stop_the_ic(
        shutdown: tuple[ShutdownIc, FakeChannel], logs: Logs,
        autojump_clock: MockClock) -> None:
    logs.expect(r"shutdown IC: protocol error, the IC stops: no supported versions")
    ic, chan = shutdown
    req = await chan.next_request()
    buf = bytearray(negotiated_reply(req, (3, 0), (3, 2), counts=(2, 2)))
    chan.answer(bytes(buf))
    await trio.sleep(0.01)
    assert ic.state == "failed"
    with pytest.raises(OSError) as e:
        await ic.request("shutdown")
    assert e.value.errno == errno.EPROTO


@pytest.mark.parametrize("spoil,why", [
    ({"flags": 0x01}, "not a transaction response"),
    ({"flags": 0x06}, "not a transaction response"),
    ({"txid": 1}, "transaction id 1"),
])
async def test_replies_openvmm_refuses(shutdown: tuple[ShutdownIc, FakeChannel], logs: Logs,
                                       autojump_clock: MockClock, spoil: dict[str, int],
                                       why: str) -> None:
    logs.expect(r"shutdown IC: protocol error, the IC stops: .*" + why)
    ic, chan = shutdown
    await negotiate(chan, (3, 0), (3, 2))
    async with trio.open_nursery() as n:
        async def ask() -> None:
            with pytest.raises(OSError) as e:
                await ic.request("reboot")
            assert e.value.errno == errno.EPROTO
        n.start_soon(ask)
        req = await chan.next_request()
        chan.answer(reply_to(req, **spoil))
    assert ic.state == "failed"


async def test_stale_and_unsolicited_replies_are_dropped(
        shutdown: tuple[ShutdownIc, FakeChannel], logs: Logs,
        autojump_clock: MockClock) -> None:
    logs.expect(r"shutdown IC: dropping a type 3 reply while negotiating")
    logs.expect(r"shutdown IC: dropping a reply to no request")
    ic, chan = shutdown
    req = await chan.next_request()
    stale = bytearray(reply_to(req))
    stale[12] = 3                                                   # a SHUTDOWN reply
    chan.answer(bytes(stale))
    chan.answer(negotiated_reply(req, (3, 0), (3, 2)))
    await trio.sleep(0.01)
    assert ic.state == "ready"
    chan.answer(bytes(stale))                                       # nobody asked
    await trio.sleep(0.01)
    assert ic.state == "ready"
