"""Tree nodes: directories, text attributes, binary attributes, symlinks.

Rules kept here (reference/sysfs.md §0, design.md §3):

* a text attribute is generated when opened (:meth:`Attribute.render`), reports ``st_size``
  4096 and has the Linux mode (0444, 0644, 0200); a ``show`` that fails raises ``OSError``
  with the errno a read must return;
* a *static* text attribute (one that cannot change while its node exists: ids, class and
  vendor numbers, modaliases, fixed limits) is rendered once and kept, and reports its
  content's length as ``st_size`` instead, so that the kernel may cache it (README,
  "Attributes the kernel caches"); a writable attribute is never static;
* a bad value given to ``store`` raises ``OSError(EINVAL)`` and must change nothing;
* symlinks are stored as target *nodes* and rendered as relative paths at readlink time, so
  they always resolve inside the mount;
* inode numbers are allocated when a node is attached and never reused while the mount
  lives; a detached node stays resolvable by inode until the kernel forgets it.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Protocol

__all__ = [
    "ATTR_SIZE", "Node", "Directory", "Attribute", "BinAttribute", "Symlink", "Tree",
    "relpath_between", "BlockFile", "BlockDevice", "DataFile",
]

#: st_size of every text attribute (PAGE_SIZE; fs/sysfs/file.c)
ATTR_SIZE = 4096
ROOT_INODE = 1


class Node:
    __slots__ = ("name", "parent", "ino", "tree", "mtime_ns", "atime_ns", "ctime_ns")

    kind: int = 0  # stat.S_IF*

    def __init__(self, name: str) -> None:
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"bad node name {name!r}")
        self.name = name
        self.parent: Directory | None = None
        self.ino = 0
        self.tree: Tree | None = None
        self.mtime_ns = time.time_ns()
        self.atime_ns: int | None = None      # None: as mtime (until someone sets it)
        self.ctime_ns: int | None = None

    def set_times(self, atime_ns: int | None, mtime_ns: int | None) -> None:
        """``utimensat`` on the node: kernfs keeps the times it is given (and the change
        time becomes now), as it keeps them for any sysfs file."""
        if atime_ns is not None:
            self.atime_ns = atime_ns
        elif self.atime_ns is None:
            self.atime_ns = self.mtime_ns
        if mtime_ns is not None:
            self.mtime_ns = mtime_ns
        self.ctime_ns = time.time_ns()

    def times(self) -> tuple[int, int, int]:
        """(atime, mtime, ctime) in ns."""
        m = self.mtime_ns
        return (m if self.atime_ns is None else self.atime_ns, m,
                max(m, self.ctime_ns or 0))

    @property
    def mode(self) -> int:
        raise NotImplementedError

    def size(self) -> int:
        return 0

    def path(self) -> str:
        """Absolute path inside the mount, e.g. ``/sys/bus/vmbus``."""
        parts: list[str] = []
        node: Node | None = self
        while node is not None and node.parent is not None:
            parts.append(node.name)
            node = node.parent
        return "/" + "/".join(reversed(parts))

    def walk(self) -> Iterator[Node]:
        yield self


class Directory(Node):
    __slots__ = ("children", "perm")
    kind = stat.S_IFDIR

    def __init__(self, name: str, perm: int = 0o755) -> None:
        super().__init__(name)
        self.children: dict[str, Node] = {}
        self.perm = perm

    @property
    def mode(self) -> int:
        return stat.S_IFDIR | self.perm

    def add(self, node: Node) -> Node:
        if node.name in self.children:
            raise FileExistsError(errno.EEXIST, f"{self.path()}/{node.name} already exists")
        node.parent = self
        self.children[node.name] = node
        if self.tree is not None:
            self.tree.attach(node)
        self.mtime_ns = time.time_ns()
        return node

    def mkdir(self, name: str, perm: int = 0o755) -> Directory:
        node = Directory(name, perm)
        self.add(node)
        return node

    def dir(self, name: str) -> Directory:
        """The existing subdirectory ``name``, created if missing."""
        node = self.children.get(name)
        if node is None:
            return self.mkdir(name)
        if not isinstance(node, Directory):
            raise NotADirectoryError(errno.ENOTDIR, f"{node.path()} is not a directory")
        return node

    def makedirs(self, relpath: str) -> Directory:
        d: Directory = self
        for part in relpath.strip("/").split("/"):
            if part:
                d = d.dir(part)
        return d

    def remove(self, name: str) -> Node:
        node = self.children.pop(name)
        tree = self.tree
        if tree is not None:
            if tree.on_remove is not None and tree.lookup_count(node.ino):
                tree.on_remove(self.ino, name)
            tree.detach(node)
        node.parent = None
        self.mtime_ns = time.time_ns()
        return node

    def resolve(self, relpath: str) -> Node:
        """Follow a slash-separated path of child names (no symlinks, no ``..``)."""
        node: Node = self
        for part in relpath.strip("/").split("/"):
            if not part:
                continue
            if not isinstance(node, Directory) or part not in node.children:
                raise FileNotFoundError(errno.ENOENT, f"{self.path()}/{relpath}")
            node = node.children[part]
        return node

    def walk(self) -> Iterator[Node]:
        yield self
        for child in list(self.children.values()):
            yield from child.walk()


Show = Callable[[], str]
#: A store may be synchronous or return an awaitable (a bus operation such as unbind that
#: needs protocol round trips); the FUSE layer awaits it before answering the write. A store
#: that returns text makes the attribute a transaction file (as Linux's
#: ``simple_transaction_get``): a read on the same open file then returns that reply.
Store = Callable[[str], "Awaitable[str | None] | str | None"]


class Attribute(Node):
    """A text attribute. ``show`` returns the whole text (newline included).

    ``static``: the text cannot change while this node exists (nothing a store, a hot-plug,
    a driver bind or unbind, a ring or a counter does can change it; the node goes away
    with what it describes). Its first successful rendering is kept and served from then
    on, and ``st_size`` is that rendering's length: the FUSE layer lets the kernel cache
    the contents, and the kernel trims a cached file's size to where a read came up short,
    so 4096 would not stay what ``stat`` says. A failed ``show`` is not kept."""

    __slots__ = ("show", "store", "perm", "static", "_text")
    kind = stat.S_IFREG

    def __init__(self, name: str, show: Show | None, store: Store | None = None,
                 perm: int | None = None, *, static: bool = False) -> None:
        super().__init__(name)
        if show is None and store is None:
            raise ValueError(f"attribute {name} can neither be read nor written")
        if static and (store is not None or show is None):
            raise ValueError(f"attribute {name}: only a read-only attribute can be static")
        self.show = show
        self.store = store
        if perm is None:
            perm = (0o444 if show else 0) | (0o200 if store else 0)
        self.perm = perm
        self.static = static
        self._text: bytes | None = None

    @property
    def mode(self) -> int:
        return stat.S_IFREG | self.perm

    def size(self) -> int:
        if not self.static:
            return ATTR_SIZE
        try:
            return len(self.render())
        except OSError:
            return ATTR_SIZE      # not kept: a later open renders (and fails) again

    @property
    def readable(self) -> bool:
        return self.show is not None

    @property
    def writable(self) -> bool:
        return self.store is not None

    def render(self) -> bytes:
        """The text a reader sees; raises OSError(errno) when ``show`` fails."""
        if self._text is not None:
            return self._text
        if self.show is None:
            raise PermissionError(errno.EACCES, f"{self.path()} is write-only")
        text = self.show().encode()
        if self.static:
            self._text = text
        return text

    def write(self, data: bytes) -> Awaitable[str | None] | str | None:
        """Hand ``data`` to ``store``; the result may need awaiting (see :data:`Store`)."""
        if self.store is None:
            raise PermissionError(errno.EACCES, f"{self.path()} is read-only")
        try:
            text = data.decode()
        except UnicodeDecodeError:
            raise OSError(errno.EINVAL, "value is not valid UTF-8") from None
        return self.store(text)


class BinAttribute(Node):
    """A binary attribute with a real size that honours offsets (e.g. PCI ``config``).
    ``stat_size`` is what ``stat`` reports when it differs from the readable ``length``:
    Linux declares some binary attributes with size 0 (SCSI ``inquiry``, ``vpd_pg83``)
    and reads still return their bytes."""

    __slots__ = ("length", "reader", "writer", "perm", "public_length", "stat_size")
    kind = stat.S_IFREG

    def __init__(self, name: str, length: int, reader: Callable[[int, int], bytes] | None,
                 writer: Callable[[int, bytes], int] | None = None,
                 perm: int | None = None, public_length: int | None = None,
                 stat_size: int | None = None) -> None:
        super().__init__(name)
        self.length = length
        self.reader = reader
        self.writer = writer
        #: how much a reader without CAP_SYS_ADMIN (here: not root) gets, e.g. the first 64
        #: bytes of PCI ``config``; None: all of it
        self.public_length = public_length
        if perm is None:
            perm = (0o444 if reader else 0) | (0o200 if writer else 0)
        self.perm = perm
        self.stat_size = stat_size

    @property
    def mode(self) -> int:
        return stat.S_IFREG | self.perm

    def size(self) -> int:
        return self.length if self.stat_size is None else self.stat_size


class DataFile(Node):
    """A regular file whose bytes live in memory: not sysfs, but a file of the guest's own
    that its software reads and writes (``/var/lib/hyperv/.kvp_pool_N``). It has its real
    size, which changes under writes and ``truncate``; writes past the end fill the gap with
    zeros, as a file does. ``max_size`` bounds it (``EFBIG`` past it), since the bytes are
    the service's memory. ``data`` is shared with whoever owns the file's meaning."""

    __slots__ = ("data", "max_size", "perm")
    kind = stat.S_IFREG

    def __init__(self, name: str, data: bytearray, max_size: int, perm: int = 0o644) -> None:
        super().__init__(name)
        self.data = data
        self.max_size = max_size
        self.perm = perm

    @property
    def mode(self) -> int:
        return stat.S_IFREG | self.perm

    def size(self) -> int:
        return len(self.data)

    def read(self, offset: int, size: int) -> bytes:
        if offset < 0:
            raise OSError(errno.EINVAL, "negative offset")
        return bytes(self.data[offset:offset + size])

    def write(self, offset: int, buf: bytes) -> int:
        if offset < 0:
            raise OSError(errno.EINVAL, "negative offset")
        if offset + len(buf) > self.max_size:
            raise OSError(errno.EFBIG, f"{self.path()} is limited to {self.max_size} bytes")
        if offset > len(self.data):
            self.data.extend(bytes(offset - len(self.data)))
        self.data[offset:offset + len(buf)] = buf
        self.mtime_ns = time.time_ns()
        return len(buf)

    def truncate(self, size: int) -> None:
        if size < 0:
            raise OSError(errno.EINVAL, "negative size")
        if size > self.max_size:
            raise OSError(errno.EFBIG, f"{self.path()} is limited to {self.max_size} bytes")
        if size < len(self.data):
            del self.data[size:]
        else:
            self.data.extend(bytes(size - len(self.data)))
        self.mtime_ns = time.time_ns()


class BlockDevice(Protocol):
    """What a ``/dev/<disk>`` file needs from the block layer."""

    readonly: bool

    def size_bytes(self) -> int: ...
    async def read(self, offset: int, size: int, direct: bool = False) -> bytes | bytearray: ...
    async def write(self, offset: int, data: bytes, direct: bool = False) -> int: ...
    async def flush(self) -> None: ...


class BlockFile(Node):
    """``/dev/<disk>``: a regular file the size of the disk whose I/O goes to the block
    layer (a device node would send it to a kernel driver instead; design.md §3)."""

    __slots__ = ("disk",)
    kind = stat.S_IFREG

    def __init__(self, name: str, disk: BlockDevice) -> None:
        super().__init__(name)
        self.disk = disk

    @property
    def mode(self) -> int:
        return stat.S_IFREG | 0o660

    def size(self) -> int:
        return self.disk.size_bytes()


class Symlink(Node):
    """A symlink to another node; rendered relative to this link's directory."""

    __slots__ = ("target",)
    kind = stat.S_IFLNK

    def __init__(self, name: str, target: Node) -> None:
        super().__init__(name)
        self.target = target

    @property
    def mode(self) -> int:
        return stat.S_IFLNK | 0o777

    def readlink(self) -> str:
        if self.parent is None:
            raise FileNotFoundError(errno.ENOENT, "detached symlink")
        if self.target.tree is None:
            # The target went away (hot-unplug): a dangling link, as in Linux.
            raise FileNotFoundError(errno.ENOENT, f"{self.path()}: target removed")
        return relpath_between(self.parent, self.target)

    def size(self) -> int:
        try:
            return len(self.readlink().encode())
        except OSError:
            return 0


def relpath_between(start: Directory, target: Node) -> str:
    """The link text kernfs writes (``kernfs_get_target_path``): climb from ``start`` until
    reaching an ancestor of the target's *parent*, then name the way down. A link to an
    ancestor therefore reads ``../../../vbd-51712``, not ``../..``, as in Linux."""
    if target.parent is None:
        return os.path.relpath("/", start.path())
    up = os.path.relpath(target.parent.path(), start.path())
    return target.name if up == "." else f"{up}/{target.name}"


class Tree:
    """The whole mounted tree: the root directory and the inode table."""

    def __init__(self) -> None:
        self.root = Directory("root")
        self.root.ino = ROOT_INODE
        self.root.tree = self
        self._inodes: dict[int, Node] = {ROOT_INODE: self.root}
        self._next_ino = ROOT_INODE + 1
        self._lookups: dict[int, int] = {}
        self._detached: dict[int, Node] = {}
        #: Called with (parent inode, name) when an entry the kernel has looked up leaves
        #: the tree, so that the mount can drop its cached dentry at once.
        self.on_remove: Callable[[int, str], None] | None = None

    def attach(self, node: Node) -> None:
        # a node added alone (nearly every one: a device's tree is built node by node)
        # without walking it, which costs a generator per node
        nodes = node.walk() if isinstance(node, Directory) and node.children else (node,)
        for n in nodes:
            n.tree = self
            if n.ino == 0:
                n.ino = self._next_ino
                self._next_ino += 1
            self._inodes[n.ino] = n

    def detach(self, node: Node) -> None:
        for n in node.walk():
            self._inodes.pop(n.ino, None)
            n.tree = None
            if self._lookups.get(n.ino):
                self._detached[n.ino] = n   # the kernel still holds it; keep until forget

    def get(self, ino: int) -> Node:
        node = self._inodes.get(ino) or self._detached.get(ino)
        if node is None:
            raise FileNotFoundError(errno.ENOENT, f"no inode {ino}")
        return node

    def is_live(self, node: Node) -> bool:
        return node.tree is self

    # kernel lookup counts (FUSE lookup/forget)
    def remember(self, ino: int) -> None:
        self._lookups[ino] = self._lookups.get(ino, 0) + 1

    def forget(self, ino: int, nlookup: int) -> None:
        left = self._lookups.get(ino, 0) - nlookup
        if left > 0:
            self._lookups[ino] = left
        else:
            self._lookups.pop(ino, None)
            self._detached.pop(ino, None)

    def lookup_count(self, ino: int) -> int:
        return self._lookups.get(ino, 0)

    def resolve(self, path: str) -> Node:
        return self.root.resolve(path)

    def __len__(self) -> int:
        return len(self._inodes)
