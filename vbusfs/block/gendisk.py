"""The gendisk: ``/dev/<disk>`` semantics over the engine, I/O accounting, and the disk's
sysfs directory (reference/sysfs.md §4).

File semantics (design.md §3): any offset and length for buffered I/O — I/O that does not
cover whole logical blocks is done by read-modify-write of the edge blocks, under a range
lock so concurrent writes to the same block both land; reads at or past the end return 0
bytes; a write that starts past the end fails with ``ENOSPC`` and one that crosses it is cut
short there; a read-only disk refuses writes with ``EROFS``; ``fsync`` is a flush through the
ring; a discard goes out as the transport's discard. Direct I/O (a file opened ``O_DIRECT``)
must be whole logical blocks, offset and length, or it fails with ``EINVAL`` as on a block
device (``blkdev_direct_IO``), checked where Linux checks it: after a read at or past the end
has returned 0 and a write past the end has failed with ``ENOSPC``.

Accounting: one I/O per request the disk receives (each read/write call), sectors in 512-byte
units, ticks in real milliseconds; ``stat`` prints Linux's 17 fields, ``inflight`` the two
in-flight counts.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from vbusfs.block.contract import SECTOR, STAT_GROUP, Limits, Op
from vbusfs.block.engine import Engine
from vbusfs.sysfs import Attr, Attribute, BlockFile, Directory, Group, Symlink, Tree, add_group
from vbusfs.sysfs.driver_core import add_power_dir, sysfs_bool

__all__ = ["Disk", "QueueSettings", "add_disk", "del_disk", "BLOCK_CLASS"]

BLOCK_CLASS = "sys/class/block"
_monotonic_ns = time.monotonic_ns
_diskseq = 0


@dataclass
class QueueSettings:
    """The queue's tunables (``/sys/block/<disk>/queue/*`` that root may write); what the
    device can take is the transport's :class:`~vbusfs.block.contract.Limits`."""

    max_sectors_kb: int
    write_cache: bool
    rotational: int
    nr_requests: int
    read_ahead_kb: int = 128
    nomerges: int = 0
    rq_affinity: int = 1
    iostats: int = 1
    add_random: int = 0
    scheduler: str = "none"


class _RangeLock:
    """Exclusive locks over byte ranges; overlapping holders wait for each other."""

    def __init__(self) -> None:
        self._held: list[tuple[int, int]] = []
        self._changed: trio.Event | None = None    # made when someone has to wait

    def _overlaps(self, start: int, end: int) -> bool:
        for s, e in self._held:
            if s < end and start < e:
                return True
        return False

    async def acquire(self, start: int, end: int) -> None:
        while self._held and self._overlaps(start, end):
            if self._changed is None:
                self._changed = trio.Event()
            await self._changed.wait()
        self._held.append((start, end))

    def release(self, start: int, end: int) -> None:
        self._held.remove((start, end))
        if self._changed is not None:
            self._changed.set()
            self._changed = None


class Disk:
    def __init__(self, name: str, major: int, minor: int, minors: int, sectors: int,
                 engine: Engine, readonly: bool, removable: bool,
                 ext_range: int | None = None) -> None:
        global _diskseq
        _diskseq += 1
        self.diskseq = _diskseq
        self.name = name
        self.major, self.minor, self.minors = major, minor, minors
        self.ext_range = minors if ext_range is None else ext_range
        self.sectors = sectors                 # 512-byte units, whatever the block size
        self.engine = engine
        self.limits: Limits = engine.limits
        self.queue = QueueSettings(
            max_sectors_kb=min(self.limits.max_transfer // 1024, 1280),
            write_cache=self.limits.write_cache, rotational=int(self.limits.rotational),
            nr_requests=len(engine.shadow))
        self.readonly = readonly
        self.removable = removable
        self.dead = False
        self._lock = _RangeLock()
        self.ios = [0, 0, 0, 0]                 # by stat group: read, write, discard, flush
        self.sectors_done = [0, 0, 0]
        self.ticks_ns = [0, 0, 0, 0]
        self.in_flight = [0, 0]                 # reads, writes (discard/flush count as write)
        self._busy_ns = 0
        self._busy_since = 0
        self.dir: Directory | None = None
        self.file: BlockFile | None = None

    # -- accounting ---------------------------------------------------------------------------
    def _start(self, op: Op) -> int:
        """Account an I/O being issued; every call is paired with :meth:`_done` in a
        ``finally``, so a caller cancelled midway (a killed ``dd``) leaves nothing behind."""
        now = _monotonic_ns()
        in_flight = self.in_flight
        if not (in_flight[0] or in_flight[1]):
            self._busy_since = now
        in_flight[op != Op.READ] += 1
        return now

    def _done(self, op: Op, t0: int, sectors: int) -> None:
        now = _monotonic_ns()
        in_flight = self.in_flight
        in_flight[op != Op.READ] -= 1
        if not (in_flight[0] or in_flight[1]):
            self._busy_ns += now - self._busy_since
        group = STAT_GROUP[op]
        self.ios[group] += 1
        if group < 3:
            self.sectors_done[group] += sectors
        self.ticks_ns[group] += now - t0

    def io_ticks_ms(self) -> int:
        busy = self._busy_ns
        if any(self.in_flight):
            busy += time.monotonic_ns() - self._busy_since
        return busy // 1_000_000

    def stat_text(self) -> str:
        ms = [t // 1_000_000 for t in self.ticks_ns]
        fields = [self.ios[0], 0, self.sectors_done[0], ms[0],
                  self.ios[1], 0, self.sectors_done[1], ms[1],
                  sum(self.in_flight), self.io_ticks_ms(), sum(ms),
                  self.ios[2], 0, self.sectors_done[2], ms[2],
                  self.ios[3], ms[3]]
        return " ".join(f"{v:8d}" for v in fields) + "\n"

    # -- file semantics -----------------------------------------------------------------------
    def size_bytes(self) -> int:
        return 0 if self.dead else self.sectors * SECTOR

    def _chunk(self) -> int:
        return min(self.engine.max_bytes, self.queue.max_sectors_kb * 1024)

    async def _split(self, op: Callable[[int, memoryview], Awaitable[None]], start: int,
                     buf: memoryview) -> None:
        """Run ``op`` (engine read or write) over ``buf`` in chunks the queue allows, all in
        flight at once."""
        step = self._chunk()
        if len(buf) <= step:
            await op(start // SECTOR, buf)
            return
        async with trio.open_nursery() as n:
            for off in range(0, len(buf), step):
                n.start_soon(op, (start + off) // SECTOR, buf[off:off + step])

    async def _read_blocks(self, start: int, out: memoryview) -> None:
        await self._split(self.engine.read, start, out)

    async def _write_blocks(self, start: int, data: memoryview) -> None:
        await self._split(self.engine.write, start, data)

    def _check_live(self) -> None:
        if self.dead:
            raise OSError(errno.ENXIO, f"{self.name} has been removed")

    def _check_direct(self, offset: int, length: int) -> None:
        lbs = self.limits.logical_block_size
        if (offset | length) & (lbs - 1):
            raise OSError(errno.EINVAL, f"direct I/O of {length} bytes at {offset} is not "
                          f"whole {lbs}-byte blocks")

    async def read(self, offset: int, size: int, direct: bool = False) -> bytes | bytearray:
        if self.dead:
            self._check_live()
        total = self.sectors * SECTOR
        if offset >= total or size <= 0:
            return b""
        if direct:
            self._check_direct(offset, size)
        size = min(size, total - offset)
        lbs = self.limits.logical_block_size
        start = offset - offset % lbs
        end = -(-(offset + size) // lbs) * lbs
        t0 = self._start(Op.READ)
        try:
            if end - start <= self.engine.max_bytes and \
                    end - start <= self.queue.max_sectors_kb * 1024:     # self._chunk()
                data = await self.engine.read_bytes(start // SECTOR, end - start)
                if start == offset and end - start == size:
                    return data            # the common case: one copy out of guest memory
                return data[offset - start:offset - start + size]
            buf = bytearray(end - start)
            await self._read_blocks(start, memoryview(buf))
        finally:
            self._done(Op.READ, t0, (end - start) // SECTOR)
        # The buffer itself when it is the answer (FUSE takes any buffer; a read larger
        # than a command, 1 MiB on a 256 KiB-transfer disk, would otherwise pay a second
        # 1 MiB copy), else one copy of the part asked for.
        if start == offset and end - start == size:
            return buf
        return bytes(memoryview(buf)[offset - start:offset - start + size])

    async def write(self, offset: int, data: bytes, direct: bool = False) -> int:
        self._check_live()
        if self.readonly:
            raise OSError(errno.EROFS, f"{self.name} is read-only")
        total = self.sectors * SECTOR
        if not data:
            return 0
        if offset >= total:
            raise OSError(errno.ENOSPC, f"offset {offset} is at or past the end of "
                          f"{self.name} ({total} bytes)")
        if direct:
            self._check_direct(offset, len(data))
        n = min(len(data), total - offset)
        lbs = self.limits.logical_block_size
        start = offset - offset % lbs
        end = -(-(offset + n) // lbs) * lbs
        await self._lock.acquire(start, end)
        try:
            t0 = self._start(Op.WRITE)
            try:
                if start == offset and end == offset + n:
                    if n <= self.engine.max_bytes and n <= self.queue.max_sectors_kb * 1024:
                        await self.engine.write(start // SECTOR, memoryview(data)[:n])
                    else:
                        await self._write_blocks(start, memoryview(data)[:n])
                else:
                    buf = bytearray(end - start)
                    view = memoryview(buf)
                    if offset != start:
                        await self.engine.read(start // SECTOR, view[:lbs])
                    if offset + n != end and (end - lbs >= start + lbs or offset == start):
                        await self.engine.read((end - lbs) // SECTOR, view[-lbs:])
                    buf[offset - start:offset - start + n] = data[:n]
                    await self._write_blocks(start, view)
            finally:
                self._done(Op.WRITE, t0, (end - start) // SECTOR)
        finally:
            self._lock.release(start, end)
        return n

    async def flush(self) -> None:
        self._check_live()
        t0 = self._start(Op.FLUSH)
        try:
            await self.engine.flush()
        finally:
            self._done(Op.FLUSH, t0, 0)

    async def discard(self, offset: int, length: int) -> None:
        """Discard whole logical blocks of ``[offset, offset+length)`` (bytes)."""
        self._check_live()
        if self.readonly:
            raise OSError(errno.EROFS, f"{self.name} is read-only")
        if not self.limits.discard_granularity:
            raise OSError(errno.EOPNOTSUPP, f"{self.name} does not support discard")
        lbs = self.limits.logical_block_size
        total = self.sectors * SECTOR
        if offset < 0 or length <= 0 or offset % lbs or length % lbs or \
                offset + length > total:
            raise OSError(errno.EINVAL, f"discard range must be whole {lbs}-byte blocks "
                          f"inside the disk ({total} bytes)")
        # each request at most max_discard_bytes (and a modest 1 GiB), whole blocks
        step = max(lbs, min(self.limits.max_discard_bytes, 1 << 30) // lbs * lbs)
        await self._lock.acquire(offset, offset + length)
        try:
            t0 = self._start(Op.DISCARD)
            try:
                for off in range(offset, offset + length, step):
                    n = min(step, offset + length - off)
                    await self.engine.discard(off // SECTOR, n // SECTOR)
            finally:
                self._done(Op.DISCARD, t0, length // SECTOR)
        finally:
            self._lock.release(offset, offset + length)


# -- sysfs ---------------------------------------------------------------------------------

def _int_store(lo: int, hi: int, setter: str) -> Attr[Disk]:
    def store(d: Disk, text: str) -> None:
        try:
            v = int(text.strip())
        except ValueError:
            raise OSError(errno.EINVAL, f"not a number: {text.strip()!r}") from None
        if not lo <= v <= (hi if hi >= 0 else d.limits.max_transfer // 1024):
            raise OSError(errno.EINVAL, f"{v} is out of range")
        setattr(d.queue, setter, v)
    return Attr(setter, lambda d: f"{getattr(d.queue, setter)}\n", store)


def _store_scheduler(d: Disk, text: str) -> None:
    if text.strip() not in ("none", "mq-deadline"):
        raise OSError(errno.EINVAL, "scheduler: none or mq-deadline")
    d.queue.scheduler = text.strip()


def _store_write_cache(d: Disk, text: str) -> None:
    t = text.strip()
    if t not in ("write back", "write through"):
        raise OSError(errno.EINVAL, "write_cache: 'write back' or 'write through'")
    d.queue.write_cache = t == "write back"


def _store_bool(name: str) -> Attr[Disk]:
    def store(d: Disk, text: str) -> None:
        setattr(d.queue, name, int(sysfs_bool(text)))
    return Attr(name, lambda d: f"{getattr(d.queue, name)}\n", store)


DISK_GROUP: Group[Disk] = Group([
    Attr("dev", lambda d: f"{d.major}:{d.minor}\n", static=True),
    Attr("size", lambda d: f"{0 if d.dead else d.sectors}\n"),
    Attr("ro", lambda d: f"{int(d.readonly)}\n"),
    Attr("removable", lambda d: f"{int(d.removable)}\n", static=True),
    Attr("hidden", lambda d: "0\n", static=True),
    Attr("range", lambda d: f"{d.minors}\n", static=True),
    Attr("ext_range", lambda d: f"{d.ext_range}\n", static=True),
    Attr("alignment_offset", lambda d: "0\n", static=True),
    Attr("discard_alignment", lambda d: "0\n", static=True),
    Attr("capability", lambda d: "0\n", static=True),
    Attr("stat", Disk.stat_text),
    Attr("inflight", lambda d: f"{d.in_flight[0]:8d} {d.in_flight[1]:8d}\n"),
    Attr("diskseq", lambda d: f"{d.diskseq}\n"),
    Attr("events", lambda d: "\n", static=True),
    Attr("events_async", lambda d: "\n", static=True),
    Attr("events_poll_msecs", lambda d: "-1\n", static=True),
])

QUEUE_GROUP: Group[Disk] = Group([
    Attr("logical_block_size", lambda d: f"{d.limits.logical_block_size}\n"),
    Attr("physical_block_size", lambda d: f"{d.limits.physical_block_size}\n"),
    Attr("hw_sector_size", lambda d: f"{d.limits.logical_block_size}\n"),
    Attr("minimum_io_size", lambda d: f"{d.limits.physical_block_size}\n"),
    Attr("optimal_io_size", lambda d: "0\n", static=True),
    _int_store(4, -1, "max_sectors_kb"),
    Attr("max_hw_sectors_kb", lambda d: f"{d.limits.max_transfer // 1024}\n"),
    Attr("max_segments", lambda d: f"{d.limits.max_segments}\n"),
    Attr("max_segment_size", lambda d: f"{d.limits.max_segment_size}\n"),
    Attr("max_integrity_segments", lambda d: "0\n", static=True),
    Attr("dma_alignment", lambda d: f"{d.limits.dma_alignment}\n"),
    _store_bool("rotational"),
    _int_store(4, 100000, "nr_requests"),
    _int_store(0, 1 << 20, "read_ahead_kb"),
    Attr("scheduler", lambda d: ("[none] mq-deadline\n" if d.queue.scheduler == "none"
                                 else "none [mq-deadline]\n"), _store_scheduler),
    Attr("discard_granularity", lambda d: f"{d.limits.discard_granularity}\n"),
    Attr("discard_max_bytes", lambda d: f"{d.limits.max_discard_bytes}\n"),
    Attr("discard_max_hw_bytes", lambda d: f"{d.limits.max_discard_bytes}\n"),
    Attr("discard_zeroes_data", lambda d: "0\n", static=True),
    Attr("write_same_max_bytes", lambda d: "0\n", static=True),
    Attr("write_zeroes_max_bytes", lambda d: "0\n", static=True),
    _int_store(0, 2, "nomerges"),
    _int_store(0, 2, "rq_affinity"),
    _store_bool("iostats"),
    _store_bool("add_random"),
    Attr("write_cache", lambda d: "write back\n" if d.queue.write_cache else "write through\n",
         _store_write_cache),
    Attr("fua", lambda d: f"{int(d.limits.fua)}\n"),
    Attr("zoned", lambda d: "none\n", static=True),
    Attr("dax", lambda d: "0\n", static=True),
    Attr("chunk_sectors", lambda d: "0\n", static=True),
    Attr("nr_zones", lambda d: "0\n", static=True),
], subdir="queue")


def add_disk(tree: Tree, parent: Directory, disk: Disk, control: Directory | None) -> None:
    """``device_add_disk``: the disk directory under ``parent/block/``, the /sys/block,
    /sys/dev/block and /sys/class/block links, ``/dev/<name>``, and the disk's control
    files (``discard``) under ``control`` (kept out of the sysfs tree, which stays Linux's)."""
    d = parent.dir("block").mkdir(disk.name)
    disk.dir = d
    add_group(d, disk, DISK_GROUP)
    add_group(d, disk, QUEUE_GROUP)
    d.add(Attribute("uevent", lambda: f"MAJOR={disk.major}\nMINOR={disk.minor}\n"
                    f"DEVNAME={disk.name}\nDEVTYPE=disk\nDISKSEQ={disk.diskseq}\n"))
    d.add(Symlink("device", parent))
    cls = tree.root.makedirs(BLOCK_CLASS)
    d.add(Symlink("subsystem", cls))
    bdi = tree.root.makedirs(f"sys/devices/virtual/bdi/{disk.major}:{disk.minor}")
    if "read_ahead_kb" not in bdi.children:
        bdi.add(Attribute("read_ahead_kb", lambda: f"{disk.queue.read_ahead_kb}\n"))
        bdi.add(Attribute("min_ratio", lambda: "0\n", static=True))
        bdi.add(Attribute("max_ratio", lambda: "100\n", static=True))
    d.add(Symlink("bdi", bdi))
    d.mkdir("holders")
    d.mkdir("slaves")
    add_power_dir(d)
    tree.root.makedirs("sys/block").add(Symlink(disk.name, d))
    tree.root.makedirs("sys/dev/block").add(Symlink(f"{disk.major}:{disk.minor}", d))
    cls.add(Symlink(disk.name, d))
    disk.file = BlockFile(disk.name, disk)
    tree.root.dir("dev").add(disk.file)
    if control is not None:
        ctl = control.mkdir(disk.name)

        async def store_discard(text: str) -> None:
            parts = text.split()
            if len(parts) != 2 or not all(p.isascii() and p.isdigit() for p in parts):
                raise OSError(errno.EINVAL, "discard takes 'OFFSET LENGTH' in bytes")
            await disk.discard(int(parts[0]), int(parts[1]))

        ctl.add(Attribute("discard", None, store_discard))


def del_disk(tree: Tree, disk: Disk, control: Directory | None) -> None:
    """``del_gendisk``: the disk vanishes from /dev and sysfs; open files get ENXIO."""
    disk.dead = True
    for rel in (f"sys/block/{disk.name}", f"sys/dev/block/{disk.major}:{disk.minor}",
                f"{BLOCK_CLASS}/{disk.name}", f"dev/{disk.name}"):
        head, _, name = rel.rpartition("/")
        parent = tree.root.resolve(head)
        if isinstance(parent, Directory) and name in parent.children:
            parent.remove(name)
    if disk.dir is not None and disk.dir.parent is not None:
        disk.dir.parent.remove(disk.name)
    if control is not None and disk.name in control.children:
        control.remove(disk.name)
