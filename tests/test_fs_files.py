"""The FUSE adapter's handlers for in-memory data files and transaction files, called
directly (no mount): sizes, offsets, truncation, limits, never-cached attributes, and the
reply a write leaves for a read on the same open file."""

from __future__ import annotations

import errno
import os
from types import SimpleNamespace

import pyfuse3

from tests.fs_calls import CTX, errno_of, lookup
from vbusfs.fs import VbusFS
from vbusfs.sysfs import Attribute, DataFile, Tree


def build() -> tuple[VbusFS, DataFile, list[str]]:
    t = Tree()
    d = t.root.makedirs("var/lib/x")
    f = DataFile("pool", bytearray(b"abc"), max_size=100)
    d.add(f)
    seen: list[str] = []

    async def store(text: str) -> str:
        if text.strip() == "bad":
            raise OSError(errno.EINVAL, "bad")
        seen.append(text)
        return f"reply to {text.strip()}\n"
    d.add(Attribute("tx", lambda: "last\n", store))
    return VbusFS(t), f, seen


async def test_data_file_reads_writes_and_grows() -> None:
    fs, f, _ = build()
    a = await lookup(fs, "var/lib/x/pool")
    assert a.st_size == 3 and a.st_mode & 0o777 == 0o644 and a.attr_timeout == 0
    fi = await fs.open(a.st_ino, os.O_RDWR, CTX)  # type: ignore[arg-type]
    assert await fs.read(fi.fh, 1, 10) == b"bc"
    assert await fs.write(fi.fh, 5, b"XY") == 2            # a gap is zeros, as in a file
    assert bytes(f.data) == b"abc\0\0XY"
    assert (await fs.getattr(a.st_ino, CTX)).st_size == 7  # type: ignore[arg-type]
    assert await fs.read(fi.fh, 7, 10) == b""


async def test_data_file_truncate_and_limits() -> None:
    fs, f, _ = build()
    a = await lookup(fs, "var/lib/x/pool")
    attr = pyfuse3.EntryAttributes()
    # what the kernel sends for truncate(2) (pyfuse3's SetattrFields is read-only)
    fields = SimpleNamespace(update_size=True, update_mode=False, update_uid=False,
                             update_gid=False, update_atime=False, update_mtime=False,
                             update_ctime=False)
    attr.st_size = 1
    await fs.setattr(a.st_ino, attr, fields, None, CTX)  # type: ignore[arg-type]
    assert bytes(f.data) == b"a"
    attr.st_size = 4
    await fs.setattr(a.st_ino, attr, fields, None, CTX)  # type: ignore[arg-type]
    assert bytes(f.data) == b"a\0\0\0"
    attr.st_size = 101
    assert await errno_of(fs.setattr(a.st_ino, attr, fields, None, CTX)) == errno.EFBIG
    fi = await fs.open(a.st_ino, os.O_WRONLY, CTX)  # type: ignore[arg-type]
    assert await errno_of(fs.write(fi.fh, 99, b"xy")) == errno.EFBIG
    assert bytes(f.data) == b"a\0\0\0"                    # a refused write changes nothing


async def test_transaction_reply_on_the_same_open_file() -> None:
    fs, _, seen = build()
    a = await lookup(fs, "var/lib/x/tx")
    fi = await fs.open(a.st_ino, os.O_RDWR, CTX)  # type: ignore[arg-type]
    assert await fs.read(fi.fh, 0, 100) == b"last\n"      # before a write: show()
    assert await fs.write(fi.fh, 0, b"ping\n") == 5
    assert await fs.read(fi.fh, 0, 100) == b"reply to ping\n"
    other = await fs.open(a.st_ino, os.O_RDONLY, CTX)  # type: ignore[arg-type]
    assert await fs.read(other.fh, 0, 100) == b"last\n"   # another open file: show()
    assert await errno_of(fs.write(fi.fh, 0, b"bad")) == errno.EINVAL
    assert seen == ["ping\n"]
