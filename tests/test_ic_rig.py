"""Every integration service between the host's IC models and the guest's hv_utils over real
rings, in one trio run with the autojump clock (no mount): negotiation (versions from
reference/hv-services.md §1.7's table), shutdown, timesync samples and skew, KVP with the
pool files, VSS and fcopy without daemons, a host that offers only older versions, a guest
that breaks the protocol, a guest that answers late, unbind/bind, an old VMBus host."""

from __future__ import annotations

import errno
import struct
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing

from backends.vmbus.channel import ChannelSpec
from backends.vmbus.host import VmbusHost
from backends.vmbus.ic import (
    FcopyIc,
    HeartbeatIc,
    IcDevice,
    KvpIc,
    KvpItem,
    ShutdownIc,
    TimesyncIc,
    VssIc,
)
from tests.conftest import Logs
from vbusfs.drivers.vmbus.bus import VmbusBus
from vbusfs.drivers.vmbus.device import VmbusDevice
from vbusfs.drivers.vmbus.driver import VmbusDriver, ring_size
from vbusfs.drivers.vmbus.drivers import linux_drivers
from vbusfs.drivers.vmbus.hv_utils import HvUtils, HvUtilsPlatform, TimesyncService
from vbusfs.drivers.vmbus.kvp_daemon import OsIdentity
from vbusfs.platform.memory import GuestMemory
from vbusfs.platform.vmbus.reference_time import ReferenceTime
from vbusfs.platform.vmbus.ring_endpoint import RingEndpoint
from vbusfs.platform.vmbus.synic import Synic
from vbusfs.protocols.vmbus import hv_ic
from vbusfs.protocols.vmbus import messages as m
from vbusfs.protocols.vmbus.ring import PacketType
from vbusfs.sysfs import Attribute, DataFile, Tree

MockClock = trio.testing.MockClock
S_OK, E_FAIL, S_CONT = 0, 0x80004005, 0x80070103
CLASSES = {"heartbeat": "57164f39-9115-4e78-ab55-382f3bd5422d",   # reference §2.7
           "shutdown": "0e0b6031-5213-4934-818b-38d90ced39db",
           "timesync": "9527e630-d0ae-497b-adce-e80ab0175caf",
           "kvp": "a9a0f4e7-5a45-4d96-b827-8a841e8c03e6",
           "vss": "35fa2e29-ea23-4236-96ae-3a6ebacba440",
           "fcopy": "34d14be3-dee4-41c8-9ae7-6b174977c192"}
INSTANCES = {s: uuid.UUID(int=i + 1) for i, s in enumerate(CLASSES)}
SKEW = 3600 * 10**9
EPOCH_NS = 1_700_000_000 * 10**9
IDENT = OsIdentity("Debian GNU/Linux", "12", "", "6.1.0", "6.1.0-18-amd64", "x86_64")


@dataclass
class Rig:
    host: VmbusHost
    bus: VmbusBus
    tree: Tree
    utils: HvUtils
    powers: list[str] = field(default_factory=list)
    hb: HeartbeatIc = field(default_factory=HeartbeatIc)
    sd: ShutdownIc = field(default_factory=ShutdownIc)
    ts: TimesyncIc | None = None
    kvp: KvpIc = field(default_factory=KvpIc)
    vss: VssIc = field(default_factory=VssIc)
    fcopy: FcopyIc = field(default_factory=FcopyIc)

    def read(self, path: str) -> str:
        node = self.tree.resolve(path)
        assert isinstance(node, Attribute)
        return node.render().decode()

    def dev(self, service: str) -> VmbusDevice:
        return next(d for d in self.bus.devices.values()
                    if d.offer.if_instance == INSTANCES[service])


async def start(nursery: trio.Nursery, *, hibernation: bool = False,
                version: m.Version = m.Version.WIN10_V5_3,
                extra: list[VmbusDriver] | None = None,
                tune: dict[str, tuple[list[tuple[int, int]], list[tuple[int, int]]]] | None = None
                ) -> Rig:
    memory = GuestMemory(16 << 20)
    synic = Synic()
    tree = Tree()
    # one virtual time for the counter, the host's clock and the guest's (autojump clock)
    ref = ReferenceTime(lambda: int(trio.current_time() * 1e9))

    def wall_ns() -> int:
        return EPOCH_NS + int(trio.current_time() * 1e9)
    ts = TimesyncIc(ref, skew_ns=SKEW, interval=5.0, wall_ns=wall_ns)
    kvp = KvpIc([(0, "HostKey", "host value"), (3, "VirtualMachineName", "rig")])
    ics: dict[str, IcDevice] = {"heartbeat": HeartbeatIc(2.0), "shutdown": ShutdownIc(),
                                "timesync": ts, "kvp": kvp, "vss": VssIc(), "fcopy": FcopyIc()}
    for name, (fws, vers) in (tune or {}).items():
        ics[name].frameworks, ics[name].versions = fws, vers
    specs = [ChannelSpec(s, uuid.UUID(CLASSES[s]), INSTANCES[s], ics[s]) for s in CLASSES]
    host = VmbusHost(synic, memory, specs, version)
    bus = VmbusBus(synic, memory, tree, cpus=2, hibernation=hibernation)
    rig_powers: list[str] = []
    platform = HvUtilsPlatform(
        reference_time=ref, realtime_ns=wall_ns, hibernation=hibernation,
        power=rig_powers.append,
        root=tree.root, status=tree.root.makedirs(".vbusfs/hv_utils"),
        os_identity=lambda: IDENT, fqdn=lambda: "rig.example", lookups_in_thread=False)
    for drv in extra or []:
        bus.register(drv)
    drivers = linux_drivers(platform)
    for drv in drivers:
        bus.register(drv)
    await nursery.start(host.run)
    await nursery.start(bus.run)
    await trio.sleep(1)                     # negotiation, the first sample, the KVP pushes
    utils = drivers[0]
    assert isinstance(utils, HvUtils)
    return Rig(host, bus, tree, utils, rig_powers, ics["heartbeat"],   # type: ignore[arg-type]
               ics["shutdown"], ts, kvp, ics["vss"], ics["fcopy"])  # type: ignore[arg-type]


@pytest.fixture
async def rig(nursery: trio.Nursery) -> AsyncIterator[Rig]:
    """The default rig; its tests ask for ``autojump_clock`` themselves (pytest-trio takes
    the clock only from the test's own arguments)."""
    yield await start(nursery)


async def test_every_service_negotiates(rig: Rig, autojump_clock: MockClock) -> None:
    # Linux's preference against openvmm's offer (reference §1.7 table)
    want = {"heartbeat": (3, 0), "shutdown": (3, 2), "timesync": (4, 0), "kvp": (4, 0),
            "vss": (5, 0), "fcopy": (1, 1)}
    for ic in (rig.hb, rig.sd, rig.ts, rig.kvp, rig.vss, rig.fcopy):
        assert ic is not None and ic.state == "ready"
        assert ic.framework == (3, 0) and ic.version == want[ic.service]
        major, minor = want[ic.service]
        assert rig.read(f".vbusfs/hv_utils/{ic.service}/version") == f"{major}.{minor}\n"
        assert rig.read(f".vbusfs/hv_utils/{ic.service}/framework") == "3.0\n"


async def test_heartbeats(rig: Rig, autojump_clock: MockClock) -> None:
    acked = rig.hb.heartbeats_acked
    await trio.sleep(6)
    assert rig.hb.heartbeats_acked == acked + 3
    assert rig.read(".vbusfs/hv_utils/heartbeat/requests") == f"{acked + 3}\n"


async def test_shutdown_requests(rig: Rig, autojump_clock: MockClock) -> None:
    assert await rig.sd.request("reboot") == S_OK
    assert await rig.sd.request("hibernate") == E_FAIL      # no S4 on this platform
    assert await rig.sd.request("shutdown", force=True) == S_OK
    await trio.sleep(0)
    assert rig.powers == ["reboot", "poweroff"]
    assert rig.read(".vbusfs/hv_utils/shutdown/last_request") == "shutdown\n"
    assert rig.read(".vbusfs/hv_utils/shutdown/last_flags") == "0x1\n"
    assert rig.read("sys/bus/vmbus/hibernation") == "0\n"


async def test_hibernate_with_s4(nursery: trio.Nursery,
                                 autojump_clock: MockClock) -> None:
    rig = await start(nursery, hibernation=True)
    assert await rig.sd.request("hibernate") == S_OK
    await trio.sleep(0)
    assert rig.powers == ["hibernate"]
    assert rig.read("sys/bus/vmbus/hibernation") == "1\n"


async def test_timesync_sync_then_samples_with_the_skew(rig: Rig,
                                                       autojump_clock: MockClock) -> None:
    ts = rig.utils.services["timesync"]
    assert isinstance(ts, TimesyncService) and rig.ts is not None
    assert ts.syncs == 1 and ts.requests == 1          # the SYNC right after negotiation
    await trio.sleep(15)                               # then a SAMPLE every 5 s
    assert ts.requests == 4 and ts.syncs == 1 and rig.ts.samples_sent == 4
    assert ts.sample is not None and ts.sample.flags == hv_ic.ICTIMESYNCFLAG_SAMPLE
    # the host is an hour ahead (the clocks here are one virtual clock: exact)
    assert rig.read(".vbusfs/hv_utils/timesync/offset_ns") == f"{SKEW}\n"
    await rig.ts.set_skew(-90 * 10**9)
    assert ts.requests == 5
    assert rig.read(".vbusfs/hv_utils/timesync/offset_ns") == f"{-90 * 10**9}\n"
    assert rig.read(".vbusfs/hv_utils/timesync/flags") == "0x02\n"
    # 4.0: the guest's host time follows the reference counter from the sample on
    before = int(rig.read(".vbusfs/hv_utils/timesync/host_time_ns"))
    await trio.sleep(2)
    after = int(rig.read(".vbusfs/hv_utils/timesync/host_time_ns"))
    assert after - before == 2 * 10**9


async def test_kvp(rig: Rig, autojump_clock: MockClock) -> None:
    pool0 = rig.tree.resolve("var/lib/hyperv/.kvp_pool_0")
    pool3 = rig.tree.resolve("var/lib/hyperv/.kvp_pool_3")
    assert isinstance(pool0, DataFile) and isinstance(pool3, DataFile)
    # the host's own items, pushed once negotiated
    assert bytes(pool0.data) == b"HostKey".ljust(512, b"\0") + b"host value".ljust(2048, b"\0")
    assert bytes(pool3.data)[:4] == b"VirtualMachineName\0"[:4]
    assert rig.kvp.pushed == [(0, "HostKey", S_OK), (3, "VirtualMachineName", S_OK)]
    assert (await rig.kvp.set(0, KvpItem("Count", 42, 4))).status == S_OK
    assert bytes(pool0.data)[2560:2566] == b"Count\0"
    assert bytes(pool0.data)[2560 + 512:2560 + 515] == b"42\0"
    got = await rig.kvp.get(0, "Count")
    assert got.status == S_OK and got.item == KvpItem("Count", "", 1)   # Linux's empty GET
    assert (await rig.kvp.get(0, "nope")).status == S_CONT
    items, end = await rig.kvp.items(0)
    assert [(i.key, i.value) for i in items] == [("HostKey", "host value"), ("Count", "42")]
    assert end == S_CONT
    assert (await rig.kvp.delete(0, "HostKey")).status == S_OK
    assert len(pool0.data) == 2560
    # what the guest publishes (written by hand into pool 1) reaches the host
    pool1 = rig.tree.resolve("var/lib/hyperv/.kvp_pool_1")
    assert isinstance(pool1, DataFile)
    pool1.write(0, b"Role".ljust(512, b"\0") + b"db".ljust(2048, b"\0"))
    items, _ = await rig.kvp.items(1)
    assert [(i.key, i.value) for i in items] == [("Role", "db")]
    auto, _ = await rig.kvp.items(2)
    assert [(i.key, i.value) for i in auto][:2] == [("FullyQualifiedDomainName", "rig.example"),
                                                    ("IntegrationServicesVersion", "3.1")]
    assert dict((i.key, i.value) for i in auto)["OSName"] == "Debian GNU/Linux"


async def test_vss_and_fcopy_without_daemons(rig: Rig, autojump_clock: MockClock) -> None:
    assert await rig.vss.request(hv_ic.VSS_OP_FREEZE) == (E_FAIL, 0)
    assert await rig.vss.request(hv_ic.VSS_OP_HOT_BACKUP) == (E_FAIL, 0)
    assert await rig.vss.request(hv_ic.VSS_OP_GET_DM_INFO) == (S_OK, 0)
    assert await rig.vss.request(hv_ic.VSS_OP_BU_COMPLETE) == (S_OK, 0)
    assert await rig.fcopy.request(hv_ic.START_FILE_COPY, file_name="a.txt",
                                   path_name="C:\\tmp", file_size=3) == E_FAIL
    assert await rig.fcopy.request(hv_ic.WRITE_TO_FILE, offset=0, data=b"abc") == E_FAIL
    assert await rig.fcopy.request(hv_ic.CANCEL_FCOPY) == E_FAIL
    assert rig.read(".vbusfs/hv_utils/vss/last_operation") == "bu_complete\n"
    assert rig.read(".vbusfs/hv_utils/fcopy/last_operation") == "cancel\n"


async def test_a_host_that_offers_only_older_versions(
        nursery: trio.Nursery, autojump_clock: MockClock) -> None:
    rig = await start(nursery, tune={"heartbeat": ([(1, 0)], [(1, 0)]),
                                     "shutdown": ([(1, 0)], [(1, 0)]),
                                     "timesync": ([(1, 0), (3, 0)], [(1, 0), (3, 0)])})
    assert (rig.hb.framework, rig.hb.version) == ((1, 0), (1, 0))
    assert (rig.sd.framework, rig.sd.version) == ((1, 0), (1, 0))
    assert rig.ts is not None and (rig.ts.framework, rig.ts.version) == ((3, 0), (3, 0))
    # timesync 3.0: the older body, which the guest takes
    ts = rig.utils.services["timesync"]
    assert isinstance(ts, TimesyncService) and ts.sample is not None and ts.syncs == 1
    assert ts.sample.offset_ns == SKEW
    assert await rig.sd.request("shutdown") == S_OK
    acked = rig.hb.heartbeats_acked
    await trio.sleep(2)
    assert rig.hb.heartbeats_acked == acked + 1


async def test_no_common_version_stops_the_ic(nursery: trio.Nursery, logs: Logs,
                                              autojump_clock: MockClock) -> None:
    logs.expect(r"shutdown IC: protocol error, the IC stops: no supported versions")
    rig = await start(nursery, tune={"shutdown": ([(1, 0), (3, 0)], [(9, 9)])})
    assert rig.sd.state == "failed"
    with pytest.raises(OSError) as e:
        await rig.sd.request("shutdown")
    assert e.value.errno == errno.EPROTO


class Misbehaving(VmbusDriver):
    """A guest driver for the heartbeat channel that negotiates, then answers each request
    the way ``mode`` says."""

    def __init__(self, mode: str) -> None:
        super().__init__("misbehaving", ring_size(3 * 4096), ring_size(3 * 4096))
        self.dynids.add(uuid.UUID(CLASSES["shutdown"]))
        self.mode = mode
        self.count = 0

    async def serve(self, dev: VmbusDevice, ep: RingEndpoint) -> None:
        while True:
            for pkt in await ep.receive():
                buf = bytearray(pkt.payload)
                if struct.unpack_from("<H", buf, 12)[0] == 0:
                    reply, _ = hv_ic.guest_negotiate(buf, [(3, 0)], [(3, 0)])
                    await ep.send(PacketType.DATA_INBAND, 0, pkt.trans_id, bytes(reply))
                    continue
                self.count += 1
                buf[25] = 0x05
                if self.mode == "late" and self.count == 1:
                    await trio.sleep(12)                 # past the host's 10 s
                    struct.pack_into("<I", buf, 20, E_FAIL)
                elif self.mode == "garbage":
                    buf[0] = 7                           # not a data pipe message
                await ep.send(PacketType.DATA_INBAND, 0, pkt.trans_id, bytes(buf))


async def test_a_reply_the_host_gave_up_on_is_not_taken_for_the_next(
        nursery: trio.Nursery, autojump_clock: MockClock) -> None:
    rig = await start(nursery, extra=[Misbehaving("late")])
    with pytest.raises(OSError) as e:
        await rig.sd.request("shutdown")
    assert e.value.errno == errno.ETIMEDOUT
    # the late E_FAIL for the first request is dropped; the second gets its own S_OK
    assert await rig.sd.request("reboot") == S_OK


async def test_a_guest_that_breaks_the_protocol_stops_the_ic(
        nursery: trio.Nursery, logs: Logs, autojump_clock: MockClock) -> None:
    logs.expect(r"shutdown IC: protocol error, the IC stops: pipe packet type 7")
    rig = await start(nursery, extra=[Misbehaving("garbage")])
    with pytest.raises(OSError) as e:
        await rig.sd.request("shutdown")
    assert e.value.errno == errno.EPROTO
    with pytest.raises(OSError) as e:
        await rig.sd.request("shutdown")
    assert e.value.errno == errno.EPROTO and rig.sd.state == "failed"


async def test_unbind_closes_and_bind_negotiates_again(rig: Rig, autojump_clock: MockClock) -> None:
    dev = rig.dev("shutdown")
    await rig.bus.drivers.unbind(dev)
    await trio.sleep(0.1)
    assert rig.sd.state == "closed"
    with pytest.raises(OSError) as e:
        await rig.sd.request("shutdown")
    assert e.value.errno == errno.ENOTCONN
    await rig.bus._bind_by_name(dev.name)
    await trio.sleep(0.1)
    assert rig.sd.state == "ready" and await rig.sd.request("reboot") == S_OK
    # Linux keeps the service's state in statics: the request count carried on
    assert rig.read(".vbusfs/hv_utils/shutdown/requests") == "1\n"


async def test_vss_does_not_bind_before_win8_1(nursery: trio.Nursery, logs: Logs,
                                               autojump_clock: MockClock) -> None:
    logs.expect(r"Integration service 'Backup \(volume snapshot\)' not supported")
    rig = await start(nursery, version=m.Version.WIN8)
    assert rig.dev("vss").driver is None and rig.vss.state == "closed"
    assert rig.dev("kvp").driver == "hv_utils" and rig.kvp.state == "ready"
