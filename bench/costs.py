"""The unit costs the data path is designed around, measured on this machine (README,
Benchmarks): a trio thread hop, a hop to a dedicated thread, an inline 4 KiB pwrite, and the
whole in-process Xen ring path (gendisk → blkfront → ring → blkback → image) for a cached
4 KiB read and a 4 KiB write, without FUSE.

    .venv/bin/python bench/costs.py
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backends.storage.worker import IoWorker
from tests.xen_rig import xen_machine

N = 3000


def per_op(t0: float) -> str:
    return f"{(time.perf_counter() - t0) / N * 1e6:7.1f} µs"


async def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "f"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(fd, 4 << 20)
        buf = b"x" * 4096
        t0 = time.perf_counter()
        for i in range(N):
            await trio.to_thread.run_sync(os.pwrite, fd, buf, 4096 * (i % 1024))
        print("trio.to_thread.run_sync(os.pwrite 4 KiB)  ", per_op(t0))
        worker = IoWorker("costs")
        t0 = time.perf_counter()
        for i in range(N):
            await worker.run(os.pwrite, fd, buf, 4096 * (i % 1024))
        print("IoWorker.run(os.pwrite 4 KiB)             ", per_op(t0))
        worker.close()
        t0 = time.perf_counter()
        for i in range(N):
            os.pwrite(fd, buf, 4096 * (i % 1024))
        print("inline os.pwrite 4 KiB                    ", per_op(t0))
        os.close(fd)

        async with xen_machine(Path(d), size="64M") as rig:
            disk = rig.disk
            offsets = [random.randrange(16384) * 4096 for _ in range(N)]
            Path(rig.image).read_bytes()              # the image in the page cache
            t0 = time.perf_counter()
            for off in offsets:
                await disk.read(off, 4096)
            print("ring path, cached 4 KiB read (no FUSE)    ", per_op(t0))
            t0 = time.perf_counter()
            for off in offsets:
                await disk.write(off, buf)
            print("ring path, 4 KiB write (no FUSE)          ", per_op(t0))


if __name__ == "__main__":
    trio.run(main)
