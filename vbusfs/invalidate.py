"""Dropping the kernel's cached entries for names that leave the tree.

A device that goes away (unplug, PCI remove, SCSI delete) takes its names with it at once,
not when the kernel's entry cache expires: its name may come back (a rescan) as a new node,
and a stale dentry would resolve it to the old, gone one. The kernel is told through the
FUSE notify channel, synchronously and in a worker thread (``fuse_lowlevel_notify_inval_entry``
blocks while an operation on the same directory is pending, which this loop must be free to
answer). A write to an attribute that removed nodes (``remove``, ``unbind``, ``delete``...)
is answered only once the kernel has forgotten them, as sysfs's removal is complete when the
write returns; removals from elsewhere (a host unplug) are told as soon as the worker gets
to them.
"""

from __future__ import annotations

import errno
import logging
import math
import os

import pyfuse3
import trio

log = logging.getLogger(__name__)

__all__ = ["EntryInvalidator"]


def _invalidate(parent: int, name: bytes) -> None:
    try:
        pyfuse3.invalidate_entry(pyfuse3.InodeT(parent), pyfuse3.FileNameT(name))
    except OSError as e:
        # ENOENT: the kernel had no entry. Anything else: the session is going away.
        if e.errno != errno.ENOENT:
            log.debug("invalidating %r in inode %d: %s", name, parent, e)


class EntryInvalidator:
    """Queue of (parent inode, name) to drop; :meth:`settled` waits for all queued so far."""

    def __init__(self) -> None:
        self._send, self._recv = trio.open_memory_channel[tuple[int, bytes]](math.inf)
        self._queued = 0
        self._done = 0
        self._progress = trio.Event()
        self._finished = trio.Event()

    def __call__(self, parent: int, name: str) -> None:
        try:
            self._send.send_nowait((parent, os.fsencode(name)))
        except trio.ClosedResourceError:
            return                    # shutting down: nothing to keep fresh
        self._queued += 1

    @property
    def pending(self) -> bool:
        return self._done < self._queued

    async def settled(self) -> None:
        """Return once every invalidation queued before this call has been done."""
        target = self._queued
        while self._done < target and not self._finished.is_set():
            progress = self._progress
            await progress.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        task_status.started()
        try:
            async with self._recv:
                async for parent, name in self._recv:
                    # abandoned if cancelled: a cancelled mount no longer answers the
                    # operation the kernel may be making the call wait for
                    await trio.to_thread.run_sync(_invalidate, parent, name,
                                                  abandon_on_cancel=True)
                    self._done += 1
                    self._progress.set()
                    self._progress = trio.Event()
        finally:
            self._finished.set()
            self._progress.set()

    async def close(self) -> None:
        """Stop taking names, finish those queued, and return when the worker has ended."""
        self._send.close()
        await self._finished.wait()
