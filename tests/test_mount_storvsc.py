"""storvsc disks through the real mount, used as a person or a tool does: lsblk, cat, ls,
os.walk as WALinuxAgent walks, dd + cmp, fio --verify, losetup + mkfs.ext4 + mount + fsck,
mountctl. Expected values come from reference/hv-services.md §4.8–4.9, reference/sysfs.md §4
and §5.5–5.6, Linux's scsi_sysfs.c attribute list and modes, and the configs written here."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Mounted, mountctl
from tests.ext4_on_loop import ext4_round_trip

GUID = "f8b3781a-1e82-4818-a1c3-63d806ec15bb"       # the default machine's controller
GiB = 1 << 30


def sh(cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", cmd], check=check, capture_output=True, text=True,
                          timeout=300)


def cat(p: Path) -> str:
    return sh(f"cat '{p}'").stdout


def sdev(m: Mounted, lun: int) -> Path:
    return m.path / f"sys/bus/vmbus/devices/{GUID}/host0/target0:0:0/0:0:0:{lun}"


def image(m: Mounted, lun: int) -> Path:
    return Path(m.env["VBUSFS_STATE"]) / "hyperv-gen2" / f"scsi0-lun{lun}.img"


def _lsblk(mp: Path, columns: str) -> list[dict[str, str]]:
    out = sh(f"lsblk --sysroot {mp} -b -P -o {columns}").stdout
    return [dict(re.findall(r'([A-Z:-]+)="([^"]*)"', line)) for line in out.splitlines()]


def test_lsblk_shows_the_disks_as_on_hyperv(mnt: Mounted) -> None:
    rows = [r for r in _lsblk(mnt.path, "NAME,HCTL,VENDOR,SIZE,TYPE,MAJ:MIN,TRAN")
            if r["NAME"].startswith("sd")]
    # TRAN: a storvsc host is none of the transports lsblk names (reference sysfs.md §5.6)
    assert rows == [
        {"NAME": "sda", "HCTL": "0:0:0:0", "VENDOR": "Msft    ", "SIZE": str(GiB),
         "TYPE": "disk", "MAJ:MIN": "8:0", "TRAN": ""},
        {"NAME": "sdb", "HCTL": "0:0:0:1", "VENDOR": "Msft    ", "SIZE": str(GiB // 2),
         "TYPE": "disk", "MAJ:MIN": "8:16", "TRAN": ""}]


@pytest.mark.mount
def test_lsblk_model_and_serial(tmp_path: Path, state_env: dict[str, str]) -> None:
    """The issue's command. lsblk --sysroot takes MODEL and SERIAL from a udev-style
    property file at SYSROOT/dev/NAME when that is a regular file (util-linux
    lsblk-properties.c get_properties_by_file), and a disk here is a regular file, so it
    reads every disk through to the end: small disks keep it quick. With no such property
    it reads device/model and device/serial; a SCSI device has no "serial" attribute in
    Linux (scsi_sysfs.c), so SERIAL is empty as on a real Hyper-V guest, where udev would
    fill it from VPD page 0x80 (which is there)."""
    cfg = _config(tmp_path, f"""
[[vmbus.device]]
type = "scsi"
instance = "{GUID}"
[[vmbus.device.lun]]
size = "4M"
[[vmbus.device.lun]]
size = "2M"
serial = "RESOURCE-1"
""")
    mp = tmp_path / "m"
    mp.mkdir()
    mountctl("up", "-d", "-c", str(cfg), str(mp), env=state_env, check=True)
    try:
        assert _lsblk(mp, "NAME,HCTL,VENDOR,MODEL,SERIAL,SIZE") == [
            {"NAME": "sda", "HCTL": "0:0:0:0", "VENDOR": "Msft    ",
             "MODEL": "Virtual Disk    ", "SERIAL": "", "SIZE": str(4 << 20)},
            {"NAME": "sdb", "HCTL": "0:0:0:1", "VENDOR": "Msft    ",
             "MODEL": "Virtual Disk    ", "SERIAL": "", "SIZE": str(2 << 20)}]
        pg80 = (mp / f"sys/bus/vmbus/devices/{GUID}/host0/target0:0:0/0:0:0:1/vpd_pg80")
        assert pg80.read_bytes() == bytes((0, 0x80, 0, 10)) + b"RESOURCE-1"
        serial = (mp / f"sys/bus/vmbus/devices/{GUID}/host0/target0:0:0/0:0:0:0/vpd_pg80")
        assert re.fullmatch(rb"\0\x80\0 [0-9a-f]{32}", serial.read_bytes())   # derived
    finally:
        mountctl("down", str(mp), env=state_env)


def test_the_scsi_tree_attribute_for_attribute(mnt: Mounted) -> None:
    vm = mnt.path / f"sys/bus/vmbus/devices/{GUID}"
    d = sdev(mnt, 0)
    assert os.readlink(mnt.path / "sys/bus/scsi/devices/0:0:0:0") == \
        f"../../../devices/LNXSYSTM:00/LNXSYBUS:00/ACPI0004:00/VMBUS:00/{GUID}" \
        "/host0/target0:0:0/0:0:0:0"
    assert sorted(os.listdir(mnt.path / "sys/bus/scsi/devices")) == \
        ["0:0:0:0", "0:0:0:1", "host0", "target0:0:0"]
    assert os.readlink(vm / "host0/subsystem").endswith("/bus/scsi")
    assert cat(vm / "host0/uevent") == "DEVTYPE=scsi_host\n"
    assert cat(vm / "host0/target0:0:0/uevent") == "DEVTYPE=scsi_target\n"
    shost = mnt.path / "sys/class/scsi_host/host0"
    assert shost.resolve() == (vm / "host0/scsi_host/host0").resolve()
    assert [cat(shost / a) for a in ("proc_name", "cmd_per_lun", "can_queue",
                                     "sg_tablesize", "state")] == \
        ["storvsc_host\n", "2048\n", "327\n", "65\n", "running\n"]
    # §4.9 scsi_device attributes: Linux's formats and values for a Hyper-V disk
    want = {"vendor": "Msft    \n", "model": "Virtual Disk    \n", "rev": "1.0 \n",
            "type": "0\n", "scsi_level": "6\n", "state": "running\n", "timeout": "180\n",
            "eh_timeout": "10\n", "device_blocked": "0\n", "device_busy": "0\n",
            "queue_depth": "327\n", "queue_type": "simple\n", "iocounterbits": "32\n",
            "modalias": "scsi:t-0x00\n",
            "uevent": "DEVTYPE=scsi_device\nDRIVER=sd\nMODALIAS=scsi:t-0x00\n"}
    assert {k: cat(d / k) for k in want} == want
    for counter in ("iorequest_cnt", "iodone_cnt", "ioerr_cnt"):
        assert re.fullmatch(r"0x[0-9a-f]+\n", cat(d / counter))
    # wwid: the NAA designator of page 0x83 (scsi_vpd_lun_id prefers it to the T10 id)
    pg83 = (d / "vpd_pg83").read_bytes()
    at, naa = 4, b""
    while at < len(pg83):
        if pg83[at + 1] & 0x0F == 3:
            naa = pg83[at + 4:at + 4 + pg83[at + 3]]
        at += 4 + pg83[at + 3]
    assert cat(d / "wwid") == f"naa.{naa.hex()}\n" and naa[:4] == b"\x60\x02\x24\x80"
    # modes: scsi_sysfs.c's S_IRUGO | S_IWUSR, S_IWUSR, S_IRUGO; bin attributes size 0
    rw = {"state", "timeout", "eh_timeout", "queue_depth", "queue_type",
          "queue_ramp_up_period", "dh_state", "uevent"} | {
        f"evt_{e}" for e in ("media_change", "inquiry_change_reported",
                             "capacity_change_reported", "soft_threshold_reached",
                             "mode_parameter_change_reported", "lun_change_reported")}
    wo = {"rescan", "delete"}
    ro = {"device_blocked", "type", "scsi_level", "device_busy", "vendor", "model", "rev",
          "iocounterbits", "iorequest_cnt", "iodone_cnt", "ioerr_cnt", "modalias", "wwid",
          "blacklist"}
    binary = {"inquiry", "vpd_pg0", "vpd_pg80", "vpd_pg83", "vpd_pgb0", "vpd_pgb1",
              "vpd_pgb2"}
    names = set(os.listdir(d))
    assert rw | wo | ro | binary | {"block", "scsi_disk", "scsi_device", "power",
                                    "subsystem", "driver"} == names
    static = {"device_blocked", "type", "vendor", "model", "rev", "iocounterbits", "modalias",
              "blacklist"}
    for n in rw | wo | ro:
        st = os.stat(d / n)
        # live: sysfs's 4096; static (cached by the kernel): the text's length
        assert st.st_size == (len((d / n).read_bytes()) if n in static else 4096), n
        assert stat.S_IMODE(st.st_mode) == (0o644 if n in rw else 0o200 if n in wo
                                            else 0o444), n
    for n in binary:
        st = os.stat(d / n)
        assert (st.st_size, stat.S_IMODE(st.st_mode)) == (0, 0o444), n
    inquiry = (d / "inquiry").read_bytes()
    assert len(inquiry) == 104 and inquiry[8:36] == b"Msft    Virtual Disk    1.0 "
    assert os.readlink(d / "driver") == "../../../../../../../../../bus/scsi/drivers/sd"
    assert os.readlink(d / "block/sda/device") == "../../../0:0:0:0"
    assert os.readlink(mnt.path / "sys/block/sda") == \
        f"../devices/LNXSYSTM:00/LNXSYBUS:00/ACPI0004:00/VMBUS:00/{GUID}" \
        "/host0/target0:0:0/0:0:0:0/block/sda"
    assert os.readlink(mnt.path / "sys/dev/block/8:16").endswith("0:0:0:1/block/sdb")
    assert cat(mnt.path / "sys/block/sda/dev") == "8:0\n"
    assert cat(mnt.path / "sys/block/sda/size") == f"{GiB // 512}\n"
    assert (mnt.path / "dev/sda").stat().st_size == GiB
    disk = mnt.path / "sys/class/scsi_disk/0:0:0:0"
    assert [cat(disk / a) for a in ("cache_type", "FUA", "thin_provisioning",
                                    "provisioning_mode")] == \
        ["write back\n", "1\n", "1\n", "unmap\n"]
    assert (mnt.path / "sys/class/scsi_device/0:0:0:0").resolve() == \
        (d / "scsi_device/0:0:0:0").resolve()
    assert os.readlink(mnt.path / f"sys/bus/vmbus/drivers/hv_storvsc/{GUID}").endswith(GUID)


def test_writable_attributes(mnt: Mounted) -> None:
    d = sdev(mnt, 1)
    assert sh(f"echo 64 > '{d}/queue_depth'").returncode == 0
    assert cat(d / "queue_depth") == "64\n"
    for bad in ("0", "1000", "many"):
        r = sh(f"echo {bad} > '{d}/queue_depth'", check=False)
        assert r.returncode != 0 and "Invalid argument" in r.stderr
    assert cat(d / "queue_depth") == "64\n"
    r = sh(f"echo soon > '{d}/timeout'", check=False)
    assert r.returncode != 0 and "Invalid argument" in r.stderr
    assert cat(d / "timeout") == "180\n"
    r = sh(f"echo Contoso > '{d}/vendor'", check=False)
    assert r.returncode != 0 and "Permission denied" in r.stderr
    assert sh(f"echo 327 > '{d}/queue_depth'").returncode == 0


def test_walinuxagent_finds_the_resource_disk(mnt: Mounted) -> None:
    """``search_for_resource_disk`` for Gen2 (reference/sysfs.md §5.5): the device whose
    device_id is the Azure controller, os.walk'ed (no symlinks followed) to a ``block``
    directory whose parent is LUN 1."""
    base = mnt.path / "sys/bus/vmbus/devices"
    found = []
    for entry in os.listdir(base):
        if (base / entry / "device_id").read_text().strip("{}\n") != GUID:
            continue
        for root, dirs, _files in os.walk(base / entry):
            if root.split("/")[-1] == "block" and root.split("/")[-2].split(":")[-1] == "1":
                found.append(dirs[0])
    assert found == ["sdb"]


def test_dd_reaches_the_image(mnt: Mounted) -> None:
    dev = mnt.path / "dev/sda"
    sh(f"dd if=/dev/urandom of={dev} bs=1M count=24 seek=3 conv=fsync,notrunc status=none")
    sh(f"cmp <(dd if={dev} bs=1M skip=3 count=24 status=none) "
       f"<(dd if={image(mnt, 0)} bs=1M skip=3 count=24 status=none)")
    st = cat(mnt.path / "sys/block/sda/stat").split()
    assert int(st[4]) >= 24 and int(st[15]) >= 1          # writes and a flush
    r = sh(f"dd if=/dev/zero of={dev} bs=1M seek=1024 count=1 conv=notrunc", check=False)
    assert r.returncode != 0 and "No space left on device" in r.stderr


@pytest.fixture
def fio() -> str:
    path = shutil.which("fio")
    if path is None:
        pytest.skip("fio is not installed; run .ci/setup")
    return path


@pytest.mark.parametrize("engine", ["psync", "libaio"])
def test_fio_verify(mnt: Mounted, fio: str, engine: str) -> None:
    dev = mnt.path / "dev/sdb"
    r = sh(f"{fio} --name=v --filename={dev} --rw=randwrite --bs=4k --bsrange=512-64k "
           f"--size=24M --offset=256M --ioengine={engine} --iodepth=8 --direct=1 "
           f"--verify=crc32c --verify_fatal=1 --do_verify=1 --randrepeat=0 --verify_state_save=0 "
           f"--output-format=terse", check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "verify" not in r.stderr.lower()


def test_ext4_on_sda(mnt: Mounted, loop_available: None, tmp_path: Path) -> None:
    ext4_round_trip(mnt.path / "dev/sda", tmp_path, 5 << 20, Path(__file__).parent)


def test_mountctl_status_and_discard(mnt: Mounted) -> None:
    out = mountctl("status", str(mnt.path), env=mnt.env, check=True).stdout
    row = next(line for line in out.splitlines() if GUID in line)
    assert row.split()[3:6] == ["scsi", "(sda,", "sdb)"]
    dev = mnt.path / "dev/sdb"
    sh(f"dd if=/dev/urandom of={dev} bs=1M count=4 seek=64 conv=notrunc,fsync status=none")
    r = mountctl("discard", str(mnt.path), "sdb", "65M", "2M", env=mnt.env)
    assert r.returncode == 0, r.stderr
    with open(dev, "rb") as f:
        f.seek(65 << 20)
        assert f.read(2 << 20) == bytes(2 << 20)
        assert f.read(1 << 20) != bytes(1 << 20)
    assert int(cat(mnt.path / "sys/block/sdb/stat").split()[11]) >= 1    # discard I/Os


# -- machines of their own ------------------------------------------------------------------------

def _config(tmp: Path, body: str) -> Path:
    cfg = tmp / "m.toml"
    cfg.write_text(f'[machine]\nname = "scsi-test"\nstate_dir = "{tmp}/state"\n{body}')
    return cfg


@pytest.mark.mount
def test_two_controllers_readonly_and_4k_disks(tmp_path: Path,
                                               state_env: dict[str, str]) -> None:
    (tmp_path / "state").mkdir()
    ro = tmp_path / "state/ro.img"
    ro.write_bytes(b"R" * (1 << 20))
    cfg = _config(tmp_path, f"""
[[vmbus.device]]
type = "scsi"
[[vmbus.device.lun]]
size = "8M"
sector_size = 4096
write_cache = false
discard = false
[[vmbus.device]]
type = "scsi"
[[vmbus.device.lun]]
lun = 2
image = "{ro}"
readonly = true
serial = ""
vendor = "Contoso"
model = "Archive"
""")
    mp = tmp_path / "m"
    mp.mkdir()
    mountctl("up", "-d", "-c", str(cfg), str(mp), env=state_env, check=True)
    try:
        out = sh(f"lsblk --sysroot {mp} -P -o NAME,HCTL,VENDOR,MODEL,RO,LOG-SEC,ROTA").stdout
        assert out.splitlines() == [
            'NAME="sda" HCTL="0:0:0:0" VENDOR="Msft    " MODEL="Virtual Disk    " RO="0" '
            'LOG-SEC="4096" ROTA="1"',
            'NAME="sdb" HCTL="1:0:0:2" VENDOR="Contoso " MODEL="Archive         " RO="1" '
            'LOG-SEC="512" ROTA="0"']
        q = mp / "sys/block/sda/queue"
        assert cat(q / "write_cache") == "write through\n"
        assert cat(q / "discard_max_bytes") == "0\n"
        s1 = mp / "sys/class/scsi_disk/1:0:0:2/device"
        assert not (s1 / "vpd_pg80").exists()
        r = sh(f"dd if=/dev/zero of={mp}/dev/sdb bs=512 count=1 conv=notrunc", check=False)
        assert r.returncode != 0 and "Read-only file system" in r.stderr
        fd = os.open(mp / "dev/sda", os.O_RDWR)
        try:    # sub-block I/O on a 4 KiB-sector disk is read-modify-write
            os.pwrite(fd, b"abc", 4095)
            assert os.pread(fd, 5, 4094) == b"\0abc\0"
        finally:
            os.close(fd)
    finally:
        mountctl("down", str(mp), env=state_env)
    assert ro.read_bytes() == b"R" * (1 << 20)


@pytest.mark.mount
def test_bad_lun_configs_are_refused(tmp_path: Path, state_env: dict[str, str]) -> None:
    mp = tmp_path / "m"
    mp.mkdir()
    for lun, key in (('sector_size = 1000', "vmbus.device[0].lun[0].sector_size"),
                     ('lun = 300', "vmbus.device[0].lun[0].lun"),
                     ('vendor = "VeryLongVendor"', "vmbus.device[0].lun[0].vendor"),
                     ('size = "1000"', "vmbus.device[0].lun[0].size"),
                     ('colour = "blue"', "vmbus.device[0].lun[0].colour")):
        cfg = _config(tmp_path, f'[[vmbus.device]]\ntype = "scsi"\n[[vmbus.device.lun]]\n'
                                f'{lun}\n')
        r = mountctl("up", "-d", "-c", str(cfg), str(mp), env=state_env)
        assert r.returncode == 2 and key in r.stderr, (lun, r.stderr)
    cfg = _config(tmp_path, '[[vmbus.device]]\ntype = "nic"\n[[vmbus.device.lun]]\n')
    r = mountctl("up", "-d", "-c", str(cfg), str(mp), env=state_env)
    assert r.returncode == 2 and "vmbus.device[0].lun: only scsi" in r.stderr
    missing = _config(tmp_path, '[[vmbus.device]]\ntype = "scsi"\n[[vmbus.device.lun]]\n'
                                'readonly = true\nimage = "/nonexistent/x.img"\n')
    r = mountctl("up", "-d", "-c", str(missing), str(mp), env=state_env)
    assert r.returncode == 1 and "x.img" in r.stderr
    assert not os.path.ismount(mp)
