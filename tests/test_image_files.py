"""Image files on the host: private when created, created whole, refused when they cannot be
a disk, and sizes no file can have refused before anything is created (issue 15 items 1, 2,
4). Expected modes and limits come from the kernel itself (``stat``, coreutils
``truncate``), not from the code under test."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from backends.storage.raw import ImageError, RawImage
from mountctl.preflight import check_images
from tests.conftest import ROOT, Logs
from vbusfs.config import ConfigError, parse


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory everyone can pass through, as /var/lib is (pytest's own are 0700)."""
    d = Path(tempfile.mkdtemp(prefix="vbusfs-open-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d)


def test_a_new_image_is_owner_only(open_dir: Path) -> None:
    img = RawImage(open_dir / "new.img", size=1 << 20, readonly=False)
    img.close()
    assert _mode(open_dir / "new.img") == 0o600
    assert os.stat(open_dir / "new.img").st_size == 1 << 20
    assert os.stat(open_dir / "new.img").st_blocks == 0          # sparse


def test_a_new_image_is_whole_or_absent_after_a_crash(open_dir: Path) -> None:
    """The process dies (no clean-up runs) just as the new image is being sized: no file of
    the wrong size is left under the image's name."""
    path = open_dir / "crash.img"
    code = ("import os, sys; from pathlib import Path\n"
            "from backends.storage.raw import RawImage\n"
            "os.ftruncate = lambda fd, n: os._exit(9)\n"
            f"RawImage(Path({str(path)!r}), size=1 << 20, readonly=False)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 9, out.stderr
    assert not path.exists()
    assert os.listdir(open_dir) == []                           # no temporary left either
    img = RawImage(path, size=1 << 20, readonly=False)          # the next start creates it
    img.close()
    assert os.stat(path).st_size == 1 << 20


def test_an_existing_image_keeps_its_mode_but_others_reading_it_is_warned(
        open_dir: Path, tmp_path: Path, logs: Logs) -> None:
    exposed = open_dir / "old.img"
    exposed.write_bytes(bytes(1 << 20))
    exposed.chmod(0o644)
    logs.expect(r"old\.img: users other than its owner can read this image \(mode 0644\)",
                logging.WARNING)
    RawImage(exposed, size=1 << 20, readonly=False).close()
    assert _mode(exposed) == 0o644                               # left alone
    # 0600 under the same open directories: private, no warning
    private = open_dir / "private.img"
    private.write_bytes(bytes(4096))
    private.chmod(0o600)
    RawImage(private, size=4096, readonly=False).close()
    # 0644 inside a 0700 directory: nobody but its owner gets to it, nothing to warn about
    hidden = tmp_path / "hidden"
    hidden.mkdir(mode=0o700)
    (hidden / "x.img").write_bytes(bytes(4096))
    (hidden / "x.img").chmod(0o644)
    RawImage(hidden / "x.img", size=4096, readonly=False).close()


@pytest.mark.parametrize(("size", "sector"), [(0, 512), (1000, 512), (1 << 20, 4096 * 3),
                                              ((1 << 20) + 512, 4096)])
def test_an_image_that_is_not_whole_sectors_is_refused(tmp_path: Path, size: int,
                                                       sector: int) -> None:
    path = tmp_path / "odd.img"
    path.write_bytes(bytes(size))
    with pytest.raises(ImageError) as e:
        RawImage(path, size=1 << 20, readonly=False, sector_size=sector)
    assert e.value.errno == errno.EINVAL
    assert str(e.value) == (f"[Errno 22] {path}: size {size} is not a positive multiple of "
                            f"the {sector}-byte sector size")
    assert path.stat().st_size == size                          # untouched


def _config(tmp_path: Path, body: str) -> object:
    doc = tomllib.loads('[machine]\nname = "t"\nstate_dir = "st"\n' + body)
    return parse(doc, tmp_path, "<test>")


def _file_too_large_here(directory: Path, size: str) -> bool:
    """coreutils' answer: can a file of ``size`` exist in ``directory``?"""
    probe = directory / "truncate-probe"
    try:
        return subprocess.run(["truncate", "-s", size, str(probe)], capture_output=True,
                              text=True).returncode != 0
    finally:
        probe.unlink(missing_ok=True)


def test_a_size_no_file_can_have_is_a_config_error(tmp_path: Path) -> None:
    if not _file_too_large_here(tmp_path, "8000T"):
        pytest.skip(f"the filesystem of {tmp_path} takes an 8000T file")
    for body, key in [('[xen]\n[[xen.vbd]]\nvdev = "xvda"\nsize = "8000T"\n', "xen.vbd[0]"),
                      ('[pci]\n[[pci.device]]\ntype = "virtio-blk"\nsize = "8000T"\n',
                       "pci.device[0]"),
                      ('[[vmbus.device]]\ntype = "scsi"\n[[vmbus.device.lun]]\nlun = 0\n'
                       'size = "8000T"\n', "vmbus.device[0].lun[0]")]:
        with pytest.raises(ConfigError) as e:
            check_images(_config(tmp_path, body))       # type: ignore[arg-type]
        assert e.value.key == f"{key}.size"
        assert "8796093022208000 bytes is larger than any file the filesystem of " \
            f"{tmp_path} can hold" in str(e.value)
    assert sorted(os.listdir(tmp_path)) == []           # nothing created, not even st/


def test_a_size_beyond_free_space_is_fine_images_are_sparse(tmp_path: Path) -> None:
    vfs = os.statvfs(tmp_path)
    bigger = vfs.f_frsize * vfs.f_blocks * 2            # twice the whole filesystem
    if _file_too_large_here(tmp_path, str(bigger)):
        pytest.skip("this filesystem's file size limit is below twice its size")
    check_images(_config(tmp_path, f'[xen]\n[[xen.vbd]]\nvdev = "xvda"\nsize = {bigger}\n'))  # type: ignore[arg-type]


def test_an_existing_image_that_cannot_be_a_disk_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "st").mkdir()
    (tmp_path / "st/xvda.img").write_bytes(b"")
    with pytest.raises(ConfigError) as e:
        check_images(_config(tmp_path, '[xen]\n[[xen.vbd]]\nvdev = "xvda"\n'))  # type: ignore[arg-type]
    assert str(e.value) == (f"xen.vbd[0].image: {tmp_path}/st/xvda.img: size 0 is not a "
                            "positive multiple of the 512-byte sector size")
    (tmp_path / "st/lun.img").write_bytes(bytes(4096 + 512))
    with pytest.raises(ConfigError) as e:
        check_images(_config(tmp_path, '[[vmbus.device]]\ntype = "scsi"\n'  # type: ignore[arg-type]
                             '[[vmbus.device.lun]]\nlun = 0\nimage = "lun.img"\n'
                             "sector_size = 4096\n"))
    assert e.value.key == "vmbus.device[0].lun[0].image"
    assert "size 4608 is not a positive multiple of the 4096-byte sector size" in str(e.value)


def test_without_o_tmpfile_a_hidden_temporary_is_named_then_removed(
        open_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = os.open

    def no_tmpfile(path: object, flags: int, *args: int, **kw: object) -> int:
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.EOPNOTSUPP, "no O_TMPFILE here")
        return real_open(path, flags, *args, **kw)    # type: ignore[arg-type]
    monkeypatch.setattr(os, "open", no_tmpfile)
    RawImage(open_dir / "f.img", size=8192, readonly=False).close()
    assert os.listdir(open_dir) == ["f.img"]
    assert _mode(open_dir / "f.img") == 0o600 and os.stat(open_dir / "f.img").st_size == 8192


THREE_BUSES = """\
[machine]
name = "priv"
state_dir = "st"
[[vmbus.device]]
type = "scsi"
[[vmbus.device.lun]]
lun = 0
size = "1M"
[xen]
[[xen.vbd]]
vdev = "xvda"
size = "1M"
[pci]
[[pci.device]]
type = "virtio-blk"
size = "1M"
"""
IMAGES = ("scsi0-lun0.img", "xvda.img", "vda.img")


@pytest.mark.mount
def test_every_bus_creates_its_disks_private(tmp_path: Path,
                                             state_env: dict[str, str]) -> None:
    """Issue 15 item 1: any local user could read every disk (images 0644 in a 0755 state
    directory). Now the state directory is 0700 and each bus's new image 0600, and a user
    other than root cannot read the disk's bytes."""
    from tests.conftest import mountctl
    cfg = tmp_path / "m.toml"
    cfg.write_text(THREE_BUSES)
    mp = tmp_path / "m"
    mp.mkdir()
    mountctl("up", "-d", "-c", str(cfg), str(mp), env=state_env, check=True)
    try:
        assert _mode(tmp_path / "st") == 0o700
        for name in IMAGES:
            assert _mode(tmp_path / "st" / name) == 0o600, name
            assert os.stat(tmp_path / "st" / name).st_size == 1 << 20
    finally:
        assert mountctl("down", str(mp), env=state_env).returncode == 0
    tmp_path.chmod(0o755)                      # let nobody as far as st/, no further
    tmp_path.parent.chmod(0o755)
    for name in IMAGES:
        out = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                              "head", "-c", "1", str(tmp_path / "st" / name)],
                             capture_output=True, text=True)
        assert out.returncode != 0 and "Permission denied" in out.stderr, out


@pytest.mark.mount
def test_up_refuses_bad_images_and_sizes_with_exit_2(tmp_path: Path,
                                                     state_env: dict[str, str]) -> None:
    """Issue 15 items 2 and 4: a 0-byte image mounted as a 0-byte disk, and size = "8000T"
    failed later with EFBIG, exit 1, no key named."""
    from tests.conftest import mountctl
    mp = tmp_path / "m"
    mp.mkdir()
    (tmp_path / "st").mkdir()
    (tmp_path / "st/xvda.img").write_bytes(b"")
    cfg = tmp_path / "m.toml"
    cfg.write_text(THREE_BUSES)
    out = mountctl("up", "-d", "-c", str(cfg), str(mp), env=state_env)
    assert out.returncode == 2, out.stderr
    assert out.stderr == (f"mountctl: {cfg}: xen.vbd[0].image: {tmp_path}/st/xvda.img: size 0 "
                          "is not a positive multiple of the 512-byte sector size\n")
    (tmp_path / "st/xvda.img").unlink()
    if not _file_too_large_here(tmp_path, "8000T"):
        pytest.skip(f"the filesystem of {tmp_path} takes an 8000T file")
    cfg.write_text(THREE_BUSES.replace('lun = 0\nsize = "1M"', 'lun = 0\nsize = "8000T"'))
    out = mountctl("up", "-d", "-c", str(cfg), str(mp), env=state_env)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith(f"mountctl: {cfg}: vmbus.device[0].lun[0].size: "
                                 "8796093022208000 bytes is larger than any file the "
                                 f"filesystem of {tmp_path}/st can hold (at most ")
    assert os.listdir(tmp_path / "st") == [] and os.listdir(mp) == []
