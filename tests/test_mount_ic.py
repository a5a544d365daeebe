"""End to end: the integration services through a real mount, with mountctl and ordinary
file tools. Expected values come from the references (the pool record layout of
hv_kvp_daemon.c, HRESULTs, the shutdown flags table) and from this machine itself for the
AUTO pool (uname, /etc/os-release, the resolver), computed here independently."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from mountctl.mounts import mount_fstype
from tests.conftest import Mounted, mountctl, service_log_problems

SERVICE_LOG_EXPECTED: list[str] = []
S_OK, E_FAIL, S_CONT = "0x00000000", "0x80004005", "0x80070103"


def sh(cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=60)


def record(key: str, value: str) -> bytes:
    """One hv_kvp_daemon record: char key[512] + char value[2048], UTF-8, NUL-padded."""
    return key.encode().ljust(512, b"\0") + value.encode().ljust(2048, b"\0")


def records(data: bytes) -> list[tuple[str, str]]:
    out = []
    for i in range(0, len(data) - len(data) % 2560, 2560):
        k, v = data[i:i + 512], data[i + 512:i + 2560]
        out.append((k.split(b"\0")[0].decode(), v.split(b"\0")[0].decode()))
    return out


def transact(path: Path, request: str) -> dict[str, object]:
    """A write and a read on one open file, as a host-side tool does."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.write(fd, request.encode())
        doc = json.loads(os.pread(fd, 1 << 20, 0))
    finally:
        os.close(fd)
    assert isinstance(doc, dict)
    return doc


def kvp(mnt: Mounted, *args: str) -> subprocess.CompletedProcess[str]:
    return mountctl("kvp", str(mnt.path), *args, env=mnt.env)


def os_release() -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            k, _, v = line.partition("=")
            out[k] = v.replace('"', "").replace("'", "")
    return out


# -- the default machine ----------------------------------------------------------------------

def test_every_service_is_negotiated_and_visible(mnt: Mounted) -> None:
    want = {"heartbeat": "3.0", "shutdown": "3.2", "timesync": "4.0", "kvp": "4.0",
            "vss": "5.0", "fcopy": "1.1"}                     # reference §1.7 table
    for service, version in want.items():
        assert (mnt.path / f".vbusfs/hv_utils/{service}/version").read_text() == version + "\n"
    status = json.loads((mnt.path / ".vbusfs/host/status").read_text())
    assert {s: v["state"] for s, v in status.items()} == {s: "ready" for s in want}
    assert (mnt.path / "sys/bus/vmbus/hibernation").read_text() == "0\n"


def test_pool_files_and_the_hosts_guest_parameters(mnt: Mounted) -> None:
    d = mnt.path / "var/lib/hyperv"
    assert oct(d.stat().st_mode & 0o777) == "0o755"
    for n in range(5):
        st = (d / f".kvp_pool_{n}").stat()
        assert st.st_mode & 0o777 == 0o644 and st.st_size % 2560 == 0
    pool3 = (d / ".kvp_pool_3").read_bytes()
    assert records(pool3)[0] == ("VirtualMachineName", "hyperv-gen2")
    assert pool3[:2560] == record("VirtualMachineName", "hyperv-gen2")


def test_kvp_set_on_the_host_lands_in_the_guest_pool(mnt: Mounted) -> None:
    out = kvp(mnt, "set", "Greeting", "héllo wörld")
    assert out.returncode == 0 and "S_OK (0x00000000)" in out.stdout, out.stderr
    pool0 = (mnt.path / "var/lib/hyperv/.kvp_pool_0").read_bytes()
    assert record("Greeting", "héllo wörld") in [pool0[i:i + 2560]
                                                 for i in range(0, len(pool0), 2560)]
    # shell tools see the same bytes
    out = sh(f"od -An -c -N 8 '{mnt.path}/var/lib/hyperv/.kvp_pool_0' | tr -s ' '")
    assert "G r e e t i n g" in out.stdout
    assert kvp(mnt, "set", "Count", "42", "--type", "dword").returncode == 0
    assert ("Count", "42") in records((mnt.path / "var/lib/hyperv/.kvp_pool_0").read_bytes())
    # the host's view: list walks the pool until the guest answers S_CONT
    out = kvp(mnt, "list")
    assert out.returncode == 0 and "Greeting=héllo wörld\n" in out.stdout
    doc = json.loads(kvp(mnt, "list", "--json").stdout)
    assert doc["status"] == S_CONT and {"key": "Count", "value": "42", "type": "string"} in \
        doc["items"]
    assert kvp(mnt, "delete", "Count").returncode == 0
    assert ("Count", "42") not in records(
        (mnt.path / "var/lib/hyperv/.kvp_pool_0").read_bytes())


def test_kvp_get_answers_as_linux_does(mnt: Mounted) -> None:
    assert kvp(mnt, "set", "GetMe", "value").returncode == 0
    out = kvp(mnt, "get", "GetMe", "--json")
    doc = json.loads(out.stdout)
    # Linux's kernel asks its daemon for 0 bytes of the value: found, but empty
    assert out.returncode == 0 and doc["status"] == S_OK and doc["value"] == ""
    out = kvp(mnt, "get", "NoSuchKey")
    assert out.returncode == 1 and "S_CONT (0x80070103)" in out.stderr


def test_a_guest_value_is_seen_by_the_host(mnt: Mounted) -> None:
    pool1 = mnt.path / "var/lib/hyperv/.kvp_pool_1"
    with open(pool1, "ab") as f:                      # as a guest agent appends a record
        f.write(record("ProvisioningState", "ready"))
    out = kvp(mnt, "list", "--pool", "guest")
    assert out.returncode == 0 and "ProvisioningState=ready\n" in out.stdout
    out = kvp(mnt, "list", "--pool", "1", "--json")
    assert {"key": "ProvisioningState", "value": "ready", "type": "string"} in \
        json.loads(out.stdout)["items"]


def test_the_auto_pool_is_this_machine(mnt: Mounted) -> None:
    out = kvp(mnt, "list", "--pool", "auto")
    assert out.returncode == 0
    got = dict(line.split("=", 1) for line in out.stdout.splitlines())
    uts = os.uname()
    rel = os_release()
    try:
        fqdn = socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET,
                                  socket.SOCK_STREAM, 0, socket.AI_CANONNAME)[0][3]
    except socket.gaierror as e:       # hv_kvp_daemon: "getaddrinfo failed: 0x%x %s"
        fqdn = f"getaddrinfo failed: 0x{(e.errno or 0) & 0xFFFFFFFF:x} {e.strerror}"
    assert list(got) == ["FullyQualifiedDomainName", "IntegrationServicesVersion",
                         "NetworkAddressIPv4", "NetworkAddressIPv6", "OSBuildNumber",
                         "OSName", "OSMajorVersion", "OSMinorVersion", "OSVersion",
                         "ProcessorArchitecture"]                  # reference §2.4 order
    assert got["FullyQualifiedDomainName"] == fqdn
    assert got["IntegrationServicesVersion"] == "3.1"
    assert got["NetworkAddressIPv4"] == got["NetworkAddressIPv6"] == ""
    assert got["OSBuildNumber"] == uts.release
    assert got["OSVersion"] == uts.release.split("-")[0]
    assert got["ProcessorArchitecture"] == uts.machine
    assert got["OSName"] == rel.get("NAME", uts.sysname)
    assert got["OSMajorVersion"] == rel.get("VERSION_ID", "")
    assert got["OSMinorVersion"] == ""


def test_kvp_usage_errors_exit_2(mnt: Mounted) -> None:
    assert kvp(mnt, "list", "--pool", "9").returncode == 2
    assert kvp(mnt, "set", "k", "v", "--type", "float").returncode == 2
    out = kvp(mnt, "set", "k" * 256, "v")
    assert out.returncode == 2 and "1 to 255 UTF-16 units" in out.stderr
    assert kvp(mnt, "set", "k", "notanumber", "--type", "dword").returncode == 2
    assert mountctl("kvp", "/proc", "list").returncode == 2
    # the transaction file refuses bad requests with EINVAL and sends nothing
    before = json.loads((mnt.path / ".vbusfs/host/status").read_text())["kvp"]["requests"]
    out = sh(f"echo 'frobnicate 0 k' > '{mnt.path}/.vbusfs/host/kvp'")
    assert out.returncode != 0 and "Invalid argument" in out.stderr
    assert json.loads((mnt.path / ".vbusfs/host/status").read_text())["kvp"]["requests"] == \
        before


def test_timesync_offset_follows_the_host_clock(mnt: Mounted) -> None:
    ts = mnt.path / ".vbusfs/hv_utils/timesync"
    assert (ts / "syncs").read_text() == "1\n"                 # the SYNC after negotiation
    assert abs(int((ts / "offset_ns").read_text())) < 10**9     # no skew by default
    skew = mnt.path / ".vbusfs/host/timesync_skew"
    try:
        skew.write_text("3600\n")
        assert skew.read_text() == "3600.000000000\n"
        assert abs(int((ts / "offset_ns").read_text()) - 3600 * 10**9) < 10**9
        host_ns = int((ts / "host_time_ns").read_text())
        assert abs(host_ns - time.time_ns() - 3600 * 10**9) < 10**9
        assert (ts / "flags").read_text() == "0x02\n"           # a SAMPLE
        for bad in ("soon", "nan", "1e10", "-inf"):
            out = sh(f"echo {bad} > '{skew}'")
            assert out.returncode != 0 and "Invalid argument" in out.stderr, bad
        assert skew.read_text() == "3600.000000000\n"           # unchanged
    finally:
        skew.write_text("0\n")
    assert abs(int((ts / "offset_ns").read_text())) < 10**9


def test_vss_and_fcopy_answer_as_a_guest_without_daemons(mnt: Mounted) -> None:
    host = mnt.path / ".vbusfs/host"
    assert transact(host / "vss", "freeze\n") == {"op": "freeze", "status": E_FAIL,
                                                  "status_name": "E_FAIL", "flags": 0}
    assert transact(host / "vss", "hot_backup")["status"] == E_FAIL
    assert transact(host / "vss", "get_dm_info") == {"op": "get_dm_info", "status": S_OK,
                                                     "status_name": "S_OK", "flags": 0}
    assert transact(host / "fcopy", "start report.txt /tmp 12\n")["status"] == E_FAIL
    assert transact(host / "fcopy", "write 0 'hello world'")["status"] == E_FAIL
    assert transact(host / "fcopy", "cancel")["status_name"] == "E_FAIL"
    # the shell way: the write, then the last answer
    out = sh(f"echo thaw > '{host}/vss' && cat '{host}/vss'")
    assert out.returncode == 0 and json.loads(out.stdout)["status"] == E_FAIL
    assert (mnt.path / ".vbusfs/hv_utils/vss/last_operation").read_text() == "thaw\n"
    out = sh(f"echo explode > '{host}/vss'")
    assert out.returncode != 0 and "Invalid argument" in out.stderr


def test_shutdown_requests_the_default_machine_survives(mnt: Mounted) -> None:
    out = mountctl("shutdown", "--hibernate", str(mnt.path), env=mnt.env)
    assert out.returncode == 1 and "refused the request: E_FAIL" in out.stderr
    out = mountctl("shutdown", "--reboot", str(mnt.path), env=mnt.env)
    assert out.returncode == 0 and "vmbus.ic.on_reboot = log" in out.stdout
    assert mount_fstype(str(mnt.path)) == "fuse.vbusfs"
    d = mnt.path / ".vbusfs/hv_utils/shutdown"
    assert (d / "last_request").read_text() == "reboot\n"
    assert (d / "last_flags").read_text() == "0x2\n"
    assert mountctl("shutdown", "/proc").returncode == 2
    assert mountctl("shutdown", "--reboot", "--hibernate", str(mnt.path)).returncode == 2


# -- machines of their own --------------------------------------------------------------------

def _up(tmp_path: Path, env: dict[str, str], config: str | None = None) -> Path:
    mnt = tmp_path / "m"
    mnt.mkdir()
    args = ["up", "-d", str(mnt)]
    if config is not None:
        (tmp_path / "m.toml").write_text(config)
        args[2:2] = ["-c", str(tmp_path / "m.toml")]
    mountctl(*args, env=env, check=True)
    return mnt


@pytest.mark.mount
def test_shutdown_unmounts_cleanly(tmp_path: Path, state_env: dict[str, str]) -> None:
    mnt = _up(tmp_path, state_env)
    pid = int((mnt / ".vbusfs/pid").read_text())
    try:
        out = mountctl("shutdown", str(mnt), env=state_env)
        assert out.returncode == 0 and "is unmounted" in out.stdout, out.stderr
        assert mount_fstype(str(mnt)) is None
    finally:
        if mount_fstype(str(mnt)) is not None:          # leave nothing mounted on failure
            mountctl("down", str(mnt), env=state_env)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    log = Path(state_env["VBUSFS_STATE"]) / "hyperv-gen2/vbusfs.log"
    assert "the guest accepted a poweroff request from the host: stopping and unmounting" \
        in log.read_text()
    assert service_log_problems(log, []) == []
    # nothing left to ask
    assert mountctl("shutdown", str(mnt), env=state_env).returncode == 2


CONFIG = """\
[machine]
name = "ic-test"

[vmbus.ic]
on_shutdown = "log"
hibernation = true
timesync_skew = -7200
timesync_interval = 1
kvp_external = { Role = "web server" }

[[vmbus.device]]
type = "shutdown"
[[vmbus.device]]
type = "timesync"
[[vmbus.device]]
type = "kvp"
"""


@pytest.mark.mount
def test_a_configured_machine(tmp_path: Path, state_env: dict[str, str]) -> None:
    mnt = _up(tmp_path, state_env, CONFIG)
    try:
        assert (mnt / "sys/bus/vmbus/hibernation").read_text() == "1\n"
        offset = int((mnt / ".vbusfs/hv_utils/timesync/offset_ns").read_text())
        assert abs(offset + 7200 * 10**9) < 10**9
        time.sleep(2.5)                                     # samples every second
        assert int((mnt / ".vbusfs/hv_utils/timesync/samples").read_text()) >= 3
        assert records((mnt / "var/lib/hyperv/.kvp_pool_0").read_bytes()) == \
            [("Role", "web server")]
        assert records((mnt / "var/lib/hyperv/.kvp_pool_3").read_bytes())[0][0] == \
            "VirtualMachineName"
        out = mountctl("shutdown", "--hibernate", str(mnt), env=state_env)
        assert out.returncode == 0, out.stderr
        out = mountctl("shutdown", str(mnt), env=state_env)
        assert out.returncode == 0 and "vmbus.ic.on_shutdown = log" in out.stdout
        assert mount_fstype(str(mnt)) == "fuse.vbusfs"
        assert (mnt / ".vbusfs/hv_utils/shutdown/last_request").read_text() == "shutdown\n"
        assert sorted(p.name for p in (mnt / ".vbusfs/host").iterdir()) == \
            ["kvp", "shutdown", "status", "timesync_skew"]
        out = mountctl("kvp", str(mnt), "list", env=state_env)
        assert out.returncode == 0 and out.stdout == "Role=web server\n"
    finally:
        assert mountctl("down", str(mnt), env=state_env).returncode == 0
    log = tmp_path / "state/vbusfs.log"
    assert service_log_problems(log, []) == []


@pytest.mark.mount
def test_a_machine_without_the_services(tmp_path: Path, state_env: dict[str, str]) -> None:
    mnt = _up(tmp_path, state_env, '[machine]\nname = "bare"\n[[vmbus.device]]\ntype = "nic"\n')
    try:
        out = mountctl("shutdown", str(mnt), env=state_env)
        assert out.returncode == 2 and "no shutdown integration service" in out.stderr
        out = mountctl("kvp", str(mnt), "list", env=state_env)
        assert out.returncode == 2 and "no KVP integration service" in out.stderr
        assert not (mnt / "var").exists()
        assert (mnt / ".vbusfs/host/status").read_text() == "{}\n"
    finally:
        assert mountctl("down", str(mnt), env=state_env).returncode == 0
