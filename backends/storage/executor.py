"""The image executor: how every disk backend's requests reach its image (design.md §1).

A disk backend (blkback, virtio-blk, storvsp) only parses and validates its ring and turns
each request into a :class:`Request` in the executor's own words; the executor decides what
runs where and in which order, and answers with an errno. As OpenVMM splits storvsp from the
disk behind it, no backend here knows how an image stores its bytes, and no executor knows a
ring.

Semantics, the same for every bus:

* The requests of one :meth:`ImageExecutor.submit` run in the order given, one after the
  other; a FLUSH (``fdatasync``) therefore covers every write before it in the batch, and a
  request with ``preflush`` is preceded by one (a barrier's first half). ``fua`` puts the
  request's data on stable storage before it completes (a barrier's second half).
* Reads the page cache holds are done at once, on the event loop (``RWF_NOWAIT`` never
  blocks); the first request that could block, and everything after it, goes as one batch to
  the image's I/O thread (:class:`~backends.storage.worker.IoWorker`). While that batch is
  out the executor is :attr:`~ImageExecutor.busy` and takes nothing new, so order holds.
* Every range is checked against the image a last time (a backend bug must not become a
  write outside the disk): outside it, or with buffers that do not add up to its length,
  the request fails with EIO and the image is not touched. A read-only image refuses writes
  and discards with EROFS.
* A failing image call fails only its request, with the call's errno (EIO when it has none).
"""

from __future__ import annotations

import enum
import errno
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import trio

from backends.storage.raw import RawImage
from backends.storage.worker import IoWorker

log = logging.getLogger(__name__)

__all__ = ["StorageOp", "Request", "ImageExecutor"]


class StorageOp(enum.IntEnum):
    READ = 0
    WRITE = 1
    FLUSH = 2
    DISCARD = 3                  # the range reads as zeros and may be deallocated
    WRITE_ZEROES = 4             # the range reads as zeros and stays allocated


_WRITES = (StorageOp.WRITE, StorageOp.DISCARD, StorageOp.WRITE_ZEROES)


@dataclass(slots=True)
class Request:
    """One request in the executor's words. Backends subclass it to carry what they need to
    answer it on their ring (an id, the mappings to undo)."""

    op: StorageOp
    offset: int = 0                        # bytes
    length: int = 0                        # bytes
    iov: tuple[memoryview, ...] = ()       # READ fills them, WRITE takes them, in order
    preflush: bool = False                 # flush everything before it first
    fua: bool = False                      # on stable storage before it completes
    status: int = 0                        # 0 or an errno, set by the executor


R = TypeVar("R", bound=Request)


class ImageExecutor:
    """Runs the requests of one image. ``name`` prefixes its log lines."""

    def __init__(self, image: RawImage, name: str) -> None:
        self.image = image
        self.name = name
        self.busy = False                  # a batch is out on the I/O thread
        self._idle = trio.Event()
        self._nowait = True                # the image's filesystem takes RWF_NOWAIT
        self.worker = IoWorker(name)

    def submit(self, reqs: list[R], done: Callable[[list[R]], None]) -> bool:
        """Run ``reqs`` in order. Those done at once are passed to ``done`` before this
        returns; if any has to wait for the I/O thread, it and all after it go there as one
        batch, this returns False, and ``done`` gets them on the trio thread when the batch
        is over (the executor is :attr:`busy` until then). True: all were done at once.
        Must not be called while :attr:`busy`."""
        assert not self.busy, "submit while a batch is out"
        n = self._run_inline(reqs)
        if n:
            done(reqs[:n] if n < len(reqs) else reqs)
        if n == len(reqs):
            return True
        batch = reqs[n:]
        self.busy = True
        self.worker.submit(self._execute, (batch,), lambda _result: self._batch_done(batch, done))
        return False

    def _batch_done(self, batch: list[R], done: Callable[[list[R]], None]) -> None:
        self.busy = False
        self._idle.set()
        self._idle = trio.Event()
        done(batch)

    def drain(self) -> None:
        """Block until the batch that is out (if any) has run on the I/O thread: after
        this, no request given so far touches its buffers again. Its completion is still
        delivered later, on the trio thread (callers that reset meanwhile ignore it)."""
        if self.busy:
            self.worker.drain()

    async def wait_idle(self) -> None:
        """Until no batch is out."""
        while self.busy:
            await self._idle.wait()

    def close(self) -> None:
        """Let the I/O thread finish what it was given (its completions are still delivered)
        and stop it; the image stays open (it is the caller's)."""
        self.worker.close()

    # -- checks ----------------------------------------------------------------------------
    def _refused(self, r: Request) -> int:
        """The errno a request fails with before it reaches the image, or 0."""
        img = self.image
        iov = r.iov
        if r.offset < 0 or r.length < 0 or r.offset + r.length > img.size or \
                (r.op in (StorageOp.READ, StorageOp.WRITE) and
                 (len(iov[0]) if len(iov) == 1 else sum(map(len, iov))) != r.length):
            log.error("%s: %s of %d bytes at %d lies outside the image (%d bytes) or its "
                      "buffers hold another length; refused", self.name, r.op.name, r.length,
                      r.offset, img.size)
            return errno.EIO
        if r.op in _WRITES and img.readonly:
            return errno.EROFS
        return 0

    # -- inline (the event loop) -------------------------------------------------------------
    def _run_inline(self, reqs: Sequence[Request]) -> int:
        """Check and do the leading reads of ``reqs`` that the page cache can satisfy at
        once; returns how many are done. The first request that is not such a read stops
        it: it and what follows run on the I/O thread (checked there), still in order."""
        if not self._nowait:
            return 0
        img = self.image
        size = img.size
        for i, r in enumerate(reqs):
            if r.op != StorageOp.READ or r.preflush:
                return i
            off, n, iov = r.offset, r.length, r.iov
            if off < 0 or n < 0 or off + n > size or \
                    (len(iov[0]) if len(iov) == 1 else sum(map(len, iov))) != n:
                r.status = self._refused(r)        # (the same check, saying why)
                continue
            try:
                if not img.preadv_nowait(iov, off):
                    return i
            except OSError as e:
                if e.errno == errno.EOPNOTSUPP:
                    self._nowait = False          # this filesystem cannot say
                    return i
                log.warning("%s: I/O error: %s", self.name, e)
                r.status = e.errno or errno.EIO
        return len(reqs)

    # -- the I/O thread ----------------------------------------------------------------------
    def _execute(self, batch: Sequence[Request]) -> None:
        img = self.image
        for r in batch:
            r.status = self._refused(r)
            if r.status:
                continue
            try:
                if r.preflush:
                    img.flush()
                op = r.op
                if op == StorageOp.READ:
                    img.preadv(r.iov, r.offset)
                elif op == StorageOp.WRITE:
                    img.pwritev(r.iov, r.offset)
                elif op == StorageOp.FLUSH:
                    img.flush()
                elif op == StorageOp.DISCARD:
                    img.discard(r.offset, r.length)
                elif op == StorageOp.WRITE_ZEROES:
                    img.write_zeroes(r.offset, r.length)
                if r.fua and op != StorageOp.FLUSH:
                    img.flush()
            except OSError as e:
                log.warning("%s: I/O error: %s", self.name, e)
                r.status = e.errno or errno.EIO
            except Exception:      # a bug must fail its request, not pass it as done
                log.exception("%s: %s at %d failed", self.name, r.op.name, r.offset)
                r.status = errno.EIO
