"""The bare pyfuse3 baselines: one file, ``MOUNTDIR/disk``, passed straight through to IMAGE.

No ring, no grants, no copies of its own. The image is opened by vbusfs's own
``backends.storage.raw.RawImage`` (the flags and lock of a disk image: ``O_RDWR | O_CLOEXEC``,
an exclusive ``flock``, no ``O_DSYNC`` since the disk offers flush), the file system is
mounted with vbusfs's options (``fuse_serve.mount_options``) and answers as vbusfs answers
for a disk: ``direct_io`` and no ``keep_cache`` at open, entries cached for 1 s and the
file's attributes for an hour, ``ENOSPC`` past the end, fsync is ``fdatasync``. Two modes:

* ``inline`` (the default) — every read, write and fsync is a plain ``os.pread``/
  ``os.pwrite``/``os.fdatasync`` on the trio thread: the ceiling for Python + FUSE;
* ``threaded`` — each is one ``trio.to_thread.run_sync`` call, a worker-thread hop per
  request (the benchmark's baseline before issue 14).

Run in the foreground; SIGTERM or SIGINT unmounts.

    python bench/passthrough.py [--mode inline|threaded] IMAGE MOUNTDIR
"""

from __future__ import annotations

import argparse
import errno
import os
import stat
import sys
from pathlib import Path

import pyfuse3
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fuse_serve import serve

from backends.storage.raw import RawImage

FILE_INO = pyfuse3.ROOT_INODE + 1
NAME = b"disk"


class Passthrough(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, image: str, threaded: bool) -> None:
        super().__init__()
        self.threaded = threaded
        size = os.stat(image).st_size
        self.image = RawImage(Path(image), size=size, readonly=False)
        self.fd = self.image.fd
        self.size = self.image.size

    def _attrs(self, ino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = pyfuse3.InodeT(ino)
        a.entry_timeout = 1.0
        if ino == pyfuse3.ROOT_INODE:
            a.attr_timeout = 1.0
            a.st_mode = pyfuse3.ModeT(stat.S_IFDIR | 0o755)
            a.st_nlink = 3
        else:
            a.attr_timeout = 3600
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
        if parent_inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if name in (b".", b".."):
            return self._attrs(pyfuse3.ROOT_INODE)
        if name != NAME:
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
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(inode), direct_io=True,
                                keep_cache=False)

    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        if off >= self.size:
            return b""
        if self.threaded:
            return await trio.to_thread.run_sync(os.pread, self.fd, size, off)
        return os.pread(self.fd, size, off)

    async def write(self, fh: pyfuse3.FileHandleT, off: int, buf: bytes) -> int:
        if off >= self.size:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        buf = buf[:self.size - off]
        if self.threaded:
            return await trio.to_thread.run_sync(os.pwrite, self.fd, buf, off)
        return os.pwrite(self.fd, buf, off)

    async def fsync(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        if self.threaded:
            await trio.to_thread.run_sync(os.fdatasync, self.fd)
        else:
            os.fdatasync(self.fd)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="passthrough.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("inline", "threaded"), default="inline")
    ap.add_argument("image")
    ap.add_argument("mountdir")
    args = ap.parse_args(argv)
    ops = Passthrough(args.image, threaded=args.mode == "threaded")
    return serve(ops, args.mountdir, args.mode)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
