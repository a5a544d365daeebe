"""The image executor every disk backend shares: order within a batch, flush/preflush/FUA,
reads the page cache holds done at once and the rest on the I/O thread, read-only and range
refusals, one failing request failing only itself."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import pytest
import trio

from backends.storage.executor import ImageExecutor, Request, StorageOp
from backends.storage.raw import RawImage
from tests.conftest import Logs

R, W, F, D = StorageOp.READ, StorageOp.WRITE, StorageOp.FLUSH, StorageOp.DISCARD


class FakeImage:
    """Records what the executor asks of an image; reads are 'cached' when told so."""

    def __init__(self, size: int = 1 << 20, readonly: bool = False, cached: bool = True,
                 nowait_error: int = 0) -> None:
        self.size = size
        self.readonly = readonly
        self.cached = cached
        self.nowait_error = nowait_error
        self.calls: list[tuple[str, int]] = []
        self.fail_at: dict[tuple[str, int], int] = {}

    def _call(self, what: str, offset: int) -> None:
        self.calls.append((what, offset))
        err = self.fail_at.get((what, offset))
        if err:
            raise OSError(err, os.strerror(err))

    def preadv_nowait(self, bufs: list[memoryview], offset: int) -> bool:
        if self.nowait_error:
            raise OSError(self.nowait_error, os.strerror(self.nowait_error))
        if self.cached:
            self._call("nowait", offset)
        return self.cached

    def preadv(self, bufs: list[memoryview], offset: int) -> int:
        self._call("read", offset)
        return 0

    def pwritev(self, bufs: list[memoryview], offset: int) -> int:
        self._call("write", offset)
        return 0

    def flush(self) -> None:
        self._call("flush", -1)

    def discard(self, offset: int, length: int) -> None:
        self._call("discard", offset)


def _req(op: StorageOp, offset: int = 0, n: int = 4096, **kw: bool) -> Request:
    iov = (memoryview(bytearray(n)),) if op in (R, W) else ()
    return Request(op, offset, n if op != F else 0, iov, **kw)


async def _run(ex: ImageExecutor, reqs: list[Request]) -> tuple[bool, list[list[Request]]]:
    got: list[list[Request]] = []
    inline = ex.submit(reqs, got.append)
    with trio.fail_after(5):
        await ex.wait_idle()
    return inline, got


async def test_a_batch_runs_in_order_and_a_flush_covers_what_came_before() -> None:
    img = FakeImage()
    ex = ImageExecutor(img, "t")                        # type: ignore[arg-type]
    try:
        inline, got = await _run(ex, [_req(W, 0), _req(F), _req(W, 8192),
                                      _req(W, 4096, preflush=True, fua=True), _req(D, 0)])
    finally:
        ex.close()
    assert not inline
    assert img.calls == [("write", 0), ("flush", -1), ("write", 8192),
                         ("flush", -1), ("write", 4096), ("flush", -1), ("discard", 0)]
    assert [r.status for r in got[0]] == [0] * 5


async def test_cached_reads_are_answered_at_once_and_the_rest_go_to_the_thread() -> None:
    img = FakeImage(cached=True)
    ex = ImageExecutor(img, "t")                        # type: ignore[arg-type]
    try:
        reqs = [_req(R, 0), _req(R, 4096), _req(W, 8192), _req(R, 12288)]
        got: list[list[Request]] = []
        assert not ex.submit(reqs, got.append)
        assert got == [reqs[:2]]                         # before submit returned
        assert ex.busy
        with pytest.raises(AssertionError):
            ex.submit([_req(R)], got.append)            # nothing new while a batch is out
        with trio.fail_after(5):
            await ex.wait_idle()
        assert got == [reqs[:2], reqs[2:]] and not ex.busy
        # after the write, the read went in order on the thread (not inline)
        assert img.calls == [("nowait", 0), ("nowait", 4096), ("write", 8192),
                             ("read", 12288)]
        img.calls.clear()
        got.clear()
        assert ex.submit([_req(R, 0)], got.append)       # all at once: True
        img.cached = False
        assert not ex.submit([_req(R, 0)], got.append)
        await ex.wait_idle()
        assert img.calls == [("nowait", 0), ("read", 0)]
    finally:
        ex.close()


async def test_a_filesystem_without_rwf_nowait_sends_every_read_to_the_thread() -> None:
    img = FakeImage(nowait_error=errno.EOPNOTSUPP)
    ex = ImageExecutor(img, "t")                        # type: ignore[arg-type]
    try:
        assert (await _run(ex, [_req(R, 0)]))[0] is False
        img.nowait_error = 0                            # it is not asked again
        assert (await _run(ex, [_req(R, 0)]))[0] is False
        assert img.calls == [("read", 0), ("read", 0)]
    finally:
        ex.close()


async def test_one_failing_request_fails_only_itself(logs: Logs) -> None:
    logs.expect(r"^t: I/O error: \[Errno 28\]")
    img = FakeImage()
    img.fail_at[("write", 4096)] = errno.ENOSPC
    ex = ImageExecutor(img, "t")                        # type: ignore[arg-type]
    try:
        _, got = await _run(ex, [_req(W, 0), _req(W, 4096), _req(W, 8192)])
    finally:
        ex.close()
    assert [r.status for r in got[0]] == [0, errno.ENOSPC, 0]


async def test_ranges_outside_the_image_are_refused_untouched(logs: Logs) -> None:
    logs.expect(r"lies outside the image .* refused", logging.ERROR)
    img = FakeImage(size=1 << 20)
    ex = ImageExecutor(img, "t")                        # type: ignore[arg-type]
    bad = [_req(W, (1 << 20) - 512), _req(R, -4096), _req(D, 1 << 20, 4096),
           Request(W, 0, 8192, (memoryview(bytearray(4096)),))]    # buffers ≠ length
    try:
        _, got = await _run(ex, [*bad, _req(W, 0)])
    finally:
        ex.close()
    assert [r.status for b in got for r in b] == [errno.EIO] * 4 + [0]
    assert img.calls == [("write", 0)]


async def test_a_read_only_image_refuses_writes_and_discards() -> None:
    img = FakeImage(readonly=True)
    ex = ImageExecutor(img, "t")                        # type: ignore[arg-type]
    try:
        _, got = await _run(ex, [_req(W, 0), _req(D, 0), _req(R, 0), _req(F)])
    finally:
        ex.close()
    statuses = [r.status for batch in got for r in batch]
    assert statuses == [errno.EROFS, errno.EROFS, 0, 0]
    assert ("write", 0) not in img.calls and ("discard", 0) not in img.calls


async def test_bytes_reach_a_real_image_and_come_back(tmp_path: Path) -> None:
    img = RawImage(tmp_path / "i.img", size=1 << 20, readonly=False)
    ex = ImageExecutor(img, "t")
    try:
        data = os.urandom(8192)
        w = Request(W, 4096, 8192, (memoryview(data[:4096]), memoryview(data[4096:])))
        _, got = await _run(ex, [w, _req(F)])
        assert [r.status for b in got for r in b] == [0, 0]
        out = bytearray(8192)
        _, got = await _run(ex, [Request(R, 4096, 8192, (memoryview(out),))])
        assert bytes(out) == data == (tmp_path / "i.img").read_bytes()[4096:12288]
    finally:
        ex.close()
        img.close()
