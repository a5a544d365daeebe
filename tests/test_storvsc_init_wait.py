"""storvsc's init requests (``storvsc_execute_vstor_op``) against a host that answers from
its doorbell handler, later, or never: an answer that is already there is taken without a
turn of the event loop; otherwise the request waits (for ring space, then for the answer)
at most INIT_TIMEOUT, and is written exactly once either way."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import trio
import trio.testing

from vbusfs.drivers.vmbus.storvsc import INIT_TIMEOUT, RING_BYTES, Storvsc
from vbusfs.platform.memory import PAGE_SIZE, GuestMemory
from vbusfs.protocols.vmbus import storvsc as sv
from vbusfs.protocols.vmbus.ring import Packet, PacketType
from vbusfs.protocols.vmbus.storvsc import Operation


class _Endpoint:
    """The channel's ring as storvsc uses it: ``room`` packets fit before it is full; a
    ``host`` called on each signal may answer at once, as storvsp's doorbell handler does."""

    def __init__(self, room: int = 1) -> None:
        self.room = room
        self.written: list[bytes] = []
        self.host: object = None

    def try_write(self, ptype: int, flags: int, trans_id: int, payload: bytes,
                  header: bytes = b"") -> bool:
        if self.room <= 0:
            return False
        self.room -= 1
        self.written.append(payload)
        return True

    def poll(self) -> list[Packet]:
        return []

    def flush_signal(self) -> None:
        if callable(self.host):
            self.host()


def _controller(ep: _Endpoint) -> Storvsc:
    dev = SimpleNamespace(name="ctrl")
    return Storvsc(dev, ep, GuestMemory(16 * PAGE_SIZE), RING_BYTES, 2)  # type: ignore[arg-type]


def _answer(ctrl: Storvsc, status: int = 0) -> None:
    ctrl._on_packet(Packet(PacketType.COMP, 0, sv.VMBUS_RQST_INIT, b"",
                           sv.pack_packet(Operation.COMPLETE_IO, status=status)))


async def test_an_answer_from_the_doorbell_handler_takes_no_turn_of_the_loop() -> None:
    ep = _Endpoint()
    ctrl = _controller(ep)
    ep.host = lambda: _answer(ctrl)
    with trio.CancelScope() as scope:
        scope.cancel()                  # any checkpoint would raise Cancelled here
        rop, status, _ = await ctrl._init_op(Operation.BEGIN_INITIALIZATION)
    assert (rop, status) == (Operation.COMPLETE_IO, 0) and len(ep.written) == 1


async def test_a_later_answer_is_waited_for(autojump_clock: trio.testing.MockClock) -> None:
    ep = _Endpoint()
    ctrl = _controller(ep)

    async def host() -> None:
        await trio.sleep(INIT_TIMEOUT / 2)
        _answer(ctrl, status=7)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(host)
        rop, status, _ = await ctrl._init_op(Operation.BEGIN_INITIALIZATION)
    assert (rop, status) == (Operation.COMPLETE_IO, 7) and len(ep.written) == 1


async def test_a_full_ring_is_waited_for_and_the_request_written_once(
        autojump_clock: trio.testing.MockClock) -> None:
    ep = _Endpoint(room=0)
    ctrl = _controller(ep)

    async def host() -> None:
        await trio.sleep(1)
        ep.room = 5
        ep.host = lambda: _answer(ctrl) if ep.written else None
        ctrl.interrupt()                # the host read the ring and signalled: room
    async with trio.open_nursery() as nursery:
        nursery.start_soon(host)
        rop, _status, _ = await ctrl._init_op(Operation.BEGIN_INITIALIZATION)
    assert rop == Operation.COMPLETE_IO and len(ep.written) == 1


async def test_no_answer_is_a_timeout(autojump_clock: trio.testing.MockClock) -> None:
    ep = _Endpoint()
    ctrl = _controller(ep)
    with pytest.raises(OSError, match="BEGIN_INITIALIZATION not answered within 5 s"):
        await ctrl._init_op(Operation.BEGIN_INITIALIZATION)
    assert trio.current_time() >= INIT_TIMEOUT and len(ep.written) == 1
