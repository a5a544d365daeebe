"""How many generated cases the hostile-peer tests run: their own default under pytest, or
what ``tests/soak`` asks for (the ``VBUSFS_HOSTILE_CASES`` environment variable, read when a
test module is imported). The soak runs the same generators and checks as the tests."""

from __future__ import annotations

import os

ENV = "VBUSFS_HOSTILE_CASES"


def cases(default: int, per_example: int = 1) -> int:
    """The number of examples to generate: ``default``, or enough for the soak's count of
    cases when one example carries ``per_example`` cases (at least)."""
    want = os.environ.get(ENV)
    if not want:
        return default
    return max(1, -(-int(want) // per_example))
