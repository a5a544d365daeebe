"""The split virtqueue (virtio 1.x §2.7, ``virtio_ring.h``; reference/protocols.md §2.1).

Three areas in guest memory, each written by one side: the descriptor table and the
available ring by the driver, the used ring by the device. Indices are free-running u16
counters; ``vring_need_event`` decides notifications when EVENT_IDX is negotiated.
"""

from __future__ import annotations

import struct

__all__ = ["DESC", "DESC_F_NEXT", "DESC_F_WRITE", "DESC_F_INDIRECT", "AVAIL_F_NO_INTERRUPT",
           "USED_F_NO_NOTIFY", "MAX_QUEUE_SIZE", "DESC_ALIGN", "AVAIL_ALIGN", "USED_ALIGN",
           "LEGACY_ALIGN", "desc_size", "avail_size", "used_size", "used_event_offset",
           "avail_event_offset", "legacy_layout", "need_event", "USED_ELEM"]

#: ``struct vring_desc``: addr u64, len u32, flags u16, next u16 (16 bytes)
DESC = struct.Struct("<QIHH")
#: ``struct vring_used_elem``: id u32, len u32
USED_ELEM = struct.Struct("<II")

DESC_F_NEXT = 1
DESC_F_WRITE = 2            # device-writable buffer
DESC_F_INDIRECT = 4         # the buffer is a table of descriptors
AVAIL_F_NO_INTERRUPT = 1    # driver → device: don't interrupt (without EVENT_IDX)
USED_F_NO_NOTIFY = 1        # device → driver: don't kick (without EVENT_IDX)
MAX_QUEUE_SIZE = 32768

DESC_ALIGN, AVAIL_ALIGN, USED_ALIGN = 16, 2, 4    # virtio 1.x §2.7 alignment requirements
LEGACY_ALIGN = 4096                               # VIRTIO_PCI_VRING_ALIGN


def desc_size(qsz: int) -> int:
    return 16 * qsz


def avail_size(qsz: int) -> int:
    """flags, idx, ring[qsz], used_event."""
    return 6 + 2 * qsz


def used_size(qsz: int) -> int:
    """flags, idx, ring[qsz] of {id, len}, avail_event."""
    return 6 + 8 * qsz


def used_event_offset(qsz: int) -> int:
    """Of ``used_event`` in the available ring (the driver's interrupt threshold)."""
    return 4 + 2 * qsz


def avail_event_offset(qsz: int) -> int:
    """Of ``avail_event`` in the used ring (the device's kick threshold)."""
    return 4 + 8 * qsz


def legacy_layout(qsz: int, align: int = LEGACY_ALIGN) -> tuple[int, int, int]:
    """``vring_init``: the one contiguous legacy ring — offsets of the available and used
    rings from its start, and its total size (``vring_size``)."""
    avail = desc_size(qsz)
    used = (avail + avail_size(qsz) + align - 1) // align * align
    return avail, used, used + used_size(qsz)


def need_event(event: int, new: int, old: int) -> bool:
    """``vring_need_event``: whether moving an index from ``old`` to ``new`` crosses the
    other side's ``event`` threshold (all u16, wrapping)."""
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF
