"""Guest memory: frames come back zeroed, and frames never written cost no resident memory."""

from __future__ import annotations

import os

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
