"""What the kernel caches, through the real mount (README, "Attributes the kernel caches"):
a static attribute is read from the service once and then from the page cache, with
``st_size`` its length before and after; a live one reaches the service at each read and
changes under I/O; a removed device's names are gone at once and the device that comes back
reads right. ``MNT/.vbusfs/fuse_requests`` counts what reaches the service.

Expected values come from reference/sysfs.md (§1.5 class GUIDs, §3 PCI identities)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.conftest import Mounted

HEARTBEAT = "fd149e91-82e0-4a7d-afa6-2a4166cbd7c0"        # the default machine's
HEARTBEAT_CLASS = "{57164f39-9115-4e78-ab55-382f3bd5422d}\n"  # reference §1.5
BLK = "0000:00:04.0"


def requests(mnt: Mounted) -> dict[str, int]:
    text = (mnt.path / ".vbusfs/fuse_requests").read_text()
    return {name: int(n) for name, n in (line.split() for line in text.splitlines())}


def reads_of(mnt: Mounted, path: Path, times: int) -> int:
    """How many READ requests reached the service while ``path`` was read ``times`` times
    (each an open, reads to the end, a close), less what reading the counts costs."""
    before = requests(mnt)
    between = requests(mnt)                     # the cost of one look at the counts
    for _ in range(times):
        with open(path, "rb") as f:
            f.read()
    after = requests(mnt)
    return (after["read"] - between["read"]) - (between["read"] - before["read"])


def test_static_attribute_size_is_its_length_before_and_after_reads(mnt: Mounted) -> None:
    a = mnt.path / "sys/bus/vmbus/devices" / HEARTBEAT / "class_id"
    assert a.stat().st_size == len(HEARTBEAT_CLASS) == 39
    assert a.read_text() == HEARTBEAT_CLASS
    assert a.stat().st_size == 39 and a.read_text() == HEARTBEAT_CLASS
    assert subprocess.run(["cat", str(a)], capture_output=True, text=True,
                          check=True).stdout == HEARTBEAT_CLASS
    # a live attribute keeps sysfs's 4096, whatever its length (reference §0)
    state = a.parent / "state"
    assert state.stat().st_size == 4096 and state.read_text() == "3\n"
    assert state.stat().st_size == 4096


def test_repeated_reads_of_a_static_attribute_never_reach_the_service(mnt: Mounted) -> None:
    vendor = mnt.path / "sys/bus/pci/devices" / BLK / "vendor"
    assert vendor.read_text() == "0x1af4\n"              # the first read may reach it
    assert reads_of(mnt, vendor, 20) == 0
    # a live one is read from the service every time: one READ per open at least
    assert reads_of(mnt, vendor.parent / "enable", 20) >= 20


def test_a_second_scan_looks_nothing_up(mnt: Mounted) -> None:
    """Names are cached for an hour (removals invalidate them): a second `grep -r` of a
    device sends no LOOKUP and reads only its live attributes."""
    d = mnt.path / "sys/bus/vmbus/devices" / HEARTBEAT
    subprocess.run(["grep", "-rs", ".", f"{d}/"], capture_output=True, check=False)
    before = requests(mnt)
    subprocess.run(["grep", "-rs", ".", f"{d}/"], capture_output=True, check=False)
    after = requests(mnt)
    assert after.get("lookup", 0) == before.get("lookup", 0)
    files = [p for p in d.rglob("*") if p.is_file() and not p.is_symlink()]
    static = [p for p in files if p.stat().st_size != 4096]
    live_readable = [p for p in files
                     if p.stat().st_size == 4096 and p.stat().st_mode & 0o444]
    assert {p.name for p in static} >= {"class_id", "device_id", "modalias", "id", "vendor",
                                        "device", "numa_node", "subchannel_id"}
    reads = after["read"] - before["read"]
    # direct I/O: a live attribute costs grep two READs (its text, then the end), a static
    # one none; reading the counts costs two more
    assert reads == 2 * len(live_readable) + 2


def test_live_attributes_change_between_reads(mnt: Mounted) -> None:
    stat = mnt.path / "sys/block/xvda/stat"
    before = stat.read_text()
    fd = os.open(mnt.path / "dev/xvda", os.O_RDONLY | os.O_DIRECT)
    try:
        buf = bytearray(4096)
        for i in range(8):
            os.preadv(fd, [memoryview(buf)], i * 4096)
    finally:
        os.close(fd)
    after = stat.read_text()
    assert int(after.split()[0]) >= int(before.split()[0]) + 8       # read I/Os
    assert stat.stat().st_size == 4096
    # a ring index moves with the traffic the heartbeat service sees
    idx = mnt.path / "sys/bus/vmbus/devices" / HEARTBEAT / "in_read_index"
    assert idx.stat().st_size == 4096 and idx.read_text().strip().isdigit()


def test_remove_and_rescan_serves_the_new_device(mnt: Mounted) -> None:
    pci = mnt.path / "sys/bus/pci"
    dev = pci / "devices" / BLK
    names = ("vendor", "device", "subsystem_vendor", "subsystem_device", "class", "modalias")
    want = ["0x1af4\n", "0x1042\n", "0x1af4\n", "0x1100\n", "0x010000\n",   # reference §3
            "pci:v00001AF4d00001042sv00001AF4sd00001100bc01sc00i00\n"]
    assert [(dev / n).read_text() for n in names] == want
    old = {n: (dev / n).stat().st_ino for n in names}
    virtio = next(c for c in dev.iterdir() if c.name.startswith("virtio") and
                  not c.is_symlink())
    assert (virtio / "device").read_text() == "0x0002\n"
    (dev / "remove").write_text("1")
    assert not dev.exists() and not (mnt.path / "dev/vda").exists()   # at once
    assert not (mnt.path / "sys/devices/pci0000:00" / BLK / "vendor").exists()
    (pci / "rescan").write_text("1")
    assert [(dev / n).read_text() for n in names] == want
    new = {n: (dev / n).stat().st_ino for n in names}
    assert not set(old.values()) & set(new.values())   # new nodes: nothing cached is theirs
    assert [(dev / n).stat().st_size for n in names] == [len(w) for w in want]
    virtio = next(c for c in dev.iterdir() if c.name.startswith("virtio") and
                  not c.is_symlink())
    assert (virtio / "device").read_text() == "0x0002\n"
    assert (mnt.path / "sys/block/vda/dev").read_text() == "254:0\n"


def test_no_writable_attribute_is_static(mnt: Mounted) -> None:
    """A writable text attribute keeps st_size 4096 (live); sizes other than 4096 are
    static attributes, binary ones and the disks."""
    binary = {"config", "inquiry", "rom"}
    for dirpath, _dirs, files in os.walk(mnt.path / "sys"):
        for name in files:
            p = Path(dirpath) / name
            st = p.lstat()
            if st.st_mode & 0o222 and name not in binary and not name.startswith(
                    ("resource", "vpd_pg")):
                assert st.st_size == 4096, p
