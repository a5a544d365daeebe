"""One long-lived I/O thread per image, fed whole batches.

``trio.to_thread.run_sync`` costs about 200 µs a call on the 2-core development VM (thread
cache hand-off, capacity limiter, cancel scopes); a dedicated thread reading a queue and
reporting back with ``run_sync_soon`` costs about 140 µs, most of it the two thread
wake-ups. Either way a thread hop costs more than a FUSE round trip, so callers hand it a
whole batch at once and do what cannot block (cached reads) without it.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio

log = logging.getLogger(__name__)

__all__ = ["IoWorker"]

T = TypeVar("T")
_Job = tuple[Callable[..., Any], tuple[Any, ...], Callable[[outcome.Outcome[Any]], None]]


class IoWorker:
    def __init__(self, name: str) -> None:
        self.name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None

    def _loop(self) -> None:
        token = self._token
        assert token is not None
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, args, report = job
            result = outcome.capture(fn, *args)
            try:
                token.run_sync_soon(self._report, report, result)
            except trio.RunFinishedError:
                return

    def _report(self, report: Callable[[outcome.Outcome[Any]], None],
                result: outcome.Outcome[Any]) -> None:
        try:
            report(result)
        except Exception:        # never let a completion take the event loop down
            log.exception("%s: completion failed", self.name)

    def submit(self, fn: Callable[..., T], args: tuple[Any, ...],
               report: Callable[[outcome.Outcome[T]], None]) -> None:
        """Queue ``fn(*args)``; ``report(outcome)`` is then called on the trio thread, as a
        plain callback (no task is woken for it). Jobs run one at a time, in order."""
        if self._thread is None:
            self._token = trio.lowlevel.current_trio_token()
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()
        self._jobs.put((fn, args, report))

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the thread and return its result (or raise its error). The
        call goes on even if the caller is cancelled, so callers shield it."""
        done = trio.Event()
        box: list[outcome.Outcome[T]] = []

        def report(result: outcome.Outcome[T]) -> None:
            box.append(result)
            done.set()

        self.submit(fn, args, report)
        await done.wait()
        return box[0].unwrap()

    def close(self) -> None:
        """Let the thread finish every queued job, and wait for it: the caller may close
        the file those jobs use right after."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._jobs.put(None)
            thread.join()
