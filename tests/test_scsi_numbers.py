"""The SCSI midlayer's numbers (``host%d``, sd's disk index): ``ida_alloc`` hands out the
lowest number not in use, whatever order numbers were given back in (lib/idr.c)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from vbusfs.drivers.scsi.host import _Ida


def test_numbers_count_up_from_zero() -> None:
    ida = _Ida()
    assert [ida.take() for _ in range(5)] == [0, 1, 2, 3, 4]


def test_the_lowest_given_back_comes_first() -> None:
    ida = _Ida()
    for _ in range(6):
        ida.take()
    for n in (4, 1, 3):
        ida.give(n)
    assert [ida.take() for _ in range(4)] == [1, 3, 4, 6]


def test_giving_back_what_was_not_taken_changes_nothing() -> None:
    ida = _Ida()
    ida.take()
    ida.give(7)
    ida.give(0)
    ida.give(0)
    assert [ida.take() for _ in range(3)] == [0, 1, 2]


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 40)), max_size=200))
def test_always_the_lowest_free_number(ops: list[tuple[bool, int]]) -> None:
    ida = _Ida()
    used: set[int] = set()
    for take, n in ops:
        if take:
            lowest = min(set(range(len(used) + 1)) - used)
            assert ida.take() == lowest
            used.add(lowest)
        else:
            ida.give(n)
            used.discard(n)
