"""Doorbells: the interrupt/event-channel primitive with "pending" semantics.

Ringing sets a pending flag and wakes the waiter; several rings before the waiter runs
coalesce into one wake-up, exactly like a Xen event channel's pending bit or a SynIC event
flag. ``count`` records every ring (what sysfs ``interrupts``/``events`` show).
"""

from __future__ import annotations

import trio

__all__ = ["Doorbell"]


class Doorbell:
    __slots__ = ("_event", "count", "name")

    def __init__(self, name: str = "") -> None:
        self._event = trio.Event()
        self.count = 0
        self.name = name

    def ring(self) -> None:
        """Mark pending and wake the waiter. Safe to call from any task on the trio loop."""
        self.count += 1
        self._event.set()

    @property
    def pending(self) -> bool:
        return self._event.is_set()

    async def wait(self) -> None:
        """Wait until pending, then consume it (clear) and return."""
        await self._event.wait()
        self._event = trio.Event()
