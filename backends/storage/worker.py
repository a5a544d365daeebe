"""One long-lived I/O thread per image, fed whole batches.

A thread hop is the most expensive step of a request that must block, so this one is kept to
two wake-ups: the trio side appends a job and bumps an eventfd the thread sleeps on; the
thread runs it, appends the outcome and bumps a second eventfd, which trio's own epoll loop
watches. On the 2-core development VM, measured in the same minute, ``run(os.pwrite, 4 KiB)``
took 156–170 µs this way against 201–218 µs when the thread reported through
``TrioToken.run_sync_soon`` (its wake-up socket, the entry-queue task and an extra GIL
hand-off); ``trio.to_thread.run_sync`` took 282–310 µs that day (``bench/costs.py``). Any
hop costs more than a FUSE round trip, so callers hand it
a whole batch at once and do what cannot block (cached reads) without it.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio

log = logging.getLogger(__name__)

__all__ = ["IoWorker"]

T = TypeVar("T")
_Report = Callable[[outcome.Outcome[Any]], None]
_Job = tuple[Callable[..., Any], tuple[Any, ...], _Report]


def _ignore(_result: outcome.Outcome[Any]) -> None:
    pass


class IoWorker:
    """Jobs run one at a time, in the order submitted; each one's ``report`` is called on
    the trio thread, in the same order, from a system task (no task of the caller's is
    woken for it)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._jobs: collections.deque[_Job | None] = collections.deque()
        self._thread: threading.Thread | None = None
        self._kick = -1          # eventfd the thread sleeps on (blocking)
        self._bell = -1          # eventfd trio waits on (non-blocking)
        self._orphan = False     # the reaper was cancelled with the thread still running

    def _start(self) -> None:
        """A thread, its two eventfds and a reaper; each start gets its own queues, so a
        worker started again after :meth:`close` never mixes with the old thread's."""
        self._jobs = collections.deque()
        done: collections.deque[tuple[_Report, outcome.Outcome[Any]] | None] = \
            collections.deque()
        self._kick = os.eventfd(0, os.EFD_CLOEXEC)
        self._bell = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._orphan = False
        self._thread = threading.Thread(target=self._loop,
                                        args=(self._jobs, done, self._kick, self._bell),
                                        name=self.name, daemon=True)
        trio.lowlevel.spawn_system_task(self._reap, self._thread, self._bell, done,
                                        name=f"{self.name} reaper")
        self._thread.start()

    @staticmethod
    def _loop(jobs: collections.deque[_Job | None],
              done: collections.deque[tuple[_Report, outcome.Outcome[Any]] | None],
              kick: int, bell: int) -> None:
        while True:
            os.eventfd_read(kick)
            while jobs:
                job = jobs.popleft()
                if job is None:              # closing: tell the reaper, then leave
                    done.append(None)
                    os.eventfd_write(bell, 1)
                    return
                fn, args, report = job
                done.append((report, outcome.capture(fn, *args)))
                os.eventfd_write(bell, 1)

    async def _reap(self, thread: threading.Thread, bell: int,
                    done: collections.deque[tuple[_Report, outcome.Outcome[Any]] | None]) -> None:
        try:
            while True:
                await trio.lowlevel.wait_readable(bell)
                try:
                    os.eventfd_read(bell)
                except BlockingIOError:
                    pass
                while done:
                    item = done.popleft()
                    if item is None:
                        return
                    report, result = item
                    try:
                        report(result)
                    except Exception:    # never let a completion take the event loop down
                        log.exception("%s: completion failed", self.name)
        finally:
            # The thread writes to ``bell`` until it has left, so the fd may only close
            # once it has (else a write could land in whatever file reuses the number).
            if self._thread is not thread:   # close() has joined it
                trio.lowlevel.notify_closing(bell)
                os.close(bell)
            else:
                self._orphan = True      # the run is ending: close() closes it

    def submit(self, fn: Callable[..., T], args: tuple[Any, ...],
               report: Callable[[outcome.Outcome[T]], None]) -> None:
        """Queue ``fn(*args)``; ``report(outcome)`` is then called on the trio thread."""
        if self._thread is None:
            self._start()
        self._jobs.append((fn, args, report))
        os.eventfd_write(self._kick, 1)

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

    def drain(self) -> None:
        """Block until every job submitted so far has run (their reports come later, on
        the trio thread, as usual). For a device reset, which must not return while a job
        may still write into guest memory (QEMU's ``blk_drain``); it holds up the event
        loop for as long as that I/O takes."""
        if self._thread is None:
            return
        ran = threading.Event()
        self._jobs.append((ran.set, (), _ignore))
        os.eventfd_write(self._kick, 1)
        ran.wait()

    def close(self) -> None:
        """Let the thread finish every queued job, and wait for it: the caller may close
        the file those jobs use right after. Their reports are still delivered, after."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._jobs.append(None)
            os.eventfd_write(self._kick, 1)
            thread.join()
            os.close(self._kick)
            self._kick = -1
            if self._orphan:
                os.close(self._bell)
            self._bell = -1
