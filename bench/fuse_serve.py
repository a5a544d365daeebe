"""Run a baseline pyfuse3 file system of the benchmark in the foreground until SIGTERM or
SIGINT, then unmount (shared by ``passthrough.py`` and ``treefs.py``)."""

from __future__ import annotations

import signal

import pyfuse3
import trio


async def _serve() -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pyfuse3.main)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as sigs:
            async for _ in sigs:
                break
        nursery.cancel_scope.cancel()


def serve(ops: pyfuse3.Operations, mountpoint: str, fsname: str) -> int:
    opts = set(pyfuse3.default_options) | {f"fsname={fsname}", "allow_other"}
    pyfuse3.init(ops, mountpoint, opts)
    try:
        trio.run(_serve)
    finally:
        pyfuse3.close(unmount=True)
    return 0
