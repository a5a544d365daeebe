"""Doorbells: the interrupt/event-channel primitive with "pending" semantics.

Ringing sets a pending flag and wakes the waiter; several rings before the waiter runs
coalesce into one wake-up, exactly like a Xen event channel's pending bit or a SynIC event
flag. ``count`` records every ring (what sysfs ``interrupts``/``events`` show).

A receiver may also install a *direct handler*: then a ring runs it at once, in the ringing
task, as an interrupt handler runs on the CPU that takes the interrupt, instead of waking
the receiver's task (a task hand-off costs as much as the ring work it carries, design.md
§8). The handler returns True when it dealt with everything, or False to leave the event
pending for the receiver's task (say, when it has work that must block). A ring that arrives
while the handler runs (the handler's own reply can come straight back) re-runs it once it
returns, so nothing is lost and the handler is never entered twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

log = logging.getLogger(__name__)

__all__ = ["Doorbell"]


class Doorbell:
    __slots__ = ("_event", "count", "name", "handler", "_running", "_again")

    def __init__(self, name: str = "") -> None:
        self._event = trio.Event()
        self.count = 0
        self.name = name
        self.handler: Callable[[], bool] | None = None
        self._running = False
        self._again = False

    def ring(self) -> None:
        """Deliver: run the direct handler, or mark pending and wake the waiter. Safe to
        call from any task on the trio loop."""
        self.count += 1
        handler = self.handler
        if handler is None:
            self._event.set()
            return
        if self._running:
            self._again = True
            return
        self._running = True
        try:
            while True:
                self._again = False
                try:
                    handled = handler()
                except Exception:
                    log.exception("%s: direct handler failed; left to the task", self.name)
                    handled = False
                if not handled:
                    self._event.set()
                    return
                if not self._again:
                    return
        finally:
            self._running = False

    @property
    def pending(self) -> bool:
        return self._event.is_set()

    async def wait(self) -> None:
        """Wait until pending, then consume it (clear) and return."""
        await self._event.wait()
        self._event = trio.Event()
