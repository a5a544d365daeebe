"""Guest-side ``hv_utils``: the driver of the util channels, answering the host's
integration-component requests as Linux does (``drivers/hv/hv_util.c``, ``hv_kvp.c``,
``hv_snapshot.c``, ``hv_fcopy.c``; reference/hv-services.md §1–3).

The host speaks first and the guest only answers, with the received buffer changed in place
(same length, flags TRANSACTION|RESPONSE, trans_id echoed); the framework every service
shares is :mod:`~vbusfs.drivers.vmbus.util_service`. Per service, as Linux:

* heartbeat: ``seq_num + 1``;
* shutdown: flags 0/1 power off, 2/3 reboot, 4/5 hibernate when the platform supports it
  (otherwise HV_E_FAIL), anything else HV_E_FAIL; the action is taken after the reply is
  sent, by whoever runs the guest (:attr:`HvUtilsPlatform.power`);
* timesync: the last sample is kept with the reference-counter correction of 4.0; SYNC asks
  to set the clock (the emulated guest's clock is the machine's, which is left alone: the
  offset shows what would have been corrected);
* heartbeat, shutdown and timesync answer a message of another type with HV_E_FAIL;
* KVP, with ``hv_kvp_daemon`` running: :mod:`~vbusfs.drivers.vmbus.hv_kvp`;
* VSS and fcopy without their daemons: VSS answers FREEZE/THAW/HOT_BACKUP with HV_E_FAIL,
  GET_DM_INFO with flags 0, the rest with S_OK, and does not bind before VMBus 3.0
  (WIN8_1); fcopy answers every request with HV_E_FAIL (the hv_utils of kernels before 6.10,
  which still carried fcopy). These two and KVP drop messages of another type unanswered.

What Linux keeps in statics (negotiated versions, the last time sample) lives in one service
object per service for the life of the driver, so it survives unbind/bind.
"""

from __future__ import annotations

import errno
import logging
import struct
from dataclasses import dataclass

import trio

from vbusfs.drivers.vmbus.device import VmbusDevice
from vbusfs.drivers.vmbus.driver import VmbusDriver, ring_size
from vbusfs.drivers.vmbus.hv_kvp import KvpService
from vbusfs.drivers.vmbus.util_service import (
    U64,
    HvUtilsPlatform,
    UtilService,
    add_status_files,
    as_service,
    hex_or_none,
    op_name,
)
from vbusfs.platform.memory import PAGE_SIZE
from vbusfs.platform.vmbus.ring_endpoint import RingEndpoint
from vbusfs.protocols.vmbus import hv_ic
from vbusfs.protocols.vmbus import messages as m
from vbusfs.sysfs import Attr

log = logging.getLogger(__name__)

__all__ = ["HvUtils", "HvUtilsPlatform", "UtilService", "make_service", "POWER_ACTIONS",
           "HeartbeatService", "ShutdownService", "TimesyncService", "TimeSample",
           "VssService", "FcopyService", "TIMESYNC_STALE_NS"]

#: the services hv_utils binds (its id_table)
SERVICE_TYPES = ("heartbeat", "shutdown", "timesync", "kvp", "vss", "fcopy")
#: what the shutdown service asks of whoever runs the guest (orderly_poweroff,
#: orderly_reboot, the hibernate uevent)
POWER_ACTIONS = ("poweroff", "reboot", "hibernate")
#: a sample older than this makes the PTP clock's gettime fail with ESTALE
#: (hv_util.c HOST_TIMESYNC_DELAY_THRESH, 600 s)
TIMESYNC_STALE_NS = 600 * 10**9


class HeartbeatService(UtilService):
    label = "Heartbeat"
    msgtype = hv_ic.ICMSGTYPE_HEARTBEAT

    def handle(self, buf: bytearray) -> bytearray | None:
        # the reserved words are not checked: the host may not fill them
        if self.too_short(buf, hv_ic.ICMSG_HDR + 8, "heartbeat msg data"):
            return None
        (seq,) = struct.unpack_from("<Q", buf, hv_ic.HEARTBEAT_SEQ)
        struct.pack_into("<Q", buf, hv_ic.HEARTBEAT_SEQ, (seq + 1) & U64)
        self.requests += 1
        return self.reply(buf)


class ShutdownService(UtilService):
    label = "Shutdown"
    msgtype = hv_ic.ICMSGTYPE_SHUTDOWN

    def __init__(self, service: str, platform: HvUtilsPlatform) -> None:
        super().__init__(service, platform)
        self.last_request = "none"
        self.last_flags: int | None = None

    def handle(self, buf: bytearray) -> bytearray | None:
        if self.too_short(buf, hv_ic.ICMSG_HDR + hv_ic.SHUTDOWN_BODY.size,
                          "shutdown msg data"):
            return None
        (flags,) = struct.unpack_from("<I", buf, hv_ic.ICMSG_HDR + 8)
        self.requests += 1
        self.last_flags = flags
        # bit 0 (force) changes nothing: Linux always forces
        action: str | None = None
        if flags in (0, 1):
            status, action = hv_ic.HV_S_OK, "poweroff"
            log.info("hv_utils: Shutdown request received - graceful shutdown initiated")
        elif flags in (2, 3):
            status, action = hv_ic.HV_S_OK, "reboot"
            log.info("hv_utils: Restart request received - graceful restart initiated")
        elif flags in (4, 5):
            log.info("hv_utils: Hibernation request received")
            if self.platform.hibernation:
                status, action = hv_ic.HV_S_OK, "hibernate"
            else:
                status = hv_ic.HV_E_FAIL
        else:
            status = hv_ic.HV_E_FAIL
            log.info("hv_utils: Shutdown request received - Invalid request")
        self.last_request = {"poweroff": "shutdown", "reboot": "reboot",
                             "hibernate": "hibernate"}.get(action or "", "refused")
        if action is not None and self.platform.power is not None:
            power, what = self.platform.power, action
            self._work.append(lambda: power(what))
        return self.reply(buf, status)

    def status_attrs(self) -> list[Attr[UtilService]]:
        return [
            Attr("last_request", lambda s: f"{as_service(s, ShutdownService).last_request}\n"),
            Attr("last_flags", lambda s: hex_or_none(as_service(s, ShutdownService).last_flags)),
        ]


@dataclass(frozen=True)
class TimeSample:
    """One sample as ``adj_guesttime`` keeps it, plus what the guest's clock read then."""

    parent_time: int         # as the host sent it: 100-ns ticks since 1601
    reference_time: int      # vmreferencetime (4.0), or the counter when handled (older)
    flags: int
    host_time: int           # parent_time + (counter now - reference_time), u64 as in C
    ref_time: int            # the counter when the guest handled it
    guest_ns: int            # the guest's CLOCK_REALTIME then (ns since 1970)

    @property
    def offset_ns(self) -> int:
        """How far the host's clock is ahead of the guest's (negative: behind)."""
        return (self.host_time - hv_ic.WLTIMEDELTA) * 100 - self.guest_ns


class TimesyncService(UtilService):
    label = "TimeSync"
    msgtype = hv_ic.ICMSGTYPE_TIMESYNC

    def __init__(self, service: str, platform: HvUtilsPlatform) -> None:
        super().__init__(service, platform)
        self.sample: TimeSample | None = None
        self.syncs = 0

    def handle(self, buf: bytearray) -> bytearray | None:
        ref = self.platform.reference_time
        if self.version is not None and self.version > (3, 0):
            if self.too_short(buf, hv_ic.ICMSG_HDR + hv_ic.TIMESYNC_V4_LINUX_SIZE,
                              "ictimesync ref data"):
                return None
            parent, vmref, flags = struct.unpack_from("<QQB", buf, hv_ic.ICMSG_HDR)
        else:
            if self.too_short(buf, hv_ic.ICMSG_HDR + hv_ic.TIMESYNC_V1_LINUX_SIZE,
                              "ictimesync data"):
                return None
            parent, _, _, flags = struct.unpack_from("<QQQB", buf, hv_ic.ICMSG_HDR)
            vmref = ref.now()
        now = ref.now()
        self.sample = TimeSample(parent, vmref, flags, (parent + now - vmref) & U64, now,
                                 self.platform.realtime_ns())
        self.requests += 1
        if flags & hv_ic.ICTIMESYNCFLAG_SYNC:
            # do_settimeofday64: the emulated guest's clock is the machine's own, which the
            # service does not set; the request is counted and the offset shows what it
            # would have corrected
            self.syncs += 1
        return self.reply(buf)

    def host_time_ns(self) -> int:
        """What the "hyperv" PTP clock's ``gettime`` returns: ENODATA before a sample,
        ESTALE when the last one is over 600 s old."""
        s = self.sample
        if s is None:
            raise OSError(errno.ENODATA, "no time sample from the host yet")
        elapsed = self.platform.reference_time.now() - s.ref_time
        if elapsed * 100 > TIMESYNC_STALE_NS:
            raise OSError(errno.ESTALE, f"time sample {elapsed * 100} ns old")
        return (s.host_time + elapsed - hv_ic.WLTIMEDELTA) * 100

    def status_attrs(self) -> list[Attr[UtilService]]:
        def sample(s: UtilService) -> TimeSample:
            smp = as_service(s, TimesyncService).sample
            if smp is None:
                raise OSError(errno.ENODATA, "no time sample from the host yet")
            return smp
        return [
            Attr("samples", lambda s: f"{s.requests}\n"),
            Attr("syncs", lambda s: f"{as_service(s, TimesyncService).syncs}\n"),
            Attr("parent_time", lambda s: f"{sample(s).parent_time}\n"),
            Attr("reference_time", lambda s: f"{sample(s).reference_time}\n"),
            Attr("flags", lambda s: f"{sample(s).flags:#04x}\n"),
            Attr("offset_ns", lambda s: f"{sample(s).offset_ns}\n"),
            Attr("host_time_ns", lambda s: f"{as_service(s, TimesyncService).host_time_ns()}\n"),
        ]


class VssService(UtilService):
    """``hv_snapshot.c`` with no ``hv_vss_daemon`` registered."""

    label = "VSS"
    msgtype = hv_ic.ICMSGTYPE_VSS
    recv_limit = 2 * PAGE_SIZE          # VSS_MAX_PKT_SIZE
    reply_to_wrong_type = False

    def __init__(self, service: str, platform: HvUtilsPlatform) -> None:
        super().__init__(service, platform)
        self.last_operation: int | None = None

    def handle(self, buf: bytearray) -> bytearray | None:
        if self.too_short(buf, hv_ic.ICMSG_HDR + hv_ic.VSS_MSG.size, "VSS msg"):
            return None
        op = buf[hv_ic.ICMSG_HDR]
        self.requests += 1
        self.last_operation = op
        if op in (hv_ic.VSS_OP_FREEZE, hv_ic.VSS_OP_THAW, hv_ic.VSS_OP_HOT_BACKUP):
            return self.reply(buf, hv_ic.HV_E_FAIL)      # "Not ready for request"
        if op == hv_ic.VSS_OP_GET_DM_INFO:
            struct.pack_into("<I", buf, hv_ic.ICMSG_HDR + 8, 0)
        return self.reply(buf, hv_ic.HV_S_OK)

    def status_attrs(self) -> list[Attr[UtilService]]:
        names = {v: k for k, v in hv_ic.VSS_OPS.items()}
        return [Attr("last_operation", lambda s: op_name(
            as_service(s, VssService).last_operation, names))]


class FcopyService(UtilService):
    """``hv_fcopy.c`` (the kernels before 6.10 that kept fcopy in hv_utils) with no
    ``hv_fcopy_daemon`` registered."""

    label = "FCopy"
    msgtype = hv_ic.ICMSGTYPE_FCOPY
    recv_limit = 2 * PAGE_SIZE
    reply_to_wrong_type = False

    def __init__(self, service: str, platform: HvUtilsPlatform) -> None:
        super().__init__(service, platform)
        self.last_operation: int | None = None

    def handle(self, buf: bytearray) -> bytearray | None:
        if self.too_short(buf, hv_ic.ICMSG_HDR + hv_ic.FCOPY_HDR.size, "Fcopy hdr"):
            return None
        (op,) = struct.unpack_from("<I", buf, hv_ic.ICMSG_HDR)
        self.requests += 1
        self.last_operation = op
        return self.reply(buf, hv_ic.HV_E_FAIL)          # "Userspace is not registered yet"

    def status_attrs(self) -> list[Attr[UtilService]]:
        names = {v: k for k, v in hv_ic.FCOPY_OPS.items()}
        return [Attr("last_operation", lambda s: op_name(
            as_service(s, FcopyService).last_operation, names))]


def make_service(service: str, platform: HvUtilsPlatform) -> UtilService:
    cls: type[UtilService] = {
        "heartbeat": HeartbeatService, "shutdown": ShutdownService,
        "timesync": TimesyncService, "vss": VssService, "fcopy": FcopyService,
        "kvp": KvpService}[service]
    return cls(service, platform)


class HvUtils(VmbusDriver):
    """``hv_utils``: 3-page rings each way (``HV_UTIL_RING_SEND_SIZE``/``_RECV_SIZE``), and
    the IC protocol of the device's service on the open channel."""

    def __init__(self, platform: HvUtilsPlatform | None = None) -> None:
        super().__init__("hv_utils", ring_size(3 * PAGE_SIZE), ring_size(3 * PAGE_SIZE))
        self.platform = platform or HvUtilsPlatform()
        self.services: dict[str, UtilService] = {}

    def service(self, name: str) -> UtilService:
        """The service's state, created (with its status files) the first time."""
        svc = self.services.get(name)
        if svc is None:
            svc = make_service(name, self.platform)
            self.services[name] = svc
            if self.platform.status is not None:
                add_status_files(self.platform.status.dir(name), svc)
        return svc

    async def probe(self, dev: VmbusDevice, *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """``util_probe``: the service's init (VSS refuses hosts older than WIN8_1, the KVP
        daemon starts), then ``vmbus_open``."""
        cls = dev.device_class
        name = cls.type if cls is not None and cls.type in SERVICE_TYPES else None
        if name == "vss" and (dev.conn.version is None or
                              dev.conn.version < m.Version.WIN8_1):
            log.warning("hv_utils: Integration service 'Backup (volume snapshot)' not "
                        "supported on this host version.")
            raise OSError(errno.ENODEV, "VSS needs VMBus 3.0 (WIN8_1) or later")
        if name is not None:
            await self.service(name).start()
        await super().probe(dev, task_status=task_status)

    async def serve(self, dev: VmbusDevice, ep: RingEndpoint) -> None:
        cls = dev.device_class
        if cls is None or cls.type not in SERVICE_TYPES:     # a dynamic id: drain
            await super().serve(dev, ep)
            return
        svc = self.service(cls.type)
        dev.drvdata = svc
        await svc.run(ep)
