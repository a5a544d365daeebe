"""The FUSE adapter: a thin ``pyfuse3.Operations`` over :class:`vbusfs.sysfs.Tree`.

This is the one place errors become ``FUSEError``: every handler runs under
:func:`_errors`, which turns ``OSError`` into its errno and anything else into ``EIO`` with
the traceback logged, so no handler error can end the mount.
"""

from __future__ import annotations

import errno
import functools
import inspect
import logging
import os
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import pyfuse3
import trio

from vbusfs.invalidate import EntryInvalidator
from vbusfs.sysfs import (
    Attribute,
    BinAttribute,
    BlockFile,
    DataFile,
    Directory,
    Node,
    Symlink,
    Tree,
)

log = logging.getLogger(__name__)

__all__ = ["VbusFS"]

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def _errors(fn: F) -> F:
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        args[0].requests[name] += 1
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception:
            log.exception("%s failed", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
    return wrapper  # type: ignore[return-value]


@dataclass
class _Open:
    node: Node
    data: bytes | None = None        # text attribute contents, generated at open
    error: OSError | None = None     # a show() failure, reported by read() as sysfs does
    limit: int | None = None         # a binary attribute's length for this opener
    direct: bool = False             # a disk opened O_DIRECT: whole logical blocks only


class _DiskRequest:
    """The context of one disk request being served (:meth:`VbusFS._disk_request`): a
    class, not a ``contextlib.contextmanager``, as it wraps every disk read and write."""

    __slots__ = ("fs",)

    def __init__(self, fs: VbusFS) -> None:
        self.fs = fs

    def __enter__(self) -> None:
        self.fs._disk_io += 1

    def __exit__(self, *exc: object) -> None:
        self.fs._disk_request_done()


class VbusFS(pyfuse3.Operations):
    """What the kernel may cache, and for how long:

    * names (entries): ``entry_timeout``, an hour by default. A name that leaves the tree
      is dropped from the kernel's cache at once through the tree's ``on_remove`` hook
      (:class:`vbusfs.invalidate.EntryInvalidator`; every removal is a
      :meth:`Directory.remove`), and a name that is not there is never cached (a failed
      LOOKUP leaves no negative entry), so a hot-added device shows at once;
    * directory attributes (link count, mtime): one second (``dir_attr_timeout``);
    * the attributes of everything else: an hour. They cannot change (an attribute's size
      and mode are fixed, a symlink's target is fixed, a disk keeps its size); without
      that, the permission walk of every open costs a GETATTR per path component. In-memory
      data files (:class:`DataFile`), whose size changes when the service writes them, are
      the exception: never cached;
    * contents: a static attribute's (:class:`Attribute`) is kept in the page cache
      (``keep_cache``, no direct I/O), so repeated reads never reach the service; it is
      never written and inode numbers are never reused, so the cache cannot go stale.
      Everything else is opened with direct I/O: live attributes are rendered at each
      open, disks are read and written through their rings.

    ``requests`` counts the requests each handler has answered
    (``MNT/.vbusfs/fuse_requests``)."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, tree: Tree, entry_timeout: float = 3600.0,
                 invalidator: EntryInvalidator | None = None,
                 dir_attr_timeout: float = 1.0) -> None:
        super().__init__()
        self.tree = tree
        self.invalidator = invalidator
        self.entry_timeout = entry_timeout
        self.dir_attr_timeout = dir_attr_timeout
        self.requests: Counter[str] = Counter()
        self._handles: dict[int, _Open] = {}
        self._dirs: dict[int, list[Node]] = {}
        self._next_fh = 1
        self._disk_io = 0                        # disk reads, writes, fsyncs being served
        self._disk_io_stopped = False
        self._disk_io_idle = trio.Event()
        self._disk_gate = _DiskRequest(self)

    # -- the service stopping ------------------------------------------------------------------
    # Once the service is gone the kernel answers every request on a FUSE file with ENOTCONN
    # (the connection is no longer connected), and a request still unanswered when the
    # connection closes gets ECONNABORTED. So a stop the service controls answers new disk
    # I/O with that same ENOTCONN and lets what is in flight finish first: a writer sees one
    # errno however and whenever the service stops.
    def stop_disk_io(self) -> None:
        """From now on disk reads, writes and fsyncs fail with ENOTCONN."""
        self._disk_io_stopped = True
        if self._disk_io == 0:
            self._disk_io_idle.set()

    async def disk_io_drained(self) -> None:
        """Return once no disk I/O is being served (after :meth:`stop_disk_io`)."""
        await self._disk_io_idle.wait()

    def _disk_request(self) -> _DiskRequest:
        """``with self._disk_request():`` around a disk read, write or fsync: refused once
        the service stops, counted while it is served."""
        if self._disk_io_stopped:
            raise OSError(errno.ENOTCONN, "the service is stopping")
        return self._disk_gate

    def _disk_request_done(self) -> None:
        self._disk_io -= 1
        if self._disk_io == 0 and self._disk_io_stopped:
            self._disk_io_idle.set()

    def _fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = pyfuse3.InodeT(node.ino)
        a.generation = 0
        a.entry_timeout = self.entry_timeout
        if isinstance(node, DataFile):
            a.attr_timeout = 0
        else:
            a.attr_timeout = self.dir_attr_timeout if isinstance(node, Directory) else 3600
        a.st_mode = pyfuse3.ModeT(node.mode)
        a.st_nlink = 2 + sum(isinstance(c, Directory) for c in node.children.values()) \
            if isinstance(node, Directory) else 1
        a.st_uid = 0
        a.st_gid = 0
        a.st_rdev = 0
        a.st_size = node.size()
        a.st_blksize = 4096
        a.st_blocks = 0
        a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = node.times()
        return a

    @_errors
    async def lookup(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self.tree.get(parent_inode)
        if not isinstance(parent, Directory):
            raise OSError(errno.ENOTDIR, "not a directory")
        if name == b".":
            node: Node = parent
        elif name == b"..":
            node = parent.parent or parent
        else:
            child = parent.children.get(os.fsdecode(name))
            if child is None:
                raise OSError(errno.ENOENT, "no such entry")
            node = child
        self.tree.remember(node.ino)
        return self.attrs(node)

    @_errors
    async def forget(self, inode_list: Sequence[tuple[pyfuse3.InodeT, int]]) -> None:
        for ino, nlookup in inode_list:
            self.tree.forget(ino, nlookup)

    @_errors
    async def getattr(self, inode: pyfuse3.InodeT,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self.attrs(self.tree.get(inode))

    @_errors
    async def setattr(self, inode: pyfuse3.InodeT, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: pyfuse3.FileHandleT | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self.tree.get(inode)
        if fields.update_size:
            # O_TRUNC before a write: harmless on a writable attribute or a disk (a block
            # device ignores O_TRUNC, and dd truncates regular files it writes to), refused
            # otherwise. The disk keeps its size; a data file takes the new one.
            if isinstance(node, DataFile):
                node.truncate(attr.st_size)
            elif not (isinstance(node, Attribute) and node.writable) and \
                    not isinstance(node, BlockFile):
                raise OSError(errno.EACCES, "read-only")
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise OSError(errno.EPERM, "sysfs modes and owners are fixed")
        if fields.update_atime or fields.update_mtime:
            # `touch -d`: kept, as sysfs (kernfs_iop_setattr) and devtmpfs keep them
            node.set_times(attr.st_atime_ns if fields.update_atime else None,
                           attr.st_mtime_ns if fields.update_mtime else None)
        return self.attrs(node)

    # The tree's shape is the machine's; users cannot change it. kernfs has no mkdir,
    # rmdir, unlink, symlink, link or mknod for sysfs, so the VFS answers EPERM for each,
    # and its rename refuses with EPERM too; open(O_CREAT) of a new name in a directory
    # without ->create is EACCES (fs/namei.c lookup_open). The same errnos here, where
    # pyfuse3's defaults would say ENOSYS.
    @_errors
    async def mkdir(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                    mode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise OSError(errno.EPERM, "mkdir")

    @_errors
    async def rmdir(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                    ctx: pyfuse3.RequestContext) -> None:
        raise OSError(errno.EPERM, "rmdir")

    @_errors
    async def unlink(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                     ctx: pyfuse3.RequestContext) -> None:
        raise OSError(errno.EPERM, "unlink")

    @_errors
    async def rename(self, parent_inode_old: pyfuse3.InodeT, name_old: bytes,
                     parent_inode_new: pyfuse3.InodeT, name_new: bytes, flags: int,
                     ctx: pyfuse3.RequestContext) -> None:
        raise OSError(errno.EPERM, "rename")

    @_errors
    async def symlink(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                      target: pyfuse3.FileNameT,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise OSError(errno.EPERM, "symlink")

    @_errors
    async def link(self, inode: pyfuse3.InodeT, new_parent_inode: pyfuse3.InodeT,
                   new_name: pyfuse3.FileNameT,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise OSError(errno.EPERM, "link")

    @_errors
    async def mknod(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, mode: int,
                    rdev: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise OSError(errno.EPERM, "mknod")

    @_errors
    async def create(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, mode: int,
                     flags: int, ctx: pyfuse3.RequestContext
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        raise OSError(errno.EACCES, "create")

    @_errors
    async def readlink(self, inode: pyfuse3.InodeT,
                       ctx: pyfuse3.RequestContext) -> pyfuse3.FileNameT:
        node = self.tree.get(inode)
        if not isinstance(node, Symlink):
            raise OSError(errno.EINVAL, "not a symlink")
        return pyfuse3.FileNameT(os.fsencode(node.readlink()))

    @_errors
    async def opendir(self, inode: pyfuse3.InodeT,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.FileHandleT:
        node = self.tree.get(inode)
        if not isinstance(node, Directory):
            raise OSError(errno.ENOTDIR, "not a directory")
        fh = self._fh()
        self._dirs[fh] = list(node.children.values())   # a stable snapshot for offsets
        return pyfuse3.FileHandleT(fh)

    @_errors
    async def readdir(self, fh: pyfuse3.FileHandleT, start_id: int,
                      token: pyfuse3.ReaddirToken) -> None:
        entries = self._dirs.get(fh)
        if entries is None:
            raise OSError(errno.EBADF, "bad directory handle")
        for i in range(start_id, len(entries)):
            node = entries[i]
            if not pyfuse3.readdir_reply(token, pyfuse3.FileNameT(os.fsencode(node.name)),
                                         self.attrs(node), i + 1):
                return
            self.tree.remember(node.ino)

    @_errors
    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        self._dirs.pop(fh, None)

    @_errors
    async def open(self, inode: pyfuse3.InodeT, flags: int,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self.tree.get(inode)
        if isinstance(node, Directory):
            raise OSError(errno.EISDIR, "is a directory")
        accmode = flags & os.O_ACCMODE
        wants_read = accmode in (os.O_RDONLY, os.O_RDWR)
        wants_write = accmode in (os.O_WRONLY, os.O_RDWR)
        handle = _Open(node)
        if isinstance(node, Attribute):
            # kernfs: opening for an access the attribute lacks is EACCES, even for root.
            if (wants_write and not node.writable) or (wants_read and not node.readable):
                raise OSError(errno.EACCES, "permission denied")
            if wants_read:
                try:
                    handle.data = node.render()
                except OSError as e:
                    handle.error = e
                except Exception:
                    log.exception("%s: show failed", node.path())
                    handle.error = OSError(errno.EIO, "attribute show failed")
        elif isinstance(node, BinAttribute):
            if (wants_write and node.writer is None) or (wants_read and node.reader is None):
                raise OSError(errno.EACCES, "permission denied")
            # pci_read_config: the capability is the opener's, checked at open
            handle.limit = node.length if ctx.uid == 0 or node.public_length is None \
                else node.public_length
        elif isinstance(node, BlockFile):
            if wants_write and node.disk.readonly:
                raise OSError(errno.EROFS, "the disk is read-only")
            # the kernel passes the open flags on; a later fcntl(F_SETFL) is not seen
            handle.direct = bool(flags & os.O_DIRECT)
        elif isinstance(node, DataFile):
            pass
        else:
            raise OSError(errno.EINVAL, "not a regular file")
        fh = self._fh()
        self._handles[fh] = handle
        if isinstance(node, Attribute) and node.static and handle.error is None:
            # the page cache keeps it: later opens reuse it, reads never come here again
            return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(fh), direct_io=False,
                                    keep_cache=True)
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(fh), direct_io=True, keep_cache=False)

    def _handle(self, fh: int) -> _Open:
        h = self._handles.get(fh)
        if h is None:
            raise OSError(errno.EBADF, "bad file handle")
        return h

    @_errors
    # pyfuse3 replies with any contiguous buffer (fuse_read_async: PyObject_GetBuffer), so a
    # disk's large read hands its buffer over instead of copying it into bytes; the stub
    # says bytes
    async def read(self, fh: pyfuse3.FileHandleT, off: int,  # type: ignore[override]
                   size: int) -> bytes | bytearray:
        h = self._handles.get(fh) or self._handle(fh)
        if isinstance(h.node, BlockFile):
            if off < 0:
                raise OSError(errno.EINVAL, "negative offset")
            with self._disk_request():
                return await h.node.disk.read(off, size, h.direct)
        if isinstance(h.node, BinAttribute):
            assert h.node.reader is not None
            length = h.node.length if h.limit is None else h.limit
            if off >= length:
                return b""
            return h.node.reader(off, min(size, length - off))
        if isinstance(h.node, DataFile):
            return h.node.read(off, size)
        if h.error is not None:
            raise h.error
        if h.data is None:
            raise OSError(errno.EACCES, "not open for reading")
        return h.data[off:off + size]

    @_errors
    async def write(self, fh: pyfuse3.FileHandleT, off: int, buf: bytes) -> int:
        h = self._handles.get(fh) or self._handle(fh)
        node = h.node
        if isinstance(node, BlockFile):
            if off < 0:
                raise OSError(errno.EINVAL, "negative offset")
            with self._disk_request():
                return await node.disk.write(off, buf, h.direct)
        try:
            if isinstance(node, BinAttribute):
                if node.writer is None:
                    raise OSError(errno.EACCES, "read-only")
                if off >= node.length:
                    raise OSError(errno.ENOSPC, "past the end of the attribute")
                return node.writer(off, buf[:node.length - off])
            if isinstance(node, DataFile):
                return node.write(off, bytes(buf))
            assert isinstance(node, Attribute)
            result = node.write(bytes(buf))
            if inspect.isawaitable(result):
                result = await result
            if isinstance(result, str):
                # a transaction file: what this open file reads next is the reply
                h.data, h.error = result.encode(), None
            return len(buf)
        finally:
            # a store that removed nodes (remove, unbind, delete) returns once the kernel
            # has forgotten their names, as a sysfs removal is complete when write returns
            if self.invalidator is not None and self.invalidator.pending:
                await self.invalidator.settled()

    @_errors
    async def fsync(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        h = self._handle(fh)
        if isinstance(h.node, BlockFile):
            with self._disk_request():
                await h.node.disk.flush()      # a flush request through the ring

    @_errors
    async def flush(self, fh: pyfuse3.FileHandleT) -> None:
        # Nothing to do at close (disks flush on fsync, stores act on write). ENOSYS makes
        # the kernel stop sending FLUSH on this connection (fs/fuse/file.c fuse_flush sets
        # fc->no_flush) and answer close() itself: one FLUSH per mount, not one per close.
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @_errors
    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        self._handles.pop(fh, None)

    @_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = s.f_bfree = s.f_bavail = 0
        s.f_files = len(self.tree)
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s
