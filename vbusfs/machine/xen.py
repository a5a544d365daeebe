"""The Xen half of a machine: xenstored, the toolstack's entries and one blkback per disk
(host side); the xenstore client, xenbus with blkfront registered, the xenstore view and
``/sys/hypervisor`` (guest side), joined only by guest memory, the grant table and event
channels."""

from __future__ import annotations

import errno

import trio

from backends.xen.blkback import Blkback
from backends.xen.toolstack import Toolstack, version_info
from backends.xen.xenstore import Store, XenstoreDaemon
from vbusfs.config.common import MachineConfig
from vbusfs.config.xen import XenConfig
from vbusfs.drivers.xen.blkfront import BlkfrontDriver, BlkfrontEnv
from vbusfs.drivers.xen.sys_hypervisor import add_sys_hypervisor
from vbusfs.drivers.xen.xenbus import XenBus
from vbusfs.drivers.xen.xenstore_client import XenstoreClient
from vbusfs.drivers.xen.xenstore_view import XenstoreView
from vbusfs.platform.memory import GuestMemory
from vbusfs.platform.xen.event_channel import EventChannels
from vbusfs.platform.xen.grant_table import GrantTable
from vbusfs.sysfs import Directory, Tree

__all__ = ["XenMachine"]


class XenMachine:
    def __init__(self, cfg: XenConfig, machine: MachineConfig, memory: GuestMemory,
                 tree: Tree, block_control: Directory | None) -> None:
        self.domid = cfg.domid
        mem = memory
        self.evtchn = EventChannels()
        self.grants = GrantTable(mem, cfg.domid)
        self.store = Store()
        self.xenstored = XenstoreDaemon(self.store, mem, self.evtchn)
        self.toolstack = Toolstack(self.store, cfg.domid, machine.name, cfg.uuid)
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
        self.env = BlkfrontEnv(mem, self.grants, self.evtchn, self.client, tree, cfg.domid,
                               block_control)
        self.xenbus = XenBus(tree, self.client, self.evtchn, cfg.domid)
        self.xenbus.register(BlkfrontDriver(self.env))
        self.view = XenstoreView(tree, self.client)
        add_sys_hypervisor(tree, version_info(cfg.domid, cfg.uuid, cfg.version))

    async def start(self, nursery: trio.Nursery) -> None:
        """Host side first, then the guest; returns once every disk is Connected."""
        await nursery.start(self.xenstored.serve, self.domid)
        for be in self.blkbacks:
            await nursery.start(be.run)
        await nursery.start(self.client.run)
        await nursery.start(self.xenbus.run)
        await nursery.start(self.view.run)
        if self.xenbus.probe_failures:
            raise OSError(errno.EIO, "xen: a device failed to connect: " +
                          ", ".join(self.xenbus.probe_failures))
