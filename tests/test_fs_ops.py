"""The FUSE adapter's handlers called directly (no mount): errno mapping and file semantics."""

import errno
import logging
import os

import pyfuse3
import pytest

from tests.conftest import Logs
from tests.fs_calls import CTX, errno_of, lookup
from vbusfs.fs import VbusFS
from vbusfs.sysfs import Attribute, BinAttribute, Tree


def build() -> tuple[VbusFS, Tree, dict[str, str]]:
    t = Tree()
    d = t.root.makedirs("sys/x")
    state = {"v": "a"}

    def store(text: str) -> None:
        if text.strip() not in ("a", "b"):
            raise OSError(errno.EINVAL, "bad")
        state["v"] = text.strip()

    d.add(Attribute("ro", lambda: "1\n"))
    d.add(Attribute("rw", lambda: state["v"] + "\n", store))
    d.add(Attribute("boom", lambda: 1 // 0 and ""))   # a bug in a show function
    d.add(Attribute("gone", lambda: (_ for _ in ()).throw(OSError(errno.ENODEV, "x"))))
    for i in range(50):
        d.add(Attribute(f"f{i:02}", lambda: "\n"))
    return VbusFS(t), t, state


async def test_lookup_missing_is_enoent() -> None:
    fs, _, _ = build()
    assert await errno_of(lookup(fs, "sys/nope")) == errno.ENOENT


async def test_read_and_generated_at_open() -> None:
    fs, _, state = build()
    a = await lookup(fs, "sys/x/rw")
    assert a.st_size == 4096 and a.st_mode & 0o777 == 0o644
    fi = await fs.open(a.st_ino, os.O_RDONLY, CTX)  # type: ignore[arg-type]
    state["v"] = "b"                                 # a change after open is not seen
    assert await fs.read(fi.fh, 0, 4096) == b"a\n"
    assert await fs.read(fi.fh, 1, 10) == b"\n" and await fs.read(fi.fh, 2, 10) == b""
    assert fi.direct_io


async def test_write_rules() -> None:
    fs, _, state = build()
    ro = await lookup(fs, "sys/x/ro")
    assert await errno_of(fs.open(ro.st_ino, os.O_WRONLY, CTX)) == errno.EACCES  # type: ignore[arg-type]
    rw = await lookup(fs, "sys/x/rw")
    fi = await fs.open(rw.st_ino, os.O_WRONLY, CTX)  # type: ignore[arg-type]
    assert await errno_of(fs.write(fi.fh, 0, b"zzz\n")) == errno.EINVAL
    assert state["v"] == "a"
    assert await fs.write(fi.fh, 0, b"b\n") == 2 and state["v"] == "b"


async def test_show_errors_reach_read_and_bugs_become_eio(logs: Logs) -> None:
    logs.expect(r"/sys/x/boom: show failed", logging.ERROR)
    fs, _, _ = build()
    gone = await lookup(fs, "sys/x/gone")
    fi = await fs.open(gone.st_ino, os.O_RDONLY, CTX)  # type: ignore[arg-type]
    assert await errno_of(fs.read(fi.fh, 0, 4096)) == errno.ENODEV
    boom = await lookup(fs, "sys/x/boom")
    fi = await fs.open(boom.st_ino, os.O_RDONLY, CTX)  # type: ignore[arg-type]
    assert await errno_of(fs.read(fi.fh, 0, 4096)) == errno.EIO


async def test_readdir_offsets_resume(monkeypatch: pytest.MonkeyPatch) -> None:
    fs, _, _ = build()
    d = await lookup(fs, "sys/x")
    fh = await fs.opendir(d.st_ino, CTX)  # type: ignore[arg-type]
    seen: list[tuple[bytes, int]] = []

    def reply(token: object, name: bytes, attr: object, next_id: int) -> bool:
        seen.append((name, next_id))
        return len(seen) % 7 != 0          # the kernel buffer fills every 7 entries

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)
    names: list[bytes] = []
    start = 0
    while True:
        before = len(seen)
        await fs.readdir(fh, start, None)  # type: ignore[arg-type]
        batch = seen[before:]
        if not batch:
            break
        accepted = batch if len(seen) % 7 else batch[:-1]
        names += [n for n, _ in accepted]
        start = accepted[-1][1] if accepted else batch[-1][1] - 1
    assert len(names) == 54 and len(set(names)) == 54


class _Ctx:
    """The part of pyfuse3.RequestContext the handlers read: who is asking."""

    def __init__(self, uid: int) -> None:
        self.uid, self.gid, self.pid, self.umask = uid, uid, 1, 0o022


async def test_binary_attributes_honour_offsets_and_the_public_length() -> None:
    """PCI ``config``: root reads all of it at any offset; anyone else the first 64 bytes
    (pci_read_config), whatever offset and size they ask for."""
    t = Tree()
    data = bytes(range(256))
    t.root.makedirs("sys/x").add(BinAttribute(
        "config", 256, lambda off, n: data[off:off + n], perm=0o644, public_length=64))
    fs = VbusFS(t)
    ino = (await lookup(fs, "sys/x/config")).st_ino
    root = await fs.open(ino, os.O_RDONLY, _Ctx(0))  # type: ignore[arg-type]
    assert await fs.read(root.fh, 0, 4096) == data
    assert await fs.read(root.fh, 0x40, 4) == data[0x40:0x44]
    user = await fs.open(ino, os.O_RDONLY, _Ctx(65534))  # type: ignore[arg-type]
    assert await fs.read(user.fh, 0, 4096) == data[:64]
    assert await fs.read(user.fh, 60, 16) == data[60:64]
    assert await fs.read(user.fh, 64, 16) == b""


async def test_changes_to_the_tree_get_sysfs_errnos() -> None:
    """kernfs has no mkdir, rmdir, unlink, rename, symlink, link or mknod (the VFS answers
    EPERM) and no create (open(O_CREAT) of a new name is EACCES): not pyfuse3's ENOSYS."""
    fs, _, _ = build()
    d = (await lookup(fs, "sys/x")).st_ino
    ro = (await lookup(fs, "sys/x/ro")).st_ino
    assert await errno_of(fs.mkdir(d, b"n", 0o755, CTX)) == errno.EPERM  # type: ignore[arg-type]
    assert await errno_of(fs.rmdir(d, b"n", CTX)) == errno.EPERM  # type: ignore[arg-type]
    assert await errno_of(fs.unlink(d, b"ro", CTX)) == errno.EPERM  # type: ignore[arg-type]
    assert await errno_of(fs.rename(d, b"ro", d, b"r2", 0, CTX)) == errno.EPERM  # type: ignore[arg-type]
    assert await errno_of(fs.symlink(d, b"s", b"ro", CTX)) == errno.EPERM  # type: ignore[arg-type]
    assert await errno_of(fs.link(ro, d, b"h", CTX)) == errno.EPERM  # type: ignore[arg-type]
    assert await errno_of(fs.mknod(d, b"m", 0o10644, 0, CTX)) == errno.EPERM  # type: ignore[arg-type]
    assert await errno_of(fs.create(d, b"c", 0o644, os.O_WRONLY, CTX)) == errno.EACCES  # type: ignore[arg-type]


async def test_static_attribute_cached_by_the_kernel_live_one_not() -> None:
    t = Tree()
    d = t.root.makedirs("sys/x")
    d.add(Attribute("vendor", lambda: "0x1414\n", static=True))
    d.add(Attribute("state", lambda: "3\n"))
    d.add(Attribute("fails", lambda: (_ for _ in ()).throw(OSError(errno.ENODEV, "x")),
                    static=True))
    fs = VbusFS(t)
    a = await lookup(fs, "sys/x/vendor")
    assert a.st_size == 7 and a.entry_timeout >= 3600 and a.attr_timeout >= 3600
    fi = await fs.open(a.st_ino, os.O_RDONLY, CTX)  # type: ignore[arg-type]
    assert not fi.direct_io and fi.keep_cache
    assert await fs.read(fi.fh, 0, 4096) == b"0x1414\n"
    live = await lookup(fs, "sys/x/state")
    assert live.st_size == 4096
    fi = await fs.open(live.st_ino, os.O_RDONLY, CTX)  # type: ignore[arg-type]
    assert fi.direct_io and not fi.keep_cache
    # a static attribute whose show fails is not cached: the error reaches each read
    bad = await lookup(fs, "sys/x/fails")
    assert bad.st_size == 4096
    fi = await fs.open(bad.st_ino, os.O_RDONLY, CTX)  # type: ignore[arg-type]
    assert fi.direct_io and await errno_of(fs.read(fi.fh, 0, 4096)) == errno.ENODEV
    assert (await lookup(fs, "sys/x")).attr_timeout == 1.0     # directories: one second
    assert fs.requests["lookup"] == 11 and fs.requests["open"] == 3   # a walk from the root each


async def test_flush_answered_enosys() -> None:
    """The kernel stops sending FLUSH on a connection after its first ENOSYS."""
    fs = VbusFS(Tree())
    assert await errno_of(fs.flush(1)) == errno.ENOSYS  # type: ignore[arg-type]
