"""Rules a user meets on the mounted tree (issue 15 items 6 and 7): direct I/O on a disk
must be whole logical blocks, as on a real block device (a loop device of the same size
and block size is the reference, run side by side), and the tree's shape cannot be changed
(the errnos Linux's sysfs gives, fs/namei.c and kernfs)."""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from tests.conftest import Mounted, mountctl, service_log_problems

CONFIG = """\
[machine]
name = "rules"
state_dir = "st"
[xen]
[[xen.vbd]]
vdev = "xvda"
size = "8M"
[[xen.vbd]]
vdev = "xvdb"
size = "8M"
sector_size = 4096
[pci]
[[pci.device]]
type = "virtio-blk"
size = "8M"
"""
SIZE = 8 << 20


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mounted]:
    base = tmp_path_factory.mktemp("rules")
    (base / "m.toml").write_text(CONFIG)
    mp = base / "m"
    mp.mkdir()
    env = dict(os.environ)
    mountctl("up", "-d", "-c", str(base / "m.toml"), str(mp), env=env, check=True)
    m = Mounted(mp, env)
    try:
        yield m
    finally:
        if m.down().returncode != 0:
            subprocess.run(["fusermount3", "-u", "-z", str(mp)], check=False)
    problems = service_log_problems(base / "st/vbusfs.log", [])
    if problems:
        pytest.fail("service log check:\n  " + "\n  ".join(problems), pytrace=False)


@pytest.fixture(scope="module")
def loops(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[int, str]]:
    """Reference block devices: loop devices of the disks' size, one per block size."""
    if shutil.which("losetup") is None:
        pytest.skip("losetup (util-linux) is not installed")
    base = tmp_path_factory.mktemp("loops")
    devs: dict[int, str] = {}
    try:
        for lbs in (512, 4096):
            img = base / f"ref{lbs}.img"
            with open(img, "wb") as f:
                f.truncate(SIZE)
            out = subprocess.run(["losetup", "-f", "--show", "--sector-size", str(lbs),
                                  str(img)], capture_output=True, text=True)
            if out.returncode != 0:
                pytest.skip(f"no loop device here: {out.stderr.strip()}")
            devs[lbs] = out.stdout.strip()
        yield devs
    finally:
        for dev in devs.values():
            subprocess.run(["losetup", "-d", dev], check=False)


def _try(fn: Callable[[], int]) -> int | str:
    try:
        return fn()
    except OSError as e:
        return errno.errorcode[e.errno or 0]


#: (offset, length) pairs: aligned to 512 and 4096 or not, at the end and past it
CASES = [(0, 4096), (512, 512), (4096, 8192), (100, 4096), (0, 1000), (512, 4096),
         (4096, 512), (SIZE - 4096, 4096), (SIZE - 512, 512), (SIZE, 4096), (SIZE, 1000),
         (SIZE + 100, 512)]


def _direct_io(path: str) -> list[tuple[int | str, int | str]]:
    """Each case read then written with O_DIRECT, from page-aligned (mmap) buffers."""
    buf = mmap.mmap(-1, 1 << 16)
    out = []
    rfd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    wfd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        for off, n in CASES:
            view = memoryview(buf)[:n]
            out.append((_try(lambda v=view, o=off: os.preadv(rfd, [v], o)),
                        _try(lambda v=view, o=off: os.pwritev(wfd, [v], o))))
            view.release()
    finally:
        os.close(rfd)
        os.close(wfd)
    return out


@pytest.mark.mount
@pytest.mark.parametrize(("disk", "lbs"), [("xvda", 512), ("xvdb", 4096), ("vda", 512)])
def test_direct_io_is_whole_blocks_as_on_a_block_device(rig: Mounted, loops: dict[int, str],
                                                        disk: str, lbs: int) -> None:
    assert (rig.path / f"sys/block/{disk}/queue/logical_block_size").read_text() == f"{lbs}\n"
    got = _direct_io(str(rig.path / "dev" / disk))
    want = _direct_io(loops[lbs])
    assert got == want
    assert ("EINVAL", "EINVAL") in want and (4096, 4096) in want     # both kinds happen


@pytest.mark.mount
def test_dd_direct_at_a_misaligned_size_fails_with_einval(rig: Mounted) -> None:
    dev = rig.path / "dev/xvda"
    for args in (["if=/dev/zero", f"of={dev}", "oflag=direct", "bs=1000", "count=1"],
                 [f"if={dev}", "of=/dev/null", "iflag=direct", "bs=1000", "count=1"],
                 [f"if={dev}", "of=/dev/null", "iflag=direct,skip_bytes", "skip=100",
                  "bs=4096", "count=1"]):
        out = subprocess.run(["dd", *args], capture_output=True, text=True)
        assert out.returncode == 1 and "Invalid argument" in out.stderr, (args, out.stderr)
    for args in (["if=/dev/urandom", f"of={dev}", "oflag=direct", "bs=4096", "count=4"],
                 [f"if={dev}", "of=/dev/null", "iflag=direct", "bs=4096", "count=4"],
                 # buffered I/O stays byte-granular
                 [f"if={dev}", "of=/dev/null", "bs=1000", "count=3"],
                 ["if=/dev/zero", f"of={dev}", "bs=1000", "count=3", "conv=notrunc"]):
        out = subprocess.run(["dd", *args], capture_output=True, text=True)
        assert out.returncode == 0, (args, out.stderr)


@pytest.mark.mount
def test_a_misaligned_buffer_cannot_be_seen_through_fuse(rig: Mounted,
                                                        loops: dict[int, str]) -> None:
    """A block device also refuses a buffer whose address is not aligned to the queue's DMA
    alignment; a FUSE server gets the data, never the caller's address, so vbusfs accepts
    it (README: Filesystem rules)."""
    raw = bytearray(8192 + 1)
    odd = memoryview(raw)[1:4097]
    for path, want in ((loops[512], "EINVAL"), (str(rig.path / "dev/xvda"), 4096)):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            assert _try(lambda f=fd: os.preadv(f, [odd], 0)) == want, path
        finally:
            os.close(fd)


def _errno(fn: Callable[[], object]) -> str:
    try:
        fn()
    except OSError as e:
        return errno.errorcode[e.errno or 0]
    return "ok"


@pytest.mark.mount
def test_the_tree_cannot_be_changed_errnos_as_sysfs(rig: Mounted) -> None:
    """What Linux's sysfs answers root (kernfs has none of these operations: the VFS says
    EPERM, and EACCES for creating a file in a directory without ->create)."""
    m = rig.path
    bus = m / "sys/bus/xen"
    assert bus.is_dir() and (bus / "drivers_probe").exists()
    got = {
        "mkdir": _errno(lambda: os.mkdir(bus / "foo")),
        "create": _errno(lambda: os.close(os.open(bus / "newfile", os.O_CREAT | os.O_WRONLY))),
        "unlink": _errno(lambda: os.unlink(bus / "drivers_probe")),
        "rmdir": _errno(lambda: os.rmdir(bus / "drivers")),
        "symlink": _errno(lambda: os.symlink("x", bus / "y")),
        "rename": _errno(lambda: os.rename(bus / "drivers_probe", bus / "probe2")),
        "link": _errno(lambda: os.link(bus / "drivers_probe", bus / "hard")),
        "mknod": _errno(lambda: os.mkfifo(bus / "fifo")),
        "unlink a disk": _errno(lambda: os.unlink(m / "dev/xvda")),
        "create in /dev": _errno(lambda: os.close(os.open(m / "dev/new", os.O_CREAT))),
        "rename a disk": _errno(lambda: os.rename(m / "dev/xvda", m / "dev/xvdz")),
    }
    assert got == {"mkdir": "EPERM", "create": "EACCES", "unlink": "EPERM", "rmdir": "EPERM",
                   "symlink": "EPERM", "rename": "EPERM", "link": "EPERM", "mknod": "EPERM",
                   "unlink a disk": "EPERM", "create in /dev": "EACCES",
                   "rename a disk": "EPERM"}
    # and the shell says so as it does on /sys
    out = subprocess.run(["mkdir", str(bus / "foo")], capture_output=True, text=True)
    assert "Operation not permitted" in out.stderr
    out = subprocess.run(["touch", str(bus / "newfile")], capture_output=True, text=True)
    assert "Permission denied" in out.stderr


@pytest.mark.mount
def test_touch_d_keeps_the_time_given_as_sysfs_and_devtmpfs_do(rig: Mounted) -> None:
    for path in (rig.path / "dev/xvda", rig.path / "sys/bus/xen/drivers_probe"):
        before = os.stat(path)
        subprocess.run(["touch", "-d", "2001-02-03 04:05:06", str(path)], check=True)
        st = os.stat(path)
        when = time.mktime((2001, 2, 3, 4, 5, 6, 0, 0, -1))
        assert st.st_mtime == st.st_atime == when, path
        assert st.st_ctime >= before.st_ctime and st.st_ctime > when
        assert st.st_mode == before.st_mode and st.st_size == before.st_size
        os.utime(path, ns=(5, 7))                     # atime and mtime, separately
        assert (os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns) == (5, 7)
