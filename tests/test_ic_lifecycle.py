"""The integration services across channel lifecycles: close, reopen, unbind and rebind,
a failed send. Each case was found by a review trying it; the expected behaviour is
Linux's (hv_util.c, hv_kvp.c, vmbus_prep_negotiate_resp) or openvmm's."""
from __future__ import annotations

import errno
import struct
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from backends.vmbus.channel import HostChannel
from tests.conftest import Logs
from tests.test_ic_rig import INSTANCES, Rig, start
from vbusfs.protocols.vmbus import hv_ic

MockClock = trio.testing.MockClock


@pytest.fixture
async def rig(nursery: trio.Nursery) -> AsyncIterator[Rig]:
    """test_ic_rig's default rig: both halves, every service negotiated."""
    yield await start(nursery)


def host_chan(r: Rig, service: str) -> HostChannel:
    return next(c for c in r.host.channels.values() if c.spec.if_instance == INSTANCES[service])


@pytest.mark.parametrize("i", range(3))
async def test_request_right_after_close(rig: Rig, autojump_clock: MockClock, i: int) -> None:
    """The host has processed CLOSECHANNEL (_stop) but the IC's run() has not yet seen its
    cancellation: a control-file request in that window."""
    chan = host_chan(rig, "shutdown")
    rig.host._stop(chan)              # what _on_close / rescind do, synchronously
    with pytest.raises(OSError) as e:
        await rig.sd.request("reboot")
    assert e.value.errno == errno.ENOTCONN


async def test_unbind_while_requests_arrive(rig: Rig, autojump_clock: MockClock) -> None:
    """Realistic path: `echo GUID > drivers/hv_utils/unbind` while host control-file
    requests keep arriving (each its own FUSE task)."""
    dev = rig.dev("kvp")
    errors: list[BaseException] = []

    async def requester() -> None:
        for _ in range(200):
            try:
                await rig.kvp.get(0, "HostKey")
            except OSError:
                pass
            except Exception as e:           # what fs._errors turns into EIO + traceback
                errors.append(e)
            await trio.sleep(0)

    async with trio.open_nursery() as n:
        for _ in range(4):
            n.start_soon(requester)
        await trio.sleep(0)
        await rig.bus.drivers.unbind(dev)
    assert not errors


@pytest.mark.parametrize("delay", range(0, 12))
async def test_unbind_then_one_request(rig: Rig, autojump_clock: MockClock, delay: int) -> None:
    """One request (a `mountctl kvp get`) issued `delay` scheduler batches after the guest
    starts to unbind."""
    dev = rig.dev("kvp")
    errors: list[BaseException] = []

    async def one() -> None:
        for _ in range(delay):
            await trio.lowlevel.checkpoint()
        try:
            await rig.kvp.get(0, "HostKey")
        except OSError:
            pass
        except Exception as e:
            errors.append(e)

    async with trio.open_nursery() as n:
        n.start_soon(one)
        await rig.bus.drivers.unbind(dev)
    assert not errors, [type(e).__name__ for e in errors]


@pytest.mark.parametrize("i", range(4))
async def test_accepted_shutdown_answer_survives_the_stop(nursery: trio.Nursery,
                                                        autojump_clock: MockClock, i: int) -> None:
    """What Machine._on_power + service._run do: the guest accepts, stop.set(), and
    machine.stop() -> bus.unload() closes every channel. Does the host's writer (mountctl
    shutdown) still get the guest's S_OK?"""
    r = await start(nursery)
    r.utils.platform.power = lambda action: nursery.start_soon(r.bus.unload)
    for _ in range(i):
        await trio.lowlevel.checkpoint()
    status = await r.sd.request("shutdown")
    assert status == 0


async def test_rebind_clears_an_oversized_packet(rig: Rig, autojump_clock: MockClock,
                                                 logs: Logs) -> None:
    """Linux: a packet larger than the receive buffer stays in the ring and silences the
    service -- until the channel is closed and reopened with a fresh ring (util_remove +
    util_probe); so does this service on a new channel."""
    logs.expect(r"Heartbeat request received\. Could not read into recv buf")
    chan = host_chan(rig, "heartbeat")
    await chan.send(0x6, 0, 0, bytes(5000))          # a hostile host's 5000-byte packet
    await trio.sleep(0.1)
    assert rig.utils.services["heartbeat"].stalled
    dev = rig.dev("heartbeat")
    await rig.bus.drivers.unbind(dev)
    await trio.sleep(0.1)
    await rig.bus._bind_by_name(dev.name)
    await trio.sleep(1)
    assert rig.hb.state == "ready"


@pytest.mark.parametrize("i", range(10))
async def test_close_and_reopen_back_to_back(rig: Rig, autojump_clock: MockClock, i: int,
                                             logs: Logs) -> None:
    """A guest that posts CLOSECHANNEL and OPENCHANNEL back to back (same GPADL, which the
    host still holds): the old IcDevice.run's finally may run after the new run() began,
    and must not clobber its state (`closed`, _chan None)."""
    logs.expect(r"unexpected OPENCHANNEL_RESULT")       # the test posted it, not the bus
    from vbusfs.protocols.vmbus import messages as m
    dev = rig.dev("shutdown")
    ch = dev.channel
    host = host_chan(rig, "shutdown")
    split = 3 + 1                      # ring_size(3 pages) = 4 pages each way
    rig.bus.conn.post(m.CloseChannel(ch.relid).pack())
    rig.bus.conn.post(m.OpenChannel(ch.relid, ch.relid, ch.gpadl, 0, split).pack())
    await trio.sleep(1)
    assert host.is_open and host.opened == 2
    assert rig.sd.state == "ready", rig.sd.state


async def test_pushed_is_this_sessions(rig: Rig, autojump_clock: MockClock) -> None:
    """The host's record of its pushes (shown in host/status) is per negotiation; it had
    grown with every bind."""
    dev = rig.dev("kvp")
    for _ in range(5):
        await rig.bus.drivers.unbind(dev)
        await trio.sleep(0.1)
        await rig.bus._bind_by_name(dev.name)
        await trio.sleep(1)
    assert len(rig.kvp.pushed) == len(rig.kvp.initial)      # this session's, not all of them


def test_failed_negotiation_still_sets_the_version() -> None:
    """vmbus_prep_negotiate_resp writes *nego_srv_version whether or not it matched; for
    timesync that decides which body (v1 or v4) the next sample is parsed with."""
    from vbusfs.drivers.vmbus.hv_utils import make_service
    from vbusfs.drivers.vmbus.util_service import HvUtilsPlatform
    svc = make_service("timesync", HvUtilsPlatform())
    svc.answer(hv_ic.negotiate_request([(1, 0), (3, 0)], [(4, 0)]))
    assert svc.version == (4, 0)
    # the host renegotiates offering one unknown service version: Linux answers 0/0 and
    # sets ts_srv_version = (icmsg_vercnt=1) << 16 = 1.0 -> the v1 body from now on
    reply = svc.answer(hv_ic.negotiate_request([(3, 0)], [(9, 9)]))
    assert struct.unpack_from("<HH", reply, 28) == (0, 0)
    assert svc.version == (1, 0)


async def test_power_action_survives_a_failed_send_and_fires_later() -> None:
    """UtilService.run: the reply's send fails (ring broken by the host, or the task is
    cancelled while the host's ring is full at unbind); the queued power action stays in
    _work and runs after the *next* packet, e.g. the negotiation after a rebind."""
    from vbusfs.drivers.vmbus.hv_utils import make_service
    from vbusfs.drivers.vmbus.util_service import HvUtilsPlatform
    from vbusfs.platform.vmbus.ring_endpoint import ChannelBroken
    from vbusfs.protocols.vmbus.ring import Packet
    powers: list[str] = []
    svc = make_service("shutdown", HvUtilsPlatform(power=powers.append))

    class Ep:
        def __init__(self, pkts: list[bytes], broken: bool) -> None:
            self.pkts, self.broken = pkts, broken
        async def receive(self) -> list[Packet]:
            if not self.pkts:
                await trio.sleep_forever()
            return [Packet(6, 0, 1, b"", self.pkts.pop(0))]
        async def send(self, *a: object) -> None:
            if self.broken:
                raise ChannelBroken("ring indices out of range")

    # first channel: the shutdown request is answered, but the send fails; Linux schedules
    # the poweroff whatever vmbus_sendpacket returned
    with pytest.raises(ChannelBroken):
        await svc.run(Ep([hv_ic.shutdown_request(0, (3, 0), (3, 2))], broken=True))
    assert powers == ["poweroff"]
    # the device is bound again later: its negotiation does not run anything again
    with trio.move_on_after(1):
        await svc.run(Ep([hv_ic.negotiate_request([(1, 0), (3, 0)], [(3, 2)])], broken=False))
    assert powers == ["poweroff"]
