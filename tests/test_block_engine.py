"""The block engine's units against a fake transport that completes commands when the test
says: out-of-order completion, failing everything when the ring goes, and how many pages a
command may carry under a transport's limits."""

from __future__ import annotations

import errno

import pytest
import trio
import trio.testing

from tests.conftest import Logs
from vbusfs.block.contract import Command, Limits, Op
from vbusfs.block.engine import Engine, pages_per_command, segments_for
from vbusfs.platform.memory import GuestMemory


class FakeTransport:
    """Records posted commands; the test completes them in any order it likes."""
    limits = Limits(max_segments=11, max_segment_size=4096, max_transfer=11 * 4096,
                    discard_granularity=512, flush=True, barrier=True)

    def __init__(self) -> None:
        self.posted: list[Command] = []

    def can_post(self, cmd: Command) -> bool:
        return True

    def extra_pages_for(self, op: Op, npages: int) -> int:
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
            assert cmd.op == Op.READ
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
    # a caller that comes after the ring went away fails at once; it does not wait for a
    # command nobody will ever free (trio sometimes ran a reader only after fail_all, and
    # it then waited for ever)
    with trio.fail_after(1), pytest.raises(OSError) as e:
        await eng.read(0, memoryview(bytearray(4096)))
    assert e.value.errno == errno.EIO
    assert sorted(unmapped) == sorted(c.id for c in t.posted)    # grants ended
    assert eng.leaked() == 0 and len(eng.free) == 4 and eng.pool.free_pages == 64


@pytest.mark.parametrize(("segments", "seg_size", "transfer", "anyhow", "contiguous"), [
    (11, 4096, 11 * 4096, 11, 11),          # blkif direct requests: a page a segment
    (256, 4096, 1 << 20, 256, 256),         # blkif indirect
    (126, 65536, 512 << 10, 126, 128),      # 64 KiB segments: the transfer limit binds
    (254, 1 << 32, 1 << 40, 254, 254 << 20),  # virtio-blk without size_max
    (64, 2048, 1 << 20, 32, 32),            # half-page segments: two a page, always
    (1024, 4096, 64 << 10, 16, 16),         # the transfer limit binds
])
def test_pages_per_command(segments: int, seg_size: int, transfer: int, anyhow: int,
                           contiguous: int) -> None:
    lim = Limits(max_segments=segments, max_segment_size=seg_size, max_transfer=transfer)
    assert pages_per_command(lim, contiguous=False) == anyhow
    assert pages_per_command(lim) == contiguous


def test_segments_count_contiguous_runs() -> None:
    lim = Limits(max_segments=4, max_segment_size=8192, max_transfer=1 << 20)
    assert segments_for([1, 1, 1], lim) == 3
    assert segments_for([5], lim) == 3                     # 8 KiB segments: 2+2+1 pages
    half = Limits(max_segments=8, max_segment_size=2048, max_transfer=1 << 20)
    assert segments_for([3], half) == 6


async def test_a_big_command_waits_for_contiguous_pages() -> None:
    """With unlimited segment sizes a 64-page command is one segment — only if its pages
    are contiguous: on a fragmented pool it waits, and goes once the fragments merge."""
    mem = GuestMemory(16 << 20)
    t = FakeTransport()
    t.limits = Limits(max_segments=2, max_segment_size=1 << 30, max_transfer=1 << 30)
    eng = Engine(mem, t, nr_commands=8, pool_pages=96)
    assert eng.safe_pages == 2 and eng.max_pages == 96
    small = [await eng._get(Op.WRITE, 1) for _ in range(6)]      # pages 0..5
    for cmd in small[::2]:                                        # free 0, 2, 4: holes
        eng._put(cmd)
    assert eng.pool.free_pages == 93 and eng.pool.runs_for(92)[0] == 90
    got: list[int] = []

    async def big() -> None:
        cmd = await eng._get(Op.WRITE, 92)        # 90 contiguous + 2 holes: 3 segments > 2
        got.append(len(cmd.pages))
        eng._put(cmd)

    async with trio.open_nursery() as n:
        n.start_soon(big)
        await trio.testing.wait_all_tasks_blocked()
        assert not got and eng.freezes["page_shortage"] == 1
        eng._put(small[1])                         # 0..2 merge: 90 + one run of 3 → fits
        await trio.testing.wait_all_tasks_blocked()
        assert got == [92]
        eng._put(small[3])
        eng._put(small[5])
    assert eng.pool.free_pages == 96 and len(eng.pool._free) == 1


def test_limits_that_allow_no_page_are_refused() -> None:
    with pytest.raises(ValueError):
        pages_per_command(Limits(max_segments=1, max_segment_size=512, max_transfer=1 << 20))
