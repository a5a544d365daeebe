"""Would a buffered 4 KiB write be safe on the event loop? Issue 14 allows writes into the
page cache inline only if the loop's worst stall stays under 1 ms during a sustained write
flood. This floods an image-sized sparse file with random 4 KiB ``pwrite`` calls, as the
image executor would make them inline, and reports how long each call held the thread: the
distribution, the worst, and how many calls slept in the kernel (a voluntary context switch
during the call: journal, block allocation, page reclaim, dirty throttling), which is a
stall the loop would have suffered, as distinct from the thread being preempted.

    .venv/bin/python bench/write_stall.py [--dir /var/lib/vbusfs] [--seconds 15] [--json]

``RWF_NOWAIT`` would make such a write fail instead of sleeping, but ext4 refuses it for
buffered writes (EOPNOTSUPP); the script says whether the directory's filesystem takes it.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

MiB = 1024 * 1024
BLOCK = 4096


def nowait_writes(fd: int) -> str:
    try:
        os.pwritev(fd, [b"\0" * BLOCK], 0, os.RWF_NOWAIT)
    except OSError as e:
        return "refused: " + (errno.errorcode.get(e.errno or 0, "?") if e.errno else str(e))
    return "taken"


def flood(fd: int, size: int, seconds: float) -> dict[str, object]:
    buf = os.urandom(BLOCK)
    blocks = size // BLOCK
    durations: list[float] = []
    slept: list[float] = []
    clock = time.perf_counter
    usage = resource.getrusage
    who = resource.RUSAGE_THREAD
    end = clock() + seconds
    while clock() < end:
        off = random.randrange(blocks) * BLOCK
        v0 = usage(who).ru_nvcsw
        t0 = clock()
        os.pwrite(fd, buf, off)
        d = clock() - t0
        if usage(who).ru_nvcsw != v0:
            slept.append(d)
        durations.append(d)
    durations.sort()
    n = len(durations)

    def pct(p: float) -> float:
        return round(durations[min(n - 1, int(p * n))] * 1e6, 1)

    return {
        "writes": n,
        "mb_per_s": round(n * BLOCK / seconds / 1e6, 1),
        "p50_us": pct(0.5), "p99_us": pct(0.99), "p999_us": pct(0.999),
        "max_ms": round(durations[-1] * 1e3, 3),
        "over_1ms": sum(d > 1e-3 for d in durations),
        "slept": len(slept),
        "slept_max_ms": round(max(slept) * 1e3, 3) if slept else 0.0,
        "slept_over_1ms": sum(d > 1e-3 for d in slept),
    }


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench/write_stall.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/var/lib/vbusfs",
                    help="where the file goes: the images' filesystem (default %(default)s)")
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--size-mib", type=int, default=4096, help="the file's size (sparse)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="write-stall.", dir=d)
    try:
        os.unlink(name)
        os.ftruncate(fd, args.size_mib * MiB)
        result: dict[str, object] = {"dir": str(d), "seconds": args.seconds,
                                     "file_mib": args.size_mib, "rwf_nowait": nowait_writes(fd)}
        result.update(flood(fd, args.size_mib * MiB, args.seconds))
    finally:
        os.close(fd)
    # a call that slept over 1 ms is the write's own stall; one that ran long without
    # sleeping was preempted (a busy machine), which would stall the loop with or without it
    result["inline_allowed"] = result["slept_over_1ms"] == 0
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in result.items():
            print(f"{k:16} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
