"""One side's end of a VMBus channel: a ring to drain, a ring to fill, a doorbell, a signal.

Both halves use it — the guest's channel driver and the host's device model — each over the
same two rings in guest memory, seen from opposite ends. A pump task waits on this side's
doorbell, drains the inbound ring (publishing the read index and signalling the writer when
``pending_send_sz`` says it was blocked), and wakes any sender waiting for space. The
counters are the ones Linux shows under ``channels/<relid>/``.

A side whose protocol is driven straight from the doorbell (storvsc and storvsp, like an
interrupt handler) does not run the pump: its handler calls :meth:`RingEndpoint.poll` to
drain the inbound ring and :meth:`RingEndpoint.try_write` / :meth:`RingEndpoint.flush_signal`
to answer, all synchronously, with the same ring and signalling rules.
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
    def __init__(self, rx: Ring, tx: Ring, doorbell: Doorbell, signal_peer: Callable[[], object],
                 name: str, backlog: int = 256) -> None:
        self.rx = rx
        self.tx = tx
        self.doorbell = doorbell
        self._signal_peer = signal_peer
        self.name = name
        self._space = trio.Event()
        # the pump's queue, made when the pump or a receiver first needs it: an endpoint
        # driven from its doorbell never does, and a memory channel costs more to make
        # than the rest of the endpoint (a machine has two endpoints per channel)
        self._backlog = backlog
        self._queue: tuple[trio.MemorySendChannel[Packet],
                           trio.MemoryReceiveChannel[Packet]] | None = None
        self.broken: str | None = None
        self._signal_owed = False          # try_write wrote into an empty ring
        # Linux channel counters (vmbus_drv.c channel attributes)
        self.signals_sent = 0      # "events"
        self.intr_in_full = 0
        self.intr_out_empty = 0
        self.out_full_first = 0
        self.out_full_total = 0

    def _rx(self) -> tuple[trio.MemorySendChannel[Packet], trio.MemoryReceiveChannel[Packet]]:
        if self._queue is None:
            self._queue = trio.open_memory_channel[Packet](self._backlog)
        return self._queue

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
            self._rx()[0].close()
            self._space.set()

    async def _drain(self) -> None:
        while True:
            self.rx.interrupt_mask = 1      # hv_begin_read: no interrupts while draining
            while (pkt := self.rx.read()) is not None:
                await self._rx()[0].send(pkt)
            if self.rx.commit_read():
                self.intr_in_full += 1
                self.signal()
            self.rx.interrupt_mask = 0      # hv_end_read: re-check for a racing write
            if self.rx.bytes_to_read() == 0:
                return

    # -- driven from the doorbell ---------------------------------------------------------------
    def poll(self, limit: int = 0) -> list[Packet]:
        """Drain the inbound ring now (what :meth:`run` does on each wake-up): every packet
        in it (at most ``limit`` when that is not 0: the rest stays, and since the peer
        does not signal a ring that is not empty, the caller polls again for it), the read
        index published, the writer signalled if it was blocked on space.
        Raises :class:`ChannelBroken` when the peer corrupted the ring."""
        if self.broken:
            raise ChannelBroken(self.broken)
        out: list[Packet] = []
        try:
            rx = self.rx
            while True:
                pkts, wake = rx.begin_batch(limit - len(out) if limit else 0)
                out += pkts
                if wake:
                    self.intr_in_full += 1
                    self.signal()
                if not rx.end_batch() or len(out) == limit:
                    return out
        except RingError as e:
            self.broken = str(e)
            log.error("%s: ring protocol violation, channel stopped: %s", self.name, e)
            raise ChannelBroken(self.broken) from None

    def packet_space(self, header_len: int, payload_len: int) -> int:
        """Ring bytes a packet takes (descriptor, header, padded payload, trailer)."""
        return (16 + header_len + payload_len + 7) // 8 * 8 + 8

    def can_write(self, nbytes: int) -> bool:
        """Whether a packet taking ``nbytes`` of ring fits now (the writer needs strictly
        more room than it writes). When it does not, ``pending_send_sz`` asks the reader to
        signal once that much is free."""
        try:
            if self.tx.bytes_to_write() > nbytes:
                return True
        except RingError as e:
            self.broken = str(e)
            return False
        self.out_full_total += 1
        if not self.tx.out_full_flag:
            self.out_full_first += 1
            self.tx.out_full_flag = True
        self.tx.pending_send_sz = nbytes
        return False

    def try_write(self, ptype: int, flags: int, trans_id: int, payload: bytes,
                  header: bytes = b"") -> bool:
        """Write one packet if it fits, without waiting and without signalling yet (call
        :meth:`flush_signal` after a batch); False when the ring is full, with
        ``pending_send_sz`` set so the reader signals when it has made room."""
        if self.broken:
            raise ChannelBroken(self.broken)
        try:
            written, signal = self.tx.write(ptype, flags, trans_id, payload, header)
        except RingError as e:
            self.broken = str(e)
            raise ChannelBroken(str(e)) from None
        if not written:
            self.can_write(self.packet_space(len(header), len(payload)))
            return False
        if signal:
            self.intr_out_empty += 1
            self._signal_owed = True
        return True

    def flush_signal(self) -> None:
        """Signal the peer once for what :meth:`try_write` put in an empty ring."""
        if self._signal_owed:
            self._signal_owed = False
            self.signal()

    async def receive(self) -> list[Packet]:
        """At least one packet (waiting for it), plus whatever else is already queued."""
        try:
            rx_recv = self._rx()[1]
            batch = [await rx_recv.receive()]
        except trio.EndOfChannel:
            raise ChannelBroken(self.broken or f"{self.name}: channel closed") from None
        while True:
            try:
                batch.append(rx_recv.receive_nowait())
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
            if written:                   # (the ring cleared pending_send_sz)
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
