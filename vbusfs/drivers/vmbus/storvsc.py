"""storvsc: the guest's synthetic SCSI driver on VMBus (Linux ``drivers/scsi/storvsc_drv.c``;
reference/hv-services.md §4.1–4.5, §4.8).

Probe: open the channel (128 KiB of ring each way plus the header page, as Linux since the
ring-size fix), then ``storvsc_channel_init``: BEGIN_INITIALIZATION, QUERY_PROTOCOL_VERSION
with WIN10, WIN8_1, WIN8 in turn until the host accepts one, QUERY_PROPERTIES (the maximum
transfer gives ``max_sectors`` and ``sg_tablesize``), END_INITIALIZATION — each an in-band
packet with the fixed init transaction id, answered within 5 s. Then one SCSI host per
controller (``proc_name`` ``storvsc_host``, 8 channels, 2 targets, 255 LUNs, 16-byte CDBs,
``cmd_per_lun`` 2048, ``can_queue`` from the ring size) is scanned by the midlayer
(:mod:`vbusfs.drivers.scsi.host`), and sd puts each disk on the block engine with
:class:`StorvscTransport`.

Requests are EXECUTE_SRB packets: in band without data, GPA-direct (one range, the command's
pages) with data, transaction id = tag + 1 (0 is the host's). Completions are decoded as
``storvsc_on_io_completion``/``storvsc_handle_error`` do: INQUIRY and MODE SENSE(6) always
"succeed" (Linux's quirk), the SRB status gives the host byte (INVALID_LUN: no connect, and
the LUN is removed; capacity changed: requeue and a rescan of the device; an error without
sense: DID_ERROR), the sense is kept when AUTOSENSE_VALID says it is there, and the data
transfer length is what was moved. The midlayer makes an errno of it. Unsolicited
ENUMERATE_BUS or REMOVE_DEVICE (transaction id 0) starts a host rescan.

Everything from the host is checked: a completion for a tag not in flight, or too short to
be a vstor_packet, is logged and dropped (a command it should have completed fails with
EIO instead of waiting forever); a transfer length larger than the range is clamped.

Sub-channels are not requested: this guest has one queue per controller (a host that offers
none, as this repository's storvsp, is never asked by Linux either).
"""

from __future__ import annotations

import collections
import errno
import functools
import logging
import struct
from dataclasses import dataclass, field

import trio

from vbusfs.block.contract import Command, Limits, Op
from vbusfs.drivers.scsi.device import (
    MAX_RETRIES,
    RETRY,
    CmdResult,
    CommandBuilder,
    Direction,
    HostByte,
    ScsiDevice,
    ScsiRequest,
)
from vbusfs.drivers.scsi.host import ScsiBus, ScsiHost
from vbusfs.drivers.vmbus.device import VmbusDevice
from vbusfs.drivers.vmbus.driver import VmbusDriver, ring_size
from vbusfs.platform.doorbell import Doorbell
from vbusfs.platform.memory import PAGE_SIZE, GuestMemory
from vbusfs.platform.vmbus.ring_endpoint import ChannelBroken, RingEndpoint
from vbusfs.protocols import scsi
from vbusfs.protocols.scsi import Op as ScsiOp
from vbusfs.protocols.vmbus import storvsc as sv
from vbusfs.protocols.vmbus.ring import (
    COMPLETION_REQUESTED,
    Packet,
    PacketType,
    pack_gpa_direct_one,
)
from vbusfs.protocols.vmbus.storvsc import Operation, SrbStatus

log = logging.getLogger(__name__)

__all__ = ["StorvscDriver", "Storvsc", "StorvscTransport", "RING_BYTES", "INIT_TIMEOUT",
           "can_queue_for"]

#: storvsc_ringbuffer_size default (128 KiB of data; the ring adds its header page)
RING_BYTES = 128 * 1024
#: each init operation must be answered within this (storvsc_execute_vstor_op)
INIT_TIMEOUT = 5.0
#: ALIGN(MAX_MULTIPAGE_BUFFER_PACKET + sizeof(struct vstor_packet) + sizeof(u64), 8): the
#: ring bytes Linux reserves per outstanding request (reference §4.1)
_PER_REQUEST = 360
_STORVSC_TIMEOUT = 180           # storvsc_timeout: the request queue's timeout, seconds
_BOUNCE_KEPT = 4                 # one-page bounce buffers a controller keeps between commands


def can_queue_for(ring: int, sub_channels: int = 0) -> int:
    """``max_outstanding_req_per_channel * (sub_channels + 1) * 90 / 100``."""
    return (ring - PAGE_SIZE) // _PER_REQUEST * (sub_channels + 1) * 90 // 100


class _Slot:
    """One tag in flight: an engine command (``transport``/``cmd``) or a command of the
    midlayer's own (``midlayer``: ``result`` is set when the answer comes, and ``done`` too
    if its caller had to wait). A plain class with slots: one is made per command, on the
    I/O path."""

    __slots__ = ("sdev", "req", "transport", "cmd", "midlayer", "done", "result", "retries",
                 "tag", "orphan")

    def __init__(self, sdev: ScsiDevice, req: ScsiRequest,
                 transport: StorvscTransport | None = None, cmd: Command | None = None,
                 midlayer: bool = False) -> None:
        self.sdev = sdev
        self.req = req
        self.transport = transport
        self.cmd = cmd
        self.midlayer = midlayer
        self.done: trio.Event | None = None
        self.result: CmdResult | None = None
        self.retries = 0
        self.tag = -1
        # a midlayer command nobody waits for any more (it timed out): its bounce pages
        # (pfn, count), given back with its tag when the answer comes after all
        self.orphan: tuple[int, int] | None = None


#: a whole EXECUTE_SRB request: the vstor_packet header and the WIN8 vmscsi_request
_REQUEST = struct.Struct("<III" + sv.SRB.format.lstrip("<"))
assert _REQUEST.size == sv.VSTOR_PACKET_SIZE
#: storvsc_queuecommand's data_in and srb_flags for each direction
_DIRECTION = {
    Direction.NONE: (sv.DataIn.UNKNOWN, sv.SrbFlags.DISABLE_SYNCH_TRANSFER.value),
    Direction.TO_DEVICE: (sv.DataIn.WRITE, (sv.SrbFlags.DISABLE_SYNCH_TRANSFER |
                                            sv.SrbFlags.DATA_OUT).value),
    Direction.FROM_DEVICE: (sv.DataIn.READ, (sv.SrbFlags.DISABLE_SYNCH_TRANSFER |
                                             sv.SrbFlags.DATA_IN).value),
}
#: what a tagged device adds (storvsc_queuecommand: scmnd->device->tagged_supported)
_TAGGED_FLAGS = (sv.SrbFlags.QUEUE_ACTION_ENABLE | sv.SrbFlags.NO_QUEUE_FREEZE).value
#: what a completion's decoding reads: srb_status, scsi_status, sense_info_length,
#: data_transfer_length and the sense (the vstor_packet header and the SRB fields the guest
#: sent skipped)
_REPLY = struct.Struct("<14xBB5xB2xI20s")
assert _REPLY.size == sv.HEADER.size + 36
#: the SRB statuses storvsc_handle_error treats as errors the sense (if any) explains
_SRB_ERRORS = frozenset((SrbStatus.ERROR, SrbStatus.ABORTED, SrbStatus.INVALID_REQUEST,
                         SrbStatus.INTERNAL_ERROR))


_SRB_SUCCESS = int(SrbStatus.SUCCESS)
_COMPLETE_IO = int(Operation.COMPLETE_IO)
_VSTOR_PACKET_SIZE = sv.VSTOR_PACKET_SIZE
_OPERATION = struct.Struct("<I")          # a vstor_packet's operation


@functools.lru_cache(maxsize=64)
def _ok(transferred: int) -> CmdResult:
    """A command that went well, ``transferred`` bytes moved: one result per size, shared
    (a result is frozen)."""
    return CmdResult(HostByte.DID_OK, 0, b"", transferred)


@dataclass(eq=False)
class _Init:
    event: trio.Event = field(default_factory=trio.Event)
    payload: bytes = b""


class Storvsc:
    """One controller (``struct storvsc_device`` + its ``Scsi_Host``): the midlayer's
    :class:`~vbusfs.drivers.scsi.device.HostAdapter`."""

    proc_name = "storvsc_host"
    cmd_per_lun = 2048
    max_channel = 7              # STORVSC_MAX_CHANNELS - 1
    max_id = 2                   # STORVSC_MAX_TARGETS
    max_lun = 255                # STORVSC_MAX_LUNS_PER_TARGET
    max_cmd_len = sv.STORVSC_MAX_CMD_LEN

    def __init__(self, dev: VmbusDevice, ep: RingEndpoint, memory: GuestMemory, ring: int,
                 cpus: int, versions: tuple[int, ...] = sv.LINUX_VERSIONS) -> None:
        self.dev = dev
        self.ep = ep
        self.memory = memory
        self.versions = versions
        self.can_queue = can_queue_for(ring)
        self.nr_hw_queues = cpus
        self.version: int | None = None
        self.max_transfer = 0
        self.max_sectors = 0
        self.sg_tablesize = 0
        self.port_number = 0
        self.host: ScsiHost | None = None
        self._tags = list(range(self.can_queue - 1, -1, -1))
        # woken when a tag or ring space comes back; made only when someone waits (most
        # commands never do, and an Event per command is a measurable part of one)
        self._tag_free: trio.Event | None = None
        self._inflight: dict[int, _Slot] = {}
        self._retry: collections.deque[_Slot] = collections.deque()
        self._space: trio.Event | None = None
        self._init: _Init | None = None
        self.transports: list[StorvscTransport] = []
        self.broken = False
        self.rescans = 0
        self._rescan_wanted = False
        self._rescanning = False
        # one-page bounce buffers of the midlayer's commands, kept for the next (a scan is
        # dozens of them; allocating and returning a page each time costs an madvise)
        self._bounce: list[int] = []
        # counters
        self.bogus = 0

    # -- tags and the ring -----------------------------------------------------------------
    def host_busy(self) -> int:
        return len(self._inflight)

    def _take_tag(self) -> int:
        return self._tags.pop()

    def _give_tag(self, tag: int) -> None:
        slot = self._inflight.pop(tag, None)
        if slot is not None:
            slot.tag = -1
        self._tags.append(tag)
        if self._tag_free is not None:
            self._tag_free.set()
            self._tag_free = None

    @staticmethod
    def _space_for(req: ScsiRequest) -> int:
        header = 16 + 8 * len(req.pages) if req.length else 0
        return (16 + header + sv.VSTOR_PACKET_SIZE + 7) // 8 * 8 + 8

    def _send(self, tag: int, sdev: ScsiDevice, req: ScsiRequest) -> bool:
        """Write an EXECUTE_SRB for ``req`` (``storvsc_queuecommand`` + ``storvsc_do_io``);
        False when the ring has no room."""
        slot = self._inflight.get(tag)
        if slot is not None:
            slot.tag = tag
        tagged = sdev.tagged
        data_in, flags = _DIRECTION[req.direction]
        cdb = req.cdb
        payload = _REQUEST.pack(
            Operation.EXECUTE_SRB, sv.REQUEST_COMPLETION_FLAG, 0,
            sv.SRB_SIZE, 0, 0, self.port_number, sdev.channel, sdev.id, sdev.lun, len(cdb),
            sv.SENSE_BUFFER_SIZE, data_in, 0, req.length, cdb, 0,
            sv.SP_UNTAGGED if tagged else 0, sv.SRB_SIMPLE_TAG_REQUEST if tagged else 0,
            flags | _TAGGED_FLAGS if tagged else flags, sv.STORVSC_TIMEOUT_VALUE, 0)
        if req.length:
            header = pack_gpa_direct_one(req.length, 0, req.pages)
            return self.ep.try_write(PacketType.DATA_USING_GPA_DIRECT, COMPLETION_REQUESTED,
                                     tag + 1, payload, header)
        return self.ep.try_write(PacketType.DATA_INBAND, COMPLETION_REQUESTED, tag + 1,
                                 payload)

    async def _wait_space(self) -> None:
        if self._space is None:
            self._space = trio.Event()
        await self._space.wait()

    # -- init (storvsc_channel_init) -------------------------------------------------------
    async def _init_op(self, op: Operation, body: bytes = b"") -> tuple[int, int, bytes]:
        """One init request and its answer: (operation, status, the packet)."""
        self._init = waiter = _Init()
        payload = sv.pack_packet(op, body, flags=sv.REQUEST_COMPLETION_FLAG)

        def send() -> bool:
            return self.ep.try_write(PacketType.DATA_INBAND, COMPLETION_REQUESTED,
                                     sv.VMBUS_RQST_INIT, payload)
        try:
            sent = send()
            if sent:
                self.ep.flush_signal()
            # A host that answers from its doorbell handler has answered already: then no
            # timeout and no wait (each costs a turn of the event loop, and a machine
            # initialises thousands of controllers); else both, as before.
            if not waiter.event.is_set():
                with trio.fail_after(INIT_TIMEOUT):
                    while not sent:
                        await self._wait_space()
                        sent = send()
                    self.ep.flush_signal()
                    await waiter.event.wait()
        except trio.TooSlowError:
            raise OSError(errno.ETIMEDOUT, f"storvsc: {op.name} not answered within "
                          f"{INIT_TIMEOUT:.0f} s") from None
        finally:
            self._init = None
        rop, _flags, status = sv.unpack_header(waiter.payload)
        return rop, status, waiter.payload

    async def init(self) -> None:
        """``storvsc_channel_init``; OSError (EPROTO, ETIMEDOUT) when the host will not."""
        rop, status, _ = await self._init_op(Operation.BEGIN_INITIALIZATION)
        if rop != Operation.COMPLETE_IO or status:
            raise OSError(errno.EPROTO, f"storvsc: BEGIN_INITIALIZATION failed: "
                          f"status {status:#x}")
        for version in self.versions:
            rop, status, _ = await self._init_op(Operation.QUERY_PROTOCOL_VERSION,
                                                 sv.VERSION.pack(version, 0))
            if rop != Operation.COMPLETE_IO:
                raise OSError(errno.EPROTO, "storvsc: QUERY_PROTOCOL_VERSION answered with "
                              f"operation {rop}")
            if status == 0:
                self.version = version
                break
        else:
            raise OSError(errno.EPROTO, "storvsc: Obsolete Hyper-V version (the host "
                          "accepts none of " + ", ".join(f"{v:#06x}" for v in self.versions)
                          + ")")
        rop, status, pkt = await self._init_op(Operation.QUERY_PROPERTIES)
        if rop != Operation.COMPLETE_IO or status or len(pkt) < 12 + sv.PROPERTIES.size:
            raise OSError(errno.EPROTO, f"storvsc: QUERY_PROPERTIES failed: status "
                          f"{status:#x}")
        _r, _max_channels, _r1, _flags, max_transfer, _r2 = \
            sv.PROPERTIES.unpack_from(pkt, 12)
        rop, status, _ = await self._init_op(Operation.END_INITIALIZATION)
        if rop != Operation.COMPLETE_IO or status:
            raise OSError(errno.EPROTO, f"storvsc: END_INITIALIZATION failed: "
                          f"status {status:#x}")
        # storvsc_probe: the transfer limit rounded down to pages, one more segment than
        # pages (the first and last may be partial)
        self.max_transfer = max_transfer // PAGE_SIZE * PAGE_SIZE
        if self.max_transfer < PAGE_SIZE:
            raise OSError(errno.EPROTO, f"storvsc: host's max_transfer_bytes {max_transfer} "
                          "is less than a page")
        self.max_sectors = self.max_transfer >> 9
        self.sg_tablesize = (self.max_transfer >> 12) + 1
        log.info("storvsc %s: protocol %#06x, max transfer %d", self.dev.name, self.version,
                 self.max_transfer)

    # -- the midlayer's HostAdapter --------------------------------------------------------
    def slave_configure(self, sdev: ScsiDevice) -> None:
        """``storvsc_device_configure``: the request timeout, and SPC-3 for Msft devices on
        WIN8/WIN8_1 hosts."""
        sdev.timeout = _STORVSC_TIMEOUT
        if sdev.vendor.startswith(b"Msft") and \
                self.version in (sv.ProtocolVersion.WIN8, sv.ProtocolVersion.WIN8_1):
            sdev.scsi_level = 6                  # SCSI_SPC_3

    async def queuecommand(self, sdev: ScsiDevice, cdb: bytes, direction: Direction,
                           length: int, data_out: bytes = b"") -> CmdResult:
        """A command of the midlayer's own, with bounce pages for its data."""
        if self.broken:
            return CmdResult(HostByte.DID_NO_CONNECT, 0)
        while not self._tags:
            if self._tag_free is None:
                self._tag_free = trio.Event()
            await self._tag_free.wait()
        tag = self._take_tag()
        npages = -(-length // PAGE_SIZE)
        if npages == 1 and self._bounce:
            pfn = self._bounce.pop()
        else:
            pfn = self.memory.alloc(npages) if npages else 0
        req = ScsiRequest(cdb, direction, length, list(range(pfn, pfn + npages)))
        slot = _Slot(sdev, req, midlayer=True)
        self._inflight[tag] = slot
        try:
            if data_out:
                self.memory.view(pfn, npages)[:len(data_out)] = data_out
            while not self._send(tag, sdev, req):
                await self._wait_space()
            self.ep.flush_signal()
            if slot.result is None:
                slot.done = trio.Event()
                with trio.move_on_after(sdev.timeout):
                    await slot.done.wait()
            # else: answered from the doorbell handler the signal ran, no wait at all (the
            # scan checkpoints once per target, so a host scan still lets others run)
            result = slot.result
            if result is None:
                log.warning("storvsc %s: %s: command %#x timed out", self.dev.name,
                            sdev.name, cdb[0])
                return CmdResult(HostByte.DID_TIME_OUT, 0)
            data = b""
            if direction == Direction.FROM_DEVICE and result.transferred:
                data = bytes(self.memory.view(pfn, npages)[:result.transferred])
            return CmdResult(result.host, result.status, result.sense, result.transferred,
                             data)
        finally:
            # Until the answer is in, tag and pages are the host's: a command that timed out
            # or was cancelled keeps them until it comes, so it finds nothing reused.
            if slot.result is not None:
                self._give_back(tag, pfn, npages)
            else:
                slot.orphan = (pfn, npages)

    def _give_back(self, tag: int, pfn: int, npages: int) -> None:
        self._give_tag(tag)
        if npages == 1 and len(self._bounce) < _BOUNCE_KEPT:
            self._bounce.append(pfn)
        elif npages:
            self.memory.free(pfn, npages)

    def release(self) -> None:
        """The controller is gone: the bounce pages it kept go back to guest memory."""
        for pfn in self._bounce:
            self.memory.free(pfn, 1)
        self._bounce.clear()

    def block_transport(self, sdev: ScsiDevice, sd: CommandBuilder,
                        limits: Limits) -> StorvscTransport:
        t = StorvscTransport(self, sdev, sd, limits)
        self.transports.append(t)
        return t

    # -- completions (storvsc_on_channel_callback) ------------------------------------------
    def interrupt(self) -> bool:
        """The channel's doorbell handler: every packet the host sent, then the queues
        restarted and what they posted published."""
        if self.broken:
            return True
        try:
            pkts = self.ep.poll()
        except ChannelBroken:
            self._fail_everything()
            return True
        if self._space is not None:
            self._space.set()
            self._space = None
        for pkt in pkts:
            self._on_packet(pkt)
        self._restart()
        return True

    def _restart(self) -> None:
        while self._retry and self._tags:
            slot = self._retry[0]
            t, cmd = slot.transport, slot.cmd
            if t is None or cmd is None or cmd.priv is not slot:
                self._retry.popleft()            # failed meanwhile
                continue
            tag = self._take_tag()
            self._inflight[tag] = slot
            if not self._send(tag, slot.sdev, slot.req):
                self._give_tag(tag)
                break
            self._retry.popleft()
        for t in list(self.transports):
            if t.sd.engine is not None:
                t.sd.engine.startio()
        try:
            self.ep.flush_signal()
        except ChannelBroken:
            self._fail_everything()

    def _on_packet(self, pkt: Packet) -> None:
        payload = pkt.payload
        tid = pkt.trans_id
        if tid == sv.VMBUS_RQST_INIT:
            if self._init is not None and not self._init.event.is_set() and \
                    len(payload) >= sv.HEADER.size:
                self._init.payload = bytes(payload)
                self._init.event.set()
            else:
                log.warning("storvsc %s: init answer nobody asked for; dropped",
                            self.dev.name)
            return
        if len(payload) < sv.HEADER.size:
            self.bogus += 1
            log.warning("storvsc %s: packet of %d bytes dropped", self.dev.name, len(payload))
            return
        (op,) = _OPERATION.unpack_from(payload)
        if tid == 0:
            if op in (Operation.ENUMERATE_BUS, Operation.REMOVE_DEVICE):
                self._schedule_rescan()
            elif op in (Operation.COMPLETE_IO, Operation.FCHBA_DATA):
                self.bogus += 1
                log.warning("storvsc %s: Invalid packet with ID of 0", self.dev.name)
            return
        slot = self._inflight.get(tid - 1) if tid <= self.can_queue else None
        if slot is None or slot.result is not None:
            self.bogus += 1
            log.warning("storvsc %s: Incorrect transaction ID %#x", self.dev.name, tid)
            return
        if len(payload) < _VSTOR_PACKET_SIZE or op != _COMPLETE_IO:
            self.bogus += 1
            log.warning("storvsc %s: invalid completion for tag %d (operation %d, %d bytes); "
                        "the command fails", self.dev.name, tid - 1, op, len(payload))
            self._finish(tid - 1, slot, CmdResult(HostByte.DID_ERROR, 0))
            return
        raw_status, scsi_status, _sense_len, dtl, _sense = _REPLY.unpack_from(payload)
        if raw_status == _SRB_SUCCESS and not scsi_status:    # _decode's first case
            length = slot.req.length
            self._finish(tid - 1, slot, _ok(dtl if dtl < length else length))
        else:
            self._finish(tid - 1, slot, self._decode(slot, payload))

    def _decode(self, slot: _Slot, payload: bytes) -> CmdResult:
        """``storvsc_on_io_completion`` + ``storvsc_command_completion`` +
        ``storvsc_handle_error``."""
        raw_status, scsi_status, sense_len, dtl, sense_area = _REPLY.unpack_from(payload)
        length = slot.req.length
        if raw_status == _SRB_SUCCESS and not scsi_status:
            return _ok(dtl if dtl < length else length)
        op = slot.req.cdb[0]
        srb_status = raw_status
        if op in (ScsiOp.INQUIRY, ScsiOp.MODE_SENSE):
            # Linux: "hosts mishandle INQUIRY page 0x80 and MODE SENSE page 0x1C"
            srb_status, scsi_status = SrbStatus.SUCCESS, 0
        sense = b""
        if scsi_status == scsi.Status.CHECK_CONDITION and \
                srb_status & sv.SRB_STATUS_AUTOSENSE_VALID:
            sense = sense_area[:min(sense_len, sv.SENSE_BUFFER_SIZE)]
        dtl = min(dtl, length)
        host = HostByte.DID_OK
        if srb_status != SrbStatus.SUCCESS:
            # storvsc_handle_error: a switch on SRB_STATUS(), the code without its two flag
            # bits (testing single bits would take INTERNAL_ERROR 0x30 for INVALID_LUN 0x20)
            code = sv.srb_status_code(srb_status)
            if code in _SRB_ERRORS:
                if srb_status & sv.SRB_STATUS_AUTOSENSE_VALID:
                    parsed = scsi.parse_sense(sense) if sense else None
                    if parsed is not None and (
                            (parsed.asc, parsed.ascq) == (scsi.Asc.PARAMETERS_CHANGED,
                                                          scsi.ASCQ_CAPACITY_DATA_CHANGED) or
                            (parsed.asc == scsi.Asc.OPERATING_CONDITIONS_CHANGED and
                             parsed.ascq not in (0x03, 0x0E))):
                        host = HostByte.DID_REQUEUE        # and storvsc_device_scan
                        if self.host is not None:
                            self.host.rescan_device_soon(slot.sdev)
                    # otherwise the sense speaks for itself
                elif op != ScsiOp.TEST_UNIT_READY:
                    host = HostByte.DID_ERROR
            elif code == SrbStatus.INVALID_LUN:
                host = HostByte.DID_NO_CONNECT
                if self.host is not None:
                    self.host.lun_gone(slot.sdev)
            if code != SrbStatus.DATA_OVERRUN:
                dtl = 0
        if srb_status != SrbStatus.SUCCESS or scsi_status:
            log.info("storvsc %s: %s: cmd %#x status: scsi %#x srb %#x hv %#x",
                     self.dev.name, slot.sdev.name, op, scsi_status, raw_status,
                     int.from_bytes(payload[8:12], "little"))
        return CmdResult(host, scsi_status, sense, dtl)

    def _finish(self, tag: int, slot: _Slot, result: CmdResult) -> None:
        if slot.midlayer:                        # the midlayer's own command
            slot.result = result
            if slot.done is not None:
                slot.done.set()
            if slot.orphan is not None:          # answered after its waiter gave up
                log.info("storvsc %s: %s: late answer to command %#x", self.dev.name,
                         slot.sdev.name, slot.req.cdb[0])
                self._give_back(tag, *slot.orphan)
            return
        t, cmd = slot.transport, slot.cmd
        assert t is not None and cmd is not None
        err = t.sd.finish(cmd, result)
        if err == RETRY and slot.retries < MAX_RETRIES:
            slot.retries += 1
            self._give_tag(tag)
            self._retry.append(slot)
            return
        engine = t.sd.engine
        assert engine is not None
        engine.complete(cmd.id, errno.EIO if err == RETRY else err)   # retire gives the tag

    def _schedule_rescan(self) -> None:
        """``storvsc_host_scan`` as work: one at a time, and one more if asked meanwhile."""
        self._rescan_wanted = True
        if self._rescanning or self.host is None or self.host.nursery is None:
            return
        self.host.nursery.start_soon(self._rescan_loop)

    async def _rescan_loop(self) -> None:
        self._rescanning = True
        try:
            while self._rescan_wanted and self.host is not None and not self.broken:
                self._rescan_wanted = False
                self.rescans += 1
                await self.host.rescan()
        finally:
            self._rescanning = False

    def _fail_everything(self) -> None:
        """The ring is gone: every command fails."""
        self.broken = True
        for slot in list(self._inflight.values()):
            if slot.midlayer:
                slot.result = CmdResult(HostByte.DID_NO_CONNECT, 0)
                if slot.done is not None:
                    slot.done.set()
        for t in self.transports:
            if t.sd.engine is not None:
                t.sd.engine.fail_all()
        if self._space is not None:
            self._space.set()


class StorvscTransport:
    """A disk's engine commands as EXECUTE_SRB packets. A command's ``priv`` is its slot
    while a tag carries it."""

    def __init__(self, ctrl: Storvsc, sdev: ScsiDevice, sd: CommandBuilder,
                 limits: Limits) -> None:
        self.ctrl = ctrl
        self.sdev = sdev
        self.sd = sd
        self.limits = limits
        self._dead: list[Command] = []          # posted to a device that is not running

    def can_post(self, cmd: Command) -> bool:
        c = self.ctrl
        if c.broken or not self.sdev.running:
            return True                          # it fails at once (push)
        if not c._tags or self.sdev.busy >= self.sdev.queue_depth:
            return False
        npages = len(cmd.pages) if cmd.op != Op.DISCARD else 1
        need = (16 + (16 + 8 * npages if cmd.op != Op.FLUSH else 0) +
                sv.VSTOR_PACKET_SIZE + 7) // 8 * 8 + 8
        return c.ep.can_write(need)

    def extra_pages_for(self, op: Op, npages: int) -> int:
        return self.sd.extra_pages_for(op)

    def post(self, cmd: Command) -> None:
        c = self.ctrl
        if c.broken or not self.sdev.running:
            cmd.priv = None
            self._dead.append(cmd)
            return
        req = self.sd.setup(cmd)
        tag = c._tags.pop()                      # can_post saw one free
        slot = _Slot(self.sdev, req, transport=self, cmd=cmd)
        c._inflight[tag] = slot
        cmd.priv = slot
        self.sdev.busy += 1
        if not c._send(tag, self.sdev, req):    # can_post said there was room
            raise AssertionError("storvsc: the ring filled between can_post and post")

    def push(self) -> None:
        dead, self._dead = self._dead, []
        engine = self.sd.engine
        if dead and engine is not None:
            for cmd in dead:
                engine.complete(cmd.id, errno.EIO)
        self.ctrl.ep.flush_signal()

    def retire(self, cmd: Command) -> None:
        slot = cmd.priv
        if isinstance(slot, _Slot):
            c = self.ctrl
            if slot.tag >= 0 and c._inflight.get(slot.tag) is slot:
                c._give_tag(slot.tag)
            self.sdev.busy -= 1
        cmd.priv = None


class StorvscDriver(VmbusDriver):
    """``hv_storvsc``: speaks storvsc to SCSI controllers (IDE and FC channels, whose host
    side is not emulated, are opened and drained as before)."""

    def __init__(self, scsi_bus: ScsiBus, ring_bytes: int = RING_BYTES, cpus: int = 2,
                 versions: tuple[int, ...] = sv.LINUX_VERSIONS) -> None:
        super().__init__("hv_storvsc", ring_size(ring_bytes), ring_size(ring_bytes))
        self.scsi = scsi_bus
        self.cpus = cpus
        self.versions = versions
        self._scans: dict[str, trio.Event] = {}
        self._stop: dict[str, trio.Event] = {}
        self._gone: dict[str, trio.Event] = {}

    async def settle(self) -> None:
        """Until every controller bound so far has finished its first scan
        (``scsi_complete_async_scans``)."""
        for ev in list(self._scans.values()):
            await ev.wait()

    async def probe(self, dev: VmbusDevice, *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        cls = dev.device_class
        if cls is None or cls.type != "scsi":
            await super().probe(dev, task_status=task_status)
            return
        await dev.channel.open(self.send_ring, self.recv_ring)
        ep = dev.channel.endpoint
        assert ep is not None
        bell = dev.channel.doorbell
        ctrl = Storvsc(dev, ep, dev.conn.memory, self.recv_ring, self.cpus, self.versions)
        dev.drvdata = ctrl
        scanned = self._scans[dev.name] = trio.Event()
        stop = self._stop[dev.name] = trio.Event()
        gone = self._gone[dev.name] = trio.Event()
        bell.handler = ctrl.interrupt
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._fallback, bell, ctrl)
                try:
                    await ctrl.init()
                except BaseException:
                    scanned.set()
                    with trio.CancelScope(shield=True):
                        bell.handler = None
                        await dev.channel.close()
                    raise
                assert dev.dir is not None
                host = self.scsi.add_host(dev.dir, ctrl)
                ctrl.host = host
                # vmscsi_request.port_number is a byte; Linux assigns the host number to it
                # (storvsc_probe: host_dev->port = host->host_no), so hosts 256 and up wrap
                ctrl.port_number = host.host_no & 0xFF
                host.nursery = nursery
                task_status.started()
                try:
                    await host.scan()
                except OSError as e:
                    log.error("storvsc %s: scan failed: %s", dev.name, e)
                finally:
                    scanned.set()
                await stop.wait()
                await self.scsi.remove_host(host)
                ctrl.host = None
                gone.set()
                nursery.cancel_scope.cancel()
        finally:
            bell.handler = None
            gone.set()
            for d in (self._scans, self._stop, self._gone):
                d.pop(dev.name, None)
            if not ctrl.broken:
                ctrl._fail_everything()
            ctrl.release()

    @staticmethod
    async def _fallback(bell: Doorbell, ctrl: Storvsc) -> None:
        """A doorbell the handler left pending (it failed) is handled from here."""
        while True:
            await bell.wait()
            ctrl.interrupt()

    async def remove(self, dev: VmbusDevice) -> None:
        """``storvsc_remove``: the SCSI host and its disks go (their I/O drained and the
        write cache flushed), then the channel closes."""
        stop, gone = self._stop.get(dev.name), self._gone.get(dev.name)
        if stop is not None and gone is not None:
            stop.set()
            await gone.wait()
        await super().remove(dev)
