"""The Hyper-V side of VMBus: version negotiation, offers, GPADLs, open/close, rescind.

Guest messages arrive through :class:`vbusfs.platform.vmbus.synic.Synic`; each is dispatched
through a table that states the message's minimum length, checked before the handler runs.
Everything in a guest message is untrusted: unknown relids, reused GPADL handles, PFNs
outside guest memory, impossible ring splits are answered with an error status (or dropped
and logged where the protocol has no error reply), never with an exception.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from backends.vmbus.channel import ChannelSpec, HostChannel
from vbusfs.platform.memory import PAGE_SIZE, GuestMemory, MemoryError_
from vbusfs.platform.vmbus.ring_endpoint import RingEndpoint
from vbusfs.platform.vmbus.synic import PostedMessage, Synic
from vbusfs.protocols.vmbus import messages as m
from vbusfs.protocols.vmbus.ring import Ring, RingError

log = logging.getLogger(__name__)

__all__ = ["VmbusHost", "STATUS_UNSUCCESSFUL"]

STATUS_UNSUCCESSFUL = 0xC0000001   # NTSTATUS used for failed GPADL/open requests
#: host's choice for the monitor latency it writes (100 ns units); real hosts vary
MONITOR_LATENCY = 100


@dataclass
class _Gpadl:
    relid: int
    handle: int
    byte_count: int
    byte_offset: int
    total_pfns: int
    pfns: list[int] = field(default_factory=list)
    created: bool = False


Handler = Callable[[bytes], Awaitable[None]]


class VmbusHost:
    """The VMBus server of one partition."""

    def __init__(self, synic: Synic, memory: GuestMemory, specs: list[ChannelSpec],
                 max_version: m.Version = m.Version.WIN10_V5_3) -> None:
        self.synic = synic
        self.memory = memory
        self.max_version = max_version
        self.version: m.Version | None = None
        self.channels: dict[int, HostChannel] = {}
        self._gpadls: dict[int, _Gpadl] = {}
        self._monitor_pages: tuple[int, int] | None = None
        self._nursery: trio.Nursery | None = None
        next_monitor = 0
        for relid, spec in enumerate(specs, start=1):
            monitorid = None
            if spec.monitor:
                monitorid, next_monitor = next_monitor, next_monitor + 1
            self.channels[relid] = HostChannel(spec, relid, monitorid)
        self._table: dict[int, tuple[int, Handler]] = {
            m.MessageType.INITIATE_CONTACT: (m.InitiateContact.FMT.size, self._on_contact),
            m.MessageType.REQUESTOFFERS: (8, self._on_request_offers),
            m.MessageType.GPADL_HEADER: (28, self._on_gpadl_header),
            m.MessageType.GPADL_BODY: (m.GpadlBody.FMT.size, self._on_gpadl_body),
            m.MessageType.OPENCHANNEL: (m.OpenChannel.FMT.size, self._on_open),
            m.MessageType.CLOSECHANNEL: (m.CloseChannel.FMT.size, self._on_close),
            m.MessageType.GPADL_TEARDOWN: (m.GpadlTeardown.FMT.size, self._on_gpadl_teardown),
            m.MessageType.RELID_RELEASED: (m.RelidReleased.FMT.size, self._on_relid_released),
            m.MessageType.MODIFYCHANNEL: (m.ModifyChannel.FMT.size, self._on_modify),
            m.MessageType.UNLOAD: (8, self._on_unload),
        }
        # Before contact only INITIATE_CONTACT is accepted, on either initial connection id.
        synic.message_connections.update(
            {m.VMBUS_MESSAGE_CONNECTION_ID, m.VMBUS_MESSAGE_CONNECTION_ID_4})

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            async for msg in self.synic.to_host_recv:
                await self._dispatch(msg)

    async def _dispatch(self, msg: PostedMessage) -> None:
        buf = msg.payload
        try:
            mtype = m.message_type(buf)
        except m.MessageError as e:
            log.warning("vmbus host: %s", e)
            return
        entry = self._table.get(mtype)
        if entry is None:
            log.warning("vmbus host: ignoring message type %d", mtype)
            return
        min_len, handler = entry
        if len(buf) < min_len:
            log.warning("vmbus host: %s of %d bytes, needs %d: dropped",
                        m.MessageType(mtype).name, len(buf), min_len)
            return
        if mtype != m.MessageType.INITIATE_CONTACT and self.version is None:
            log.warning("vmbus host: %s before INITIATE_CONTACT: dropped",
                        m.MessageType(mtype).name)
            return
        try:
            await handler(buf)
        except m.MessageError as e:
            log.warning("vmbus host: %s", e)

    # -- connection ------------------------------------------------------------------------
    async def _on_contact(self, buf: bytes) -> None:
        req = m.InitiateContact.unpack(buf)
        try:
            version = m.Version(req.version_requested)
        except ValueError:
            version = None
        ok = version is not None and version <= self.max_version and version >= m.Version.WIN8
        conn_id = m.VMBUS_MESSAGE_CONNECTION_ID_4 if ok and version and \
            version >= m.Version.WIN10_V5 else m.VMBUS_MESSAGE_CONNECTION_ID
        if ok:
            assert version is not None
            if not self._set_monitor_pages(req.monitor_page1, req.monitor_page2):
                ok = False
            else:
                self.version = version
                self.synic.message_connections.clear()
                self.synic.message_connections.add(conn_id)
        await self.synic.deliver(m.VersionResponse(ok, 0, conn_id if ok else 0).pack())

    def _set_monitor_pages(self, gpa1: int, gpa2: int) -> bool:
        try:
            for gpa in (gpa1, gpa2):
                if gpa % PAGE_SIZE:
                    raise MemoryError_(f"monitor page GPA {gpa:#x} is not page aligned")
                self.memory.gpa_view(gpa, PAGE_SIZE)
        except MemoryError_ as e:
            log.warning("vmbus host: INITIATE_CONTACT refused: %s", e)
            return False
        self._monitor_pages = (gpa1, gpa2)
        return True

    async def _on_request_offers(self, buf: bytes) -> None:
        for chan in self.channels.values():
            self._publish_monitor(chan)
            await self.synic.deliver(chan.offer().pack())
        await self.synic.deliver(m.AllOffersDelivered().pack())

    def _publish_monitor(self, chan: HostChannel) -> None:
        """Write the channel's connection id and latency into both monitor pages."""
        if chan.monitorid is None or self._monitor_pages is None:
            return
        mp = m.MONITOR_PAGE
        for gpa in self._monitor_pages:
            page = self.memory.gpa_view(gpa, PAGE_SIZE)
            conn = mp.parameter_offset(chan.monitorid)
            page[conn:conn + 4] = chan.connection_id.to_bytes(4, "little")
            lat = mp.latency_offset(chan.monitorid)
            page[lat:lat + 2] = MONITOR_LATENCY.to_bytes(2, "little")

    async def _on_unload(self, buf: bytes) -> None:
        for chan in self.channels.values():
            self._stop(chan)
        self._gpadls.clear()
        self.version = None
        await self.synic.deliver(m.UnloadResponse().pack())

    # -- GPADL -------------------------------------------------------------------------------
    async def _on_gpadl_header(self, buf: bytes) -> None:
        hdr = m.GpadlHeader.unpack(buf)
        problem = None
        total = (hdr.byte_offset + hdr.byte_count + PAGE_SIZE - 1) // PAGE_SIZE
        if hdr.child_relid not in self.channels:
            problem = f"unknown relid {hdr.child_relid}"
        elif hdr.gpadl in self._gpadls or hdr.gpadl == 0:
            problem = f"GPADL handle {hdr.gpadl:#x} is zero or already in use"
        elif hdr.rangecount != 1:
            problem = f"{hdr.rangecount} GPA ranges (only 1 is supported)"
        elif hdr.byte_count == 0 or hdr.byte_offset >= PAGE_SIZE:
            problem = f"empty range or offset {hdr.byte_offset} past the first page"
        elif hdr.range_buflen != 8 + 8 * total:
            problem = f"range_buflen {hdr.range_buflen} does not match {total} PFNs"
        elif len(hdr.pfns) > total:
            problem = f"{len(hdr.pfns)} PFNs in the header, range needs {total}"
        if problem is not None:
            log.warning("vmbus host: GPADL_HEADER refused: %s", problem)
            await self.synic.deliver(m.GpadlCreated(hdr.child_relid, hdr.gpadl,
                                                    STATUS_UNSUCCESSFUL).pack())
            return
        g = _Gpadl(hdr.child_relid, hdr.gpadl, hdr.byte_count, hdr.byte_offset, total,
                   list(hdr.pfns))
        self._gpadls[hdr.gpadl] = g
        await self._maybe_created(g)

    async def _on_gpadl_body(self, buf: bytes) -> None:
        body = m.GpadlBody.unpack(buf)
        g = self._gpadls.get(body.gpadl)
        if g is None or g.created:
            log.warning("vmbus host: GPADL_BODY for unknown or complete GPADL %#x", body.gpadl)
            return
        g.pfns.extend(body.pfns)
        if len(g.pfns) > g.total_pfns:
            del self._gpadls[g.handle]
            log.warning("vmbus host: GPADL %#x: more PFNs than its range", g.handle)
            await self.synic.deliver(m.GpadlCreated(g.relid, g.handle,
                                                    STATUS_UNSUCCESSFUL).pack())
            return
        await self._maybe_created(g)

    async def _maybe_created(self, g: _Gpadl) -> None:
        if len(g.pfns) < g.total_pfns:
            return
        status = 0
        for pfn in g.pfns:
            if not 0 < pfn < self.memory.nr_frames:
                log.warning("vmbus host: GPADL %#x names PFN %#x outside guest memory",
                            g.handle, pfn)
                status = STATUS_UNSUCCESSFUL
                break
        if status:
            del self._gpadls[g.handle]
        else:
            g.created = True
        await self.synic.deliver(m.GpadlCreated(g.relid, g.handle, status).pack())

    async def _on_gpadl_teardown(self, buf: bytes) -> None:
        req = m.GpadlTeardown.unpack(buf)
        g = self._gpadls.get(req.gpadl)
        if g is None:
            log.warning("vmbus host: teardown of unknown GPADL %#x", req.gpadl)
            return
        chan = self.channels.get(g.relid)
        if chan is not None and chan.gpadl_in_use == g.handle:
            log.warning("vmbus host: teardown of GPADL %#x still used by an open channel",
                        g.handle)
            return
        del self._gpadls[req.gpadl]
        await self.synic.deliver(m.GpadlTorndown(req.gpadl).pack())

    # -- open / close --------------------------------------------------------------------------
    async def _on_open(self, buf: bytes) -> None:
        req = m.OpenChannel.unpack(buf)
        chan = self.channels.get(req.child_relid)
        g = self._gpadls.get(req.ringbuffer_gpadlhandle)
        problem = None
        if chan is None:
            log.warning("vmbus host: OPENCHANNEL for unknown relid %d: dropped", req.child_relid)
            return
        if chan.is_open:
            problem = "channel is already open"
        elif g is None or not g.created or g.relid != chan.relid:
            problem = f"GPADL {req.ringbuffer_gpadlhandle:#x} is not a created GPADL of it"
        elif g.byte_offset or g.byte_count != g.total_pfns * PAGE_SIZE:
            problem = "ring GPADL is not whole pages"
        elif not 2 <= req.downstream_ringbuffer_pageoffset <= g.total_pfns - 2:
            problem = f"ring split at page {req.downstream_ringbuffer_pageoffset} of " \
                      f"{g.total_pfns}: each ring needs a header and a data page"
        elif any(b - a != 1 for a, b in zip(g.pfns, g.pfns[1:], strict=False)):
            problem = "ring pages are not contiguous (this host maps rings as one extent)"
        if problem is None:
            assert chan is not None and g is not None
            split = req.downstream_ringbuffer_pageoffset
            try:
                guest_out = Ring(self.memory.view(g.pfns[0], split))
                guest_in = Ring(self.memory.view(g.pfns[0] + split, g.total_pfns - split))
            except (MemoryError_, RingError) as e:
                problem = str(e)
            else:
                chan.memory = self.memory
                chan.ring_pfns = range(g.pfns[0], g.pfns[0] + g.total_pfns)
                self._start(chan, guest_out, guest_in, g.handle, req.target_vp)
        if problem is not None:
            log.warning("vmbus host: OPENCHANNEL relid %d refused: %s", req.child_relid, problem)
        await self.synic.deliver(m.OpenResult(req.child_relid, req.openid,
                                              STATUS_UNSUCCESSFUL if problem else 0).pack())

    def _start(self, chan: HostChannel, guest_out: Ring, guest_in: Ring, gpadl: int,
               target_vp: int) -> None:
        relid = chan.relid
        chan.endpoint = RingEndpoint(guest_out, guest_in, chan.doorbell,
                                     functools.partial(self.synic.interrupt_guest, relid),
                                     chan.name)
        chan.gpadl_in_use = gpadl
        chan.target_vp = target_vp
        chan.opened += 1
        self.synic.event_connections[chan.connection_id] = chan.doorbell
        assert self._nursery is not None
        self._nursery.start_soon(self._serve, chan)

    async def _serve(self, chan: HostChannel) -> None:
        with trio.CancelScope() as scope:
            chan._cancel = scope
            async with trio.open_nursery() as nursery:
                assert chan.endpoint is not None
                if not getattr(chan.spec.model, "reads_ring_directly", False):
                    nursery.start_soon(chan.endpoint.run)
                try:
                    await chan.spec.model.run(chan)
                except Exception as e:  # a device model bug must not take the bus down
                    log.exception("%s: device model failed: %s", chan.name, e)
                nursery.cancel_scope.cancel()

    def _stop(self, chan: HostChannel) -> None:
        if chan._cancel is not None:
            chan._cancel.cancel()
            chan._cancel = None
        self.synic.event_connections.pop(chan.connection_id, None)
        chan.endpoint = None
        chan.gpadl_in_use = None
        chan.ring_pfns = range(0)

    async def _on_close(self, buf: bytes) -> None:
        req = m.CloseChannel.unpack(buf)
        chan = self.channels.get(req.child_relid)
        if chan is None or not chan.is_open:
            log.warning("vmbus host: CLOSECHANNEL for relid %d that is not open",
                        req.child_relid)
            return
        self._stop(chan)

    async def _on_relid_released(self, buf: bytes) -> None:
        req = m.RelidReleased.unpack(buf)
        self.channels.pop(req.child_relid, None)

    async def _on_modify(self, buf: bytes) -> None:
        req = m.ModifyChannel.unpack(buf)
        chan = self.channels.get(req.child_relid)
        status = 0
        if chan is None or not chan.is_open:
            status = -1
        else:
            chan.target_vp = req.target_vp
        if self.version is not None and self.version >= m.Version.WIN10_V5_3:
            await self.synic.deliver(m.ModifyChannelResponse(req.child_relid, status).pack())

    # -- hot-unplug ------------------------------------------------------------------------------
    async def rescind(self, relid: int) -> None:
        """Take a device away: stop its model and tell the guest."""
        chan = self.channels.get(relid)
        if chan is None:
            raise KeyError(relid)
        self._stop(chan)
        await self.synic.deliver(m.RescindOffer(relid).pack())
