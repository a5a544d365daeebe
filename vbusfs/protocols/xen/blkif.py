"""Xen block interface (``xen/include/public/io/blkif.h``), x86_64 ABI.

Slot size 112 bytes; requests: read/write/barrier/flush (``blkif_request``), discard
(``blkif_request_discard``), indirect (``blkif_request_indirect``); responses 16 bytes
(reference/protocols.md §1.2–1.3). Checked against the real header by
tests/test_blkif_layout.py.
"""

from __future__ import annotations

import array
import enum
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "Op", "Status", "SLOT_SIZE", "MAX_SEGMENTS_PER_REQUEST", "MAX_INDIRECT_PAGES",
    "SEGMENTS_PER_INDIRECT_PAGE", "SECTOR", "VDISK_CDROM", "VDISK_REMOVABLE", "VDISK_READONLY",
    "DISCARD_SECURE", "Segment", "SEGMENT", "pack_segments", "unpack_segments",
    "REQUEST_HEAD", "DISCARD", "INDIRECT", "RESPONSE",
]


class Op(enum.IntEnum):
    READ = 0
    WRITE = 1
    WRITE_BARRIER = 2
    FLUSH_DISKCACHE = 3
    RESERVED_1 = 4
    DISCARD = 5
    INDIRECT = 6


class Status(enum.IntEnum):
    OKAY = 0
    ERROR = -1
    EOPNOTSUPP = -2


SLOT_SIZE = 112
MAX_SEGMENTS_PER_REQUEST = 11
MAX_INDIRECT_PAGES = 8
SEGMENTS_PER_INDIRECT_PAGE = 4096 // 8
SECTOR = 512                  # sector_number is always in 512-byte units
VDISK_CDROM, VDISK_REMOVABLE, VDISK_READONLY = 0x1, 0x2, 0x4
DISCARD_SECURE = 0x1

#: blkif_request_segment: gref u32, first_sect u8, last_sect u8, 2 pad
SEGMENT = struct.Struct("<IBBxx")
#: blkif_request up to seg[]: operation, nr_segments, handle, pad, id, sector_number
REQUEST_HEAD = struct.Struct("<BBH4xQQ")
#: blkif_request_discard: operation, flag, handle, pad, id, sector_number, nr_sectors
DISCARD = struct.Struct("<BBH4xQQQ")
#: blkif_request_indirect: operation, indirect_op, nr_segments, pad, id, sector_number,
#: handle, pad, indirect_grefs[8], pad
INDIRECT = struct.Struct("<BBH4xQQH2x8I4x")
#: blkif_response: id, operation, pad, status (int16), pad
RESPONSE = struct.Struct("<QBxh4x")


def pack_segments(dst: memoryview, refs: Sequence[int], nsectors: int) -> None:
    """Write ``len(refs)`` segments into ``dst``, one page each from sector 0, covering
    ``nsectors`` 512-byte sectors (only the last page may be partial): the layout every
    request of this frontend uses. One array operation, not a ``struct`` call per segment
    (a 1 MiB request has 256)."""
    n = len(refs)
    per_page = 4096 // SECTOR
    if n == 1:                      # a 4 KiB request: one struct call beats the arrays
        SEGMENT.pack_into(dst, 0, refs[0], 0, nsectors - 1)
        return
    words = array.array("I", bytes(8 * n))
    words[0::2] = array.array("I", refs)
    meta = array.array("I", [(per_page - 1) << 8]) * n      # first_sect 0, last_sect 7
    meta[-1] = (nsectors - (n - 1) * per_page - 1) << 8
    words[1::2] = meta
    if sys.byteorder != "little":
        words.byteswap()
    dst[:8 * n] = memoryview(words).cast("B")


def unpack_segments(src: bytes | bytearray | memoryview, n: int) -> tuple[list[int], bytes, bytes]:
    """The grant refs, first sectors and last sectors of ``n`` segments at the start of
    ``src`` (pad bytes ignored, as Linux does)."""
    if n == 1:
        ref, first, last = SEGMENT.unpack_from(src)
        return [ref], bytes((first,)), bytes((last,))
    raw = bytes(src[:8 * n])
    words = array.array("I")
    words.frombytes(raw)
    if sys.byteorder != "little":
        words.byteswap()
    return words[0::2].tolist(), raw[4::8], raw[5::8]


@dataclass(frozen=True)
class Segment:
    gref: int
    first_sect: int
    last_sect: int

    @property
    def nbytes(self) -> int:
        return (self.last_sect - self.first_sect + 1) * SECTOR
