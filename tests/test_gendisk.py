"""The gendisk's accounting (/sys/block/<disk>/{stat,inflight}) stays right whatever happens
to a caller: only what was issued is counted, and a caller cancelled before its I/O was
issued (a killed dd waiting behind another write) leaves no trace."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from tests.xen_rig import disk_of, xen_machine


def _fields(disk: object) -> list[int]:
    return [int(v) for v in disk.stat_text().split()]        # type: ignore[attr-defined]


async def test_callers_cancelled_behind_the_range_lock_leave_stat_and_inflight_alone(
        tmp_path: Path) -> None:
    async with xen_machine(tmp_path, size="1M") as rig:
        disk = disk_of(rig)
        await disk.write(0, b"a" * 4096)
        before = _fields(disk)
        await disk._lock.acquire(0, 8192)          # someone is rewriting these blocks
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as n:
                n.start_soon(disk.write, 0, b"b" * 4096)
                n.start_soon(disk.write, 100, b"c" * 10)          # read-modify-write
                n.start_soon(disk.discard, 4096, 4096)
                await trio.testing.wait_all_tasks_blocked()
                scope.cancel()                       # killed while waiting
        disk._lock.release(0, 8192)
        assert disk.in_flight == [0, 0]
        assert _fields(disk) == before              # nothing was issued, nothing counted
        assert await disk.write(0, b"d" * 4096) == 4096            # and the disk works
        after = _fields(disk)
        assert after[4] == before[4] + 1 and after[8] == 0         # one write, none in flight
