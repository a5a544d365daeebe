"""The bare pyfuse3 baseline: one file, ``MOUNTDIR/disk``, passed straight through to IMAGE.

This is the ceiling for Python + FUSE that the benchmark compares vbusfs against: no ring, no
grants, no copies of its own; each read and write is one ``os.pread``/``os.pwrite`` in a
worker thread, the file is opened with direct I/O (as vbusfs opens its disks), fsync is
``fdatasync``. Run in the foreground; SIGTERM or SIGINT unmounts.

    python bench/passthrough.py [--inline-reads] IMAGE MOUNTDIR

``--inline-reads`` does reads with a plain ``os.pread`` on the event loop instead: no thread,
no work, the cost of a pyfuse3 request itself (used to bound what any Python FUSE layer can
reach here; not one of the benchmark's baselines).
"""

from __future__ import annotations

import errno
import os
import stat
import sys

import pyfuse3
import trio
from fuse_serve import serve

FILE_INO = pyfuse3.ROOT_INODE + 1
NAME = b"disk"


class Passthrough(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(self, image: str, inline_reads: bool = False) -> None:
        super().__init__()
        self.inline_reads = inline_reads
        self.fd = os.open(image, os.O_RDWR)
        self.size = os.fstat(self.fd).st_size

    def _attrs(self, ino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = pyfuse3.InodeT(ino)
        a.entry_timeout = a.attr_timeout = 1.0
        if ino == pyfuse3.ROOT_INODE:
            a.st_mode = pyfuse3.ModeT(stat.S_IFDIR | 0o755)
            a.st_nlink = 2
        else:
            a.st_mode = pyfuse3.ModeT(stat.S_IFREG | 0o644)
            a.st_nlink = 1
            a.st_size = self.size
        a.st_blksize = 4096
        return a

    async def getattr(self, inode: pyfuse3.InodeT,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if inode not in (pyfuse3.ROOT_INODE, FILE_INO):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(inode)

    async def lookup(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if parent_inode != pyfuse3.ROOT_INODE or name != NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(FILE_INO)

    async def setattr(self, inode: pyfuse3.InodeT, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: pyfuse3.FileHandleT | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(inode)     # dd's O_TRUNC: the disk keeps its size

    async def opendir(self, inode: pyfuse3.InodeT,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.FileHandleT:
        return pyfuse3.FileHandleT(inode)

    async def readdir(self, fh: pyfuse3.FileHandleT, start_id: int,
                      token: pyfuse3.ReaddirToken) -> None:
        if start_id == 0:
            pyfuse3.readdir_reply(token, pyfuse3.FileNameT(NAME), self._attrs(FILE_INO), 1)

    async def open(self, inode: pyfuse3.InodeT, flags: int,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if inode != FILE_INO:
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(inode), direct_io=True)

    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        if self.inline_reads:
            return os.pread(self.fd, size, off)
        return await trio.to_thread.run_sync(os.pread, self.fd, size, off)

    async def write(self, fh: pyfuse3.FileHandleT, off: int, buf: bytes) -> int:
        if off >= self.size:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        buf = buf[:self.size - off]
        return await trio.to_thread.run_sync(os.pwrite, self.fd, buf, off)

    async def fsync(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        await trio.to_thread.run_sync(os.fdatasync, self.fd)


def main(argv: list[str]) -> int:
    inline = argv[:1] == ["--inline-reads"]
    if inline:
        argv = argv[1:]
    if len(argv) != 2:
        print("usage: passthrough.py [--inline-reads] IMAGE MOUNTDIR", file=sys.stderr)
        return 2
    image, mountpoint = argv
    ops = Passthrough(image, inline)
    return serve(ops, mountpoint, "passthrough")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
