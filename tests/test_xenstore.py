"""xenstored semantics (watches on subtrees, removal, transactions) and the wire protocol
between the guest's client and the daemon over the interface page."""

from __future__ import annotations

import errno
import random
import struct

import pytest
import trio
import trio.testing

from backends.xen.xenstore import Store, XenstoreDaemon
from tests.conftest import Logs
from vbusfs.drivers.xen.xenstore_client import XenstoreClient
from vbusfs.platform.memory import GuestMemory
from vbusfs.platform.xen import xs_ring
from vbusfs.platform.xen.event_channel import EventChannels
from vbusfs.protocols.xen import xenstore as xs


def test_watch_fires_on_register_and_for_subtree() -> None:
    s = Store()
    seen: list[tuple[str, str]] = []
    s.watch("/a", "t", lambda p, t: seen.append((p, t)))
    s.write("/a/b/c", "1")
    s.write("/x", "2")
    s.rm("/a/b")
    assert seen == [("/a", "t"), ("/a/b/c", "t"), ("/a/b", "t")]


def test_removal_fires_watches_inside() -> None:
    s = Store()
    s.write("/a/b/c", "1")
    seen: list[str] = []
    s.watch("/a/b/c", "t", lambda p, t: seen.append(p))
    s.rm("/a")
    assert seen == ["/a/b/c", "/a"]
    assert not s.exists("/a/b")


def test_parents_created_and_bad_paths() -> None:
    s = Store()
    s.write("/a/b/c", "v")
    assert s.read("/a/b") == "" and s.directory("/a") == ["b"]
    for bad in ("a/b", "/a//b", "/a/", "/a b", "/ä"):
        with pytest.raises(OSError) as e:
            s.write(bad, "x")
        assert e.value.errno == errno.EINVAL
    with pytest.raises(OSError) as e:
        s.read("/nope")
    assert e.value.errno == errno.ENOENT


def test_transaction_commit_and_conflict() -> None:
    s = Store()
    s.write("/k", "0")
    fired: list[str] = []
    s.watch("/k", "t", lambda p, t: fired.append(p))
    tx = s.transaction()
    tx.write("/k", "1")
    assert s.read("/k") == "0" and fired == ["/k"]      # invisible until commit
    tx.end(commit=True)
    assert s.read("/k") == "1" and fired == ["/k", "/k"]
    tx = s.transaction()
    tx.read("/k")
    s.write("/k", "2")                                   # someone else got there first
    tx.write("/other", "x")
    with pytest.raises(OSError) as e:
        tx.end(commit=True)
    assert e.value.errno == errno.EAGAIN
    assert not s.exists("/other")


async def _pair() -> tuple[Store, XenstoreDaemon, XenstoreClient, memoryview]:
    mem = GuestMemory(16 << 20)
    ev = EventChannels()
    store = Store()
    pfn = mem.alloc(1)
    gport = ev.alloc_unbound(1, 0)
    hport = ev.bind_interdomain(0, 1, gport)
    daemon = XenstoreDaemon(store, mem, ev)
    daemon.introduce(1, pfn, hport)
    return store, daemon, XenstoreClient(mem, ev, 1, pfn, gport), mem.view(pfn)


async def test_wire_round_trips_relative_paths_and_big_values() -> None:
    store, daemon, client, _ = await _pair()
    store.write("/local/domain/1/device/vbd/51712/state", "1")
    async with trio.open_nursery() as n:
        await n.start(daemon.serve, 1)
        await n.start(client.run)
        assert await client.read("device/vbd/51712/state") == "1"
        assert await client.directory("device/vbd") == ["51712"]
        big = "v" * 4000                      # larger than the 1024-byte rings
        await client.write("data/big", big)
        assert store.read("/local/domain/1/data/big") == big
        assert await client.read("data/big") == big
        with pytest.raises(OSError) as e:
            await client.read("missing")
        assert e.value.errno == errno.ENOENT
        w = await client.watch("device", "tok")
        assert await w.receive() == "device"
        store.write("/local/domain/1/device/vbd/51712/state", "4")
        assert await w.receive() == "device/vbd/51712/state"      # relative, as watched
        # concurrent requests are matched by req_id
        results = {}

        async def get(i: int) -> None:
            await client.write(f"c/{i}", str(i))
            results[i] = await client.read(f"c/{i}")

        async with trio.open_nursery() as inner:
            for i in range(20):
                inner.start_soon(get, i)
        assert results == {i: str(i) for i in range(20)}
        n.cancel_scope.cancel()


async def test_daemon_survives_garbage_and_reports_protocol_errors(logs: Logs) -> None:
    logs.expect(r"xenstore: domain 1 broke the protocol \(payload of 5000 bytes\)")
    _, daemon, _, page = await _pair()
    conn = daemon.connections[1]
    # an unknown type gets an error reply, not a crash
    conn.req.write(xs.pack(99, 7, 0, b"x\0"))
    daemon.pump(conn)
    hdr = xs.HEADER.unpack(conn.rsp.read(16))
    assert hdr[0] == xs.XsType.ERROR and hdr[1] == 7
    assert conn.rsp.read(hdr[3]) == b"ENOSYS\0"
    # an oversized payload breaks the connection with XENSTORE_ERROR_PROTO (3)
    conn.req.write(xs.HEADER.pack(xs.XsType.READ, 8, 0, 5000))
    daemon.pump(conn)
    assert conn.broken and int.from_bytes(page[xs.ERROR_FIELD:xs.ERROR_FIELD + 4],
                                          "little") == 3


def _garbage_request(rng: random.Random) -> tuple[bytes, int | None]:
    """One message a hostile guest might write: (bytes, the req_id a reply must carry, or
    None when the daemon must break the connection instead)."""
    types = [t.value for t in xs.XsType] + [23, 99, 2**31, 2**32 - 1]
    msg_type = rng.choice(types)
    req_id = rng.randrange(2**32)
    tx_id = rng.choice([0, 0, 1, 2, rng.randrange(2**32)])
    words = [b"", b"/", b"a", b"device", b"/local/domain/1/x", b"data/" + b"v" * 300,
             b"\xff\xfe", b"..", b"a//b", b"/" * 5, bytes(rng.randrange(50)),
             rng.randbytes(rng.randrange(60))]
    if rng.random() < 0.6:
        payload = b"\0".join(rng.choice(words) for _ in range(rng.randrange(4)))
        if rng.random() < 0.7:
            payload += b"\0"
    else:
        payload = rng.randbytes(rng.randrange(900))
    length = len(payload)
    if rng.random() < 0.03:                   # a lying header: more than a payload may be
        return xs.HEADER.pack(msg_type, req_id, tx_id,
                              rng.choice([xs.PAYLOAD_MAX + 1, 2**32 - 1])), None
    return xs.HEADER.pack(msg_type, req_id, tx_id, length) + payload, req_id


def garbage_requests(logs: Logs, seed: int, count: int) -> int:
    """``count`` generated messages from a hostile guest, one at a time, straight into the
    daemon: each well-framed one gets exactly one reply under its own req_id (an ERROR, or
    the answer), a header claiming more than 4096 bytes breaks the connection with
    XENSTORE_ERROR_PROTO, and the daemon never raises. Returns the messages sent."""
    logs.expect(r"xenstore: domain 1 broke the protocol")
    rng = random.Random(seed)
    sent = 0

    async def campaign() -> None:
        nonlocal sent
        _, daemon, _, page = await _pair()
        conn = daemon.connections[1]
        while sent < count:
            msg, want = _garbage_request(rng)
            if want is None and conn.req.writable() < len(msg):
                continue
            assert conn.req.writable() >= len(msg)
            conn.req.write(msg)
            daemon.pump(conn)
            sent += 1
            if want is None:
                assert conn.broken and int.from_bytes(
                    page[xs.ERROR_FIELD:xs.ERROR_FIELD + 4], "little") == 3
                _, daemon, _, page = await _pair()       # the next guest
                conn = daemon.connections[1]
                continue
            got = bytearray()
            while True:
                got += conn.rsp.read(conn.rsp.readable())
                if not conn.out:
                    break
                conn.flush()
            replies = []
            while got:
                t, rid, _tx, n = xs.HEADER.unpack_from(got)
                assert len(got) >= xs.HEADER.size + n <= xs.HEADER.size + xs.PAYLOAD_MAX
                del got[:xs.HEADER.size + n]
                if t != xs.XsType.WATCH_EVENT:
                    replies.append(rid)
            assert replies == [want], (msg[:64].hex(), replies)
            assert not conn.broken

    trio.run(campaign)
    return sent


def test_daemon_answers_any_message_once(logs: Logs) -> None:
    assert garbage_requests(logs, 7, 3000) == 3000


def garbage_replies(logs: Logs, seed: int, count: int) -> int:
    """A hostile xenstored: ``count`` generated cases, each a guest READ answered with
    garbage first: replies under other req_ids, any message type under its own (an ERROR
    with any payload included), watch events with any payload for known and unknown
    tokens, a header claiming more than 4096 bytes, or ring indices that cannot be. The
    client's reader never dies, a request ends with its answer or an ``OSError`` and never
    hangs (after a lie the stream cannot be trusted: its pending requests fail ``EIO``),
    and after each case a well-formed answer is taken. Returns the cases run."""
    logs.expect(r"xenstore: the host broke the protocol")
    rng = random.Random(seed)

    async def campaign() -> int:
        _, _, client, page = await _pair()
        ev = client.evtchn
        req = xs_ring.request_ring(page)
        rsp = xs_ring.response_ring(page)
        done = 0
        async with trio.open_nursery() as n:
            await n.start(client.run)
            w = await _watch_without_host(client, n, req, rsp, ev)
            for _ in range(count):
                result: list[object] = []

                async def ask(result: list[object] = result) -> None:
                    try:
                        result.append(await client.read("x"))
                    except OSError as e:
                        result.append(e)

                n.start_soon(ask)
                await trio.testing.wait_all_tasks_blocked()
                _t, rid, _tx, ln = xs.HEADER.unpack(req.read(xs.HEADER.size))
                req.read(ln)
                kind = rng.randrange(6)
                if kind == 0:                                   # replies to nobody
                    for _ in range(rng.randrange(1, 4)):
                        _send(rsp, rng.randrange(24), rng.choice([0, rid + 1, 2**32 - 1]),
                              rng.randbytes(rng.randrange(40)))
                elif kind == 1:                                 # any type, its own id
                    _send(rsp, rng.choice([*range(24), 99, 2**32 - 1]), rid,
                          rng.choice([b"", b"EACCES\0", b"ENOSUCH\0", b"\xff\xfe\0",
                                      rng.randbytes(rng.randrange(200))]))
                elif kind == 2:                                 # watch events
                    for _ in range(rng.randrange(1, 4)):
                        _send(rsp, xs.XsType.WATCH_EVENT, 0, rng.choice([
                            b"", b"\0", b"p\0tok\0", b"p\0nobody\0", b"\xff\0tok\0",
                            rng.randbytes(rng.randrange(60))]))
                elif kind == 3:                                 # a lying header
                    rsp.write(xs.HEADER.pack(xs.XsType.READ, rid, 0,
                                             rng.choice([xs.PAYLOAD_MAX + 1, 2**32 - 1])))
                elif kind == 4:                                 # impossible ring indices
                    struct.pack_into("<I", page, xs.RSP_PROD,
                                     (rng.choice([1025, 4096, 2**31]) +
                                      struct.unpack_from("<I", page, xs.RSP_CONS)[0])
                                     & 0xFFFFFFFF)
                ev.send(0, _host_port(ev, client))
                await trio.testing.wait_all_tasks_blocked()
                if not result:                                  # then the real answer
                    _send(rsp, xs.XsType.READ, rid, b"v")
                    ev.send(0, _host_port(ev, client))
                with trio.fail_after(5):
                    while not result:
                        await trio.sleep(0)
                assert isinstance(result[0], str | OSError), result
                done += 1
            # still serving: a clean request and a watch event get through
            assert w is not None
            n.cancel_scope.cancel()
        return done

    return trio.run(campaign)


def _send(rsp: xs_ring.ByteRing, t: int, rid: int, payload: bytes) -> None:
    msg = xs.HEADER.pack(t, rid, 0, len(payload)) + payload
    if rsp.writable() >= len(msg):
        rsp.write(msg)


def _host_port(ev: EventChannels, client: XenstoreClient) -> int:
    peer = ev.get(1, client.port).peer
    assert peer is not None
    return peer.port


async def _watch_without_host(client: XenstoreClient, n: trio.Nursery, req: xs_ring.ByteRing,
                              rsp: xs_ring.ByteRing, ev: EventChannels) -> object:
    """Register the token ``tok`` (answering the WATCH as the host), so that watch events
    for it have somewhere to go."""
    out: list[object] = []

    async def register() -> None:
        out.append(await client.watch("p", "tok"))

    n.start_soon(register)
    await trio.testing.wait_all_tasks_blocked()
    _t, rid, _tx, ln = xs.HEADER.unpack(req.read(xs.HEADER.size))
    req.read(ln)
    _send(rsp, xs.XsType.WATCH, rid, b"OK\0")
    ev.send(0, _host_port(ev, client))
    with trio.fail_after(5):
        while not out:
            await trio.sleep(0)
    return out[0]


def test_client_survives_a_hostile_xenstored(logs: Logs) -> None:
    assert garbage_replies(logs, 11, 2000) == 2000
