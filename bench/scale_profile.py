"""Bring up the scale benchmark's machine of N devices (bench.py's ``machine_config``: half
synthetic NICs, half SCSI controllers) without FUSE, as the service does (``Machine.run``
under ``long_lived_start``), and report the wall and CPU time until every device is
negotiated, the time the garbage collector took, and the peak RSS; with ``--profile FILE``
under cProfile (for ``python -m pstats FILE``). What the mount adds is small and constant
(README, Benchmarks: Scale).

    .venv/bin/python bench/scale_profile.py 10000 [--profile /tmp/scale.prof]

State (the controllers' state directory) goes to a temporary directory.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import machine_config
from vbusfs.config import load
from vbusfs.machine import Machine
from vbusfs.service import long_lived_start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("devices", type=int)
    ap.add_argument("--profile", metavar="FILE", help="run under cProfile, stats to FILE")
    args = ap.parse_args()
    gc_s = 0.0
    gc_t0 = 0.0

    def on_gc(phase: str, _info: dict[str, int]) -> None:
        nonlocal gc_s, gc_t0
        if phase == "start":
            gc_t0 = time.perf_counter()
        else:
            gc_s += time.perf_counter() - gc_t0

    with tempfile.TemporaryDirectory() as work:
        os.chdir(work)
        cfg_path = Path(work) / "machine.toml"
        machine_config(cfg_path, args.devices)
        machine = Machine(load(str(cfg_path)))
        up: list[float] = []

        async def bring_up() -> None:
            async with trio.open_nursery() as nursery:
                with long_lived_start():
                    await nursery.start(machine.run)
                up.extend((time.perf_counter(), time.process_time()))
                nursery.cancel_scope.cancel()

        prof = cProfile.Profile() if args.profile else None
        gc.callbacks.append(on_gc)
        t0, c0 = time.perf_counter(), time.process_time()
        if prof is not None:
            prof.enable()
        trio.run(bring_up)
        if prof is not None:
            prof.disable()
            prof.dump_stats(args.profile)
        gc.callbacks.remove(on_gc)
        machine.close()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{args.devices} devices up in {up[0] - t0:.2f} s, {up[1] - c0:.2f} s of CPU "
          f"(collector {gc_s:.2f} s); peak RSS {rss:.0f} MiB")


if __name__ == "__main__":
    main()
