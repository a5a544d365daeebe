"""What a person does with a virtual disk through a loop device: mkfs.ext4, mount, write,
unmount, fsck, mount read-only, read back. Shared by the mount tests of every disk type."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path


def _sh(cmd: str) -> str:
    return subprocess.run(cmd, shell=True, check=True, capture_output=True,
                          text=True).stdout


def ext4_round_trip(disk: Path, workdir: Path, payload_bytes: int,
                    copy_dir: Path | None = None) -> None:
    """ext4 on ``disk`` via a loop device: ``payload_bytes`` of random data (and a copy of
    ``copy_dir``) written, fsck clean after unmount, the data read back from a read-only
    mount. Raises (CalledProcessError, AssertionError) on any failure."""
    loop = _sh(f"losetup -f --show {disk}").strip()
    target = workdir / "fs"
    target.mkdir()
    try:
        _sh(f"mkfs.ext4 -q -F {loop}")
        _sh(f"mount {loop} {target}")
        try:
            payload = os.urandom(payload_bytes)
            (target / "a.bin").write_bytes(payload)
            if copy_dir is not None:
                shutil.copytree(copy_dir, target / copy_dir.name)
            _sh("sync")
        finally:
            _sh(f"umount {target}")
        _sh(f"fsck.ext4 -n {loop}")
        _sh(f"mount -o ro {loop} {target}")
        try:
            assert (target / "a.bin").read_bytes() == payload
        finally:
            _sh(f"umount {target}")
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)
