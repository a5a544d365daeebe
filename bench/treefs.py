"""The bare pyfuse3 baseline for the attribute scan: a read-only copy of a directory tree,
loaded into memory at start and served the way vbusfs served sysfs before it let the
kernel cache static attributes, with nothing else.

Files are opened with direct I/O (each open and read goes to the server, as vbusfs's live
attributes do), entries are cached for one second, the attributes of files and symlinks
for an hour and those of directories for one second (vbusfs's timeouts then). There is no
sysfs logic, no rendering and no device behind a file: what it costs is what pyfuse3 and
the kernel's FUSE round trips cost for the same tree, the floor for any Python FUSE server
of it. Run in the foreground; SIGTERM or SIGINT unmounts.

    python bench/treefs.py SOURCE MOUNTDIR
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from dataclasses import dataclass, field

import pyfuse3
from fuse_serve import serve


@dataclass
class Entry:
    mode: int
    data: bytes = b""                                     # file contents or link target
    children: dict[bytes, int] = field(default_factory=dict)
    parent: int = pyfuse3.ROOT_INODE


def load(source: str) -> dict[int, Entry]:
    """Every directory, file and symlink under ``source``, by inode number."""
    entries = {pyfuse3.ROOT_INODE: Entry(stat.S_IFDIR | 0o755)}
    dirs = {source: pyfuse3.ROOT_INODE}
    for dirpath, dirnames, filenames in os.walk(source):
        parent = dirs[dirpath]
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            ino = len(entries) + 1
            if stat.S_ISLNK(st.st_mode):
                e = Entry(stat.S_IFLNK | 0o777, os.fsencode(os.readlink(path)))
            elif stat.S_ISDIR(st.st_mode):
                e = Entry(st.st_mode)
                dirs[path] = ino
            else:
                with open(path, "rb") as f:
                    e = Entry(st.st_mode, f.read())
            e.parent = parent
            entries[ino] = e
            entries[parent].children[os.fsencode(name)] = ino
    return entries


class TreeFS(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(self, entries: dict[int, Entry]) -> None:
        super().__init__()
        self.entries = entries
        self._dirs: dict[int, list[tuple[bytes, int]]] = {}
        self._next_fh = 1

    def _get(self, ino: int) -> Entry:
        e = self.entries.get(ino)
        if e is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return e

    def _attrs(self, ino: int) -> pyfuse3.EntryAttributes:
        e = self.entries[ino]
        a = pyfuse3.EntryAttributes()
        a.st_ino = pyfuse3.InodeT(ino)
        a.entry_timeout = 1.0
        is_dir = stat.S_ISDIR(e.mode)
        a.attr_timeout = 1.0 if is_dir else 3600
        a.st_mode = pyfuse3.ModeT(e.mode)
        a.st_nlink = 2 + sum(stat.S_ISDIR(self.entries[c].mode)
                             for c in e.children.values()) if is_dir else 1
        a.st_size = 4096 if stat.S_ISREG(e.mode) else len(e.data)
        a.st_blksize = 4096
        return a

    async def lookup(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self._get(parent_inode)
        if name == b".":
            return self._attrs(parent_inode)
        if name == b"..":
            return self._attrs(parent.parent)
        ino = parent.children.get(name)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(ino)

    async def getattr(self, inode: pyfuse3.InodeT,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._get(inode)
        return self._attrs(inode)

    async def readlink(self, inode: pyfuse3.InodeT,
                       ctx: pyfuse3.RequestContext) -> pyfuse3.FileNameT:
        e = self._get(inode)
        if not stat.S_ISLNK(e.mode):
            raise pyfuse3.FUSEError(errno.EINVAL)
        return pyfuse3.FileNameT(e.data)

    async def opendir(self, inode: pyfuse3.InodeT,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.FileHandleT:
        e = self._get(inode)
        if not stat.S_ISDIR(e.mode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        fh = self._next_fh
        self._next_fh += 1
        self._dirs[fh] = list(e.children.items())
        return pyfuse3.FileHandleT(fh)

    async def readdir(self, fh: pyfuse3.FileHandleT, start_id: int,
                      token: pyfuse3.ReaddirToken) -> None:
        entries = self._dirs[fh]
        for i in range(start_id, len(entries)):
            name, ino = entries[i]
            if not pyfuse3.readdir_reply(token, pyfuse3.FileNameT(name), self._attrs(ino),
                                         i + 1):
                return

    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        self._dirs.pop(fh, None)

    async def open(self, inode: pyfuse3.InodeT, flags: int,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        e = self._get(inode)
        if stat.S_ISDIR(e.mode):
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EROFS)
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(inode), direct_io=True,
                                keep_cache=False)

    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        return self.entries[fh].data[off:off + size]


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: treefs.py SOURCE MOUNTDIR", file=sys.stderr)
        return 2
    source, mountpoint = argv
    ops = TreeFS(load(source))
    return serve(ops, mountpoint, "treefs")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
