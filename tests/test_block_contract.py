"""The block engine's contract, checked against every transport (tests/block_rigs.py): data
arrives intact at every size, commands stay within the limits the transport declares and
those limits are what /sys/block shows, ordering and flush semantics hold, shortages freeze
the queue and thaw it in arrival order, cancelled callers leave nothing behind, and errors
come back as errnos. Expected values come from the engine's documented rules and Linux's
block-layer behaviour, not from the code under test."""

from __future__ import annotations

import errno
import fcntl
import os
import random
import threading
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest
import trio

from backends.storage.executor import Request, StorageOp
from tests.block_rigs import BARRIER_TRANSPORTS, RIGS, BlockRig, Options
from tests.conftest import Logs
from vbusfs.block.contract import Command, Op
from vbusfs.block.engine import segments_for
from vbusfs.platform.memory import PAGE_SIZE

MakeRig = Callable[..., AbstractAsyncContextManager[BlockRig]]


@pytest.fixture(params=sorted(RIGS))
def make_rig(request: pytest.FixtureRequest, tmp_path: Path) -> MakeRig:
    factory = RIGS[request.param]

    def make(**opts: object) -> AbstractAsyncContextManager[BlockRig]:
        return factory(tmp_path, Options(**opts))  # type: ignore[arg-type]
    make.transport = request.param  # type: ignore[attr-defined]
    return make


def _runs(pages: list[int]) -> list[int]:
    """Lengths of the runs of contiguous frames in ``pages``."""
    runs: list[int] = []
    for i, p in enumerate(pages):
        if i and p == pages[i - 1] + 1:
            runs[-1] += 1
        else:
            runs.append(1)
    return runs


def _record_posts(rig: BlockRig, monkeypatch: pytest.MonkeyPatch
                  ) -> list[tuple[Op, int, list[int], int, bool, int]]:
    """(op, sector, runs of contiguous pages, bytes, ordered, commands busy before it) for
    every command the engine posts, in order."""
    seen: list[tuple[Op, int, list[int], int, bool, int]] = []
    t = rig.engine.transport
    real = t.post

    def post(cmd: Command) -> None:
        seen.append((cmd.op, cmd.sector, _runs(cmd.pages), cmd.nbytes, cmd.ordered,
                     len(rig.engine.busy)))
        real(cmd)

    monkeypatch.setattr(t, "post", post)
    return seen


def _record_requests(rig: BlockRig, monkeypatch: pytest.MonkeyPatch
                     ) -> list[tuple[StorageOp, bool, bool]]:
    """(op, preflush, fua) for every request the backend hands the executor, in order."""
    seen: list[tuple[StorageOp, bool, bool]] = []
    ex = rig.executor
    real = ex.submit

    def submit(reqs: list[Request], done: Callable[[list[Request]], None]) -> bool:
        seen.extend((r.op, r.preflush, r.fua) for r in reqs)
        return real(reqs, done)

    monkeypatch.setattr(ex, "submit", submit)
    return seen


class Gate:
    """Holds the image's I/O thread inside its next write until opened."""

    def __init__(self, rig: BlockRig, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered = threading.Event()
        self._open = threading.Event()
        img = rig.executor.image
        real = img.pwritev

        def gated(bufs: list[memoryview], offset: int) -> int:
            self.entered.set()
            self._open.wait(10)
            return real(bufs, offset)

        monkeypatch.setattr(img, "pwritev", gated)

    async def wait_entered(self) -> None:
        assert await trio.to_thread.run_sync(self.entered.wait, 5)

    def open(self) -> None:
        self._open.set()


async def _idle(rig: BlockRig) -> None:
    with trio.fail_after(5):
        while rig.engine.busy or rig.engine.ready:
            await trio.sleep(0.005)


def _assert_nothing_left(rig: BlockRig) -> None:
    eng = rig.engine
    assert eng.leaked() == 0 and not eng.busy and not eng.ready and not eng.complete_q
    assert len(eng.free) == len(eng.shadow)
    assert eng.pool.free_pages == eng.pool.nr_pages
    assert rig.disk.in_flight == [0, 0]


# -- data and limits -------------------------------------------------------------------------

async def test_data_round_trips_at_every_size(make_rig: MakeRig) -> None:
    async with make_rig(size="8M") as rig:
        eng = rig.engine
        rng = random.Random(11)
        model = bytearray(8 << 20)
        step = rig.disk._chunk()            # what one command carries, at most
        sizes = [512, 4096, 4608, 45056, step - 512, step, step + 512, 3 * step + 4096,
                 1 << 20]
        assert step <= eng.max_bytes
        for n in sizes:
            off = rng.randrange(0, (8 << 20) - n) & ~511
            blob = rng.randbytes(n)
            assert await rig.disk.write(off, blob) == n
            model[off:off + n] = blob
        assert await rig.disk.read(0, 8 << 20) == bytes(model)
        await rig.disk.flush()
        assert rig.image.read_bytes() == bytes(model)
        _assert_nothing_left(rig)


async def test_commands_stay_within_the_declared_limits(make_rig: MakeRig,
                                                        monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    for few in (False, True):
        async with make_rig(few_segments=few, size="4M") as rig:
            lim = rig.engine.limits
            if few:               # the smallest a transport has, and smaller than a 1 MiB
                assert lim.max_segments < 256      # write needs: commands get split
            posts = _record_posts(rig, monkeypatch)
            await rig.disk.write(0, os.urandom(1 << 20))
            await rig.disk.write(4096 + 512, os.urandom(300_000))   # odd: read-modify-write
            await rig.disk.read(512, 700_000)
            for op, _sector, runs, nbytes, _o, _b in posts:
                if op in (Op.READ, Op.WRITE):
                    assert 0 < nbytes <= lim.max_transfer
                    assert nbytes % lim.logical_block_size == 0
                    assert segments_for(runs, lim) <= lim.max_segments
                    assert sum(runs) == -(-nbytes // PAGE_SIZE)


async def test_limits_flow_unchanged_into_sysfs(make_rig: MakeRig) -> None:
    for opts in ({}, {"flush": False, "discard": False, "sector_size": 4096},
                 {"few_segments": True, "small_queue": True}):
        async with make_rig(**opts) as rig:
            lim = rig.engine.limits

            def show(name: str, q: str = rig.queue_dir, r: BlockRig = rig) -> str:
                node = r.tree.resolve(f"{q}/{name}")
                return node.render().decode()          # type: ignore[union-attr]

            assert show("max_segments") == f"{lim.max_segments}\n"
            assert show("max_segment_size") == f"{lim.max_segment_size}\n"
            assert show("max_hw_sectors_kb") == f"{lim.max_transfer // 1024}\n"
            assert show("logical_block_size") == f"{lim.logical_block_size}\n"
            assert show("hw_sector_size") == f"{lim.logical_block_size}\n"
            assert show("physical_block_size") == f"{lim.physical_block_size}\n"
            assert show("dma_alignment") == f"{lim.dma_alignment}\n"
            assert show("discard_granularity") == f"{lim.discard_granularity}\n"
            assert show("discard_max_hw_bytes") == f"{lim.max_discard_bytes}\n"
            assert show("fua") == f"{int(lim.fua)}\n"
            assert show("rotational") == f"{int(lim.rotational)}\n"
            assert show("write_cache") == ("write back\n" if lim.flush or lim.barrier
                                           else "write through\n")
            assert show("nr_requests") == f"{len(rig.engine.shadow)}\n"
            # Linux's max_sectors_kb default: the hardware limit, capped at 1280
            assert show("max_sectors_kb") == f"{min(lim.max_transfer // 1024, 1280)}\n"
            # the options asked for
            assert lim.logical_block_size == opts.get("sector_size", 512)
            assert bool(lim.discard_granularity) == opts.get("discard", True)
            assert lim.flush == opts.get("flush", True)


# -- ordering and flush --------------------------------------------------------------------------

async def test_ordered_write_without_barriers_goes_out_alone(make_rig: MakeRig,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    async with make_rig(barrier=False) as rig:
        eng = rig.engine
        assert not eng.limits.barrier
        posts = _record_posts(rig, monkeypatch)
        reqs = _record_requests(rig, monkeypatch)
        gate = Gate(rig, monkeypatch)
        async with trio.open_nursery() as n:
            for i in range(8):
                n.start_soon(eng.write, i * 8, memoryview(os.urandom(4096)))
            await gate.wait_entered()            # the first writes are in flight, held
            n.start_soon(eng.write, 800, memoryview(b"\x01" * 4096), True)
            await trio.sleep(0.05)
            for i in range(8):
                n.start_soon(eng.write, 1000 + i * 8, memoryview(os.urandom(4096)))
            await trio.sleep(0.05)
            assert eng.freezes["wait_idle"] >= 1
            assert not any(p[4] for p in posts)  # the ordered write waits for idle
            gate.open()
        i = next(k for k, p in enumerate(posts) if p[4])
        assert posts[i][5] == 0                  # it went out with nothing in flight
        assert i + 1 == len(posts) or posts[i + 1][5] == 0   # and nothing went with it
        assert sorted(p[1] for p in posts[:i]) == [k * 8 for k in range(8)]
        assert all(not pre for _op, pre, _fua in reqs)   # no barrier reached the image
        _assert_nothing_left(rig)


@pytest.mark.parametrize("transport", sorted(BARRIER_TRANSPORTS))
async def test_ordered_write_is_a_barrier_where_the_transport_has_them(
        transport: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only transports with a barrier operation (blkif); the others single-step ordered
    writes (tested above)."""
    async with RIGS[transport](tmp_path, Options(barrier=True, flush=False)) as rig:
        reqs = _record_requests(rig, monkeypatch)
        posts = _record_posts(rig, monkeypatch)
        await rig.engine.write(0, memoryview(b"\x02" * 4096), ordered=True)
        await rig.disk.flush()               # no FLUSH: an empty barrier
    assert [p[0] for p in posts] == [Op.WRITE, Op.FLUSH]
    # a barrier write: everything before it flushed, it made durable; then a plain flush
    assert reqs == [(StorageOp.WRITE, True, True), (StorageOp.FLUSH, False, False)]


async def test_flush_reaches_the_image_after_the_writes_before_it(
        make_rig: MakeRig, monkeypatch: pytest.MonkeyPatch) -> None:
    async with make_rig(flush=True) as rig:
        reqs = _record_requests(rig, monkeypatch)
        async with trio.open_nursery() as n:
            for i in range(16):
                n.start_soon(rig.disk.write, i * 65536, os.urandom(65536))
        await rig.disk.flush()
        assert [r[0] for r in reqs].count(StorageOp.FLUSH) == 1
        assert reqs[-1] == (StorageOp.FLUSH, False, False)


async def test_a_disk_without_a_cache_flushes_nothing(make_rig: MakeRig,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    async with make_rig(flush=False, barrier=False) as rig:
        reqs = _record_requests(rig, monkeypatch)
        await rig.disk.write(0, b"w" * 4096)
        await rig.disk.flush()
        assert [r[0] for r in reqs] == [StorageOp.WRITE]
        # so the image must be write-through
        assert os.O_DSYNC & fcntl.fcntl(rig.executor.image.fd, fcntl.F_GETFL)


# -- shortage: freeze and thaw -------------------------------------------------------------------

async def test_command_shortage_freezes_and_thaws(make_rig: MakeRig) -> None:
    async with make_rig(small_queue=True, size="8M") as rig:
        depth = len(rig.engine.shadow)
        model = bytearray(8 << 20)
        async with trio.open_nursery() as n:
            for i in range(depth * 4):
                blob = os.urandom(4096)
                model[i * 4096:(i + 1) * 4096] = blob
                n.start_soon(rig.disk.write, i * 4096, blob)
        assert rig.engine.freezes["cm_shortage"] > 0
        assert await rig.disk.read(0, 8 << 20) == bytes(model)
        _assert_nothing_left(rig)


async def test_page_shortage_thaws_in_arrival_order(make_rig: MakeRig,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    async with make_rig(few_segments=True, small_pool=True, size="4M") as rig:
        eng = rig.engine
        big = eng.max_pages * PAGE_SIZE
        assert eng.pool.nr_pages < 2 * eng.max_pages     # two big commands cannot coexist
        posts = _record_posts(rig, monkeypatch)
        gate = Gate(rig, monkeypatch)
        async with trio.open_nursery() as n:
            n.start_soon(eng.write, 0, memoryview(os.urandom(big)))     # holds the pool
            await gate.wait_entered()
            n.start_soon(eng.write, 1000, memoryview(os.urandom(big)))  # A: waits for pages
            await trio.sleep(0.02)
            n.start_soon(eng.write, 2000, memoryview(os.urandom(4096)))  # B: would fit now
            await trio.sleep(0.02)
            n.start_soon(eng.write, 3000, memoryview(os.urandom(4096)))  # C
            await trio.sleep(0.02)
            assert [p[1] for p in posts] == [0]      # B did not overtake A
            gate.open()
        assert [p[1] for p in posts] == [0, 1000, 2000, 3000]
        assert eng.freezes["page_shortage"] >= 2
        _assert_nothing_left(rig)


# -- cancellation ----------------------------------------------------------------------------------

async def test_callers_cancelled_while_waiting_or_in_flight_leave_nothing(
        make_rig: MakeRig, monkeypatch: pytest.MonkeyPatch) -> None:
    async with make_rig(small_queue=True, size="8M") as rig:
        eng = rig.engine
        depth = len(eng.shadow)
        gate = Gate(rig, monkeypatch)
        with trio.CancelScope() as everyone:
            async with trio.open_nursery() as n:
                for i in range(depth + 8):           # 8 wait for a command
                    n.start_soon(rig.disk.write, i * 4096, os.urandom(4096))
                await gate.wait_entered()
                await trio.sleep(0.05)
                assert eng.busy and eng.freezes["cm_shortage"] > 0
                everyone.cancel()                    # a killed dd: busy ones are abandoned
        assert eng.busy                              # still on the ring, held by the gate
        assert rig.disk.in_flight == [0, 0]          # the callers are gone
        gate.open()
        await _idle(rig)
        _assert_nothing_left(rig)
        assert await rig.disk.write(0, b"x" * 4096) == 4096      # and the disk works on
        assert await rig.disk.read(0, 4096) == b"x" * 4096


# -- errors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC, errno.EOPNOTSUPP])
async def test_image_errors_come_back_as_errnos(make_rig: MakeRig, logs: Logs,
                                                monkeypatch: pytest.MonkeyPatch,
                                                err: int) -> None:
    logs.expect(r"I/O error")
    async with make_rig(discard=True) as rig:
        img = rig.executor.image

        def fail(*_args: object) -> None:
            raise OSError(err, os.strerror(err))

        want = err if err in rig.wire_errnos else errno.EIO
        monkeypatch.setattr(img, "pwritev", fail)
        with pytest.raises(OSError) as e:
            await rig.disk.write(0, b"e" * 4096)
        assert e.value.errno == want
        monkeypatch.setattr(img, "discard", fail)
        with pytest.raises(OSError) as e:
            await rig.disk.discard(0, 4096)
        assert e.value.errno == want
        monkeypatch.setattr(img, "preadv", fail)
        monkeypatch.setattr(img, "preadv_nowait", lambda *_a: False)   # force the thread
        with pytest.raises(OSError) as e:
            await rig.disk.read(8192, 4096)
        assert e.value.errno == want
        _assert_nothing_left(rig)


async def test_discard_reads_back_as_zeros_and_unsupported_discard_says_so(
        make_rig: MakeRig) -> None:
    async with make_rig(discard=True, size="4M") as rig:
        await rig.disk.write(0, os.urandom(4 << 20))
        await rig.disk.discard(1 << 20, 2 << 20)
        assert await rig.disk.read(1 << 20, 2 << 20) == bytes(2 << 20)
    async with make_rig(discard=False) as rig:
        with pytest.raises(OSError) as e:
            await rig.disk.discard(0, 4096)
        assert e.value.errno == errno.EOPNOTSUPP
