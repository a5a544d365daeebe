"""Calling the FUSE adapter's handlers directly, as the kernel would, without a mount."""

from __future__ import annotations

import pyfuse3
import pytest

from vbusfs.fs import VbusFS

CTX = None  # handlers never look at the request context


async def lookup(fs: VbusFS, path: str) -> pyfuse3.EntryAttributes:
    """LOOKUP each component of ``path`` from the root, as a path walk does."""
    ino = pyfuse3.ROOT_INODE
    attr = None
    for part in path.split("/"):
        attr = await fs.lookup(ino, part.encode(), CTX)  # type: ignore[arg-type]
        ino = attr.st_ino
    assert attr is not None
    return attr


async def errno_of(coro: object) -> int:
    """The errno a handler answers (it must fail)."""
    with pytest.raises(pyfuse3.FUSEError) as e:
        await coro  # type: ignore[misc]
    return e.value.errno
