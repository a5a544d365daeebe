"""vbusfs benchmarks, side by side with their baselines in the same run (``bench/run``).

Block workloads run, interleaved, against four targets, each over its own image of the same
size, written in full with zeros before the first workload (so no run pays for allocating
blocks):

* ``vbusfs``      — ``MNT/dev/xvda``: FUSE → gendisk → blkfront engine → blkif ring → blkback;
* ``virtio``      — ``MNT/dev/vda``: FUSE → gendisk → the same engine → virtio-blk split
  virtqueue over PCI → the virtio-blk device;
* ``passthrough`` — ``bench/passthrough.py``: bare pyfuse3, one pread/pwrite per request in a
  worker thread (the ceiling for Python + FUSE);
* ``qsd``         — ``qemu-storage-daemon --export type=fuse``;
* ``image``       — the image file itself.

Within a workload, run *r* visits the targets in an order rotated by *r*. Each cell is the
median of the runs; ratios are vbusfs ÷ baseline of the medians (for the attribute scan, a
ratio of times, so lower is better). The metadata workload mounts a machine with 1000 VMBus
devices (timed, and its resident memory read from /proc), then rotates ``grep -r .`` over
its ``sys/`` tree, over a copy of that tree on tmpfs, and over the same copy served by
``bench/treefs.py`` (bare pyfuse3 with vbusfs's open/read/cache behaviour and nothing else:
the floor for a Python FUSE server of that tree).
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


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw)  # type: ignore[call-overload,no-any-return]


def is_mount(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


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
    if path.exists() and path.stat().st_size == size:
        return
    zeros = bytes(MiB)
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(zeros)
        os.fsync(f.fileno())


def vm_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


# --- targets ---------------------------------------------------------------------------

class Target:
    name = ""

    def __init__(self, work: Path, size: int) -> None:
        self.image = work / f"{self.name}.img"
        make_image(self.image, size)
        self.path = self.image

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


class ImageTarget(Target):
    name = "image"


class VbusfsTarget(Target):
    name = "vbusfs"

    def __init__(self, work: Path, size: int) -> None:
        super().__init__(work, size)
        self.mnt = work / "mnt-vbusfs"
        self.config = work / "vbusfs-bench.toml"
        self.config.write_text(
            '[machine]\nname = "bench"\nstate_dir = "vbusfs-state"\n\n'
            f'[xen]\n[[xen.vbd]]\nvdev = "xvda"\nimage = "{self.image}"\n')
        self.path = self.mnt / "dev" / "xvda"

    def start(self) -> None:
        self.mnt.mkdir(exist_ok=True)
        run([sys.executable, "-m", "mountctl", "up", "-d", "-c", str(self.config),
             str(self.mnt)], cwd=ROOT)

    def stop(self) -> None:
        if is_mount(self.mnt):
            run([sys.executable, "-m", "mountctl", "down", str(self.mnt)], cwd=ROOT)


class VirtioTarget(VbusfsTarget):
    """virtio-blk over PCI, on its own mount (the same engine and executor as the Xen disk,
    another ring)."""

    name = "virtio"

    def __init__(self, work: Path, size: int) -> None:
        Target.__init__(self, work, size)
        self.mnt = work / "mnt-virtio"
        self.config = work / "virtio-bench.toml"
        self.config.write_text(
            '[machine]\nname = "bench-virtio"\nstate_dir = "virtio-state"\n\n'
            f'[pci]\n[[pci.device]]\ntype = "virtio-blk"\nimage = "{self.image}"\n')
        self.path = self.mnt / "dev" / "vda"


#: the targets that are vbusfs disks, each with its own ratios (the Xen disk's unprefixed)
DISKS = {"vbusfs": "", "virtio": "virtio_"}


class ProcessTarget(Target):
    """A FUSE server run as a child process; stopped with SIGTERM."""

    mnt: Path
    proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for(lambda: is_mount(self.mnt), self.name, proc=self.proc)

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
        if is_mount(self.mnt):
            subprocess.run(["fusermount3", "-u", str(self.mnt)], check=False)


class PassthroughTarget(ProcessTarget):
    name = "passthrough"

    def __init__(self, work: Path, size: int) -> None:
        super().__init__(work, size)
        self.mnt = work / "mnt-passthrough"
        self.mnt.mkdir(exist_ok=True)
        self.path = self.mnt / "disk"

    def command(self) -> list[str]:
        return [sys.executable, str(ROOT / "bench" / "passthrough.py"), str(self.image),
                str(self.mnt)]


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


# --- workloads ---------------------------------------------------------------------------

@dataclass
class Workload:
    key: str
    title: str
    unit: str                     # "MB/s", "IOPS" or "s"
    measure: Callable[[Path], float]
    cold: bool = False            # drop caches before each run
    warm: bool = False            # read the backing images into the page cache first
    results: dict[str, list[float]] = field(default_factory=dict)


def dd_write(count: int) -> Callable[[Path], float]:
    def measure(path: Path) -> float:
        t0 = time.perf_counter()
        run(["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={count}",
             "conv=fsync,notrunc"])
        return count * MiB / (time.perf_counter() - t0) / 1e6
    return measure


def dd_read(count: int) -> Callable[[Path], float]:
    def measure(path: Path) -> float:
        t0 = time.perf_counter()
        run(["dd", f"if={path}", "of=/dev/null", "bs=1M", f"count={count}"])
        return count * MiB / (time.perf_counter() - t0) / 1e6
    return measure


def fio(rw: str, engine: str, depth: int, direct: bool, seconds: float,
        size: int, ramp: float) -> Callable[[Path], float]:
    def measure(path: Path) -> float:
        out = run(["fio", "--name=bench", f"--filename={path}", f"--rw={rw}", "--bs=4k",
                   f"--ioengine={engine}", f"--iodepth={depth}", f"--direct={int(direct)}",
                   f"--size={size}", "--time_based", f"--runtime={round(seconds * 1000)}ms",
                   f"--ramp_time={round(ramp * 1000)}ms", "--randrepeat=0", "--norandommap",
                   "--invalidate=0",
                   "--output-format=json"]).stdout
        job = json.loads(out[out.index("{"):])["jobs"][0]
        if job["error"]:
            raise RuntimeError(f"fio {rw} on {path}: error {job['error']}")
        return float(job["read" if "read" in rw else "write"]["iops"])
    return measure


# --- the metadata workload ---------------------------------------------------------------

def machine_config(path: Path, devices: int) -> None:
    """A machine with *devices* VMBus devices: synthetic NICs and SCSI controllers, the first
    64 of each monitored (the monitor pages hold 128), the rest with plain interrupts."""
    lines = ['[machine]', f'name = "bench{devices}"', f'state_dir = "vbusfs-state-{devices}"',
             'memory = "1G"', '', '[vmbus]', 'version = "5.3"']
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
    run(["mount", "-t", "tmpfs", "-o", "size=512M", "bench-tmpfs", str(path)])
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


def attr_workload(work: Path, devices: int, runs: int) -> dict[str, object]:
    """Mount the machine (timed, resident memory read), copy its ``sys/`` to tmpfs once,
    serve that copy with ``bench/treefs.py`` too, then in each run scan all three, in an
    order rotated by the run."""
    cfg = work / f"machine-{devices}.toml"
    machine_config(cfg, devices)
    mnt = work / f"mnt-{devices}"
    mnt.mkdir(exist_ok=True)
    mount_s: list[float] = []
    rss: list[float] = []
    scans: dict[str, list[float]] = {"vbusfs": [], "treefs": [], "tmpfs": []}
    files = 0
    with contextlib.ExitStack() as stack:
        tdir = stack.enter_context(tmpfs(work / "tmpfs"))
        roots: dict[str, Path] = {"tmpfs": tdir, "vbusfs": mnt}
        for r in range(runs):
            t0 = time.perf_counter()
            run([sys.executable, "-m", "mountctl", "up", "-d", "-c", str(cfg), str(mnt)],
                cwd=ROOT)
            mount_s.append(time.perf_counter() - t0)
            try:
                pid = int((mnt / ".vbusfs" / "pid").read_text())
                rss.append(vm_rss_mib(pid))
                if r == 0:
                    files = copy_tree(mnt / "sys", tdir / "sys")
                    roots["treefs"] = stack.enter_context(treefs(tdir, work / "mnt-treefs"))
                order = list(scans)
                for name in order[r % 3:] + order[:r % 3]:
                    scans[name].append(grep_scan(roots[name] / "sys"))
            finally:
                run([sys.executable, "-m", "mountctl", "down", str(mnt)], cwd=ROOT)
            log(f"attr scan run {r + 1}/{runs}: mount {mount_s[-1]:.2f} s, "
                f"rss {rss[-1]:.0f} MiB, grep vbusfs {scans['vbusfs'][-1]:.3f} s, "
                f"treefs {scans['treefs'][-1]:.3f} s, tmpfs {scans['tmpfs'][-1]:.3f} s")
    return {"devices": devices, "files": files, "mount_s": mount_s, "rss_mib": rss,
            "scan_vbusfs_s": scans["vbusfs"], "scan_treefs_s": scans["treefs"],
            "scan_tmpfs_s": scans["tmpfs"]}


# --- report ------------------------------------------------------------------------------

TARGETS = [("seq_write", "passthrough", 0.8), ("seq_write", "qsd", 1.5),
           ("seq_read", "passthrough", 0.8), ("seq_read", "qsd", 1.5),
           ("rand4k_qd1_read", "passthrough", 0.8), ("rand4k_qd1_read", "qsd", 1.2),
           ("rand4k_qd1_write", "passthrough", 0.8), ("rand4k_qd1_write", "qsd", 1.2),
           ("rand4k_qd16_read", "passthrough", 0.8)]


def fmt(x: float, unit: str) -> str:
    if unit == "s":
        return f"{x:.3f}"
    return f"{x:,.0f}"


def report(workloads: list[Workload], attr: dict[str, object] | None, names: list[str],
           skipped: dict[str, str], args: argparse.Namespace) -> dict[str, object]:
    ratios: dict[str, float] = {}
    cells: dict[str, dict[str, dict[str, float | list[float]]]] = {}
    rows = []
    for w in workloads:
        cells[w.key] = {}
        row = [f"{w.title} ({w.unit})"]
        for n in names:
            xs = w.results.get(n)
            if not xs:
                row.append("skipped" if n in skipped else "—")
                continue
            cells[w.key][n] = {"median": median(xs), "min": min(xs), "max": max(xs),
                               "runs": xs}
            row.append(f"{fmt(median(xs), w.unit)} ({fmt(min(xs), w.unit)}–"
                       f"{fmt(max(xs), w.unit)})")
        for disk, prefix in DISKS.items():
            mine = w.results.get(disk)
            for base in names:
                theirs = w.results.get(base)
                if base not in DISKS and mine and theirs:
                    ratios[f"{prefix}{w.key}_vs_{base}"] = round(median(mine) /
                                                                 median(theirs), 3)
        rows.append(row)
    doc: dict[str, object] = {"quick": args.quick, "runs": args.runs,
                              "image_mib": args.size // MiB, "targets": names,
                              "skipped": skipped, "workloads": cells}
    out = []
    header = ["workload", *names]
    widths = [max(len(r[i]) for r in [*rows, header]) for i in range(len(header))]
    out.append("  ".join(h.ljust(widths[i]) for i, h in enumerate(header)))
    for r in rows:
        out.append("  ".join(c.ljust(widths[i]) for i, c in enumerate(r)))
    out.append("")
    out.append("ratios (disk ÷ baseline, virtio_ for vda; throughput, higher is better):")
    for k, v in ratios.items():
        out.append(f"  {k:36} {v:.2f}")
    if attr is not None:
        n = int(attr["devices"])                              # type: ignore[call-overload]
        runs: dict[str, list[float]] = {k: list(attr[k])      # type: ignore[call-overload]
                                        for k in ("scan_vbusfs_s", "scan_treefs_s",
                                                  "scan_tmpfs_s", "mount_s", "rss_mib")}
        sv, st = median(runs["scan_vbusfs_s"]), median(runs["scan_tmpfs_s"])
        sf = median(runs["scan_treefs_s"])
        mount_s, rss = median(runs["mount_s"]), median(runs["rss_mib"])
        ratios["attr_scan_vs_tmpfs"] = round(sv / st, 2)
        ratios["attr_scan_vs_treefs"] = round(sv / sf, 2)
        doc[f"mount_{n}_s"] = round(mount_s, 3)
        doc[f"rss_{n}_mib"] = round(rss, 1)
        doc["attr_scan"] = attr
        out.append(f"  {'attr_scan_vs_tmpfs (time ratio)':36} {sv / st:.2f}   "
                   f"(grep -r over {attr['files']} files: {sv:.3f} s vs {st:.3f} s)")
        out.append(f"  {'attr_scan_vs_treefs (time ratio)':36} {sv / sf:.2f}   "
                   f"(the bare pyfuse3 floor, bench/treefs.py: {sf:.3f} s, "
                   f"{sf / st:.1f} × tmpfs)")
        out.append(f"mount with {n} VMBus devices: {mount_s:.2f} s "
                   f"({min(runs['mount_s']):.2f}–{max(runs['mount_s']):.2f}), "
                   f"resident {rss:.0f} MiB")
        limits = [("attr_scan_vs_tmpfs", sv / st, 10.0, "≤ 10"),
                  (f"mount_{n}_s", mount_s, 3.0, "≤ 3 s"),
                  (f"rss_{n}_mib", rss, 200.0, "≤ 200 MiB")]
    doc["ratios"] = ratios
    out.append("")
    out.append("targets:")
    verdicts = {}
    for key, base, goal in [(p + k, b, g) for p in DISKS.values() for k, b, g in TARGETS]:
        k = f"{key}_vs_{base}"
        if k in ratios:
            ok = ratios[k] >= goal
            verdicts[k] = ok
            out.append(f"  {'met    ' if ok else 'NOT met'} {k} = {ratios[k]:.2f} (≥ {goal})")
        else:
            out.append(f"  skipped {k} (≥ {goal})")
    if attr is not None:
        for k, v, limit, text in limits:
            ok = v <= limit
            verdicts[k] = ok
            out.append(f"  {'met    ' if ok else 'NOT met'} {k} = {v:.2f} ({text})")
    doc["targets_met"] = verdicts
    for n, why in skipped.items():
        out.append(f"skipped {n}: {why}")
    doc["table"] = "\n".join(out)
    return doc


# --- main --------------------------------------------------------------------------------

def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench/run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="a smaller version in under a minute: 64 MiB images, 0.3 s fio "
                    "runs, a machine with 100 devices")
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    ap.add_argument("--runs", type=int, default=3, help="runs per cell (median; ≥ 3)")
    ap.add_argument("--workdir", default="/var/tmp/vbusfs-bench",
                    help="where the images and mount points go (default %(default)s)")
    ap.add_argument("--only", help="comma-separated workload keys to run")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        ap.error("must run as root (it mounts, drops caches and uses tmpfs)")
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    args.size = 64 * MiB if args.quick else 1024 * MiB
    fio_s, ramp = (0.3, 0.1) if args.quick else (5.0, 0.5)
    devices = 100 if args.quick else 1000
    count = args.size // MiB
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)

    skipped: dict[str, str] = {}
    kinds: list[type[Target]] = [VbusfsTarget, VirtioTarget, PassthroughTarget, QsdTarget,
                                 ImageTarget]
    if shutil.which("qemu-storage-daemon") is None:
        skipped["qsd"] = "qemu-storage-daemon is not installed (Debian: qemu-system-common)"
        kinds.remove(QsdTarget)
    names = [k.name for k in (VbusfsTarget, VirtioTarget, PassthroughTarget, QsdTarget,
                              ImageTarget)]
    workloads = [
        Workload("seq_write", "dd 1M write, fsync", "MB/s", dd_write(count)),
        Workload("seq_read", "dd 1M read, cold", "MB/s", dd_read(count), cold=True),
    ]
    if shutil.which("fio") is None:
        skipped["fio"] = "fio is not installed: the 4 KiB workloads were not run"
    else:
        workloads += [
            Workload("rand4k_qd1_read", "fio 4K randread psync QD1", "IOPS",
                     fio("randread", "psync", 1, False, fio_s, args.size, ramp), warm=True),
            Workload("rand4k_qd1_write", "fio 4K randwrite psync QD1", "IOPS",
                     fio("randwrite", "psync", 1, False, fio_s, args.size, ramp), warm=True),
            Workload("rand4k_qd16_read", "fio 4K randread libaio direct QD16", "IOPS",
                     fio("randread", "libaio", 16, True, fio_s, args.size, ramp), warm=True),
        ]
    only = set(args.only.split(",")) if args.only else None
    if only is not None:
        workloads = [w for w in workloads if w.key in only]

    log(f"images of {count} MiB in {work}")
    targets = [k(work, args.size) for k in kinds]
    attr = None
    with contextlib.ExitStack() as stack:
        for t in targets:
            t.start()
            stack.callback(t.stop)
        for w in workloads:
            if w.warm:
                for t in targets:
                    run(["dd", f"if={t.image}", "of=/dev/null", "bs=1M"])
            for r in range(args.runs):
                order = targets[r % len(targets):] + targets[:r % len(targets)]
                for t in order:
                    if w.cold:
                        drop_caches()
                    x = w.measure(t.path)
                    w.results.setdefault(t.name, []).append(x)
                    log(f"{w.key} run {r + 1}/{args.runs} {t.name}: {fmt(x, w.unit)} {w.unit}")
    if only is None or "attr_scan" in only:
        attr = attr_workload(work, devices, args.runs)

    doc = report(workloads, attr, names, skipped, args)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(doc["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
