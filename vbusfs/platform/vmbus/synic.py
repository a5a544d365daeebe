"""The Hyper-V SynIC as VMBus uses it: a message port and per-connection event doorbells.

Guest→host messages are ``HvPostMessage`` to a connection id; host→guest messages arrive on
the guest's VMBus SINT message slot. Both directions are bounded queues of raw bytes (at most
240 each, ``HV_MESSAGE_PAYLOAD_BYTE_COUNT``). Channel signals are ``HvSignalEvent`` on a
connection id (guest→host) and an event flag per relid (host→guest); both are doorbells.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import trio

from vbusfs.platform.doorbell import Doorbell
from vbusfs.protocols.vmbus.messages import MAX_MESSAGE_SIZE

__all__ = ["HvStatus", "Synic", "PostedMessage"]


class HvStatus(enum.IntEnum):
    """Hypercall status codes (TLFS) the message port can return."""

    SUCCESS = 0x0000
    INVALID_PARAMETER = 0x0005
    INVALID_CONNECTION_ID = 0x0012
    INSUFFICIENT_BUFFERS = 0x0013


@dataclass(frozen=True)
class PostedMessage:
    connection_id: int
    payload: bytes


@dataclass
class Synic:
    """One partition's SynIC, shared by the guest (poster, receiver) and the host."""

    queue_depth: int = 64
    to_host_send: trio.MemorySendChannel[PostedMessage] = field(init=False)
    to_host_recv: trio.MemoryReceiveChannel[PostedMessage] = field(init=False)
    to_guest_send: trio.MemorySendChannel[bytes] = field(init=False)
    to_guest_recv: trio.MemoryReceiveChannel[bytes] = field(init=False)
    #: connection ids the host listens on for HvPostMessage
    message_connections: set[int] = field(default_factory=set)
    #: HvSignalEvent targets, by connection id
    event_connections: dict[int, Doorbell] = field(default_factory=dict)
    #: host→guest channel interrupts, by relid
    guest_interrupts: dict[int, Doorbell] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.to_host_send, self.to_host_recv = trio.open_memory_channel[PostedMessage](
            self.queue_depth)
        self.to_guest_send, self.to_guest_recv = trio.open_memory_channel[bytes](
            self.queue_depth)

    # guest side ------------------------------------------------------------------------
    def post_message(self, connection_id: int, payload: bytes) -> HvStatus:
        """HvPostMessage: never blocks; a full queue is HV_STATUS_INSUFFICIENT_BUFFERS."""
        if len(payload) > MAX_MESSAGE_SIZE:
            return HvStatus.INVALID_PARAMETER
        if connection_id not in self.message_connections:
            return HvStatus.INVALID_CONNECTION_ID
        try:
            self.to_host_send.send_nowait(PostedMessage(connection_id, bytes(payload)))
        except trio.WouldBlock:
            return HvStatus.INSUFFICIENT_BUFFERS
        return HvStatus.SUCCESS

    def signal_event(self, connection_id: int) -> HvStatus:
        """HvSignalEvent."""
        bell = self.event_connections.get(connection_id)
        if bell is None:
            return HvStatus.INVALID_CONNECTION_ID
        bell.ring()
        return HvStatus.SUCCESS

    # host side -------------------------------------------------------------------------
    async def deliver(self, payload: bytes) -> None:
        """Put a message in the guest's SINT slot (waits while the guest has not drained)."""
        if len(payload) > MAX_MESSAGE_SIZE:
            raise ValueError(f"host message of {len(payload)} bytes exceeds {MAX_MESSAGE_SIZE}")
        await self.to_guest_send.send(bytes(payload))

    def interrupt_guest(self, relid: int) -> None:
        bell = self.guest_interrupts.get(relid)
        if bell is not None:
            bell.ring()
