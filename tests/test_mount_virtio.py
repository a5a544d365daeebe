"""virtio over PCI through the real mount, used the way a person does: lspci, cat, ls, dd,
cmp, lsblk, losetup + mkfs.ext4 + mount + fsck, fio --verify. Expected values come from
reference/sysfs.md §3 (formats), reference/real-virtio-pci-sysfs.txt (a real guest's tree)
and QEMU's identities (reference/sysfs.md §3.3)."""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Mounted, mountctl
from tests.ext4_on_loop import ext4_round_trip

BLK = "0000:00:04.0"         # the default machine's virtio-blk function


def sh(cmd: str) -> str:
    return subprocess.run(["bash", "-c", cmd], check=True, capture_output=True, text=True,
                          timeout=300).stdout


def cat(p: Path) -> str:
    return p.read_text()


def virtio_of(mnt: Mounted, bdf: str) -> Path:
    d = mnt.path / "sys/bus/pci/devices" / bdf
    return next(c for c in d.iterdir() if c.name.startswith("virtio") and not c.is_symlink())


def test_pci_functions_have_linuxs_attributes(mnt: Mounted) -> None:
    bus = mnt.path / "sys/bus/pci/devices"
    names = sorted(os.listdir(bus))
    assert names == ["0000:00:00.0", "0000:00:03.0", "0000:00:04.0", "0000:00:05.0",
                     "0000:00:06.0"]
    for n in names:
        assert re.fullmatch(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.\d", n)   # what lspci parses
        assert os.readlink(bus / n) == f"../../../devices/pci0000:00/{n}"
    d = bus / BLK
    assert [cat(d / a) for a in ("vendor", "device", "subsystem_vendor", "subsystem_device",
                                 "class", "revision", "irq")] == [
        "0x1af4\n", "0x1042\n", "0x1af4\n", "0x1100\n", "0x010000\n", "0x01\n", "0\n"]
    assert cat(d / "modalias") == "pci:v00001AF4d00001042sv00001AF4sd00001100bc01sc00i00\n"
    res = cat(d / "resource").splitlines()
    assert len(res) == 7 and all(re.fullmatch(r"0x[0-9a-f]{16} 0x[0-9a-f]{16} 0x[0-9a-f]{16}",
                                              line) for line in res)
    start, end, flags = (int(x, 16) for x in res[4].split())
    assert end - start + 1 == 0x4000 and flags == 0x14220C          # 64-bit prefetchable
    assert cat(d / "enable") == "1\n" and cat(d / "numa_node") == "-1\n"
    assert cat(d / "dma_mask_bits") == "64\n" and cat(d / "driver_override") == "(null)\n"
    assert cat(d / "local_cpus") == "3\n" and cat(d / "local_cpulist") == "0-1\n"
    assert os.readlink(d / "driver") == "../../../bus/pci/drivers/virtio-pci"
    assert cat(d / "uevent") == (
        "DRIVER=virtio-pci\nPCI_CLASS=10000\nPCI_ID=1AF4:1042\nPCI_SUBSYS_ID=1AF4:1100\n"
        f"PCI_SLOT_NAME={BLK}\nMODALIAS=pci:v00001AF4d00001042sv00001AF4sd00001100bc01sc00i00\n")
    assert oct((d / "config").stat().st_mode & 0o777) == "0o644"
    assert (d / "config").stat().st_size == 256
    assert oct((d / "resource4").stat().st_mode & 0o777) == "0o600"
    assert (d / "resource4").stat().st_size == 0x4000
    host = bus / "0000:00:00.0"
    assert cat(host / "class") == "0x060000\n" and not (host / "driver").exists()


def test_config_is_binary_with_offsets(mnt: Mounted) -> None:
    """(What a reader who is not root sees, 64 bytes, is checked in test_fs_ops: the test
    mount lives in root's private temporary directory.)"""
    cfg = mnt.path / "sys/bus/pci/devices" / BLK / "config"
    with open(cfg, "rb") as f:
        data = f.read()
        assert len(data) == 256 and data[:4] == bytes.fromhex("f41a4210")
        assert os.pread(f.fileno(), 2, 0x34) == bytes([0x98, 0x00])  # capabilities at 0x98
        assert os.pread(f.fileno(), 4, 0x98)[0] == 0x11              # MSI-X


def test_lspci_reads_the_tree(mnt: Mounted) -> None:
    if shutil.which("lspci") is None:
        pytest.skip("lspci (pciutils) is not installed; run .ci/setup")
    out = sh(f"lspci -A linux-sysfs -O sysfs.path={mnt.path}/sys/bus/pci -nnvvv 2>/dev/null")
    heads = re.findall(r"^(\S+) (.+) \[([0-9a-f]{4})\]: (.+) \[([0-9a-f]{4}):([0-9a-f]{4})\]"
                       r"(?: \(rev ([0-9a-f]{2})\))?$", out, re.M)
    table = {h[0]: (h[2], h[4], h[5], h[6]) for h in heads}
    assert table == {"00:00.0": ("0600", "8086", "1237", "02"),
                     "00:03.0": ("0200", "1af4", "1041", "01"),
                     "00:04.0": ("0100", "1af4", "1042", "01"),
                     "00:05.0": ("ff00", "1af4", "1044", "01"),
                     "00:06.0": ("ff00", "1af4", "1045", "01")}
    blk = out.split("00:04.0 ", 1)[1].split("\n\n", 1)[0]
    assert "Virtio 1.0 block device" in blk or "Device" in blk   # names come from pci.ids
    assert "Kernel driver in use: virtio-pci" in blk
    assert "Capabilities: [98] MSI-X: Enable+ Count=2" in blk
    assert "Region 4: Memory at" in blk and "(64-bit, prefetchable) [size=16K]" in blk
    for name in ("CommonCfg", "ISR", "DeviceCfg", "Notify"):
        assert f"VirtIO: {name}" in blk


def test_virtio_bus_attributes(mnt: Mounted) -> None:
    bus = mnt.path / "sys/bus/virtio/devices"
    assert sorted(os.listdir(bus)) == ["virtio0", "virtio1", "virtio2", "virtio3"]
    v = virtio_of(mnt, BLK)
    assert v.name == "virtio1"                           # probe order: net, blk, rng, balloon
    assert os.readlink(bus / "virtio1") == f"../../../devices/pci0000:00/{BLK}/virtio1"
    assert cat(v / "device") == "0x0002\n" and cat(v / "vendor") == "0x1af4\n"
    assert cat(v / "status") == "0x0000000f\n"
    assert cat(v / "modalias") == "virtio:d00000002v00001AF4\n"
    features = cat(v / "features")
    assert len(features) == 129 and set(features[:-1]) <= {"0", "1"}
    on = {i for i, ch in enumerate(features[:-1]) if ch == "1"}
    assert {2, 6, 9, 32} <= on                        # SEG_MAX BLK_SIZE FLUSH VERSION_1
    assert os.readlink(v / "driver") == "../../../../bus/virtio/drivers/virtio_blk"
    assert cat(v / "uevent") == "DRIVER=virtio_blk\nMODALIAS=virtio:d00000002v00001AF4\n"
    drivers = sorted(os.listdir(mnt.path / "sys/bus/virtio/drivers"))
    assert drivers == ["virtio_balloon", "virtio_blk", "virtio_console", "virtio_net",
                       "virtio_rng"]


def test_vda_block_tree(mnt: Mounted) -> None:
    s = mnt.path / "sys"
    assert os.readlink(s / "block/vda") == f"../devices/pci0000:00/{BLK}/virtio1/block/vda"
    d = s / "block/vda"
    assert cat(d / "dev") == "254:0\n" and cat(d / "range") == "16\n"
    assert cat(d / "ext_range") == "256\n" and cat(d / "size") == f"{(512 << 20) // 512}\n"
    serial = cat(d / "serial")
    assert re.fullmatch(r"[0-9a-f]{20}", serial)        # derived; no newline, as Linux
    assert cat(d / "cache_type") == "write back\n"
    q = d / "queue"
    assert [cat(q / a) for a in ("max_segments", "max_segment_size", "max_hw_sectors_kb",
                                 "logical_block_size", "physical_block_size", "rotational",
                                 "dma_alignment", "write_cache")] == [
        "254\n", "4294967295\n", "2147483647\n", "512\n", "4096\n", "1\n", "511\n",
        "write back\n"]
    out = sh(f"lsblk --sysroot {mnt.path} -n -o NAME,MAJ:MIN,TYPE")
    assert re.search(r"^vda\s+254:0\s+disk$", out, re.M)


def test_dd_and_flush_reach_the_image(mnt: Mounted) -> None:
    dev = mnt.path / "dev/vda"
    img = Path(mnt.env["VBUSFS_STATE"]) / "hyperv-gen2/vda.img"
    stat = mnt.path / "sys/block/vda/stat"
    flushes = int(cat(stat).split()[15])
    sh(f"dd if=/dev/urandom of={dev} bs=1M count=16 seek=3 conv=fsync,notrunc status=none")
    sh(f"cmp <(dd if={dev} bs=1M skip=3 count=16 status=none) "
       f"<(dd if={img} bs=1M skip=3 count=16 status=none)")
    assert int(cat(stat).split()[15]) > flushes          # fsync went out as a FLUSH


def test_ext4_on_vda(mnt: Mounted, loop_available: None, tmp_path: Path) -> None:
    ext4_round_trip(mnt.path / "dev/vda", tmp_path, 2 << 20)


def test_fio_verify_on_vda(mnt: Mounted) -> None:
    if shutil.which("fio") is None:
        pytest.skip("fio is not installed; run .ci/setup")
    dev = mnt.path / "dev/vda"
    for direct in (1, 0):
        sh(f"fio --name=verify --filename={dev} --rw=randwrite --bs=4k --size=16M "
           f"--offset=256M --ioengine=psync --direct={direct} --verify=crc32c "
           f"--verify_fatal=1 --do_verify=1 --output=/dev/null")


def test_mountctl_status_shows_the_pci_bus(mnt: Mounted) -> None:
    out = mountctl("status", str(mnt.path), env=mnt.env, check=True).stdout
    assert re.search(rf"^pci\s+{re.escape(BLK)}\s+1af4:1042\s+virtio-blk \(vda\)\s+driver-ok"
                     r"\s+virtio_blk$", out, re.M), out


def test_remove_and_rescan_a_function(mnt: Mounted) -> None:
    """As root hot-unplugs and re-plugs on a real guest (pci-sysfs.c): `remove` takes the
    function, its virtio device and its disk out of the tree at once (no stale names from
    the kernel's entry cache), `rescan` brings them back under the same names, at the same
    addresses, with the data where it was. Bad numbers are EINVAL and change nothing."""
    pci = mnt.path / "sys/bus/pci"
    dev = pci / "devices" / BLK
    resources = cat(dev / "resource")
    before = sh(f"dd if={mnt.path}/dev/vda bs=1M count=4 status=none | md5sum")
    for bad in ("yes", "-1", "1 1", "0x"):
        with pytest.raises(OSError) as e:
            (dev / "remove").write_text(bad)
        assert e.value.errno == errno.EINVAL
    (dev / "remove").write_text("0")                 # kstrtoul says 0: nothing to do
    assert (dev / "vendor").exists()
    assert oct((dev / "remove").stat().st_mode & 0o777) == "0o200"
    (dev / "remove").write_text("1\n")
    assert not (pci / "devices" / BLK).exists() and not (mnt.path / "dev/vda").exists()
    assert not (mnt.path / "sys/block/vda").exists()
    assert "virtio1" not in os.listdir(mnt.path / "sys/bus/virtio/devices")
    assert "vda" not in sh(f"lsblk --sysroot {mnt.path} -n -o NAME").split()
    with pytest.raises(FileNotFoundError):
        cat(pci / "devices" / BLK / "vendor")
    (pci / "rescan").write_text("1")
    assert cat(dev / "vendor") == "0x1af4\n" and cat(dev / "resource") == resources
    assert os.readlink(dev / "driver") == "../../../bus/pci/drivers/virtio-pci"
    assert os.readlink(mnt.path / "sys/block/vda") == \
        f"../devices/pci0000:00/{BLK}/virtio1/block/vda"
    assert sh(f"dd if={mnt.path}/dev/vda bs=1M count=4 status=none | md5sum") == before
    # a device's own rescan file rescans its bus; the root bus has one too
    # When the write returns, the kernel has forgotten the names: at once, every time (the
    # invalidation had been queued, and a name read right after a rescan was the old node).
    for _ in range(25):
        (pci / "devices/0000:00:05.0/remove").write_text("1")
        assert not (pci / "devices/0000:00:05.0").exists()
        (mnt.path / "sys/devices/pci0000:00/pci_bus/0000:00/rescan").write_text("1")
        assert cat(pci / "devices/0000:00:05.0/device") == "0x1044\n"
    (dev / "rescan").write_text("1")                 # nothing new: nothing changes
    assert sorted(os.listdir(pci / "devices")) == [
        "0000:00:00.0", "0000:00:03.0", "0000:00:04.0", "0000:00:05.0", "0000:00:06.0"]
