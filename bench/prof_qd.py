"""Per-request CPU of the in-process Xen disk path (gendisk → blkfront → ring → blkback →
image, no FUSE), at a queue depth of QD concurrent tasks, 4 KiB random reads or writes on a
64 MiB image whose pages are cached.

    .venv/bin/python bench/prof_qd.py read|write QD              # µs wall and CPU per op
    .venv/bin/python bench/prof_qd.py read|write QD tottime      # and a cProfile of the run
    .venv/bin/python bench/prof_qd.py read|write QD calls        # Python calls per op only

Run from the repository root (it imports the tree it is run in).
"""

from __future__ import annotations

import cProfile
import os
import pstats
import random
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, os.getcwd())

from tests.xen_rig import xen_machine

N = 8000


async def main(prof: cProfile.Profile, qd: int, mode: str, doprof: bool) -> None:
    with tempfile.TemporaryDirectory() as d:
        async with xen_machine(Path(d), size="64M") as rig:
            disk = rig.disk
            offsets = [random.randrange(16384) * 4096 for _ in range(N)]
            Path(rig.image).read_bytes()
            buf = b"x" * 4096

            async def worker(offs: list[int]) -> None:
                if mode == "read":
                    for off in offs:
                        await disk.read(off, 4096)
                else:
                    for off in offs:
                        await disk.write(off, buf)

            async with trio.open_nursery() as n:          # warm up
                for q in range(qd):
                    n.start_soon(worker, offsets[q:500:qd])
            t0 = time.perf_counter()
            c0 = time.process_time()
            if doprof:
                prof.enable()
            async with trio.open_nursery() as n:
                for q in range(qd):
                    n.start_soon(worker, offsets[q::qd])
            if doprof:
                prof.disable()
            print(f"{mode} qd{qd}: {(time.perf_counter() - t0) / N * 1e6:.1f} us wall, "
                  f"{(time.process_time() - c0) / N * 1e6:.1f} us cpu per op")


def run() -> None:
    mode, qd = sys.argv[1], int(sys.argv[2])
    sort = sys.argv[3] if len(sys.argv) > 3 else ""
    p = cProfile.Profile()
    trio.run(main, p, qd, mode, bool(sort))
    if sort:
        st = pstats.Stats(p)
        print(f"{st.total_calls / N:.1f} Python function calls per op")  # type: ignore[attr-defined]
        if sort != "calls":
            st.sort_stats(sort).print_stats(35)


if __name__ == "__main__":
    run()
