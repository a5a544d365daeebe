"""Wire layouts: SCSI (vbusfs/protocols/scsi.py) against Debian's <scsi/scsi.h> where it has
the value and SPC-3/SBC-3 as reference/hv-services.md §4.7–4.8 quotes them where it does
not; storvsc's vstor_packet and SRB (vbusfs/protocols/vmbus/storvsc.py) against the offsets
of reference §4.1–4.6, which no installed header carries (the structs live in
drivers/scsi/storvsc_drv.c); the GPA-direct packet on the ring against §4.4."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from vbusfs.protocols import scsi
from vbusfs.protocols.vmbus import storvsc as sv
from vbusfs.protocols.vmbus.ring import (
    PAGE_SIZE,
    GpaRange,
    Ring,
    init_ring,
    pack_gpa_direct,
    pack_gpa_direct_one,
    parse_gpa_direct,
)

HEADER = Path("/usr/include/scsi/scsi.h")


def header_defines() -> dict[str, int]:
    if not HEADER.exists():
        pytest.skip("no /usr/include/scsi/scsi.h (Debian libc6-dev)")
    out = {}
    for m in re.finditer(r"^#define\s+(\w+)\s+(0x[0-9a-fA-F]+|\d+)\b", HEADER.read_text(),
                         re.MULTILINE):
        out[m.group(1)] = int(m.group(2), 0)
    return out


def test_opcodes_sense_keys_and_types_match_the_header() -> None:
    h = header_defines()
    same = {"TEST_UNIT_READY": "TEST_UNIT_READY", "REQUEST_SENSE": "REQUEST_SENSE",
            "FORMAT_UNIT": "FORMAT_UNIT", "READ_6": "READ_6", "WRITE_6": "WRITE_6",
            "INQUIRY": "INQUIRY", "MODE_SELECT": "MODE_SELECT", "RESERVE": "RESERVE",
            "RELEASE": "RELEASE", "MODE_SENSE": "MODE_SENSE", "START_STOP": "START_STOP",
            "ALLOW_MEDIUM_REMOVAL": "ALLOW_MEDIUM_REMOVAL", "READ_CAPACITY": "READ_CAPACITY",
            "READ_10": "READ_10", "WRITE_10": "WRITE_10", "VERIFY": "VERIFY",
            "SYNCHRONIZE_CACHE": "SYNCHRONIZE_CACHE", "WRITE_SAME": "WRITE_SAME",
            "MODE_SELECT_10": "MODE_SELECT_10", "MODE_SENSE_10": "MODE_SENSE_10",
            "READ_12": "READ_12", "WRITE_12": "WRITE_12"}
    for ours, theirs in same.items():
        assert scsi.Op[ours] == h[theirs], ours
    # the newer ones, as SBC-3/SPC-3 (and reference §4.8) number them
    assert (scsi.Op.UNMAP, scsi.Op.READ_16, scsi.Op.WRITE_16, scsi.Op.SYNCHRONIZE_CACHE_16,
            scsi.Op.WRITE_SAME_16, scsi.Op.SERVICE_ACTION_IN_16, scsi.Op.REPORT_LUNS,
            scsi.SAI_READ_CAPACITY_16) == (0x42, 0x88, 0x8A, 0x91, 0x93, 0x9E, 0xA0, 0x10)
    for key in scsi.SenseKey:
        assert key == h[key.name], key
    assert scsi.TYPE_DISK == h["TYPE_DISK"] and scsi.TYPE_NO_LUN == h["TYPE_NO_LUN"]
    # <scsi/scsi.h> keeps the status byte shifted right by one (the old Linux convention)
    for ours, theirs in (("GOOD", "GOOD"), ("CHECK_CONDITION", "CHECK_CONDITION"),
                         ("BUSY", "BUSY"), ("RESERVATION_CONFLICT", "RESERVATION_CONFLICT"),
                         ("TASK_SET_FULL", "QUEUE_FULL"), ("CONDITION_MET", "CONDITION_GOOD")):
        assert scsi.Status[ours] == h[theirs] << 1, ours


def test_cdbs() -> None:
    # SBC-3 READ(10): op, flags, LBA (BE32) at 2, group at 6, length (BE16) at 7, control
    assert scsi.cdb_rw(False, 0x01020304, 0x0506, False) == \
        bytes((0x28, 0, 1, 2, 3, 4, 0, 5, 6, 0))
    assert scsi.cdb_rw(True, 7, 8, False)[0] == 0x2A
    # READ(16): LBA (BE64) at 2, length (BE32) at 10; chosen past 32-bit LBAs or when asked
    assert scsi.cdb_rw(False, 2**32, 1, False) == \
        bytes((0x88, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0))
    assert scsi.cdb_rw(True, 1, 1, True)[0] == 0x8A and len(scsi.cdb_rw(True, 1, 1, True)) == 16
    # SPC-3 INQUIRY: EVPD bit 0 of byte 1, page at 2, allocation length (BE16) at 3
    assert scsi.cdb_inquiry(36) == bytes((0x12, 0, 0, 0, 36, 0))
    assert scsi.cdb_inquiry(0x100, 0x83) == bytes((0x12, 1, 0x83, 1, 0, 0))
    # REPORT LUNS: allocation length (BE32) at 6, 12 bytes
    assert scsi.cdb_report_luns(4096) == bytes((0xA0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0))
    # SERVICE ACTION IN(16) / READ CAPACITY(16): allocation length (BE32) at 10
    assert scsi.cdb_read_capacity16() == bytes((0x9E, 0x10)) + bytes(8) + \
        bytes((0, 0, 0, 32, 0, 0))
    # MODE SENSE(6): page control bits 7-6 and page code of byte 2, allocation at 4
    assert scsi.cdb_mode_sense6(0x08, 192, 1) == bytes((0x1A, 0, 0x48, 0, 192, 0))
    # UNMAP: parameter list length (BE16) at 7
    assert scsi.cdb_unmap(24) == bytes((0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0))
    assert scsi.cdb_sync_cache10() == bytes((0x35,)) + bytes(9)
    c = scsi.parse_rw(bytes((0x08, 0x1F, 0xFF, 0xFF, 0, 0)))      # READ(6), 0 blocks = 256
    assert (c.lba, c.blocks) == (0x1FFFFF, 256)
    c = scsi.parse_rw(scsi.cdb_rw(True, 99, 3, True)[:1] + bytes((0x08,)) +
                      scsi.cdb_rw(True, 99, 3, True)[2:])
    assert (c.op, c.lba, c.blocks, c.fua) == (0x8A, 99, 3, True)
    with pytest.raises(ValueError):
        scsi.parse_rw(bytes((0x12,)) + bytes(15))


def test_data_in_pages() -> None:
    # reference §4.7: fixed sense, 18 bytes: 0x70, key at 2, additional length 10, ASC/ASCQ
    s = scsi.sense_fixed(0x05, 0x24, 0x01)
    assert s == bytes((0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x24, 1, 0, 0, 0, 0))
    assert scsi.parse_sense(s) == scsi.Sense(5, 0x24, 1)
    assert scsi.parse_sense(bytes((0x72, 0x06, 0x2A, 0x09))) == scsi.Sense(6, 0x2A, 9)
    assert scsi.parse_sense(bytes((0x00, 0x00))) is None
    # §4.8: standard INQUIRY, 104 bytes
    d = scsi.inquiry_std(b"Msft", b"Virtual Disk", b"1.0 ")
    assert len(d) == 104 and d[:8] == bytes((0, 0, 5, 2, 99, 0, 0, 2))
    assert d[8:36] == b"Msft    Virtual Disk    1.0 "
    i = scsi.parse_inquiry(d)
    assert (i.qualifier, i.device_type, i.cmdque, i.removable) == (0, 0, True, False)
    # READ CAPACITY(10)/(16), big-endian; (10) caps the last LBA at 0xFFFFFFFF
    assert scsi.read_capacity10(2048, 512) == struct.pack(">II", 2047, 512)
    assert scsi.read_capacity10(2**33, 512)[:4] == b"\xff" * 4
    rc = scsi.read_capacity16(2**33, 4096, 3, True)
    assert struct.unpack_from(">QI", rc) == (2**33 - 1, 4096) and rc[13] == 3 and rc[14] == 0x80
    # §4.8: MODE SENSE(6) header {15, 0, DSP, 0} + 12-byte caching page {8, 0x0A, WCE}
    page = scsi.caching_page(True)
    assert scsi.mode_header6(4 + len(page), 0x90) + page == \
        bytes((15, 0, 0x90, 0, 8, 0x0A, 4)) + bytes(9)
    assert scsi.mode_header10(8 + len(page), 0x10) == bytes((0, 18, 0, 0x10, 0, 0, 0, 0))
    # REPORT LUNS: {BE32 length, 4 reserved}, then 8 bytes per LUN, ascending
    rl = scsi.report_luns([3, 0])
    assert rl == bytes((0, 0, 0, 16, 0, 0, 0, 0)) + bytes(8) + bytes((0, 3)) + bytes(6)
    assert scsi.parse_report_luns(rl) == [0, 3]
    assert scsi.parse_report_luns(rl[:16]) == [0]                 # as much as it holds
    # UNMAP parameter list (SBC-3 5.28): data length = len - 2, descriptors at 8
    ul = scsi.unmap_list([(16, 8)])
    assert ul == bytes((0, 22, 0, 16, 0, 0, 0, 0)) + struct.pack(">QI4x", 16, 8)
    assert scsi.parse_unmap_list(ul) == [(16, 8)]
    with pytest.raises(ValueError):
        scsi.parse_unmap_list(ul[:20])
    assert scsi.vpd_page(0x80, b"SN") == bytes((0, 0x80, 0, 2)) + b"SN"


# -- storvsc ----------------------------------------------------------------------------------

def test_vstor_packet_and_srb_offsets() -> None:
    """Reference §4.2's table: every field at its offset in the 64-byte vstor_packet."""
    srb = sv.Srb(length=0x3412, srb_status=0x21, scsi_status=0x22, port_number=0x23,
                 path_id=0x24, target_id=0x25, lun=0x26, cdb_length=0x27,
                 sense_info_length=0x28, data_in=0x29, reserved=0x2A,
                 data_transfer_length=0x2E2D2C2B, cdb=bytes(range(0x30, 0x44)),
                 reserve=0x4544, queue_tag=0x46, queue_action=0x47,
                 srb_flags=0x4B4A4948, time_out_value=0x4F4E4D4C,
                 queue_sort_key=0x53525150)
    p = sv.pack_packet(3, srb.pack(), flags=1, status=0xC0000185)
    assert len(p) == 64 == sv.VSTOR_PACKET_SIZE
    assert struct.unpack_from("<III", p) == (3, 1, 0xC0000185)
    assert struct.unpack_from("<H", p, 12)[0] == 0x3412
    assert list(p[14:24]) == list(range(0x21, 0x2B))
    assert struct.unpack_from("<I", p, 24)[0] == 0x2E2D2C2B
    assert p[28:48] == bytes(range(0x30, 0x44))                   # the CDB / sense union
    assert struct.unpack_from("<HBBIII", p, 48) == (0x4544, 0x46, 0x47, 0x4B4A4948,
                                                     0x4F4E4D4C, 0x53525150)
    assert sv.Srb.unpack(p[12:]) == srb
    assert sv.Srb.unpack(p[12:12 + 0x24]).queue_tag == 0          # pre-WIN8: 36-byte SRB
    assert sv.pack_packet(7, size=48) == struct.pack("<I", 7) + bytes(44)
    # the other union members (§4.2): version @12, properties @12..36, sub-channel count
    v = sv.pack_packet(9, sv.VERSION.pack(0x0602, 0))
    assert v[12:16] == bytes((0x02, 0x06, 0, 0))
    props = sv.pack_packet(1, sv.PROPERTIES.pack(0, 7, 0, 1, 0x40000, 0))
    assert struct.unpack_from("<HxxII", props, 16) == (7, 1, 0x40000)


def test_storvsc_constants() -> None:
    """§4.1, §4.4–4.6."""
    assert [int(o) for o in sv.Operation] == list(range(1, 15))
    assert sv.Operation.EXECUTE_SRB == 3 and sv.Operation.ENUMERATE_BUS == 11
    assert [int(v) for v in sv.ProtocolVersion] == [0x0200, 0x0402, 0x0501, 0x0600, 0x0602]
    assert sv.LINUX_VERSIONS == (0x0602, 0x0600, 0x0501)
    assert (sv.VMBUS_RQST_INIT, sv.VMBUS_RQST_RESET) == (0xFFFFFFFFFFFFFFFD,
                                                         0xFFFFFFFFFFFFFFFC)
    assert (sv.SRB_STATUS_AUTOSENSE_VALID, sv.SRB_STATUS_QUEUE_FROZEN) == (0x80, 0x40)
    assert {s.name: int(s) for s in sv.SrbStatus} == {
        "PENDING": 0x00, "SUCCESS": 0x01, "ABORTED": 0x02, "ERROR": 0x04, "BUSY": 0x05,
        "INVALID_REQUEST": 0x06, "INVALID_PATH_ID": 0x07, "NO_DEVICE": 0x08,
        "TIMEOUT": 0x09, "SELECTION_TIMEOUT": 0x0A, "COMMAND_TIMEOUT": 0x0B,
        "BUS_RESET": 0x0E, "DATA_OVERRUN": 0x12, "BAD_SRB_BLOCK_LENGTH": 0x15,
        "REQUEST_FLUSHED": 0x16, "INVALID_LUN": 0x20, "INVALID_TARGET_ID": 0x21,
        "BAD_FUNCTION": 0x22, "INTERNAL_ERROR": 0x30}
    # §4.2: the flags Linux sets for a tagged device: read, write, no data
    f = sv.SrbFlags
    base = f.DISABLE_SYNCH_TRANSFER | f.QUEUE_ACTION_ENABLE | f.NO_QUEUE_FREEZE
    assert (base | f.DATA_IN, base | f.DATA_OUT, base) == (0x14A, 0x18A, 0x10A)
    # §4.6: NTSTATUS by SRB status
    table = {0x01: 0, 0x05: 0x80000011, 0x20: 0xC00000C0, 0x21: 0xC00000C0,
             0x08: 0xC00000C0, 0x0B: 0xC00000B5, 0x09: 0xC00000B5, 0x0A: 0xC000009D,
             0x22: 0xC0000010, 0x15: 0xC0000010, 0x12: 0x80000005, 0x16: 0xC0000001,
             0x02: 0xC0000120, 0x04: 0xC0000185, 0x06: 0xC0000185, 0x30: 0xC0000185}
    for srb, nt in table.items():
        assert sv.srb_status_to_ntstatus(srb) == nt, hex(srb)
        assert sv.srb_status_to_ntstatus(srb | 0x80) == nt        # the flag bits aside


def test_gpa_direct_packet_on_the_ring() -> None:
    """§4.4: type 9, offset8 = 4 + n, len8 = 12 + n with a 64-byte vstor_packet, flags 1,
    then reserved, rangecount 1, the range's len and offset, n PFNs, the packet."""
    mem = memoryview(bytearray(4 * PAGE_SIZE))
    init_ring(mem)
    ring = Ring(mem)
    pfns = (0x1234, 0x1235, 0x9999)
    payload = sv.pack_packet(3, flags=1)
    written, _ = ring.write(9, 1, 0x42, payload,
                            pack_gpa_direct([GpaRange(8192, 512, pfns)]))
    assert written
    # the one-range form the guest uses per request writes the same bytes
    assert pack_gpa_direct_one(8192, 512, list(pfns)) == \
        pack_gpa_direct([GpaRange(8192, 512, pfns)])
    d = bytes(mem[PAGE_SIZE:PAGE_SIZE + 32 + 24 + 64])
    n = len(pfns)
    assert struct.unpack_from("<HHHHQ", d) == (9, 4 + n, 12 + n, 1, 0x42)
    assert struct.unpack_from("<IIII", d, 16) == (0, 1, 8192, 512)
    assert struct.unpack_from("<3Q", d, 32) == pfns
    assert d[32 + 8 * n:] == payload
    pkt = Ring(mem).read()
    assert pkt is not None and parse_gpa_direct(pkt.header) == [GpaRange(8192, 512, pfns)]
    for bad in (b"", struct.pack("<II", 0, 1),                     # a range it does not have
                struct.pack("<IIII", 0, 1, 100, 4096) + bytes(8),    # offset past the page
                struct.pack("<IIII", 0, 1, 8192, 0) + bytes(8),      # 2 PFNs needed, 1 given
                struct.pack("<IIII", 0, 1, 10, 0) + bytes(16)):      # a PFN left over
        with pytest.raises(ValueError):
            parse_gpa_direct(bad)
    assert parse_gpa_direct(struct.pack("<II", 0, 0)) == []
