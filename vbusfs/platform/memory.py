"""Guest physical memory: one anonymous mmap of 4 KiB frames, with a frame allocator.

The guest side allocates frames (ring buffers, monitor pages) and hands their frame numbers
(PFNs) to the host side through bus protocols; the host side reaches them only through
:meth:`GuestMemory.view`, which checks bounds. Pages are lazily backed by the kernel, so a
large guest costs only what is touched.
"""

from __future__ import annotations

import bisect
import errno
import mmap

__all__ = ["PAGE_SIZE", "GuestMemory", "MemoryError_"]

PAGE_SIZE = 4096


class MemoryError_(OSError):  # noqa: N801 - not the builtin MemoryError
    """A guest-physical access outside guest memory (EFAULT), or the allocator ran out of
    frames (ENOMEM): an OSError, so a driver's probe that meets it fails as a probe does."""

    def __init__(self, message: str, err: int = errno.EFAULT) -> None:
        super().__init__(err, message)


class GuestMemory:
    def __init__(self, size: int) -> None:
        if size <= 0 or size % PAGE_SIZE:
            raise ValueError(f"guest memory size {size} is not a positive multiple of 4 KiB")
        self.nr_frames = size // PAGE_SIZE
        self._size = size                      # what gpa_view checks against, per call
        self._map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._mem = memoryview(self._map)
        # Free extents as (start_pfn, count), kept sorted; frame 0 is never handed out so
        # that a zero PFN from the other side is always an error.
        self._free: list[tuple[int, int]] = [(1, self.nr_frames - 1)]

    @property
    def size(self) -> int:
        return self.nr_frames * PAGE_SIZE

    def alloc(self, count: int) -> int:
        """Allocate ``count`` physically contiguous frames; returns the first PFN."""
        if count <= 0:
            raise ValueError("frame count must be positive")
        for i, (start, n) in enumerate(self._free):
            if n >= count:
                if n == count:
                    del self._free[i]
                else:
                    self._free[i] = (start + count, n - count)
                return start      # free frames are zero: never touched, or dropped by free()
        raise MemoryError_(f"no {count} contiguous free frames in guest memory",
                           errno.ENOMEM)

    def free(self, pfn: int, count: int) -> None:
        """Return frames; they read as zeros from now on and stop being resident (as a
        hypervisor reclaims a ballooned-out page), so memory the guest never wrote costs
        nothing: the mapping is private and anonymous."""
        self._check(pfn, count)
        self._map.madvise(mmap.MADV_DONTNEED, pfn * PAGE_SIZE, count * PAGE_SIZE)
        # one insertion, merged with the extents on either side (sorting and rebuilding
        # the whole list made freeing thousands of channels' pages quadratic)
        free = self._free
        i = bisect.bisect_left(free, (pfn, count))
        end = pfn + count
        if i < len(free) and free[i][0] == end:
            end += free[i][1]
            del free[i]
        if i and free[i - 1][0] + free[i - 1][1] == pfn:
            free[i - 1] = (free[i - 1][0], end - free[i - 1][0])
        else:
            free.insert(i, (pfn, end - pfn))

    def free_frames(self) -> int:
        return sum(n for _, n in self._free)

    def _check(self, pfn: int, count: int) -> None:
        if pfn < 0 or count <= 0 or pfn + count > self.nr_frames:
            raise MemoryError_(f"frames {pfn}..{pfn + count - 1} are outside guest memory "
                               f"({self.nr_frames} frames)")

    def view(self, pfn: int, count: int = 1) -> memoryview:
        """A writable view of ``count`` contiguous frames starting at ``pfn``."""
        self._check(pfn, count)
        return self._mem[pfn * PAGE_SIZE:(pfn + count) * PAGE_SIZE]

    def gpa_view(self, gpa: int, length: int) -> memoryview:
        """A view of ``length`` bytes at guest-physical address ``gpa``."""
        if gpa < 0 or length < 0 or gpa + length > self._size:
            raise MemoryError_(f"GPA range {gpa:#x}+{length:#x} is outside guest memory")
        return self._mem[gpa:gpa + length]

    def close(self) -> None:
        """Unmap, unless views handed out are still alive (then the mapping goes with the
        last of them); never raises, so it cannot hide the error that ended a run."""
        try:
            self._mem.release()
            self._map.close()
        except BufferError:
            pass
