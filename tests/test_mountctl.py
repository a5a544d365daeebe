"""mountctl's command line: exit codes, refusals, mount -t vbusfs, clean shutdown."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mountctl.mounts import mount_fstype
from tests.conftest import ROOT, mountctl


def test_help_on_every_verb() -> None:
    for verb in ([], ["up"], ["down"], ["status"]):
        out = mountctl(*verb, "--help")
        assert out.returncode == 0 and "usage:" in out.stdout


def test_bad_usage_exits_2() -> None:
    assert mountctl("frobnicate").returncode == 2
    assert mountctl("up").returncode == 2


def test_bad_config_exits_2_and_mounts_nothing(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[machine]\nname = "x"\n[[vmbus.device]]\ntype = "nic"\ninstance = "nope"\n')
    mnt = tmp_path / "m"
    mnt.mkdir()
    out = mountctl("up", "-c", str(cfg), str(mnt))
    assert out.returncode == 2
    assert out.stderr.startswith(f"mountctl: {cfg}: vmbus.device[0].instance: not a GUID")
    assert "Traceback" not in out.stderr
    assert mount_fstype(str(mnt)) is None


def test_refuses_non_empty_and_missing_mountpoint(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    out = mountctl("up", str(tmp_path))
    assert out.returncode == 2 and "is not empty" in out.stderr
    out = mountctl("up", str(tmp_path / "absent"))
    assert out.returncode == 2 and "does not exist" in out.stderr


def test_down_refuses_what_is_not_vbusfs(tmp_path: Path) -> None:
    out = mountctl("down", str(tmp_path))
    assert out.returncode == 2 and "not a mount point" in out.stderr
    out = mountctl("down", "/proc")
    assert out.returncode == 2 and "not a vbusfs mount (it is proc)" in out.stderr


@pytest.mark.mount
def test_refuses_already_mounted(tmp_path: Path, state_env: dict[str, str]) -> None:
    mnt = tmp_path / "m"
    mnt.mkdir()
    mountctl("up", "-d", str(mnt), env=state_env, check=True)
    try:
        out = mountctl("up", "-d", str(mnt), env=state_env)
        assert out.returncode == 2 and "already a mount point (fuse.vbusfs)" in out.stderr
    finally:
        assert mountctl("down", str(mnt), env=state_env).returncode == 0
    assert mount_fstype(str(mnt)) is None


@pytest.mark.mount
def test_foreground_ctrl_c_unmounts(tmp_path: Path, state_env: dict[str, str]) -> None:
    mnt = tmp_path / "m"
    mnt.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "mountctl", "up", str(mnt)], cwd=ROOT,
                            env=state_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "mounted on" in line, line + proc.stderr.read() if proc.stderr else ""
    assert (mnt / "sys/bus/vmbus/devices").is_dir()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0
    assert mount_fstype(str(mnt)) is None and list(mnt.iterdir()) == []


@pytest.mark.mount
@pytest.mark.skipif(shutil.which("mount") is None, reason="util-linux mount not installed")
def test_mount_t_vbusfs(tmp_path: Path, state_env: dict[str, str]) -> None:
    helper = Path(sys.executable).parent / "mount.vbusfs"
    if not os.path.exists("/sbin/mount.vbusfs") or \
            os.path.realpath("/sbin/mount.vbusfs") != os.path.realpath(helper):
        pytest.skip("/sbin/mount.vbusfs is not this checkout's helper; run .ci/setup")
    cfg = tmp_path / "m.toml"
    cfg.write_text('[machine]\nname = "tiny"\nstate_dir = "st"\n'
                   '[[vmbus.device]]\ntype = "heartbeat"\n[[vmbus.device]]\ntype = "nic"\n')
    mnt = tmp_path / "m"
    mnt.mkdir()
    out = subprocess.run(["mount", "-t", "vbusfs", str(cfg), str(mnt)], capture_output=True,
                         text=True, env=state_env, timeout=60)
    assert out.returncode == 0, out.stderr
    try:
        assert mount_fstype(str(mnt)) == "fuse.vbusfs"
        assert len(os.listdir(mnt / "sys/bus/vmbus/devices")) == 2
        assert (mnt / ".vbusfs/machine").read_text() == "tiny\n"
        # the service's own files, as the README lists them (no Xen bus: no block/)
        assert sorted(os.listdir(mnt / ".vbusfs")) == [
            "config", "control", "fuse_requests", "host", "hv_utils", "machine", "pid",
            "state_dir", "stats",
            "version", "vmbus_version"]
        assert (mnt / ".vbusfs/stats/grants").read_text() == "0\n"     # no Xen bus
    finally:
        assert mountctl("down", str(mnt), env=state_env).returncode == 0
    deadline = time.monotonic() + 5
    while mount_fstype(str(mnt)) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert mount_fstype(str(mnt)) is None


@pytest.mark.mount
def test_a_failed_start_shows_only_its_own_error(tmp_path: Path,
                                                 state_env: dict[str, str]) -> None:
    """An image held by another process: `up -d` fails saying so, and a second attempt
    says it once, without the lines the first attempt left in the log."""
    cfg = tmp_path / "m.toml"
    cfg.write_text('[machine]\nname = "locked"\nstate_dir = "st"\n'
                   '[xen]\n[[xen.vbd]]\nvdev = "xvda"\nsize = "1M"\n')
    (tmp_path / "st").mkdir()
    image = tmp_path / "st/xvda.img"
    image.write_bytes(bytes(1 << 20))
    mp = tmp_path / "m"
    mp.mkdir()
    with open(image, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)             # another mount is using it
        outs = [mountctl("up", "-d", "-c", str(cfg), str(mp), env=state_env)
                for _ in range(2)]
    for out in outs:
        assert out.returncode == 1
        assert out.stderr.count("is in use by another process") == 1, out.stderr
    assert mount_fstype(str(mp)) is None


def _to_closed_pipe(*argv: str, env: dict[str, str] | None = None
                    ) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` with its stdout a pipe nobody reads any more, as ``| head -1`` leaves
    it once head has its line (made certain here: the read end is closed first)."""
    r, w = os.pipe()
    os.close(r)
    try:
        return subprocess.run(argv, stdout=w, stderr=subprocess.PIPE, text=True, env=env,
                              cwd=ROOT, timeout=60)
    finally:
        os.close(w)


@pytest.mark.mount
def test_status_into_head_is_quiet(tmp_path: Path, state_env: dict[str, str]) -> None:
    """A C tool writing to a closed pipe is killed by SIGPIPE, silently (the shell reports
    141); seq is the reference. mountctl ends the same way, not with BrokenPipeError."""
    seq = _to_closed_pipe("seq", "1", "100000")
    assert seq.returncode == -signal.SIGPIPE and seq.stderr == ""
    mnt = tmp_path / "m"
    mnt.mkdir()
    mountctl("up", "-d", str(mnt), env=state_env, check=True)
    try:
        for extra in ([], ["--json"]):
            out = _to_closed_pipe(sys.executable, "-m", "mountctl", "status", *extra,
                                  str(mnt), env=state_env)
            assert (out.returncode, out.stderr) == (-signal.SIGPIPE, ""), out.stderr
            sh = subprocess.run(
                ["bash", "-c", f'{sys.executable} -m mountctl status {" ".join(extra)} '
                 f'{mnt} | head -1; echo "exit ${{PIPESTATUS[0]}}"'],
                capture_output=True, text=True, env=state_env, cwd=ROOT, timeout=60)
            lines = sh.stdout.splitlines()
            assert sh.stderr == "" and len(lines) == 2, sh.stdout + sh.stderr
            assert lines[1] in ("exit 0", "exit 141")    # 0 when head read it all in time
    finally:
        assert mountctl("down", str(mnt), env=state_env).returncode == 0


@pytest.mark.mount
def test_a_dead_mount_is_named_and_down_removes_it(tmp_path: Path,
                                                  state_env: dict[str, str]) -> None:
    """The service killed outright leaves a FUSE mount whose every access fails with
    ENOTCONN: status and up say it is a dead vbusfs mount and how to remove it; down
    removes it."""
    mnt = tmp_path / "m"
    mnt.mkdir()
    mountctl("up", "-d", str(mnt), env=state_env, check=True)
    pid = int((mnt / ".vbusfs/pid").read_text())
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.stat(mnt)
        except OSError as e:
            assert e.errno == errno.ENOTCONN
            break
        time.sleep(0.05)
    try:
        hint = f"mountctl: hint: 'mountctl down {mnt}' removes it"
        st = mountctl("status", str(mnt), env=state_env)
        assert st.returncode == 1 and st.stdout == ""
        assert st.stderr.splitlines() == [
            f"mountctl: {mnt}: is a dead vbusfs mount: its service is no longer running "
            "(transport endpoint is not connected)", hint]
        up = mountctl("up", "-d", str(mnt), env=state_env)
        assert up.returncode == 2 and "is a dead vbusfs mount" in up.stderr, up.stderr
        assert hint in up.stderr and "Traceback" not in up.stderr
        down = mountctl("down", str(mnt), env=state_env)
        assert down.returncode == 0, down.stderr
        assert "already stopped" in down.stdout
        assert mount_fstype(str(mnt)) is None and list(mnt.iterdir()) == []
        # and it mounts again, from the same state
        mountctl("up", "-d", str(mnt), env=state_env, check=True)
        assert mountctl("down", str(mnt), env=state_env).returncode == 0
    finally:
        if mount_fstype(str(mnt)) is not None:
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
