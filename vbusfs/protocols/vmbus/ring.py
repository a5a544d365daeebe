"""The VMBus ring buffer (``struct hv_ring_buffer``) and its packet framing.

One ring per direction: a 4 KiB header page (``write_index`` @0, ``read_index`` @4,
``interrupt_mask`` @8, ``pending_send_sz`` @12, ``feature_bits`` @64) followed by the data
area. Packets are a 16-byte ``vmpacket_descriptor``, the payload padded to 8 bytes, and an
8-byte trailer holding the writer's previous start index (reference/protocols.md §3.1–3.2).
A GPA-direct packet (``VM_PKT_DATA_USING_GPA_DIRECT``) carries, between the descriptor and
its payload, page ranges of guest memory (``struct vmbus_packet_mpb_array``: reserved u32,
rangecount u32, then per range {len u32, offset u32, pfn u64 × ⌈(offset+len)/4096⌉}):
:func:`pack_gpa_direct` / :func:`parse_gpa_direct`.

The functions here operate on a shared ``memoryview`` and treat every index found in it as
untrusted: a ring whose indices or packet lengths are impossible raises :class:`RingError`
instead of reading outside the data area. Signalling follows Linux ``ring_buffer.c``.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from typing import NamedTuple

__all__ = [
    "PAGE_SIZE", "RingError", "PacketType", "PACKET_DESCRIPTOR", "COMPLETION_REQUESTED",
    "Packet", "Ring", "init_ring", "GpaRange", "pack_gpa_direct", "pack_gpa_direct_one",
    "parse_gpa_direct",
]

PAGE_SIZE = 4096
_U32 = struct.Struct("<I")
PACKET_DESCRIPTOR = struct.Struct("<HHHHQ")  # type, offset8, len8, flags, trans_id
_TRAILER = struct.Struct("<Q")
_DESCRIPTOR_PACK = PACKET_DESCRIPTOR.pack
_DESCRIPTOR_UNPACK_FROM = PACKET_DESCRIPTOR.unpack_from
_TRAILER_PACK = _TRAILER.pack
_ZEROS = bytes(8)                       # a payload's padding: at most 7 bytes
assert PACKET_DESCRIPTOR.size == 16 and _TRAILER.size == 8   # read() uses the numbers
WRITE_INDEX, READ_INDEX, INTERRUPT_MASK, PENDING_SEND_SZ, FEATURE_BITS = 0, 4, 8, 12, 64
FEAT_PENDING_SEND_SZ = 1
COMPLETION_REQUESTED = 1  # VMBUS_DATA_PACKET_FLAG_COMPLETION_REQUESTED


class RingError(Exception):
    """The other side left the ring in a state no correct peer can produce."""


class PacketType(enum.IntEnum):
    INVALID = 0x0
    SYNCH = 0x1
    ADD_XFER_PAGESET = 0x2
    RM_XFER_PAGESET = 0x3
    ESTABLISH_GPADL = 0x4
    TEARDOWN_GPADL = 0x5
    DATA_INBAND = 0x6
    DATA_USING_XFER_PAGES = 0x7
    DATA_USING_GPADL = 0x8
    DATA_USING_GPA_DIRECT = 0x9
    CANCEL_REQUEST = 0xA
    COMP = 0xB
    DATA_USING_ADDITIONAL_PKT = 0xC
    ADDITIONAL_DATA = 0xD


class Packet(NamedTuple):
    """One packet read off a ring. A named tuple rather than a frozen dataclass: one is made
    per packet each way, and building a tuple costs a third of setting five frozen fields."""

    type: int
    flags: int
    trans_id: int
    header: bytes   # descriptor bytes past the 16-byte vmpacket_descriptor (offset8*8 - 16)
    payload: bytes  # len8*8 - offset8*8 bytes, padding included (what vmbus_recvpacket hands on)


class GpaRange(NamedTuple):
    """One ``vmbus_multipage_buffer``: ``length`` bytes starting ``offset`` bytes into the
    first of ``pfns`` (4 KiB guest frames, one per page the bytes touch). A named tuple, as
    :class:`Packet`: a disk request parses one."""

    length: int
    offset: int
    pfns: tuple[int, ...]


_GPA_HEAD = struct.Struct("<II")      # reserved, rangecount
_GPA_RANGE = struct.Struct("<II")     # len, offset
_GPA_ONE = struct.Struct("<IIII")     # the head and one range


def pack_gpa_direct(ranges: list[GpaRange]) -> bytes:
    """The descriptor extension of a GPA-direct packet (what follows the 16-byte
    ``vmpacket_descriptor``; ``offset8`` covers it)."""
    out = [_GPA_HEAD.pack(0, len(ranges))]
    for r in ranges:
        out.append(_GPA_RANGE.pack(r.length, r.offset))
        out.append(struct.pack(f"<{len(r.pfns)}Q", *r.pfns))
    return b"".join(out)


def pack_gpa_direct_one(length: int, offset: int, pfns: Sequence[int]) -> bytes:
    """:func:`pack_gpa_direct` for the common case of one range, without building it (the
    per-request path of a disk)."""
    return _GPA_ONE.pack(0, 1, length, offset) + struct.pack(f"<{len(pfns)}Q", *pfns)


def parse_gpa_direct(header: bytes) -> list[GpaRange]:
    """The ranges of a GPA-direct packet's descriptor extension. Raises ValueError when the
    extension is not exactly the ranges it announces (a range count that runs past it, an
    offset past the first page, bytes left over): untrusted input, checked before use."""
    if len(header) < _GPA_HEAD.size:
        raise ValueError(f"GPA-direct descriptor of {len(header)} bytes: no range count")
    _reserved, count = _GPA_HEAD.unpack_from(header)
    at = _GPA_HEAD.size
    out: list[GpaRange] = []
    for i in range(count):
        if at + _GPA_RANGE.size > len(header):
            raise ValueError(f"GPA range {i} of {count} lies past the descriptor")
        length, offset = _GPA_RANGE.unpack_from(header, at)
        at += _GPA_RANGE.size
        if offset >= PAGE_SIZE:
            raise ValueError(f"GPA range {i}: offset {offset} is past its first page")
        npfn = (offset + length + PAGE_SIZE - 1) // PAGE_SIZE
        if at + 8 * npfn > len(header):
            raise ValueError(f"GPA range {i}: {npfn} PFNs run past the descriptor")
        out.append(GpaRange(length, offset, struct.unpack_from(f"<{npfn}Q", header, at)))
        at += 8 * npfn
    if at != len(header):
        raise ValueError(f"GPA-direct descriptor has {len(header) - at} bytes past its "
                         f"{count} ranges")
    return out


def init_ring(view: memoryview) -> None:
    """What the guest does before creating the GPADL: zero the header, set feat_pending_send_sz."""
    view[:PAGE_SIZE] = bytes(PAGE_SIZE)
    _U32.pack_into(view, FEATURE_BITS, FEAT_PENDING_SEND_SZ)


class Ring:
    """One direction of a channel, seen by one side (the producer or the consumer).

    Only the producer calls :meth:`write`; only the consumer calls :meth:`read` and
    :meth:`commit_read`. The producer-private and consumer-private indices are kept here, so
    both halves of an emulation each hold their own ``Ring`` over the same memory.
    """

    __slots__ = ("view", "dsize", "priv_read_index", "_batch_start", "out_full_flag", "_hdr")

    def __init__(self, view: memoryview) -> None:
        if len(view) < 2 * PAGE_SIZE or len(view) % PAGE_SIZE:
            raise RingError(f"ring of {len(view)} bytes: needs a header page and data pages")
        self.view = view
        self.dsize = len(view) - PAGE_SIZE
        self.priv_read_index: int | None = None
        self._batch_start = 0
        self.out_full_flag = False
        # the header's u32 fields as one native view (little-endian hosts only, as the
        # wire format): each access is an index, not a struct call (the fields are read
        # a dozen times per packet)
        self._hdr = view[:FEATURE_BITS + 4].cast("I")

    # -- header fields -------------------------------------------------------------------
    @property
    def write_index(self) -> int:
        return int(self._hdr[0])

    @property
    def read_index(self) -> int:
        return int(self._hdr[1])

    @property
    def interrupt_mask(self) -> int:
        return int(self._hdr[2])

    @interrupt_mask.setter
    def interrupt_mask(self, value: int) -> None:
        self._hdr[2] = value

    @property
    def pending_send_sz(self) -> int:
        return int(self._hdr[3])

    @pending_send_sz.setter
    def pending_send_sz(self, value: int) -> None:
        self._hdr[3] = value

    @property
    def feature_bits(self) -> int:
        return int(self._hdr[FEATURE_BITS // 4])

    def _set(self, off: int, value: int) -> None:
        self._hdr[off // 4] = value

    def _indices(self) -> tuple[int, int]:
        hdr = self._hdr
        w, r = int(hdr[0]), int(hdr[1])
        if w >= self.dsize or r >= self.dsize or w % 8 or r % 8:
            raise RingError(f"ring indices out of range: write {w}, read {r}, size {self.dsize}")
        return w, r

    # -- space accounting (hv_get_bytes_to_read / hv_get_bytes_to_write) ----------------
    def bytes_to_read(self) -> int:
        w, r = self._indices()
        return w - r if w >= r else self.dsize - r + w

    def bytes_to_write(self) -> int:
        w, r = self._indices()
        return self.dsize - (w - r) if w >= r else r - w

    # -- data area helpers ---------------------------------------------------------------
    def _copy_in(self, pos: int, data: bytes) -> int:
        n = len(data)
        first = min(n, self.dsize - pos)
        base = PAGE_SIZE + pos
        self.view[base:base + first] = data[:first]
        if first < n:
            self.view[PAGE_SIZE:PAGE_SIZE + n - first] = data[first:]
        return (pos + n) % self.dsize

    def _copy_out(self, pos: int, n: int) -> bytes:
        first = min(n, self.dsize - pos)
        base = PAGE_SIZE + pos
        out = bytes(self.view[base:base + first])
        if first < n:
            out += bytes(self.view[PAGE_SIZE:PAGE_SIZE + n - first])
        return out

    # -- producer --------------------------------------------------------------------------
    def write(self, ptype: int, flags: int, trans_id: int, payload: bytes,
              header: bytes = b"") -> tuple[bool, bool]:
        """Write one packet. Returns ``(written, signal)``.

        ``written`` is False when the ring has no room (the writer must never fill it
        exactly: ``r == w`` means empty); ``signal`` says whether the consumer must be
        interrupted (it had masked nothing and the ring was empty before this packet).
        """
        if len(header) % 8:
            raise ValueError("descriptor extension must be a multiple of 8 bytes")
        offset8 = (PACKET_DESCRIPTOR.size + len(header)) // 8
        len8 = (offset8 * 8 + len(payload) + 7) // 8
        if len8 > 0xFFFF:
            raise ValueError(f"packet of {len8 * 8} bytes is too long for len8")
        total = len8 * 8 + _TRAILER.size
        hdr = self._hdr
        dsize = self.dsize
        old_write, r = hdr[0], hdr[1]
        if old_write >= dsize or r >= dsize or (old_write | r) & 7:
            raise RingError(f"ring indices out of range: write {old_write}, read {r}, "
                            f"size {dsize}")
        room = dsize - (old_write - r) if old_write >= r else r - old_write
        if room <= total:
            return False, False
        pad = len8 * 8 - offset8 * 8 - len(payload)
        data = (_DESCRIPTOR_PACK(ptype, offset8, len8, flags, trans_id) + header + payload
                + _ZEROS[:pad] + _TRAILER_PACK(old_write << 32))
        new_write = self._copy_in(old_write, data)
        hdr[0] = new_write
        signal = hdr[2] == 0 and old_write == r
        return True, signal

    # -- consumer --------------------------------------------------------------------------
    def read(self) -> Packet | None:
        """The next packet, or None when the ring is empty. Nothing is published until
        :meth:`commit_read`."""
        # the indices checked inline, as _indices does (this runs twice per packet)
        hdr = self._hdr
        dsize = self.dsize
        w, r = hdr[0], hdr[1]
        if w >= dsize or r >= dsize or (w | r) & 7:
            raise RingError(f"ring indices out of range: write {w}, read {r}, size {dsize}")
        pos = self.priv_read_index
        if pos is None:
            self.priv_read_index = self._batch_start = pos = r
        avail = w - pos if w >= pos else dsize - pos + w
        if avail == 0:
            return None
        if avail < 24:                     # a descriptor and a trailer
            raise RingError(f"{avail} bytes in ring: less than a packet")
        base = PAGE_SIZE + pos
        view = self.view
        if pos + 16 <= dsize:              # no wrap: read the descriptor in place
            ptype, offset8, len8, flags, trans_id = _DESCRIPTOR_UNPACK_FROM(view, base)
        else:
            ptype, offset8, len8, flags, trans_id = PACKET_DESCRIPTOR.unpack(
                self._copy_out(pos, 16))
        plen = len8 * 8
        off = offset8 * 8
        if off < 16 or offset8 > len8 or plen + 8 > avail:
            raise RingError(f"bad packet at {pos}: offset8 {offset8}, len8 {len8}, "
                            f"{avail} bytes available")
        self.priv_read_index = (pos + plen + 8) % dsize
        if pos + plen <= dsize:                             # one copy of each part
            return Packet(ptype, flags, trans_id, bytes(view[base + 16:base + off]),
                          bytes(view[base + off:base + plen]))
        body = self._copy_out(pos, plen)
        return Packet(ptype, flags, trans_id, body[16:off], body[off:])

    def read_batch(self, out: list[Packet], limit: int = 0) -> None:
        """``hv_begin_read`` (interrupts masked), then :meth:`read` into ``out`` until the
        ring is empty or ``out`` holds ``limit`` packets (0: no limit)."""
        self._hdr[2] = 1                       # INTERRUPT_MASK
        read = self.read
        while (pkt := read()) is not None:
            out.append(pkt)
            if len(out) == limit:
                return

    def end_read(self) -> int:
        """``hv_end_read``: interrupts unmasked, then the bytes still to read (a write that
        raced the mask: the reader drains again instead of waiting for a signal)."""
        self._hdr[2] = 0
        return self.bytes_to_read()

    def commit_read(self) -> bool:
        """Publish the read index (``hv_pkt_iter_close``). Returns True when the producer
        was blocked on ``pending_send_sz`` and now has room: it must be signalled."""
        if self.priv_read_index is None:
            return False
        start = self._batch_start
        hdr = self._hdr
        hdr[1] = self.priv_read_index          # READ_INDEX
        self.priv_read_index = None
        if not hdr[FEATURE_BITS // 4] & FEAT_PENDING_SEND_SZ:
            return False
        pending = hdr[3]                       # PENDING_SEND_SZ
        if not pending:
            return False
        cur_free = self.bytes_to_write()
        done = (self.read_index - start) % self.dsize
        if cur_free - done > pending:   # it was not blocked before this read
            return False
        return cur_free > pending
