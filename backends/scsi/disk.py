"""A SCSI direct-access disk on the host: CDBs in, Hyper-V's answers out, image I/O through
the shared image executor (design.md §1; reference/hv-services.md §4.7–4.8).

The answers follow Hyper-V as OpenVMM's ``scsidisk`` emulates it: standard INQUIRY of 104
bytes (``Msft``/``Virtual Disk``/``1.0``, SPC-3, CmdQue), VPD pages 0x00, 0x80 (when the
disk has a serial), 0x83 (a T10 vendor-id and an NAA designator built from the disk GUID),
0xB0/0xB1/0xB2 (only when the disk can unmap), 0xCE and 0xCF; READ CAPACITY(10/16); MODE
SENSE(6/10) of the caching page; READ/WRITE(6/10/12/16), SYNCHRONIZE CACHE(10/16), UNMAP,
WRITE SAME(10/16), VERIFY and the commands that succeed with nothing to do. Anything else is
CHECK CONDITION with ILLEGAL REQUEST / INVALID COMMAND OPERATION CODE.

The transport hands each command's data buffer as a :class:`DataBuffer` it has already
checked against guest memory; the disk still checks every length against the CDB (a buffer
shorter than the CDB says is ILLEGAL REQUEST / LBA OUT OF RANGE, as Hyper-V answers) and
every LBA against the disk, so nothing it does reaches a byte outside the buffer or the
image. Commands that need the image become executor :class:`~backends.storage.executor.Request`\\ s
(:class:`PendingCommand`); the transport submits them and hands them back as they finish.
"""

from __future__ import annotations

import enum
import errno
import functools
import logging
import struct
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from backends.storage.executor import ImageExecutor, Request, StorageOp
from backends.storage.raw import RawImage
from vbusfs.protocols import scsi
from vbusfs.protocols.scsi import Asc, Op, SenseKey, Status

log = logging.getLogger(__name__)

__all__ = ["ScsiDiskParams", "ScsiDisk", "DataBuffer", "ScsiResult", "HostStatus",
           "PendingCommand", "DiskRequest", "inquiry_no_lun", "MAX_UNMAP_DESCRIPTORS",
           "MAX_WRITE_SAME_BYTES"]

#: UNMAP_RANGE_DESCRIPTOR_COUNT_MAX and VHDMP_MAX_WRITE_SAME_LENGTH_BYTES (OpenVMM scsidisk)
MAX_UNMAP_DESCRIPTORS = 4096
MAX_WRITE_SAME_BYTES = 8 << 20
#: the longest a single pwritev may be (IOV_MAX): WRITE SAME repeats its block in chunks
_IOV_MAX = 1024
#: VPD 0xB1 medium rotation rate: 1 means non-rotating (SBC-3); a spinning disk says its RPM
ROTATION_NONE = 1
ROTATION_SPINNING = 7200


class HostStatus(enum.IntEnum):
    """How the command went, as the host adapter reports it beside the SCSI status (the
    SRB status of storvsc, the response code of virtio-scsi)."""

    SUCCESS = 1
    INVALID_REQUEST = 2          # the request itself is wrong (CDB field, buffer size)
    ERROR = 3                    # the device failed it
    DATA_OVERRUN = 4             # the buffer is too small for the answer
    INVALID_LUN = 5              # no such logical unit


class ScsiResult(NamedTuple):
    """A command's outcome. A named tuple: one is made per command, built in C."""

    host: HostStatus
    status: int                  # SAM status
    sense: bytes | None          # fixed-format sense, present with CHECK CONDITION
    tx: int                      # data bytes moved


GOOD = ScsiResult(HostStatus.SUCCESS, Status.GOOD, None, 0)


@functools.lru_cache(maxsize=64)
def _ok(tx: int) -> ScsiResult:
    """GOOD with ``tx`` bytes moved; results are frozen, so one per size is shared (a
    request's answer is one of a few sizes)."""
    return ScsiResult(HostStatus.SUCCESS, Status.GOOD, None, tx)


def _illegal(asc: int, host: HostStatus = HostStatus.INVALID_REQUEST) -> ScsiResult:
    return ScsiResult(host, Status.CHECK_CONDITION,
                      scsi.sense_fixed(SenseKey.ILLEGAL_REQUEST, asc), 0)


#: READ/WRITE opcodes as ints, for the per-command tests of _rw
_RW10_OPS = frozenset({int(Op.READ_10), int(Op.WRITE_10)})
_RW16_OPS = frozenset({int(Op.READ_16), int(Op.WRITE_16)})
_WRITE_OPS = frozenset({int(Op.WRITE_6), int(Op.WRITE_10), int(Op.WRITE_12), int(Op.WRITE_16)})
_RELADR_OPS = frozenset({int(Op.READ_10), int(Op.WRITE_10), int(Op.READ_12),
                         int(Op.WRITE_12)})     # whose byte 1 bit 0 is RELADR
_WRITE_6 = int(Op.WRITE_6)
_READ, _WRITE = StorageOp.READ, StorageOp.WRITE
_RW10 = struct.Struct(">BBIBHB")
_RW16 = struct.Struct(">BBQIBB")
_OVERRUN = ScsiResult(HostStatus.DATA_OVERRUN, Status.CHECK_CONDITION,
                      scsi.sense_fixed(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB), 0)
_WRITE_PROTECTED = ScsiResult(HostStatus.ERROR, Status.CHECK_CONDITION,
                              scsi.sense_fixed(SenseKey.DATA_PROTECT, Asc.WRITE_PROTECTED), 0)
_MEDIUM_ERROR = ScsiResult(HostStatus.ERROR, Status.CHECK_CONDITION,
                           scsi.sense_fixed(SenseKey.MEDIUM_ERROR, Asc.NO_ADDITIONAL), 0)


class DataBuffer:
    """A command's data buffer: ``length`` bytes of guest memory as views, in order.
    ``host_writes`` says whether the initiator lets the device write it (data in); a device
    that needs to write a buffer it may not fails the command, as Hyper-V does."""

    __slots__ = ("views", "length", "host_writes")

    def __init__(self, views: Sequence[memoryview], host_writes: bool) -> None:
        self.views = tuple(views)
        self.length = sum(map(len, self.views))
        self.host_writes = host_writes

    @classmethod
    def empty(cls) -> DataBuffer:
        return cls((), False)

    def iov(self, n: int) -> tuple[memoryview, ...]:
        """The views covering the first ``n`` bytes (``n`` <= length)."""
        views = self.views
        if len(views) == 1:                      # the usual buffer: one run of frames
            return (views[0][:n],) if n > 0 else ()
        out: list[memoryview] = []
        for v in views:
            if n <= 0:
                break
            out.append(v[:n])
            n -= len(out[-1])
        return tuple(out)

    def write(self, data: bytes) -> int:
        """Copy as much of ``data`` as fits to the start of the buffer; the count."""
        at = 0
        for v in self.views:
            if at >= len(data):
                break
            n = min(len(v), len(data) - at)
            v[:n] = data[at:at + n]
            at += n
        return at

    def read(self, n: int) -> bytes:
        return b"".join(bytes(v) for v in self.iov(n))


@dataclass(slots=True)
class DiskRequest(Request):
    """An executor request that belongs to one SCSI command."""

    owner: PendingCommand | None = None


class PendingCommand:
    """A command waiting for the image: its executor requests, the token its transport
    answers it by, and the result once every request is back (:meth:`finished`)."""

    __slots__ = ("disk", "token", "requests", "tx", "writes", "_left", "_error", "result")

    def __init__(self, disk: ScsiDisk, token: object, requests: list[DiskRequest], tx: int,
                 writes: bool) -> None:
        self.disk = disk
        self.token = token
        self.requests = requests
        self.tx = tx
        self.writes = writes
        self._left = len(requests)
        self._error = 0
        self.result: ScsiResult | None = None
        for r in requests:
            r.owner = self

    def finished(self, req: DiskRequest) -> bool:
        """Take one request back; True once all are, with :attr:`result` set."""
        self._left -= 1
        if req.status and not self._error:
            self._error = req.status
        if self._left:
            return False
        if self._error == errno.EROFS:
            self.result = _WRITE_PROTECTED
        elif self._error:
            self.result = _MEDIUM_ERROR        # Hyper-V's answer to a failing image
        else:
            self.result = _ok(self.tx)
        self.disk.last_sense = self.result.sense
        return True


@dataclass(frozen=True)
class ScsiDiskParams:
    """What a disk is: its image and the identity and features it reports."""

    name: str                    # for log lines
    image: Path
    size: int                    # of a new image
    readonly: bool
    sector_size: int
    serial: str
    vendor: str
    model: str
    rotational: bool
    unmap: bool
    write_cache: bool
    disk_id: uuid.UUID
    revision: str = "1.0"
    fua: bool = True             # FUA honoured (MODE SENSE DPOFUA)
    max_transfer: int = 8 << 20  # maximum_transfer_length (caps WRITE SAME)


@functools.lru_cache(maxsize=256)
def inquiry_no_lun(lun: int) -> bytes:
    """What Hyper-V answers an INQUIRY to a LUN it does not have: success, peripheral
    qualifier 3 / type 0x1F, the Msft strings only on LUN 0 (reference §4.8)."""
    if lun == 0:
        return scsi.inquiry_std(b"Msft", b"Virtual Disk", b"1.0 ", scsi.TYPE_NO_LUN, False)
    data = bytearray(scsi.inquiry_std(b"", b"", b"", scsi.TYPE_NO_LUN, False))
    data[8:36] = bytes(28)            # the strings are only there on LUN 0
    return bytes(data)


class ScsiDisk:
    def __init__(self, params: ScsiDiskParams) -> None:
        self.params = params
        self.image: RawImage | None = None
        self.executor: ImageExecutor | None = None
        self.blocks = 0
        self.shift = params.sector_size.bit_length() - 1
        self.last_sense: bytes | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def open(self) -> None:
        p = self.params
        self.image = RawImage(p.image, size=p.size, readonly=p.readonly, sync=not p.write_cache,
                              sector_size=p.sector_size)
        self.blocks = self.image.size // p.sector_size
        self.executor = ImageExecutor(self.image, p.name)

    def close(self) -> None:
        """Stop the I/O thread and close the image; a second call does nothing."""
        executor, self.executor = self.executor, None
        if executor is not None:
            executor.close()
        image, self.image = self.image, None
        if image is not None:
            image.close()

    # -- commands --------------------------------------------------------------------------
    def execute(self, cdb: bytes, buf: DataBuffer, token: object) -> ScsiResult | PendingCommand:
        """Carry out ``cdb`` (16 bytes, zero-padded) with ``buf``: a result now, or the
        image requests to run first."""
        op = cdb[0]
        handler = _DATA.get(op)
        if handler is not None:
            out = handler(self, cdb, buf, token)
        else:
            control = _CONTROL.get(op)
            out = control(self, cdb, buf) if control is not None else \
                _illegal(Asc.INVALID_COMMAND_OPCODE)
        if isinstance(out, ScsiResult) and op != Op.REQUEST_SENSE:
            self.last_sense = out.sense
        return out

    # control commands answer from memory ---------------------------------------------------
    def _answer(self, buf: DataBuffer, data: bytes) -> ScsiResult:
        if not buf.host_writes:
            return _illegal(Asc.INVALID_FIELD_IN_CDB)  # it may not write the buffer
        return _ok(buf.write(data))

    def _inquiry(self, cdb: bytes, buf: DataBuffer) -> ScsiResult:
        alloc = struct.unpack_from(">H", cdb, 3)[0]
        if buf.length < alloc:
            return _illegal(Asc.INVALID_FIELD_IN_CDB)
        if cdb[1] & 0x02:                          # CmdDt/CSD: obsolete, refused
            return _illegal(Asc.INVALID_FIELD_IN_CDB)
        evpd, page = cdb[1] & 0x01, cdb[2]
        if page and not evpd:
            return _illegal(Asc.INVALID_FIELD_IN_CDB)
        if not evpd:
            if alloc < 5:
                return _illegal(Asc.INVALID_FIELD_IN_CDB)
            p = self.params
            data = scsi.inquiry_std(p.vendor.encode(), p.model.encode(), p.revision.encode())
            return self._answer(buf, data[:alloc])
        if alloc < 4:
            return _illegal(Asc.INVALID_FIELD_IN_CDB)
        body = self.vpd(page)
        if body is None:
            return _illegal(Asc.INVALID_FIELD_IN_CDB)
        return self._answer(buf, scsi.vpd_page(page, body)[:alloc])

    def vpd_pages(self) -> list[int]:
        p = self.params
        pages = [scsi.VPD_SUPPORTED, scsi.VPD_IDS, scsi.VPD_MSFT_PAGING, scsi.VPD_MSFT_VIRTUAL]
        if p.unmap:
            pages += [scsi.VPD_BLOCK_LIMITS, scsi.VPD_BDC, scsi.VPD_LBP]
        if p.serial:
            pages.append(scsi.VPD_SERIAL)
        return sorted(pages)

    def vpd(self, page: int) -> bytes | None:
        """The body of VPD ``page``, or None when this disk does not have it."""
        p = self.params
        if page not in self.vpd_pages():
            return None
        if page == scsi.VPD_SUPPORTED:
            return bytes(self.vpd_pages())
        if page == scsi.VPD_SERIAL:
            return p.serial.encode()
        if page == scsi.VPD_IDS:
            gid = p.disk_id.bytes_le
            t10 = bytes((0x01, 0x01, 0x00, 24)) + p.vendor.encode().ljust(8)[:8] + gid
            # NAA 6, Microsoft's OUI 00-22-48, then 6 bytes from each end of the GUID
            naa = bytes((0x01, 0x03, 0x00, 16, 0x60, 0x02, 0x24, 0x80)) + gid[:6] + gid[10:]
            return t10 + naa
        if page == scsi.VPD_BLOCK_LIMITS:
            b = bytearray(60)
            struct.pack_into(">III", b, 16, 0xFFFFFFFF, MAX_UNMAP_DESCRIPTORS, 1)
            b[28] = 0x80                                 # UGAVALID
            struct.pack_into(">Q", b, 32,
                             min(p.max_transfer, MAX_WRITE_SAME_BYTES) >> self.shift)
            return bytes(b)
        if page == scsi.VPD_BDC:
            b = bytearray(60)
            struct.pack_into(">H", b, 0,
                             ROTATION_SPINNING if p.rotational else ROTATION_NONE)
            return bytes(b)
        if page == scsi.VPD_LBP:
            hi = self.blocks >> 32
            exp = max(1, (1 if hi <= 1 else 1 << (hi - 1).bit_length()).bit_length() - 1)
            return bytes((exp, 0x80 if p.unmap else 0, 0x02, 0))   # LBPU, thin
        if page == scsi.VPD_MSFT_PAGING:
            return bytes((1, 1, 0, 0))
        return bytes((1, 0, 0, 0)) + scsi.MSFT_VIRTUAL_DEVICE_GUID   # VPD_MSFT_VIRTUAL

    def _read_capacity(self, cdb: bytes, buf: DataBuffer) -> ScsiResult:
        if buf.length < 8:
            return _OVERRUN
        return self._answer(buf, scsi.read_capacity10(self.blocks, self.params.sector_size))

    def _service_action_in(self, cdb: bytes, buf: DataBuffer) -> ScsiResult:
        if cdb[1] & 0x1F != scsi.SAI_READ_CAPACITY_16:
            return _illegal(Asc.INVALID_FIELD_IN_CDB)
        if buf.length < 12:
            return _OVERRUN
        data = scsi.read_capacity16(self.blocks, self.params.sector_size, 0, self.params.unmap)
        return self._answer(buf, data[:buf.length])

    def _mode_sense(self, cdb: bytes, buf: DataBuffer) -> ScsiResult:
        ten = cdb[0] == Op.MODE_SENSE_10
        if buf.length == 0:
            return GOOD
        alloc = struct.unpack_from(">H", cdb, 7)[0] if ten else cdb[4]
        header = 8 if ten else 4
        if alloc == 0:
            return GOOD
        if alloc > buf.length or alloc < header:
            return _illegal(Asc.INVALID_FIELD_IN_CDB)
        pc, page = cdb[2] >> 6, cdb[2] & 0x3F
        if pc == 3 or page not in (scsi.MODE_PAGE_CACHING, scsi.MODE_PAGE_ALL):
            return _illegal(Asc.INVALID_FIELD_IN_CDB)   # saved values; pages it lacks
        p = self.params
        dsp = (scsi.MODE_DSP_WP if p.readonly else 0) | (scsi.MODE_DSP_DPOFUA if p.fua else 0)
        # current and default values show the write cache; "changeable" shows nothing
        wce = p.write_cache and pc in (0, 2)
        page_bytes = scsi.caching_page(wce)
        total = header + len(page_bytes)
        head = scsi.mode_header10(total, dsp) if ten else scsi.mode_header6(total, dsp)
        return self._answer(buf, (head + page_bytes)[:alloc])

    def _request_sense(self, cdb: bytes, buf: DataBuffer) -> ScsiResult:
        alloc = cdb[4]
        if alloc < 8 or alloc > buf.length:
            return _illegal(Asc.INVALID_FIELD_IN_CDB)
        sense = self.last_sense or scsi.sense_fixed(SenseKey.NO_SENSE, Asc.NO_ADDITIONAL)
        self.last_sense = None
        return self._answer(buf, sense[:alloc])

    def _verify(self, cdb: bytes, buf: DataBuffer) -> ScsiResult:
        c = scsi.parse_rw(cdb)
        if not self._in_range(c.lba, c.blocks):
            return _illegal(Asc.LBA_OUT_OF_RANGE)
        return GOOD

    def _in_range(self, lba: int, blocks: int) -> bool:
        return lba < self.blocks and blocks <= self.blocks - lba

    # commands that need the image --------------------------------------------------------
    def _pending(self, token: object, reqs: list[DiskRequest], tx: int,
                 writes: bool) -> PendingCommand:
        return PendingCommand(self, token, reqs, tx, writes)

    def _rw(self, cdb: bytes, buf: DataBuffer, token: object) -> ScsiResult | PendingCommand:
        op = cdb[0]
        if op in _RW10_OPS:                      # the usual ones, without a Cdb object
            _op, flags, lba, _g, blocks, _c = _RW10.unpack_from(cdb)
        elif op in _RW16_OPS:
            _op, flags, lba, blocks, _g, _c = _RW16.unpack_from(cdb)
        else:
            c = scsi.parse_rw(cdb)
            flags, lba, blocks = c.flags, c.lba, c.blocks
        write = op in _WRITE_OPS
        if flags & 0x01 and op in _RELADR_OPS:
            return _illegal(Asc.INVALID_FIELD_IN_CDB)     # relative addressing
        # a buffer shorter than the CDB says, or no blocks at all: Hyper-V's ILLEGAL BLOCK
        shift = self.shift
        if blocks == 0 or blocks > buf.length >> shift or \
                not (lba < self.blocks and blocks <= self.blocks - lba):     # _in_range
            return _illegal(Asc.LBA_OUT_OF_RANGE)
        if write and self.params.readonly:
            return _WRITE_PROTECTED
        if not write and not buf.host_writes:
            return _illegal(Asc.INVALID_FIELD_IN_CDB)
        n = blocks << shift
        fua = bool(flags & 0x08) and write and op != _WRITE_6
        req = DiskRequest(_WRITE if write else _READ, lba << shift, n, buf.iov(n), False, fua)
        return PendingCommand(self, token, [req], n, write)

    def _sync(self, cdb: bytes, buf: DataBuffer, token: object) -> ScsiResult | PendingCommand:
        return self._pending(token, [DiskRequest(StorageOp.FLUSH)], 0, False)

    def _start_stop(self, cdb: bytes, buf: DataBuffer,
                    token: object) -> ScsiResult | PendingCommand:
        if cdb[1] & 0x01:                                   # IMMED is not supported
            return _illegal(Asc.INVALID_FIELD_IN_CDB)
        if cdb[4] & 0x01:                                   # START: nothing to do
            return GOOD
        return self._sync(cdb, buf, token)                  # STOP: flush first

    def _unmap(self, cdb: bytes, buf: DataBuffer, token: object) -> ScsiResult | PendingCommand:
        if not self.params.unmap:
            return _illegal(Asc.INVALID_FIELD_IN_CDB)
        alloc = struct.unpack_from(">H", cdb, 7)[0]
        if alloc < 8 or alloc != buf.length:
            return _illegal(Asc.INVALID_FIELD_IN_CDB)
        data = buf.read(alloc)
        data_len, desc_len = struct.unpack_from(">HH", data)
        if data_len != alloc - 2:
            return _illegal(Asc.INVALID_FIELD_IN_CDB)
        if desc_len != alloc - 8:
            return _illegal(Asc.NO_ADDITIONAL)              # as Hyper-V answers it
        if desc_len // 16 > MAX_UNMAP_DESCRIPTORS:
            return _illegal(Asc.INVALID_FIELD_IN_PARAMETER_LIST)
        if self.params.readonly:
            return _WRITE_PROTECTED
        reqs: list[DiskRequest] = []
        for i in range(desc_len // 16):
            lba, n = struct.unpack_from(">QI", data, 8 + 16 * i)
            if not self._in_range(lba, n):
                return _illegal(Asc.LBA_OUT_OF_RANGE)
            if n:
                reqs.append(DiskRequest(StorageOp.DISCARD, lba << self.shift, n << self.shift))
        if not reqs:
            return GOOD
        return self._pending(token, reqs, 0, True)

    def _write_same(self, cdb: bytes, buf: DataBuffer,
                    token: object) -> ScsiResult | PendingCommand:
        c = scsi.parse_rw(cdb)
        if c.op == Op.WRITE_SAME and c.flags & 0x01:
            return _illegal(Asc.INVALID_FIELD_IN_CDB)
        if not self._in_range(c.lba, c.blocks):
            return _illegal(Asc.LBA_OUT_OF_RANGE)
        if self.params.readonly:
            return _WRITE_PROTECTED
        nbytes = c.blocks << self.shift
        if nbytes > min(MAX_WRITE_SAME_BYTES, self.params.max_transfer):
            return _illegal(Asc.LBA_OUT_OF_RANGE)
        bs = self.params.sector_size
        if c.blocks and buf.length < bs:
            return _illegal(Asc.INVALID_FIELD_IN_CDB)
        if not c.blocks:
            return GOOD
        block = buf.read(bs)
        off = c.lba << self.shift
        if c.flags & 0x08 and self.params.unmap and not any(block):
            # UNMAP with a block of zeros: a hole reads back as that block
            return self._pending(token, [DiskRequest(StorageOp.DISCARD, off, nbytes)], 0, True)
        view = memoryview(block)
        reqs = []
        for at in range(0, c.blocks, _IOV_MAX):
            n = min(_IOV_MAX, c.blocks - at)
            reqs.append(DiskRequest(StorageOp.WRITE, off + (at << self.shift), n * bs,
                                    (view,) * n, False, c.fua))
        return self._pending(token, reqs, 0, True)


_Data = Callable[[ScsiDisk, bytes, DataBuffer, object], "ScsiResult | PendingCommand"]
_CONTROL: dict[int, Callable[[ScsiDisk, bytes, DataBuffer], ScsiResult]] = {
    Op.INQUIRY: ScsiDisk._inquiry,
    Op.READ_CAPACITY: ScsiDisk._read_capacity,
    Op.SERVICE_ACTION_IN_16: ScsiDisk._service_action_in,
    Op.MODE_SENSE: ScsiDisk._mode_sense,
    Op.MODE_SENSE_10: ScsiDisk._mode_sense,
    Op.REQUEST_SENSE: ScsiDisk._request_sense,
    Op.TEST_UNIT_READY: lambda d, c, b: GOOD,
    Op.FORMAT_UNIT: lambda d, c, b: GOOD,
    Op.RESERVE: lambda d, c, b: GOOD,
    Op.RELEASE: lambda d, c, b: GOOD,
    Op.ALLOW_MEDIUM_REMOVAL: lambda d, c, b: GOOD,
    Op.VERIFY: ScsiDisk._verify,
    Op.VERIFY_12: ScsiDisk._verify,
    Op.VERIFY_16: ScsiDisk._verify,
}
_DATA: dict[int, _Data] = {
    **{op: ScsiDisk._rw for op in (Op.READ_6, Op.WRITE_6, Op.READ_10, Op.WRITE_10,
                                   Op.READ_12, Op.WRITE_12, Op.READ_16, Op.WRITE_16)},
    Op.SYNCHRONIZE_CACHE: ScsiDisk._sync,
    Op.SYNCHRONIZE_CACHE_16: ScsiDisk._sync,
    Op.START_STOP: ScsiDisk._start_stop,
    Op.UNMAP: ScsiDisk._unmap,
    Op.WRITE_SAME: ScsiDisk._write_same,
    Op.WRITE_SAME_16: ScsiDisk._write_same,
}
