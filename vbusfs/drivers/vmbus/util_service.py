"""The framework every ``hv_utils`` service shares (Linux ``drivers/hv/hv_util.c`` and
``channel_mgmt.c``; reference/hv-services.md §1): one packet in, the same buffer back.

A :class:`UtilService` is the channel callback of one IC service: the checks every Linux
callback makes before looking at a message (the receive buffer's size, ``icmsg_hdr``), the
answer to a version negotiation, the reply flags, and what it keeps (the negotiated
versions, a request count, the last status), published under the service's own area
``MNT/.vbusfs/hv_utils/<service>/`` by :func:`add_status_files` since Linux shows none of it
in sysfs. :class:`HvUtilsPlatform` is what the guest learns from its platform rather than the
bus. The services themselves are :mod:`~vbusfs.drivers.vmbus.hv_utils` and
:mod:`~vbusfs.drivers.vmbus.hv_kvp`.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from vbusfs.drivers.vmbus.kvp_daemon import OsIdentity, os_identity, resolve_fqdn
from vbusfs.platform.memory import PAGE_SIZE
from vbusfs.platform.vmbus.reference_time import ReferenceTime
from vbusfs.platform.vmbus.ring_endpoint import RingEndpoint
from vbusfs.protocols.vmbus import hv_ic
from vbusfs.protocols.vmbus.ring import PacketType
from vbusfs.sysfs import Attr, Directory, Group, add_group

log = logging.getLogger("vbusfs.drivers.vmbus.hv_utils")

__all__ = ["UtilService", "HvUtilsPlatform", "SERVICE_VERSIONS", "add_status_files",
           "as_service", "hex_or_none", "op_name", "U64"]

U64 = (1 << 64) - 1
S = TypeVar("S", bound="UtilService")


FW_VERSIONS = [(3, 0), (1, 0)]
#: Linux's preference lists (reference/hv-services.md §1.7)
SERVICE_VERSIONS: dict[str, tuple[list[tuple[int, int]], list[tuple[int, int]]]] = {
    "heartbeat": (FW_VERSIONS, [(3, 0), (1, 0)]),
    "shutdown": (FW_VERSIONS, [(3, 2), (3, 1), (3, 0), (1, 0)]),
    "timesync": (FW_VERSIONS, [(4, 0), (3, 0), (1, 0)]),
    "kvp": (FW_VERSIONS, [(4, 0), (3, 0), (1, 0)]),
    "vss": ([(3, 0)], [(5, 0)]),
    "fcopy": ([(3, 0)], [(1, 1)]),
}


@dataclass
class HvUtilsPlatform:
    """What the guest's hv_utils learns from its platform rather than the bus: the
    partition reference counter, its own clock, whether ACPI offers S4, who acts on a power
    request, and where its files go (the tree's root for ``/var/lib/hyperv``, and the
    service's status directory)."""

    reference_time: ReferenceTime = field(default_factory=ReferenceTime)
    realtime_ns: Callable[[], int] = time.time_ns
    hibernation: bool = False
    power: Callable[[str], None] | None = None
    root: Directory | None = None
    status: Directory | None = None
    os_identity: Callable[[], OsIdentity] = os_identity
    fqdn: Callable[[], str] = resolve_fqdn
    #: the two above read files and ask the resolver: off the event loop, in a thread
    #: (tests that give instant ones may turn this off)
    lookups_in_thread: bool = True


class UtilService:
    """One IC service's answers and what Linux keeps about it.

    :meth:`answer` is the channel callback for one packet: the reply (the payload changed in
    place) or None when Linux sends nothing. Work Linux schedules after the reply (a power
    action) is queued and run by :meth:`after_reply`."""

    label = "Util"                  # the name in Linux's log lines
    msgtype = -1
    recv_limit = PAGE_SIZE          # the callback's receive buffer (reference §1.8)
    reply_to_wrong_type = True      # heartbeat/shutdown/timesync answer HV_E_FAIL

    def __init__(self, service: str, platform: HvUtilsPlatform) -> None:
        self.service = service
        self.platform = platform
        self.fw_pref, self.srv_pref = SERVICE_VERSIONS[service]
        self.version: tuple[int, int] | None = None
        self.framework: tuple[int, int] | None = None
        self.requests = 0
        self.last_status: int | None = None
        self.stalled = False
        self._work: list[Callable[[], None]] = []

    async def run(self, ep: RingEndpoint) -> None:
        # A new channel has a fresh ring: a packet that silenced the old one is gone (Linux
        # recovers the same way, through util_remove and util_probe), and nothing the old
        # channel left to do carries over.
        self.stalled = False
        self._work = []
        while True:
            for pkt in await ep.receive():
                payload = bytes(pkt.payload)
                try:
                    await self.prepare(payload)
                    reply = self.answer(payload)
                except Exception:
                    # a bug here must not take the bus down with it: logged (an error the
                    # tests' log check catches), the packet goes unanswered
                    log.exception("%s: answering a %d-byte packet failed", self.label,
                                  len(payload))
                    continue
                try:
                    if reply is not None:
                        await ep.send(PacketType.DATA_INBAND, 0, pkt.trans_id, bytes(reply))
                finally:
                    # Linux schedules the work whatever vmbus_sendpacket returned
                    self.after_reply()

    async def start(self) -> None:
        """What the service's init does before the channel opens (the KVP daemon starts);
        run at every probe, once the service exists."""

    async def prepare(self, payload: bytes) -> None:
        """Anything slow the answer needs (the KVP daemon's host name lookup)."""

    def after_reply(self) -> None:
        work, self._work = self._work, []
        for fn in work:
            fn()

    def answer(self, payload: bytes) -> bytearray | None:
        if self.stalled:
            return None
        if len(payload) > self.recv_limit:
            # vmbus_recvpacket fails with -ENOBUFS and leaves the packet in the ring: every
            # later callback fails the same way, so the channel answers nothing more
            self.stalled = True
            log.warning("%s request received. Could not read into recv buf (%d bytes, the "
                        "buffer holds %d): the channel stays silent", self.label,
                        len(payload), self.recv_limit)
            return None
        if not payload:
            return None
        if len(payload) < hv_ic.ICMSG_HDR:
            log.warning("%s request received. Packet length too small: %d", self.label,
                        len(payload))
            return None
        hdr = hv_ic.IcHeader.unpack(payload)
        if hdr.msgtype == hv_ic.ICMSGTYPE_NEGOTIATE:
            return self._negotiate(payload)
        if hdr.msgtype == self.msgtype:
            return self.handle(bytearray(payload))
        log.warning("%s request received. Invalid msg type: %d", self.label, hdr.msgtype)
        if not self.reply_to_wrong_type:
            return None
        return self.reply(bytearray(payload), hv_ic.HV_E_FAIL)

    def _negotiate(self, payload: bytes) -> bytearray:
        buf, outcome = hv_ic.guest_negotiate(payload, self.fw_pref, self.srv_pref)
        if outcome is None:
            log.warning("%s: invalid icmsg negotiate (%d bytes)", self.label, len(payload))
            return buf
        # written whether or not a version matched, as vmbus_prep_negotiate_resp does (for
        # timesync it decides which body the next sample is read with)
        self.framework, self.version = outcome.framework, outcome.service
        if outcome.ok:
            log.info("hv_utils: %s IC version %d.%d", self.label, *outcome.service)
        return buf

    def handle(self, buf: bytearray) -> bytearray | None:
        """A message of the service's own type (``buf`` is at least ``icmsg_hdr``)."""
        raise NotImplementedError

    def reply(self, buf: bytearray, status: int | None = None) -> bytearray:
        """Set ``status`` (None: leave the host's) and the response flags."""
        if status is not None:
            struct.pack_into("<I", buf, hv_ic.HDR_STATUS, status)
        buf[hv_ic.HDR_FLAGS] = hv_ic.ICFLAG_TRANSACTION | hv_ic.ICFLAG_RESPONSE
        self.last_status = struct.unpack_from("<I", buf, hv_ic.HDR_STATUS)[0]
        return buf

    def too_short(self, buf: bytearray, need: int, what: str) -> bool:
        if len(buf) >= need:
            return False
        log.warning("Invalid %s. Packet length too small: %d", what, len(buf))
        return True

    def status_attrs(self) -> list[Attr[UtilService]]:
        """This service's own rows under ``.vbusfs/hv_utils/<service>/``."""
        return []


def as_service(s: UtilService, cls: type[S]) -> S:
    """``s`` as the service class a status row was written for."""
    assert isinstance(s, cls)
    return s


def version_text(v: tuple[int, int] | None) -> str:
    return "none\n" if v is None else f"{v[0]}.{v[1]}\n"


def hex_or_none(v: int | None) -> str:
    return "none\n" if v is None else f"{v:#x}\n"


def op_name(op: int | None, names: dict[int, str]) -> str:
    if op is None:
        return "none\n"
    return f"{names.get(op, op)}\n"


_COMMON: tuple[Attr[UtilService], ...] = (
    Attr("version", lambda s: version_text(s.version)),
    Attr("framework", lambda s: version_text(s.framework)),
    Attr("requests", lambda s: f"{s.requests}\n"),
    Attr("last_status", lambda s: "none\n" if s.last_status is None
         else f"{s.last_status:#010x}\n"),
    Attr("stalled", lambda s: f"{int(s.stalled)}\n"),
)


def add_status_files(d: Directory, service: UtilService) -> None:
    """``.vbusfs/hv_utils/<service>/``: the negotiated versions, how many requests the
    service answered, the last status it answered with, whether an unreadable packet
    silenced it, and the service's own rows."""
    add_group(d, service, Group(attrs=(*_COMMON, *service.status_attrs())))


