"""Run a baseline pyfuse3 file system of the benchmark in the foreground until SIGTERM or
SIGINT, then unmount (shared by ``passthrough.py`` and ``treefs.py``).

The mount options are vbusfs's own (``vbusfs/service.py``: pyfuse3's defaults, ``fsname``,
``subtype``, ``allow_other`` as root), so a baseline is mounted exactly as the service it is
compared with; the benchmark records every target's options from ``/proc/self/mountinfo``.
"""

from __future__ import annotations

import os
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


def mount_options(fsname: str) -> set[str]:
    """What ``vbusfs.service`` mounts with, under another name."""
    opts = set(pyfuse3.default_options) | {f"fsname={fsname}", f"subtype={fsname}"}
    if os.geteuid() == 0:
        opts.add("allow_other")
    return opts


def serve(ops: pyfuse3.Operations, mountpoint: str, fsname: str) -> int:
    pyfuse3.init(ops, mountpoint, mount_options(fsname))
    try:
        trio.run(_serve)
    finally:
        pyfuse3.close(unmount=True)
    return 0
