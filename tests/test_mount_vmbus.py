"""End to end: mount the default machine and use the tree with ordinary shell tools.

Expected values come from reference/sysfs.md (formats, GUID tables) and are computed
independently of vbusfs (e.g. modalias from the GUID's little-endian bytes with uuid).
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import time
import uuid
from pathlib import Path

from tests.conftest import Mounted

DEFAULT_INSTANCES = {   # the default machine's fixed instance GUIDs (Hyper-V's own)
    "shutdown": "b6650ff7-33bc-4840-8048-e0676786f393",
    "timesync": "2dd1ce17-079e-403c-b352-a1921ee207ee",
    "heartbeat": "fd149e91-82e0-4a7d-afa6-2a4166cbd7c0",
    "kvp": "242ff919-07db-4180-9c2e-b86cb68c8c55",
    "scsi": "f8b3781a-1e82-4818-a1c3-63d806ec15bb",
}
CLASS = {   # reference/sysfs.md table 1.5
    "heartbeat": "57164f39-9115-4e78-ab55-382f3bd5422d",
    "scsi": "ba6163d9-04a1-4d29-b605-72e2ffb1dc7f",
    "nic": "f8615163-df3e-46c5-913f-f2d2f965ed0e",
}
GUID_NAME = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
DEVICE_ATTRS = """id state class_id device_id modalias numa_node out_intr_mask out_read_index
out_write_index out_read_bytes_avail out_write_bytes_avail in_intr_mask in_read_index
in_write_index in_read_bytes_avail in_write_bytes_avail channel_vp_mapping vendor device
driver_override uevent""".split()
STATIC_ATTRS = {"id", "class_id", "device_id", "modalias", "numa_node", "vendor", "device",
                "monitor_id"}
MONITOR_ATTRS = """monitor_id server_monitor_pending client_monitor_pending
server_monitor_latency client_monitor_latency server_monitor_conn_id
client_monitor_conn_id""".split()


def sh(cmd: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, cwd=cwd,
                          timeout=60)


def cat(p: Path) -> str:
    out = sh(f"cat '{p}'")
    assert out.returncode == 0, out.stderr
    return out.stdout


def devices(mnt: Mounted) -> Path:
    return mnt.path / "sys/bus/vmbus/devices"


def test_bus_devices_are_guid_named_relative_symlinks(mnt: Mounted) -> None:
    out = sh("ls -l sys/bus/vmbus/devices/", cwd=mnt.path)
    assert out.returncode == 0
    entries = [line for line in out.stdout.splitlines() if line.startswith("l")]
    assert len(entries) == 12
    for line in entries:
        name, target = line.split(" -> ")
        name = name.split()[-1]
        assert GUID_NAME.match(name), name
        assert target == ("../../../devices/LNXSYSTM:00/LNXSYBUS:00/ACPI0004:00/VMBUS:00/"
                          + name)
        real = (devices(mnt) / name).resolve()
        assert real.is_dir() and str(real).startswith(str(mnt.path))
    for inst in DEFAULT_INSTANCES.values():
        assert (devices(mnt) / inst).is_dir()


def test_class_device_and_modalias(mnt: Mounted) -> None:
    d = devices(mnt) / DEFAULT_INSTANCES["heartbeat"]
    assert cat(d / "class_id") == "{" + CLASS["heartbeat"] + "}\n"
    assert cat(d / "device_id") == "{" + DEFAULT_INSTANCES["heartbeat"] + "}\n"
    expect = "vmbus:" + uuid.UUID(CLASS["heartbeat"]).bytes_le.hex() + "\n"
    assert cat(d / "modalias") == expect == "vmbus:394f16571591784eab55382f3bd5422d\n"
    assert cat(d / "vendor") == "0x1414\n" and cat(d / "device") == "0xb\n"
    assert cat(d / "state") == "3\n"
    assert cat(d / "driver_override") == "(null)\n"
    assert cat(d / "uevent") == f"DRIVER=hv_utils\nMODALIAS={expect.strip()}\n"
    scsi = devices(mnt) / DEFAULT_INSTANCES["scsi"]
    assert cat(scsi / "class_id") == "{" + CLASS["scsi"] + "}\n"
    assert os.readlink(scsi / "driver") == "../../../../../../bus/vmbus/drivers/hv_storvsc"


def test_every_attribute_reads_with_one_newline(mnt: Mounted) -> None:
    ids = set()
    for dev in devices(mnt).iterdir():
        names = set(os.listdir(dev))
        assert set(DEVICE_ATTRS) <= names, set(DEVICE_ATTRS) - names
        monitored = "monitor_id" in names
        assert set(MONITOR_ATTRS) <= names if monitored else not names & set(MONITOR_ATTRS)
        for attr in DEVICE_ATTRS + (MONITOR_ATTRS if monitored else []):
            st = os.stat(dev / attr)
            assert st.st_uid == 0
            want = 0o644 if attr in ("driver_override", "uevent") else 0o444
            assert stat.S_IMODE(st.st_mode) == want, attr
            text = cat(dev / attr)
            assert text.endswith("\n") and not text.endswith("\n\n"), attr
            # live attributes report sysfs's 4096 (reference §0); static ones, which the
            # kernel caches, their length (README, "Attributes the kernel caches")
            assert st.st_size == (len(text) if attr in STATIC_ATTRS else 4096), attr
            assert os.stat(dev / attr).st_size == st.st_size, attr
        ids.add(int(cat(dev / "id")))
        relid = cat(dev / "id").strip()
        assert cat(dev / "channel_vp_mapping").startswith(relid + ":")
        chan = dev / "channels" / relid
        assert chan.is_dir() and stat.S_IMODE(os.stat(chan / "cpu").st_mode) == 0o644
        assert ("pending" in os.listdir(chan)) == monitored
        assert os.readlink(dev / "subsystem") == "../../../../../../bus/vmbus"
    assert ids == set(range(1, 13))


def test_ring_indices_move_with_heartbeats(mnt: Mounted) -> None:
    d = devices(mnt) / DEFAULT_INSTANCES["heartbeat"]
    relid = cat(d / "id").strip()
    first = int(cat(d / "in_write_index"))
    ints = int(cat(d / "channels" / relid / "interrupts"))
    deadline = time.monotonic() + 10
    while int(cat(d / "in_write_index")) == first and time.monotonic() < deadline:
        time.sleep(0.2)
    later = int(cat(d / "in_write_index"))
    assert later != first                            # the host sent another heartbeat
    assert int(cat(d / "channels" / relid / "interrupts")) > ints
    # everything the host wrote has been consumed and answered
    time.sleep(0.3)
    assert cat(d / "in_read_bytes_avail") == "0\n"
    data_size = 3 * 4096                              # hv_utils rings: 16 KiB incl. header
    assert int(cat(d / "out_write_bytes_avail")) == data_size - int(
        cat(d / "out_read_bytes_avail"))


def test_writes_that_must_fail(mnt: Mounted) -> None:
    d = devices(mnt) / DEFAULT_INSTANCES["heartbeat"]
    out = sh(f"echo 9 > '{d}/id'")
    assert out.returncode != 0 and "Permission denied" in out.stderr
    assert cat(d / "id") != "9\n"
    relid = cat(d / "id").strip()
    before = cat(d / "channels" / relid / "cpu")
    out = sh(f"echo 99 > '{d}/channels/{relid}/cpu'")
    assert out.returncode != 0 and "Invalid argument" in out.stderr
    assert cat(d / "channels" / relid / "cpu") == before
    out = sh(f"cat '{d}/nothere'")
    assert "No such file or directory" in out.stderr
    out = sh(f"touch '{d}/newfile'")
    assert out.returncode != 0


def test_driver_override_round_trip(mnt: Mounted) -> None:
    d = devices(mnt) / DEFAULT_INSTANCES["kvp"]
    assert sh(f"echo uio_hv_generic > '{d}/driver_override'").returncode == 0
    assert cat(d / "driver_override") == "uio_hv_generic\n"
    assert sh(f"echo > '{d}/driver_override'").returncode == 0
    assert cat(d / "driver_override") == "(null)\n"


def test_unbind_closes_channel_and_bind_reopens(mnt: Mounted) -> None:
    nic = next(p for p in devices(mnt).iterdir()
               if cat(p / "class_id") == "{" + CLASS["nic"] + "}\n")
    drv = mnt.path / "sys/bus/vmbus/drivers/hv_netvsc"
    assert (drv / nic.name).is_symlink()
    assert sh(f"echo {nic.name} > '{drv}/unbind'").returncode == 0
    assert cat(nic / "state") == "2\n"
    assert not (nic / "driver").exists()
    out = sh(f"cat '{nic}/in_read_index'")
    assert out.returncode != 0 and "Invalid argument" in out.stderr
    assert sh(f"echo {nic.name} > '{drv}/bind'").returncode == 0
    assert cat(nic / "state") == "3\n" and cat(nic / "in_read_index") == "0\n"


def test_bus_and_driver_files(mnt: Mounted) -> None:
    bus = mnt.path / "sys/bus/vmbus"
    assert cat(bus / "drivers_autoprobe") == "1\n" and cat(bus / "hibernation") == "0\n"
    assert stat.S_IMODE(os.stat(bus / "drivers_probe").st_mode) == 0o200
    for drv in ("hv_utils", "hv_storvsc", "hv_netvsc"):
        names = set(os.listdir(bus / "drivers" / drv))
        assert {"bind", "unbind", "uevent", "new_id", "remove_id", "module"} <= names
        assert (bus / "drivers" / drv / "module").resolve().is_dir()
    out = sh(f"echo not-a-guid > '{bus}/drivers/hv_utils/new_id'")
    assert out.returncode != 0 and "Invalid argument" in out.stderr


def test_lsvmbus_style_scan(mnt: Mounted) -> None:
    """What tools/hv/lsvmbus reads: id, class_id, device_id, channel_vp_mapping."""
    rows = []
    for dev in devices(mnt).iterdir():
        first = [open(dev / a).readlines()[0].strip() for a in ("id", "class_id", "device_id")]
        mapping = [line.strip().split(":") for line in open(dev / "channel_vp_mapping")]
        rows.append((int(first[0]), first[1], first[2], mapping))
    rows.sort()
    assert [r[0] for r in rows] == list(range(1, 13))
    assert all(r[2].strip("{}") in {p.name for p in devices(mnt).iterdir()} for r in rows)


def test_status_table_and_json(mnt: Mounted) -> None:
    from tests.conftest import mountctl
    out = mountctl("status", str(mnt.path), env=mnt.env, check=True)
    assert "heartbeat" in out.stdout and "hv_storvsc" in out.stdout
    assert out.stdout.splitlines()[1].split() == ["BUS", "DEVICE", "ID", "TYPE", "STATE",
                                                  "DRIVER"]
    doc = json.loads(mountctl("status", "--json", str(mnt.path), env=mnt.env,
                              check=True).stdout)
    assert doc["machine"] == "hyperv-gen2" and doc["buses"]["vmbus"]["version"] == "5.3"
    devs = doc["buses"]["vmbus"]["devices"]
    assert len(devs) == 12 and {d["state"] for d in devs} == {3}


def test_control_dir(mnt: Mounted) -> None:
    ctl = mnt.path / ".vbusfs"
    assert cat(ctl / "machine") == "hyperv-gen2\n"
    out = sh(f"echo reboot > '{ctl}/control'")
    assert out.returncode != 0 and "Invalid argument" in out.stderr
