"""The blkfront engine over the real blkif ring to the real blkback (in process, no FUSE):
wrap-around, backpressure, command and grant shortage, single-stepped ordered writes,
flush/barrier, direct vs indirect, discard, out-of-order completion, grant leaks."""

from __future__ import annotations

import errno
import fcntl
import os
import random
from pathlib import Path

import pytest
import trio

from backends.xen.blkback import Blkback
from tests.conftest import Logs
from tests.xen_rig import xen_machine
from vbusfs.block.contract import Command, Limits
from vbusfs.block.contract import Op as BlockOp
from vbusfs.block.engine import Engine
from vbusfs.drivers.xen import blkfront
from vbusfs.platform.memory import GuestMemory
from vbusfs.protocols.xen.blkif import Op


def _record_ops(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Operations the backend executed, in order (wraps Blkback._execute)."""
    seen: list[int] = []
    real = Blkback._execute

    def spy(self: Blkback, work: list) -> None:  # type: ignore[type-arg]
        seen.extend(w.kind for w in work)
        real(self, work)

    monkeypatch.setattr(Blkback, "_execute", spy)
    return seen


async def _concurrent_writes(disk: object, count: int, size: int, span: int) -> bytearray:
    """``count`` writes of ``size`` random bytes, all at once; returns the expected disk."""
    model = bytearray(span)
    async with trio.open_nursery() as n:
        for i in range(count):
            blob = os.urandom(size)
            model[i * size:(i + 1) * size] = blob
            n.start_soon(disk.write, i * size, blob)            # type: ignore[attr-defined]
    return model


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


async def test_ring_full_backpressure_and_command_shortage(tmp_path: Path) -> None:
    async with xen_machine(tmp_path, max_ring_page_order=0, indirect_segments=0,
                           size="8M") as rig:
        assert rig.front.transport.ring.size == 32 and len(rig.engine.shadow) == 32
        model = await _concurrent_writes(rig.disk, 300, 4096, 8 << 20)
        assert rig.engine.freezes["cm_shortage"] > 0
        assert rig.engine.leaked() == 0 and not rig.engine.busy
        await _verify(rig.disk, model)


async def test_grant_shortage_freezes_and_thaws(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(blkfront, "POOL_PAGES", 12)       # one 44 KiB command at a time
    async with xen_machine(tmp_path, indirect_segments=0, size="4M") as rig:
        assert rig.engine.pool.nr_pages == 12
        model = await _concurrent_writes(rig.disk, 40, 45056, 4 << 20)
        assert rig.engine.freezes["page_shortage"] > 0
        assert rig.engine.pool.free_pages == 12
        await _verify(rig.disk, model)


async def test_ordered_writes_single_step_without_barrier(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    ops = _record_ops(monkeypatch)
    async with xen_machine(tmp_path, features=["flush"], size="4M") as rig:
        eng: Engine = rig.engine
        log: list[tuple[str, int, bool]] = []
        real_post = rig.front.transport.post

        def post(cmd: Command) -> None:
            log.append(("post", len(eng.busy), cmd.ordered))
            real_post(cmd)

        monkeypatch.setattr(rig.front.transport, "post", post)
        async with trio.open_nursery() as n:
            for i in range(20):
                n.start_soon(eng.write, i * 8, memoryview(os.urandom(4096)))
            with trio.fail_after(2):
                while not eng.busy:              # the ordered write must find I/O in flight
                    await trio.sleep(0)
            n.start_soon(eng.write, 800, memoryview(b"\x01" * 4096), True)
            for i in range(20):
                n.start_soon(eng.write, 1000 + i * 8, memoryview(os.urandom(4096)))
        i = next(k for k, e in enumerate(log) if e[2])
        assert log[i][1] == 0                  # went out with nothing in flight
        # and nothing else went out until it completed: the next post saw an idle ring
        assert i + 1 == len(log) or log[i + 1][1] == 0
        assert i > 0          # others went out before it, and all had finished by then
        assert Op.WRITE_BARRIER not in ops     # no barrier was offered


async def test_ordered_write_is_a_barrier_when_offered(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    ops = _record_ops(monkeypatch)
    async with xen_machine(tmp_path, features=["barrier"], size="4M") as rig:
        await rig.engine.write(0, memoryview(b"\x02" * 4096), ordered=True)
        await rig.disk.flush()
    assert ops == [Op.WRITE_BARRIER, Op.WRITE_BARRIER]   # write, then empty barrier


@pytest.mark.parametrize(("features", "expected"), [
    (["flush"], [Op.FLUSH_DISKCACHE]), (["flush", "barrier"], [Op.FLUSH_DISKCACHE]),
    ([], [])])
async def test_flush(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, features: list[str],
                     expected: list[int]) -> None:
    ops = _record_ops(monkeypatch)
    async with xen_machine(tmp_path, features=features, size="1M") as rig:
        await rig.disk.flush()
        assert (await trio.to_thread.run_sync(os.stat, rig.image)).st_size == 1 << 20
        if not features:     # no cache to flush: the backend writes through
            assert os.O_DSYNC & fcntl.fcntl(rig.back.image.fd, fcntl.F_GETFL)
            wc = rig.tree.resolve("sys/devices/vbd-51712/block/xvda/queue/write_cache")
            assert wc.render() == b"write through\n"
    assert ops == expected


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


async def test_discard_punches_a_hole(tmp_path: Path) -> None:
    async with xen_machine(tmp_path, size="4M") as rig:
        await rig.disk.write(0, os.urandom(4 << 20))
        await rig.disk.flush()
        used = os.stat(rig.image).st_blocks
        await rig.disk.discard(1 << 20, 2 << 20)
        assert await rig.disk.read(1 << 20, 2 << 20) == bytes(2 << 20)
        assert os.stat(rig.image).st_blocks <= used - (2 << 20) // 512
        with pytest.raises(OSError):
            await rig.disk.discard(100, 512)          # not block aligned
    async with xen_machine(tmp_path / "nd", size="1M", features=["flush"]) as rig:
        with pytest.raises(OSError) as e:
            await rig.disk.discard(0, 4096)
        assert e.value.errno == errno.EOPNOTSUPP


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
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
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


class FakeTransport:
    """Records posted commands; the test completes them in any order it likes."""
    limits = Limits(max_segments=11, max_segment_size=4096, max_transfer=11 * 4096,
                    discard_granularity=512, flush=True, barrier=True)

    def __init__(self) -> None:
        self.posted: list[Command] = []

    def can_post(self, cmd: Command) -> bool:
        return True

    def extra_pages_for(self, op: BlockOp, npages: int) -> int:
        return 0

    def retire(self, cmd: Command) -> None: ...

    def post(self, cmd: Command) -> None:
        self.posted.append(cmd)

    def push(self) -> None: ...


async def test_out_of_order_completion(logs: Logs) -> None:
    logs.expect(r"completion for command (999|0), which is not in flight")
    mem = GuestMemory(16 << 20)
    t = FakeTransport()
    eng = Engine(mem, t, nr_commands=16, pool_pages=64)
    done: list[int] = []

    async def read(i: int) -> None:
        out = bytearray(4096)
        await eng.read(i * 8, memoryview(out))
        assert out == bytes([i]) * 4096
        done.append(i)

    async with trio.open_nursery() as n:
        for i in range(10):
            n.start_soon(read, i)
        with trio.fail_after(2):
            while len(t.posted) < 10:
                await trio.sleep(0)
        def answer(cmd: Command) -> None:
            assert cmd.op == BlockOp.READ
            mem.view(cmd.pages[0])[:] = bytes([cmd.sector // 8]) * 4096
            eng.complete(cmd.id, 0)

        last = t.posted[-1]
        answer(last)                             # the backend answers the newest first
        with trio.fail_after(2):
            while not done:
                await trio.sleep(0)
        await trio.sleep(0.01)
        assert done == [last.sector // 8]        # only that reader finished
        for cmd in reversed(t.posted[:-1]):
            answer(cmd)
        eng.complete(999, 0)                     # a bogus id is counted, not fatal
        eng.complete(t.posted[0].id, 0)          # so is a duplicate
    assert sorted(done) == list(range(10))
    assert eng.bogus_completions == 2 and eng.leaked() == 0 and len(eng.free) == 16



async def test_fail_all_fails_waiters_with_eio_and_frees_everything() -> None:
    mem = GuestMemory(16 << 20)
    t = FakeTransport()
    unmapped: list[int] = []
    t.retire = lambda cmd: unmapped.append(cmd.id)  # type: ignore[method-assign]
    eng = Engine(mem, t, nr_commands=4, pool_pages=64)
    errors: list[int] = []

    async def read(i: int) -> None:
        try:
            await eng.read(i * 8, memoryview(bytearray(4096)))
        except OSError as e:
            errors.append(e.errno or 0)

    async with trio.open_nursery() as n:
        for i in range(6):                      # 4 go out, 2 wait for a free command
            n.start_soon(read, i)
        with trio.fail_after(2):
            while len(t.posted) < 4:
                await trio.sleep(0)
        eng.fail_all()                          # the ring is gone
    assert errors == [errno.EIO] * 6
    assert sorted(unmapped) == sorted(c.id for c in t.posted)    # grants ended
    assert eng.leaked() == 0 and len(eng.free) == 4 and eng.pool.free_pages == 64
