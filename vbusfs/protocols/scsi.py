"""SCSI as both ends of any SCSI transport speak it: opcodes, status, sense, CDBs and the
data-in pages a direct-access disk answers with. No bus in here: storvsc (VMBus) uses it
today, virtio-scsi can tomorrow.

Sources: SPC-3/SBC-3 as Linux names them (``include/scsi/scsi_proto.h``; the older subset is
in Debian's ``/usr/include/scsi/scsi.h``, which the tests compare against), and the Hyper-V
answers that reference/hv-services.md §4.7–4.8 describes after OpenVMM's ``scsidisk``
(INQUIRY, VPD pages, READ CAPACITY, MODE SENSE caching page, REPORT LUNS, fixed sense).
Everything multi-byte inside a CDB or a data-in page is big-endian.
"""

from __future__ import annotations

import enum
import struct
import uuid
from dataclasses import dataclass

__all__ = [
    "Op", "SAI_READ_CAPACITY_16", "Status", "SenseKey", "Asc", "ASCQ_CAPACITY_DATA_CHANGED",
    "TYPE_DISK", "TYPE_NO_LUN", "sense_fixed", "Sense", "parse_sense",
    "INQUIRY_STD_LEN", "inquiry_std", "Inquiry", "parse_inquiry", "vpd_page",
    "VPD_SUPPORTED", "VPD_SERIAL", "VPD_IDS", "VPD_BLOCK_LIMITS", "VPD_BDC", "VPD_LBP",
    "VPD_MSFT_PAGING", "VPD_MSFT_VIRTUAL", "MSFT_VIRTUAL_DEVICE_GUID",
    "read_capacity10", "read_capacity16", "MODE_PAGE_CACHING", "MODE_PAGE_ALL",
    "MODE_DSP_WP", "MODE_DSP_DPOFUA", "CACHING_WCE", "caching_page", "mode_header6",
    "mode_header10", "report_luns", "parse_report_luns", "unmap_list", "parse_unmap_list",
    "Cdb", "parse_rw", "cdb_rw", "cdb_inquiry", "cdb_report_luns", "cdb_read_capacity16",
    "cdb_read_capacity10", "cdb_mode_sense6", "cdb_sync_cache10", "cdb_unmap", "CDB_LEN",
]


class Op(enum.IntEnum):
    """Operation codes (``include/scsi/scsi_proto.h``)."""

    TEST_UNIT_READY = 0x00
    REQUEST_SENSE = 0x03
    FORMAT_UNIT = 0x04
    READ_6 = 0x08
    WRITE_6 = 0x0A
    INQUIRY = 0x12
    MODE_SELECT = 0x15
    RESERVE = 0x16
    RELEASE = 0x17
    MODE_SENSE = 0x1A
    START_STOP = 0x1B
    ALLOW_MEDIUM_REMOVAL = 0x1E
    READ_CAPACITY = 0x25
    READ_10 = 0x28
    WRITE_10 = 0x2A
    VERIFY = 0x2F
    SYNCHRONIZE_CACHE = 0x35
    WRITE_SAME = 0x41
    UNMAP = 0x42
    MODE_SELECT_10 = 0x55
    MODE_SENSE_10 = 0x5A
    READ_16 = 0x88
    WRITE_16 = 0x8A
    VERIFY_16 = 0x8F
    SYNCHRONIZE_CACHE_16 = 0x91
    WRITE_SAME_16 = 0x93
    SERVICE_ACTION_IN_16 = 0x9E
    REPORT_LUNS = 0xA0
    READ_12 = 0xA8
    WRITE_12 = 0xAA
    VERIFY_12 = 0xAF


#: SERVICE ACTION IN(16) service action for READ CAPACITY(16) (SAI_READ_CAPACITY_16)
SAI_READ_CAPACITY_16 = 0x10
#: the longest CDB any transport here carries (STORVSC_MAX_CMD_LEN, VIRTIO_SCSI_CDB_SIZE 32
#: would be longer; SBC commands used here are at most 16)
CDB_LEN = 16


class Status(enum.IntEnum):
    """SAM status codes (``enum sam_status``). Debian's <scsi/scsi.h> keeps the old
    shifted-right-by-one values (CHECK_CONDITION 0x01)."""

    GOOD = 0x00
    CHECK_CONDITION = 0x02
    CONDITION_MET = 0x04
    BUSY = 0x08
    RESERVATION_CONFLICT = 0x18
    TASK_SET_FULL = 0x28
    ACA_ACTIVE = 0x30
    TASK_ABORTED = 0x40


class SenseKey(enum.IntEnum):
    NO_SENSE = 0x00
    RECOVERED_ERROR = 0x01
    NOT_READY = 0x02
    MEDIUM_ERROR = 0x03
    HARDWARE_ERROR = 0x04
    ILLEGAL_REQUEST = 0x05
    UNIT_ATTENTION = 0x06
    DATA_PROTECT = 0x07
    ABORTED_COMMAND = 0x0B


class Asc(enum.IntEnum):
    """Additional sense codes the disks here produce (SPC-3 annex D)."""

    NO_ADDITIONAL = 0x00
    PARAMETER_LIST_LENGTH = 0x1A
    INVALID_COMMAND_OPCODE = 0x20
    LBA_OUT_OF_RANGE = 0x21
    INVALID_FIELD_IN_CDB = 0x24
    LUN_NOT_SUPPORTED = 0x25
    INVALID_FIELD_IN_PARAMETER_LIST = 0x26
    WRITE_PROTECTED = 0x27
    PARAMETERS_CHANGED = 0x2A
    OPERATING_CONDITIONS_CHANGED = 0x3F


#: ASCQ of PARAMETERS CHANGED that says the capacity changed
ASCQ_CAPACITY_DATA_CHANGED = 0x09

TYPE_DISK = 0x00                 # peripheral device type: direct access block device
#: peripheral qualifier 3 + type 0x1F: "no logical unit here" (what Hyper-V answers an
#: INQUIRY to a LUN it does not have, reference §4.8)
TYPE_NO_LUN = 0x7F


# -- sense ---------------------------------------------------------------------------------

_SENSE_FIXED_LEN = 18            # response code 0x70, additional length 10


def sense_fixed(key: int, asc: int, ascq: int = 0) -> bytes:
    """Fixed-format sense data, current error, as Hyper-V builds it (reference §4.7):
    byte 0 0x70, byte 2 the key, byte 7 additional length 10, bytes 12–13 ASC/ASCQ."""
    b = bytearray(_SENSE_FIXED_LEN)
    b[0] = 0x70
    b[2] = key & 0x0F
    b[7] = _SENSE_FIXED_LEN - 8
    b[12] = asc
    b[13] = ascq
    return bytes(b)


@dataclass(frozen=True)
class Sense:
    key: int
    asc: int
    ascq: int


def parse_sense(buf: bytes) -> Sense | None:
    """``scsi_normalize_sense``: fixed (0x70/0x71) or descriptor (0x72/0x73) format; None
    when ``buf`` holds no valid sense."""
    if len(buf) < 2:
        return None
    code = buf[0] & 0x7F
    if code in (0x70, 0x71):
        return Sense(buf[2] & 0x0F if len(buf) > 2 else 0, buf[12] if len(buf) > 12 else 0,
                     buf[13] if len(buf) > 13 else 0)
    if code in (0x72, 0x73):
        return Sense(buf[1] & 0x0F, buf[2] if len(buf) > 2 else 0,
                     buf[3] if len(buf) > 3 else 0)
    return None


# -- INQUIRY -------------------------------------------------------------------------------

#: the standard INQUIRY data Hyper-V returns is 104 bytes (additional length 99)
INQUIRY_STD_LEN = 104
_VERSION_SPC3 = 0x05
_RESPONSE_FORMAT_2 = 0x02
_CMDQUE = 0x02                   # byte 7: the device takes tagged commands


def inquiry_std(vendor: bytes, product: bytes, revision: bytes, device_type: int = TYPE_DISK,
                cmdque: bool = True) -> bytes:
    """Standard INQUIRY data: byte 0 the device type, byte 2 version 5 (SPC-3), byte 3
    response data format 2, byte 4 additional length, byte 7 CmdQue, then the vendor (8),
    product (16) and revision (4) strings, space-padded."""
    b = bytearray(INQUIRY_STD_LEN)
    b[0] = device_type
    b[2] = _VERSION_SPC3
    b[3] = _RESPONSE_FORMAT_2
    b[4] = INQUIRY_STD_LEN - 5
    b[7] = _CMDQUE if cmdque else 0
    b[8:16] = vendor.ljust(8)[:8]
    b[16:32] = product.ljust(16)[:16]
    b[32:36] = revision.ljust(4)[:4]
    return bytes(b)


@dataclass(frozen=True)
class Inquiry:
    qualifier: int               # peripheral qualifier (0 connected, 3 not supported)
    device_type: int
    removable: bool
    version: int
    additional_length: int
    cmdque: bool
    vendor: bytes
    product: bytes
    revision: bytes


def parse_inquiry(buf: bytes) -> Inquiry:
    """The fields Linux's ``scsi_add_lun`` reads; ValueError when shorter than 36 bytes."""
    if len(buf) < 36:
        raise ValueError(f"INQUIRY data of {len(buf)} bytes: needs 36")
    return Inquiry(buf[0] >> 5, buf[0] & 0x1F, bool(buf[1] & 0x80), buf[2], buf[4],
                   bool(buf[7] & _CMDQUE), bytes(buf[8:16]), bytes(buf[16:32]),
                   bytes(buf[32:36]))


VPD_SUPPORTED = 0x00
VPD_SERIAL = 0x80
VPD_IDS = 0x83
VPD_BLOCK_LIMITS = 0xB0
VPD_BDC = 0xB1                   # block device characteristics (rotation rate)
VPD_LBP = 0xB2                   # logical block provisioning
VPD_MSFT_PAGING = 0xCE           # Microsoft paging extent properties
VPD_MSFT_VIRTUAL = 0xCF          # Microsoft virtual device properties
#: signature of the Microsoft virtual device properties page (OpenVMM ``inquiry.rs``)
MSFT_VIRTUAL_DEVICE_GUID = uuid.UUID("89a98f15-c928-4d8b-94cd-ef51faa99d33").bytes_le


def vpd_page(page: int, body: bytes, device_type: int = TYPE_DISK) -> bytes:
    """A VPD page: {device type, page code, 0, length} and the body (at most 255 bytes,
    the length byte the Hyper-V pages use)."""
    if len(body) > 255:
        raise ValueError(f"VPD page {page:#x} body of {len(body)} bytes")
    return bytes((device_type, page, 0, len(body))) + body


# -- READ CAPACITY, MODE SENSE, REPORT LUNS, UNMAP -------------------------------------------

def read_capacity10(blocks: int, block_size: int) -> bytes:
    """8 bytes: the last LBA (capped at 0xFFFFFFFF, which tells the initiator to use
    READ CAPACITY(16)) and the block size."""
    return struct.pack(">II", min(blocks - 1, 0xFFFFFFFF), block_size)


def read_capacity16(blocks: int, block_size: int, phys_exp: int, lbpme: bool) -> bytes:
    """32 bytes: last LBA, block size, byte 13 logical blocks per physical block exponent,
    byte 14 bit 7 LBPME (logical block provisioning management enabled)."""
    b = bytearray(32)
    struct.pack_into(">QI", b, 0, blocks - 1, block_size)
    b[13] = phys_exp & 0x0F
    b[14] = 0x80 if lbpme else 0
    return bytes(b)


MODE_PAGE_CACHING = 0x08
MODE_PAGE_ALL = 0x3F
MODE_DSP_WP = 0x80               # device-specific parameter: write protected
MODE_DSP_DPOFUA = 0x10           # device-specific parameter: DPO and FUA supported
CACHING_WCE = 0x04               # caching page byte 2: write cache enabled
_CACHING_PAGE_LEN = 12           # the Hyper-V caching page: page length 0x0A


def caching_page(wce: bool) -> bytes:
    b = bytearray(_CACHING_PAGE_LEN)
    b[0] = MODE_PAGE_CACHING
    b[1] = _CACHING_PAGE_LEN - 2
    b[2] = CACHING_WCE if wce else 0
    return bytes(b)


def mode_header6(data_len: int, dsp: int) -> bytes:
    """MODE SENSE(6) header: mode data length (what follows byte 0), medium type, DSP,
    block descriptor length 0."""
    return bytes((data_len - 1, 0, dsp, 0))


def mode_header10(data_len: int, dsp: int) -> bytes:
    return struct.pack(">HBBBBH", data_len - 2, 0, dsp, 0, 0, 0)


def report_luns(luns: list[int]) -> bytes:
    """REPORT LUNS data: {u32 list length, 4 reserved}, then 8 bytes per LUN with the LUN
    in bytes 0–1 (peripheral addressing, LUN < 256), in ascending order."""
    body = b"".join(struct.pack(">H6x", lun) for lun in sorted(luns))
    return struct.pack(">I4x", len(body)) + body


def parse_report_luns(buf: bytes) -> list[int]:
    """The LUNs of a REPORT LUNS answer (as much of the list as ``buf`` holds); Linux's
    ``scsilun_to_int`` for the single-level forms a Hyper-V host reports."""
    if len(buf) < 8:
        raise ValueError("REPORT LUNS data shorter than its header")
    (length,) = struct.unpack_from(">I", buf)
    n = min(length, len(buf) - 8) // 8
    out = []
    for i in range(n):
        a, b = buf[8 + 8 * i], buf[9 + 8 * i]
        out.append(((a & 0x3F) << 8) | b)
    return out


def unmap_list(ranges: list[tuple[int, int]]) -> bytes:
    """UNMAP parameter list: {u16 data length, u16 block descriptor data length, 4
    reserved}, then {u64 LBA, u32 count, 4 reserved} per range."""
    body = b"".join(struct.pack(">QI4x", lba, n) for lba, n in ranges)
    return struct.pack(">HH4x", 6 + len(body), len(body)) + body


def parse_unmap_list(buf: bytes) -> list[tuple[int, int]]:
    """The descriptors of an UNMAP parameter list whose header agrees with its length
    (what Hyper-V checks); ValueError otherwise."""
    if len(buf) < 8:
        raise ValueError("UNMAP parameter list shorter than its header")
    data_len, desc_len = struct.unpack_from(">HH", buf)
    if data_len != len(buf) - 2 or desc_len != len(buf) - 8 or desc_len % 16:
        raise ValueError(f"UNMAP lengths {data_len}/{desc_len} disagree with the "
                         f"{len(buf)}-byte list")
    return [struct.unpack_from(">QI", buf, 8 + 16 * i) for i in range(desc_len // 16)]


# -- CDBs ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cdb:
    """A READ/WRITE/VERIFY/WRITE SAME/SYNCHRONIZE CACHE CDB, decoded."""

    op: int
    lba: int
    blocks: int
    fua: bool
    flags: int                   # byte 1 (WRITE SAME: UNMAP is 0x08)


_RW10 = struct.Struct(">BBIBHB")     # op, flags, lba, group, length, control
_RW12 = struct.Struct(">BBIIBB")
_RW16 = struct.Struct(">BBQIBB")


def parse_rw(cdb: bytes) -> Cdb:
    """Decode the LBA and block count of a 6/10/12/16-byte block command. A 6-byte
    READ/WRITE with length 0 means 256 blocks (SBC-3 §5.14)."""
    op = cdb[0]
    if op in (Op.READ_6, Op.WRITE_6):
        lba = ((cdb[1] & 0x1F) << 16) | (cdb[2] << 8) | cdb[3]
        return Cdb(op, lba, cdb[4] or 256, False, 0)
    if op in (Op.READ_10, Op.WRITE_10, Op.VERIFY, Op.SYNCHRONIZE_CACHE, Op.WRITE_SAME):
        _, flags, lba, _, n, _ = _RW10.unpack_from(cdb)
        return Cdb(op, lba, n, bool(flags & 0x08) and op != Op.WRITE_SAME, flags)
    if op in (Op.READ_12, Op.WRITE_12, Op.VERIFY_12):
        _, flags, lba, n, _, _ = _RW12.unpack_from(cdb)
        return Cdb(op, lba, n, bool(flags & 0x08), flags)
    if op in (Op.READ_16, Op.WRITE_16, Op.VERIFY_16, Op.SYNCHRONIZE_CACHE_16,
              Op.WRITE_SAME_16):
        _, flags, lba, n, _, _ = _RW16.unpack_from(cdb)
        return Cdb(op, lba, n, bool(flags & 0x08) and op != Op.WRITE_SAME_16, flags)
    raise ValueError(f"opcode {op:#x} is not a block command")


def cdb_rw(write: bool, lba: int, blocks: int, use16: bool) -> bytes:
    """``sd_setup_rw10_cmnd``/``sd_setup_rw16_cmnd``: READ/WRITE(10), or (16) when the
    LBA or length does not fit or the disk is larger than 2^32 blocks."""
    if use16 or lba > 0xFFFFFFFF or blocks > 0xFFFF:
        return _RW16.pack(Op.WRITE_16 if write else Op.READ_16, 0, lba, blocks, 0, 0)
    return _RW10.pack(Op.WRITE_10 if write else Op.READ_10, 0, lba, 0, blocks, 0)


def cdb_inquiry(alloc: int, page: int | None = None) -> bytes:
    """INQUIRY; with ``page`` the EVPD bit and the page code."""
    return struct.pack(">BBBHB", Op.INQUIRY, 0 if page is None else 1,
                       0 if page is None else page, alloc, 0)


def cdb_report_luns(alloc: int) -> bytes:
    return struct.pack(">BBB3xIBB", Op.REPORT_LUNS, 0, 0, alloc, 0, 0)


def cdb_read_capacity16(alloc: int = 32) -> bytes:
    return struct.pack(">BBQIBB", Op.SERVICE_ACTION_IN_16, SAI_READ_CAPACITY_16, 0, alloc,
                       0, 0)


def cdb_read_capacity10() -> bytes:
    return bytes((Op.READ_CAPACITY,)) + bytes(9)


def cdb_mode_sense6(page: int, alloc: int, pc: int = 0) -> bytes:
    """MODE SENSE(6) with DBD off, page control ``pc`` (0 current values)."""
    return bytes((Op.MODE_SENSE, 0, ((pc & 3) << 6) | (page & 0x3F), 0, alloc, 0))


def cdb_sync_cache10() -> bytes:
    return bytes((Op.SYNCHRONIZE_CACHE,)) + bytes(9)


def cdb_unmap(param_len: int) -> bytes:
    return struct.pack(">BB4xBHB", Op.UNMAP, 0, 0, param_len, 0)
