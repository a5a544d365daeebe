"""A raw image file: sparse and private when created (:mod:`backends.storage.files`), locked
while in use, vectored I/O from guest memory.

Every method but :meth:`RawImage.preadv_nowait` may block, so they run on the image's I/O
thread; ``preadv_nowait`` never blocks and runs inline. Sizes are fixed once open: the
device model checks every range against :attr:`size` before calling in.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from backends.storage.files import create_sparse, readable_by_others, size_problem

log = logging.getLogger(__name__)

__all__ = ["RawImage", "ImageError"]

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


class ImageError(OSError):
    pass


Buffers = Sequence[memoryview]


class RawImage:
    def __init__(self, path: Path, *, size: int, readonly: bool, sync: bool = False,
                 sector_size: int = 512) -> None:
        """Open ``path``, creating it sparse at ``size`` bytes, mode 0600, if it does not
        exist (:func:`~backends.storage.files.create_sparse`: atomic). ``sync`` opens with
        O_DSYNC (a disk that offers no flush must be write-through). An image that is not
        a positive multiple of ``sector_size`` is refused; one that users other than its
        owner can read is served with a warning (its mode is left alone)."""
        self.path = path
        self.readonly = readonly
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        if sync and not readonly:
            flags |= os.O_DSYNC
        created = False
        while True:
            try:
                self.fd = os.open(path, flags)
                break
            except FileNotFoundError:
                if readonly:
                    raise ImageError(errno.ENOENT, f"{path}: a read-only disk needs an "
                                     "existing image") from None
                if created:
                    raise ImageError(errno.ENOENT, f"{path}: removed as it was "
                                     "created") from None
            try:
                create_sparse(path, size)
                created = True
            except FileExistsError:
                pass                 # created by someone else since: open theirs
            except OSError as e:
                raise ImageError(e.errno, f"cannot create image {path}: {e.strerror}") \
                    from None
        try:
            try:
                fcntl.flock(self.fd, (fcntl.LOCK_SH if readonly else fcntl.LOCK_EX) |
                            fcntl.LOCK_NB)
            except BlockingIOError:
                raise ImageError(errno.EBUSY, f"{path} is in use by another process "
                                 "(locked)") from None
            st = os.fstat(self.fd)
            if not (st.st_mode & 0o170000) == 0o100000:
                raise ImageError(errno.EINVAL, f"{path} is not a regular file")
            problem = size_problem(path, st.st_size, sector_size)
            if problem is not None:
                raise ImageError(errno.EINVAL, problem)
            if not created and readable_by_others(path):
                log.warning("%s: users other than its owner can read this image (mode "
                            "%04o); 'chmod 600' it to keep the disk private", path,
                            st.st_mode & 0o7777)
            self.size = st.st_size
        except BaseException:
            # a new image stays: it is whole (created atomically), and after the link
            # another process may already be using it
            os.close(self.fd)
            raise
        self.created = created

    def preadv(self, bufs: Buffers, offset: int) -> int:
        want = len(bufs[0]) if len(bufs) == 1 else sum(map(len, bufs))
        got = os.preadv(self.fd, bufs, offset)
        if got != want:
            raise ImageError(errno.EIO, f"short read at {offset}: {got} of {want} bytes")
        return got

    def preadv_nowait(self, bufs: Buffers, offset: int) -> bool:
        """Read only if the page cache holds all of it (``RWF_NOWAIT``): True when done,
        False when it would block (nothing useful was read). Never blocks."""
        try:
            got = os.preadv(self.fd, bufs, offset, os.RWF_NOWAIT)
        except BlockingIOError:
            return False
        want = len(bufs[0]) if len(bufs) == 1 else sum(map(len, bufs))
        if got == want:
            return True
        if got == 0 and offset >= self.size:
            raise ImageError(errno.EIO, f"short read at {offset}: 0 of {want} bytes")
        return False             # partly cached: the blocking read does it all

    def pwritev(self, bufs: Buffers, offset: int) -> int:
        total = len(bufs[0]) if len(bufs) == 1 else sum(map(len, bufs))
        done = os.pwritev(self.fd, bufs, offset)
        while done < total:          # rare: finish a partial write
            rest = b"".join(bytes(b) for b in bufs)[done:]
            n = os.pwrite(self.fd, rest, offset + done)
            if n <= 0:
                raise ImageError(errno.EIO, f"write at {offset + done} made no progress")
            done += n
        return done

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def discard(self, offset: int, length: int) -> None:
        """Punch a hole (the range then reads as zeros); the file keeps its size."""
        if _libc.fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                           offset, length) != 0:
            e = ctypes.get_errno()
            raise ImageError(e, f"punching {length} bytes at {offset}: {os.strerror(e)}")

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make the range read as zeros and stay allocated (``FALLOC_FL_ZERO_RANGE``, or
        writing zeros where the filesystem cannot)."""
        if _libc.fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset,
                           length) == 0:
            return
        e = ctypes.get_errno()
        if e not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise ImageError(e, f"zeroing {length} bytes at {offset}: {os.strerror(e)}")
        zeros = bytes(min(length, 1 << 20))
        done = 0
        while done < length:
            n = min(len(zeros), length - done)
            self.pwritev([memoryview(zeros)[:n]], offset + done)
            done += n

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
