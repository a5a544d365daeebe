"""A guest VMBus channel: ring allocation, GPADL, OPENCHANNEL, CLOSECHANNEL, and its state.

Mirrors Linux ``drivers/hv/channel.c`` (``vmbus_open``/``vmbus_close``): the send and receive
rings are one contiguous allocation described to the host by a GPADL; the receive ring starts
at ``downstream_ringbuffer_pageoffset``.
"""

from __future__ import annotations

import enum
import functools

from vbusfs.drivers.vmbus.connection import OpenError, VmbusConnection
from vbusfs.platform.doorbell import Doorbell
from vbusfs.platform.memory import PAGE_SIZE
from vbusfs.platform.vmbus.ring_endpoint import RingEndpoint
from vbusfs.protocols.vmbus import messages as m
from vbusfs.protocols.vmbus.ring import Ring, init_ring

__all__ = ["ChannelState", "GuestChannel", "OpenError"]


class ChannelState(enum.IntEnum):
    """``enum vmbus_channel_state`` (include/linux/hyperv.h)."""

    OFFER = 0
    OPENING = 1
    OPEN = 2       # offered and set up, not opened by a driver
    OPENED = 3


class GuestChannel:
    def __init__(self, conn: VmbusConnection, offer: m.OfferChannel) -> None:
        self.conn = conn
        self.offer: m.OfferChannel = offer
        self.relid: int = offer.child_relid
        self.state: ChannelState = ChannelState.OFFER
        self.target_cpu: int = 0
        self.doorbell = Doorbell(f"relid {self.relid}")
        self.endpoint: RingEndpoint | None = None
        self.gpadl = 0
        self._ring_pfn = 0
        self._ring_pages = 0
        self.rescinded = False

    @property
    def sig_event(self) -> int:
        return self.offer.connection_id

    @property
    def interrupts(self) -> int:
        return self.doorbell.count

    async def open(self, send_bytes: int, recv_bytes: int) -> None:
        """``vmbus_open``: allocate and init both rings, GPADL them, OPENCHANNEL."""
        if self.state != ChannelState.OPEN:
            raise OpenError(f"relid {self.relid} is in state {self.state.name}")
        send_pages, recv_pages = send_bytes // PAGE_SIZE, recv_bytes // PAGE_SIZE
        total = send_pages + recv_pages
        mem = self.conn.memory
        pfn = mem.alloc(total)
        out_view = mem.view(pfn, send_pages)
        in_view = mem.view(pfn + send_pages, recv_pages)
        init_ring(out_view)
        init_ring(in_view)
        self.state = ChannelState.OPENING
        # The interrupt must be routed before OPENCHANNEL: the host may send at once, and a
        # doorbell keeps the event pending until the channel's pump first waits on it.
        self.conn.synic.guest_interrupts[self.relid] = self.doorbell
        try:
            self.gpadl = await self.conn.create_gpadl(self.relid, list(range(pfn, pfn + total)))
            openid = self.relid
            await self.conn.open_channel(m.OpenChannel(self.relid, openid, self.gpadl,
                                                      self.target_cpu, send_pages))
        except BaseException:
            self.conn.synic.guest_interrupts.pop(self.relid, None)
            self.state = ChannelState.OPEN
            if self.gpadl:
                await self.conn.teardown_gpadl(self.relid, self.gpadl)
                self.gpadl = 0
            mem.free(pfn, total)
            raise
        self._ring_pfn, self._ring_pages = pfn, total
        # vmbus_setevent: HvSignalEvent(sig_event) (a partial: no Python frame of its own)
        signal_host = functools.partial(self.conn.synic.signal_event, self.sig_event)
        self.endpoint = RingEndpoint(Ring(in_view), Ring(out_view), self.doorbell,
                                     signal_host, f"guest relid {self.relid}")
        self.state = ChannelState.OPENED

    async def close(self) -> None:
        """``vmbus_close``: CLOSECHANNEL, tear the GPADL down, free the rings."""
        if self.state != ChannelState.OPENED:
            return
        self.conn.synic.guest_interrupts.pop(self.relid, None)
        self.endpoint = None
        if not self.rescinded:
            self.conn.post(m.CloseChannel(self.relid).pack())
            await self.conn.teardown_gpadl(self.relid, self.gpadl)
        self.gpadl = 0
        self.conn.memory.free(self._ring_pfn, self._ring_pages)
        self._ring_pfn = self._ring_pages = 0
        self.state = ChannelState.OPEN

    def ring(self, direction: str) -> Ring:
        """The outbound (``out``) or inbound (``in``) ring; EINVAL when not mapped, as Linux's
        ring attributes do."""
        ep = self.endpoint
        if ep is None:
            raise OSError(22, "ring buffer not mapped")  # EINVAL
        return ep.tx if direction == "out" else ep.rx
