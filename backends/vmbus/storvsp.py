"""storvsp: the Hyper-V host's synthetic SCSI controller on a VMBus channel
(reference/hv-services.md §4.1–4.7, after OpenVMM's ``storvsp``).

* **Init**: BEGIN_INITIALIZATION → QUERY_PROTOCOL_VERSION (answered REVISION_MISMATCH until
  the guest asks for one this host speaks; by default WIN8_1 and older, as OpenVMM, which
  refuses WIN10) → QUERY_PROPERTIES (max transfer 256 KiB; the multi-channel flag from WIN8
  on, with no sub-channels to give) → END_INITIALIZATION. A packet out of that order is
  answered INVALID_DEVICE_STATE.
* **I/O**: EXECUTE_SRB, in band or GPA-direct. REPORT LUNS is answered by the controller,
  INQUIRY to a LUN that is not there with peripheral qualifier 3, anything else to it with
  SRB_STATUS_INVALID_LUN; the rest goes to the LUN's :class:`~backends.scsi.disk.ScsiDisk`.
  RESET_LUN/ADAPTER/BUS succeed with nothing to do. Adding or removing a LUN sends
  ENUMERATE_BUS (from WIN7 on).

Everything on the ring is untrusted. The packet type, the completion flag, the header, the
SRB's length, its CDB length against the packet, the GPA ranges (exactly one, its PFNs inside
guest memory and outside the channel's own ring, at least as long as the SRB's transfer
length) are checked before anything is read or written, and nothing outside the checked
ranges and the disk is touched. OpenVMM stops serving a channel whose packet it cannot
parse; this host answers such a packet instead, with STATUS_INVALID_PARAMETER and
SRB_STATUS_INVALID_REQUEST (no sense), so the guest's command fails rather than hangs, and
goes on serving. Only packets that cannot be answered (a completion from the guest, no
completion requested) are dropped, and logged. Every answer is as long as the request
(OpenVMM pads or cuts it so; Linux 6.1 depends on it during init).

The ring is drained from the doorbell handler, as blkback does: a guest's notification runs
it at once in the notifying task; image I/O goes through each LUN's image executor, one
batch at a time per LUN, and answers as it finishes. When the guest's ring has no room for
an answer, answers wait in order and nothing new is taken off the ring until they are out.
"""

from __future__ import annotations

import collections
import enum
import functools
import logging
import struct
from collections.abc import Iterable
from typing import NamedTuple

import trio

from backends.scsi.disk import (
    DataBuffer,
    DiskRequest,
    HostStatus,
    PendingCommand,
    ScsiDisk,
    ScsiDiskParams,
    ScsiResult,
    inquiry_no_lun,
)
from backends.vmbus.channel import HostChannel
from vbusfs.config.vmbus import ScsiLunConfig, VmbusDeviceConfig
from vbusfs.platform.memory import PAGE_SIZE
from vbusfs.platform.vmbus.ring_endpoint import ChannelBroken, RingEndpoint
from vbusfs.protocols import scsi
from vbusfs.protocols.scsi import Asc, Op, SenseKey, Status
from vbusfs.protocols.vmbus import storvsc as sv
from vbusfs.protocols.vmbus.ring import (
    COMPLETION_REQUESTED,
    Packet,
    PacketType,
    parse_gpa_direct,
    parse_gpa_direct_one,
)
from vbusfs.protocols.vmbus.storvsc import NtStatus, Operation, ProtocolVersion, SrbStatus

log = logging.getLogger(__name__)

__all__ = ["Storvsp", "HOST_VERSIONS", "MAX_TRANSFER", "MAX_QUEUED", "disk_params"]

#: the versions OpenVMM's storvsp accepts (it refuses WIN10 with REVISION_MISMATCH)
HOST_VERSIONS = (ProtocolVersion.WIN8_1, ProtocolVersion.WIN8, ProtocolVersion.WIN7,
                 ProtocolVersion.WIN6)
#: image requests a controller holds (waiting or running) before it leaves packets on the
#: ring; one packet may add up to 4095 (an UNMAP's descriptors) past it
MAX_QUEUED = 4096
#: packets read off the ring at a time
_POLL_BATCH = 64
#: QUERY_PROPERTIES max_transfer_bytes (OpenVMM: 256 KiB; the real Hyper-V value is [U])
MAX_TRANSFER = 0x40000

_HOST_STATUS_SRB = {
    HostStatus.SUCCESS: SrbStatus.SUCCESS,
    HostStatus.INVALID_REQUEST: SrbStatus.INVALID_REQUEST,
    HostStatus.ERROR: SrbStatus.ERROR,
    HostStatus.DATA_OVERRUN: SrbStatus.DATA_OVERRUN,
    HostStatus.INVALID_LUN: SrbStatus.INVALID_LUN,
}
#: the CDB length each opcode group needs (SPC-3 §4.3.4.1); groups 3, 6 and 7 have none
_GROUP_CDB_LEN = {0: 6, 1: 10, 2: 10, 4: 16, 5: 12}
_KNOWN_OPS = {Operation.BEGIN_INITIALIZATION, Operation.END_INITIALIZATION,
              Operation.QUERY_PROTOCOL_VERSION, Operation.QUERY_PROPERTIES,
              Operation.EXECUTE_SRB, Operation.RESET_LUN, Operation.RESET_ADAPTER,
              Operation.RESET_BUS, Operation.CREATE_SUB_CHANNELS}


class _State(enum.Enum):
    BEGIN = 0
    QUERY_VERSION = 1
    QUERY_PROPERTIES = 2
    END_INIT = 3
    READY = 4


class _Malformed(Exception):
    """A packet this host answers STATUS_INVALID_PARAMETER."""


class _SrbView(NamedTuple):
    """The request fields of an SRB this host reads."""

    path_id: int
    target_id: int
    lun: int
    cdb_length: int
    data_in: int
    data_transfer_length: int
    cdb: bytes


#: the same offsets as :data:`~vbusfs.protocols.vmbus.storvsc.SRB`, reading only those
_SRB_FIELDS = struct.Struct("<5xBBBBxBxI20s16x")
#: a whole completion: vstor_packet header, then length, srb_status, scsi_status, 5 bytes
#: of address and CDB length (only the CDB length is set), sense_info_length, data_in and
#: reserved, data_transfer_length, the sense in the CDB union, the WIN8 extension zeroed
_COMPLETION = struct.Struct("<IIIHBB4xBBxxI20s16x")
assert _COMPLETION.size == sv.VSTOR_PACKET_SIZE and _SRB_FIELDS.size == sv.SRB_SIZE
_HEADER, _HEADER_SIZE, _SRB_SIZE = sv.HEADER, sv.HEADER.size, sv.SRB_SIZE
_EXECUTE_SRB, _COMP = int(Operation.EXECUTE_SRB), int(PacketType.COMP)
#: an _SrbView from the unpacked fields without the named tuple's Python-level ``__new__``
_new_srb_view = tuple.__new__


def disk_params(lun: ScsiLunConfig, name: str) -> ScsiDiskParams:
    return ScsiDiskParams(name, lun.image, lun.size, lun.readonly, lun.sector_size, lun.serial,
                          lun.vendor, lun.model, lun.rotational, lun.discard, lun.write_cache,
                          lun.disk_id)


class Storvsp:
    """One synthetic SCSI controller: its LUNs (path 0, target 0) and its channel."""

    reads_ring_directly = True

    def __init__(self, name: str, luns: Iterable[tuple[int, ScsiDiskParams]] = (), *,
                 versions: Iterable[int] = HOST_VERSIONS, max_transfer: int = MAX_TRANSFER,
                 max_sub_channels: int = 0) -> None:
        self.name = name
        self.luns: dict[int, ScsiDisk] = {lun: ScsiDisk(p) for lun, p in luns}
        self.versions = frozenset(versions)
        self.max_transfer = max_transfer
        self.max_sub_channels = max_sub_channels
        self.state = _State.BEGIN
        self.version: int | None = None
        self.sub_channels = 0
        self._chan: HostChannel | None = None
        self._ep: RingEndpoint | None = None
        self._gen = 0                      # which opening of the channel an answer is for
        self._outbox: collections.deque[tuple[int, int, bytes]] = collections.deque()
        self._queues: dict[ScsiDisk, collections.deque[DiskRequest]] = {}
        self._dirty: set[ScsiDisk] = set()            # disks whose queue got requests
        self._in_handler = False
        self._queued = 0                   # image requests taken off the ring, not yet done
        self._backlog: collections.deque[Packet] = collections.deque()   # read, not handled
        self._throttled = False            # packets left on the ring for want of room
        self.broken = False
        # counters for tests and diagnostics
        self.packets = 0
        self.malformed = 0
        self.dropped = 0
        self.enumerates = 0

    @classmethod
    def from_config(cls, dev: VmbusDeviceConfig) -> Storvsp:
        return cls(dev.key, ((c.lun, disk_params(c, f"storvsp {c.key}")) for c in dev.luns))

    # -- images ----------------------------------------------------------------------------
    async def serve_images(self, *,
                           task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open every LUN's image (an image that cannot be opened fails the start), keep
        them open while the machine runs, close them at the end."""
        opened: list[ScsiDisk] = []
        try:
            for disk in self.luns.values():
                disk.open()
                opened.append(disk)
            task_status.started()
            await trio.sleep_forever()
        finally:
            # those opened here, and those hot-added since (a removed one is closed already)
            for disk in {*opened, *self.luns.values()}:
                disk.close()

    async def add_lun(self, lun: int, params: ScsiDiskParams) -> None:
        """Hot-add a disk and tell the guest (ENUMERATE_BUS)."""
        if lun in self.luns:
            raise ValueError(f"{self.name}: LUN {lun} is in use")
        disk = ScsiDisk(params)
        disk.open()
        self.luns[lun] = disk
        self._enumerate_bus()

    async def remove_lun(self, lun: int) -> None:
        """Hot-remove a disk: new commands to it get INVALID_LUN, what it has in flight
        finishes, then its image is closed; the guest is told (ENUMERATE_BUS)."""
        disk = self.luns.pop(lun)
        self._enumerate_bus()
        if disk.executor is not None:
            await disk.executor.wait_idle()
        disk.close()

    def _enumerate_bus(self) -> None:
        ep = self._ep
        if ep is None or self.state is not _State.READY or self.version is None or \
                self.version < ProtocolVersion.WIN7:
            return
        self.enumerates += 1
        # unsolicited: in band, no completion wanted, transaction id 0
        self._write(PacketType.DATA_INBAND, 0, sv.pack_packet(
            Operation.ENUMERATE_BUS, size=sv.HEADER.size + self._request_size()))
        if not self._in_handler:
            ep.flush_signal()

    # -- the channel -----------------------------------------------------------------------
    async def run(self, chan: HostChannel) -> None:
        assert chan.endpoint is not None and chan.memory is not None
        self._gen += 1
        self._chan, self._ep = chan, chan.endpoint
        self.state, self.version, self.sub_channels = _State.BEGIN, None, 0
        self._outbox.clear()
        self.broken = False
        bell = chan.doorbell
        bell.handler = self._interrupt
        try:
            self._interrupt()                 # anything posted before we listened
            while not self.broken:
                await bell.wait()             # only a handler that failed leaves it pending
                self._interrupt()
        finally:
            bell.handler = None
            self._chan = self._ep = None
            for q in self._queues.values():
                self._queued -= len(q)         # never run: no answer, no _done
                q.clear()
            self._backlog.clear()
            self._throttled = False

    def _request_size(self) -> int:
        """The SRB size of the negotiated version (OpenVMM ``max_request_size``)."""
        if self.version is not None and self.version < ProtocolVersion.WIN8:
            return sv.PRE_WIN8_SRB_SIZE
        return sv.SRB_SIZE

    def _interrupt(self) -> bool:
        """The doorbell handler: send what waits, take every packet off the ring, answer or
        start each, publish the answers with one signal."""
        ep = self._ep
        if ep is None or self.broken:
            return True
        self._in_handler = True
        try:
            # One drain: a packet the guest writes after it found the ring empty, and
            # signals; the doorbell runs this handler again for that (poll left the read
            # index published and interrupts unmasked).
            if not self._outbox or self._flush_outbox():
                self._take(ep)
                if self._dirty:
                    dirty, self._dirty = self._dirty, set()       # _submit_all, inline
                    for disk in dirty:
                        self._submit(disk, self._queues[disk])
            ep.flush_signal()
        except ChannelBroken:
            self.broken = True                # the endpoint has said why
        finally:
            self._in_handler = False
        return True

    def _take(self, ep: RingEndpoint) -> None:
        """Take packets off the ring while fewer than :data:`MAX_QUEUED` image requests
        wait or run; past that the rest stays where it is (a few packets already read in
        the backlog, the others on the ring, which the guest then finds full) until
        requests finish, as OpenVMM's storvsp stops reading at its I/O queue depth."""
        self._throttled = False
        more = True
        while True:
            while self._backlog:
                if self._queued >= MAX_QUEUED:
                    self._throttled = True
                    return
                self._handle(self._backlog.popleft())
            if not more:
                return
            if self._queued >= MAX_QUEUED:
                self._throttled = True
                return
            pkts = ep.poll(_POLL_BATCH)
            self._backlog.extend(pkts)
            more = len(pkts) == _POLL_BATCH

    def _write(self, ptype: int, trans_id: int, payload: bytes) -> None:
        ep = self._ep
        if ep is None:
            return
        if self._outbox or not ep.try_write(ptype, 0, trans_id, payload):
            self._outbox.append((ptype, trans_id, payload))

    def _flush_outbox(self) -> bool:
        """Send the answers that waited for room, in order; True when none is left."""
        ep = self._ep
        while self._outbox and ep is not None:
            ptype, tid, payload = self._outbox[0]
            if not ep.try_write(ptype, 0, tid, payload):
                return False
            self._outbox.popleft()
        return True

    def _reply(self, trans_id: int, size: int, status: int, body: bytes = b"") -> None:
        """A completion: COMPLETE_IO, ``status``, ``body`` — exactly as long as the request
        (``size`` bytes after the header)."""
        self._write(PacketType.COMP, trans_id, sv.pack_packet(
            Operation.COMPLETE_IO, body, status=status, size=sv.HEADER.size + size))

    # -- packets ---------------------------------------------------------------------------
    def _handle(self, pkt: Packet) -> None:
        self.packets += 1
        if pkt.type not in (PacketType.DATA_INBAND, PacketType.DATA_USING_GPA_DIRECT):
            self.dropped += 1
            log.warning("%s: packet of type %d dropped (not a request)", self.name, pkt.type)
            return
        if not pkt.flags & COMPLETION_REQUESTED:
            self.dropped += 1
            log.warning("%s: request %#x asks for no completion; dropped", self.name,
                        pkt.trans_id)
            return
        payload = pkt.payload
        size = max(0, min(len(payload) - _HEADER_SIZE, _SRB_SIZE))
        try:
            if size and self.state is _State.READY and \
                    _HEADER.unpack_from(payload)[0] == _EXECUTE_SRB:
                self._execute_srb(pkt, size)          # the I/O path, straight
                return
            op, _flags, _status = sv.unpack_header(payload)
            if op not in _KNOWN_OPS:
                self.malformed += 1
                log.debug("%s: unknown operation %d", self.name, op)
                self._reply(pkt.trans_id, size, NtStatus.INVALID_DEVICE_REQUEST)
            elif self.state is _State.READY:
                if op == Operation.EXECUTE_SRB:    # nearly every packet: one call less
                    self._execute_srb(pkt, size)
                else:
                    self._ready(pkt, op, size)
            else:
                self._init(pkt, op, size)
        except _Malformed as e:
            self.malformed += 1
            log.debug("%s: request %#x refused: %s", self.name, pkt.trans_id, e)
            self._reply(pkt.trans_id, size, NtStatus.INVALID_PARAMETER, sv.Srb(
                srb_status=SrbStatus.INVALID_REQUEST, cdb_length=sv.STORVSC_MAX_CMD_LEN,
                data_in=0).pack())
        except ValueError as e:
            self.malformed += 1
            log.debug("%s: request %#x refused: %s", self.name, pkt.trans_id, e)
            self._reply(pkt.trans_id, size, NtStatus.INVALID_PARAMETER)

    @staticmethod
    def _u16_at_12(payload: bytes) -> int:
        if len(payload) < sv.HEADER.size + 2:
            raise _Malformed("packet too short for its argument")
        return int.from_bytes(payload[12:14], "little")

    def _init(self, pkt: Packet, op: int, size: int) -> None:
        st, tid, payload = self.state, pkt.trans_id, pkt.payload
        if st is _State.BEGIN and op == Operation.BEGIN_INITIALIZATION:
            self._reply(tid, size, NtStatus.SUCCESS)
            self.state = _State.QUERY_VERSION
        elif st is _State.QUERY_VERSION and op == Operation.QUERY_PROTOCOL_VERSION:
            version = self._u16_at_12(payload)
            body = sv.VERSION.pack(version, 0)
            if version in self.versions:
                self.version = version
                self.state = _State.QUERY_PROPERTIES
                self._reply(tid, size, NtStatus.SUCCESS, body)
            else:
                self._reply(tid, size, NtStatus.REVISION_MISMATCH, body)
        elif st is _State.QUERY_PROPERTIES and op == Operation.QUERY_PROPERTIES:
            assert self.version is not None
            multi = self.version >= ProtocolVersion.WIN8
            self._reply(tid, size, NtStatus.SUCCESS, sv.PROPERTIES.pack(
                0, self.max_sub_channels if multi else 0, 0, sv.MULTI_CHANNEL if multi else 0,
                self.max_transfer, 0))
            self.state = _State.END_INIT
        elif st is _State.END_INIT and op == Operation.CREATE_SUB_CHANNELS:
            self._create_sub_channels(pkt, size)
        elif st is _State.END_INIT and op == Operation.END_INITIALIZATION:
            self._reply(tid, size, NtStatus.SUCCESS)
            self.state = _State.READY
        else:
            self._reply(tid, size, NtStatus.INVALID_DEVICE_STATE)

    def _create_sub_channels(self, pkt: Packet, size: int) -> None:
        count = self._u16_at_12(pkt.payload)
        if self.version is None or self.version < ProtocolVersion.WIN8 or \
                count > self.max_sub_channels:
            self._reply(pkt.trans_id, size, NtStatus.INVALID_PARAMETER)
            return
        self.sub_channels = count
        self._reply(pkt.trans_id, size, NtStatus.SUCCESS)

    def _ready(self, pkt: Packet, op: int, size: int) -> None:
        if op == Operation.EXECUTE_SRB:
            self._execute_srb(pkt, size)
        elif op in (Operation.RESET_LUN, Operation.RESET_ADAPTER, Operation.RESET_BUS):
            self._reply(pkt.trans_id, size, NtStatus.SUCCESS)    # always no-ops on Hyper-V
        elif op == Operation.CREATE_SUB_CHANNELS:
            self._create_sub_channels(pkt, size)
        else:
            self._reply(pkt.trans_id, size, NtStatus.INVALID_DEVICE_STATE)

    # -- EXECUTE_SRB -----------------------------------------------------------------------
    def _buffer(self, pkt: Packet, srb: _SrbView) -> DataBuffer:
        """The SRB's data buffer, every part of it checked (raises :class:`_Malformed`)."""
        dtl = srb.data_transfer_length
        host_writes = srb.data_in != sv.DataIn.WRITE
        if pkt.type != PacketType.DATA_USING_GPA_DIRECT:
            if dtl:
                raise _Malformed(f"{dtl} bytes to transfer and no GPA range")
            return DataBuffer.empty()
        one = parse_gpa_direct_one(pkt.header)      # the usual shape, parsed at once
        if one is None:
            try:
                ranges = parse_gpa_direct(pkt.header)
            except ValueError as e:
                raise _Malformed(str(e)) from None
            if len(ranges) > 1:
                raise _Malformed(f"{len(ranges)} GPA ranges (one at most)")
            if not ranges:
                if dtl:
                    raise _Malformed(f"{dtl} bytes to transfer and no GPA range")
                return DataBuffer.empty()
            one = ranges[0].length, ranges[0].offset, ranges[0].pfns
        length, offset, pfns = one
        if length < dtl:
            raise _Malformed(f"range of {length} bytes for a transfer of {dtl}")
        chan = self._chan
        assert chan is not None and chan.memory is not None
        mem = chan.memory
        ring = chan.ring_pfns
        if not pfns:                          # a range of no bytes
            return DataBuffer([], host_writes)
        first, last = pfns[0], pfns[-1]
        if pfns == tuple(range(first, first + len(pfns))):
            # one run of frames (what a guest's pool hands out): checked as a whole, and
            # one view for the executor. Every frame is compared: the ends alone say
            # nothing about an untrusted list ([D, 0, D+2] spans as much as [D, D+1, D+2]).
            if not (0 < first and last < mem.nr_frames and
                    (last < ring.start or first >= ring.stop)):
                raise _Malformed(f"PFNs {first:#x}-{last:#x} are outside guest memory or "
                                 "in the ring")
            if not dtl:
                return DataBuffer([], host_writes)
            return DataBuffer([mem.gpa_view(first * PAGE_SIZE + offset, dtl)], host_writes)
        for pfn in pfns:
            if not 0 < pfn < mem.nr_frames or pfn in ring:
                raise _Malformed(f"PFN {pfn:#x} is outside guest memory or in the ring")
        views: list[memoryview] = []
        left, at = dtl, offset
        run_start, run_len = -1, 0
        for pfn in pfns:
            if left <= 0:
                break
            n = min(PAGE_SIZE - at, left)
            gpa = pfn * PAGE_SIZE + at
            if run_len and run_start + run_len == gpa:
                run_len += n
            else:
                if run_len:
                    views.append(mem.gpa_view(run_start, run_len))
                run_start, run_len = gpa, n
            left -= n
            at = 0
        if run_len:
            views.append(mem.gpa_view(run_start, run_len))
        return DataBuffer(views, host_writes)

    def _execute_srb(self, pkt: Packet, size: int) -> None:
        if size < 16:
            raise _Malformed(f"SRB of {size} bytes: shorter than its fixed part")
        payload = pkt.payload
        if size == _SRB_SIZE:                 # the usual case: no dataclass on the way
            srb = _new_srb_view(_SrbView, _SRB_FIELDS.unpack_from(payload, _HEADER_SIZE))
        else:
            full = sv.Srb.unpack(payload[sv.HEADER.size:sv.HEADER.size + size])
            srb = _SrbView(full.path_id, full.target_id, full.lun, full.cdb_length,
                           full.data_in, full.data_transfer_length, full.cdb)
        n = srb.cdb_length
        if not 1 <= n <= sv.STORVSC_MAX_CMD_LEN:
            raise _Malformed(f"CDB length {n}")
        if size < 16 + n:
            raise _Malformed(f"CDB of {n} bytes is longer than the packet")
        cdb = srb.cdb[:n].ljust(scsi.CDB_LEN, b"\0")
        need = _GROUP_CDB_LEN.get(cdb[0] >> 5)
        if need is not None and n < need:
            raise _Malformed(f"CDB of {n} bytes for opcode {cdb[0]:#x}, which needs {need}")
        buf = self._buffer(pkt, srb)
        token: tuple[int, int, int] = (self._gen, pkt.trans_id, size)
        disk = self.luns.get(srb.lun) if srb.path_id == 0 and srb.target_id == 0 else None
        if cdb[0] == Op.REPORT_LUNS:
            result = self._report_luns(srb, buf)
        elif disk is not None:
            out = disk.execute(cdb, buf, token)
            if isinstance(out, PendingCommand):
                q = self._queues.get(disk)
                if q is None:
                    q = self._queues[disk] = collections.deque()
                q.extend(out.requests)
                self._queued += len(out.requests)
                self._dirty.add(disk)
                return
            result = out
        elif cdb[0] == Op.INQUIRY:
            result = self._inquiry_no_lun(srb, cdb, buf)
        else:
            result = ScsiResult(HostStatus.INVALID_LUN, Status.CHECK_CONDITION, None, 0)
        self._complete(pkt.trans_id, size, result)

    def _report_luns(self, srb: _SrbView, buf: DataBuffer) -> ScsiResult:
        """Answered by the controller for its path and target, whatever LUN it names."""
        if buf.length < 8:
            return ScsiResult(HostStatus.SUCCESS, Status.GOOD, None, 0)
        luns = list(self.luns) if srb.path_id == 0 and srb.target_id == 0 else []
        if not buf.host_writes:
            return _illegal_cdb()
        return ScsiResult(HostStatus.SUCCESS, Status.GOOD, None,
                          buf.write(scsi.report_luns(luns)))

    @staticmethod
    def _inquiry_no_lun(srb: _SrbView, cdb: bytes, buf: DataBuffer) -> ScsiResult:
        alloc = int.from_bytes(cdb[3:5], "big")
        if buf.length < alloc or srb.data_in != sv.DataIn.READ or alloc < 5 or \
                cdb[1] & 0x01 or cdb[2]:
            return _illegal_cdb()            # no VPD pages for a LUN that is not there
        data = inquiry_no_lun(srb.lun)
        return ScsiResult(HostStatus.SUCCESS, Status.GOOD, None,
                          buf.write(data[:min(alloc, len(data))]))

    def _complete(self, trans_id: int, size: int, r: ScsiResult) -> None:
        """COMPLETE_IO with the SRB OpenVMM answers: its length 0x34, the statuses, CDB
        length 16, sense length 0x14, the bytes moved, the sense in the CDB's place."""
        payload = _completion(r)
        if size != _SRB_SIZE:
            payload = payload[:_HEADER_SIZE + size].ljust(_HEADER_SIZE + size, b"\0")
        ep = self._ep
        if ep is None:
            return
        if self._outbox or not ep.try_write(_COMP, 0, trans_id, payload):
            self._outbox.append((_COMP, trans_id, payload))

    # -- the image executors -----------------------------------------------------------------
    def _submit(self, disk: ScsiDisk, q: collections.deque[DiskRequest]) -> None:
        ex = disk.executor
        if ex is None or ex.busy or not q:
            return
        batch = list(q)
        q.clear()
        ex.submit(batch, self._done)

    def _done(self, reqs: list[DiskRequest]) -> None:
        """The executor finished ``reqs`` (inline, or back from the I/O thread): answer the
        commands they complete; out of the handler, publish and start what waited."""
        disks = set()
        self._queued -= len(reqs)
        for req in reqs:
            pc = req.owner
            assert pc is not None
            disks.add(pc.disk)
            if pc.finished(req) and pc.result is not None:
                token: tuple[int, int, int] = pc.token   # type: ignore[assignment]
                gen, tid, size = token
                if gen == self._gen and self._ep is not None:
                    self._complete(tid, size, pc.result)
        if self._in_handler:
            return
        ep = self._ep
        if ep is None:
            return
        if self._throttled and self._queued < MAX_QUEUED:
            self._dirty |= disks
            self._interrupt()                  # take what waited on the ring
            return
        try:
            self._flush_outbox()
            for disk in disks:
                q = self._queues.get(disk)
                if q:
                    self._submit(disk, q)
            ep.flush_signal()
        except ChannelBroken:
            self.broken = True


@functools.lru_cache(maxsize=64)
def _completion(r: ScsiResult) -> bytes:
    """The whole COMPLETE_IO for a result (a result is frozen and most are one of a few,
    so their answers are kept)."""
    srb_status = _HOST_STATUS_SRB[r.host] | (sv.SRB_STATUS_AUTOSENSE_VALID if r.sense else 0)
    nt = NtStatus.SUCCESS if srb_status == SrbStatus.SUCCESS else \
        sv.srb_status_to_ntstatus(srb_status)
    return _COMPLETION.pack(Operation.COMPLETE_IO, 0, nt, sv.SRB_SIZE, srb_status, r.status,
                            sv.STORVSC_MAX_CMD_LEN, sv.SENSE_BUFFER_SIZE, r.tx, r.sense or b"")


def _illegal_cdb() -> ScsiResult:
    return ScsiResult(HostStatus.INVALID_REQUEST, Status.CHECK_CONDITION,
                      scsi.sense_fixed(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB), 0)
