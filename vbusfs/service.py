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
from typing import Protocol

import pyfuse3
import trio

from backends.registry import vmbus_channel_specs
from backends.vmbus.host import VmbusHost
from backends.xen.blkback import Blkback
from backends.xen.toolstack import Toolstack, version_info
from backends.xen.xenstore import Store, XenstoreDaemon
from vbusfs import __version__
from vbusfs.config import Config
from vbusfs.drivers.vmbus.bus import VmbusBus
from vbusfs.drivers.vmbus.drivers import linux_drivers
from vbusfs.drivers.xen.blkfront import BlkfrontDriver, BlkfrontEnv
from vbusfs.drivers.xen.sys_hypervisor import add_sys_hypervisor
from vbusfs.drivers.xen.xenbus import XenBus
from vbusfs.drivers.xen.xenstore_client import XenstoreClient
from vbusfs.drivers.xen.xenstore_view import XenstoreView
from vbusfs.errors import single_errors
from vbusfs.fs import VbusFS
from vbusfs.platform.memory import GuestMemory
from vbusfs.platform.vmbus.synic import Synic
from vbusfs.platform.xen.event_channel import EventChannels
from vbusfs.platform.xen.grant_table import GrantTable
from vbusfs.sysfs import Attribute, Directory, Tree

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
        self.control = self.tree.root.mkdir(CONTROL_DIR)
        self.host = VmbusHost(self.synic, self.memory, vmbus_channel_specs(config),
                              config.vmbus_version)
        self.vmbus = VmbusBus(self.synic, self.memory, self.tree, config.machine.cpus)
        for drv in linux_drivers():
            self.vmbus.register(drv)
        self.xen: XenMachine | None = None
        if config.xen is not None:
            self.xen = XenMachine(self, self.control.mkdir("block"))

    async def start(self, nursery: trio.Nursery) -> None:
        """Run the hosts and bring the guest up; returns once the guest is fully probed."""
        await nursery.start(self.host.run)
        if self.xen is not None:
            await self.xen.start(nursery)
        await nursery.start(self.vmbus.run)

    async def stop(self) -> None:
        with trio.move_on_after(SHUTDOWN_DEADLINE):
            if self.xen is not None:
                await self.xen.xenbus.close_all(SHUTDOWN_DEADLINE / 2)
            await self.vmbus.unload()

    def add_control_files(self, mountpoint: str, request_stop: Callable[[], None]) -> None:
        ctl = self.control
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
            self.vmbus.conn.version.text if self.vmbus.conn.version else "disconnected") + "\n"))
        ctl.add(Attribute("control", None, store_control))
        ctl.add(Attribute("status.json", lambda: json.dumps(self.status(mountpoint)) + "\n"))

    def status(self, mountpoint: str) -> dict[str, object]:
        return {
            "machine": self.config.machine.name,
            "mountpoint": mountpoint,
            "pid": os.getpid(),
            "buses": {"vmbus": {
                "version": self.vmbus.conn.version.text if self.vmbus.conn.version else None,
                "devices": len(self.vmbus.devices)},
                **({"xen": self.xen.status()} if self.xen is not None else {})},
        }

    def close(self) -> None:
        self.memory.close()


class MachineParts(Protocol):
    config: Config
    memory: GuestMemory
    tree: Tree


class XenMachine:
    """The Xen half of a machine: xenstored, the toolstack's entries, one blkback per disk
    (host side); the xenstore client, xenbus and blkfront (guest side), joined only by
    guest memory, the grant table and event channels."""

    def __init__(self, machine: MachineParts, block_control: Directory) -> None:
        cfg = machine.config.xen
        assert cfg is not None
        self.domid = cfg.domid
        mem = machine.memory
        self.evtchn = EventChannels()
        self.grants = GrantTable(mem, cfg.domid)
        self.store = Store()
        self.xenstored = XenstoreDaemon(self.store, mem, self.evtchn)
        self.toolstack = Toolstack(self.store, cfg.domid, machine.config.machine.name,
                                   cfg.uuid)
        self.toolstack.create_domain()
        self.specs = cfg.vbds
        for spec in self.specs:
            self.toolstack.add_vbd(spec)
        self.blkbacks = [Blkback(self.store, self.grants, self.evtchn, mem, spec, cfg.domid)
                         for spec in self.specs]
        # start_info: the guest's xenstore page and its pre-bound event channel
        self.xs_pfn = mem.alloc(1)
        guest_port = self.evtchn.alloc_unbound(cfg.domid, 0)
        host_port = self.evtchn.bind_interdomain(0, cfg.domid, guest_port)
        self.xenstored.introduce(cfg.domid, self.xs_pfn, host_port)
        self.client = XenstoreClient(mem, self.evtchn, cfg.domid, self.xs_pfn, guest_port)
        self.env = BlkfrontEnv(mem, self.grants, self.evtchn, self.client, machine.tree,
                               cfg.domid, block_control)
        self.xenbus = XenBus(machine.tree, self.client, self.evtchn, cfg.domid)
        self.xenbus.register(BlkfrontDriver(self.env))
        self.view = XenstoreView(machine.tree, self.client)
        add_sys_hypervisor(machine.tree, version_info(cfg.domid, cfg.uuid, cfg.version))

    async def start(self, nursery: trio.Nursery) -> None:
        await nursery.start(self.xenstored.serve, self.domid)
        for be in self.blkbacks:
            await nursery.start(be.run)
        await nursery.start(self.client.run)
        await nursery.start(self.xenbus.run)
        await nursery.start(self.view.run)
        if self.xenbus.probe_failures:
            raise OSError(errno.EIO, "xen: a device failed to connect: " +
                          ", ".join(self.xenbus.probe_failures))

    def status(self) -> dict[str, object]:
        dev = self.xenbus.tree.resolve("dev")
        disks = sorted(dev.children) if isinstance(dev, Directory) else []
        return {"domid": self.domid, "devices": sorted(self.xenbus.devices), "disks": disks}


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
        # One failing task (say, no VMBus version in common, or an image that cannot be
        # opened) is reported as itself, however deeply the nurseries nested it.
        with single_errors():
            trio.run(_run, machine, mountpoint, on_ready)
    finally:
        machine.close()
