"""The host's integration components (IC): what Hyper-V runs on each util channel, after
openvmm's ``vm/devices/hyperv_ic`` (reference/hv-services.md §1–2).

Every IC speaks first: as soon as the guest opens the channel the host sends the version
negotiation (frameworks 1.0 and 3.0, the service's versions, flags TRANSACTION|REQUEST,
transaction id 0) and waits for a reply with exactly one version of each. Then it keeps at
most one request outstanding (KVP, VSS and fcopy guests rely on it): :meth:`IcDevice.transact`
sends a request with the negotiated versions in its header and waits for the reply.

Everything the guest sends is untrusted. A reply must be a data pipe message whose length
fits, carry TRANSACTION|RESPONSE and transaction id 0, and hold the body its header
announces; while negotiating, replies of other types are dropped (stale ones from before a
reset). Anything else is a protocol error, and as in openvmm the IC then stops: it fails the
request in flight and answers nothing more until the guest opens the channel again. A reply
nobody waits for (the guest answering twice) is dropped and logged; one for a request whose
caller gave up waiting is dropped silently, so replies stay matched to requests in order.

The services: :class:`HeartbeatIc` (a heartbeat every 2 s, ``seq_num + 1`` expected),
:class:`ShutdownIc` (power off, reboot, hibernate on request), :class:`TimesyncIc` (a SYNC
sample after negotiation, then a SAMPLE every 5 s, the host clock optionally skewed),
:class:`KvpIc` (SET/GET/DELETE/ENUMERATE, the configured host items pushed after
negotiation), :class:`VssIc` and :class:`FcopyIc` (requests on demand).
"""

from __future__ import annotations

import errno
import functools
import logging
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import trio

from backends.vmbus.channel import HostChannel
from vbusfs.platform.vmbus.reference_time import ReferenceTime
from vbusfs.protocols.vmbus import hv_ic, hv_kvp
from vbusfs.protocols.vmbus.ring import Packet, PacketType

log = logging.getLogger(__name__)

__all__ = ["IcDevice", "IcReply", "HeartbeatIc", "ShutdownIc", "TimesyncIc", "KvpIc", "VssIc",
           "FcopyIc", "KvpItem", "IC_SERVICES", "IC_TIMEOUT", "SHUTDOWN_KINDS"]

#: the frameworks openvmm offers, in its order (O-ic common.rs)
FRAMEWORKS = [(1, 0), (3, 0)]
#: the service versions the host offers, in openvmm's order; heartbeat (which openvmm does
#: not implement) offers Linux's set (reference §1.7)
IC_SERVICES: dict[str, tuple[int, list[tuple[int, int]]]] = {
    "heartbeat": (hv_ic.ICMSGTYPE_HEARTBEAT, [(1, 0), (3, 0)]),
    "shutdown": (hv_ic.ICMSGTYPE_SHUTDOWN, [(1, 0), (3, 0), (3, 1), (3, 2)]),
    "timesync": (hv_ic.ICMSGTYPE_TIMESYNC, [(4, 0)]),
    "kvp": (hv_ic.ICMSGTYPE_KVPEXCHANGE, [(3, 0), (4, 0), (5, 0)]),
    "vss": (hv_ic.ICMSGTYPE_VSS, [(5, 0)]),
    "fcopy": (hv_ic.ICMSGTYPE_FCOPY, [(1, 1)]),
}
#: how long a request waits for the guest's reply (Linux's own KVP timeout is 30 s; a guest
#: that takes longer has lost the request)
IC_TIMEOUT = 10.0
SHUTDOWN_KINDS = {"shutdown": 0, "reboot": hv_ic.SHUTDOWN_FLAG_RESTART,
                  "hibernate": hv_ic.SHUTDOWN_FLAG_HIBERNATE}


@dataclass(frozen=True)
class IcReply:
    status: int
    payload: bytes       # the whole reply, pipe header included


class _Pending:
    def __init__(self) -> None:
        self.done = trio.Event()
        self.reply: IcReply | None = None
        self.error: OSError | None = None


class IcDevice:
    """One IC service on its channel. ``state`` is ``closed`` (channel not open),
    ``negotiating``, ``ready`` or ``failed`` (a protocol error, or no common version)."""

    def __init__(self, service: str, versions: list[tuple[int, int]] | None = None,
                 frameworks: list[tuple[int, int]] | None = None) -> None:
        """``versions``/``frameworks``: what the host offers, when not openvmm's lists (a
        host of an older Windows release offers fewer)."""
        self.service = service
        self.msgtype, default = IC_SERVICES[service]
        self.versions = versions or default
        self.frameworks = frameworks or FRAMEWORKS
        self.state = "closed"
        self.framework: tuple[int, int] | None = None
        self.version: tuple[int, int] | None = None
        self.failure: str | None = None
        self.requests = 0
        self._chan: HostChannel | None = None
        self._lock = trio.Lock()
        self._pending: _Pending | None = None
        self._orphans = 0
        self._negotiated = trio.Event()
        self._session = 0                 # which opening of the channel run() serves

    # -- the channel -----------------------------------------------------------------------
    async def run(self, chan: HostChannel) -> None:
        self._session += 1
        session = self._session
        self._chan = chan
        self.state = "negotiating"
        self.framework = self.version = self.failure = None
        self._finish(OSError(errno.ENOTCONN, f"{self.service}: the channel was reopened"))
        self._orphans = 0
        self._negotiated = trio.Event()
        try:
            await chan.send(PacketType.DATA_INBAND, 0, 0,
                            hv_ic.negotiate_request(self.frameworks, self.versions))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._receive, chan)
                await self._negotiated.wait()
                if self.state == "ready":
                    try:
                        await self.serve()
                    except OSError as e:      # the IC stopped; _fail said why
                        log.debug("%s IC: %s", self.service, e)
                await trio.sleep_forever()
        finally:
            # A guest that closes and reopens at once may have started the next session
            # already (the host runs one model per channel): this one only ends its own.
            if self._session == session:
                self._chan = None
                self.state = "closed"
                self._finish(OSError(errno.ENOTCONN, f"{self.service}: the channel closed"))

    async def _receive(self, chan: HostChannel) -> None:
        while True:
            for pkt in await chan.receive():
                self.handle_packet(pkt)

    async def serve(self) -> None:
        """What the service does once negotiated (periodic requests); default nothing."""

    # -- replies -----------------------------------------------------------------------------
    def handle_packet(self, pkt: Packet) -> None:
        """One packet from the guest: checked, then the negotiation's answer or the reply
        to the request in flight."""
        if self.state in ("failed", "closed"):
            return                       # a stopped IC reads nothing more
        try:
            hdr = self._check(pkt.payload)
        except ValueError as e:
            self._fail(str(e))
            return
        if self.state == "negotiating":
            if hdr.msgtype != hv_ic.ICMSGTYPE_NEGOTIATE:
                log.warning("%s IC: dropping a type %d reply while negotiating versions",
                            self.service, hdr.msgtype)
                return
            self._on_negotiated(pkt.payload)
            return
        if self._orphans:
            self._orphans -= 1           # the late reply of a request nobody waits for
            return
        pending = self._pending
        if pending is None:
            log.warning("%s IC: dropping a reply to no request", self.service)
            return
        self._pending = None
        pending.reply = IcReply(hdr.status, bytes(pkt.payload))
        pending.done.set()

    def _check(self, payload: bytes) -> hv_ic.IcHeader:
        """openvmm's ``MessagePipe`` and ``read_message`` checks."""
        if len(payload) < hv_ic.ICMSG_HDR:
            raise ValueError(f"reply of {len(payload)} bytes has no icmsg_hdr")
        ptype, size = hv_ic.PIPE.unpack_from(payload)
        if ptype != hv_ic.PIPE_PACKET_TYPE_DATA:
            raise ValueError(f"pipe packet type {ptype}, not data")
        if size > len(payload) - hv_ic.PIPE.size or size < hv_ic.HDR.size:
            raise ValueError(f"pipe message of {size} bytes in a {len(payload)}-byte packet")
        hdr = hv_ic.IcHeader.unpack(payload)
        if hdr.transaction_id != 0 or not hdr.flags & hv_ic.ICFLAG_TRANSACTION or \
                not hdr.flags & hv_ic.ICFLAG_RESPONSE:
            raise ValueError(f"not a transaction response (flags {hdr.flags:#x}, "
                             f"transaction id {hdr.transaction_id})")
        if hdr.msgsize > size - hv_ic.HDR.size:
            raise ValueError(f"icmsgsize {hdr.msgsize} past the message's "
                             f"{size - hv_ic.HDR.size} bytes")
        return hdr

    def _on_negotiated(self, payload: bytes) -> None:
        try:
            fws, srvs = hv_ic.parse_versions(payload)
        except ValueError as e:
            self._fail(f"negotiate reply: {e}")
            return
        if len(fws) != 1 or len(srvs) != 1:
            self._fail("no supported versions")
            return
        if fws[0] not in self.frameworks or srvs[0] not in self.versions:
            self._fail(f"the guest chose versions never offered: framework {fws[0]}, "
                       f"service {srvs[0]}")
            return
        self.framework, self.version = fws[0], srvs[0]
        self.state = "ready"
        log.info("%s IC: negotiated framework %d.%d, service %d.%d", self.service,
                 *fws[0], *srvs[0])
        self._negotiated.set()

    def _fail(self, reason: str) -> None:
        log.warning("%s IC: protocol error, the IC stops: %s", self.service, reason)
        self.state = "failed"
        self.failure = reason
        self._finish(OSError(errno.EPROTO, f"{self.service} IC stopped: {reason}"))
        self._negotiated.set()

    def _finish(self, error: OSError) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.error = error
            pending.done.set()

    # -- requests ----------------------------------------------------------------------------
    def unavailable(self) -> OSError | None:
        """Why a request cannot be sent now, or None."""
        if self.state == "ready":
            return None
        if self.state == "failed":
            return OSError(errno.EPROTO, f"the {self.service} IC stopped: {self.failure}")
        return OSError(errno.ENOTCONN, f"the {self.service} IC is {self.state}")

    async def transact(self, build: Callable[[tuple[int, int], tuple[int, int]], bytes],
                       timeout: float = IC_TIMEOUT) -> IcReply:
        """Send the request ``build(framework, version)`` makes and return the reply.
        OSError: ENOTCONN (not negotiated, or the channel closed), EPROTO (the IC stopped on
        a protocol error), ETIMEDOUT (no reply within ``timeout``)."""
        async with self._lock:
            problem = self.unavailable()
            if problem is not None:
                raise problem
            assert self._chan is not None and self.framework and self.version
            pending = _Pending()
            sent = False
            try:
                with trio.move_on_after(timeout):
                    request = build(self.framework, self.version)
                    self._pending = pending
                    await self._chan.send(PacketType.DATA_INBAND, 0, 0, request)
                    sent = True
                    self.requests += 1
                    await pending.done.wait()
            finally:
                if self._pending is pending:
                    self._pending = None
                    if sent and not pending.done.is_set():
                        # given up on (timeout or cancellation): its reply, if it comes, is
                        # dropped so the next request gets its own
                        self._orphans += 1
            if pending.error is not None:
                raise pending.error
            if pending.reply is None:
                raise OSError(errno.ETIMEDOUT, f"the guest did not answer the {self.service} "
                              f"request within {timeout:g} s")
            return pending.reply


class HeartbeatIc(IcDevice):
    """A heartbeat request every ``interval`` seconds; the guest answers ``seq_num + 1``."""

    def __init__(self, interval: float = 2.0) -> None:
        super().__init__("heartbeat")
        self.interval = interval
        self.heartbeats_acked = 0
        self.heartbeats_missed = 0
        self._seq = 0

    async def serve(self) -> None:
        while True:
            await trio.sleep(self.interval)
            self._seq += 1
            seq = self._seq
            try:
                reply = await self.transact(functools.partial(hv_ic.heartbeat_request, seq),
                                            timeout=5 * self.interval)
            except OSError as e:
                if e.errno != errno.ETIMEDOUT:
                    return
                self.heartbeats_missed += 1
                log.info("heartbeat IC: heartbeat %d unanswered", seq)
                continue
            if len(reply.payload) < hv_ic.HEARTBEAT_SEQ + 8:
                self._fail(f"heartbeat reply of {len(reply.payload)} bytes")
                return
            (got,) = struct.unpack_from("<Q", reply.payload, hv_ic.HEARTBEAT_SEQ)
            if got == (seq + 1) & (2**64 - 1):
                self.heartbeats_acked += 1
            else:
                log.warning("heartbeat IC: heartbeat reply %d, expected %d", got, seq + 1)


class ShutdownIc(IcDevice):
    """Power requests on demand (``ShutdownRpc`` in openvmm): reason
    SHTDN_REASON_FLAG_PLANNED, timeout 0, an empty message, the flags of ``kind``."""

    def __init__(self) -> None:
        super().__init__("shutdown")
        self.last: tuple[str, bool, int] | None = None      # kind, force, status

    async def request(self, kind: str, force: bool = False) -> int:
        """Send it; the guest's status (HV_S_OK when it accepts)."""
        flags = SHUTDOWN_KINDS[kind] | (hv_ic.SHUTDOWN_FLAG_FORCE if force else 0)
        reply = await self.transact(lambda fw, v: hv_ic.shutdown_request(flags, fw, v))
        self.last = (kind, force, reply.status)
        return reply.status


class TimesyncIc(IcDevice):
    """Time samples: one with SYNC as soon as the versions are negotiated, then one with
    SAMPLE every ``interval`` seconds, each waiting for its reply (openvmm's timesync.rs).
    The host's clock is the machine's ``CLOCK_REALTIME`` plus ``skew_ns``; each sample
    carries it in 100-ns ticks since 1601 and the partition reference counter read with
    it."""

    def __init__(self, reference_time: ReferenceTime, skew_ns: int = 0,
                 interval: float = 5.0, wall_ns: Callable[[], int] = time.time_ns) -> None:
        super().__init__("timesync")
        self.reference_time = reference_time
        self.skew_ns = skew_ns
        self.interval = interval
        self.wall_ns = wall_ns
        self.samples_sent = 0
        self.last_parent_time: int | None = None

    def host_time(self) -> int:
        """The host's clock now, in 100-ns ticks since 1601."""
        return (self.wall_ns() + self.skew_ns) // 100 + hv_ic.WLTIMEDELTA

    async def send_sample(self, sync: bool = False) -> int:
        """One sample, answered; returns the guest's status."""
        flags = hv_ic.ICTIMESYNCFLAG_SYNC if sync else hv_ic.ICTIMESYNCFLAG_SAMPLE

        def build(fw: tuple[int, int], v: tuple[int, int]) -> bytes:
            # read the clock and the counter together, as late as possible
            parent = self.host_time()
            self.last_parent_time = parent
            return hv_ic.timesync_request(parent, self.reference_time.now(), flags, fw, v)
        reply = await self.transact(build)
        self.samples_sent += 1
        return reply.status

    async def set_skew(self, skew_ns: int) -> None:
        """Move the host's clock; the guest gets a sample of the new time at once."""
        self.skew_ns = skew_ns
        if self.state == "ready":
            await self.send_sample()

    async def serve(self) -> None:
        sync = True
        while True:
            try:
                await self.send_sample(sync=sync)
                sync = False
            except OSError as e:
                if e.errno != errno.ETIMEDOUT:
                    raise
                log.info("timesync IC: sample unanswered")
            await trio.sleep(self.interval)


@dataclass(frozen=True)
class KvpItem:
    key: str
    value: str | int
    value_type: int = hv_kvp.REG_SZ


@dataclass(frozen=True)
class KvpResult:
    status: int
    item: KvpItem | None = None      # GET and ENUMERATE: what the guest answered


class KvpIc(IcDevice):
    """KVP requests on demand (openvmm's kvp.rs, plus GET), and the host's own items (pool
    0 and the guest parameters of pool 3) pushed with SET once negotiated."""

    def __init__(self, initial: Sequence[tuple[int, str, str]] = ()) -> None:
        super().__init__("kvp")
        self.initial = list(initial)
        self.pushed: list[tuple[int, str, int]] = []      # pool, key, status

    async def serve(self) -> None:
        self.pushed = []                  # this session's pushes
        for pool, key, value in self.initial:
            try:
                status = (await self.set(pool, KvpItem(key, value))).status
            except OSError as e:
                log.warning("kvp IC: pushing %s to pool %d: %s", key, pool, e.strerror)
                return
            self.pushed.append((pool, key, status))
            if status != hv_ic.HV_S_OK:
                log.warning("kvp IC: the guest refused %s in pool %d (%s)", key, pool,
                            hv_ic.status_name(status))

    async def set(self, pool: int, item: KvpItem) -> KvpResult:
        reply = await self.transact(lambda fw, v: hv_kvp.kvp_request(
            hv_kvp.KvpOp.SET, pool, fw, v, key=item.key, value=item.value,
            value_type=item.value_type))
        return KvpResult(reply.status)

    async def delete(self, pool: int, key: str) -> KvpResult:
        reply = await self.transact(lambda fw, v: hv_kvp.kvp_request(
            hv_kvp.KvpOp.DELETE, pool, fw, v, key=key))
        return KvpResult(reply.status)

    async def get(self, pool: int, key: str) -> KvpResult:
        reply = await self.transact(lambda fw, v: hv_kvp.kvp_request(
            hv_kvp.KvpOp.GET, pool, fw, v, key=key))
        if reply.status != hv_ic.HV_S_OK:
            return KvpResult(reply.status)
        return KvpResult(reply.status, self._parse(reply.payload, hv_kvp.GETSET_DATA, key))

    async def enumerate(self, pool: int, index: int) -> KvpResult:
        """One index; HV_S_CONT past the end (openvmm: NO_MORE_ITEMS)."""
        reply = await self.transact(lambda fw, v: hv_kvp.kvp_request(
            hv_kvp.KvpOp.ENUMERATE, pool, fw, v, index=index))
        if reply.status != hv_ic.HV_S_OK:
            return KvpResult(reply.status)
        return KvpResult(reply.status, self._parse(reply.payload, hv_kvp.ENUM_DATA, None))

    async def items(self, pool: int, limit: int = 4096) -> tuple[list[KvpItem], int]:
        """The host's walk over a pool: index 0, 1, ... until the guest answers anything but
        S_OK; the items and that last status (S_CONT at a normal end)."""
        out: list[KvpItem] = []
        for index in range(limit):
            result = await self.enumerate(pool, index)
            if result.item is None:
                return out, result.status
            out.append(result.item)
        return out, hv_ic.HV_S_OK

    def _parse(self, payload: bytes, data: int, key: str | None) -> KvpItem:
        """openvmm's ``parse_enumerate_response``: a malformed answer stops the IC."""
        off = hv_ic.ICMSG_HDR + data
        if len(payload) < off + hv_kvp.EXCHG_VALUE.size:
            self._fail(f"KVP answer of {len(payload)} bytes cannot hold its value")
            raise OSError(errno.EPROTO, self.failure or "")
        vtype, key_size, value_size, kf, vf = hv_kvp.EXCHG_VALUE.unpack_from(payload, off)
        try:
            if key is None:
                key = hv_kvp.parse_utf16z(kf, key_size)
            value: str | int
            if vtype == 4:                                   # DWORD
                if value_size != 4:
                    raise ValueError("invalid dword value size")
                value = int.from_bytes(vf[:4], "little")
            elif vtype == hv_kvp.REG_QWORD:
                if value_size != 8:
                    raise ValueError("invalid qword value size")
                value = int.from_bytes(vf[:8], "little")
            elif vtype in (hv_kvp.REG_SZ, hv_kvp.REG_EXPAND_SZ):
                value = hv_kvp.parse_utf16z(vf, value_size)
            else:
                raise ValueError(f"invalid value type {vtype:#x}")
        except ValueError as e:
            self._fail(f"KVP answer: {e}")
            raise OSError(errno.EPROTO, self.failure or "") from None
        return KvpItem(key, value, vtype)


class VssIc(IcDevice):
    """VSS requests on demand; the reply's status and ``vss_cf``/``dm_info`` flags."""

    def __init__(self) -> None:
        super().__init__("vss")

    async def request(self, op: int) -> tuple[int, int]:
        reply = await self.transact(lambda fw, v: hv_ic.vss_request(op, fw, v))
        flags = 0
        if len(reply.payload) >= hv_ic.ICMSG_HDR + hv_ic.VSS_MSG.size:
            (flags,) = struct.unpack_from("<I", reply.payload, hv_ic.ICMSG_HDR + 8)
        return reply.status, flags


class FcopyIc(IcDevice):
    """fcopy requests on demand (START_FILE_COPY, WRITE_TO_FILE, COMPLETE_FCOPY,
    CANCEL_FCOPY); the reply's status."""

    def __init__(self) -> None:
        super().__init__("fcopy")

    async def request(self, op: int, **fields: object) -> int:
        def build(fw: tuple[int, int], v: tuple[int, int]) -> bytes:
            return hv_ic.fcopy_request(op, fw, v, **fields)  # type: ignore[arg-type]
        return (await self.transact(build)).status


@dataclass
class IcHostSettings:
    """The host's side of the IC config: timings, the clock's skew, the KVP items it
    pushes, and the partition reference counter it shares with the guest."""

    heartbeat_interval: float = 2.0
    timesync_interval: float = 5.0
    timesync_skew_ns: int = 0
    kvp_items: list[tuple[int, str, str]] = field(default_factory=list)
    reference_time: ReferenceTime = field(default_factory=ReferenceTime)


def make_ic(service: str, settings: IcHostSettings) -> IcDevice:
    if service == "heartbeat":
        return HeartbeatIc(settings.heartbeat_interval)
    if service == "shutdown":
        return ShutdownIc()
    if service == "timesync":
        return TimesyncIc(settings.reference_time, settings.timesync_skew_ns,
                          settings.timesync_interval)
    if service == "kvp":
        return KvpIc(settings.kvp_items)
    if service == "vss":
        return VssIc()
    if service == "fcopy":
        return FcopyIc()
    raise KeyError(service)
