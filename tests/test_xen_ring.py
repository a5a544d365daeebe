"""Shared-ring index arithmetic: 32-bit wrap-around, notification, overflow protection."""

import pytest

from vbusfs.protocols.xen.ring import BackRing, FrontRing, idx, ring_size, sring_init

SLOT = 112


def pair(start: int = 0) -> tuple[memoryview, FrontRing, BackRing]:
    mem = memoryview(bytearray(4096))
    sring_init(mem)
    # both sides agree on the starting index (as after SHARED_RING_INIT with req_prod = start)
    f = FrontRing(mem, SLOT, start)
    b = BackRing(mem, SLOT, start)
    f._set(0, start)
    f._set(8, start)
    f._set(4, start + 1)
    f._set(12, start + 1)
    return mem, f, b


@pytest.mark.parametrize("start", [0, 2**32 - 5, 2**32 - 32, 2**31])
def test_wraparound_round_trip(start: int) -> None:
    _, f, b = pair(start)
    for _lap in range(5):
        n = 0
        while not f.full():
            f.req_prod_pvt = idx(f.req_prod_pvt + 1)
            n += 1
        assert n == ring_size(4096, SLOT) == 32
        # req_event was armed at req_cons + 1 (by init, then by the final check below)
        assert f.push_requests_and_check_notify() is True
        assert b.unconsumed_requests() == 32
        b.req_cons = idx(b.req_cons + 32)
        b.rsp_prod_pvt = idx(b.rsp_prod_pvt + 32)
        assert b.push_responses_and_check_notify() is True
        assert f.unconsumed_responses() == 32
        f.rsp_cons = idx(f.rsp_cons + 32)
        assert not b.final_check_for_requests()
        assert not f.final_check_for_responses()


def test_notify_only_when_event_crossed() -> None:
    _, f, b = pair()
    f.req_prod_pvt = 1
    assert f.push_requests_and_check_notify() is True    # req_event = 1 lies in (0, 1]
    f.req_prod_pvt = 2
    assert f.push_requests_and_check_notify() is False   # backend did not re-arm
    b.req_cons = 2
    assert b.final_check_for_requests() is False         # arms req_event = 3
    f.req_prod_pvt = 3
    assert f.push_requests_and_check_notify() is True


def test_overproducing_frontend_is_bounded() -> None:
    _, f, b = pair()
    f._set(0, 1000)                 # a hostile req_prod far beyond the ring
    assert b.request_prod_overflow(f.req_prod)
    assert b.unconsumed_requests() == 32       # never more than the ring holds


def test_ring_size_rounds_down_to_power_of_two() -> None:
    assert ring_size(4096 * 4, SLOT) == 128    # 145 raw slots
    with pytest.raises(ValueError):
        ring_size(100, SLOT)
