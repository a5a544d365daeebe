"""Xen disks through the real mount, used the way a person does: cat, ls, dd, cmp, lsblk,
losetup + mkfs.ext4 + mount + fsck. Expected values come from reference/sysfs.md §2 and §4
and from the configs written here."""

from __future__ import annotations

import concurrent.futures
import errno
import os
import random
import subprocess
from pathlib import Path

import blake3
import pytest

from tests.conftest import Mounted, mountctl
from tests.ext4_on_loop import ext4_round_trip

GiB = 1 << 30


def sh(cmd: str, **kw: object) -> str:
    return subprocess.run(["bash", "-c", cmd], check=True, capture_output=True, text=True,
                          timeout=120, **kw).stdout  # type: ignore[call-overload,no-any-return]


def cat(p: Path) -> str:
    return sh(f"cat '{p}'")


def image(m: Mounted, name: str) -> Path:
    return Path(m.env["VBUSFS_STATE"]) / "hyperv-gen2" / f"{name}.img"


def test_xenbus_device_attributes(mnt: Mounted) -> None:
    d = mnt.path / "sys/bus/xen/devices/vbd-51712"
    assert os.readlink(d) == "../../../devices/vbd-51712"
    assert [cat(d / a) for a in ("nodename", "devtype", "modalias", "state")] == \
        ["device/vbd/51712\n", "vbd\n", "xen:vbd\n", "Connected\n"]
    assert cat(d / "uevent") == "MODALIAS=xen:vbd\n"
    assert os.readlink(d / "driver") == "../../bus/xen/drivers/vbd"
    events = int(cat(d / "xenbus/events"))
    sh(f"dd if={mnt.path}/dev/xvda of=/dev/null bs=4096 count=3 status=none")
    assert int(cat(d / "xenbus/events")) >= events + 1     # responses raised interrupts
    b = mnt.path / "sys/bus/xen-backend/devices/vbd-1-51712"
    assert [cat(b / a) for a in ("nodename", "devtype", "modalias", "state")] == \
        ["backend/vbd/1/51712\n", "vbd\n", "xen-backend:vbd\n", "Connected\n"]
    assert sorted(os.listdir(mnt.path / "sys/bus/xen/devices")) == ["vbd-51712", "vbd-51728"]


def test_block_tree(mnt: Mounted) -> None:
    s = mnt.path / "sys"
    assert os.readlink(s / "block/xvda") == "../devices/vbd-51712/block/xvda"
    assert os.readlink(s / "dev/block/202:16") == "../../devices/vbd-51728/block/xvdb"
    assert os.readlink(s / "class/block/xvda") == "../../devices/vbd-51712/block/xvda"
    a = s / "block/xvda"
    got = {n: cat(a / n) for n in ("dev", "size", "ro", "removable", "range", "inflight")}
    assert got == {"dev": "202:0\n", "size": f"{GiB // 512}\n", "ro": "0\n",
                   "removable": "0\n", "range": "16\n", "inflight": "       0        0\n"}
    assert cat(s / "block/xvdb/dev") == "202:16\n"
    q = a / "queue"
    # 256 indirect segments of 4 KiB: max_hw_sectors_kb 1024; blkfront queues are non-rotational
    assert [cat(q / n) for n in ("logical_block_size", "physical_block_size",
                                 "max_hw_sectors_kb", "max_segments", "rotational",
                                 "write_cache", "scheduler")] == \
        ["512\n", "512\n", "1024\n", "256\n", "0\n", "write back\n", "[none] mq-deadline\n"]
    assert len(cat(a / "stat").split()) == 17
    # kernfs link text, as in reference/real-virtio-pci-sysfs.txt (vda/device ->
    # ../../../virtio1, vda/bdi -> ../../../../../virtual/bdi/254:0 one level deeper)
    assert os.readlink(a / "device") == "../../../vbd-51712"
    assert os.readlink(a / "bdi") == "../../../virtual/bdi/202:0"
    assert oct((a / "queue/rotational").stat().st_mode & 0o777) == "0o644"
    out = sh(f"lsblk --sysroot {mnt.path} -b -n -o NAME,MAJ:MIN,SIZE,RO,TYPE")
    rows = [line.split() for line in out.splitlines() if line.startswith("xvd")]
    assert rows == [["xvda", "202:0", str(GiB), "0", "disk"],     # sdX and vda are others'
                    ["xvdb", "202:16", str(256 << 20), "0", "disk"]]


def test_xenstore_and_hypervisor(mnt: Mounted) -> None:
    x = mnt.path / "xenstore/local/domain"
    assert cat(x / "0/backend/vbd/1/51712/state") == "4\n"
    assert cat(x / "1/device/vbd/51712/state") == "4\n"
    assert cat(x / "0/backend/vbd/1/51712/sectors") == f"{GiB // 512}\n"
    assert cat(x / "1/device/vbd/51712/protocol") == "x86_64-abi\n"
    assert cat(x / "1/device/vbd/51712/backend") == "/local/domain/0/backend/vbd/1/51712\n"
    r = subprocess.run(["bash", "-c", f"echo 5 > {x}/1/device/vbd/51712/state"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "Permission denied" in r.stderr
    h = mnt.path / "sys/hypervisor"
    assert cat(h / "type") == "xen\n"
    assert (cat(h / "version/major"), cat(h / "version/minor")) == ("4\n", "17\n")
    assert not int(cat(h / "properties/features"), 16) & (1 << 11)    # not dom0


def test_dd_reaches_the_image(mnt: Mounted) -> None:
    dev = mnt.path / "dev/xvda"
    assert dev.stat().st_size == GiB
    sh(f"dd if=/dev/urandom of={dev} bs=1M count=16 conv=fsync status=none")
    sh(f"cmp <(head -c 16M {dev}) <(head -c 16M {image(mnt, 'xvda')})")
    assert dev.stat().st_size == GiB          # dd's truncate does not shrink a disk


def test_stat_counts_the_io_done(mnt: Mounted) -> None:
    st = mnt.path / "sys/block/xvdb/stat"
    before = [int(v) for v in cat(st).split()]
    sh(f"dd if={mnt.path}/dev/xvdb of=/dev/null bs=64K count=10 status=none")
    sh(f"dd if=/dev/zero of={mnt.path}/dev/xvdb bs=4096 count=5 seek=100 conv=notrunc,fsync "
       "status=none")
    after = [int(v) for v in cat(st).split()]
    d = [a - b for a, b in zip(after, before, strict=True)]
    assert (d[0], d[2]) == (10, 10 * 128)          # reads, sectors
    assert (d[4], d[6]) == (5, 5 * 8)              # writes, sectors
    assert d[15] == 1 and d[8] == 0                # one flush; nothing in flight


def test_ends_and_errors(mnt: Mounted) -> None:
    dev = mnt.path / "dev/xvdb"
    size = 256 << 20
    fd = os.open(dev, os.O_RDWR)
    try:
        assert os.pread(fd, 4096, size) == b""
        assert os.pread(fd, 4096, size - 100) == os.pread(fd, 100, size - 100)
        with pytest.raises(OSError) as e:
            os.pwrite(fd, b"x", size)
        assert e.value.errno == errno.ENOSPC
        assert os.pwrite(fd, b"y" * 300, size - 100) == 100      # cut short at the end
    finally:
        os.close(fd)
    r = subprocess.run(["dd", "if=/dev/zero", f"of={dev}", "bs=1M", "seek=255", "count=2",
                        "conv=notrunc"], capture_output=True, text=True)
    assert r.returncode != 0 and "No space left on device" in r.stderr


def test_concurrent_odd_io_matches_model(mnt: Mounted) -> None:
    """8 threads write odd-sized pieces at odd offsets, many sharing sectors with their
    neighbours (so read-modify-write runs concurrently on the same sector), then every byte
    is checked through the mount and in the image, by blake3 against a model."""
    dev = mnt.path / "dev/xvdb"
    span = 8 << 20
    rng = random.Random(42)
    base = bytearray(rng.randbytes(span))
    fd = os.open(dev, os.O_RDWR)
    try:
        os.pwrite(fd, bytes(base), 0)
        model = bytearray(base)
        pieces: list[tuple[int, bytes]] = []
        off = 7
        while off < span - 70000:
            n = rng.randrange(1, 70000)
            data = rng.randbytes(n)
            pieces.append((off, data))
            model[off:off + n] = data
            off += n + rng.choice([0, 0, 1, 3, 511, 513, 4097])
        rng.shuffle(pieces)

        def worker(k: int) -> None:
            for o, data in pieces[k::8]:
                assert os.pwrite(fd, data, o) == len(data)
                probe = rng.randrange(0, span - 5000)
                os.pread(fd, 4999, probe)          # reads interleave with the writes

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(worker, range(8)))
        want = blake3.blake3(bytes(model)).hexdigest()
        got = blake3.blake3(os.pread(fd, span, 0)).hexdigest()
        assert got == want
    finally:
        os.close(fd)
    with open(image(mnt, "xvdb"), "rb") as f:
        assert blake3.blake3(f.read(span)).hexdigest() == want


def test_mountctl_discard(mnt: Mounted) -> None:
    dev = mnt.path / "dev/xvdb"
    sh(f"dd if=/dev/urandom of={dev} bs=1M count=4 seek=100 conv=notrunc,fsync status=none")
    r = mountctl("discard", str(mnt.path), "xvdb", "101M", "2M", env=mnt.env)
    assert r.returncode == 0, r.stderr
    with open(dev, "rb") as f:
        f.seek(101 << 20)
        assert f.read(2 << 20) == bytes(2 << 20)
        assert f.read(1 << 20) != bytes(1 << 20)
    bad = mountctl("discard", str(mnt.path), "xvdb", "1", "512", env=mnt.env)
    assert bad.returncode == 2 and "Invalid argument" in bad.stderr
    assert mountctl("discard", str(mnt.path), "nope", "0", "512",
                    env=mnt.env).returncode == 2
    assert int(cat(mnt.path / "sys/block/xvdb/stat").split()[11]) >= 1   # discard I/Os


def test_losetup_mkfs_mount_fsck(mnt: Mounted, loop_available: None,
                                 tmp_path: Path) -> None:
    ext4_round_trip(mnt.path / "dev/xvdb", tmp_path, 3 << 20, Path(__file__).parent)


def _config(tmp: Path, extra: str = "") -> Path:
    cfg = tmp / "m.toml"
    cfg.write_text(f"""[machine]
name = "xen-test"
state_dir = "{tmp}/state"
[xen]
[[xen.vbd]]
vdev = "xvda"
size = "8M"
{extra}
""")
    return cfg


def _up(cfg: Path, mp: Path, env: dict[str, str]) -> None:
    mp.mkdir(exist_ok=True)
    mountctl("up", "-d", "-c", str(cfg), str(mp), env=env, check=True)


@pytest.mark.mount
def test_disk_survives_remount(tmp_path: Path,
                               state_env: dict[str, str]) -> None:
    cfg, mp = _config(tmp_path), tmp_path / "m"
    _up(cfg, mp, state_env)
    try:
        data = os.urandom(3 << 20)
        (mp / "dev/xvda").write_bytes(data)
    finally:
        assert mountctl("down", str(mp), env=state_env).returncode == 0
    assert (tmp_path / "state/xvda.img").stat().st_size == 8 << 20
    _up(cfg, mp, state_env)
    try:
        with open(mp / "dev/xvda", "rb") as f:
            assert f.read(3 << 20) == data
    finally:
        mountctl("down", str(mp), env=state_env)


@pytest.mark.mount
def test_readonly_disk_and_4k_sectors(tmp_path: Path,
                                      state_env: dict[str, str]) -> None:
    (tmp_path / "state").mkdir()
    ro = tmp_path / "state/ro.img"
    ro.write_bytes(b"R" * (1 << 20))
    cfg = _config(tmp_path, f"""sector_size = 4096
[[xen.vbd]]
vdev = "xvdc"
image = "{ro}"
readonly = true
""")
    mp = tmp_path / "m"
    _up(cfg, mp, state_env)
    try:
        assert cat(mp / "sys/block/xvdc/ro") == "1\n"
        assert cat(mp / "xenstore/local/domain/0/backend/vbd/1/51744/info") == "4\n"
        r = subprocess.run(["dd", "if=/dev/zero", f"of={mp}/dev/xvdc", "bs=512", "count=1",
                            "conv=notrunc"], capture_output=True, text=True)
        assert r.returncode != 0 and "Read-only file system" in r.stderr
        assert (mp / "dev/xvdc").read_bytes() == b"R" * (1 << 20)
        q = mp / "sys/block/xvda/queue"
        assert cat(q / "logical_block_size") == "4096\n"
        fd = os.open(mp / "dev/xvda", os.O_RDWR)
        try:   # sub-block I/O on a 4 KiB-sector disk is read-modify-write
            os.pwrite(fd, b"abc", 4095)
            assert os.pread(fd, 5, 4094) == b"\0abc\0"
        finally:
            os.close(fd)
    finally:
        mountctl("down", str(mp), env=state_env)
    assert ro.read_bytes() == b"R" * (1 << 20)


@pytest.mark.mount
def test_bad_disk_configs_are_refused(tmp_path: Path,
                                      state_env: dict[str, str]) -> None:
    mp = tmp_path / "m"
    mp.mkdir()
    for extra, key in (('sector_size = 1000', "xen.vbd[0].sector_size"),
                       ('features = ["trim"]', "xen.vbd[0].features[0]"),
                       ('max_ring_page_order = 5', "xen.vbd[0].max_ring_page_order"),
                       ('indirect_segments = 5', "xen.vbd[0].indirect_segments")):
        r = mountctl("up", "-d", "-c", str(_config(tmp_path, extra)), str(mp), env=state_env)
        assert r.returncode == 2 and key in r.stderr, (extra, r.stderr)
    missing = _config(tmp_path, 'readonly = true\nimage = "/nonexistent/x.img"')
    r = mountctl("up", "-d", "-c", str(missing), str(mp), env=state_env)
    assert r.returncode == 1 and "x.img" in r.stderr
    assert not os.path.ismount(mp)


def _stats(m: Mounted) -> dict[str, int]:
    d = m.path / ".vbusfs/stats"
    return {p.name: int(p.read_text()) for p in d.iterdir()}


def _proc_status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(key)


def test_stats_count_what_the_service_holds_and_come_back(mnt: Mounted) -> None:
    """MNT/.vbusfs/stats/: the service's fds, threads and RSS as /proc shows them, grants in
    use (two blkfront rings of 16 pages, their persistent and indirect grants) and allocated
    guest frames; after a warm-up, I/O and remove/rescan cycles give back what they took."""
    pid = int((mnt.path / ".vbusfs/pid").read_text())
    s = _stats(mnt)
    assert set(s) == {"fds", "threads", "rss_kb", "grants", "grants_mapped", "guest_frames",
                      "guest_frames_total"}
    assert s["fds"] == len(os.listdir(f"/proc/{pid}/fd"))
    assert s["threads"] == _proc_status(pid, "Threads")
    assert abs(s["rss_kb"] - _proc_status(pid, "VmRSS")) < 16 << 10
    assert s["guest_frames_total"] == (64 << 20) // 4096
    assert 0 < s["guest_frames"] < s["guest_frames_total"]
    assert s["grants"] > 0 and s["grants_mapped"] >= 2

    def cycle() -> None:
        for d in ("xvda", "xvdb", "vda", "sda", "sdb"):
            sh(f"dd if=/dev/urandom of={mnt.path}/dev/{d} bs=64K count=16 seek=200 "
               "conv=fsync,notrunc status=none")
            sh(f"dd if={mnt.path}/dev/{d} of=/dev/null bs=4k count=64 skip=3200 status=none")
        (mnt.path / "sys/bus/pci/devices/0000:00:04.0/remove").write_text("1")
        (mnt.path / "sys/bus/pci/rescan").write_text("1")
        (mnt.path / "sys/class/scsi_device/0:0:0:1/device/delete").write_text("1")
        (mnt.path / "sys/class/scsi_host/host0/scan").write_text("- - -")
        assert (mnt.path / "dev/vda").exists() and (mnt.path / "dev/sdb").exists()

    cycle()                                    # I/O threads and persistent grants start here
    warm = _stats(mnt)
    for _ in range(3):
        cycle()
    after = _stats(mnt)
    for k in ("fds", "threads", "grants", "grants_mapped", "guest_frames"):
        assert after[k] == warm[k], (k, warm[k], after[k])
