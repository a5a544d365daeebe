"""The guest's VMBus driver: connect, receive offers, create devices, bind drivers.

Mirrors Linux ``drivers/hv/connection.c`` + ``channel_mgmt.c`` + ``vmbus_drv.c``:
INITIATE_CONTACT newest version first (retrying lower ones on ``version_supported = 0``),
REQUESTOFFERS, one device per OFFERCHANNEL until ALLOFFERS_DELIVERED, then for every device a
driver matches, ``vmbus_open`` (GPADL + OPENCHANNEL). Offers and rescinds that arrive later
add and remove devices (hotplug). Everything from the host is checked before use.
"""

from __future__ import annotations

import errno
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from vbusfs.drivers.vmbus import sysfs as vmbus_sysfs
from vbusfs.drivers.vmbus.channel import ChannelState, GuestChannel, OpenError
from vbusfs.drivers.vmbus.hv_utils import SERVICE_VERSIONS, UtilService
from vbusfs.platform.memory import PAGE_SIZE, GuestMemory
from vbusfs.platform.vmbus.ring_endpoint import ChannelBroken, RingEndpoint
from vbusfs.platform.vmbus.synic import HvStatus, Synic
from vbusfs.protocols.guid import guid_text
from vbusfs.protocols.vmbus import messages as m
from vbusfs.sysfs import Directory, Tree
from vbusfs.sysfs.driver_core import Bus

log = logging.getLogger(__name__)

__all__ = ["VmbusBus", "VmbusDevice", "GuestDriver", "GUEST_DRIVERS", "VMBUS_PARENT"]

#: Gen2 (ACPI0004) location of the VMBus root device (reference/sysfs.md §1.1)
VMBUS_PARENT = "sys/devices/LNXSYSTM:00/LNXSYBUS:00/ACPI0004:00/VMBUS:00"
RESPONSE_TIMEOUT = 5.0
FIRST_GPADL_HANDLE = 0xE1E10   # Linux's first guest-chosen GPADL handle


def _ring(payload_bytes: int) -> int:
    """VMBUS_RING_SIZE: one header page plus the payload rounded up to pages."""
    return PAGE_SIZE + (payload_bytes + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE


@dataclass(frozen=True)
class GuestDriver:
    """A Linux VMBus driver as far as the bus sees it: its ring sizes per direction
    (modelled on the Linux drivers' defaults) and what runs on the open channel."""

    name: str
    send_ring: int
    recv_ring: int
    service: Callable[[VmbusDevice], Callable[[RingEndpoint], Awaitable[None]]] | None = None


async def _drain(ep: RingEndpoint) -> None:
    while True:
        await ep.receive()


def _util(dev: VmbusDevice) -> Callable[[RingEndpoint], Awaitable[None]]:
    cls = dev.device_class
    if cls is not None and cls.type in SERVICE_VERSIONS:
        return UtilService(cls.type).run
    return _drain


GUEST_DRIVERS: dict[str, GuestDriver] = {d.name: d for d in (
    GuestDriver("hv_utils", _ring(3 * PAGE_SIZE), _ring(3 * PAGE_SIZE), _util),
    GuestDriver("hv_storvsc", _ring(128 * 1024), _ring(128 * 1024)),
    GuestDriver("hv_netvsc", _ring(128 * PAGE_SIZE), _ring(128 * PAGE_SIZE)),
    GuestDriver("hyperv_keyboard", _ring(36 * 1024), _ring(36 * 1024)),
    GuestDriver("hid_hyperv", _ring(36 * 1024), _ring(36 * 1024)),
    GuestDriver("hyperv_fb", 256 * 1024, 256 * 1024),
    GuestDriver("hv_balloon", _ring(16 * 1024), _ring(16 * 1024)),
    GuestDriver("hv_pci", _ring(16 * 1024), _ring(16 * 1024)),
)}


class VmbusDevice:
    """One ``struct hv_device``: the offer, its primary channel, its sysfs directory."""

    def __init__(self, bus: VmbusBus, offer: m.OfferChannel) -> None:
        self.bus: VmbusBus = bus
        self.offer: m.OfferChannel = offer
        self.name: str = guid_text(offer.if_instance)
        self.device_class: m.DeviceClass | None = m.class_by_guid(offer.if_type)
        self.channel: GuestChannel = GuestChannel(bus, offer)
        self.driver_override: str | None = None
        self.driver: str | None = None
        self.dir: Directory | None = None
        self._scope: trio.CancelScope | None = None

    @property
    def dev_type(self) -> int:
        return self.device_class.dev_type if self.device_class else m.HV_UNKNOWN

    def matching_driver(self) -> str | None:
        if self.driver_override is not None:
            return self.driver_override if self.driver_override in GUEST_DRIVERS else None
        if self.bus.dynamic_ids:
            for drv, guids in self.bus.dynamic_ids.items():
                if self.offer.if_type in guids:
                    return drv
        cls = self.device_class
        return cls.driver if cls is not None and cls.driver in GUEST_DRIVERS else None


class VmbusBus:
    """The guest VMBus connection and the ``vmbus`` bus in sysfs."""

    def __init__(self, synic: Synic, memory: GuestMemory, tree: Tree, cpus: int = 2,
                 versions: tuple[m.Version, ...] = m.KNOWN_VERSIONS) -> None:
        self.synic = synic
        self.memory = memory
        self.tree = tree
        self.cpus = cpus
        self.versions = versions
        self.version: m.Version | None = None
        self.msg_conn_id = m.VMBUS_MESSAGE_CONNECTION_ID
        self.devices: dict[int, VmbusDevice] = {}   # by relid
        self.monitor_pfns: tuple[int, int] = (0, 0)
        self.dynamic_ids: dict[str, set[uuid.UUID]] = {}
        self._next_gpadl = FIRST_GPADL_HANDLE
        self._next_perf_cpu = 0
        self._waiters: dict[tuple[int, int], trio.MemorySendChannel[bytes]] = {}
        self._offers_done = trio.Event()
        self._nursery: trio.Nursery | None = None
        self.parent = tree.root.makedirs(VMBUS_PARENT)
        self.sysfs = Bus(tree, "vmbus")
        vmbus_sysfs.add_bus_files(self, GUEST_DRIVERS)
        self.sysfs.match_hook = self._match
        self.sysfs.bind_hook = self._bind_by_name
        self.sysfs.unbind_hook = self._unbind_by_name

    # -- messages ----------------------------------------------------------------------------
    def post(self, payload: bytes) -> None:
        status = self.synic.post_message(self.msg_conn_id, payload)
        if status != HvStatus.SUCCESS:
            raise OSError(errno.EIO, f"HvPostMessage failed: {HvStatus(status).name}")

    async def _request(self, payload: bytes, reply_type: m.MessageType, key: int) -> bytes:
        send, recv = trio.open_memory_channel[bytes](1)
        self._waiters[(reply_type, key)] = send
        try:
            self.post(payload)
            with trio.fail_after(RESPONSE_TIMEOUT):
                return await recv.receive()
        except trio.TooSlowError:
            raise OSError(errno.ETIMEDOUT,
                          f"VMBus host did not answer with {reply_type.name}") from None
        finally:
            self._waiters.pop((reply_type, key), None)

    def _complete(self, mtype: int, key: int, buf: bytes) -> None:
        waiter = self._waiters.get((mtype, key))
        if waiter is None:
            log.warning("vmbus: unexpected %s (key %#x) dropped", m.MessageType(mtype).name, key)
            return
        try:
            waiter.send_nowait(buf)
        except trio.WouldBlock:
            log.warning("vmbus: duplicate %s dropped", m.MessageType(mtype).name)

    async def _receive_loop(self) -> None:
        async for buf in self.synic.to_guest_recv:
            try:
                await self._on_message(buf)
            except m.MessageError as e:
                log.warning("vmbus: malformed host message: %s", e)

    async def _on_message(self, buf: bytes) -> None:
        mtype = m.message_type(buf)
        if mtype == m.MessageType.VERSION_RESPONSE:
            self._complete(mtype, 0, buf)
        elif mtype == m.MessageType.OFFERCHANNEL:
            await self._on_offer(m.OfferChannel.unpack(buf))
        elif mtype == m.MessageType.ALLOFFERS_DELIVERED:
            self._offers_done.set()
        elif mtype == m.MessageType.GPADL_CREATED:
            self._complete(mtype, m.GpadlCreated.unpack(buf).gpadl, buf)
        elif mtype == m.MessageType.GPADL_TORNDOWN:
            self._complete(mtype, m.GpadlTorndown.unpack(buf).gpadl, buf)
        elif mtype == m.MessageType.OPENCHANNEL_RESULT:
            self._complete(mtype, m.OpenResult.unpack(buf).child_relid, buf)
        elif mtype == m.MessageType.MODIFYCHANNEL_RESPONSE:
            self._complete(mtype, m.ModifyChannelResponse.unpack(buf).child_relid, buf)
        elif mtype == m.MessageType.RESCIND_CHANNELOFFER:
            await self._on_rescind(m.RescindOffer.unpack(buf).child_relid)
        elif mtype == m.MessageType.UNLOAD_RESPONSE:
            self._complete(mtype, 0, buf)
        else:
            log.warning("vmbus: ignoring host message type %d", mtype)

    # -- connection ------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect and enumerate; ``started`` once every matched driver has opened its channel.

        A failure to connect (no common version, no answer) is raised as the plain OSError."""
        try:
            await self._run(task_status)
        except BaseExceptionGroup as group:
            if len(group.exceptions) == 1 and isinstance(group.exceptions[0], Exception):
                raise group.exceptions[0] from None
            raise

    async def _run(self, task_status: trio.TaskStatus[None]) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._receive_loop)
            await self._connect()
            self.post(m.RequestOffers().pack())
            with trio.fail_after(RESPONSE_TIMEOUT):
                await self._offers_done.wait()
            for dev in sorted(self.devices.values(), key=lambda d: d.channel.relid):
                if self.sysfs.autoprobe:
                    await self._probe(dev)
            task_status.started()

    async def _connect(self) -> None:
        m1 = self.memory.alloc(1)
        m2 = self.memory.alloc(1)
        self.monitor_pfns = (m1, m2)
        for version in self.versions:
            conn = m.VMBUS_MESSAGE_CONNECTION_ID_4 if version >= m.Version.WIN10_V5 \
                else m.VMBUS_MESSAGE_CONNECTION_ID
            self.msg_conn_id = conn
            req = m.InitiateContact(version, 0, m.VMBUS_MESSAGE_SINT, 0, m1 * PAGE_SIZE,
                                    m2 * PAGE_SIZE)
            resp = m.VersionResponse.unpack(
                await self._request(req.pack(), m.MessageType.VERSION_RESPONSE, 0))
            if resp.version_supported:
                self.version = version
                if version >= m.Version.WIN10_V5:
                    self.msg_conn_id = resp.msg_conn_id
                log.info("vmbus: Vmbus version:%s", version.text)
                return
        raise OSError(errno.EPROTO, "VMBus host supports none of the versions this guest "
                      "speaks (" + ", ".join(v.text for v in self.versions) + ")")

    async def unload(self) -> None:
        """Close every channel and send UNLOAD (what a guest does on kexec/shutdown)."""
        for dev in list(self.devices.values()):
            await self._unbind(dev)
        if self.version is not None:
            with trio.move_on_after(RESPONSE_TIMEOUT):
                await self._request(m.Unload().pack(), m.MessageType.UNLOAD_RESPONSE, 0)
            self.version = None

    # -- GPADL / open used by channels ------------------------------------------------------
    async def create_gpadl(self, relid: int, pfns: list[int]) -> int:
        handle = self._next_gpadl
        self._next_gpadl += 1
        first, rest = pfns[:m.GPADL_HEADER_MAX_PFNS], pfns[m.GPADL_HEADER_MAX_PFNS:]
        header = m.GpadlHeader(relid, handle, 8 + 8 * len(pfns), 1, len(pfns) * PAGE_SIZE, 0,
                               tuple(first))
        send, recv = trio.open_memory_channel[bytes](1)
        key = (m.MessageType.GPADL_CREATED, handle)
        self._waiters[key] = send
        try:
            self.post(header.pack())
            msgnumber = 1
            while rest:
                chunk, rest = rest[:m.GPADL_BODY_MAX_PFNS], rest[m.GPADL_BODY_MAX_PFNS:]
                self.post(m.GpadlBody(msgnumber, handle, tuple(chunk)).pack())
                msgnumber += 1
            with trio.fail_after(RESPONSE_TIMEOUT):
                created = m.GpadlCreated.unpack(await recv.receive())
        finally:
            self._waiters.pop(key, None)
        if created.creation_status != 0:
            raise OpenError(f"host refused GPADL {handle:#x}: status "
                            f"{created.creation_status:#x}")
        return handle

    async def teardown_gpadl(self, relid: int, handle: int) -> None:
        await self._request(m.GpadlTeardown(relid, handle).pack(),
                            m.MessageType.GPADL_TORNDOWN, handle)

    async def open_channel(self, req: m.OpenChannel) -> None:
        resp = m.OpenResult.unpack(await self._request(
            req.pack(), m.MessageType.OPENCHANNEL_RESULT, req.child_relid))
        if resp.status != 0:
            raise OpenError(f"host refused to open relid {req.child_relid}: "
                            f"status {resp.status:#x}")

    async def modify_channel(self, chan: GuestChannel, cpu: int) -> None:
        req = m.ModifyChannel(chan.relid, cpu).pack()
        if self.version is not None and self.version >= m.Version.WIN10_V5_3:
            resp = m.ModifyChannelResponse.unpack(await self._request(
                req, m.MessageType.MODIFYCHANNEL_RESPONSE, chan.relid))
            if resp.status != 0:
                raise OSError(errno.EIO, f"host refused to move relid {chan.relid}")
        else:
            self.post(req)

    # -- devices ---------------------------------------------------------------------------
    def _pick_cpu(self, cls: m.DeviceClass | None) -> int:
        """init_vp_index: perf channels are spread over CPUs, the rest stay on CPU 0."""
        if cls is None or not cls.perf_device:
            return 0
        cpu = self._next_perf_cpu % self.cpus
        self._next_perf_cpu += 1
        return cpu

    async def _on_offer(self, offer: m.OfferChannel) -> None:
        relid = offer.child_relid
        if relid == 0 or relid in self.devices:
            log.warning("vmbus: offer with relid %d rejected (zero or duplicate)", relid)
            return
        if any(d.offer.if_instance == offer.if_instance for d in self.devices.values()):
            log.warning("vmbus: offer of duplicate instance %s rejected", offer.if_instance)
            return
        if offer.monitor_allocated and offer.monitorid >= 128:
            log.warning("vmbus: offer with monitor id %d rejected", offer.monitorid)
            return
        dev = VmbusDevice(self, offer)
        dev.channel.target_cpu = self._pick_cpu(dev.device_class)
        dev.channel.state = ChannelState.OPEN
        self.devices[relid] = dev
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
        await self._unbind(dev)
        self.sysfs.remove_device(dev.name)
        del self.devices[relid]
        self.post(m.RelidReleased(relid).pack())

    def _match(self, name: str, driver: str) -> bool:
        dev = self._by_name(name)
        want = dev.matching_driver() if dev else None
        return want is not None and (driver in ("", want))

    def _by_name(self, name: str) -> VmbusDevice | None:
        return next((d for d in self.devices.values() if d.name == name), None)

    async def _bind_by_name(self, name: str) -> None:
        dev = self._by_name(name)
        if dev is None:
            raise OSError(errno.ENODEV, name)
        await self._probe(dev, raise_errors=True)

    async def _unbind_by_name(self, name: str) -> None:
        dev = self._by_name(name)
        if dev is None:
            raise OSError(errno.ENODEV, name)
        await self._unbind(dev)

    async def _probe(self, dev: VmbusDevice, raise_errors: bool = False) -> None:
        name = dev.matching_driver()
        if name is None or dev.driver is not None:
            return
        drv = GUEST_DRIVERS[name]
        try:
            await dev.channel.open(drv.send_ring, drv.recv_ring)
        except (OpenError, OSError, trio.TooSlowError) as e:
            log.error("vmbus: %s: probe of %s failed: %s", dev.name, name, e)
            if raise_errors:
                raise OSError(errno.EIO, str(e)) from None
            return
        dev.driver = name
        self.sysfs.bind(dev.name, name)
        assert self._nursery is not None and dev.channel.endpoint is not None
        ep = dev.channel.endpoint
        service = drv.service(dev) if drv.service is not None else _drain
        self._nursery.start_soon(self._run_channel, dev, ep, service)

    async def _run_channel(self, dev: VmbusDevice,
                           ep: RingEndpoint,
                           service: Callable[[RingEndpoint], Awaitable[None]]) -> None:
        with trio.CancelScope() as scope:
            dev._scope = scope
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ep.run)
                try:
                    await service(ep)
                except ChannelBroken as e:
                    log.error("vmbus: %s: %s", dev.name, e)

    async def _unbind(self, dev: VmbusDevice) -> None:
        if dev.driver is None:
            return
        if dev._scope is not None:
            dev._scope.cancel()
            dev._scope = None
        self.sysfs.unbind(dev.name)
        dev.driver = None
        await dev.channel.close()

    async def set_target_cpu(self, dev: VmbusDevice, cpu: int) -> None:
        """``channels/<relid>/cpu`` store (vmbus_drv.c ``target_cpu_store``)."""
        if self.version is None or self.version < m.Version.WIN10_V4_1:
            raise OSError(errno.EIO, "needs VMBus protocol 4.1 or later")
        if not 0 <= cpu < self.cpus:
            raise OSError(errno.EINVAL, f"cpu {cpu} is not online (0-{self.cpus - 1})")
        chan = dev.channel
        if chan.state != ChannelState.OPENED:
            raise OSError(errno.EIO, "channel is not open")
        if cpu == chan.target_cpu:
            return
        await self.modify_channel(chan, cpu)
        chan.target_cpu = cpu
