"""Image files on the host: created private and whole, checked before they are served.

* A new image is created atomically: an unnamed file in the image's directory
  (``O_TMPFILE``), sized with ``ftruncate`` (sparse), synced, then given its name with
  ``linkat``, which never replaces an existing file. A crash at any point leaves either no
  image or a complete one, never a short file. Where the filesystem has no ``O_TMPFILE`` a
  hidden temporary name is linked instead.
* New images are mode 0600 and state directories 0700: a disk's bytes are readable by its
  owner only. An existing image keeps its mode; :func:`readable_by_others` says when users
  other than its owner can read it (its mode lets group or others read, and every directory
  above it lets them through), so the caller can warn.
* :func:`size_problem` says why an existing image cannot be a disk (not a positive multiple
  of the sector size); :func:`largest_file` finds the largest size a filesystem accepts for a
  file, so a ``size`` no file there can have is refused before anything is created.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

__all__ = ["create_sparse", "readable_by_others", "size_problem", "largest_file",
           "too_large", "IMAGE_MODE", "STATE_DIR_MODE", "make_state_dir"]

IMAGE_MODE = 0o600
STATE_DIR_MODE = 0o700
#: the largest offset ``off_t`` can hold; no file anywhere is larger
OFF_MAX = (1 << 63) - 1


def make_state_dir(path: Path) -> None:
    """Create ``path`` (and missing parents) if absent, the directory itself 0700; an
    existing directory keeps its mode."""
    path.mkdir(mode=STATE_DIR_MODE, parents=True, exist_ok=True)


def _unnamed(directory: Path) -> tuple[int, Path | None]:
    """An empty file in ``directory``, mode 0600: unnamed when the filesystem can
    (``O_TMPFILE``), else with a hidden temporary name (returned, to be removed)."""
    flags = os.O_RDWR | os.O_CLOEXEC
    try:
        return os.open(directory, flags | os.O_TMPFILE, IMAGE_MODE), None
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
    for n in range(100):
        tmp = directory / f".vbusfs-new-{os.getpid()}-{n}.tmp"
        try:
            return os.open(tmp, flags | os.O_CREAT | os.O_EXCL, IMAGE_MODE), tmp
        except FileExistsError:
            continue
    raise OSError(errno.EEXIST, f"no free temporary name in {directory}")


def _set_size(fd: int, size: int) -> None:
    if size > OFF_MAX:
        raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
    os.ftruncate(fd, size)


def create_sparse(path: Path, size: int) -> None:
    """Create ``path`` as a sparse file of ``size`` bytes, mode 0600, atomically. Raises
    FileExistsError if something else created ``path`` first (it is left alone)."""
    fd, tmp = _unnamed(path.parent)
    try:
        _set_size(fd, size)
        os.fsync(fd)                 # the size is on disk before the name is
        if tmp is None:
            # linkat(AT_SYMLINK_FOLLOW) of /proc/self/fd/N names the unnamed file (a
            # src_dir_fd makes Python call linkat; plain link() would not follow)
            proc = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.link(str(fd), path, src_dir_fd=proc, follow_symlinks=True)
            finally:
                os.close(proc)
        else:
            os.link(tmp, path)
    finally:
        os.close(fd)
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)                # and the name is on disk when we return
    finally:
        os.close(dfd)


def readable_by_others(path: Path) -> bool:
    """Whether users other than the owner of ``path`` can read it: its mode gives group or
    others read permission and no directory above it shuts them out (a directory without
    any group or other search bit stops everyone but its owner)."""
    real = Path(os.path.realpath(path))
    if not os.stat(real).st_mode & (stat.S_IRGRP | stat.S_IROTH):
        return False
    for parent in real.parents:
        if not os.stat(parent).st_mode & (stat.S_IXGRP | stat.S_IXOTH):
            return False
    return True


def size_problem(path: Path, size: int, sector_size: int) -> str | None:
    """Why an image of ``size`` bytes cannot be a disk with ``sector_size``-byte sectors,
    or None: a disk is a whole, positive number of sectors."""
    if size > 0 and size % sector_size == 0:
        return None
    return (f"{path}: size {size} is not a positive multiple of the {sector_size}-byte "
            "sector size")


def _fits(fd: int, size: int) -> bool:
    try:
        _set_size(fd, size)
    except OSError as e:
        if e.errno in (errno.EFBIG, errno.EINVAL):
            return False
        raise
    return True


def too_large(directory: Path, size: int) -> bool:
    """Whether no file of ``size`` bytes can exist in ``directory``: tried on a file no one
    sees, sized sparse (free space does not matter; the filesystem's limit on a file's
    size does). Raises OSError when the directory cannot be tried (not writable, ...)."""
    fd, tmp = _unnamed(directory)
    try:
        return not _fits(fd, size)
    finally:
        os.close(fd)
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def largest_file(directory: Path) -> int:
    """The largest size a file in ``directory`` may have (the filesystem's ``s_maxbytes``),
    found by sizing a file no one sees; 4 KiB granular."""
    fd, tmp = _unnamed(directory)
    try:
        lo, hi = 0, OFF_MAX // 4096          # in 4 KiB units: lo fits, hi + 1 does not
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if _fits(fd, mid * 4096):
                lo = mid
            else:
                hi = mid - 1
        return lo * 4096
    finally:
        os.close(fd)
        if tmp is not None:
            tmp.unlink(missing_ok=True)
