"""blkfront's transport on the real blkif ring to the real blkback (in process, no FUSE):
what is particular to blkif — index wrap-around near 2**32, direct vs indirect requests,
grants ended per request or kept persistently, a grant the backend keeps. What every
transport must do is in test_block_contract.py."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import pytest
import trio

from backends.xen.xenstore import Transaction
from tests.conftest import Logs
from tests.xen_rig import xen_machine
from vbusfs.errors import single_errors


async def _verify(disk: object, model: bytearray) -> None:
    data = await disk.read(0, len(model))          # type: ignore[attr-defined]
    assert data == bytes(model)


async def test_index_wraparound_near_2_32(tmp_path: Path) -> None:
    start = 2**32 - 50
    async with xen_machine(tmp_path, ring_start=start, size="4M") as rig:
        model = bytearray(4 << 20)
        rng = random.Random(3)
        for _ in range(150):                       # crosses 2**32 after 50 requests
            off = rng.randrange(0, (4 << 20) - 65536) & ~511
            blob = rng.randbytes(rng.choice([512, 4096, 20000 & ~511, 65536]))
            await rig.disk.write(off, blob)
            model[off:off + len(blob)] = blob
        ring = rig.front.transport.ring
        assert ring.req_prod_pvt < start            # it wrapped
        await _verify(rig.disk, model)


@pytest.mark.parametrize(("indirect", "requests"), [(0, 24), (256, 1)])
async def test_direct_and_indirect_requests(tmp_path: Path, indirect: int,
                                            requests: int) -> None:
    async with xen_machine(tmp_path, indirect_segments=indirect, size="4M") as rig:
        blob = os.urandom(1 << 20)
        before = rig.engine.posted
        await rig.disk.write(4096, blob)
        # 1 MiB: ceil(256 pages / 11) = 24 direct requests, or one indirect request
        assert rig.engine.posted - before == requests
        assert await rig.disk.read(4096, 1 << 20) == blob
        with open(rig.image, "rb") as f:
            f.seek(4096)
            assert f.read(1 << 20) == blob


async def test_no_grant_leaks_without_persistent_grants(tmp_path: Path) -> None:
    async with xen_machine(tmp_path, features=["flush"], size="4M") as rig:
        assert not rig.front.transport.persistent
        async with trio.open_nursery() as n:
            for i in range(64):
                n.start_soon(rig.disk.write, i * 65536, os.urandom(65536))
        await rig.disk.read(0, 4 << 20)
        g = rig.grants
        # while idle only the ring pages are granted and mapped
        assert g.granted == rig.front.ring_pages and g.mapped == rig.front.ring_pages
        assert rig.front.transport.leaked_grants == 0
    assert (g.granted, g.mapped) == (0, 0)


async def test_a_grant_the_backend_keeps_is_reported(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     logs: Logs) -> None:
    """At teardown the page stays allocated (the backend may still write it) and that is
    said; the rest of the pool goes back."""
    logs.expect(r"1 pool grants still mapped by the backend; their pages stay allocated")
    async with xen_machine(tmp_path, features=["flush"], size="1M") as rig:
        g = rig.grants
        real_unmap = g.unmap
        kept: list[int] = []

        def leaky_unmap(ref: int) -> None:
            if not kept and ref not in rig.front.ring_refs:
                kept.append(ref)            # a buggy backend forgets one data page
                return
            real_unmap(ref)

        monkeypatch.setattr(g, "unmap", leaky_unmap)
        await rig.disk.write(0, b"z" * 4096)
        assert rig.front.transport.leaked_grants == 1
        assert g.mapped == rig.front.ring_pages + 1


async def test_a_ring_transaction_that_never_commits_fails_the_connect(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logs: Logs) -> None:
    """Every attempt to publish the ring meets a racing writer (a real EAGAIN from xenstored):
    after the last attempt the connect fails, saying why, and the frontend never announces
    Initialised with keys that were never written."""
    logs.expect(r"xenbus: probe of vbd-51712 failed: .*conflicted 10 times")
    real_end = Transaction.end
    attempts: list[int] = []

    def racing_end(self: Transaction, commit: bool) -> None:
        if commit and any(p.endswith("/ring-ref0") or p.endswith("/ring-ref")
                          for p in self.accessed):
            attempts.append(self.id)
            fe = next(p for p in self.accessed if p.endswith("/event-channel"))
            self.store.write(fe, "0")               # another writer got there first
        real_end(self, commit)

    monkeypatch.setattr(Transaction, "end", racing_end)
    with pytest.raises(OSError) as e, single_errors():
        async with xen_machine(tmp_path, size="1M"):
            pass
    assert "vbd-51712" in str(e.value) and "conflicted 10 times" in str(e.value)
    assert len(attempts) == 10


# -- a hostile blkback, generated ---------------------------------------------------------------

async def hostile_responses(tmp_path: Path, logs: Logs, seed: int, count: int) -> int:
    """A backend whose ``count`` responses (rounded up to whole requests) are generated:
    the right one, or any status and operation under the request's own id; and now and
    then, with nothing in flight, a response producer index past every request sent (the
    disk must fail: every command EIO, as blkfront does for a ring it cannot trust; a fresh
    machine then goes on). Every read, write and flush ends with its data or an
    ``OSError``, nothing else, and nothing hangs. Returns the responses given."""
    import random

    from backends.xen.blkback import Blkback, _status
    from vbusfs.protocols.xen.ring import RSP_PROD
    logs.expect(r"backend produced responses for requests never sent")
    rng = random.Random(seed)
    real = Blkback._respond
    real_finish = Blkback._finish
    given = 0
    hooked = 0            # responses that went through hostile(): the campaign's point

    def hostile(self: Blkback, ring: Any, req_id: int, op: int, status: int) -> None:
        nonlocal given, hooked
        given += 1
        hooked += 1
        if rng.randrange(2):
            real(self, ring, req_id, op, status)
        else:                                                 # any status, any operation
            real(self, ring, req_id, rng.randrange(256),
                 rng.choice([0, -1, -2, 1, 2, -32768, 32767, rng.randrange(-32768, 32768)]))

    def hostile_finish(self: Blkback, ring: Any, work: list[Any]) -> None:
        # blkback answers the requests it carried out in one loop of its own (_finish, not
        # _respond, which only answers rejected ones): each answer goes through hostile()
        for w in work:
            for ref in w.mapped:
                self.grants.unmap(ref)
            hostile(self, ring, w.id, w.wire_op, _status(w.status) if w.status else 0)

    machines = 0
    while given < count:
        machines += 1
        async with xen_machine(tmp_path / str(machines), features=["flush"],
                               size="4M") as rig:
            Blkback._respond = hostile  # type: ignore[method-assign]
            Blkback._finish = hostile_finish  # type: ignore[method-assign]
            try:
                while given < count and rig.engine.connected:
                    off = rng.randrange(0, 1000) * 4096
                    with trio.fail_after(10):
                        async with trio.open_nursery() as n:   # a few in flight at once
                            for _ in range(rng.randrange(1, 5)):
                                op = rng.randrange(3)
                                n.start_soon(_one_op, rig.disk, op, off, rng.randbytes(4096))
                    await trio.sleep(0)
                    if rng.randrange(40) == 0:    # more responses than requests, and a kick
                        ring = rig.back.ring
                        ring._set(RSP_PROD, (ring.rsp_prod_pvt + rng.randrange(1, 4))
                                  & 0xFFFFFFFF)
                        rig.xm.evtchn.send(rig.back.domid, rig.back.port)
                        given += 1
            finally:
                Blkback._respond = real  # type: ignore[method-assign]
                Blkback._finish = real_finish  # type: ignore[method-assign]
            if not rig.engine.connected:
                continue
            with trio.fail_after(10):
                await rig.disk.write(0, b"ok" * 256)          # still works
                assert await rig.disk.read(0, 512) == b"ok" * 256
    # if blkback answered past the hooks, the campaign would only be the rare bad index
    assert hooked >= given // 2, f"only {hooked} of {given} responses were generated"
    return given


async def _one_op(disk: Any, op: int, off: int, data: bytes) -> None:
    try:
        if op == 0:
            await disk.read(off, 4096)
        elif op == 1:
            await disk.write(off, data)
        else:
            await disk.flush()
    except OSError:
        pass


async def test_a_hostile_backend_never_hangs_or_kills_blkfront(tmp_path: Path,
                                                                logs: Logs) -> None:
    assert await hostile_responses(tmp_path, logs, 3, 1000) >= 1000
