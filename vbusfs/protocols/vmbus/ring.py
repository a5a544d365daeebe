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
import functools
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "PAGE_SIZE", "RingError", "PacketType", "PACKET_DESCRIPTOR", "COMPLETION_REQUESTED",
    "Packet", "Ring", "init_ring", "GpaRange", "pack_gpa_direct", "pack_gpa_direct_one",
    "parse_gpa_direct", "parse_gpa_direct_one",
]

PAGE_SIZE = 4096
_U32 = struct.Struct("<I")
PACKET_DESCRIPTOR = struct.Struct("<HHHHQ")  # type, offset8, len8, flags, trans_id
_TRAILER = struct.Struct("<Q")
_DESC_SIZE, _TRAILER_SIZE = PACKET_DESCRIPTOR.size, _TRAILER.size
_DESC_UNPACK = PACKET_DESCRIPTOR.unpack_from


@functools.lru_cache(maxsize=256)
def _packet_struct(hlen: int, plen: int) -> struct.Struct:
    """A whole packet with a ``hlen``-byte descriptor extension and a ``plen``-byte
    payload: descriptor, extension, payload, zero padding to 8 bytes, trailer — written
    with one ``pack_into`` (a ring sees few packet shapes)."""
    pad = -(_DESC_SIZE + hlen + plen) % 8
    return struct.Struct(f"<HHHHQ{hlen}s{plen}s{pad}xQ")


@functools.lru_cache(maxsize=256)
def _parts_struct(off: int, plen: int) -> struct.Struct:
    """The descriptor extension and the payload (padding included) of a packet whose
    ``offset8 * 8`` is ``off`` and ``len8 * 8`` is ``plen``, read (copied) at once."""
    return struct.Struct(f"<{off - _DESC_SIZE}s{plen - off}s")
WRITE_INDEX, READ_INDEX, INTERRUPT_MASK, PENDING_SEND_SZ, FEATURE_BITS = 0, 4, 8, 12, 64
FEAT_PENDING_SEND_SZ = 1
_FEATURE_BITS_AT = FEATURE_BITS // 4     # in the header's u32 view
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
    """One packet read off a ring (a named tuple: one is made per packet, on the I/O path,
    and a frozen dataclass costs a ``setattr`` per field)."""

    type: int
    flags: int
    trans_id: int
    header: bytes   # descriptor bytes past the 16-byte vmpacket_descriptor (offset8*8 - 16)
    payload: bytes  # len8*8 - offset8*8 bytes, padding included (what vmbus_recvpacket hands on)


#: a Packet from its five fields without the named tuple's Python-level ``__new__``
_new_packet = tuple.__new__


@dataclass(frozen=True)
class GpaRange:
    """One ``vmbus_multipage_buffer``: ``length`` bytes starting ``offset`` bytes into the
    first of ``pfns`` (4 KiB guest frames, one per page the bytes touch)."""

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


@functools.cache
def _gpa_one(npfn: int) -> struct.Struct:
    """The descriptor extension of one range of ``npfn`` frames, as one struct."""
    return struct.Struct(f"<IIII{npfn}Q")


def pack_gpa_direct_one(length: int, offset: int, pfns: Sequence[int]) -> bytes:
    """:func:`pack_gpa_direct` for the common case of one range, without building it (the
    per-request path of a disk)."""
    return _gpa_one(len(pfns)).pack(0, 1, length, offset, *pfns)


def parse_gpa_direct_one(header: bytes) -> tuple[int, int, tuple[int, ...]] | None:
    """The range of a GPA-direct descriptor extension that announces exactly one and is
    exactly as long as that range needs (the per-request path of a disk), with the checks
    :func:`parse_gpa_direct` makes, as (length, offset, pfns) — a :class:`GpaRange`'s
    fields; None when the extension is anything else (then
    :func:`parse_gpa_direct` says what is wrong with it, or parses it)."""
    n = len(header)
    if n < _GPA_ONE.size:
        return None
    _reserved, count, length, offset = _GPA_ONE.unpack_from(header)
    if count != 1 or offset >= PAGE_SIZE:
        return None
    npfn = (offset + length + PAGE_SIZE - 1) // PAGE_SIZE
    if n != _GPA_ONE.size + 8 * npfn:
        return None
    return length, offset, _gpa_one(npfn).unpack(header)[4:]


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
        hdr = self._hdr                                     # _indices, inline: once a request
        w, r = int(hdr[0]), int(hdr[1])
        dsize = self.dsize
        if w >= dsize or r >= dsize or w % 8 or r % 8:
            raise RingError(f"ring indices out of range: write {w}, read {r}, size {dsize}")
        return dsize - (w - r) if w >= r else r - w

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
        A packet written clears ``pending_send_sz`` and the out-full flag (the writer,
        if it waited for room, has it now).
        """
        hlen, plen = len(header), len(payload)
        if hlen % 8:
            raise ValueError("descriptor extension must be a multiple of 8 bytes")
        off = _DESC_SIZE + hlen
        len8 = (off + plen + 7) // 8
        if len8 > 0xFFFF:
            raise ValueError(f"packet of {len8 * 8} bytes is too long for len8")
        pktlen = len8 * 8
        total = pktlen + _TRAILER_SIZE
        hdr = self._hdr
        old_write, r = int(hdr[0]), int(hdr[1])
        dsize = self.dsize
        if old_write >= dsize or r >= dsize or old_write % 8 or r % 8:
            raise RingError(f"ring indices out of range: write {old_write}, read {r}, "
                            f"size {dsize}")
        room = dsize - (old_write - r) if old_write >= r else r - old_write
        if room <= total:
            return False, False
        if old_write + total <= dsize:
            # no wrap: each part straight into the ring, no packet assembled first
            _packet_struct(hlen, plen).pack_into(
                self.view, PAGE_SIZE + old_write, ptype, off // 8, len8, flags, trans_id,
                header, payload, old_write << 32)
            new_write = (old_write + total) % dsize
        else:
            data = (PACKET_DESCRIPTOR.pack(ptype, off // 8, len8, flags, trans_id) + header +
                    payload + bytes(pktlen - off - plen) + _TRAILER.pack(old_write << 32))
            new_write = self._copy_in(old_write, data)
        hdr[0] = new_write
        if self.out_full_flag or hdr[3]:
            # the writer is not blocked any more: what it set while it waited is cleared
            self.out_full_flag = False
            hdr[3] = 0                                      # PENDING_SEND_SZ
        signal = hdr[2] == 0 and old_write == r
        return True, signal

    # -- consumer --------------------------------------------------------------------------
    def read(self) -> Packet | None:
        """The next packet, or None when the ring is empty. Nothing is published until
        :meth:`commit_read`."""
        w, r = self._indices()
        if self.priv_read_index is None:
            self.priv_read_index = r
            self._batch_start = r
        pos = self.priv_read_index
        if pos == w:
            return None
        pkt, self.priv_read_index = self._packet_at(pos, w)
        return pkt

    def read_batch(self, limit: int = 0) -> list[Packet]:
        """Every packet in the ring (at most ``limit`` when that is not 0), as :meth:`read`
        one at a time would return them, with the indices read once. Nothing is published
        until :meth:`commit_read`."""
        w, r = self._indices()
        if self.priv_read_index is None:
            self.priv_read_index = r
            self._batch_start = r
        pos = self.priv_read_index
        out: list[Packet] = []
        while pos != w:
            pkt, pos = self._packet_at(pos, w)
            self.priv_read_index = pos
            out.append(pkt)
            if len(out) == limit:
                break
        return out

    def begin_batch(self, limit: int = 0) -> tuple[list[Packet], bool]:
        """``hv_begin_read``, :meth:`read_batch` and :meth:`commit_read` in one call (the
        drain of a doorbell handler): interrupts masked, the packets read, the read
        index published; with :meth:`commit_read`'s answer. :meth:`end_batch` unmasks."""
        hdr = self._hdr
        hdr[2] = 1                                          # INTERRUPT_MASK
        w, r = int(hdr[0]), int(hdr[1])
        dsize = self.dsize
        if w >= dsize or r >= dsize or w % 8 or r % 8:
            raise RingError(f"ring indices out of range: write {w}, read {r}, size {dsize}")
        if self.priv_read_index is None:
            self.priv_read_index = r
            self._batch_start = r
        pos = self.priv_read_index
        out: list[Packet] = []
        packet_at = self._packet_at
        while pos != w:                                     # read_batch, inline
            pkt, pos = packet_at(pos, w)
            self.priv_read_index = pos
            out.append(pkt)
            if len(out) == limit:
                break
        return out, self.commit_read()

    def end_batch(self) -> bool:
        """``hv_end_read``: interrupts unmasked; True when packets arrived meanwhile (the
        writer saw the mask and did not signal: the reader must look again)."""
        hdr = self._hdr
        hdr[2] = 0
        w, r = int(hdr[0]), int(hdr[1])
        dsize = self.dsize
        if w >= dsize or r >= dsize or w % 8 or r % 8:
            raise RingError(f"ring indices out of range: write {w}, read {r}, size {dsize}")
        return w != r

    def _packet_at(self, pos: int, w: int) -> tuple[Packet, int]:
        """The packet at ``pos`` (not ``w``: the ring is not empty there), every length
        in its descriptor checked against the bytes the writer has written, and the
        position after it."""
        dsize = self.dsize
        avail = w - pos if w >= pos else dsize - pos + w
        if avail < _DESC_SIZE + _TRAILER_SIZE:
            raise RingError(f"{avail} bytes in ring: less than a packet")
        base = PAGE_SIZE + pos
        if pos + _DESC_SIZE <= dsize:                       # no wrap: read it in place
            ptype, offset8, len8, flags, trans_id = _DESC_UNPACK(self.view, base)
        else:
            ptype, offset8, len8, flags, trans_id = PACKET_DESCRIPTOR.unpack(
                self._copy_out(pos, _DESC_SIZE))
        plen = len8 * 8
        off = offset8 * 8
        if off < _DESC_SIZE or offset8 > len8 or plen + 8 > avail:
            raise RingError(f"bad packet at {pos}: offset8 {offset8}, len8 {len8}, "
                            f"{avail} bytes available")
        after = (pos + plen + _TRAILER_SIZE) % dsize
        if pos + plen <= dsize:                             # one copy of each part
            header, payload = _parts_struct(off, plen).unpack_from(self.view,
                                                                   base + _DESC_SIZE)
            return _new_packet(Packet, (ptype, flags, trans_id, header, payload)), after
        body = self._copy_out(pos, plen)
        return Packet(ptype, flags, trans_id, body[_DESC_SIZE:off], body[off:]), after

    def commit_read(self) -> bool:
        """Publish the read index (``hv_pkt_iter_close``). Returns True when the producer
        was blocked on ``pending_send_sz`` and now has room: it must be signalled."""
        if self.priv_read_index is None:
            return False
        start = self._batch_start
        hdr = self._hdr
        hdr[1] = self.priv_read_index                       # READ_INDEX
        self.priv_read_index = None
        if not hdr[_FEATURE_BITS_AT] & FEAT_PENDING_SEND_SZ:
            return False
        pending = int(hdr[3])                               # PENDING_SEND_SZ
        if not pending:
            return False
        cur_free = self.bytes_to_write()
        done = (self.read_index - start) % self.dsize
        if cur_free - done > pending:   # it was not blocked before this read
            return False
        return cur_free > pending
