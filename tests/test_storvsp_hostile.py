"""storvsp against a hostile guest: generated packets (hypothesis, more than 10,000 of them)
on a real channel, each example a fresh channel with a writable disk at LUN 0 and a
write-protected one at LUN 1.

What must hold whatever the guest sends (reference/hv-services.md §4.3–4.7):

* nothing crashes and the channel keeps serving (a TEST UNIT READY afterwards succeeds);
* every request that can be answered (in band or GPA-direct, completion requested) is
  answered exactly once, under its own transaction id, as a VM_PKT_COMP carrying a
  COMPLETE_IO packet exactly as long as the request (its SRB part at most 52 bytes); the
  others (other packet types, no completion requested) are dropped and logged;
* an answer's NTSTATUS is the one §4.6 gives its SRB status, sense is there exactly when
  AUTOSENSE_VALID says so, in fixed format, with one of the sense codes of §4.7, a failed
  command moved no data, and no answer claims more data than the request asked for;
* no byte of guest memory outside what a request's single valid page range names (its first
  ``data_transfer_length`` bytes) changes, nor the rings' neighbours; no image changes size,
  the write-protected image does not change at all, and nothing else in its directory does.

The expected outcomes are written from the reference's tables, not taken from storvsp.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import hypothesis
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Logs
from tests.hostile_cases import cases
from tests.storvsp_harness import Harness, params, storvsp_channel
from vbusfs.platform.memory import PAGE_SIZE, GuestMemory
from vbusfs.protocols.vmbus.ring import GpaRange, pack_gpa_direct

MEMORY = GuestMemory(16 << 20)
# §4.6: NTSTATUS by SRB status (the low six bits)
NT_OF_SRB = {0x01: 0, 0x06: 0xC0000185, 0x04: 0xC0000185, 0x12: 0x80000005,
             0x20: 0xC00000C0}
#: §4.7's sense codes (key, ASC), plus ASC 0 for an UNMAP descriptor length Hyper-V refuses
SENSES = {(0x05, 0x20), (0x05, 0x24), (0x05, 0x21), (0x05, 0x26), (0x05, 0x00),
          (0x07, 0x27), (0x03, 0x00)}
STATUSES = {0, 0xC000000D, 0xC0000010, 0xC0000059, 0xC0000184, *NT_OF_SRB.values()}
INIT_RQST = 2**64 - 3
#: opcodes worth aiming at: the ones storvsp implements and some it must refuse
OPCODES = [0x00, 0x03, 0x04, 0x08, 0x0A, 0x12, 0x15, 0x16, 0x17, 0x1A, 0x1B, 0x1E, 0x25,
           0x28, 0x2A, 0x2F, 0x35, 0x41, 0x42, 0x5A, 0x5E, 0x88, 0x8A, 0x8F, 0x91, 0x93,
           0x9E, 0xA0, 0xA8, 0xAA, 0xAF, 0xC0, 0xFF]
PACKETS_SENT = [0]
EXAMPLES = cases(680, per_example=15)           # 15 to 20 packets each: over 10,000

u32 = st.integers(0, 2**32 - 1)
lengths = st.one_of(st.sampled_from([0, 1, 18, 36, 255, 511, 512, 513, 4096, 8192, 65536,
                                     2**32 - 1]), st.integers(0, 70_000))


@st.composite
def cdbs(draw: st.DrawFn) -> bytes:
    op = draw(st.sampled_from(OPCODES) | st.integers(0, 255))
    if draw(st.booleans()):
        return bytes([op]) + draw(st.binary(min_size=15, max_size=15))
    lba = draw(st.sampled_from([0, 1, 8, 2047, 2048, 2**31, 2**32 - 1]) | st.integers(0, 4096))
    n = draw(st.sampled_from([0, 1, 8, 16, 255, 256, 65535]) | st.integers(0, 300))
    flags = draw(st.sampled_from([0, 0x08, 0x01, 0x02, 0x10, 0xFF]))
    if op >> 5 in (4, 5):        # 16- and 12-byte groups
        return struct.pack(">BBQIBB", op, flags, lba, n & 0xFFFFFFFF, 0, 0)
    return struct.pack(">BBIBHBxxxxxx", op, flags, lba & 0xFFFFFFFF, 0, n & 0xFFFF, 0)


RING = -100_000                  # in a generated PFN list: one of the channel's ring pages
Ranges = list[tuple[int, int, list[int]]]
Good = tuple[int, int, tuple[int, ...]] | None
Generated = tuple[int, int, bytes, bytes | Ranges, Good]


@st.composite
def ranges(draw: st.DrawFn) -> tuple[bytes | Ranges, Good]:
    """A descriptor extension: mostly one range over the harness's data pages, sometimes
    a PFN that is not there or is the ring, two ranges, or bytes that mean nothing."""
    shape = draw(st.sampled_from(["good"] * 6 + ["bad pfn", "two", "garbage", "none"]))
    if shape == "garbage":
        raw = draw(st.binary(max_size=40))
        return raw[:len(raw) // 8 * 8], None
    if shape == "none":
        return b"", None
    offset = draw(st.sampled_from([0, 0, 0, 1, 512, 4095]))
    length = draw(st.sampled_from([1, 512, 4096, 8192, 60_000]) |
                  st.integers(1, 64 * PAGE_SIZE - offset))
    n = -(-(offset + length) // PAGE_SIZE)
    first = draw(st.integers(0, 64 - n))
    pfns = [-1 - (first + i) for i in range(n)]
    if shape == "bad pfn":
        pfns[draw(st.integers(0, n - 1))] = draw(st.sampled_from(
            [0, 1 << 40, 2**64 - 1, MEMORY.nr_frames, RING]))
    out: Ranges = [(length, offset, pfns)]
    if shape == "two":
        out.append((512, 0, [-1]))
    return out, (length, offset, tuple(pfns)) if shape == "good" else None


@st.composite
def packets(draw: st.DrawFn) -> Generated:
    """(type, flags, payload, descriptor extension or the ranges to build it from, the one
    well-formed range or None). In a PFN list a negative number is the harness's data page
    −1−n, RING a ring page, anything else itself. Most are EXECUTE_SRBs a disk will look
    into (the right length, a CDB as long as its opcode needs, LUN 0 or 1, a range); the
    rest anything at all."""
    plausible = draw(st.integers(0, 9)) < 7
    cdb = draw(cdbs())
    if plausible:
        ptype, flags, op = draw(st.sampled_from([9, 9, 9, 6])), 1, 3
        cdb_len = {0: 6, 1: 10, 2: 10, 4: 16, 5: 12}.get(cdb[0] >> 5, 16)
        path, target, lun = 0, 0, draw(st.sampled_from([0, 0, 1, 2]))
        dtl = draw(st.sampled_from([0, 512, 4096, 8192]) | st.integers(0, 70_000))
    else:
        ptype = draw(st.sampled_from([6, 9, 0x0B, 1, 7, 8]) | st.integers(0, 0xFFFF))
        flags = draw(st.sampled_from([1, 1, 0, 3]))
        op = draw(st.sampled_from([3, 3, 7, 8, 9, 10, 13, 4, 5, 6, 1, 2, 11, 12, 14, 99,
                                   2**32 - 1]))
        cdb_len = draw(st.sampled_from([6, 10, 12, 16, 0, 1, 17, 255]))
        path, target = draw(st.sampled_from([0, 1, 7])), draw(st.sampled_from([0, 1, 2]))
        lun = draw(st.sampled_from([0, 1, 2, 5, 254, 255]))
        dtl = draw(lengths)
    srb = struct.pack("<HBBBBBBBBBBI", draw(st.sampled_from([0x34, 0x24, 0, 0xFFFF])),
                      draw(st.integers(0, 255)), draw(st.integers(0, 255)), 0, path, target,
                      lun, cdb_len, 0x14, draw(st.sampled_from([0, 1, 1, 2, 3])), 0, dtl)
    srb += cdb + bytes(4) + draw(st.binary(min_size=16, max_size=16))
    payload = struct.pack("<III", op, 1, draw(u32)) + srb
    if not plausible and draw(st.booleans()):
        payload = payload[:draw(st.integers(0, 80))]
    ext: bytes | Ranges = b""
    good: Good = None
    if ptype == 9 or draw(st.booleans()):
        ext, good = draw(ranges())
    return ptype, flags, payload, ext, good


def _materialise(h: Harness, ext: bytes | Ranges) -> bytes:
    """The real descriptor extension for a generated one, against this harness."""
    if isinstance(ext, bytes):
        return ext
    return pack_gpa_direct([GpaRange(length, offset, tuple(
        h.data_pfn + (-1 - p) if RING < p < 0 else h.ring_pfn + 3 if p == RING else p
        for p in pfns)) for length, offset, pfns in ext])


def _allowed(h: Harness, good: tuple[int, int, tuple[int, ...]], dtl: int) -> list[range]:
    """The guest bytes a request with one well-formed range lets the host write: the first
    ``data_transfer_length`` bytes of the range (none when the range is shorter)."""
    length, offset, pfns = good
    if dtl > length:
        return []
    left, at, out = dtl, offset, []
    for p in pfns:
        if left <= 0:
            break
        n = min(PAGE_SIZE - at, left)
        base = (h.data_pfn + (-1 - p)) * PAGE_SIZE + at
        out.append(range(base, base + n))
        left -= n
        at = 0
    return out


async def _example(tmp: Path, pkts: list[Generated], init: bool) -> None:
    rw, ro, other = tmp / "rw.img", tmp / "ro.img", tmp / "other"
    ro_digest = hashlib.sha256(ro.read_bytes()).hexdigest()
    async with storvsp_channel({0: params(rw), 1: params(ro, readonly=True)},
                               memory=MEMORY) as h:
        if init:
            await h.init()
        # the data pages and the 8 after them (the rings come before: they move)
        lo, hi = h.data_pfn * PAGE_SIZE, (h.data_pfn + 72) * PAGE_SIZE
        watched = MEMORY.gpa_view(lo, hi - lo)
        fill = bytes((i * 7 + 3) & 0xFF for i in range(256)) * ((hi - lo) // 256)
        watched[:] = fill
        allowed: list[range] = []
        want: dict[int, int] = {}                              # trans id → request size
        for i, (ptype, flags, payload, header, good) in enumerate(pkts):
            tid = 1000 + i
            if ptype in (6, 9) and flags & 1:
                want[tid] = max(0, min(len(payload) - 12, 52))
            if good is not None and len(payload) >= 28 and ptype == 9:
                dtl = int.from_bytes(payload[24:28], "little")
                allowed += _allowed(h, good, dtl)
            ext = _materialise(h, header)
            written, _ = h.to_host.write(ptype, flags, tid, payload, ext)
            if not written:                                     # ring full: let it drain
                h.chan.doorbell.ring()
                await trio.sleep(0)
                written, _ = h.to_host.write(ptype, flags, tid, payload, ext)
            assert written
            h.chan.doorbell.ring()
            PACKETS_SENT[0] += 1
        answers = await h.answers(len(want))
        for disk in h.model.luns.values():
            assert disk.executor is not None
            await disk.executor.wait_idle()
        await trio.sleep(0)
        h.drain()
        assert not h.got, f"answers nobody asked for: {h.got[:2]}"
        assert sorted(a.trans_id for a in answers) == sorted(want)
        for a in answers:
            size = want[a.trans_id]
            assert (a.type, a.flags) == (0x0B, 0)
            assert len(a.payload) == -(-(12 + size) // 8) * 8
            assert a.operation == 1 and a.status in STATUSES, hex(a.status)
            if size < 16 or a.status in (0xC000000D, 0xC0000010, 0xC0000059, 0xC0000184):
                continue
            srb = a.payload[12:12 + size].ljust(52, b"\0")
            srb_status, scsi_status = srb[2], srb[3]
            dtl = int.from_bytes(srb[12:16], "little")
            if srb_status == 0 and a.status == 0:               # an init answer
                continue
            code = srb_status & 0x3F
            assert code in NT_OF_SRB and a.status == NT_OF_SRB[code], (hex(srb_status),
                                                                      hex(a.status))
            sense = srb[16:36]
            if srb_status & 0x80:
                assert sense[0] == 0x70 and sense[7] == 10 and \
                    (sense[2] & 0x0F, sense[12]) in SENSES, sense.hex()
            else:
                assert sense == bytes(20)
            if code != 0x01:
                assert scsi_status == 0x02 and dtl == 0
        # nothing outside what the requests named was written
        now = bytes(watched)
        ok = bytearray(now)
        for r in allowed:
            ok[r.start - lo:r.stop - lo] = fill[r.start - lo:r.stop - lo]
        assert bytes(ok) == fill, "guest memory outside the named ranges changed"
        del watched
        assert not h.model.broken
        # whatever state the packets left the init in, the sequence gets it to ready
        for op, body in ((7, b""), (9, struct.pack("<HH", 0x0600, 0)), (10, b""), (8, b"")):
            await h.call(struct.pack("<III", op, 1, 0) + body.ljust(52, b"\0"),
                         trans_id=INIT_RQST)
        h.srb(bytes(6), trans_id=7)
        (a,) = await h.answers(1)
        assert a.status == 0 and a.payload[14] == 0x01          # still serving
    assert rw.stat().st_size == ro.stat().st_size == 1 << 20
    assert hashlib.sha256(ro.read_bytes()).hexdigest() == ro_digest
    assert other.read_bytes() == b"untouched"


def hostile_packets(tmp_path: Path, logs: Logs, seed: int | None = None) -> int:
    """Run the generated examples (``seed``: hypothesis's, for a replay); returns the
    number of packets sent."""
    logs.expect(r"dropped \(not a request\)")
    logs.expect(r"asks for no completion; dropped")
    (tmp_path / "rw.img").write_bytes(bytes(1 << 20))
    (tmp_path / "ro.img").write_bytes(b"\x5a" * (1 << 20))
    (tmp_path / "other").write_bytes(b"untouched")

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(pkts=st.lists(packets(), min_size=15, max_size=20), init=st.booleans())
    def run(pkts: list[Generated], init: bool) -> None:
        trio.run(_example, tmp_path, pkts, init)

    start = PACKETS_SENT[0]
    (run if seed is None else hypothesis.seed(seed)(run))()
    return PACKETS_SENT[0] - start


def test_ten_thousand_hostile_packets(tmp_path: Path, logs: Logs) -> None:
    sent = hostile_packets(tmp_path, logs)
    assert sent >= 15 * EXAMPLES, sent
    print(f"{sent} generated packets")
