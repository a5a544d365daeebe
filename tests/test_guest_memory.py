"""Guest memory: frames come back zeroed, and frames never written cost no resident memory."""

from __future__ import annotations

import os
from random import Random

from hypothesis import given
from hypothesis import strategies as st

from vbusfs.platform.memory import PAGE_SIZE, GuestMemory


def _rss_kib() -> int:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_freed_frames_come_back_zeroed() -> None:
    mem = GuestMemory(64 * PAGE_SIZE)
    pfn = mem.alloc(4)
    mem.view(pfn, 4)[:] = b"\xa5" * (4 * PAGE_SIZE)
    mem.free(pfn, 4)
    again = mem.alloc(8)
    assert again <= pfn < again + 8        # the same frames are handed out again
    assert bytes(mem.view(again, 8)) == bytes(8 * PAGE_SIZE)


def test_untouched_frames_are_not_resident() -> None:
    before = _rss_kib()
    mem = GuestMemory(256 * 1024 * 1024)
    pfns = [mem.alloc(257) for _ in range(200)]       # 200 MiB of rings, never written
    grown = _rss_kib() - before
    assert grown < 16 * 1024, f"allocating untouched frames made {grown} KiB resident"
    for pfn in pfns:
        mem.free(pfn, 257)


@given(st.lists(st.integers(1, 9), min_size=1, max_size=40), st.randoms())
def test_freeing_in_any_order_coalesces_every_extent(sizes: list[int], rnd: Random) -> None:
    """Frames freed in any order merge with their free neighbours: while some are held, the
    free extents are exactly the frames not held, as maximal runs in order; once all are
    back, memory is one extent again and a first-fit allocation takes it from frame 1."""
    frames = 400
    mem = GuestMemory(frames * PAGE_SIZE)
    held = [(mem.alloc(n), n) for n in sizes]
    rnd.shuffle(held)
    while held:
        pfn, n = held.pop()
        mem.free(pfn, n)
        taken = {p for start, k in held for p in range(start, start + k)}
        runs: list[tuple[int, int]] = []
        for p in range(1, frames):
            if p in taken:
                continue
            if runs and runs[-1][0] + runs[-1][1] == p:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((p, 1))
        assert mem._free == runs
    assert mem.free_frames() == frames - 1
    assert mem.alloc(frames - 1) == 1
