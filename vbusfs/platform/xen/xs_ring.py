"""The byte rings of ``xenstore_domain_interface``, as both ends use them.

Each direction is a 1024-byte ring with free-running u32 consumer/producer indices; the
producer writes data then advances ``prod``, the consumer reads then advances ``cons``.
Anything in the indices that claims more than 1024 bytes outstanding is a protocol error
(``XENSTORE_ERROR_RINGIDX``).
"""

from __future__ import annotations

import struct

from vbusfs.protocols.xen import xenstore as xs

__all__ = ["ByteRing", "RingIndexError", "request_ring", "response_ring"]

_U32 = struct.Struct("<I")
_MASK = 0xFFFFFFFF


class RingIndexError(Exception):
    pass


class ByteRing:
    __slots__ = ("view", "base", "cons_off", "prod_off")

    def __init__(self, view: memoryview, base: int, cons_off: int, prod_off: int) -> None:
        self.view, self.base, self.cons_off, self.prod_off = view, base, cons_off, prod_off

    def _idx(self) -> tuple[int, int]:
        cons = _U32.unpack_from(self.view, self.cons_off)[0]
        prod = _U32.unpack_from(self.view, self.prod_off)[0]
        if (prod - cons) & _MASK > xs.RING_SIZE:
            raise RingIndexError(f"ring indices cons={cons} prod={prod} are inconsistent")
        return cons, prod

    def readable(self) -> int:
        cons, prod = self._idx()
        return (prod - cons) & _MASK

    def writable(self) -> int:
        return xs.RING_SIZE - self.readable()

    def write(self, data: bytes | memoryview) -> int:
        """Write as much of ``data`` as fits; returns the byte count."""
        cons, prod = self._idx()
        n = min(len(data), xs.RING_SIZE - ((prod - cons) & _MASK))
        done = 0
        while done < n:
            at = (prod + done) % xs.RING_SIZE
            run = min(n - done, xs.RING_SIZE - at)
            self.view[self.base + at:self.base + at + run] = data[done:done + run]
            done += run
        _U32.pack_into(self.view, self.prod_off, (prod + n) & _MASK)
        return n

    def peek(self, n: int) -> bytes:
        cons, _ = self._idx()
        out = bytearray()
        while len(out) < n:
            at = (cons + len(out)) % xs.RING_SIZE
            run = min(n - len(out), xs.RING_SIZE - at)
            out += self.view[self.base + at:self.base + at + run]
        return bytes(out)

    def consume(self, n: int) -> None:
        cons, _ = self._idx()
        _U32.pack_into(self.view, self.cons_off, (cons + n) & _MASK)

    def consume_all(self) -> None:
        """Take the indices back to agreement (cons = prod), whatever they say."""
        prod = _U32.unpack_from(self.view, self.prod_off)[0]
        _U32.pack_into(self.view, self.cons_off, prod)

    def read(self, n: int) -> bytes:
        data = self.peek(n)
        self.consume(n)
        return data


def request_ring(page: memoryview) -> ByteRing:
    return ByteRing(page, xs.REQ_OFF, xs.REQ_CONS, xs.REQ_PROD)


def response_ring(page: memoryview) -> ByteRing:
    return ByteRing(page, xs.RSP_OFF, xs.RSP_CONS, xs.RSP_PROD)
