"""One side's end of a VMBus channel: a ring to drain, a ring to fill, a doorbell, a signal.

Both halves use it — the guest's channel driver and the host's device model — each over the
same two rings in guest memory, seen from opposite ends. A pump task waits on this side's
doorbell, drains the inbound ring (publishing the read index and signalling the writer when
``pending_send_sz`` says it was blocked), and wakes any sender waiting for space. The
counters are the ones Linux shows under ``channels/<relid>/``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from vbusfs.platform.doorbell import Doorbell
from vbusfs.protocols.vmbus.ring import Packet, Ring, RingError

__all__ = ["RingEndpoint", "ChannelBroken"]

log = logging.getLogger(__name__)


class ChannelBroken(Exception):
    """The peer corrupted the ring; the channel carries nothing more."""


class RingEndpoint:
    def __init__(self, rx: Ring, tx: Ring, doorbell: Doorbell, signal_peer: Callable[[], None],
                 name: str, backlog: int = 256) -> None:
        self.rx = rx
        self.tx = tx
        self.doorbell = doorbell
        self._signal_peer = signal_peer
        self.name = name
        self._space = trio.Event()
        self._rx_send, self._rx_recv = trio.open_memory_channel[Packet](backlog)
        self.broken: str | None = None
        # Linux channel counters (vmbus_drv.c channel attributes)
        self.signals_sent = 0      # "events"
        self.intr_in_full = 0
        self.intr_out_empty = 0
        self.out_full_first = 0
        self.out_full_total = 0

    def signal(self) -> None:
        self.signals_sent += 1
        self._signal_peer()

    async def run(self) -> None:
        """The pump; runs until cancelled or the peer breaks the ring."""
        try:
            while True:
                await self.doorbell.wait()
                self._space.set()
                self._space = trio.Event()
                await self._drain()
        except RingError as e:
            self.broken = str(e)
            log.error("%s: ring protocol violation, channel stopped: %s", self.name, e)
        finally:
            self._rx_send.close()
            self._space.set()

    async def _drain(self) -> None:
        while True:
            self.rx.interrupt_mask = 1      # hv_begin_read: no interrupts while draining
            while (pkt := self.rx.read()) is not None:
                await self._rx_send.send(pkt)
            if self.rx.commit_read():
                self.intr_in_full += 1
                self.signal()
            self.rx.interrupt_mask = 0      # hv_end_read: re-check for a racing write
            if self.rx.bytes_to_read() == 0:
                return

    async def receive(self) -> list[Packet]:
        """At least one packet (waiting for it), plus whatever else is already queued."""
        try:
            batch = [await self._rx_recv.receive()]
        except trio.EndOfChannel:
            raise ChannelBroken(self.broken or f"{self.name}: channel closed") from None
        while True:
            try:
                batch.append(self._rx_recv.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                return batch

    async def send(self, ptype: int, flags: int, trans_id: int, payload: bytes,
                   header: bytes = b"") -> None:
        """Write one packet, waiting (with ``pending_send_sz`` set) while the ring is full."""
        while True:
            if self.broken:
                raise ChannelBroken(self.broken)
            try:
                written, signal = self.tx.write(ptype, flags, trans_id, payload, header)
            except RingError as e:
                self.broken = str(e)
                raise ChannelBroken(str(e)) from None
            if written:
                self.tx.out_full_flag = False
                self.tx.pending_send_sz = 0
                if signal:
                    self.intr_out_empty += 1
                    self.signal()
                return
            self.out_full_total += 1
            if not self.tx.out_full_flag:
                self.out_full_first += 1
                self.tx.out_full_flag = True
            self.tx.pending_send_sz = 16 + len(header) + len(payload) + 16
            space = self._space
            await space.wait()
