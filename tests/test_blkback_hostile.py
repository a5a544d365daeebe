"""blkback against a hostile frontend: randomized malformed requests on a real ring.

A fake frontend (no blkfront) connects to the real blkback through xenstore, grants a ring
and a few data pages, then puts 10,240 malformed requests on the ring. Every one must be
answered with BLKIF_RSP_ERROR or BLKIF_RSP_EOPNOTSUPP under its own id, the image must not
change by a byte, no grant may stay mapped, and the backend must keep serving (a valid
request afterwards succeeds). Expected statuses come from blkif.h's rules, not the code.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import trio

from backends.xen.blkback import Blkback
from backends.xen.toolstack import Toolstack
from backends.xen.xenstore import Store
from tests.conftest import Logs
from vbusfs.config.xen import VbdConfig
from vbusfs.platform.memory import GuestMemory
from vbusfs.platform.xen.event_channel import EventChannels
from vbusfs.platform.xen.grant_table import GrantTable
from vbusfs.protocols.xen import blkif
from vbusfs.protocols.xen.blkif import Op, Status
from vbusfs.protocols.xen.ring import FrontRing, sring_init
from vbusfs.protocols.xen.xenbus import State, parse_vdev

DISK_SECTORS = 2048           # 1 MiB image
ERRORS = {Status.ERROR, Status.EOPNOTSUPP}


class FakeFront:
    def __init__(self, tmp: Path, features: frozenset[str], readonly: bool = False,
                 sector_size: int = 512) -> None:
        self.mem = GuestMemory(32 << 20)
        self.ev = EventChannels()
        self.grants = GrantTable(self.mem, 1)
        self.store = Store()
        self.image = tmp / "disk.img"
        self.image.write_bytes(random.Random(1).randbytes(DISK_SECTORS * 512))
        self.spec = VbdConfig(parse_vdev("xvda"), self.image, 0, readonly, sector_size, 0, 64,
                              features, "xen.vbd[0]")
        ts = Toolstack(self.store, 1, "hostile", __import__("uuid").uuid4())
        ts.create_domain()
        ts.add_vbd(self.spec)
        self.fe, _ = ts.paths(self.spec)
        self.back = Blkback(self.store, self.grants, self.ev, self.mem, self.spec)
        self.ring_pfn = self.mem.alloc(1)
        sring_init(self.mem.view(self.ring_pfn))
        self.ring = FrontRing(self.mem.view(self.ring_pfn), blkif.SLOT_SIZE)
        self.port = self.ev.alloc_unbound(1, 0)
        self.data = self.mem.alloc(8)
        self.rw_refs = [self.grants.grant_access(0, self.data + i, False) for i in range(4)]
        self.ro_refs = [self.grants.grant_access(0, self.data + 4 + i, True) for i in range(4)]

    async def attach(self, nursery: trio.Nursery) -> None:
        """Start blkback, connect as a frontend would, wait for Connected."""
        await nursery.start(self.back.run)
        self.connect()
        with trio.fail_after(5):
            while self.back.state() != State.CONNECTED:
                await trio.sleep(0.01)

    def connect(self) -> None:
        ref = self.grants.grant_access(0, self.ring_pfn, False)
        self.store.write(f"{self.fe}/ring-ref", str(ref))
        self.store.write(f"{self.fe}/event-channel", str(self.port))
        self.store.write(f"{self.fe}/protocol", "x86_64-abi")
        self.store.write(f"{self.fe}/state", str(int(State.INITIALISED)))

    async def roundtrip(self, slots: list[bytes]) -> list[tuple[int, int, int]]:
        for raw in slots:
            off = self.ring.slot_offset(self.ring.req_prod_pvt)
            self.ring.view[off:off + blkif.SLOT_SIZE] = raw.ljust(blkif.SLOT_SIZE, b"\0")
            self.ring.req_prod_pvt = (self.ring.req_prod_pvt + 1) & 0xFFFFFFFF
        if self.ring.push_requests_and_check_notify():
            self.ev.send(1, self.port)
        out = []
        with trio.fail_after(10):
            while len(out) < len(slots):
                while self.ring.rsp_cons != self.ring.rsp_prod:
                    out.append(blkif.RESPONSE.unpack_from(
                        self.ring.view, self.ring.slot_offset(self.ring.rsp_cons)))
                    self.ring.rsp_cons = (self.ring.rsp_cons + 1) & 0xFFFFFFFF
                if len(out) < len(slots) and not self.ring.final_check_for_responses():
                    await self.ev.get(1, self.port).bell.wait()
        return out


def _seg(ref: int, first: int, last: int) -> bytes:
    return blkif.SEGMENT.pack(ref, first, last)


def malformed(rng: random.Random, f: FakeFront, rid: int) -> bytes:
    """One request that blkif.h says must fail."""
    rw = f.rw_refs[0]
    kind = rng.randrange(14)
    if kind == 0:     # an operation that does not exist
        return bytes([rng.choice([4, *range(7, 256)])]) + bytes(7) + rid.to_bytes(8, "little")
    if kind == 1:     # read/write without segments, or more than 11
        n = rng.choice([0, 12, 13, 200, 255])
        return blkif.REQUEST_HEAD.pack(rng.choice([Op.READ, Op.WRITE]), n, 0, rid, 0) + \
            _seg(rw, 0, 7) * min(n, 11)
    if kind == 2:     # first_sect > last_sect, or last_sect outside the page
        first, last = rng.choice([(5, 4), (0, 8), (7, 200), (255, 255)])
        return blkif.REQUEST_HEAD.pack(Op.READ, 1, 0, rid, 0) + _seg(rw, first, last)
    if kind == 3:     # grant references that grant nothing
        ref = rng.choice([0, 1, 7, 50000, 2**32 - 1, f.rw_refs[-1] + 100])
        return blkif.REQUEST_HEAD.pack(Op.WRITE, 1, 0, rid, 0) + _seg(ref, 0, 7)
    if kind == 4:     # a READ would write into a read-only grant
        return blkif.REQUEST_HEAD.pack(Op.READ, 2, 0, rid, 8) + _seg(rw, 0, 7) + \
            _seg(rng.choice(f.ro_refs), 0, 7)
    if kind == 5:     # past the end of the disk (also wrapping 64-bit sector numbers)
        sector = rng.choice([DISK_SECTORS - 7, DISK_SECTORS, 2**63, 2**64 - 1])
        return blkif.REQUEST_HEAD.pack(rng.choice([Op.READ, Op.WRITE]), 1, 0, rid, sector) + \
            _seg(rw, 0, 7)
    if kind == 6:     # barrier is not offered here
        return blkif.REQUEST_HEAD.pack(Op.WRITE_BARRIER, 1, 0, rid, 0) + _seg(rw, 0, 7)
    if kind == 7:     # discard past the end, or secure discard (not offered)
        if rng.random() < 0.5:
            return blkif.DISCARD.pack(Op.DISCARD, 0, 0, rid, DISK_SECTORS - 1, 2)
        return blkif.DISCARD.pack(Op.DISCARD, blkif.DISCARD_SECURE, 0, rid, 0, 8)
    if kind == 8:     # indirect with 0 or too many segments
        n = rng.choice([0, 65, 4096, 65535])
        return blkif.INDIRECT.pack(Op.INDIRECT, Op.READ, n, rid, 0, 0, *[rw] + [0] * 7)
    if kind == 9:     # indirect with a bad inner operation
        op = rng.choice([Op.FLUSH_DISKCACHE, Op.DISCARD, Op.INDIRECT, 99])
        return blkif.INDIRECT.pack(Op.INDIRECT, op, 1, rid, 0, 0, *[rw] + [0] * 7)
    if kind == 10:    # indirect table page that grants nothing
        return blkif.INDIRECT.pack(Op.INDIRECT, Op.READ, 20, rid, 0, 0,
                                   *[rng.choice([0, 3, 99999])] + [0] * 7)
    if kind == 11:    # indirect table holding a bad segment (written into the table page)
        table = f.mem.view(f.data + 3)
        table[:16] = _seg(rw, 0, 7) + _seg(rng.choice([rw, 0]), 3, rng.choice([1, 9]))
        return blkif.INDIRECT.pack(Op.INDIRECT, Op.WRITE, 2, rid, 0, 0,
                                   *[f.rw_refs[3]] + [0] * 7)
    if kind == 12:    # random bytes with a known-bad operation byte
        raw = bytearray(rng.randbytes(blkif.SLOT_SIZE))
        raw[0] = rng.choice([4, 7, 8, 128, 255])
        raw[8:16] = rid.to_bytes(8, "little")
        return bytes(raw)
    # indirect, segments fine, sector range past the end
    table = f.mem.view(f.data + 2)
    table[:8] = _seg(rw, 0, 7)
    return blkif.INDIRECT.pack(Op.INDIRECT, Op.WRITE, 1, rid, DISK_SECTORS, 0,
                               *[f.rw_refs[2]] + [0] * 7)


async def malformed_requests(tmp_path: Path, seed: int, count: int) -> int:
    """``count`` malformed requests (rounded up to whole batches of 32) generated from
    ``seed``, checked as the module says; returns how many were answered."""
    f = FakeFront(tmp_path, frozenset({"flush", "discard"}))
    before = hashlib.sha256(f.image.read_bytes()).hexdigest()
    rng = random.Random(seed)
    async with trio.open_nursery() as n:
        await f.attach(n)
        answered = 0
        for batch in range(-(-count // 32)):
            ids = [batch * 32 + i + 1 for i in range(32)]
            slots = [malformed(rng, f, rid) for rid in ids]
            responses = await f.roundtrip(slots)
            assert sorted(r[0] for r in responses) == ids
            bad = [r for r in responses if r[2] not in ERRORS]
            assert not bad, f"accepted malformed requests: {bad[:3]}"
            answered += len(responses)
        assert f.grants.mapped == 1          # only the ring: nothing leaked
        # still serving: a valid write then read of one sector round-trips
        f.mem.view(f.data)[:512] = b"\xab" * 512
        ok = await f.roundtrip([blkif.REQUEST_HEAD.pack(Op.WRITE, 1, 0, 1, 100) +
                                _seg(f.rw_refs[0], 0, 0)])
        assert ok[0][2] == Status.OKAY
        n.cancel_scope.cancel()
    data = bytearray(f.image.read_bytes())
    assert data[100 * 512:101 * 512] == b"\xab" * 512
    data[100 * 512:101 * 512] = random.Random(1).randbytes(DISK_SECTORS * 512)[
        100 * 512:101 * 512]
    assert hashlib.sha256(bytes(data)).hexdigest() == before   # nothing else changed
    assert f.image.stat().st_size == DISK_SECTORS * 512
    return answered


async def test_ten_thousand_malformed_requests(tmp_path: Path) -> None:
    assert await malformed_requests(tmp_path, 20261121, 10240) == 10240


async def test_overproducing_frontend_halts_the_ring(tmp_path: Path, logs: Logs) -> None:
    logs.expect(r"frontend produced 37 requests on a 32-entry ring; ring processing halted")
    f = FakeFront(tmp_path, frozenset({"flush"}))
    async with trio.open_nursery() as n:
        await f.attach(n)
        f.ring.req_prod_pvt = f.ring.size + 5     # more requests than the ring holds
        f.ring.push_requests_and_check_notify()
        f.ev.send(1, f.port)
        with trio.fail_after(5):
            while not f.back.broken:
                await trio.sleep(0.01)
        assert "hotplug-error" in f.store.directory(f.back.path)
        assert f.ring.rsp_prod == 0              # nothing answered, nothing done
        n.cancel_scope.cancel()


def _one(op: int, rid: int, sector: int, ref: int, first: int, last: int) -> bytes:
    return blkif.REQUEST_HEAD.pack(op, 1, 0, rid, sector) + _seg(ref, first, last)


async def test_one_segment_requests_on_persistent_grants(tmp_path: Path) -> None:
    """blkback takes a one-segment read or write on a persistently mapped grant by a
    shorter path than other requests; every check still applies there: each of these is
    answered as blkif.h says, and the image changes only where a valid write went."""
    f = FakeFront(tmp_path, frozenset({"flush", "persistent"}), sector_size=4096)
    before = bytearray(f.image.read_bytes())
    f.store.write(f"{f.fe}/feature-persistent", "1")
    rw, ro = f.rw_refs[0], f.ro_refs[0]
    async with trio.open_nursery() as n:
        await f.attach(n)
        # valid reads map the data grants persistently (the read-only one cannot be)
        ok = await f.roundtrip([_one(Op.READ, i, 8 * i, ref, 0, 7)
                                for i, ref in enumerate(f.rw_refs)])
        assert [r[2] for r in ok] == [Status.OKAY] * 4
        assert f.grants.mapped == 1 + 4            # the ring and four persistent grants
        cases = [
            (_one(Op.READ, 10, DISK_SECTORS - 7, rw, 0, 7), Status.ERROR),   # past the end
            (_one(Op.WRITE, 11, DISK_SECTORS, rw, 0, 7), Status.ERROR),
            (_one(Op.READ, 12, 2**64 - 8, rw, 0, 7), Status.ERROR),        # wraps 64 bits
            (_one(Op.READ, 13, 4, rw, 0, 7), Status.ERROR),       # not on a 4096-byte block
            (_one(Op.WRITE, 14, 0, rw, 0, 3), Status.ERROR),      # half a block
            (_one(Op.READ, 15, 0, rw, 0, 8), Status.ERROR),       # last_sect off the page
            (_one(Op.READ, 16, 0, rw, 5, 4), Status.ERROR),       # first_sect > last_sect
            (_one(Op.WRITE, 17, 0, 50000, 0, 7), Status.ERROR),   # grants nothing
            (_one(Op.READ, 18, 0, ro, 0, 7), Status.ERROR),       # read into a r/o grant
            (_one(Op.WRITE_BARRIER, 19, 0, rw, 0, 7), Status.EOPNOTSUPP),   # not offered
            (blkif.REQUEST_HEAD.pack(Op.WRITE, 1, 0, 20, 0) + _seg(rw, 1, 7) + bytes(8),
             Status.ERROR),                                       # not whole blocks
            (_one(Op.READ, 21, 16, rw, 0, 7), Status.OKAY),
            (_one(Op.WRITE, 22, 24, f.rw_refs[1], 0, 7), Status.OKAY),
        ]
        f.mem.view(f.data + 1)[:] = b"\xcd" * 4096
        got = await f.roundtrip([raw for raw, _ in cases])
        assert {r[0]: r[2] for r in got} == {raw[8]: want for raw, want in cases}
        assert f.grants.mapped == 1 + 4            # nothing mapped per request stayed
        n.cancel_scope.cancel()
    before[24 * 512:32 * 512] = b"\xcd" * 4096
    assert f.image.read_bytes() == bytes(before)


async def test_one_segment_write_to_a_read_only_disk(tmp_path: Path) -> None:
    f = FakeFront(tmp_path, frozenset({"persistent"}), readonly=True)
    before = f.image.read_bytes()
    f.store.write(f"{f.fe}/feature-persistent", "1")
    async with trio.open_nursery() as n:
        await f.attach(n)
        got = await f.roundtrip([_one(Op.READ, 1, 0, f.rw_refs[0], 0, 7),
                                 _one(Op.WRITE, 2, 8, f.rw_refs[0], 0, 7)])
        assert {r[0]: r[2] for r in got} == {1: Status.OKAY, 2: Status.ERROR}
        n.cancel_scope.cancel()
    assert f.image.read_bytes() == before
