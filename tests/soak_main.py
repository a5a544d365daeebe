"""The soak (``tests/soak``): real mounts and generated hostile peers, counted and checked.

Parts (``--only``): ``hostile`` (tests/soak_hostile.py campaigns, in subprocesses with a
timeout, two at a time, while the mount parts run), ``crash`` (SIGKILL while a writer appends
blake3-checksummed records with fsync after each batch; every acknowledged record must read
back after the next mount), ``verify`` (fio --verify=crc32c on every disk, direct and
buffered jobs on separate regions, then a verify-only pass after a remount), ``cycles``
(up/down with I/O running; per-mount counters of ``MNT/.vbusfs/stats`` after a warm-up and
after further I/O and remove/rescan rounds, and host-level leftovers), ``users`` (every file
of the tree opened for read and for write as ``nobody``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import errno
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3

from tests.soak_hostile import CAMPAIGNS

ROOT = Path(__file__).resolve().parent.parent
MOUNTCTL = [str(Path(sys.executable).parent / "mountctl")]
MiB = 1 << 20
DISKS = ("xvda", "vda", "sda")
DISK_SIZE = 128 * MiB
CRASH_AT = 64 * MiB                     # crash records live in the upper half, fio the lower
CRASH_REGION = 256 * 1024               # per crash loop
RECORD = 4096
MAGIC = b"VBSOAK01"
#: warnings a service log may hold in the soak: a SIGKILLed service leaves none, a down
#: with I/O running may log the writer's failures
LOG_EXPECTED: tuple[str, ...] = ()

CONFIG = f"""
[machine]
name = "soak"
state_dir = "state"
memory = "64M"

[[vmbus.device]]
type = "heartbeat"

[[vmbus.device]]
type = "scsi"

[[vmbus.device.lun]]
lun = 0
image = "sda.img"
size = "{DISK_SIZE // MiB}M"

[xen]

[[xen.vbd]]
vdev = "xvda"
image = "xvda.img"
size = "{DISK_SIZE // MiB}M"

[pci]

[[pci.device]]
type = "virtio-blk"
slot = 4
image = "vda.img"
size = "{DISK_SIZE // MiB}M"
"""


def log(msg: str) -> None:
    print(f"soak: {msg}", file=sys.stderr, flush=True)


@dataclass
class Report:
    seed: int
    hostile: dict[str, int] = field(default_factory=dict)
    hostile_directions: dict[str, int] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)
    crash_cycles: int = 0
    flushed_records: int = 0
    lost_flushed_records: int = 0
    verify_errors: int = 0
    bytes_verified: int = 0
    updown_cycles: int = 0
    leaks: dict[str, int] = field(default_factory=lambda: {
        "fds": 0, "threads": 0, "grants": 0, "frames": 0, "rss_kb_growth": 0,
        "mounts": 0, "processes": 0, "loop_devices": 0, "temp_files": 0})
    user_opens: int = 0
    user_access_violations: int = 0
    writer_errnos_on_down: dict[str, int] = field(default_factory=dict)
    expected_elsewhere: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fail(self, what: str, case: Any, seed: int | None = None) -> None:
        with self.lock:
            self.failures.append({"what": what, "seed": self.seed if seed is None else seed,
                                  "case": case})
        log(f"FAILURE {what}: {str(case)[:2000]}")

    def as_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "lock"}


# -- mounting ---------------------------------------------------------------------------------

class Machine:
    """The soak's machine (three 128 MiB disks: xvda on blkif, vda on virtio, sda on storvsc)
    in a work directory; ``up`` / ``down`` / ``kill`` with the repository's mountctl."""

    def __init__(self, work: Path, name: str, default: bool = False) -> None:
        self.dir = work / name
        self.dir.mkdir()
        self.config = self.dir / "soak.toml"
        self.config.write_text(CONFIG)
        self.mnt = self.dir / "m"
        self.mnt.mkdir()
        self.state = self.dir / "state"
        self.env = dict(os.environ)
        self.tmp = self.dir / "tmp"          # the service's TMPDIR: must stay empty
        self.tmp.mkdir()
        self.env["TMPDIR"] = str(self.tmp)
        self.default = default                # the embedded default machine instead
        if default:
            self.env["VBUSFS_STATE"] = str(self.dir / "default-state")
            self.state = self.dir / "default-state/hyperv-gen2"
        self.pid = 0

    def mountctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*MOUNTCTL, *args], capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT, env=self.env)

    def up(self) -> None:
        cfg = [] if self.default else ["-c", str(self.config)]
        p = self.mountctl("up", "-d", *cfg, str(self.mnt))
        if p.returncode != 0:
            raise RuntimeError(f"mountctl up: exit {p.returncode}: {p.stderr.strip()}")
        self.pid = int((self.mnt / ".vbusfs/pid").read_text())

    def down(self) -> subprocess.CompletedProcess[str]:
        return self.mountctl("down", str(self.mnt))

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        _wait_gone(self.pid)
        # the dead mount: what a user does (issue 15 item 3 makes mountctl say so)
        subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)
        if _mounted(self.mnt):
            subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True)

    def stats(self) -> dict[str, int]:
        return {p.name: int(p.read_text()) for p in (self.mnt / ".vbusfs/stats").iterdir()}

    def dev(self, disk: str) -> Path:
        return self.mnt / "dev" / disk

    def log_problems(self) -> list[str]:
        try:
            text = (self.state / "vbusfs.log").read_text(errors="replace")
        except FileNotFoundError:
            return []
        return [line for line in text.splitlines()
                if (line.startswith("vbusfs: WARNING") or line.startswith("vbusfs: ERROR")
                    or line.startswith("vbusfs: CRITICAL") or line.startswith("Traceback"))]


def _mounted(path: Path) -> bool:
    want = str(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == want for line in f)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return "Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False


def _wait_gone(pid: int, timeout: float = 10) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not _alive(pid):
            return True
        time.sleep(0.01)
    return False


# -- hostile peers ----------------------------------------------------------------------------

def hostile(rep: Report, work: Path, count: int, only: list[str] | None, workers: int,
            timeout: float) -> None:
    names = only or sorted(CAMPAIGNS)
    tmp = work / "hostile-tmp"             # what the campaigns leave is not the cycles' leak
    tmp.mkdir()
    rng = random.Random(rep.seed)
    seeds = {n: rng.randrange(2**32) for n in sorted(CAMPAIGNS)}

    def one(name: str) -> None:
        seed = seeds[name]
        cmd = [sys.executable, "-m", "tests.soak_hostile", name, "--seed", str(seed),
               "--count", str(count)]
        replay = f"tests/soak --replay {name} --seed {seed} --count {count}"
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                               env={**os.environ, "PYTHONHASHSEED": "0", "TMPDIR": str(tmp)})
        except subprocess.TimeoutExpired:
            rep.fail(f"hostile {name}: no answer within {timeout:.0f} s (a hang)",
                     {"replay": replay}, seed)
            return
        try:
            out = json.loads(p.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            rep.fail(f"hostile {name}: the campaign crashed (exit {p.returncode})",
                     {"replay": replay, "stderr": p.stderr[-3000:]}, seed)
            return
        c = CAMPAIGNS[name]
        with rep.lock:
            rep.hostile[c.transport] = rep.hostile.get(c.transport, 0) + out["cases"]
            rep.hostile_directions[f"{name} ({c.direction})"] = out["cases"]
        log(f"hostile {name}: {out['cases']} cases in {out['seconds']} s"
            + (" FAILED" if out["failure"] else ""))
        if out["failure"]:
            rep.fail(f"hostile {name} ({c.transport}, {c.direction})",
                     {"replay": replay, "error": out["failure"]}, seed)
        elif out["cases"] < count:
            rep.fail(f"hostile {name}: {out['cases']} cases, fewer than {count}",
                     {"replay": replay}, seed)

    # the slowest first, so that two workers finish together
    order = ["virtio-chains", "storvsc-packets", "vmbus-ic-from-host", "vmbus-ic-from-guest",
             "virtio-used"]
    names = sorted(names, key=lambda n: order.index(n) if n in order else len(order))
    with concurrent.futures.ThreadPoolExecutor(workers) as ex:
        list(ex.map(one, names))


# -- crash consistency ------------------------------------------------------------------------

def _record(loop: int, seq: int, rng: random.Random) -> bytes:
    body = MAGIC + struct.pack("<II", loop, seq) + rng.randbytes(RECORD - 16 - 32)
    return body + blake3.blake3(body).digest()


def _check_record(raw: bytes, loop: int, seq: int) -> str | None:
    body, digest = raw[:-32], raw[-32:]
    if blake3.blake3(body).digest() != digest:
        return "checksum"
    if body[:8] != MAGIC or struct.unpack_from("<II", body, 8) != (loop, seq):
        return "wrong record"
    return None


def _crash_writer(dev: Path, base: int, loop: int, stop: threading.Event,
                  done: list[tuple[int, int, int]], errors: list[str],
                  rng: random.Random) -> None:
    """Append records in batches of 1 to 8, fsync after each; ``done`` gets a batch once its
    fsync returned (acknowledged)."""
    try:
        fd = os.open(dev, os.O_WRONLY)
    except OSError as e:
        errors.append(f"open: {e}")
        return
    seq = 0
    try:
        while not stop.is_set() and (seq + 8) * RECORD <= CRASH_REGION:
            batch = []
            for _ in range(rng.randint(1, 8)):
                off = base + seq * RECORD
                os.pwrite(fd, _record(loop, seq, rng), off)
                batch.append((off, loop, seq))
                seq += 1
            os.fsync(fd)                      # acknowledged from here on
            done.extend(batch)
    except OSError as e:
        errors.append(errno.errorcode.get(e.errno or 0, str(e.errno)))
    finally:
        try:
            os.close(fd)
        except OSError:
            pass


def crash(rep: Report, work: Path, loops: int) -> None:
    rng = random.Random(rep.seed ^ 0xC4A5)
    m = Machine(work, "crash")
    m.up()
    acked: dict[str, list[tuple[int, int, int]]] = {d: [] for d in DISKS}   # off, loop, seq
    for loop in range(loops):
        disk = DISKS[loop % len(DISKS)]
        base = CRASH_AT + (loop // len(DISKS)) * CRASH_REGION % (DISK_SIZE - CRASH_AT)
        stop = threading.Event()
        done: list[tuple[int, int, int]] = []
        errors: list[str] = []

        t = threading.Thread(target=_crash_writer, daemon=True, args=(
            m.dev(disk), base, loop, stop, done, errors, random.Random(rng.randrange(2**32))))
        t.start()
        time.sleep(rng.uniform(0.0, 0.4))
        m.kill()
        stop.set()
        t.join(30)
        if t.is_alive():
            rep.fail("crash: the writer hung after the service was killed",
                     {"loop": loop, "disk": disk})
            return
        if m.log_problems():
            rep.fail("crash: the killed service logged problems",
                     {"loop": loop, "lines": m.log_problems()[:5]})
        acked[disk] += done
        try:
            m.up()                                    # from the same state, without help
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            rep.fail("crash: the machine did not mount again after SIGKILL",
                     {"loop": loop, "disk": disk, "error": str(e)})
            return
        lost = []
        for d in DISKS:
            with open(m.dev(d), "rb", buffering=0) as f:
                for off, lp, seq in acked[d]:
                    f.seek(off)
                    why = _check_record(f.read(RECORD), lp, seq)
                    if why:
                        lost.append({"disk": d, "offset": off, "loop": lp, "seq": seq,
                                     "why": why})
        rep.crash_cycles += 1
        rep.lost_flushed_records += len(lost)
        rep.flushed_records = sum(len(v) for v in acked.values())
        if lost:
            rep.fail("crash: acknowledged records lost", {"loop": loop, "lost": lost[:10]})
    if m.down().returncode != 0:
        rep.fail("crash: mountctl down failed at the end", {})
    log(f"crash: {rep.crash_cycles} SIGKILL cycles, {rep.flushed_records} acknowledged "
        f"records, {rep.lost_flushed_records} lost")


# -- fio verify -------------------------------------------------------------------------------

def _fio(m: Machine, size: int, verify_only: bool) -> tuple[int, int, str]:
    """Two jobs per disk on separate regions: direct random writes and buffered sequential
    writes, each verified with crc32c. Returns (errors, bytes verified, message)."""
    args = ["fio", "--output-format=json", "--ioengine=psync", "--verify=crc32c",
            "--verify_fatal=1", "--do_verify=1", "--verify_state_save=0",
            "--randrepeat=1", "--invalidate=0"]
    if verify_only:
        args.append("--verify_only")
    for d in DISKS:
        args += [f"--name={d}-direct", f"--filename={m.dev(d)}", "--rw=randwrite",
                 "--bs=4k", "--direct=1", "--offset=0", f"--size={size}"]
        args += [f"--name={d}-buffered", f"--filename={m.dev(d)}", "--rw=write",
                 "--bs=64k", "--direct=0", f"--offset={size}", f"--size={size}"]
    p = subprocess.run(args, capture_output=True, text=True, timeout=600)
    try:
        jobs = json.loads(p.stdout[p.stdout.index("{"):])["jobs"]
    except (ValueError, KeyError):
        return 1, 0, f"fio exit {p.returncode}: {p.stderr[-2000:]}"
    errs = sum(j.get("error", 0) != 0 for j in jobs) + (p.returncode != 0)
    return errs, size * len(jobs), p.stderr[-2000:] if errs else ""


def verify(rep: Report, work: Path, size: int) -> None:
    if shutil.which("fio") is None:
        rep.fail("verify: fio is not installed (.ci/setup installs it)", {})
        return
    m = Machine(work, "verify")
    m.up()
    errs, n, msg = _fio(m, size, verify_only=False)
    rep.verify_errors += errs
    rep.bytes_verified += n
    if errs:
        rep.fail("verify: fio write+verify", msg)
    if m.down().returncode != 0:
        rep.fail("verify: mountctl down failed", {})
    m.up()
    errs, n, msg = _fio(m, size, verify_only=True)
    rep.verify_errors += errs
    rep.bytes_verified += n
    if errs:
        rep.fail("verify: fio verify-only after a remount", msg)
    if m.down().returncode != 0:
        rep.fail("verify: mountctl down failed", {})
    log(f"verify: {rep.bytes_verified // MiB} MiB verified, {rep.verify_errors} errors")


# -- up/down cycles ---------------------------------------------------------------------------

COUNTERS = {"fds": "fds", "threads": "threads", "grants": "grants",
            "grants_mapped": "grants", "guest_frames": "frames"}


def _io_round(m: Machine, rng: random.Random) -> None:
    """Writes and reads on every disk at once, then the guest removes and rescans its
    virtio function and SCSI disk."""
    def one(d: str) -> None:
        off = rng.randrange(0, 32) * MiB
        data = rng.randbytes(MiB)
        fd = os.open(m.dev(d), os.O_RDWR)
        try:
            os.pwrite(fd, data, off)
            os.fsync(fd)
            assert os.pread(fd, MiB, off) == data, f"{d}: read back differs"
        finally:
            os.close(fd)
    with concurrent.futures.ThreadPoolExecutor(len(DISKS)) as ex:
        list(ex.map(one, DISKS))
    (m.mnt / "sys/bus/pci/devices/0000:00:04.0/remove").write_text("1")
    (m.mnt / "sys/bus/pci/rescan").write_text("1")
    (m.mnt / "sys/class/scsi_device/0:0:0:0/device/delete").write_text("1")
    (m.mnt / "sys/class/scsi_host/host0/scan").write_text("- - -")
    for d in DISKS:
        if not m.dev(d).exists():
            raise AssertionError(f"{d} did not come back after remove/rescan")


def _loops() -> set[str]:
    p = subprocess.run(["losetup", "-a"], capture_output=True, text=True)
    return set(p.stdout.splitlines())


def cycles(rep: Report, work: Path, n: int) -> None:
    rng = random.Random(rep.seed ^ 0xC1C1)
    m = Machine(work, "cycles")
    loops0 = _loops()
    first: dict[str, int] | None = None
    files0: set[str] | None = None
    for i in range(n):
        try:
            m.up()
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            rep.fail("cycles: up failed", {"cycle": i, "error": str(e)})
            return
        try:
            _io_round(m, rng)                        # warm-up: I/O threads, persistent grants
            warm = m.stats()
            _io_round(m, rng)
            _io_round(m, rng)
            after = m.stats()
        except (OSError, AssertionError) as e:
            rep.fail("cycles: I/O or remove/rescan failed", {"cycle": i, "error": str(e)})
            m.down()
            return
        first = first or warm
        for k, key in COUNTERS.items():
            d = after[k] - warm[k]
            if d:
                rep.leaks[key] = max(rep.leaks[key], d)
                rep.fail(f"cycles: {k} went from {warm[k]} to {after[k]} within one mount",
                         {"cycle": i})
            if after[k] != first[k]:                # across processes, same work done
                rep.leaks[key] = max(rep.leaks[key], abs(after[k] - first[k]))
                rep.fail(f"cycles: {k} is {after[k]} in mount {i}, {first[k]} in the first",
                         {"cycle": i})
        rep.leaks["rss_kb_growth"] = max(rep.leaks["rss_kb_growth"],
                                         after["rss_kb"] - first["rss_kb"])
        # down with I/O running: a writer on every disk
        stop = threading.Event()
        seen: list[int] = []

        def writer(d: str, stop: threading.Event = stop, seen: list[int] = seen) -> None:
            try:
                fd = os.open(m.dev(d), os.O_WRONLY)
                try:
                    while not stop.is_set():
                        os.pwrite(fd, b"w" * 65536, 40 * MiB)
                finally:
                    os.close(fd)
            except OSError as e:
                seen.append(e.errno or 0)
        ws = [threading.Thread(target=writer, args=(d,), daemon=True) for d in DISKS]
        for w in ws:
            w.start()
        time.sleep(0.05)
        pid = m.pid
        p = m.down()
        stop.set()
        for w in ws:
            w.join(30)
        if p.returncode != 0:
            rep.fail("cycles: mountctl down with I/O running failed",
                     {"cycle": i, "stderr": p.stderr.strip()})
        for num in seen:
            name = errno.errorcode.get(num, str(num))
            rep.writer_errnos_on_down[name] = rep.writer_errnos_on_down.get(name, 0) + 1
        # host-level leftovers
        if not _wait_gone(pid):
            rep.leaks["processes"] += 1
            rep.fail("cycles: the service is still running after down", {"cycle": i})
        if _mounted(m.mnt):
            rep.leaks["mounts"] += 1
            rep.fail("cycles: still mounted after down", {"cycle": i})
            subprocess.run(["fusermount3", "-u", "-z", str(m.mnt)], capture_output=True)
        files = {str(p.relative_to(m.state)) for p in m.state.rglob("*")}
        files0 = files0 if files0 is not None else files
        if files != files0:
            rep.leaks["temp_files"] += len(files ^ files0)
            rep.fail("cycles: files in the state directory changed",
                     {"cycle": i, "diff": sorted(files ^ files0)})
            files0 = files
        rep.updown_cycles += 1
    new_loops = _loops() - loops0
    new_tmp = set(os.listdir(m.tmp))       # the service's TMPDIR (not /tmp: others use it)
    rep.leaks["loop_devices"] += len(new_loops)
    rep.leaks["temp_files"] += len(new_tmp)
    if new_loops or new_tmp:
        rep.fail("cycles: leftovers on the host", {"loops": sorted(new_loops),
                                                    "tmp": sorted(new_tmp)})
    if m.log_problems():
        rep.fail("cycles: the service logged problems", m.log_problems()[:10])
    log(f"cycles: {rep.updown_cycles} up/down cycles; leaks {rep.leaks}; "
        f"writers saw {rep.writer_errnos_on_down} when down came")


# -- hostile users ----------------------------------------------------------------------------

USER_PROBE = r"""
import json, os, stat, sys
root = sys.argv[1]
out = {"opens": 0, "violations": []}
for dirpath, dirs, files in os.walk(root):
    for name in files:
        p = os.path.join(dirpath, name)
        try:
            st = os.lstat(p)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        world_readable = bool(st.st_mode & stat.S_IROTH)
        for flags, what in ((os.O_RDONLY, "read"), (os.O_WRONLY, "write")):
            out["opens"] += 1
            try:
                fd = os.open(p, flags | os.O_NONBLOCK)
            except OSError:
                continue
            try:
                if what == "read":
                    try:
                        os.read(fd, 4096)
                    except OSError:
                        pass
            finally:
                os.close(fd)
            if what == "write" or not world_readable:
                out["violations"].append(f"{what} {os.path.relpath(p, root)} "
                                         f"(mode {stat.filemode(st.st_mode)})")
print(json.dumps(out))
"""


def users(rep: Report, work: Path) -> None:
    m = Machine(work, "users", default=True)
    m.up()
    try:
        os.chmod(m.dir, 0o755)        # the walk needs to reach the mount point
        os.chmod(work, 0o755)
        p = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                            sys.executable, "-c", USER_PROBE, str(m.mnt)],
                           capture_output=True, text=True, timeout=600, cwd="/")
        try:
            out = json.loads(p.stdout)
        except ValueError:
            rep.fail("users: the probe did not run", p.stderr[-2000:])
            return
        rep.user_opens = out["opens"]
        rep.user_access_violations = len(out["violations"])
        if out["violations"]:
            rep.fail("users: an unprivileged user opened what it may not",
                     out["violations"][:20])
        if out["opens"] < 100:
            rep.fail("users: the probe saw almost nothing of the tree", out)
    finally:
        m.down()
    log(f"users: {rep.user_opens} opens as nobody, {rep.user_access_violations} violations")


# -- main -------------------------------------------------------------------------------------

PARTS = ["hostile", "crash", "verify", "cycles", "users"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tests/soak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="CI sizes: 10,000 hostile cases per campaign, 20 crash loops, "
                         "20 up/down cycles, 8 MiB fio jobs")
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ap.add_argument("--seed", type=int, help="the run's seed (default: random, printed)")
    ap.add_argument("--only", help=f"comma-separated parts of {','.join(PARTS)}")
    ap.add_argument("--replay", metavar="CAMPAIGN", choices=sorted(CAMPAIGNS),
                    help="run one hostile campaign with --seed and --count, as a failure "
                         "reported it")
    ap.add_argument("--count", type=int, help="hostile cases per campaign")
    ap.add_argument("--crash-loops", type=int)
    ap.add_argument("--cycles", type=int)
    ap.add_argument("--fio-size", type=int, help="MiB per fio job")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("tests/soak: needs root (it mounts)", file=sys.stderr)
        return 2
    seed = a.seed if a.seed is not None else random.randrange(2**32)
    rep = Report(seed)
    count = a.count or (10_000 if a.quick else 100_000)
    parts = a.only.split(",") if a.only else PARTS
    if a.replay:
        if a.seed is None or a.count is None:
            ap.error("--replay needs --seed and --count")
        from tests.soak_hostile import run_campaign
        out = run_campaign(a.replay, a.seed, a.count)
        print(json.dumps(out, indent=1))
        return 1 if out["failure"] else 0
    bad = set(parts) - set(PARTS)
    if bad:
        ap.error(f"unknown part {sorted(bad)}")
    log(f"seed {seed}{' (quick)' if a.quick else ''}; parts {','.join(parts)}")
    rep.expected_elsewhere = [
        "issue 15 item 3 (dead-mount detection): the soak unmounts a killed service's mount "
        "itself (fusermount3 -u -z) before mounting again",
        "issue 15 item 6 (O_DIRECT alignment): fio and the writers use aligned I/O only",
        "issue 15 item 8 (one errno on a controlled stop): writer errnos at down are recorded "
        "in writer_errnos_on_down, not checked",
        "issue 15 item 1 (image modes): the hostile-user probe opens the tree, not the state "
        "directory",
    ]
    t_all = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="vbusfs-soak-", dir="/var/tmp"))
    hostile_thread = None
    try:
        if "hostile" in parts:
            timeout = 600 if a.quick else 3600
            hostile_thread = threading.Thread(
                target=_timed, args=(rep, "hostile", hostile, rep, work, count, None, 2, timeout))
            hostile_thread.start()
        if "crash" in parts:
            _timed(rep, "crash", crash, rep, work, a.crash_loops or (20 if a.quick else 200))
        if "verify" in parts:
            _timed(rep, "verify", verify, rep, work,
                   (a.fio_size or (8 if a.quick else 32)) * MiB)
        if "cycles" in parts:
            _timed(rep, "cycles", cycles, rep, work, a.cycles or (20 if a.quick else 100))
        if "users" in parts:
            _timed(rep, "users", users, rep, work)
        if hostile_thread is not None:
            hostile_thread.join()
    finally:
        for mnt in work.glob("*/m"):
            if _mounted(mnt):
                subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    rep.seconds["total"] = round(time.monotonic() - t_all, 1)
    out = rep.as_json()
    if a.json:
        print(json.dumps(out, indent=1))
    else:
        for k, v in out.items():
            if k != "failures":
                print(f"{k}: {v}")
        for f in rep.failures:
            print(f"FAILURE {f['what']} (seed {f['seed']}): {f['case']}")
    log(f"{len(rep.failures)} failures in {rep.seconds['total']} s (seed {seed})")
    return 1 if rep.failures else 0


def _timed(rep: Report, name: str, fn: Any, *args: Any) -> None:
    t0 = time.monotonic()
    try:
        fn(*args)
    except Exception as e:               # a part that breaks is a failure, not the end
        import traceback
        rep.fail(f"{name}: the part itself failed", "".join(
            traceback.format_exception(e))[-3000:])
    rep.seconds[name] = round(time.monotonic() - t0, 1)
