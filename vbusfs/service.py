"""Build a machine from its config, mount it, run it under one ``trio.run``, stop cleanly.

Start-up order: host side (offers ready) → guest side (``nursery.start`` returns once the bus
is connected and every matched driver has opened its channel) → mount → ready. Shutdown, on
SIGINT/SIGTERM or a write of ``shutdown`` to ``MNT/.vbusfs/control``: the guest closes its
channels and unloads (bounded by a deadline), then the filesystem is unmounted.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import trio

from backends.registry import vmbus_channel_specs
from backends.vmbus.host import VmbusHost
from vbusfs import __version__
from vbusfs.config import Config
from vbusfs.drivers.vmbus import VmbusBus
from vbusfs.fs import VbusFS
from vbusfs.platform.memory import GuestMemory
from vbusfs.platform.synic import Synic
from vbusfs.sysfs import Attribute, Tree

log = logging.getLogger(__name__)

__all__ = ["Machine", "serve", "CONTROL_DIR", "FSTYPE"]

CONTROL_DIR = ".vbusfs"
FSTYPE = "fuse.vbusfs"
SHUTDOWN_DEADLINE = 10.0


class Machine:
    """Both halves of one emulated machine, wired together but not yet running."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.memory = GuestMemory(config.machine.memory)
        self.synic = Synic()
        self.tree = Tree()
        self.tree.root.makedirs("sys/devices")
        self.tree.root.dir("dev")
        self.host = VmbusHost(self.synic, self.memory, vmbus_channel_specs(config),
                              config.vmbus_version)
        self.vmbus = VmbusBus(self.synic, self.memory, self.tree, config.machine.cpus)

    async def start(self, nursery: trio.Nursery) -> None:
        """Run the host and bring the guest up; returns once the guest is fully probed."""
        await nursery.start(self.host.run)
        await nursery.start(self.vmbus.run)

    async def stop(self) -> None:
        with trio.move_on_after(SHUTDOWN_DEADLINE):
            await self.vmbus.unload()

    def add_control_files(self, mountpoint: str, request_stop: Callable[[], None]) -> None:
        ctl = self.tree.root.mkdir(CONTROL_DIR)
        cfg = self.config

        def store_control(text: str) -> None:
            if text.strip() != "shutdown":
                raise OSError(errno.EINVAL, "control takes 'shutdown'")
            request_stop()

        ctl.add(Attribute("machine", lambda: cfg.machine.name + "\n"))
        ctl.add(Attribute("pid", lambda: f"{os.getpid()}\n"))
        ctl.add(Attribute("version", lambda: __version__ + "\n"))
        ctl.add(Attribute("config", lambda: cfg.source + "\n"))
        ctl.add(Attribute("state_dir", lambda: f"{cfg.machine.state_dir}\n"))
        ctl.add(Attribute("vmbus_version", lambda: (
            self.vmbus.version.text if self.vmbus.version else "disconnected") + "\n"))
        ctl.add(Attribute("control", None, store_control))
        ctl.add(Attribute("status.json", lambda: json.dumps(self.status(mountpoint)) + "\n"))

    def status(self, mountpoint: str) -> dict[str, object]:
        return {
            "machine": self.config.machine.name,
            "mountpoint": mountpoint,
            "pid": os.getpid(),
            "buses": {"vmbus": {
                "version": self.vmbus.version.text if self.vmbus.version else None,
                "devices": len(self.vmbus.devices)}},
        }

    def close(self) -> None:
        self.memory.close()


def _mount_options() -> set[str]:
    opts = set(pyfuse3.default_options)
    opts |= {"fsname=vbusfs", "subtype=vbusfs"}
    if os.geteuid() == 0:
        opts.add("allow_other")
    return opts


async def _run(machine: Machine, mountpoint: str, on_ready: Callable[[], None]) -> None:
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        guest_scope = trio.CancelScope()

        async def guest() -> None:
            with guest_scope:
                async with trio.open_nursery() as inner:
                    await machine.start(inner)
                    ready_evt.set()
                    await trio.sleep_forever()

        ready_evt = trio.Event()
        nursery.start_soon(guest)
        with trio.fail_after(30):
            await ready_evt.wait()
        machine.add_control_files(mountpoint, stop.set)
        ops = VbusFS(machine.tree)
        pyfuse3.init(ops, mountpoint, _mount_options())
        try:
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
            await machine.stop()
            fuse_scope.cancel()
        finally:
            pyfuse3.close(unmount=True)
            guest_scope.cancel()
            nursery.cancel_scope.cancel()


def serve(machine: Machine, mountpoint: str, on_ready: Callable[[], None]) -> None:
    """Mount and run until stopped. Raises on failure before or after mounting."""
    Path(machine.config.machine.state_dir).mkdir(parents=True, exist_ok=True)
    try:
        trio.run(_run, machine, mountpoint, on_ready)
    except BaseExceptionGroup as group:
        # One failing task (say, no VMBus version in common) is reported as itself.
        if len(group.exceptions) == 1 and isinstance(group.exceptions[0], Exception):
            raise group.exceptions[0] from None
        raise
    finally:
        machine.close()
