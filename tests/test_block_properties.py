"""Generated cases (hypothesis) for the block layer's promises, on both sides:

* the gendisk, over the engine and a RAM-backed transport: any sequence of reads and writes
  at any offset and length behaves as a byte array of the disk's size would (reads past the
  end are short, a write past the end is ENOSPC, one crossing it is cut short), and the
  engine never posts a command outside the disk or its limits;
* the image executor: whatever a backend hands it, no byte outside the image is read or
  written, and what it refuses fails with an errno.
"""

from __future__ import annotations

import errno
import logging

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends.storage.executor import ImageExecutor, Request, StorageOp
from tests.conftest import Logs
from vbusfs.block.contract import SECTOR, Command, Limits, Op
from vbusfs.block.engine import Engine
from vbusfs.block.gendisk import Disk
from vbusfs.platform.memory import PAGE_SIZE, GuestMemory

FAST = settings(max_examples=2000, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


class RamTransport:
    """A device that answers every command as soon as it is pushed, from a bytearray."""

    def __init__(self, memory: GuestMemory, size: int, lbs: int, segments: int) -> None:
        self.memory = memory
        self.data = bytearray(size)
        self.limits = Limits(max_segments=segments, max_segment_size=PAGE_SIZE,
                             max_transfer=segments * PAGE_SIZE, logical_block_size=lbs,
                             physical_block_size=lbs, flush=True)
        self.engine: Engine | None = None
        self._posted: list[Command] = []

    def can_post(self, cmd: Command) -> bool:
        return True

    def extra_pages_for(self, op: Op, npages: int) -> int:
        return 0

    def post(self, cmd: Command) -> None:
        lim = self.limits
        start, n = cmd.sector * SECTOR, cmd.nbytes
        assert 0 <= start and start + n <= len(self.data), "a command outside the disk"
        assert n <= lim.max_transfer and len(cmd.pages) <= lim.max_segments
        assert start % lim.logical_block_size == 0 and n % lim.logical_block_size == 0
        self._posted.append(cmd)

    def push(self) -> None:
        assert self.engine is not None
        posted, self._posted = self._posted, []
        for cmd in posted:
            start, n = cmd.sector * SECTOR, cmd.nbytes
            for i, pfn in enumerate(cmd.pages):
                page = self.memory.view(pfn)
                at, k = start + i * PAGE_SIZE, min(PAGE_SIZE, n - i * PAGE_SIZE)
                if cmd.op == Op.READ:
                    page[:k] = self.data[at:at + k]
                elif cmd.op == Op.WRITE:
                    self.data[at:at + k] = page[:k]
            self.engine.complete(cmd.id, 0)

    def retire(self, cmd: Command) -> None: ...


_MEMORY = GuestMemory(32 << 20)

ops = st.lists(st.tuples(st.sampled_from(["r", "w"]), st.integers(0, 70_000),
                         st.integers(0, 20_000)), min_size=1, max_size=12)


@FAST
@given(ops=ops, lbs=st.sampled_from([512, 4096]), blocks=st.integers(1, 16),
       segments=st.sampled_from([1, 2, 11]), seed=st.integers(0, 255))
def test_a_disk_behaves_as_a_byte_array_of_its_size(
        ops: list[tuple[str, int, int]], lbs: int, blocks: int, segments: int,
        seed: int) -> None:
    size = blocks * 4096

    async def main() -> None:
        t = RamTransport(_MEMORY, size, lbs, segments)
        eng = Engine(_MEMORY, t, nr_commands=8, pool_pages=segments * 2)
        t.engine = eng
        try:
            disk = Disk("t", 0, 0, 1, size // SECTOR, eng, readonly=False, removable=False)
            model = bytearray(size)
            for k, (kind, off, n) in enumerate(ops):
                if kind == "r":
                    got = await disk.read(off, n)
                    assert got == bytes(model[off:off + n])
                    continue
                blob = bytes([(seed + k) & 0xFF]) * n
                if n and off >= size:
                    try:
                        await disk.write(off, blob)
                    except OSError as e:
                        assert e.errno == errno.ENOSPC
                    else:
                        raise AssertionError("a write past the end succeeded")
                    continue
                wrote = await disk.write(off, blob)
                assert wrote == min(n, max(0, size - off))
                model[off:off + wrote] = blob[:wrote]
            assert bytes(t.data) == bytes(model)
            assert eng.leaked() == 0 and eng.pool.free_pages == eng.pool.nr_pages
            assert disk.in_flight == [0, 0]
        finally:
            _MEMORY.free(eng.pool.base, eng.pool.nr_pages)

    trio.run(main)


class BoundedImage:
    """An image that fails the test on any access outside its bytes."""

    def __init__(self, size: int, readonly: bool) -> None:
        self.size = size
        self.readonly = readonly
        self.touched = 0

    def _at(self, offset: int, n: int) -> None:
        assert 0 <= offset and offset + n <= self.size, f"{n} bytes at {offset}"
        self.touched += 1

    def preadv_nowait(self, bufs: list[memoryview], offset: int) -> bool:
        self._at(offset, sum(map(len, bufs)))
        return True

    def preadv(self, bufs: list[memoryview], offset: int) -> int:
        self._at(offset, sum(map(len, bufs)))
        return 0

    def pwritev(self, bufs: list[memoryview], offset: int) -> int:
        assert not self.readonly
        self._at(offset, sum(map(len, bufs)))
        return 0

    def flush(self) -> None: ...

    def discard(self, offset: int, length: int) -> None:
        assert not self.readonly
        self._at(offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        assert not self.readonly
        self._at(offset, length)


requests = st.lists(st.builds(
    lambda op, off, n, bufs, pre, fua: Request(
        op, off, n, tuple(memoryview(bytearray(b)) for b in bufs)
        if op in (StorageOp.READ, StorageOp.WRITE) else (), pre, fua),
    st.sampled_from(list(StorageOp)), st.integers(-8192, 1 << 21), st.integers(-4096, 1 << 20),
    st.lists(st.integers(0, 9000), max_size=3), st.booleans(), st.booleans()),
    min_size=1, max_size=8)


@settings(FAST, suppress_health_check=[HealthCheck.too_slow,
                                       HealthCheck.function_scoped_fixture])
@given(reqs=requests, readonly=st.booleans())
def test_the_executor_never_touches_a_byte_outside_the_image(logs: Logs, reqs: list[Request],
                                                            readonly: bool) -> None:
    logs.expect(r"lies outside the image .* refused", logging.ERROR)
    img = BoundedImage(1 << 20, readonly)

    async def main() -> None:
        ex = ImageExecutor(img, "fuzz")                  # type: ignore[arg-type]
        got: list[Request] = []
        try:
            ex.submit(reqs, got.extend)
            with trio.fail_after(5):
                await ex.wait_idle()
        finally:
            ex.close()
        assert got == reqs                               # every one answered, in order
        for r in reqs:
            inside = 0 <= r.offset and r.length >= 0 and r.offset + r.length <= img.size
            fits = r.op not in (StorageOp.READ, StorageOp.WRITE) or \
                sum(map(len, r.iov)) == r.length
            writes = r.op in (StorageOp.WRITE, StorageOp.DISCARD, StorageOp.WRITE_ZEROES)
            if not (inside and fits):
                assert r.status == errno.EIO
            elif writes and readonly:
                assert r.status == errno.EROFS
            else:
                assert r.status == 0

    trio.run(main)
