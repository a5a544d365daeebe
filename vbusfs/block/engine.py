"""The blkfront-style command engine, transport-neutral (design.md §1; the seed
``freebsd-xen-blkfront.c``). Its contract with transports is :mod:`vbusfs.block.contract`.

* A **shadow table** of commands, one per slot the transport can have in flight; a
  command's index is its id on the ring, so a completion names its command directly.
* Commands move FREE → READY → BUSY → COMPLETE → FREE. A caller takes a FREE command and the
  data pages it needs from a bounded page pool, fills the pages (writes), and queues it
  READY; :meth:`Engine.startio` moves READY commands onto the ring while the transport has
  room and the queue is not frozen; the transport's interrupt handler hands completions to
  :meth:`Engine.complete`, which moves the command to COMPLETE and wakes its caller.
* **Freeze/thaw**: a caller that finds no free command (``cm_shortage``) or not enough pool
  pages (``page_shortage``) waits, in arrival order, until a completion frees them. An
  *ordered* write on a transport without barriers is single-stepped: it waits until nothing
  is in flight (``wait_idle``), goes out alone, and holds back everything behind it until it
  completes (``Q_FREEZE``). With barriers it goes out as a barrier write and nothing waits.
* Flush uses the transport's flush, else its barrier; a device with neither is
  write-through, so a flush has nothing to do.
* **Sizes** come from the transport's :class:`~vbusfs.block.contract.Limits`. Pages that
  are contiguous in guest memory make one segment (up to the segment size), as Linux merges
  them: a command may carry as many pages as fit the segment and transfer limits when they
  are contiguous, and the pool's ability to hand out contiguous runs is part of what a
  caller waits for. A command small enough to fit the limits whatever its layout never waits
  for contiguity.
"""

from __future__ import annotations

import bisect
import collections
import errno
import logging
import os
from collections.abc import Sequence

import trio

from vbusfs.block.contract import SECTOR, Command, Limits, Op, Queue, Transport
from vbusfs.platform.memory import PAGE_SIZE, GuestMemory

log = logging.getLogger(__name__)

__all__ = ["Engine", "PagePool", "pages_per_command", "segments_for"]


def segments_for(runs: list[int], limits: Limits) -> int:
    """The segments pages take when they come in ``runs`` of contiguous pages: a run makes
    one segment per ``max_segment_size`` bytes; a page needs several when segments are
    smaller than a page."""
    if limits.max_segment_size < PAGE_SIZE:
        return sum(runs) * -(-PAGE_SIZE // limits.max_segment_size)
    per = limits.max_segment_size // PAGE_SIZE
    return sum(-(-r // per) for r in runs)


def pages_per_command(limits: Limits, contiguous: bool = True) -> int:
    """The most pages one command may carry: when they are contiguous (``contiguous``), or
    whatever their layout (each page its own segment). The transfer limit caps both."""
    if contiguous and limits.max_segment_size >= PAGE_SIZE:
        by_segments = limits.max_segments * (limits.max_segment_size // PAGE_SIZE)
    else:
        by_segments = limits.max_segments // -(-PAGE_SIZE // limits.max_segment_size)
    n = min(by_segments, limits.max_transfer // PAGE_SIZE)
    if n < 1:
        raise ValueError(f"limits allow less than one page per command: {limits}")
    return n


def _run_start(ext: list[int]) -> int:
    return ext[0]


class PagePool:
    """A fixed set of guest frames lent to commands; a single run when one is free
    (first fit), else the largest runs first, so a command takes as few segments as the pool
    allows and a backend can merge them into few I/O vector entries."""

    def __init__(self, memory: GuestMemory, nr_pages: int) -> None:
        self.memory = memory
        self.base = memory.alloc(nr_pages)
        self.nr_pages = nr_pages
        self._free: list[list[int]] = [[self.base, nr_pages]]
        self.free_pages = nr_pages

    def alloc(self, n: int) -> list[int]:
        assert 0 < n <= self.free_pages
        free = self._free
        for i, ext in enumerate(free):    # a single run if there is one
            start, size = ext
            if size >= n:
                if size == n:
                    del free[i]
                else:
                    ext[0] = start + n
                    ext[1] = size - n
                self.free_pages -= n
                return [start] if n == 1 else list(range(start, start + n))
        out: list[int] = []
        for ext in sorted(free, key=lambda e: -e[1]):
            take = min(ext[1], n - len(out))
            out.extend(range(ext[0], ext[0] + take))
            ext[0] += take
            ext[1] -= take
            if len(out) == n:
                break
        self._free = [e for e in free if e[1]]
        self.free_pages -= n
        return out

    def runs_for(self, n: int) -> list[int]:
        """The run lengths :meth:`alloc` would hand out for ``n`` pages now."""
        if any(e[1] >= n for e in self._free):
            return [n]
        out: list[int] = []
        for size in sorted((e[1] for e in self._free), reverse=True):
            out.append(min(size, n - sum(out)))
            if sum(out) == n:
                break
        return out

    def release(self, pfns: Sequence[int]) -> None:
        if not pfns:
            return
        first, n = pfns[0], len(pfns)
        if pfns[-1] - first == n - 1:                # one run (pages come in order)
            self._give_back(first, n)
            self.free_pages += n
            return
        runs: list[list[int]] = []
        for p in pfns:
            if runs and runs[-1][0] + runs[-1][1] == p:
                runs[-1][1] += 1
            else:
                runs.append([p, 1])
        merged: list[list[int]] = []
        for ext in sorted(self._free + runs):
            if merged and merged[-1][0] + merged[-1][1] == ext[0]:
                merged[-1][1] += ext[1]
            else:
                merged.append(list(ext))
        self._free = merged
        self.free_pages += len(pfns)

    def _give_back(self, start: int, n: int) -> None:
        """Put the run ``start``..``start + n`` back into the free list (sorted by start,
        neighbours merged), without re-sorting the whole list."""
        free = self._free
        i = bisect.bisect_left(free, start, key=_run_start)
        end = start + n
        if i and free[i - 1][0] + free[i - 1][1] == start:        # joins the run before
            prev = free[i - 1]
            prev[1] += n
            if i < len(free) and free[i][0] == end:               # ... and the one after
                prev[1] += free[i][1]
                del free[i]
        elif i < len(free) and free[i][0] == end:                 # joins the run after
            free[i][0] = start
            free[i][1] += n
        else:
            free.insert(i, [start, n])

    def view(self, pfn: int) -> memoryview:
        return self.memory.view(pfn)

    def close(self) -> None:
        """Give the frames back to guest memory (once nothing can touch them any more)."""
        if self.nr_pages:
            self.memory.free(self.base, self.nr_pages)
            self.nr_pages = self.free_pages = 0
            self._free = []


class Engine:
    def __init__(self, memory: GuestMemory, transport: Transport, nr_commands: int,
                 pool_pages: int) -> None:
        self.memory = memory
        self.transport = transport
        self.limits = lim = transport.limits
        #: commands of up to this many pages fit the limits whatever their layout
        self.safe_pages = pages_per_command(lim, contiguous=False)
        self.shadow = [Command(i) for i in range(nr_commands)]
        self.free: collections.deque[Command] = collections.deque(self.shadow)
        self.ready: collections.deque[Command] = collections.deque()
        self.busy: dict[int, Command] = {}
        self.complete_q: collections.deque[Command] = collections.deque()
        need = self.safe_pages + transport.extra_pages_for(Op.WRITE, self.safe_pages)
        self.pool = PagePool(memory, max(pool_pages, need))
        # the most pages a command may carry: what the limits allow for contiguous pages,
        # and what the pool can hold
        m = min(pages_per_command(lim), self.pool.nr_pages)
        while m + transport.extra_pages_for(Op.WRITE, m) > self.pool.nr_pages:
            m -= 1
        self.max_pages = m
        #: data bytes one command carries, whole logical blocks
        self.max_bytes = min(self.max_pages * PAGE_SIZE, lim.max_transfer) // \
            lim.logical_block_size * lim.logical_block_size
        self._waiters: collections.deque[tuple[tuple[int, int], trio.Event]] = \
            collections.deque()
        self.frozen_step = False        # Q_FREEZE: a single-stepped command is in flight
        self.connected = True
        # counters for tests and diagnostics
        self.freezes = {"cm_shortage": 0, "page_shortage": 0, "wait_idle": 0}
        self.posted = 0
        self.bogus_completions = 0

    # -- command allocation with freeze/thaw ------------------------------------------------
    async def _get(self, op: Op, npages: int) -> Command:
        extra = self.transport.extra_pages_for(op, npages)
        need = npages + extra
        if npages > self.max_pages or need > self.pool.nr_pages:
            raise OSError(errno.EINVAL, f"a command of {npages} pages exceeds the pool")
        if not self.connected:           # nothing will ever wake a waiter now
            raise OSError(errno.EIO, "disk disconnected")
        if self._waiters or not self.free or self.pool.free_pages < need or \
                (npages > self.safe_pages and not self._fits(need, npages)):
            if not self.free:
                self.freezes["cm_shortage"] += 1
            else:
                self.freezes["page_shortage"] += 1
            ev = trio.Event()
            entry = ((need, npages), ev)
            self._waiters.append(entry)
            try:
                await ev.wait()
            except BaseException:
                if entry in self._waiters:
                    self._waiters.remove(entry)
                else:
                    self._thaw()      # we were woken but leave: pass the turn on
                raise
            if self._waiters and self._waiters[0] is entry:
                self._waiters.popleft()
            if not self.connected:
                self._thaw()                 # pass the turn on, as a cancelled waiter does
                raise OSError(errno.EIO, "disk disconnected")
        cmd = self.free.popleft()
        cmd.queue = Queue.NONE
        cmd.op = op
        pool = self.pool
        cmd.pages = pool.alloc(npages) if npages else []
        cmd.extra_pages = pool.alloc(extra) if extra else []
        cmd.done = None
        cmd.status = 0
        cmd.ordered = cmd.single_step = cmd.abandoned = False
        if self._waiters:
            self._thaw()
        return cmd

    def _fits(self, need: int, npages: int) -> bool:
        """Enough pool pages free, in runs the limits allow for ``npages`` data pages."""
        if self.pool.free_pages < need:
            return False
        return npages <= self.safe_pages or \
            segments_for(self.pool.runs_for(npages), self.limits) <= self.limits.max_segments

    def _thaw(self) -> None:
        """Wake the first waiter if what it needs is now free (arrival order is kept)."""
        if self._waiters and self.free and self._fits(*self._waiters[0][0]):
            self._waiters[0][1].set()

    def _put(self, cmd: Command) -> None:
        if cmd.pages:
            self.pool.release(cmd.pages)
            cmd.pages = []
        if cmd.extra_pages:
            self.pool.release(cmd.extra_pages)
            cmd.extra_pages = []
        cmd.queue = Queue.FREE
        self.free.append(cmd)
        if self._waiters:
            self._thaw()

    # -- dispatch ---------------------------------------------------------------------------
    def startio(self) -> None:
        """Move READY commands to the ring while there is room and nothing holds them."""
        t = self.transport
        barrier = self.limits.barrier
        queued = 0
        while self.connected and self.ready and not self.frozen_step and \
                t.can_post(self.ready[0]):
            cmd = self.ready[0]
            if cmd.ordered and not barrier:
                cmd.single_step = True
                if self.busy:
                    self.freezes["wait_idle"] += 1
                    break                      # WAIT_IDLE: thawed when BUSY drains
            self.ready.popleft()
            if cmd.single_step:
                self.frozen_step = True
            t.post(cmd)
            cmd.queue = Queue.BUSY
            self.busy[cmd.id] = cmd
            queued += 1
        if queued:
            self.posted += queued
            t.push()

    def complete(self, cid: int, status: int) -> None:
        """Command ``cid`` completed with ``status`` (0 or an errno); called by the
        transport's interrupt handler. Completions may come in any order; one naming no busy
        command is counted and ignored."""
        cmd = self.busy.pop(cid, None) if 0 <= cid < len(self.shadow) else None
        if cmd is None:
            self.bogus_completions += 1
            log.warning("completion for command %d, which is not in flight; ignored", cid)
            return
        self.transport.retire(cmd)
        if cmd.single_step:
            self.frozen_step = False
        self._finish(cmd, status)

    def _finish(self, cmd: Command, status: int) -> None:
        """Move a command to COMPLETE and wake its caller (free it if its caller left)."""
        cmd.status = status
        if cmd.abandoned:
            self._put(cmd)
            return
        cmd.queue = Queue.COMPLETE
        self.complete_q.append(cmd)
        if cmd.done is not None:
            cmd.done.set()

    def fail_all(self) -> None:
        """The ring is gone: fail every queued and in-flight command with EIO, retire what
        the transport took for them, and wake everyone waiting for a command."""
        self.connected = False
        busy = list(self.busy.values())
        self.busy.clear()
        self.frozen_step = False
        for cmd in busy:
            self.transport.retire(cmd)
            self._finish(cmd, errno.EIO)
        ready = list(self.ready)
        self.ready.clear()
        for cmd in ready:                      # never reached the ring: nothing to retire
            self._finish(cmd, errno.EIO)
        for _, ev in self._waiters:
            ev.set()
        self._waiters.clear()

    async def _submit(self, cmd: Command) -> int:
        """Queue ``cmd`` and wait for its completion. The caller releases it with
        :meth:`_release` (a read copies its data out of the pages first). A device that
        answers from its doorbell handler (a cached read) completes the command before
        :meth:`startio` returns; then there is nothing to wait for.

        Cancelled while READY, the command is taken back; while BUSY, it is freed when its
        completion arrives (the device may still be writing its pages)."""
        cmd.queue = Queue.READY
        self.ready.append(cmd)
        self.startio()
        if cmd.queue == Queue.COMPLETE:
            return cmd.status
        cmd.done = done = trio.Event()
        try:
            await done.wait()
        except BaseException:
            if cmd.queue == Queue.READY:       # cancelled before it reached the ring
                self.ready.remove(cmd)
                self._put(cmd)
                self.startio()                 # it may have been holding the queue
            elif cmd.queue == Queue.BUSY:      # freed when its completion arrives
                cmd.abandoned = True
            else:
                self._release(cmd)
            raise
        return cmd.status

    def _release(self, cmd: Command) -> None:
        if cmd.queue == Queue.COMPLETE:
            q = self.complete_q
            if q[-1] is cmd:                   # the usual case: the latest completion
                q.pop()
            else:
                q.remove(cmd)
            self._put(cmd)
        if self.ready:
            self.startio()

    @staticmethod
    def _check(status: int, what: str) -> None:
        if status:
            raise OSError(status, f"{what}: {os.strerror(status)}")

    # -- the operations the block layer uses ------------------------------------------------
    def _pages_view(self, pages: list[int]) -> memoryview | None:
        """One view over ``pages`` when they are contiguous in guest memory (the pool hands
        out single runs whenever it can), so data moves with one copy, not one per page."""
        if pages and pages[-1] - pages[0] == len(pages) - 1:
            return self.memory.view(pages[0], len(pages))
        return None

    async def read_bytes(self, sector: int, n: int) -> bytes:
        """Read ``n`` bytes (whole logical blocks, at most :attr:`max_bytes`), copied once
        out of the command's pages."""
        cmd = await self._get(Op.READ, -(-n // PAGE_SIZE))
        cmd.sector, cmd.nsectors, cmd.nbytes = sector, n // SECTOR, n
        status = await self._submit(cmd)
        try:
            if status == 0:
                pages = cmd.pages
                if len(pages) == 1:
                    data = bytes(self.memory.view(pages[0])[:n])
                else:
                    whole = self._pages_view(pages)
                    data = bytes(whole[:n]) if whole is not None else b"".join(
                        self.memory.view(pfn) for pfn in pages)[:n]
        finally:
            self._release(cmd)
        if status:
            self._check(status, f"read at sector {sector}")
        return data

    async def read(self, sector: int, out: memoryview) -> None:
        """Read ``len(out)`` bytes into ``out`` (same limits as :meth:`read_bytes`)."""
        out[:] = await self.read_bytes(sector, len(out))

    async def write(self, sector: int, data: memoryview, ordered: bool = False) -> None:
        """Write ``data`` (whole logical blocks, at most :attr:`max_bytes`). An ``ordered``
        write is neither passed by nor passes any other command."""
        n = len(data)
        cmd = await self._get(Op.WRITE, -(-n // PAGE_SIZE))
        whole = self._pages_view(cmd.pages)
        if whole is not None:
            whole[:n] = data
        else:
            mem = self.memory
            for i, pfn in enumerate(cmd.pages):
                chunk = data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
                mem.view(pfn)[:len(chunk)] = chunk
        cmd.sector, cmd.nsectors, cmd.nbytes = sector, n // SECTOR, n
        cmd.ordered = ordered
        status = await self._submit(cmd)
        self._release(cmd)
        if status:
            self._check(status, f"write at sector {sector}")

    async def flush(self) -> None:
        """Empty the device's volatile cache: its FLUSH, else an empty barrier; nothing on a
        write-through device."""
        lim = self.limits
        if not lim.write_cache:
            return
        cmd = await self._get(Op.FLUSH, 0)
        cmd.sector, cmd.nsectors, cmd.nbytes = 0, 0, 0
        cmd.ordered = not lim.flush      # a barrier-only flush is an ordered empty write
        status = await self._submit(cmd)
        self._release(cmd)
        self._check(status, "flush")

    async def discard(self, sector: int, nsectors: int) -> None:
        if not self.limits.discard_granularity:
            raise OSError(errno.EOPNOTSUPP, "the device does not discard")
        cmd = await self._get(Op.DISCARD, 0)
        cmd.sector, cmd.nsectors, cmd.nbytes = sector, nsectors, 0
        status = await self._submit(cmd)
        self._release(cmd)
        self._check(status, f"discard at sector {sector}")

    async def drv_in(self, code: int, n: int) -> bytes:
        """A driver-private request ``code`` that reads ``n`` bytes (Linux REQ_OP_DRV_IN:
        virtio-blk's GET_ID); the transport knows what the code means."""
        cmd = await self._get(Op.DRV_IN, -(-n // PAGE_SIZE))
        cmd.sector, cmd.nsectors, cmd.nbytes, cmd.code = 0, 0, n, code
        status = await self._submit(cmd)
        try:
            if status == 0:
                data = b"".join(bytes(self.memory.view(pfn)) for pfn in cmd.pages)[:n]
        finally:
            self._release(cmd)
        self._check(status, f"driver request {code}")
        return data

    async def drain(self, deadline: float) -> bool:
        """Wait (at most ``deadline`` seconds) until nothing is queued or in flight, and no
        caller that reached the engine is still waiting for a command or pages (one woken
        by a completion but not yet run would otherwise find the disk disconnected)."""
        with trio.move_on_after(deadline):
            while self.busy or self.ready or self._waiters:
                await trio.sleep(0.01)
            return True
        return False

    def leaked(self) -> int:
        """Commands neither free nor accounted for in a queue — must be 0 when idle."""
        return len(self.shadow) - len(self.free) - len(self.busy) - len(self.ready) - \
            len(self.complete_q)
