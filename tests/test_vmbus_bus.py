"""Host and guest halves of VMBus in one trio run, no mount: negotiation, offers, GPADL,
open/close, rescind, hostile messages. Expected values come from the references."""

from __future__ import annotations

import errno
import random
import struct
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import trio
import trio.testing

from backends.vmbus.channel import ChannelSpec
from backends.vmbus.devices import IdleDevice
from backends.vmbus.host import VmbusHost
from backends.vmbus.ic import HeartbeatIc
from tests.conftest import Logs
from vbusfs.drivers.vmbus.bus import VmbusBus
from vbusfs.drivers.vmbus.connection import RESPONSE_TIMEOUT, OpenError, VmbusConnection
from vbusfs.drivers.vmbus.drivers import linux_drivers
from vbusfs.platform.memory import PAGE_SIZE, GuestMemory
from vbusfs.platform.vmbus.synic import PostedMessage, Synic
from vbusfs.protocols.vmbus import messages as m
from vbusfs.sysfs import Attribute, Directory, Symlink, Tree

HB = uuid.UUID("57164f39-9115-4e78-ab55-382f3bd5422d")
NIC = uuid.UUID("f8615163-df3e-46c5-913f-f2d2f965ed0e")
AVMA = uuid.UUID("f8e65716-3cb3-4a06-9a60-1889c5cccab5")
HB_INST = uuid.UUID("fd149e91-82e0-4a7d-afa6-2a4166cbd7c0")
NIC_INST = uuid.UUID("00000000-0000-0000-0000-0000000000a1")
AVMA_INST = uuid.UUID("00000000-0000-0000-0000-0000000000a2")


@dataclass
class Rig:
    host: VmbusHost
    bus: VmbusBus
    tree: Tree
    memory: GuestMemory
    hb: HeartbeatIc
    synic: Synic

    def dev(self, inst: uuid.UUID) -> Directory:
        node = self.tree.resolve(f"sys/bus/vmbus/devices/{inst}")
        assert isinstance(node, Symlink) and isinstance(node.target, Directory)
        return node.target

    def read(self, inst: uuid.UUID, attr: str) -> str:
        node = self.dev(inst).resolve(attr)
        assert isinstance(node, Attribute)
        return node.render().decode()


async def start_rig(nursery: trio.Nursery, host_version: m.Version = m.Version.WIN10_V5_3,
                    guest_versions: tuple[m.Version, ...] = m.KNOWN_VERSIONS) -> Rig:
    memory = GuestMemory(16 << 20)
    synic = Synic()
    tree = Tree()
    hb = HeartbeatIc(interval=2.0)
    specs = [ChannelSpec("hb", HB, HB_INST, hb),
             ChannelSpec("nic", NIC, NIC_INST, IdleDevice(), monitor=True),
             ChannelSpec("avma", AVMA, AVMA_INST, IdleDevice())]
    host = VmbusHost(synic, memory, specs, host_version)
    bus = VmbusBus(synic, memory, tree, cpus=2, versions=guest_versions)
    for drv in linux_drivers():
        bus.register(drv)
    await nursery.start(host.run)
    await nursery.start(bus.run)
    return Rig(host, bus, tree, memory, hb, synic)


@pytest.fixture
async def rig(nursery: trio.Nursery) -> AsyncIterator[Rig]:
    yield await start_rig(nursery)


async def test_connect_and_offers(rig: Rig) -> None:
    assert rig.bus.conn.version == m.Version.WIN10_V5_3
    assert rig.bus.conn.msg_conn_id == m.VMBUS_MESSAGE_CONNECTION_ID_4
    # relids are assigned in offer order by the host; `id` prints the relid
    assert [rig.read(i, "id") for i in (HB_INST, NIC_INST, AVMA_INST)] == ["1\n", "2\n", "3\n"]
    # drivers bound → OPENED (3); AVMA has no Linux driver → offered, unopened (2)
    assert rig.read(HB_INST, "state") == "3\n" and rig.read(NIC_INST, "state") == "3\n"
    assert rig.read(AVMA_INST, "state") == "2\n"
    assert rig.read(AVMA_INST, "device") == "0x10\n"
    assert rig.read(NIC_INST, "class_id") == "{f8615163-df3e-46c5-913f-f2d2f965ed0e}\n"
    assert rig.read(NIC_INST, "modalias") == "vmbus:635161f83edfc546913ff2d2f965ed0e\n"
    assert all(c.is_open for c in list(rig.host.channels.values())[:2])


async def test_unopened_ring_attributes_fail_einval(rig: Rig) -> None:
    node = rig.dev(AVMA_INST).resolve("in_read_index")
    assert isinstance(node, Attribute)
    with pytest.raises(OSError) as e:
        node.render()
    assert e.value.errno == errno.EINVAL


async def test_monitor_attributes_only_with_monitor(rig: Rig) -> None:
    assert "server_monitor_pending" not in rig.dev(HB_INST).children
    assert "pending" not in rig.dev(HB_INST).resolve("channels/1").children  # type: ignore[attr-defined]
    nic = rig.host.channels[2]
    assert rig.read(NIC_INST, "monitor_id") == "0\n"
    # the host wrote the channel's connection id into both monitor pages
    assert rig.read(NIC_INST, "server_monitor_conn_id") == f"{nic.connection_id}\n"
    assert rig.read(NIC_INST, "client_monitor_conn_id") == f"{nic.connection_id}\n"


async def test_ring_attributes_track_guest_memory(
        nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> None:
    rig = await start_rig(nursery)
    await trio.sleep(7)                           # negotiation + 3 heartbeats at 2 s
    assert rig.hb.version == (3, 0) and rig.hb.framework == (3, 0)
    assert rig.hb.heartbeats_acked == 3
    # independent check: read the inbound ring header straight from guest memory
    chan = rig.bus.devices[1].channel
    assert chan.endpoint is not None
    in_view = chan.endpoint.rx.view
    w, r = struct.unpack_from("<II", in_view, 0)
    assert rig.read(HB_INST, "in_write_index") == f"{w}\n"
    assert rig.read(HB_INST, "in_read_index") == f"{r}\n"
    assert w == r > 0
    assert int(rig.read(HB_INST, "channels/1/interrupts")) >= 1
    assert int(rig.read(HB_INST, "channels/1/events")) >= 1


async def test_version_fallback(nursery: trio.Nursery) -> None:
    rig = await start_rig(nursery, host_version=m.Version.WIN10)
    assert rig.bus.conn.version == m.Version.WIN10
    assert rig.bus.conn.msg_conn_id == m.VMBUS_MESSAGE_CONNECTION_ID
    with pytest.raises(OSError) as e:             # cpu moves need 4.1
        await rig.bus.devices[2].set_target_cpu(1)
    assert e.value.errno == errno.EIO


async def test_no_common_version(nursery: trio.Nursery) -> None:
    with pytest.raises(OSError) as e:
        await start_rig(nursery, guest_versions=(m.Version.WIN7,))
    assert e.value.errno == errno.EPROTO


async def test_cpu_store(rig: Rig) -> None:
    node = rig.dev(NIC_INST).resolve("channels/2/cpu")
    assert isinstance(node, Attribute)
    before = node.render()
    for bad in (b"7\n", b"x\n", b"-1\n"):
        with pytest.raises(OSError) as e:
            await node.write(bad)  # type: ignore[misc]
        assert e.value.errno == errno.EINVAL
        assert node.render() == before
    await node.write(b"1\n")  # type: ignore[misc]
    assert node.render() == b"1\n" and rig.host.channels[2].target_vp == 1
    assert rig.read(NIC_INST, "channel_vp_mapping") == "2:1\n"


async def test_unbind_and_bind_use_the_protocol(rig: Rig) -> None:
    drv = rig.tree.resolve("sys/bus/vmbus/drivers/hv_netvsc")
    assert isinstance(drv, Directory) and str(NIC_INST) in drv.children
    unbind, bind = drv.children["unbind"], drv.children["bind"]
    assert isinstance(unbind, Attribute) and isinstance(bind, Attribute)
    free_before = rig.memory.free_frames()
    await unbind.write(f"{NIC_INST}\n".encode())  # type: ignore[misc]
    await trio.testing.wait_all_tasks_blocked()
    assert rig.read(NIC_INST, "state") == "2\n"
    assert "driver" not in rig.dev(NIC_INST).children
    assert not rig.host.channels[2].is_open
    assert rig.memory.free_frames() > free_before        # rings given back
    await bind.write(f"{NIC_INST}\n".encode())  # type: ignore[misc]
    assert rig.read(NIC_INST, "state") == "3\n" and rig.host.channels[2].opened == 2
    with pytest.raises(OSError) as e:
        await bind.write(f"{NIC_INST}\n".encode())  # type: ignore[misc]
    assert e.value.errno == errno.EBUSY
    with pytest.raises(OSError) as e:
        await unbind.write(b"no-such-device\n")  # type: ignore[misc]
    assert e.value.errno == errno.ENODEV


async def test_rescind_removes_device(rig: Rig) -> None:
    await rig.host.rescind(2)
    await trio.testing.wait_all_tasks_blocked()
    with pytest.raises(FileNotFoundError):
        rig.tree.resolve(f"sys/bus/vmbus/devices/{NIC_INST}")
    assert 2 not in rig.host.channels         # RELID_RELEASED reached the host
    assert 2 not in rig.bus.devices


async def test_host_refuses_bad_gpadl_and_open(rig: Rig, logs: Logs) -> None:
    logs.expect(r"GPADL 0x[0-9a-f]+ names PFN 0x[0-9a-f]+ outside guest memory")
    logs.expect(r"GPADL_HEADER refused: unknown relid 99")
    logs.expect(r"OPENCHANNEL relid 3 refused: GPADL 0xdead is not a created GPADL")
    logs.expect(r"OPENCHANNEL relid 3 refused: ring split at page 1 of 4")
    with pytest.raises(OpenError):
        await rig.bus.conn.create_gpadl(3, [rig.memory.nr_frames + 5])      # outside memory
    with pytest.raises(OpenError):
        await rig.bus.conn.create_gpadl(99, [5])                            # unknown relid
    with pytest.raises(OpenError):
        await rig.bus.conn.open_channel(m.OpenChannel(3, 3, 0xDEAD, 0, 2))  # no such GPADL
    pfn = rig.memory.alloc(4)
    handle = await rig.bus.conn.create_gpadl(3, list(range(pfn, pfn + 4)))
    with pytest.raises(OpenError):                                     # split leaves no data
        await rig.bus.conn.open_channel(m.OpenChannel(3, 3, handle, 0, 1))
    assert not rig.host.channels[3].is_open


async def test_many_pfns_use_gpadl_body(rig: Rig) -> None:
    pfn = rig.memory.alloc(100)
    handle = await rig.bus.conn.create_gpadl(3, list(range(pfn, pfn + 100)))   # 26 + 28 + 28 + 18
    assert rig.host._gpadls[handle].pfns == list(range(pfn, pfn + 100))


async def test_garbage_messages_never_hurt_the_host(rig: Rig, logs: Logs) -> None:
    assert await garbage_messages(rig, logs, 1234, 3000) == 3000


async def garbage_messages(rig: Rig, logs: Logs, seed: int, count: int) -> int:
    """``count`` garbage channel messages from the guest, generated from ``seed``; the
    host must keep serving. Returns how many were posted."""
    logs.expect(r"^vmbus host: ")       # every dropped message is logged
    logs.expect(r"^vmbus: ")            # and so is what the guest drops of the answers
    rnd = random.Random(seed)
    # UNLOAD and INITIATE_CONTACT are not garbage: they really reset the connection.
    types = [t.value for t in m.MessageType
             if t not in (m.MessageType.UNLOAD, m.MessageType.INITIATE_CONTACT)]
    for _ in range(count):
        n = rnd.randrange(0, m.MAX_MESSAGE_SIZE + 1)
        buf = bytearray(rnd.randbytes(n))
        if n >= 4 and rnd.random() < 0.8:
            struct.pack_into("<I", buf, 0, rnd.choice(types))
        try:
            rig.synic.to_host_send.send_nowait(PostedMessage(4, bytes(buf)))
        except trio.WouldBlock:
            await trio.testing.wait_all_tasks_blocked()
        if rnd.random() < 0.05:
            await trio.testing.wait_all_tasks_blocked()
    await trio.testing.wait_all_tasks_blocked()
    # still serving: a fresh GPADL works and opened channels are untouched
    pfn = rig.memory.alloc(2)
    assert await rig.bus.conn.create_gpadl(3, [pfn, pfn + 1]) > 0
    assert rig.read(HB_INST, "state") == "3\n"
    return count


async def test_a_gpadl_the_host_never_answers_is_a_clear_timeout(
        nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> None:
    rig = await start_rig(nursery)

    async def ignore(buf: bytes) -> None:           # a host that has stopped answering
        pass

    rig.host._table[m.MessageType.GPADL_HEADER] = (28, ignore)
    pfn = rig.memory.alloc(2)
    with pytest.raises(OSError) as e:
        await rig.bus.conn.create_gpadl(3, [pfn, pfn + 1])
    assert e.value.errno == errno.ETIMEDOUT
    assert "GPADL_CREATED" in str(e.value)


def _slow_offers(rig_host: VmbusHost, synic: Synic, gap: float, stop_after: int | None) -> None:
    """A host that takes ``gap`` seconds per offer (thousands of channels take a while), and
    optionally stops after ``stop_after`` offers without saying ALLOFFERS_DELIVERED."""
    async def offers(buf: bytes) -> None:
        for n, chan in enumerate(rig_host.channels.values()):
            if stop_after is not None and n == stop_after:
                return
            await trio.sleep(gap)
            await synic.deliver(chan.offer().pack())
        await synic.deliver(m.AllOffersDelivered().pack())
    rig_host._table[m.MessageType.REQUESTOFFERS] = (8, offers)


def _bare_rig() -> tuple[VmbusHost, VmbusBus, Synic]:
    memory = GuestMemory(16 << 20)
    synic = Synic()
    specs = [ChannelSpec("hb", HB, HB_INST, HeartbeatIc(interval=2.0)),
             ChannelSpec("nic", NIC, NIC_INST, IdleDevice(), monitor=True),
             ChannelSpec("avma", AVMA, AVMA_INST, IdleDevice())]
    host = VmbusHost(synic, memory, specs, m.Version.WIN10_V5_3)
    bus = VmbusBus(synic, memory, Tree(), cpus=2)
    return host, bus, synic


async def test_offers_that_keep_coming_are_waited_for(
        nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> None:
    """All offers took longer than the response timeout, but each came within it: the
    host is alive (a machine of 10,000 devices took 7.5 s and had failed at 5 s)."""
    host, bus, synic = _bare_rig()
    _slow_offers(host, synic, gap=RESPONSE_TIMEOUT * 0.8, stop_after=None)
    await nursery.start(host.run)
    t0 = trio.current_time()
    await nursery.start(bus.run)
    assert trio.current_time() - t0 > 2 * RESPONSE_TIMEOUT
    assert len(bus.devices) == 3


async def test_a_host_that_stops_offering_is_a_clear_timeout(
        nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> None:
    host, bus, synic = _bare_rig()
    _slow_offers(host, synic, gap=0.1, stop_after=2)
    await nursery.start(host.run)
    with pytest.raises(OSError) as e:
        await bus.run()
    assert e.value.errno == errno.ETIMEDOUT
    assert "ALLOFFERS_DELIVERED" in str(e.value) and "2 offers" in str(e.value)


async def garbage_from_host(rig: Rig, logs: Logs, seed: int, count: int) -> int:
    """``count`` generated channel messages from a hostile host to the guest's bus: any
    length up to the SynIC's 240 bytes, mostly with a real message type in front (offers,
    rescinds, GPADL and open answers nobody asked for, version answers). The bus never dies,
    and afterwards the guest still creates a GPADL (the host is honest again). Returns the
    messages posted."""
    logs.expect(r"^vmbus: ")            # what the guest drops is logged
    rnd = random.Random(seed)
    types = [t.value for t in m.MessageType]
    for _ in range(count):
        n = rnd.randrange(0, m.MAX_MESSAGE_SIZE + 1)
        buf = bytearray(rnd.randbytes(n))
        if n >= 4 and rnd.random() < 0.8:
            struct.pack_into("<I", buf, 0, rnd.choice(types))
        if n >= 8 and rnd.random() < 0.5:             # a relid the guest has, or near one
            struct.pack_into("<I", buf, 4, rnd.choice([0, 1, 2, 3, 4, 2**32 - 1]))
        try:
            rig.synic.to_guest_send.send_nowait(bytes(buf))
        except trio.WouldBlock:
            await trio.testing.wait_all_tasks_blocked()
        if rnd.random() < 0.05:
            await trio.testing.wait_all_tasks_blocked()
    await trio.testing.wait_all_tasks_blocked()
    pfn = rig.memory.alloc(2)
    with trio.fail_after(10):
        assert await rig.bus.conn.create_gpadl(3, [pfn, pfn + 1]) > 0
    return count


async def test_garbage_from_the_host_never_hurts_the_guest(rig: Rig, logs: Logs) -> None:
    assert await garbage_from_host(rig, logs, 99, 3000) == 3000


async def test_a_request_takes_the_first_answer_and_drops_the_others(logs: Logs) -> None:
    """The guest side of a request alone (no host): the answer that names it is returned;
    a second one while it is still waiting, and one nobody asked for, are logged and
    dropped."""
    logs.expect(r"^vmbus: duplicate OPENCHANNEL_RESULT dropped$")
    logs.expect(r"^vmbus: unexpected OPENCHANNEL_RESULT \(key 0x7\) dropped$")
    synic = Synic()
    synic.message_connections.add(m.VMBUS_MESSAGE_CONNECTION_ID)
    conn = VmbusConnection(synic, GuestMemory(16 * PAGE_SIZE))
    first = m.OpenResult(5, 5, 0).pack()
    second = m.OpenResult(5, 5, 1).pack()
    got: list[bytes] = []
    async with trio.open_nursery() as nursery:
        async def ask() -> None:
            got.append(await conn.request([b"\0" * 8], m.MessageType.OPENCHANNEL_RESULT, 5))
        nursery.start_soon(ask)
        await trio.testing.wait_all_tasks_blocked()
        assert conn.on_response(m.MessageType.OPENCHANNEL_RESULT, first)
        assert conn.on_response(m.MessageType.OPENCHANNEL_RESULT, second)
    assert got == [first]
    assert conn.on_response(m.MessageType.OPENCHANNEL_RESULT, m.OpenResult(7, 7, 0).pack())
    assert not conn.on_response(m.MessageType.OFFERCHANNEL, first)
