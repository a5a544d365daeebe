"""The image's I/O thread: jobs in order off the trio thread, reports in order on it, failures
delivered rather than lost, and a close that waits for queued work and leaks nothing."""

from __future__ import annotations

import logging
import os
import threading
import time

import outcome
import trio

from backends.storage.worker import IoWorker
from tests.conftest import Logs


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_jobs_run_in_order_on_the_thread_and_report_in_order_on_trio() -> None:
    worker = IoWorker("t")
    trio_thread = threading.get_ident()
    ran: list[tuple[int, int]] = []
    reported: list[tuple[int, int, object]] = []
    all_in = trio.Event()

    def job(i: int) -> int:
        ran.append((i, threading.get_ident()))
        return i * i

    def report(i: int, result: outcome.Outcome[int]) -> None:
        reported.append((i, threading.get_ident(), result.unwrap()))
        if len(reported) == 50:
            all_in.set()

    for i in range(50):
        worker.submit(job, (i,), lambda r, i=i: report(i, r))
    with trio.fail_after(10):
        await all_in.wait()
    worker.close()
    assert [i for i, _ in ran] == list(range(50))
    assert all(t != trio_thread for _, t in ran)
    assert reported == [(i, trio_thread, i * i) for i in range(50)]


async def test_an_error_comes_back_to_the_caller_and_a_failing_report_stops_nothing(
        logs: Logs) -> None:
    logs.expect(r"^t: completion failed", logging.ERROR)
    worker = IoWorker("t")

    def fail() -> None:
        raise OSError(5, "disk on fire")

    got: list[outcome.Outcome[None]] = []
    worker.submit(fail, (), lambda r: (_ for _ in ()).throw(RuntimeError("report bug")))
    worker.submit(fail, (), got.append)
    with trio.fail_after(10):
        try:
            await worker.run(fail)
        except OSError as e:
            assert e.errno == 5
        else:
            raise AssertionError("the job's error was lost")
        assert await worker.run(int, "42") == 42
    assert len(got) == 1 and isinstance(got[0], outcome.Error)
    worker.close()


async def test_close_waits_for_queued_jobs_then_still_reports_them_and_leaks_no_fd() -> None:
    before = open_fds()
    worker = IoWorker("t")
    finished: list[float] = []
    reported = trio.Event()

    def slow() -> None:
        time.sleep(0.2)
        finished.append(time.monotonic())

    worker.submit(slow, (), lambda r: reported.set())
    worker.close()                      # the caller may close the image right after
    assert len(finished) == 1
    with trio.fail_after(10):
        await reported.wait()
    for _ in range(5):
        await trio.sleep(0)
    assert open_fds() == before


async def test_a_worker_started_again_after_close_keeps_its_jobs_apart() -> None:
    before = open_fds()
    worker = IoWorker("t")
    got: list[int] = []
    assert await worker.run(int, "1") == 1
    worker.submit(time.sleep, (0.1,), lambda r: got.append(1))
    worker.close()
    worker.submit(int, ("2",), lambda r: got.append(r.unwrap()))
    with trio.fail_after(10):
        assert await worker.run(int, "3") == 3
    worker.close()
    for _ in range(5):
        await trio.sleep(0)
    assert got == [1, 2]
    assert open_fds() == before
