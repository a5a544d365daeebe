"""vbusfs benchmarks, side by side with their baselines in the same run (``bench/run``).

Block workloads run, interleaved, against seven targets, each over its own image of the same
size, written in full with zeros before the first workload (so no run pays for allocating
blocks), all mounted for the whole run:

* ``xvda``     — ``MNT/dev/xvda`` of a one-disk Xen machine: FUSE → gendisk → block engine →
  blkfront → blkif ring → blkback → image;
* ``vda``      — ``MNT/dev/vda`` of a one-disk PCI machine: the same engine, virtio-blk over
  a split virtqueue;
* ``sda``      — ``MNT/dev/sda`` of a machine with one storvsc controller and one LUN: the
  same engine, SCSI commands over VMBus ring buffers to storvsp;
* ``inline``   — ``bench/passthrough.py``: bare pyfuse3, mounted and answering as vbusfs
  does, each request one ``os.pread``/``os.pwrite`` on the trio thread (the ceiling for
  Python + FUSE);
* ``threaded`` — the same with a worker-thread hop per request;
* ``qsd``      — ``qemu-storage-daemon --export type=fuse``;
* ``image``    — the image file itself.

Within a workload, run *r* visits the targets in an order rotated by *r*. Each cell is the
median of the runs; ratios are disk ÷ baseline of the medians (``xvda_seq_read_vs_inline``;
for the attribute scan a ratio of times, so lower is better). For every target that is a
process (the vbusfs services, the pyfuse3 baselines, QSD) each run also reads the process's
utime + stime from ``/proc/PID/stat`` before and after, divided by the requests the
workload made (fio's count of I/Os; for dd, its 1 MiB blocks): CPU time per request.

The attribute scan mounts a machine with 1000 VMBus devices (100 with ``--quick``) and,
in each run, a fresh ``bench/treefs.py`` serving a tmpfs copy of its ``sys/`` (bare pyfuse3
with vbusfs's open/read/cache behaviour and nothing else: the floor for a Python FUSE
server of that tree); it times the first ``grep -r`` of each after mount, then a repeated
one of each and of the tmpfs copy itself. The scale workload mounts machines of 0, 100,
1,000 and 10,000 VMBus devices (10,000 only in the full run), timing ``mountctl up -d`` and
reading the service's VmRSS, and reports each size's cost per device above the empty
machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw)  # type: ignore[call-overload,no-any-return]


def mountctl(*args: str) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "mountctl", *args], cwd=ROOT)


def mount_info(path: Path) -> str | None:
    """``fstype options super-options`` of the mount on ``path``, or None."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(path):
                sep = fields.index("-")
                return f"{fields[sep + 1]} {fields[5]} {fields[sep + 3]}"
    return None


def is_mount(path: Path) -> bool:
    return mount_info(path) is not None


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 30.0,
             proc: subprocess.Popen[bytes] | None = None) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: exited with status {proc.returncode}")
        if time.monotonic() > end:
            raise RuntimeError(f"{what}: not ready after {timeout:.0f} s")
        time.sleep(0.02)


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def make_image(path: Path, size: int) -> None:
    """An image of ``size`` bytes of zeros, mode 0600 as vbusfs creates its own (a disk image
    others can read is served with a warning)."""
    if path.exists() and path.stat().st_size == size:
        path.chmod(0o600)
        return
    zeros = bytes(MiB)
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        path.chmod(0o600)
        for _ in range(size // MiB):
            f.write(zeros)
        os.fsync(f.fileno())


def vm_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process (all its threads, live and gone), in seconds."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()       # fields 3.. of proc(5)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


# --- targets ---------------------------------------------------------------------------

class Target:
    name = ""
    mnt: Path | None = None

    def __init__(self, work: Path, size: int) -> None:
        self.image = work / f"{self.name}.img"
        make_image(self.image, size)
        self.path = self.image

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def pid(self) -> int | None:
        """The process serving this target (its CPU time is measured), if any."""
        return None


class ImageTarget(Target):
    name = "image"


class DiskTarget(Target):
    """A vbusfs machine with one disk of one type, on its own mount (``mountctl up -d``)."""

    section = ""                     # the config that declares the disk; {image} is filled

    def __init__(self, work: Path, size: int) -> None:
        super().__init__(work, size)
        self.mnt = work / f"mnt-{self.name}"
        self.config = work / f"{self.name}-bench.toml"
        self.config.write_text(
            f'[machine]\nname = "bench-{self.name}"\nstate_dir = "{self.name}-state"\n\n'
            + self.section.format(image=self.image))
        self.path = self.mnt / "dev" / self.name
        self._pid: int | None = None

    def start(self) -> None:
        assert self.mnt is not None
        self.mnt.mkdir(exist_ok=True)
        mountctl("up", "-d", "-c", str(self.config), str(self.mnt))
        if not self.path.exists():
            raise RuntimeError(f"{self.name}: {self.path} is not there after mount")
        self._pid = service_pid(self.mnt)

    def stop(self) -> None:
        assert self.mnt is not None
        if is_mount(self.mnt):
            down(self.mnt, self._pid)

    def pid(self) -> int | None:
        return self._pid


class XvdaTarget(DiskTarget):
    name = "xvda"
    section = '[xen]\n[[xen.vbd]]\nvdev = "xvda"\nimage = "{image}"\n'


class VdaTarget(DiskTarget):
    name = "vda"
    section = '[pci]\n[[pci.device]]\ntype = "virtio-blk"\nimage = "{image}"\n'


class SdaTarget(DiskTarget):
    name = "sda"
    section = ('[[vmbus.device]]\ntype = "scsi"\n\n'
               '[[vmbus.device.lun]]\nlun = 0\nimage = "{image}"\n')


#: the disk types of the default machine (``lsblk --sysroot MNT``: xvdX, vdX, sdX), each a
#: target of its own with its own ratios
DISK_KINDS: list[type[DiskTarget]] = [XvdaTarget, VdaTarget, SdaTarget]
DISKS = [k.name for k in DISK_KINDS]


class ProcessTarget(Target):
    """A FUSE server run as a child process; stopped with SIGTERM."""

    proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        mnt = self.mnt
        assert mnt is not None
        wait_for(lambda: is_mount(mnt), self.name, proc=self.proc)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        if self.mnt is not None and is_mount(self.mnt):
            subprocess.run(["fusermount3", "-u", str(self.mnt)], check=False)

    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid


class InlineTarget(ProcessTarget):
    name = "inline"

    def __init__(self, work: Path, size: int) -> None:
        super().__init__(work, size)
        self.mnt = work / f"mnt-{self.name}"
        self.mnt.mkdir(exist_ok=True)
        self.path = self.mnt / "disk"

    def command(self) -> list[str]:
        return [sys.executable, str(ROOT / "bench" / "passthrough.py"), "--mode", self.name,
                str(self.image), str(self.mnt)]


class ThreadedTarget(InlineTarget):
    name = "threaded"


class QsdTarget(ProcessTarget):
    name = "qsd"

    def __init__(self, work: Path, size: int) -> None:
        super().__init__(work, size)
        self.mnt = work / "mnt-qsd"
        self.mnt.touch()         # QSD mounts over a regular file
        self.path = self.mnt

    def command(self) -> list[str]:
        return ["qemu-storage-daemon",
                "--blockdev", f"driver=file,node-name=f,filename={self.image}",
                "--export", f"type=fuse,id=e,node-name=f,mountpoint={self.mnt},writable=on"]


ALL_KINDS: list[type[Target]] = [*DISK_KINDS, InlineTarget, ThreadedTarget, QsdTarget,
                                 ImageTarget]
BASELINES = ["inline", "threaded", "qsd", "image"]


# --- block workloads ---------------------------------------------------------------------

#: what a measure returns: the figure (MB/s or IOPS) and how many requests it made
Measured = tuple[float, int]


@dataclass
class Workload:
    key: str
    title: str
    unit: str                     # "MB/s" or "IOPS"
    measure: Callable[[Path], Measured]
    cold: bool = False            # drop caches before each run
    warm: bool = False            # read the backing images into the page cache first
    results: dict[str, list[float]] = field(default_factory=dict)
    cpu_us: dict[str, list[float]] = field(default_factory=dict)   # per request


def dd_write(count: int) -> Callable[[Path], Measured]:
    def measure(path: Path) -> Measured:
        t0 = time.perf_counter()
        run(["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={count}",
             "conv=fsync,notrunc"])
        return count * MiB / (time.perf_counter() - t0) / 1e6, count
    return measure


def dd_read(count: int) -> Callable[[Path], Measured]:
    def measure(path: Path) -> Measured:
        t0 = time.perf_counter()
        run(["dd", f"if={path}", "of=/dev/null", "bs=1M", f"count={count}"])
        return count * MiB / (time.perf_counter() - t0) / 1e6, count
    return measure


def fio(rw: str, engine: str, depth: int, direct: bool, seconds: float,
        size: int) -> Callable[[Path], Measured]:
    """A 4 KiB fio job; IOPS of reads and writes together. No ramp time: the CPU time read
    around the job then covers exactly the I/Os fio counts."""
    mix = ["--rwmixread=70"] if rw == "randrw" else []

    def measure(path: Path) -> Measured:
        out = run(["fio", "--name=bench", f"--filename={path}", f"--rw={rw}", *mix,
                   "--bs=4k", f"--ioengine={engine}", f"--iodepth={depth}",
                   f"--direct={int(direct)}", f"--size={size}", "--time_based",
                   f"--runtime={round(seconds * 1000)}ms", "--randrepeat=0",
                   "--norandommap", "--invalidate=0", "--output-format=json"]).stdout
        job = json.loads(out[out.index("{"):])["jobs"][0]
        if job["error"]:
            raise RuntimeError(f"fio {rw} on {path}: error {job['error']}")
        iops = float(job["read"]["iops"]) + float(job["write"]["iops"])
        return iops, int(job["read"]["total_ios"]) + int(job["write"]["total_ios"])
    return measure


def block_workloads(count: int, fio_s: float, size: int,
                    skipped: dict[str, str]) -> list[Workload]:
    workloads = [
        Workload("seq_write", "dd 1M write, fsync", "MB/s", dd_write(count)),
        Workload("seq_read", "dd 1M read, cold", "MB/s", dd_read(count), cold=True),
    ]
    if shutil.which("fio") is None:
        skipped["fio"] = "fio is not installed: the 4 KiB workloads were not run"
        return workloads
    for key, title, rw, engine, depth, direct in [
            ("rand4k_qd1_read", "fio 4K randread psync QD1", "randread", "psync", 1, False),
            ("rand4k_qd1_write", "fio 4K randwrite psync QD1", "randwrite", "psync", 1,
             False),
            ("rand4k_qd16_read", "fio 4K randread libaio direct QD16", "randread", "libaio",
             16, True),
            ("rand4k_qd16_write", "fio 4K randwrite libaio direct QD16", "randwrite",
             "libaio", 16, True),
            ("rand4k_qd16_randrw", "fio 4K randrw 70/30 libaio direct QD16", "randrw",
             "libaio", 16, True)]:
        workloads.append(Workload(key, title, "IOPS",
                                  fio(rw, engine, depth, direct, fio_s, size), warm=True))
    return workloads


def run_block(workloads: list[Workload], targets: list[Target], runs: int) -> None:
    for w in workloads:
        if w.warm:
            for t in targets:
                run(["dd", f"if={t.image}", "of=/dev/null", "bs=1M"])
        for r in range(runs):
            order = targets[r % len(targets):] + targets[:r % len(targets)]
            for t in order:
                if w.cold:
                    drop_caches()
                pid = t.pid()
                c0 = cpu_seconds(pid) if pid is not None else 0.0
                x, requests = w.measure(t.path)
                w.results.setdefault(t.name, []).append(x)
                note = ""
                if pid is not None and requests > 0:
                    us = (cpu_seconds(pid) - c0) / requests * 1e6
                    w.cpu_us.setdefault(t.name, []).append(us)
                    note = f", {us:.1f} µs CPU a request"
                log(f"{w.key} run {r + 1}/{runs} {t.name}: {fmt(x, w.unit)} {w.unit}{note}")


# --- the attribute scan ------------------------------------------------------------------

def machine_config(path: Path, devices: int) -> None:
    """A machine with *devices* VMBus devices: synthetic NICs and SCSI controllers, the first
    128 monitored (the monitor pages hold 128), the rest with plain interrupts. Guest memory
    is 16 GiB at every size: a NIC's rings take 258 frames and a controller's 66, so 10,000
    devices need about 6.3 GiB (1 GiB left most of them unprobed, ENOMEM); memory that no
    ring uses is never touched and costs nothing resident."""
    lines = ['[machine]', f'name = "bench{devices}"', f'state_dir = "vbusfs-state-{devices}"',
             'memory = "16G"', '', '[vmbus]', 'version = "5.3"']
    for i in range(devices):
        kind = ("nic", "scsi")[i % 2]
        lines += ["", "[[vmbus.device]]", f'type = "{kind}"',
                  f"monitor = {'true' if i < 128 else 'false'}"]
    path.write_text("\n".join(lines) + "\n")


def copy_tree(src: Path, dst: Path) -> int:
    """Copy a sysfs tree: directories, symlinks, and files with the bytes a reader gets
    (an attribute that cannot be read becomes an empty file). Returns the file count."""
    files = 0
    for dirpath, dirnames, filenames in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for name in dirnames + filenames:
            s = Path(dirpath) / name
            d = dst / rel / name
            if s.is_symlink():
                os.symlink(os.readlink(s), d)
            elif name in filenames:
                try:
                    data = s.read_bytes()
                except OSError:
                    data = b""
                d.write_bytes(data)
                files += 1
    return files


def grep_scan(root: Path) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(["grep", "-rs", ".", str(root)], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False)
    if p.returncode not in (0, 2):      # 2: some attribute could not be read (write-only)
        raise RuntimeError(f"grep -r {root}: exit {p.returncode}")
    return time.perf_counter() - t0


@contextlib.contextmanager
def tmpfs(path: Path) -> Iterator[Path]:
    path.mkdir(exist_ok=True)
    run(["mount", "-t", "tmpfs", "-o", "size=1G", "bench-tmpfs", str(path)])
    try:
        yield path
    finally:
        run(["umount", str(path)])


@contextlib.contextmanager
def treefs(source: Path, mnt: Path) -> Iterator[Path]:
    """``bench/treefs.py`` serving ``source`` on ``mnt``: the bare pyfuse3 floor."""
    mnt.mkdir(exist_ok=True)
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "treefs.py"), str(source),
                             str(mnt)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        wait_for(lambda: is_mount(mnt), "treefs", proc=proc)
        yield mnt
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if is_mount(mnt):
            subprocess.run(["fusermount3", "-u", str(mnt)], check=False)


def service_pid(mnt: Path) -> int:
    return int((mnt / ".vbusfs" / "pid").read_text())


def down(mnt: Path, pid: int | None, timeout: float = 300.0) -> None:
    """``mountctl down``, which waits 30 s for the service to exit; a big machine may take
    longer, so wait for the process itself up to ``timeout``, then kill it (it is ours)."""
    p = subprocess.run([sys.executable, "-m", "mountctl", "down", str(mnt)], cwd=ROOT,
                       text=True, capture_output=True, check=False)
    if p.returncode == 0 or pid is None:
        if p.returncode:
            raise RuntimeError(f"mountctl down {mnt}: {p.stderr.strip()}")
        return
    end = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and time.monotonic() < end:
        time.sleep(0.1)
    if Path(f"/proc/{pid}").exists():
        log(f"service {pid} on {mnt} did not stop within {timeout:.0f} s: killed")
        os.kill(pid, signal.SIGKILL)
    if is_mount(mnt):
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)


@contextlib.contextmanager
def mounted(cfg: Path, mnt: Path) -> Iterator[Path]:
    mnt.mkdir(exist_ok=True)
    mountctl("up", "-d", "-c", str(cfg), str(mnt))
    pid = service_pid(mnt)
    try:
        yield mnt
    finally:
        down(mnt, pid)


def rotated(names: list[str], r: int) -> list[str]:
    return names[r % len(names):] + names[:r % len(names)]


@dataclass
class AttrScan:
    devices: int
    files: int
    scans: dict[str, list[float]]        # first_vbusfs_s, ..., repeat_tmpfs_s: every run


def attr_workload(work: Path, devices: int, runs: int) -> AttrScan:
    """Mount the machine once to copy its ``sys/`` to tmpfs. Then in each run mount it
    again and start a fresh treefs over the copy; scan both once (the first scan after
    mount), then vbusfs, treefs and tmpfs again (repeated), each in an order rotated by the
    run."""
    cfg = work / f"machine-{devices}.toml"
    machine_config(cfg, devices)
    mnt = work / f"mnt-attr-{devices}"
    first: dict[str, list[float]] = {"vbusfs": [], "treefs": []}
    repeat: dict[str, list[float]] = {"vbusfs": [], "treefs": [], "tmpfs": []}
    with tmpfs(work / "tmpfs") as tdir:
        with mounted(cfg, mnt):
            files = copy_tree(mnt / "sys", tdir / "sys")
        for r in range(runs):
            with mounted(cfg, mnt), treefs(tdir, work / "mnt-treefs") as tree:
                roots = {"vbusfs": mnt, "treefs": tree, "tmpfs": tdir}
                for name in rotated(list(first), r):
                    first[name].append(grep_scan(roots[name] / "sys"))
                for name in rotated(list(repeat), r):
                    repeat[name].append(grep_scan(roots[name] / "sys"))
            log(f"attr scan run {r + 1}/{runs} over {files} files: first vbusfs "
                f"{first['vbusfs'][-1]:.3f} s, treefs {first['treefs'][-1]:.3f} s; "
                f"repeated vbusfs {repeat['vbusfs'][-1]:.3f} s, treefs "
                f"{repeat['treefs'][-1]:.3f} s, tmpfs {repeat['tmpfs'][-1]:.3f} s")
    return AttrScan(devices, files, {
        "first_vbusfs_s": first["vbusfs"], "first_treefs_s": first["treefs"],
        "repeat_vbusfs_s": repeat["vbusfs"], "repeat_treefs_s": repeat["treefs"],
        "repeat_tmpfs_s": repeat["tmpfs"]})


# --- scale -------------------------------------------------------------------------------

@dataclass
class ScaleCell:
    devices: int
    mount_s: list[float] = field(default_factory=list)
    rss_mib: list[float] = field(default_factory=list)
    unmount_s: list[float] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)      # why each failed run failed


def scale_workload(work: Path, sizes: list[int], runs: int) -> dict[int, ScaleCell]:
    """Mount machines of each size (run *r* in an order rotated by *r*): the time of
    ``mountctl up -d`` (until every device is negotiated), the service's VmRSS then, and
    the time of ``mountctl down``. A size that fails to mount is recorded with why."""
    cells = {n: ScaleCell(n) for n in sizes}
    cfgs = {n: work / f"machine-{n}.toml" for n in sizes}
    for n in sizes:
        machine_config(cfgs[n], n)
    mnt = work / "mnt-scale"
    mnt.mkdir(exist_ok=True)
    for r in range(runs):
        for n in sizes[r % len(sizes):] + sizes[:r % len(sizes)]:
            cell = cells[n]
            t0 = time.perf_counter()
            try:
                mountctl("up", "-d", "-c", str(cfgs[n]), str(mnt))
            except subprocess.CalledProcessError as e:
                why = " ".join((e.stderr or "").split())[-300:] or f"exit {e.returncode}"
                why = (f"after {time.perf_counter() - t0:.1f} s: {why} (log: "
                       f"{work / f'vbusfs-state-{n}' / 'vbusfs.log'})")
                cell.failed.append(why)
                log(f"scale run {r + 1}/{runs}: {n} devices FAILED {why}")
                if is_mount(mnt):
                    down(mnt, service_pid(mnt))
                continue
            cell.mount_s.append(time.perf_counter() - t0)
            pid = service_pid(mnt)
            try:
                cell.rss_mib.append(vm_rss_mib(pid))
            finally:
                t1 = time.perf_counter()
                down(mnt, pid)
                cell.unmount_s.append(time.perf_counter() - t1)
            log(f"scale run {r + 1}/{runs}: {n} devices mounted in {cell.mount_s[-1]:.2f} s, "
                f"rss {cell.rss_mib[-1]:.1f} MiB, unmounted in {cell.unmount_s[-1]:.2f} s")
    return cells


# --- report ------------------------------------------------------------------------------

#: issue 14's targets: (ratio or figure, "≥" or "≤", limit); {d} is each disk
DISK_GOALS = [("{d}_rand4k_qd1_read_vs_inline", "≥", 0.8),
              ("{d}_rand4k_qd1_read_vs_qsd", "≥", 1.0),
              ("{d}_rand4k_qd1_write_vs_inline", "≥", 0.8),
              ("{d}_rand4k_qd1_write_vs_qsd", "≥", 1.0),
              ("{d}_rand4k_qd16_read_vs_inline", "≥", 0.8),
              ("{d}_rand4k_qd16_read_vs_qd1", "≥", 2.0),
              ("{d}_rand4k_qd16_write_vs_inline", "≥", 0.8),
              ("{d}_rand4k_qd16_write_vs_qd1", "≥", 2.0),
              ("{d}_seq_write_vs_inline", "≥", 0.8),
              ("{d}_seq_write_vs_qsd", "≥", 1.5),
              ("{d}_seq_read_vs_inline", "≥", 0.8),
              ("{d}_seq_read_vs_qsd", "≥", 1.5)]
OTHER_GOALS = [("attr_scan_repeat_vs_tmpfs", "≤", 5.0),
               ("attr_scan_first_vs_tmpfs", "≤", 30.0),
               ("mount_10000_s", "≤", 15.0),
               ("rss_10000_mib", "≤", 1024.0),
               ("mount_per_device_10000_vs_100", "≤", 1.5),
               ("rss_per_device_10000_vs_100", "≤", 1.5),
               ("mount_1000_s", "≤", 3.0),             # issue 4's, kept as a check
               ("rss_1000_mib", "≤", 200.0)]


def fmt(x: float, unit: str) -> str:
    if unit == "s":
        return f"{x:.3f}"
    return f"{x:,.0f}"


def stats(xs: list[float], digits: int = 3) -> dict[str, float | list[float]]:
    return {"median": round(median(xs), digits), "min": round(min(xs), digits),
            "max": round(max(xs), digits), "runs": [round(x, digits) for x in xs]}


def text_table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [*rows, header]) for i in range(len(header))]
    return ["  ".join(c.ljust(widths[i]) for i, c in enumerate(r)) for r in [header, *rows]]


def report(workloads: list[Workload], attr: AttrScan | None,
           scale: dict[int, ScaleCell] | None, names: list[str],
           skipped: dict[str, str], mounts: dict[str, str | None],
           args: argparse.Namespace) -> dict[str, object]:
    ratios: dict[str, float] = {}
    figures: dict[str, float] = {}        # absolute figures the goals name
    cells: dict[str, dict[str, dict[str, object]]] = {}
    cpu: dict[str, dict[str, float]] = {}
    rows, cpu_rows = [], []
    for w in workloads:
        cells[w.key], cpu[w.key] = {}, {}
        row, cpu_row = [f"{w.title} ({w.unit})"], [w.title]
        for n in names:
            xs = w.results.get(n)
            if not xs:
                row.append("skipped" if n in skipped else "—")
                cpu_row.append("—")
                continue
            cell: dict[str, object] = dict(stats(xs, 1))
            row.append(f"{fmt(median(xs), w.unit)} ({fmt(min(xs), w.unit)}–"
                       f"{fmt(max(xs), w.unit)})")
            us = w.cpu_us.get(n)
            if us:
                cell["cpu_us_per_req"] = stats(us, 1)
                cpu[w.key][n] = round(median(us), 1)
                cpu_row.append(f"{median(us):,.1f}")
            else:
                cpu_row.append("—")
            cells[w.key][n] = cell
        for d in DISKS:
            mine = w.results.get(d)
            for base in BASELINES:
                theirs = w.results.get(base)
                if mine and theirs:
                    ratios[f"{d}_{w.key}_vs_{base}"] = round(median(mine) / median(theirs), 3)
        rows.append(row)
        cpu_rows.append(cpu_row)
    by_key = {w.key: w for w in workloads}
    for d in DISKS:
        for op in ("read", "write"):
            q1, q16 = by_key.get(f"rand4k_qd1_{op}"), by_key.get(f"rand4k_qd16_{op}")
            if q1 and q16 and q1.results.get(d) and q16.results.get(d):
                ratios[f"{d}_rand4k_qd16_{op}_vs_qd1"] = round(
                    median(q16.results[d]) / median(q1.results[d]), 3)
    doc: dict[str, object] = {"quick": args.quick, "runs": args.runs,
                              "image_mib": args.size // MiB, "fio_s": args.fio_s,
                              "targets": names, "skipped": skipped, "mount_options": mounts,
                              "workloads": cells, "cpu_us_per_req": cpu}
    out: list[str] = []
    if workloads:
        out += text_table(["workload", *names], rows)
        out += ["", "CPU time per request of the serving process (µs; utime + stime ÷ "
                "requests; dd: 1 MiB blocks):"]
        out += text_table(["workload", *names], cpu_rows)
        out += ["", "ratios (disk ÷ baseline, medians; throughput, higher is better):"]
        out += [f"  {k:40} {v:.2f}" for k, v in ratios.items()]
    if attr is not None:
        a = {k: median(xs) for k, xs in attr.scans.items()}
        tm = a["repeat_tmpfs_s"]
        for kind in ("first", "repeat"):
            ratios[f"attr_scan_{kind}_vs_tmpfs"] = round(a[f"{kind}_vbusfs_s"] / tm, 2)
            ratios[f"attr_scan_{kind}_vs_treefs"] = round(
                a[f"{kind}_vbusfs_s"] / a[f"{kind}_treefs_s"], 2)
        doc["attr_scan"] = {"devices": attr.devices, "files": attr.files,
                            **{k: stats(xs) for k, xs in attr.scans.items()}}
        out += ["", f"attribute scan, grep -rs . over {attr.files} files of "
                f"{attr.devices} VMBus devices (s, median; time ratios, lower is better):"]
        for kind, what in (("first", "first after mount"), ("repeat", "repeated")):
            out.append(f"  {what:18} vbusfs {a[f'{kind}_vbusfs_s']:.3f}  treefs "
                       f"{a[f'{kind}_treefs_s']:.3f}  tmpfs {tm:.3f}  → "
                       f"{ratios[f'attr_scan_{kind}_vs_tmpfs']:.1f} × tmpfs, "
                       f"{ratios[f'attr_scan_{kind}_vs_treefs']:.2f} × treefs "
                       f"(treefs {a[f'{kind}_treefs_s'] / tm:.1f} × tmpfs)")
    if scale is not None:
        sdoc: dict[str, dict[str, object]] = {}
        doc["scale"] = sdoc
        empty = scale.get(0)
        empty_ok = empty is not None and bool(empty.mount_s)
        out += ["", "scale (mountctl up -d until every device is negotiated; VmRSS then; "
                "per device: above the empty machine):"]
        per: dict[int, tuple[float, float]] = {}
        for size, c in sorted(scale.items()):
            entry: dict[str, object] = {"devices": size, "failed": c.failed}
            sdoc[str(size)] = entry
            if not c.mount_s:
                out.append(f"  {size:>6} devices: FAILED to mount in {len(c.failed)} of "
                           f"{len(c.failed)} runs, the first {c.failed[0]}")
                continue
            m, rss = median(c.mount_s), median(c.rss_mib)
            entry.update(mount_s=stats(c.mount_s), rss_mib=stats(c.rss_mib, 1),
                         unmount_s=stats(c.unmount_s))
            figures[f"mount_{size}_s"], figures[f"rss_{size}_mib"] = round(m, 3), round(rss, 1)
            line = (f"  {size:>6} devices: mount {m:.2f} s ({min(c.mount_s):.2f}–"
                    f"{max(c.mount_s):.2f}), rss {rss:.1f} MiB, unmount "
                    f"{median(c.unmount_s):.2f} s")
            if size and empty is not None and empty_ok:
                ms = (m - median(empty.mount_s)) / size * 1e3
                kib = (rss - median(empty.rss_mib)) * 1024 / size
                per[size] = (ms, kib)
                entry.update(mount_ms_per_device=round(ms, 3), rss_kib_per_device=round(kib, 1))
                figures[f"mount_{size}_ms_per_device"] = round(ms, 3)
                figures[f"rss_{size}_kib_per_device"] = round(kib, 1)
                line += f"; per device {ms:.2f} ms, {kib:.1f} KiB"
            if c.failed:
                line += f" (failed in {len(c.failed)} runs)"
            out.append(line)
        if 100 in per and 10000 in per:
            figures["mount_per_device_10000_vs_100"] = round(per[10000][0] / per[100][0], 2)
            figures["rss_per_device_10000_vs_100"] = round(per[10000][1] / per[100][1], 2)
    doc.update(figures)
    doc["ratios"] = ratios
    out += ["", "targets (issue 14; and issue 4's for 1000 devices):"]
    verdicts: dict[str, bool] = {}
    goals = [(k.format(d=d), op, g) for d in DISKS for k, op, g in DISK_GOALS
             if workloads] + OTHER_GOALS
    for key, op, goal in goals:
        v = ratios.get(key, figures.get(key))
        if v is None:
            why = ""
            if "10000" in key and scale is not None:
                c10 = scale.get(10000)
                if c10 is None:
                    why = "(10,000 devices: not in --quick)"
                elif not c10.mount_s:
                    why = "(10,000 devices did not mount: see scale)"
                    verdicts[key] = False
            out.append(f"  {'NOT met' if verdicts.get(key) is False else 'skipped'} "
                       f"{key} ({op} {goal:g}) {why}")
            continue
        met = v >= goal if op == "≥" else v <= goal
        verdicts[key] = met
        out.append(f"  {'met    ' if met else 'NOT met'} {key} = {v:g} ({op} {goal:g})")
    doc["targets_met"] = verdicts
    for n, why in skipped.items():
        out.append(f"skipped {n}: {why}")
    doc["table"] = "\n".join(out)
    return doc


# --- main --------------------------------------------------------------------------------

def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench/run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="a smaller version in about two minutes: 64 MiB images, 0.2 s fio "
                    "runs, attribute scan over 100 devices, scale up to 1000 devices")
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    ap.add_argument("--runs", type=int, default=3, help="runs per cell (median; ≥ 3)")
    ap.add_argument("--workdir", default="/var/tmp/vbusfs-bench",
                    help="where the images and mount points go (default %(default)s)")
    ap.add_argument("--only", help="comma-separated workload keys to run (block workload "
                    "keys, attr_scan, scale)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        ap.error("must run as root (it mounts, drops caches and uses tmpfs)")
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    args.size = 64 * MiB if args.quick else 1024 * MiB
    args.fio_s = 0.2 if args.quick else 5.0
    attr_devices = 100 if args.quick else 1000
    sizes = [0, 100, 1000] if args.quick else [0, 100, 1000, 10000]
    count = args.size // MiB
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)

    skipped: dict[str, str] = {}
    kinds = list(ALL_KINDS)
    if shutil.which("qemu-storage-daemon") is None:
        skipped["qsd"] = "qemu-storage-daemon is not installed (Debian: qemu-system-common)"
        kinds.remove(QsdTarget)
    names = [k.name for k in ALL_KINDS]
    workloads = block_workloads(count, args.fio_s, args.size, skipped)
    only = set(args.only.split(",")) if args.only else None
    if only is not None:
        workloads = [w for w in workloads if w.key in only]

    t_start = time.perf_counter()
    mounts: dict[str, str | None] = {}
    if workloads:
        log(f"images of {count} MiB in {work}")
        targets = [k(work, args.size) for k in kinds]
        with contextlib.ExitStack() as stack:
            for t in targets:
                t.start()
                stack.callback(t.stop)
                if t.mnt is not None:
                    mounts[t.name] = mount_info(t.mnt)
            run_block(workloads, targets, args.runs)
    t_block = time.perf_counter()
    attr = None
    if only is None or "attr_scan" in only:
        attr = attr_workload(work, attr_devices, args.runs)
    t_attr = time.perf_counter()
    scale = None
    if only is None or "scale" in only:
        scale = scale_workload(work, sizes, args.runs)
    t_end = time.perf_counter()

    doc = report(workloads, attr, scale, names, skipped, mounts, args)
    doc["elapsed_s"] = {"block": round(t_block - t_start, 1), "attr_scan":
                        round(t_attr - t_block, 1), "scale": round(t_end - t_attr, 1),
                        "total": round(t_end - t_start, 1)}
    if args.json:
        print(json.dumps(doc, indent=2, ensure_ascii=False))
    else:
        print(doc["table"])
        print(f"elapsed: {doc['elapsed_s']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
