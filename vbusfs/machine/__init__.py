"""One emulated machine: both halves of every bus it has, wired together (design.md §1).

A bus's host side (``backends``) and guest side (``vbusfs.drivers``) meet only in the
machine's guest memory and the bus's own hypervisor parts; each bus is assembled in its own
module here (:mod:`~vbusfs.machine.vmbus`, :mod:`~vbusfs.machine.xen`,
:mod:`~vbusfs.machine.pci`), and this one holds what they share: the config, guest memory,
the tree, the service's control files, and what the service does when the guest accepts a
power request from its host (``[vmbus.ic]``).
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable

import trio

from vbusfs import CONTROL_DIR, __version__
from vbusfs.config import Config
from vbusfs.drivers.scsi.host import ScsiBus
from vbusfs.machine.pci import PciMachine
from vbusfs.machine.vmbus import VmbusMachine
from vbusfs.machine.xen import XenMachine
from vbusfs.platform.memory import GuestMemory
from vbusfs.sysfs import Attribute, Directory, Tree

log = logging.getLogger(__name__)


def _proc_status(key: str) -> int:
    """A number from ``/proc/self/status`` (``VmRSS`` in kB, ``Threads``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0

__all__ = ["Machine", "SHUTDOWN_DEADLINE"]

SHUTDOWN_DEADLINE = 10.0


class Machine:
    """Both halves of one emulated machine, wired together but not yet running."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.memory = GuestMemory(config.machine.memory)
        self.tree = Tree()
        self.tree.root.makedirs("sys/devices")
        self.tree.root.dir("dev")
        self.control = self.tree.root.mkdir(CONTROL_DIR)
        self._request_stop: Callable[[], None] | None = None
        self._stop_pending = False
        # MNT/.vbusfs/block/<disk>/: there when the machine has disks
        has_luns = any(d.luns for d in config.vmbus.devices)
        block_control = self.control.mkdir("block") \
            if config.xen is not None or config.pci is not None or has_luns else None
        #: the guest's SCSI midlayer (/sys/bus/scsi, sd): any bus's SCSI hosts join it
        self.scsi = ScsiBus(self.tree, self.memory, block_control)
        self.vmbus = VmbusMachine(config.vmbus, config.machine, self.memory, self.tree,
                                  self.control, self._on_power, self.scsi)
        self.xen: XenMachine | None = None
        if config.xen is not None:
            self.xen = XenMachine(config.xen, config.machine, self.memory, self.tree,
                                  block_control)
        self.pci: PciMachine | None = None
        if config.pci is not None:
            self.pci = PciMachine(config.pci, config.machine, self.memory, self.tree,
                                  block_control)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Run the hosts and bring the guest up: ``started`` once the guest is fully probed;
        then keep everything running until cancelled."""
        async with trio.open_nursery() as nursery:
            await self.vmbus.start(nursery)
            if self.xen is not None:
                await self.xen.start(nursery)
            if self.pci is not None:
                await self.pci.start(nursery)
            task_status.started()

    async def stop(self) -> None:
        """The guest's orderly shutdown: close every disk and channel, within a deadline."""
        with trio.move_on_after(SHUTDOWN_DEADLINE):
            if self.xen is not None:
                await self.xen.xenbus.close_all(SHUTDOWN_DEADLINE / 2)
            if self.pci is not None:
                await self.pci.stop(SHUTDOWN_DEADLINE / 2)
            await self.vmbus.bus.unload()

    def _on_power(self, action: str) -> None:
        """The guest accepted a power request from the host (``orderly_poweroff``,
        ``orderly_reboot``, the hibernate uevent): react as ``[vmbus.ic]`` says."""
        ic = self.config.vmbus.ic
        key, reaction = {"poweroff": ("on_shutdown", ic.on_shutdown),
                         "reboot": ("on_reboot", ic.on_reboot)}.get(action, ("", "log"))
        if reaction != "unmount":
            log.info("the guest accepted a %s request from the host: reported only%s",
                     action, f" (vmbus.ic.{key} = {reaction})" if key else "")
            return
        log.info("the guest accepted a %s request from the host: stopping and unmounting "
                 "(vmbus.ic.%s = unmount)", action, key)
        if self._request_stop is not None:
            self._request_stop()
        else:
            self._stop_pending = True

    def add_control_files(self, request_stop: Callable[[], None]) -> None:
        ctl = self.control
        cfg = self.config
        self._request_stop = request_stop

        def store_control(text: str) -> None:
            if text.strip() != "shutdown":
                raise OSError(errno.EINVAL, "control takes 'shutdown'")
            request_stop()

        conn = self.vmbus.bus.conn
        ctl.add(Attribute("machine", lambda: cfg.machine.name + "\n"))
        ctl.add(Attribute("pid", lambda: f"{os.getpid()}\n"))
        ctl.add(Attribute("version", lambda: __version__ + "\n"))
        ctl.add(Attribute("config", lambda: cfg.source + "\n"))
        ctl.add(Attribute("state_dir", lambda: f"{cfg.machine.state_dir}\n"))
        ctl.add(Attribute("vmbus_version", lambda: (
            conn.version.text if conn.version else "disconnected") + "\n"))
        ctl.add(Attribute("control", None, store_control))
        self.vmbus.add_control_files(ctl)
        self._add_stats(ctl.mkdir("stats"))
        if self._stop_pending:
            request_stop()

    def _add_stats(self, stats: Directory) -> None:
        """``MNT/.vbusfs/stats/``: what the service holds now, read at open, so that anyone
        (and the soak) can watch for leaks: its open file descriptors, threads and resident
        memory, the Xen grant entries in use (granted by the guest; mapped by the host) and
        the guest-memory frames allocated."""
        # listing /proc/self/fd opens one more: not counted
        stats.add(Attribute("fds", lambda: f"{len(os.listdir('/proc/self/fd')) - 1}\n"))
        stats.add(Attribute("threads", lambda: f"{_proc_status('Threads')}\n"))
        stats.add(Attribute("rss_kb", lambda: f"{_proc_status('VmRSS')}\n"))
        grants = self.xen.grants if self.xen is not None else None
        stats.add(Attribute("grants", lambda: f"{grants.granted if grants else 0}\n"))
        stats.add(Attribute("grants_mapped", lambda: f"{grants.mapped if grants else 0}\n"))
        mem = self.memory
        stats.add(Attribute("guest_frames", lambda: f"{mem.nr_frames - 1 - mem.free_frames()}\n"))
        stats.add(Attribute("guest_frames_total", lambda: f"{mem.nr_frames}\n"))

    def close(self) -> None:
        self.memory.close()
