"""The partition reference counter (``HV_X64_MSR_TIME_REF_COUNT``): 100-ns ticks since the
partition was created, the same value for the host and every vCPU of the guest.

Timesync 4.0 samples carry it (``vmreferencetime``, reference/hv-services.md §2.3): the host
stamps a sample with the counter when it reads its clock, and the guest adds the ticks that
passed until it handles the sample (Linux ``hv_read_reference_counter``). Both halves read
this one object, as both read the one hypervisor MSR.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["ReferenceTime"]


class ReferenceTime:
    """``now()`` in 100-ns ticks since creation, from a monotonic nanosecond clock (the
    system's by default; tests may pass their own)."""

    def __init__(self, monotonic_ns: Callable[[], int] = time.monotonic_ns) -> None:
        self._clock = monotonic_ns
        self._start = monotonic_ns()

    def now(self) -> int:
        return (self._clock() - self._start) // 100
