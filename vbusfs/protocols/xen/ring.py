"""The Xen shared ring (``xen/include/public/io/ring.h``) over a shared memoryview.

Layout: ``req_prod`` @0, ``req_event`` @4, ``rsp_prod`` @8, ``rsp_event`` @12, 48 bytes of
padding, then ``ring[]`` at 64. The number of entries is (bytes − 64) / slot size rounded
*down* to a power of two; indices are free-running unsigned 32-bit counters, so every
difference is taken modulo 2**32 (reference/protocols.md §1.1).
"""

from __future__ import annotations

import struct
import sys

__all__ = ["SRING_HEADER", "ring_size", "FrontRing", "BackRing", "sring_init", "idx"]

SRING_HEADER = 64
_U32 = struct.Struct("<I")
REQ_PROD, REQ_EVENT, RSP_PROD, RSP_EVENT = 0, 4, 8, 12
MASK32 = 0xFFFFFFFF


def idx(value: int) -> int:
    """A ring index as RING_IDX (unsigned 32-bit)."""
    return value & MASK32


def ring_size(nbytes: int, slot: int) -> int:
    """``__CONST_RING_SIZE``: entries in a ring of ``nbytes`` with ``slot``-byte entries."""
    raw = (nbytes - SRING_HEADER) // slot
    if raw < 1:
        raise ValueError(f"{nbytes} bytes hold no {slot}-byte slot")
    return 1 << (raw.bit_length() - 1)


def sring_init(view: memoryview) -> None:
    """``SHARED_RING_INIT`` (frontend only): producers 0, events 1, padding zeroed."""
    view[:SRING_HEADER] = bytes(SRING_HEADER)
    _U32.pack_into(view, REQ_EVENT, 1)
    _U32.pack_into(view, RSP_EVENT, 1)


class _Ring:
    """The four header words are read and written through a ``uint32`` view of the page
    (native order, which is the ring's little-endian on every host this runs on): one index
    operation each, as the ring is touched several times per request."""

    __slots__ = ("view", "slot", "size", "mask", "_hdr")

    def __init__(self, view: memoryview, slot: int) -> None:
        if sys.byteorder != "little":
            raise NotImplementedError("the shared ring is little-endian; this host is not")
        self.view = view
        self.slot = slot
        self.size = ring_size(len(view), slot)
        self.mask = self.size - 1            # index & mask: the slot an index names
        self._hdr = view[:16].cast("I")

    def _set(self, off: int, value: int) -> None:
        self._hdr[off >> 2] = value & MASK32

    def _push(self, prod: int, new: int) -> bool:
        """Publish ``new`` in the producer word at byte ``prod`` and say whether to notify:
        iff the event word after it lies in (old, new], modulo 2**32
        (``RING_PUSH_*_AND_CHECK_NOTIFY``)."""
        hdr, w = self._hdr, prod >> 2
        old = hdr[w]
        hdr[w] = new
        return (new - hdr[w + 1]) & MASK32 < (new - old) & MASK32

    def slot_offset(self, index: int) -> int:
        return SRING_HEADER + (index & self.mask) * self.slot

    @property
    def req_prod(self) -> int:
        return self._hdr[0]

    @property
    def req_event(self) -> int:
        return self._hdr[1]

    @property
    def rsp_prod(self) -> int:
        return self._hdr[2]

    @property
    def rsp_event(self) -> int:
        return self._hdr[3]


class FrontRing(_Ring):
    """The frontend's private state: ``req_prod_pvt`` and ``rsp_cons``."""

    __slots__ = ("req_prod_pvt", "rsp_cons")

    def __init__(self, view: memoryview, slot: int, start: int = 0) -> None:
        super().__init__(view, slot)
        self.req_prod_pvt = idx(start)
        self.rsp_cons = idx(start)

    def free_requests(self) -> int:
        """``RING_FREE_REQUESTS``."""
        return self.size - ((self.req_prod_pvt - self.rsp_cons) & MASK32)

    def full(self) -> bool:
        return self.free_requests() == 0

    def push_requests_and_check_notify(self) -> bool:
        """``RING_PUSH_REQUESTS_AND_CHECK_NOTIFY`` (:meth:`_push`, inline: once a request)."""
        hdr, new = self._hdr, self.req_prod_pvt
        old = hdr[0]
        hdr[0] = new
        return (new - hdr[1]) & MASK32 < (new - old) & MASK32

    def unconsumed_responses(self) -> int:
        return (self._hdr[2] - self.rsp_cons) & MASK32

    def final_check_for_responses(self) -> bool:
        """``RING_FINAL_CHECK_FOR_RESPONSES``: arm ``rsp_event`` and re-check."""
        hdr, cons = self._hdr, self.rsp_cons
        if hdr[2] != cons:
            return True
        hdr[3] = (cons + 1) & MASK32
        return hdr[2] != cons


class BackRing(_Ring):
    """The backend's private state: ``rsp_prod_pvt`` and ``req_cons``."""

    __slots__ = ("rsp_prod_pvt", "req_cons")

    def __init__(self, view: memoryview, slot: int, start: int = 0) -> None:
        super().__init__(view, slot)
        self.rsp_prod_pvt = idx(start)
        self.req_cons = idx(start)

    def unconsumed_requests(self) -> int:
        """``RING_HAS_UNCONSUMED_REQUESTS``: bounded by the free response slots, so a
        frontend that over-produces cannot make the backend overrun its responses."""
        req = (self._hdr[0] - self.req_cons) & MASK32
        rsp = self.size - ((self.req_cons - self.rsp_prod_pvt) & MASK32)
        return req if req < rsp else rsp

    def request_prod_overflow(self, prod: int) -> bool:
        """``RING_REQUEST_PROD_OVERFLOW``: the frontend published more than fits."""
        return (prod - self.rsp_prod_pvt) & MASK32 > self.size

    def push_responses_and_check_notify(self) -> bool:
        """``RING_PUSH_RESPONSES_AND_CHECK_NOTIFY`` (:meth:`_push`, inline)."""
        hdr, new = self._hdr, self.rsp_prod_pvt
        old = hdr[2]
        hdr[2] = new
        return (new - hdr[3]) & MASK32 < (new - old) & MASK32

    def final_check_for_requests(self) -> bool:
        """``RING_FINAL_CHECK_FOR_REQUESTS``: arm ``req_event`` and re-check."""
        if self.unconsumed_requests():
            return True
        self._hdr[1] = (self.req_cons + 1) & MASK32
        return bool(self.unconsumed_requests())
