"""Units under the fast data path: bulk segment packing against the C-checked struct, and
direct doorbell handlers (no lost or doubled notifications)."""

from __future__ import annotations

import logging

import trio

from tests.conftest import Logs
from vbusfs.platform.doorbell import Doorbell
from vbusfs.protocols.xen import blkif


def test_pack_segments_matches_the_struct_layout() -> None:
    refs = [7, 0xFFFF_FFFE, 12345, 1 << 20]
    nsectors = 3 * 8 + 5                            # three whole pages, then 5 sectors
    got = bytearray(64)
    blkif.pack_segments(memoryview(got), refs, nsectors)
    want = b"".join(blkif.SEGMENT.pack(r, 0, 7) for r in refs[:-1]) + \
        blkif.SEGMENT.pack(refs[-1], 0, 4)
    assert bytes(got[:32]) == want and bytes(got[32:]) == bytes(32)
    assert blkif.unpack_segments(bytes(got), 4) == (refs, bytes(4), bytes([7, 7, 7, 4]))


def test_a_single_segment_takes_the_same_layout() -> None:
    for nsectors in (1, 3, 8):
        got = bytearray(b"\xee" * 16)
        blkif.pack_segments(memoryview(got), [0xABCD], nsectors)
        assert bytes(got[:8]) == blkif.SEGMENT.pack(0xABCD, 0, nsectors - 1)
        assert bytes(got[8:]) == b"\xee" * 8            # nothing past the segment
        assert blkif.unpack_segments(bytes(got), 1) == ([0xABCD], b"\0", bytes([nsectors - 1]))


def test_unpack_segments_reads_what_the_other_side_wrote() -> None:
    raw = blkif.SEGMENT.pack(9, 2, 5) + blkif.SEGMENT.pack(10, 7, 1) + b"\xff" * 8
    refs, firsts, lasts = blkif.unpack_segments(raw, 2)
    assert refs == [9, 10] and list(firsts) == [2, 7] and list(lasts) == [5, 1]


async def test_direct_handler_runs_in_the_ringing_task_and_reruns_for_nested_rings() -> None:
    bell = Doorbell("t")
    calls: list[int] = []

    def handler() -> bool:
        calls.append(len(calls))
        if len(calls) == 1:
            bell.ring()           # a reply that comes straight back
            assert len(calls) == 1, "the handler was entered twice"
        return True

    bell.handler = handler
    bell.ring()
    assert calls == [0, 1] and bell.count == 2
    assert not bell.pending       # handled: nothing left for the task


async def test_a_handler_that_declines_or_fails_leaves_the_event_for_the_task(logs: Logs
                                                                             ) -> None:
    logs.expect(r"^t: direct handler failed", logging.ERROR)
    bell = Doorbell("t")
    bell.handler = lambda: False
    bell.ring()
    assert bell.pending
    with trio.fail_after(1):
        await bell.wait()
    assert not bell.pending

    def broken() -> bool:
        raise RuntimeError("bug")

    bell.handler = broken
    bell.ring()
    assert bell.pending
