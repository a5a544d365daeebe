"""Mount a machine and run it under one ``trio.run``; stop cleanly.

Start-up: the machine comes up (``nursery.start(machine.run)``: host sides, then guest sides,
started once every device is negotiated), then the tree is mounted and the caller told it is
ready. Shutdown, on SIGINT/SIGTERM, a write of ``shutdown`` to ``MNT/.vbusfs/control`` (``mountctl
down``), the guest accepting the host's shutdown request or an unmount from outside: disk I/O
already in flight finishes and new disk I/O fails with ENOTCONN (:meth:`VbusFS.stop_disk_io`),
the guest closes its disks and channels (bounded by a deadline), then the filesystem is
unmounted.
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pyfuse3
import trio

from backends.storage.files import make_state_dir
from vbusfs.errors import single_errors
from vbusfs.fs import VbusFS
from vbusfs.invalidate import EntryInvalidator
from vbusfs.machine import Machine
from vbusfs.sysfs import Attribute

log = logging.getLogger(__name__)

__all__ = ["serve", "START_DEADLINE", "start_deadline", "long_lived_start"]

#: how long a machine may take to come up before the start is a failure, plus
#: START_PER_DEVICE for each device it has (10,000 VMBus devices take tens of seconds)
START_DEADLINE = 30.0
START_PER_DEVICE = 0.01


def start_deadline(machine: Machine) -> float:
    cfg = machine.config
    devices = len(cfg.vmbus.devices) + (len(cfg.xen.vbds) if cfg.xen else 0) + \
        (len(cfg.pci.devices) if cfg.pci else 0)
    return START_DEADLINE + START_PER_DEVICE * devices
#: how long disk I/O in flight when the service is told to stop may take to finish
DISK_DRAIN_DEADLINE = 5.0


@contextmanager
def long_lived_start() -> Iterator[None]:
    """Bring a machine up without full garbage collections, then freeze what it built.

    Start-up only adds objects the machine keeps (devices, channels, the tree): CPython
    still collects the young generations, which find the short-lived cycles, but its full
    collections would walk the whole growing heap again each time it grew by a quarter,
    about a fifth of the CPU time of bringing up 10,000 devices for nothing found. Once
    the machine is up, what it built moves to the permanent generation (``gc.freeze``), so
    that no later collection walks it either (no stall of the loop while the mount
    serves). What is frozen is only reclaimed by reference counting: a device there at
    start that is removed later and whose objects form cycles stays allocated, so the
    cost is bounded by the machine's size at start. A start that fails restores the
    thresholds and freezes nothing."""
    thresholds = gc.get_threshold()
    gc.set_threshold(thresholds[0], thresholds[1], 1 << 30)
    try:
        yield
    except BaseException:
        gc.set_threshold(*thresholds)
        raise
    gc.set_threshold(*thresholds)
    gc.collect(1)           # the young generations' garbage is not frozen with the rest
    gc.freeze()


def _mount_options() -> set[str]:
    opts = set(pyfuse3.default_options)
    opts |= {"fsname=vbusfs", "subtype=vbusfs"}
    if os.geteuid() == 0:
        opts.add("allow_other")
    return opts


def _add_request_counts(machine: Machine, fs: VbusFS) -> None:
    """``MNT/.vbusfs/fuse_requests``: how many requests of each kind (``lookup``,
    ``open``, ``read``...) the FUSE layer has answered, one ``name count`` a line, so that a
    test or a benchmark can see which reach the service and which the kernel answers. (Not
    in ``stats/``, whose files are one number each of what the service holds.)"""
    machine.control.add(Attribute("fuse_requests", lambda: "".join(
        f"{name} {count}\n" for name, count in sorted(fs.requests.items()))))


async def _run(machine: Machine, mountpoint: str, on_ready: Callable[[], None]) -> None:
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        deadline = start_deadline(machine)
        try:
            with trio.fail_after(deadline), long_lived_start():
                await nursery.start(machine.run)
        except trio.TooSlowError:
            raise OSError(errno.ETIMEDOUT, f"the machine did not come up within "
                          f"{deadline:.0f} s") from None
        machine.add_control_files(stop.set)
        invalidator = EntryInvalidator()
        fs = VbusFS(machine.tree, invalidator=invalidator)
        _add_request_counts(machine, fs)
        pyfuse3.init(fs, mountpoint, _mount_options())
        try:
            await nursery.start(invalidator.run)
            machine.tree.on_remove = invalidator
            fuse_scope = trio.CancelScope()

            async def fuse_main() -> None:
                with fuse_scope:
                    await pyfuse3.main()
                stop.set()   # unmounted from outside

            nursery.start_soon(fuse_main)

            async def signals() -> None:
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as sigs:
                    async for signum in sigs:
                        log.info("received %s, shutting down", signal.Signals(signum).name)
                        stop.set()
                        return

            nursery.start_soon(signals)
            log.info("mounted %s on %s", machine.config.machine.name, mountpoint)
            on_ready()
            await stop.wait()
            # Disk I/O first: new requests get ENOTCONN (what the kernel answers once we
            # are gone), those in flight finish while every disk is still connected.
            fs.stop_disk_io()
            with trio.move_on_after(DISK_DRAIN_DEADLINE):
                await fs.disk_io_drained()
            machine.tree.on_remove = None      # going away: nothing to keep fresh
            await invalidator.close()
            await machine.stop()
            fuse_scope.cancel()
        finally:
            machine.tree.on_remove = None
            pyfuse3.close(unmount=True)
            nursery.cancel_scope.cancel()


def serve(machine: Machine, mountpoint: str, on_ready: Callable[[], None]) -> None:
    """Mount and run until stopped. Raises on failure before or after mounting."""
    make_state_dir(Path(machine.config.machine.state_dir))     # 0700: it holds the disks
    try:
        # One failing task (say, no VMBus version in common, or an image that cannot be
        # opened) is reported as itself, however deeply the nurseries nested it.
        with single_errors():
            trio.run(_run, machine, mountpoint, on_ready)
    finally:
        machine.close()
