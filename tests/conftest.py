"""Shared fixtures: real mounts run `mountctl up -d` in a subprocess on a temp directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def mount_unavailable() -> str | None:
    """Why a real FUSE mount cannot be made here, or None when it can."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse on this machine"
    if os.geteuid() != 0:
        return "FUSE mount tests need root (allow_other, mount -t)"
    if shutil.which("fusermount3") is None:
        return "fusermount3 (package fuse3) is not installed; run .ci/setup"
    return None


def mountctl(*args: str, env: dict[str, str] | None = None,
             check: bool = False) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "mountctl", *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"mountctl {' '.join(args)} -> {proc.returncode}\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def state_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["VBUSFS_STATE"] = str(tmp_path / "state")
    return env


class Mounted:
    def __init__(self, path: Path, env: dict[str, str]) -> None:
        self.path = path
        self.env = env

    def down(self) -> subprocess.CompletedProcess[str]:
        return mountctl("down", str(self.path), env=self.env)


@pytest.fixture(scope="module")
def mnt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mounted]:
    """The embedded default machine, mounted once per test module."""
    why = mount_unavailable()
    if why:
        pytest.skip(why)
    base = tmp_path_factory.mktemp("mnt")
    path = base / "m"
    path.mkdir()
    env = dict(os.environ)
    env["VBUSFS_STATE"] = str(base / "state")
    mountctl("up", "-d", str(path), env=env, check=True)
    m = Mounted(path, env)
    try:
        yield m
    finally:
        if m.down().returncode != 0:
            subprocess.run(["fusermount3", "-u", "-z", str(path)], check=False)
