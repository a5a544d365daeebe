"""The guest's xenbus (Linux ``xenbus_probe_frontend.c`` / ``xenbus_probe_backend.c``).

Frontend devices are found under the domain's ``device/<type>/<id>`` — at start and later
through a watch — and named ``<type>-<id>`` directly under ``/sys/devices``; a device whose
xenstore ``state`` reads Initialising is probed by the first registered driver that matches
it (:class:`~vbusfs.drivers.core.DriverTable`; xenbus drivers match by devtype), and removed
(driver first: Closing → Closed with the backend) when its directory disappears. The
backend bus lists ``backend/<type>/<domid>/<id>`` of the backend domain as
``<type>-<domid>-<id>`` under ``/sys/devices/xen-backend`` (reference/sysfs.md §2.1).
Attributes are computed from live state: a frontend's ``state`` is its own xenbus state, a
backend's the value its watch last read.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from vbusfs.drivers.core import Driver, DriverTable
from vbusfs.drivers.xen.xenstore_client import XenstoreClient
from vbusfs.platform.xen.event_channel import EventChannels
from vbusfs.protocols.xen.xenbus import State, strstate
from vbusfs.sysfs import Attr, Attribute, Directory, Group, Tree, add_group
from vbusfs.sysfs.driver_core import Bus

log = logging.getLogger(__name__)

__all__ = ["XenBus", "XenbusDevice", "XENBUS_GROUP"]

CLOSE_DEADLINE = 5.0      # xenbus waits this long for the other end when closing


@dataclass
class XenbusDevice:
    bus: XenBus
    devtype: str
    devid: str
    nodename: str                    # relative to the domain home, e.g. device/vbd/51712
    state: int = State.UNKNOWN       # our own (local) state
    otherend: str = ""
    otherend_id: int = 0
    port: int = 0                    # event channel, once a driver binds one
    spurious_threshold: int = 1
    dir: Directory | None = None
    driver: str | None = None        # the bound driver's name
    drvdata: object = None           # dev_set_drvdata

    @property
    def name(self) -> str:
        return f"{self.devtype}-{self.devid}"

    async def switch_state(self, state: State) -> None:
        """``xenbus_switch_state``: write our state unless the node has gone."""
        if state == self.state:
            return
        client = self.bus.client
        try:
            async with client.transaction() as tx:
                await tx.read(f"{self.nodename}/state")
                await tx.write(f"{self.nodename}/state", str(int(state)))
        except FileNotFoundError:
            return
        self.state = state

    def events(self) -> int:
        if not self.port:
            return 0
        try:
            return self.bus.evtchn.get(self.bus.domid, self.port).bell.count
        except OSError:
            return 0


def _store_threshold(dev: XenbusDevice, text: str) -> None:
    try:
        v = int(text.strip())
    except ValueError:
        raise OSError(errno.EINVAL, "not a number") from None
    if v < 0:
        raise OSError(errno.EINVAL, "must not be negative")
    dev.spurious_threshold = v


XENBUS_GROUP: Group[XenbusDevice] = Group([
    Attr("nodename", lambda d: d.nodename + "\n", static=True),
    Attr("devtype", lambda d: d.devtype + "\n", static=True),
    Attr("modalias", lambda d: f"xen:{d.devtype}\n", static=True),
    Attr("state", lambda d: strstate(d.state) + "\n"),
])

#: created only after a driver probed the device (Linux 5.12+)
XENBUS_STATS_GROUP: Group[XenbusDevice] = Group([
    Attr("event_channels", lambda d: f"{1 if d.port else 0}\n"),
    Attr("events", lambda d: f"{d.events()}\n"),
    Attr("spurious_events", lambda d: "0\n", static=True),
    Attr("jiffies_eoi_delayed", lambda d: "0\n", static=True),
    Attr("spurious_threshold", lambda d: f"{d.spurious_threshold}\n", _store_threshold),
], subdir="xenbus")


@dataclass
class _BackendDev:
    name: str
    nodename: str
    devtype: str
    state: int = State.UNKNOWN
    dir: Directory | None = None


class XenBus:
    def __init__(self, tree: Tree, client: XenstoreClient, evtchn: EventChannels, domid: int,
                 backend_domid: int = 0) -> None:
        self.tree = tree
        self.client = client
        self.evtchn = evtchn
        self.domid = domid
        self.backend_domid = backend_domid
        self.bus = Bus(tree, "xen")
        self.backend_bus = Bus(tree, "xen-backend")
        self.drivers = DriverTable[XenbusDevice](self.bus, self._add_stats, self._drop_stats)
        self.devices: dict[str, XenbusDevice] = {}
        self.backends: dict[str, _BackendDev] = {}
        self._nursery: trio.Nursery | None = None
        self.probe_failures: list[str] = []     # names of devices whose probe failed

    def register(self, drv: Driver[XenbusDevice]) -> None:
        """``xenbus_register_frontend``."""
        self.drivers.register(drv)

    @staticmethod
    def _add_stats(dev: XenbusDevice) -> None:
        assert dev.dir is not None
        add_group(dev.dir, dev, XENBUS_STATS_GROUP)

    @staticmethod
    def _drop_stats(dev: XenbusDevice) -> None:
        if dev.dir is not None and "xenbus" in dev.dir.children:
            dev.dir.remove("xenbus")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            fe_watch = await self.client.watch("device", "xenbus-frontend")
            be_top = f"/local/domain/{self.backend_domid}/backend"
            be_watch = await self.client.watch(be_top, "xenbus-backend")
            await fe_watch.receive()                  # the registration event
            await be_watch.receive()
            await self._scan_frontends()
            await self._scan_backends()
            task_status.started()
            nursery.start_soon(self._follow, fe_watch, self._scan_frontends)
            nursery.start_soon(self._follow, be_watch, self._scan_backends)

    async def _follow(self, watch: trio.MemoryReceiveChannel[str],
                      rescan: Callable[[], Awaitable[None]]) -> None:
        async for _ in watch:
            while True:                               # coalesce a burst of events
                try:
                    watch.receive_nowait()
                except trio.WouldBlock:
                    break
            await rescan()

    async def _list(self, path: str) -> list[str]:
        try:
            return await self.client.directory(path)
        except FileNotFoundError:
            return []

    # -- frontends --------------------------------------------------------------------------
    async def _scan_frontends(self) -> None:
        present: set[str] = set()
        for devtype in await self._list("device"):
            for devid in await self._list(f"device/{devtype}"):
                name = f"{devtype}-{devid}"
                present.add(name)
                if name not in self.devices:
                    await self._add(devtype, devid)
        for name in list(self.devices):
            if name not in present:
                await self._remove(name)

    async def _add(self, devtype: str, devid: str) -> None:
        dev = XenbusDevice(self, devtype, devid, f"device/{devtype}/{devid}")
        try:
            dev.state = await self.client.read_int(f"{dev.nodename}/state", State.UNKNOWN)
        except OSError:
            dev.state = State.UNKNOWN
        self.devices[dev.name] = dev
        dev.dir = self.tree.root.makedirs("sys/devices").mkdir(dev.name)
        add_group(dev.dir, dev, XENBUS_GROUP)
        self.bus.add_device(dev.dir, lambda: f"MODALIAS=xen:{devtype}\n")
        driver = self.drivers.match(dev)
        if driver is None or dev.state != State.INITIALISING:
            return      # Linux probes only a device whose state reads Initialising
        assert self._nursery is not None
        try:
            await self.drivers.bind(self._nursery, dev, driver)
        except Exception as e:
            self.probe_failures.append(f"{dev.name} ({e})")
            log.warning("xenbus: probe of %s failed: %s", dev.name, e)

    async def _remove(self, name: str) -> None:
        dev = self.devices.pop(name)
        await self.drivers.unbind(dev, CLOSE_DEADLINE)     # Closing → Closed with the backend
        if name in self.bus.devices_by_name:
            self.bus.remove_device(name)

    async def close_all(self, deadline: float) -> None:
        """Shutdown: unbind every device (its driver closes it), in parallel, each within
        ``deadline``."""
        async with trio.open_nursery() as n:
            for dev in self.devices.values():
                n.start_soon(self.drivers.unbind, dev, deadline)

    # -- the backend bus --------------------------------------------------------------------
    async def _scan_backends(self) -> None:
        top = f"/local/domain/{self.backend_domid}/backend"
        present: set[str] = set()
        for devtype in await self._list(top):
            for fe in await self._list(f"{top}/{devtype}"):
                for devid in await self._list(f"{top}/{devtype}/{fe}"):
                    name = f"{devtype}-{fe}-{devid}"
                    present.add(name)
                    path = f"{top}/{devtype}/{fe}/{devid}"
                    b = self.backends.get(name)
                    if b is None:
                        b = _BackendDev(name, f"backend/{devtype}/{fe}/{devid}", devtype)
                        self._add_backend(b)
                    try:
                        b.state = await self.client.read_int(f"{path}/state", State.UNKNOWN)
                    except OSError:
                        b.state = State.UNKNOWN
        for name in list(self.backends):
            if name not in present:
                del self.backends[name]
                self.backend_bus.remove_device(name)

    def _add_backend(self, b: _BackendDev) -> None:
        self.backends[b.name] = b
        b.dir = self.tree.root.makedirs("sys/devices/xen-backend").mkdir(b.name)
        b.dir.add(Attribute("nodename", lambda: b.nodename + "\n", static=True))
        b.dir.add(Attribute("devtype", lambda: b.devtype + "\n", static=True))
        b.dir.add(Attribute("modalias", lambda: f"xen-backend:{b.devtype}\n", static=True))
        b.dir.add(Attribute("state", lambda: strstate(b.state) + "\n"))
        base = f"/local/domain/{self.backend_domid}/backend"
        self.backend_bus.add_device(b.dir, lambda: (
            f"MODALIAS=xen-backend:{b.devtype}\nXENBUS_TYPE={b.devtype}\n"
            f"XENBUS_PATH={base[1:]}/{b.nodename.split('/', 1)[1]}\n"
            f"XENBUS_BASE_PATH={base[1:]}\n"))


