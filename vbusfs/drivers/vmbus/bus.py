"""The guest's VMBus bus driver: connect, receive offers, create devices, bind drivers.

Mirrors Linux ``drivers/hv/channel_mgmt.c`` + ``vmbus_drv.c``: after the connection is made
(:mod:`~vbusfs.drivers.vmbus.connection`), REQUESTOFFERS, one device per OFFERCHANNEL until
ALLOFFERS_DELIVERED, then each device is offered to the registered drivers
(:class:`~vbusfs.drivers.core.DriverTable`: ``driver_override`` first, then each driver's
class GUIDs) and the first that matches probes it. Offers and rescinds that arrive later add
and remove devices (hotplug). Everything from the host is checked before use. The bus knows
no concrete driver: they are registered with :meth:`VmbusBus.register`.
"""

from __future__ import annotations

import errno
import logging
import uuid

import trio

from vbusfs.drivers.core import DriverTable
from vbusfs.drivers.vmbus import sysfs as vmbus_sysfs
from vbusfs.drivers.vmbus.channel import ChannelState
from vbusfs.drivers.vmbus.connection import RESPONSE_TIMEOUT, OpenError, VmbusConnection
from vbusfs.drivers.vmbus.device import VmbusDevice
from vbusfs.drivers.vmbus.driver import VmbusDriver
from vbusfs.errors import single_errors
from vbusfs.platform.memory import GuestMemory
from vbusfs.platform.vmbus.synic import Synic
from vbusfs.protocols.vmbus import messages as m
from vbusfs.sysfs import Tree
from vbusfs.sysfs.driver_core import Bus

log = logging.getLogger(__name__)

__all__ = ["VmbusBus", "VMBUS_PARENT"]

#: Gen2 (ACPI0004) location of the VMBus root device (reference/sysfs.md §1.1)
VMBUS_PARENT = "sys/devices/LNXSYSTM:00/LNXSYBUS:00/ACPI0004:00/VMBUS:00"


class VmbusBus:
    """The guest VMBus connection's devices and the ``vmbus`` bus in sysfs."""

    def __init__(self, synic: Synic, memory: GuestMemory, tree: Tree, cpus: int = 2,
                 versions: tuple[m.Version, ...] = m.KNOWN_VERSIONS,
                 hibernation: bool = False) -> None:
        self.conn = VmbusConnection(synic, memory, cpus, versions)
        self.tree = tree
        self.devices: dict[int, VmbusDevice] = {}   # by relid
        self._by_instance: dict[uuid.UUID, VmbusDevice] = {}
        self._offers_seen = 0
        self._next_perf_cpu = 0
        self._offers_done = trio.Event()
        self._nursery: trio.Nursery | None = None
        self.parent = tree.root.makedirs(VMBUS_PARENT)
        self.sysfs = Bus(tree, "vmbus")
        self.drivers = DriverTable[VmbusDevice](self.sysfs)
        vmbus_sysfs.add_bus_files(self.sysfs, hibernation)
        self.sysfs.match_hook = self._match
        self.sysfs.bind_hook = self._bind_by_name
        self.sysfs.unbind_hook = self._unbind_by_name

    def register(self, drv: VmbusDriver) -> None:
        """``vmbus_driver_register``: the driver's directory, with ``new_id``/``remove_id``.
        Register before :meth:`run`; a driver registered later binds devices offered later
        or written to ``drivers_probe``."""
        self.drivers.register(drv)
        vmbus_sysfs.add_driver_files(self.sysfs.driver(drv.name).dir, drv.dynids)

    # -- messages ----------------------------------------------------------------------------
    async def _receive_loop(self) -> None:
        async for buf in self.conn.synic.to_guest_recv:
            try:
                await self._on_message(buf)
            except m.MessageError as e:
                log.warning("vmbus: malformed host message: %s", e)

    async def _on_message(self, buf: bytes) -> None:
        mtype = m.message_type(buf)
        if self.conn.on_response(mtype, buf):
            return
        if mtype == m.MessageType.OFFERCHANNEL:
            await self._on_offer(m.OfferChannel.unpack(buf))
        elif mtype == m.MessageType.ALLOFFERS_DELIVERED:
            self._offers_done.set()
        elif mtype == m.MessageType.RESCIND_CHANNELOFFER:
            await self._on_rescind(m.RescindOffer.unpack(buf).child_relid)
        else:
            log.warning("vmbus: ignoring host message type %d", mtype)

    # -- connection ------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect and enumerate; ``started`` once every matched driver has probed. A failure
        to connect (no common version, no answer) is raised as the plain OSError."""
        with single_errors():
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._receive_loop)
                await self.conn.connect()
                self.conn.post(m.RequestOffers().pack())
                await self._wait_all_offers()
                for dev in sorted(self.devices.values(), key=lambda d: d.channel.relid):
                    if self.sysfs.autoprobe:
                        await self._probe(dev)
                task_status.started()

    async def _wait_all_offers(self) -> None:
        """Until ALLOFFERS_DELIVERED. A host that offers thousands of channels takes a while;
        only one that goes RESPONSE_TIMEOUT without offering anything has stopped."""
        while not self._offers_done.is_set():
            seen = self._offers_seen
            with trio.move_on_after(RESPONSE_TIMEOUT):
                await self._offers_done.wait()
            if not self._offers_done.is_set() and self._offers_seen == seen:
                raise OSError(errno.ETIMEDOUT, f"the VMBus host sent no ALLOFFERS_DELIVERED "
                              f"within {RESPONSE_TIMEOUT:.0f} s of its last offer "
                              f"({seen} offers)")

    async def unload(self) -> None:
        """Unbind every device (closing its channel) and send UNLOAD (what a guest does on
        kexec or shutdown)."""
        for dev in list(self.devices.values()):
            await self.drivers.unbind(dev)
        await self.conn.unload()

    # -- devices ---------------------------------------------------------------------------
    def _pick_cpu(self, cls: m.DeviceClass | None) -> int:
        """init_vp_index: perf channels are spread over CPUs, the rest stay on CPU 0."""
        if cls is None or not cls.perf_device:
            return 0
        cpu = self._next_perf_cpu % self.conn.cpus
        self._next_perf_cpu += 1
        return cpu

    async def _on_offer(self, offer: m.OfferChannel) -> None:
        relid = offer.child_relid
        self._offers_seen += 1
        if relid == 0 or relid in self.devices:
            log.warning("vmbus: offer with relid %d rejected (zero or duplicate)", relid)
            return
        if offer.if_instance in self._by_instance:
            log.warning("vmbus: offer of duplicate instance %s rejected", offer.if_instance)
            return
        if offer.monitor_allocated and offer.monitorid >= 128:
            log.warning("vmbus: offer with monitor id %d rejected", offer.monitorid)
            return
        dev = VmbusDevice(self.conn, offer)
        dev.channel.target_cpu = self._pick_cpu(dev.device_class)
        dev.channel.state = ChannelState.OPEN
        self.devices[relid] = dev
        self._by_instance[offer.if_instance] = dev
        dev.dir = self.parent.mkdir(dev.name)
        self.sysfs.add_device(dev.dir, lambda: vmbus_sysfs.uevent(dev))
        vmbus_sysfs.add_device_files(dev)
        if self._offers_done.is_set() and self.sysfs.autoprobe and self._nursery is not None:
            self._nursery.start_soon(self._probe, dev)   # hot-added

    async def _on_rescind(self, relid: int) -> None:
        dev = self.devices.get(relid)
        if dev is None:
            log.warning("vmbus: rescind of unknown relid %d", relid)
            return
        dev.channel.rescinded = True
        await self.drivers.unbind(dev)
        self.sysfs.remove_device(dev.name)
        del self.devices[relid]
        self._by_instance.pop(dev.offer.if_instance, None)
        self.conn.post(m.RelidReleased(relid).pack())

    def _by_name(self, name: str) -> VmbusDevice | None:
        return next((d for d in self.devices.values() if d.name == name), None)

    def _match(self, name: str, driver: str) -> bool:
        dev = self._by_name(name)
        drv = self.drivers.match(dev, dev.driver_override) if dev is not None else None
        return drv is not None and driver in ("", drv.name)

    async def _bind_by_name(self, name: str) -> None:
        dev = self._by_name(name)
        if dev is None:
            raise OSError(errno.ENODEV, name)
        await self._probe(dev, raise_errors=True)

    async def _unbind_by_name(self, name: str) -> None:
        dev = self._by_name(name)
        if dev is None:
            raise OSError(errno.ENODEV, name)
        await self.drivers.unbind(dev)

    async def _probe(self, dev: VmbusDevice, raise_errors: bool = False) -> None:
        if dev.driver is not None or self._nursery is None:
            return
        drv = self.drivers.match(dev, dev.driver_override)
        if drv is None:
            return
        try:
            await self.drivers.bind(self._nursery, dev, drv)
        except (OpenError, OSError) as e:
            if isinstance(e, OSError) and e.errno in (errno.ENODEV, errno.ENXIO):
                # the driver core's "probe rejects match": not an error (dd.c)
                log.debug("vmbus: %s: %s rejects the device: %s", dev.name, drv.name, e)
            else:
                log.error("vmbus: %s: probe of %s failed: %s", dev.name, drv.name, e)
            if raise_errors:
                raise OSError(errno.EIO, str(e)) from None
