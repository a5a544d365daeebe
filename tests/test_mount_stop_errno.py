"""What a program writing to a disk sees when the service stops under it (issue 15 item 8).

Once the service has gone, the kernel answers every request on a FUSE file with ENOTCONN
("Transport endpoint is not connected"; fs/fuse/dev.c, a connection no longer connected),
and nothing the service does can change that. So while the service is in control of its
stop — `mountctl down`, SIGTERM, the host's shutdown request — it answers disk I/O with the
same errno, and lets nothing in flight be cut off (which the kernel reports as
ECONNABORTED): a writer sees ENOTCONN and only ENOTCONN, however the stop came.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mountctl.mounts import mount_fstype
from tests.conftest import ROOT, mountctl, service_log_problems

CONFIG = """\
[machine]
name = "stops"
state_dir = "st"
[[vmbus.device]]
type = "shutdown"
[[vmbus.device]]
type = "scsi"
[[vmbus.device.lun]]
lun = 0
size = "64M"
[xen]
[[xen.vbd]]
vdev = "xvda"
size = "64M"
[pci]
[[pci.device]]
type = "virtio-blk"
size = "64M"
"""
DISKS = ("sda", "xvda", "vda")

#: writes 64 KiB after 64 KiB round the disk until one fails and prints that errno; then, when
#: told (the service is gone by then), the errnos of an fsync and one more write on the same
#: open file
WRITER = """\
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | (os.O_DIRECT if sys.argv[2] == "direct" else 0))
buf = mmap.mmap(-1, 65536)
buf.write(b"w" * 65536)
size, off = 64 << 20, 0
print("started", flush=True)
while True:
    try:
        os.pwrite(fd, buf, off)
    except OSError as e:
        print(e.errno, flush=True)
        break
    off = (off + 65536) % size
sys.stdin.readline()
for op in (lambda: os.fsync(fd), lambda: os.pwrite(fd, buf, 0)):
    try:
        op()
        print(0, flush=True)
    except OSError as e:
        print(e.errno, flush=True)
"""


def _writers(mp: Path) -> list[subprocess.Popen[str]]:
    procs = []
    for disk in DISKS:
        for mode in ("direct", "buffered"):
            p = subprocess.Popen([sys.executable, "-c", WRITER, str(mp / "dev" / disk), mode],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
            assert p.stdout is not None
            assert p.stdout.readline() == "started\n"
            procs.append(p)
    time.sleep(0.5)                          # all of them well into their loops
    return procs


def _seen(procs: list[subprocess.Popen[str]], mp: Path, pid: int) -> list[list[int]]:
    """Each writer's first error; then, with the service gone, what an fsync and a write on
    the same open file get."""
    first = []
    for p in procs:
        assert p.stdout is not None
        first.append(int(p.stdout.readline()))
    deadline = time.monotonic() + 30
    while (mount_fstype(str(mp)) is not None or _alive(pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert mount_fstype(str(mp)) is None and not _alive(pid)
    out = []
    for p, f in zip(procs, first, strict=True):
        stdout, stderr = p.communicate("go\n", timeout=60)
        assert p.returncode == 0, stderr
        out.append([f, *(int(v) for v in stdout.split())])
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.mount
@pytest.mark.parametrize("how", ["down", "sigterm", "host-shutdown"])
def test_a_writer_sees_enotconn_however_the_service_stops(how: str, tmp_path: Path,
                                                          state_env: dict[str, str]) -> None:
    cfg = tmp_path / "m.toml"
    cfg.write_text(CONFIG)
    mp = tmp_path / "m"
    mp.mkdir()
    mountctl("up", "-d", "-c", str(cfg), str(mp), env=state_env, check=True)
    pid = int((mp / ".vbusfs/pid").read_text())
    procs = _writers(mp)
    try:
        if how == "down":
            out = mountctl("down", str(mp), env=state_env)
            assert out.returncode == 0, out.stderr
        elif how == "sigterm":
            os.kill(pid, signal.SIGTERM)
        else:
            out = subprocess.run([sys.executable, "-m", "mountctl", "shutdown", str(mp)],
                                 capture_output=True, text=True, env=state_env, cwd=ROOT,
                                 timeout=60)
            assert out.returncode == 0, out.stderr
        seen = _seen(procs, mp, pid)
    finally:
        for p in procs:
            p.kill()
        deadline = time.monotonic() + 30
        while mount_fstype(str(mp)) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        if mount_fstype(str(mp)) is not None:
            subprocess.run(["fusermount3", "-u", "-z", str(mp)], check=False)
    # every writer: its first error, the fsync after it and the write after that
    assert seen == [[errno.ENOTCONN] * 3] * len(procs), \
        [[errno.errorcode.get(e, e) for e in s] for s in seen]
    problems = service_log_problems(tmp_path / "st/vbusfs.log", [])
    assert problems == []
