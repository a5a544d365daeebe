"""storvsp's answers, packet by packet, against reference/hv-services.md §4 (the init
sequence §4.3, completions §4.5, NTSTATUS §4.6, sense §4.7, the Hyper-V answers §4.8) and,
where the reference says less than the source it was written from, OpenVMM's storvsp and
scsidisk (named at the assertion). The test is the guest: it writes raw packets into the
ring (tests/storvsp_harness.py). Expected numbers are written out here, not taken from the
code under test."""

from __future__ import annotations

import struct
import uuid
from pathlib import Path

import pytest
import trio

from tests.conftest import Logs
from tests.storvsp_harness import DISK_ID, Answer, Harness, params, storvsp_channel
from vbusfs.protocols.vmbus import storvsc as sv
from vbusfs.protocols.vmbus.ring import GpaRange, PacketType, pack_gpa_direct

KIB = 1024
# reference §4.6 / §4.5 numbers, written out
SUCCESS, INVALID_PARAMETER, INVALID_DEVICE_REQUEST = 0, 0xC000000D, 0xC0000010
REVISION_MISMATCH, DEVICE_DOES_NOT_EXIST = 0xC0000059, 0xC00000C0
INVALID_DEVICE_STATE, IO_DEVICE_ERROR = 0xC0000184, 0xC0000185
SRB_SUCCESS, SRB_ERROR, SRB_INVALID_REQUEST, SRB_INVALID_LUN = 0x01, 0x04, 0x06, 0x20
SRB_DATA_OVERRUN, AUTOSENSE = 0x12, 0x80
COMPLETE_IO = 1
CHECK_CONDITION = 0x02


def cdb10(op: int, lba: int = 0, n: int = 0, flags: int = 0) -> bytes:
    return struct.pack(">BBIBHB", op, flags, lba, 0, n, 0)


def cdb16(op: int, lba: int = 0, n: int = 0, flags: int = 0) -> bytes:
    return struct.pack(">BBQIBB", op, flags, lba, n, 0, 0)


def inquiry(alloc: int, page: int | None = None) -> bytes:
    return struct.pack(">BBBHB", 0x12, 0 if page is None else 1, page or 0, alloc, 0)


def sense_of(a: Answer) -> tuple[int, int, int]:
    s = a.srb.cdb
    assert s[0] == 0x70 and s[7] == 10, s.hex()          # fixed format, 18 bytes
    return s[2] & 0x0F, s[12], s[13]


def data_in(h: Harness, a: Answer) -> bytes:
    return bytes(h.data(0, 4)[:a.srb.data_transfer_length])


async def ask(h: Harness, cdb: bytes, length: int = 0, **kw: object) -> Answer:
    h.srb(cdb, length=length, **kw)  # type: ignore[arg-type]
    (a,) = await h.answers(1)
    assert a.type == 0x0B and a.operation == COMPLETE_IO        # VM_PKT_COMP, COMPLETE_IO
    return a


def check(a: Answer, srb_status: int, scsi_status: int, nt: int) -> None:
    assert (a.srb.srb_status, a.srb.scsi_status, a.status) == (srb_status, scsi_status, nt), \
        (hex(a.srb.srb_status), a.srb.scsi_status, hex(a.status))


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "lun0.img"
    p.write_bytes(bytes(1 << 20))
    return p


# -- init ------------------------------------------------------------------------------------

async def test_init_sequence_and_hyperv_answers(image: Path) -> None:
    async with storvsp_channel({0: params(image)}) as h:
        rqst = 2**64 - 3                                        # VMBUS_RQST_INIT
        # out of order: QUERY_PROPERTIES first
        a = await h.call(sv.pack_packet(10, flags=1), trans_id=rqst)
        assert (a.operation, a.status, a.trans_id) == (COMPLETE_IO, INVALID_DEVICE_STATE, rqst)
        a = await h.call(sv.pack_packet(7, flags=1), trans_id=rqst)        # BEGIN
        assert a.status == SUCCESS and a.type == 0x0B and len(a.payload) == 64
        # WIN10 (6.2) is refused with the version echoed, WIN8_1 (6.0) accepted (OpenVMM)
        a = await h.call(sv.pack_packet(9, struct.pack("<HH", 0x0602, 0), flags=1),
                         trans_id=rqst)
        assert a.status == REVISION_MISMATCH and a.payload[12:14] == b"\x02\x06"
        a = await h.call(sv.pack_packet(9, struct.pack("<HH", 0x0600, 0), flags=1),
                         trans_id=rqst)
        assert a.status == SUCCESS and a.payload[12:14] == b"\x00\x06"
        # an SRB before END_INITIALIZATION
        h.srb(bytes(6))
        (a,) = await h.answers(1)
        assert a.status == INVALID_DEVICE_STATE
        a = await h.call(sv.pack_packet(10, flags=1), trans_id=rqst)       # PROPERTIES
        _res, max_channels, _r1, flags, max_xfer, _r2 = struct.unpack_from("<IHHIIQ",
                                                                           a.payload, 12)
        assert (a.status, max_channels, flags, max_xfer) == (SUCCESS, 0, 1, 0x40000)
        a = await h.call(sv.pack_packet(8, flags=1), trans_id=rqst)        # END
        assert a.status == SUCCESS
        a = await ask(h, bytes(6))                               # TEST UNIT READY
        check(a, SRB_SUCCESS, 0, SUCCESS)


async def test_replies_are_as_long_as_requests(image: Path) -> None:
    """Kernels before 5.19 send 48-byte packets until WIN8 is agreed; the host answers
    with the request's own size (reference §5 trap 5)."""
    async with storvsp_channel({0: params(image)}) as h:
        for size in (48, 64, 20, 12):
            a = await h.call(sv.pack_packet(7, flags=1, size=size), trans_id=5)
            assert len(a.payload) == -(-size // 8) * 8           # padded to 8 on the ring
        a = await h.call(b"\x07\x00", trans_id=6)                # shorter than the header
        assert (a.operation, a.status) == (COMPLETE_IO, INVALID_PARAMETER)


async def test_older_host_versions_and_sub_channels(image: Path) -> None:
    async with storvsp_channel({0: params(image)}, versions=(0x0501,)) as h:
        rqst = 2**64 - 3
        await h.call(sv.pack_packet(7, flags=1), trans_id=rqst)
        for version, want in ((0x0602, REVISION_MISMATCH), (0x0600, REVISION_MISMATCH),
                              (0x0501, SUCCESS)):
            a = await h.call(sv.pack_packet(9, struct.pack("<HH", version, 0), flags=1),
                             trans_id=rqst)
            assert a.status == want
        await h.call(sv.pack_packet(10, flags=1), trans_id=rqst)
        # CREATE_SUB_CHANNELS before END: more than the host offers (0) is refused
        a = await h.call(sv.pack_packet(13, struct.pack("<H", 1), flags=1), trans_id=rqst)
        assert a.status == INVALID_PARAMETER
        await h.call(sv.pack_packet(8, flags=1), trans_id=rqst)
        for op in (4, 5, 6):                                     # RESET_LUN/ADAPTER/BUS
            assert (await h.call(sv.pack_packet(op, flags=1), trans_id=9)).status == SUCCESS
        a = await h.call(sv.pack_packet(12, flags=1), trans_id=9)     # FCHBA_DATA
        assert a.status == INVALID_DEVICE_REQUEST


# -- INQUIRY and VPD -------------------------------------------------------------------------

async def test_standard_inquiry(image: Path) -> None:
    async with storvsp_channel({0: params(image)}) as h:
        await h.init()
        a = await ask(h, inquiry(255), 255)
        check(a, SRB_SUCCESS, 0, SUCCESS)
        d = data_in(h, a)
        assert len(d) == 104                                      # reference §4.8
        assert (d[0], d[1], d[2], d[3], d[4], d[7]) == (0x00, 0x00, 0x05, 0x02, 99, 0x02)
        assert d[8:16] == b"Msft    " and d[16:32] == b"Virtual Disk    "
        assert d[32:36] == b"1.0 " and d[36:] == bytes(68)
        a = await ask(h, inquiry(36), 36)                         # allocation length caps
        assert a.srb.data_transfer_length == 36
        a = await ask(h, inquiry(255), 100)                       # buffer shorter than asked
        check(a, SRB_INVALID_REQUEST | AUTOSENSE, CHECK_CONDITION, IO_DEVICE_ERROR)
        assert sense_of(a) == (0x05, 0x24, 0)


async def test_inquiry_to_a_lun_that_is_not_there(image: Path) -> None:
    async with storvsp_channel({1: params(image)}) as h:
        await h.init()
        d = data_in(h, await ask(h, inquiry(96), 96, lun=0))
        assert d[0] == 0x7F and d[8:16] == b"Msft    "           # LUN 0 keeps the strings
        d = data_in(h, await ask(h, inquiry(96), 96, lun=7))
        assert d[0] == 0x7F and d[8:36] == bytes(28)              # others do not
        a = await ask(h, inquiry(64, 0x00), 64, lun=7)            # no VPD for it
        check(a, SRB_INVALID_REQUEST | AUTOSENSE, CHECK_CONDITION, IO_DEVICE_ERROR)
        a = await ask(h, bytes(6), lun=7)                         # anything else
        check(a, SRB_INVALID_LUN, CHECK_CONDITION, DEVICE_DOES_NOT_EXIST)
        assert a.srb.cdb == bytes(20)                             # no sense


async def test_vpd_pages(tmp_path: Path, image: Path) -> None:
    async with storvsp_channel({0: params(image)}) as h:
        await h.init()
        d = data_in(h, await ask(h, inquiry(255, 0x00), 255))
        assert d == bytes((0, 0, 0, 8, 0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2, 0xCE, 0xCF))
        assert data_in(h, await ask(h, inquiry(255, 0x80), 255)) == \
            bytes((0, 0x80, 0, 8)) + b"SER-0001"
        d = data_in(h, await ask(h, inquiry(255, 0x83), 255))
        g = DISK_ID.bytes_le
        assert d[:4] == bytes((0, 0x83, 0, 48))
        assert d[4:8] == bytes((0x01, 0x01, 0x00, 24)) and d[8:32] == b"Msft    " + g
        assert d[32:36] == bytes((0x01, 0x03, 0x00, 16))
        assert d[36:52] == bytes((0x60, 0x02, 0x24, 0x80)) + g[:6] + g[10:]
        d = data_in(h, await ask(h, inquiry(255, 0xB0), 255))
        assert d[:4] == bytes((0, 0xB0, 0, 0x3C))
        assert struct.unpack_from(">III", d, 20) == (0xFFFFFFFF, 4096, 1)
        assert d[32] == 0x80 and struct.unpack_from(">Q", d, 36)[0] == (8 << 20) // 512
        d = data_in(h, await ask(h, inquiry(255, 0xB1), 255))
        assert d[:6] == bytes((0, 0xB1, 0, 0x3C, 0, 1))           # non-rotating
        assert data_in(h, await ask(h, inquiry(255, 0xB2), 255)) == \
            bytes((0, 0xB2, 0, 4, 1, 0x80, 2, 0))                 # LBPU, thin
        d = data_in(h, await ask(h, inquiry(255, 0xCF), 255))
        assert d == bytes((0, 0xCF, 0, 20, 1, 0, 0, 0)) + \
            uuid.UUID("89a98f15-c928-4d8b-94cd-ef51faa99d33").bytes_le
        assert data_in(h, await ask(h, inquiry(255, 0xCE), 255)) == \
            bytes((0, 0xCE, 0, 4, 1, 1, 0, 0))
        a = await ask(h, inquiry(255, 0x89), 255)                 # not one of them
        check(a, SRB_INVALID_REQUEST | AUTOSENSE, CHECK_CONDITION, IO_DEVICE_ERROR)
        assert sense_of(a) == (0x05, 0x24, 0)
    plain = params(tmp_path / "b.img", unmap=False, serial="", rotational=True)
    async with storvsp_channel({0: plain}) as h:
        await h.init()
        d = data_in(h, await ask(h, inquiry(255, 0x00), 255))
        assert d == bytes((0, 0, 0, 4, 0x00, 0x83, 0xCE, 0xCF))
        a = await ask(h, inquiry(255, 0xB1), 255)
        check(a, SRB_INVALID_REQUEST | AUTOSENSE, CHECK_CONDITION, IO_DEVICE_ERROR)


# -- capacity, mode sense, report luns, unsupported -------------------------------------------

async def test_capacity_and_caching_page(tmp_path: Path, image: Path) -> None:
    async with storvsp_channel({0: params(image)}) as h:
        await h.init()
        d = data_in(h, await ask(h, bytes((0x25,)) + bytes(9), 8))
        assert d == struct.pack(">II", (1 << 20) // 512 - 1, 512)
        a = await ask(h, bytes((0x25,)) + bytes(9), 4)            # buffer too small
        check(a, SRB_DATA_OVERRUN | AUTOSENSE, CHECK_CONDITION, 0x80000005)
        d = data_in(h, await ask(h, cdb16(0x9E, 0, 32, 0x10), 32))
        assert struct.unpack_from(">QI", d) == ((1 << 20) // 512 - 1, 512)
        assert d[13] == 0 and d[14] == 0x80 and len(d) == 32      # LBPME
        for page in (0x08, 0x3F):
            d = data_in(h, await ask(h, bytes((0x1A, 0, page, 0, 192, 0)), 192))
            assert d == bytes((15, 0, 0x10, 0, 0x08, 0x0A, 0x04)) + bytes(9)
        d = data_in(h, await ask(h, struct.pack(">BBBxxxxHB", 0x5A, 0, 0x08, 192, 0), 192))
        assert d[:8] == bytes((0, 18, 0, 0x10, 0, 0, 0, 0)) and d[8:11] == b"\x08\x0a\x04"
        for bad in (bytes((0x1A, 0, 0x1C, 0, 192, 0)), bytes((0x1A, 0, 0xC8, 0, 192, 0))):
            a = await ask(h, bad, 192)                            # other page; saved values
            assert sense_of(a) == (0x05, 0x24, 0)
    ro = tmp_path / "ro.img"
    ro.write_bytes(bytes(64 * KIB))
    async with storvsp_channel({0: params(ro, readonly=True, write_cache=False)}) as h:
        await h.init()
        d = data_in(h, await ask(h, bytes((0x1A, 0, 0x08, 0, 192, 0)), 192))
        assert d[2] == 0x90 and d[6] == 0x00                      # WP|DPOFUA, WCE off


async def test_report_luns_and_unsupported_commands(tmp_path: Path, image: Path) -> None:
    other = tmp_path / "l5.img"
    async with storvsp_channel({0: params(image), 5: params(other)}) as h:
        await h.init()
        rl = struct.pack(">BBB3xIBB", 0xA0, 0, 0, 4096, 0, 0)
        d = data_in(h, await ask(h, rl, 4096, lun=5))             # any LUN of the target
        assert d == struct.pack(">I4x", 16) + bytes(8) + bytes((0, 5)) + bytes(6)
        d = data_in(h, await ask(h, rl, 4096, target=1))
        assert d == bytes(8)                                      # another target: none
        for op in (0x5E, 0x4D, 0xC0, 0x3C, 0x15):   # PR IN, LOG SENSE, vendor, READ BUFFER,
            a = await ask(h, bytes((op,)) + bytes(5 if op < 0x20 else 9), 64)  # MODE SELECT
            check(a, SRB_INVALID_REQUEST | AUTOSENSE, CHECK_CONDITION, IO_DEVICE_ERROR)
            assert sense_of(a) == (0x05, 0x20, 0), hex(op)        # INVALID OPCODE


# -- data ------------------------------------------------------------------------------------

async def test_read_write_flush_and_their_errors(tmp_path: Path, image: Path) -> None:
    ro = tmp_path / "ro.img"
    ro.write_bytes(b"R" * (64 * KIB))
    async with storvsp_channel({0: params(image), 1: params(ro, readonly=True)}) as h:
        await h.init()
        h.data(0, 2)[:] = bytes(range(256)) * 32
        a = await ask(h, cdb10(0x2A, 10, 16), 8192, data_in=0)    # WRITE(10) 16 blocks
        check(a, SRB_SUCCESS, 0, SUCCESS)
        assert a.srb.data_transfer_length == 8192
        h.data(0, 2)[:] = bytes(8192)
        a = await ask(h, cdb16(0x88, 10, 16), 8192)               # READ(16)
        assert bytes(h.data(0, 2)) == bytes(range(256)) * 32
        a = await ask(h, cdb10(0x35))                             # SYNCHRONIZE CACHE(10)
        check(a, SRB_SUCCESS, 0, SUCCESS)
        assert image.read_bytes()[5120:5120 + 8192] == bytes(range(256)) * 32
        # more than the buffer, no blocks, past the end: ILLEGAL REQUEST / 0x21. The
        # reference's table gives SRB_STATUS_ERROR for an LBA out of range; OpenVMM's
        # scsidisk (validate_data_cdb) answers INVALID_REQUEST, which is what is followed.
        for cdb, n in ((cdb10(0x28, 0, 17), 8192), (cdb10(0x28, 0, 0), 512),
                       (cdb10(0x28, 2047, 2), 1024), (cdb16(0x88, 2**63, 1), 512)):
            a = await ask(h, cdb, n)
            check(a, SRB_INVALID_REQUEST | AUTOSENSE, CHECK_CONDITION, IO_DEVICE_ERROR)
            assert sense_of(a) == (0x05, 0x21, 0)
        a = await ask(h, cdb10(0x28, 0, 1), 512, data_in=0)      # host may not write it
        assert sense_of(a) == (0x05, 0x24, 0)
        a = await ask(h, cdb10(0x2A, 0, 1), 512, data_in=0, lun=1)  # write-protected
        check(a, SRB_ERROR | AUTOSENSE, CHECK_CONDITION, IO_DEVICE_ERROR)
        assert sense_of(a) == (0x07, 0x27, 0)
        a = await ask(h, bytes((0x03, 0, 0, 0, 18, 0)), 18, lun=1)   # REQUEST SENSE
        assert data_in(h, a)[2] & 0x0F == 0x07 and data_in(h, a)[12] == 0x27
    assert ro.read_bytes() == b"R" * (64 * KIB)


async def test_unmap_and_write_same(image: Path) -> None:
    image.write_bytes(b"\xee" * (1 << 20))
    async with storvsp_channel({0: params(image)}) as h:
        await h.init()
        unmap = struct.pack(">BB4xBHB", 0x42, 0, 0, 24, 0)
        h.data()[:24] = struct.pack(">HH4xQI4x", 22, 16, 8, 8)   # LBA 8, 8 blocks
        check(await ask(h, unmap, 24, data_in=0), SRB_SUCCESS, 0, SUCCESS)
        h.data()[:24] = struct.pack(">HH4xQI4x", 20, 16, 8, 8)   # data length wrong
        assert sense_of(await ask(h, unmap, 24, data_in=0)) == (0x05, 0x24, 0)
        h.data()[:24] = struct.pack(">HH4xQI4x", 22, 12, 8, 8)   # descriptor length wrong
        assert sense_of(await ask(h, unmap, 24, data_in=0)) == (0x05, 0x00, 0)
        h.data()[:24] = struct.pack(">HH4xQI4x", 22, 16, 2040, 9)   # past the end
        assert sense_of(await ask(h, unmap, 24, data_in=0)) == (0x05, 0x21, 0)
        # WRITE SAME(16) with UNMAP and a zero block: a hole; with data: the block repeated
        h.data()[:512] = bytes(512)
        check(await ask(h, cdb16(0x93, 32, 4, 0x08), 512, data_in=0), SRB_SUCCESS, 0,
              SUCCESS)
        h.data()[:512] = b"\x5a" * 512
        check(await ask(h, cdb16(0x93, 64, 3), 512, data_in=0), SRB_SUCCESS, 0, SUCCESS)
        await ask(h, cdb10(0x35))
    d = image.read_bytes()
    assert d[8 * 512:16 * 512] == bytes(4096) and d[16 * 512:17 * 512] == b"\xee" * 512
    assert d[32 * 512:36 * 512] == bytes(2048)
    assert d[64 * 512:67 * 512] == b"\x5a" * 1536 and d[67 * 512:68 * 512] == b"\xee" * 512


# -- what is malformed is answered, not trusted ---------------------------------------------------

async def test_malformed_srbs_are_answered_invalid_parameter(image: Path) -> None:
    async with storvsp_channel({0: params(image)}) as h:
        await h.init()
        before = bytes(h.memory.view(h.ring_pfn + 16, 4)) + bytes(h.data(8, 4))
        srb = sv.Srb(cdb_length=16, data_in=1, data_transfer_length=512,
                     cdb=cdb10(0x28, 0, 1)).pack()
        ok = sv.pack_packet(3, srb, flags=1)
        ok3 = sv.pack_packet(3, sv.Srb(cdb_length=16, data_in=1, data_transfer_length=3 * 4096,
                                       cdb=cdb10(0x28, 0, 24)).pack(), flags=1)
        cases: list[tuple[bytes, bytes]] = [
            (ok, b""),                                                  # data but no range
            (ok[:12 + 24], b""),                                        # CDB past the packet
            (sv.pack_packet(3, sv.Srb(cdb_length=17, cdb=bytes(16)).pack(), flags=1), b""),
            (sv.pack_packet(3, sv.Srb(cdb_length=6, cdb=cdb10(0x28)).pack(), flags=1), b""),
            (ok, pack_gpa_direct([GpaRange(256, 0, (h.data_pfn,))])),  # shorter than dtl
            (ok, pack_gpa_direct([GpaRange(512, 0, (h.ring_pfn + 1,))])),   # the ring
            (ok, pack_gpa_direct([GpaRange(512, 0, (0,))])),            # frame 0
            # the ends of a run of three frames, frame 0 between them (not D+9)
            (ok3, pack_gpa_direct([GpaRange(3 * 4096, 0, (h.data_pfn + 8, 0,
                                                           h.data_pfn + 10))])),
            (ok, pack_gpa_direct([GpaRange(512, 0, (h.memory.nr_frames,))])),  # outside
            (ok, pack_gpa_direct([GpaRange(512, 0, (h.data_pfn,))]) +
             b"\0" * 8),                                                # bytes left over
            (ok, pack_gpa_direct([GpaRange(512, 0, (h.data_pfn,)),
                                  GpaRange(512, 0, (h.data_pfn + 1,))])),   # two ranges
            (ok, struct.pack("<II", 0, 1) + struct.pack("<II", 512, 5000) +
             struct.pack("<Q", h.data_pfn)),                            # offset past page
        ]
        for i, (payload, header) in enumerate(cases):
            ptype = PacketType.DATA_USING_GPA_DIRECT if header else PacketType.DATA_INBAND
            h.send(payload, ptype=ptype, trans_id=100 + i, header=header)
        answers = await h.answers(len(cases))
        assert [a.trans_id for a in answers] == [100 + i for i in range(len(cases))]
        for a in answers:
            assert (a.operation, a.status) == (COMPLETE_IO, INVALID_PARAMETER)
            assert a.srb.srb_status == SRB_INVALID_REQUEST and a.srb.cdb == bytes(20)
        # the ring page named and the pages around were not written
        assert bytes(h.memory.view(h.ring_pfn + 16, 4)) + bytes(h.data(8, 4)) == before
        check(await ask(h, bytes(6)), SRB_SUCCESS, 0, SUCCESS)   # and it serves on


async def test_unanswerable_packets_are_dropped_and_logged(image: Path, logs: Logs) -> None:
    logs.expect(r"packet of type 11 dropped")
    logs.expect(r"asks for no completion; dropped")
    async with storvsp_channel({0: params(image)}) as h:
        await h.init()
        h.send(sv.pack_packet(3, flags=1), ptype=0x0B, trans_id=7)          # a completion
        h.send(sv.pack_packet(3, flags=1), flags=0, trans_id=8)             # no completion
        check(await ask(h, bytes(6), trans_id=9), SRB_SUCCESS, 0, SUCCESS)
        assert h.model.dropped == 2


async def test_hot_add_and_remove_send_enumerate_bus(tmp_path: Path, image: Path) -> None:
    async with storvsp_channel({0: params(image)}) as h:
        await h.init()
        await h.model.add_lun(3, params(tmp_path / "new.img"))
        (a,) = await h.answers(1)
        assert (a.type, a.flags, a.trans_id, a.operation) == (PacketType.DATA_INBAND, 0, 0, 11)
        assert len(a.payload) == 64
        d = data_in(h, await ask(h, struct.pack(">BBB3xIBB", 0xA0, 0, 0, 4096, 0, 0), 4096))
        assert d[:4] == struct.pack(">I", 16) and d[17] == 3
        await h.model.remove_lun(3)
        (a,) = await h.answers(1)
        assert a.operation == 11
        check(await ask(h, bytes(6), lun=3), SRB_INVALID_LUN, CHECK_CONDITION,
              DEVICE_DOES_NOT_EXIST)


async def test_a_guest_cannot_queue_unbounded_work_behind_a_busy_disk(image: Path) -> None:
    """While a disk's I/O thread is busy, a guest that keeps posting UNMAPs of 4095
    descriptors each (all a parameter list can carry) must not make the host hold an unbounded
    number of image requests: the host stops taking packets off the ring at a bound (as
    OpenVMM's storvsp stops at its I/O queue depth), the ring fills, and what waits there
    is served once the disk moves again, every request answered once."""
    from backends.storage.worker import IoWorker
    from vbusfs.platform.memory import PAGE_SIZE

    image.write_bytes(bytes(1 << 20))
    held: list[tuple[object, ...]] = []
    real_submit = IoWorker.submit

    def hold(self: IoWorker, fn: object, args: object, report: object) -> None:
        held.append((self, fn, args, report))

    descriptors = 4095                  # the most a 16-bit parameter list holds
    alloc = 8 + 16 * descriptors
    async with storvsp_channel({0: params(image)}) as h:
        await h.init()
        model = h.model
        disk = model.luns[0]
        params_list = bytearray(struct.pack(">HH4x", alloc - 2, alloc - 8))
        for i in range(descriptors):
            params_list += struct.pack(">QI4x", i % 2048, 1)
        h.data(0, 16)[:alloc] = params_list
        cdb = struct.pack(">BB4xBHB", 0x42, 0, 0, alloc, 0)
        srb = sv.Srb(cdb_length=10, data_in=0, data_transfer_length=alloc, cdb=cdb)
        payload = sv.pack_packet(sv.Operation.EXECUTE_SRB, srb.pack(), flags=1)
        ext = pack_gpa_direct([GpaRange(alloc, 0, tuple(range(h.data_pfn,
                                                               h.data_pfn + 16)))])
        IoWorker.submit = hold                      # type: ignore[method-assign]
        sent = most = 0
        try:
            for _ in range(40):
                written, _ = h.to_host.write(PacketType.DATA_USING_GPA_DIRECT, 1, sent + 1,
                                             payload, ext)
                if not written:
                    break
                sent += 1
                h.chan.doorbell.ring()
                await trio.sleep(0)
                most = max(most, sum(len(q) for q in model._queues.values()))
            busy = disk.executor is not None and disk.executor.busy
        finally:
            IoWorker.submit = real_submit           # type: ignore[method-assign]
            for w, fn, args, report in held:       # the disk moves again
                real_submit(w, fn, args, report)  # type: ignore[arg-type]
            held.clear()
        assert busy and most <= 4 * descriptors + 2048, most
        # everything sent is answered, once each
        answers = await h.answers(sent, timeout=60)
        assert sorted(a.trans_id for a in answers) == list(range(1, sent + 1))
        assert all(a.srb.srb_status == SRB_SUCCESS for a in answers)
        check(await ask(h, cdb10(0x00)), SRB_SUCCESS, 0, SUCCESS)
        assert PAGE_SIZE == 4096
