"""``mountctl up|down|status`` and the ``mount.vbusfs`` helper.

Exit codes: 0 ok; 1 runtime failure; 2 bad usage or bad config (nothing mounted).
Errors print as ``mountctl: <what>: <message>``; tracebacks only with ``--debug``.
``down`` and ``status`` talk to a running mount only through files in its tree.
"""

from __future__ import annotations

import argparse
import enum
import errno
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mountctl.mounts import mount_fstype
from vbusfs import CONTROL_DIR, FSTYPE

if TYPE_CHECKING:
    from vbusfs.config import Config

PROG = "mountctl"
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class Verb(enum.Enum):
    UP = "up"
    DOWN = "down"
    STATUS = "status"
    DISCARD = "discard"


class Failure(Exception):
    def __init__(self, what: str, message: str, code: int = EXIT_FAILURE,
                 hint: str | None = None) -> None:
        super().__init__(message)
        self.what, self.message, self.code, self.hint = what, message, code, hint


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, allow_abbrev=False,
        description="Mount an emulated machine's paravirtual buses as a sysfs-shaped tree.",
        epilog="exit codes: 0 ok, 1 runtime failure, 2 bad usage or bad config")
    p.add_argument("--debug", action="store_true", help="log verbosely, show tracebacks")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    up = sub.add_parser(
        Verb.UP.value, allow_abbrev=False, help="mount a machine",
        description="Mount the machine described by CONFIG (or the embedded default) on "
                    "MOUNTPOINT. Runs in the foreground until Ctrl-C or 'mountctl down'.")
    up.add_argument("-c", "--config", metavar="CONFIG", help="machine config (TOML)")
    up.add_argument("-d", "--daemon", action="store_true",
                    help="return once the tree is ready, leaving the service running")
    up.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                    help=argparse.SUPPRESS)
    up.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    up.add_argument("mountpoint", metavar="MOUNTPOINT")
    down = sub.add_parser(Verb.DOWN.value, allow_abbrev=False, help="unmount cleanly",
                          description="Stop the service behind MOUNTPOINT and unmount it.")
    down.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                      help=argparse.SUPPRESS)
    down.add_argument("mountpoint", metavar="MOUNTPOINT")
    st = sub.add_parser(Verb.STATUS.value, allow_abbrev=False, help="show what is mounted",
                        description="Show the machine, buses and devices behind MOUNTPOINT.")
    st.add_argument("--json", action="store_true", help="one JSON document")
    st.add_argument("--no-legend", action="store_true", help="no header line")
    st.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                    help=argparse.SUPPRESS)
    st.add_argument("mountpoint", metavar="MOUNTPOINT")
    dc = sub.add_parser(
        Verb.DISCARD.value, allow_abbrev=False, help="discard a range of a disk",
        description="Send a discard (trim) for LENGTH bytes at OFFSET of DISK through its "
                    "ring; the range then reads as zeros. OFFSET and LENGTH take K/M/G "
                    "suffixes and must be whole logical blocks. (fallocate/blkdiscard cannot "
                    "reach a FUSE file; this is the way in.)")
    dc.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                    help=argparse.SUPPRESS)
    dc.add_argument("mountpoint", metavar="MOUNTPOINT")
    dc.add_argument("disk", metavar="DISK", help="a disk name such as xvda")
    dc.add_argument("offset", metavar="OFFSET")
    dc.add_argument("length", metavar="LENGTH")
    return p


def _check_mountpoint(mnt: str) -> None:
    p = Path(mnt)
    if not p.exists():
        raise Failure(mnt, "does not exist", EXIT_USAGE, "create it with mkdir")
    if not p.is_dir():
        raise Failure(mnt, "is not a directory", EXIT_USAGE)
    fstype = mount_fstype(mnt)
    if fstype is not None:
        raise Failure(mnt, f"is already a mount point ({fstype})", EXIT_USAGE,
                      f"'mountctl down {mnt}' if it is a vbusfs mount")
    if any(p.iterdir()):
        raise Failure(mnt, "is not empty", EXIT_USAGE, "mount on an empty directory")


def _load_config(path: str | None) -> Config:
    from vbusfs.config import ConfigError, load, load_default
    try:
        return load(path) if path else load_default()
    except ConfigError as e:
        raise Failure(path or "<embedded default>", str(e), EXIT_USAGE) from None


def _up(args: argparse.Namespace) -> int:
    config = _load_config(args.config)
    _check_mountpoint(args.mountpoint)
    mnt = os.path.abspath(args.mountpoint)
    if args.daemon:
        return _up_daemon(args, mnt, config)
    from vbusfs.machine import Machine
    from vbusfs.service import serve

    def ready() -> None:
        if args.ready_fd is not None:
            os.write(args.ready_fd, b"ready\n")
            os.close(args.ready_fd)
        else:
            _print_hello(mnt, config.machine.name)

    try:
        machine = Machine(config)
    except Exception as e:
        raise Failure(config.source, f"cannot build machine: {e}") from e
    try:
        serve(machine, mnt, ready)
    except (RuntimeError, OSError) as e:
        raise Failure(mnt, f"{e}") from e
    return EXIT_OK


def _print_hello(mnt: str, name: str) -> None:
    print(f"vbusfs: machine {name!r} mounted on {mnt} (Ctrl-C to unmount)\n"
          f"try, in another shell:\n"
          f"  ls -l {mnt}/sys/bus/vmbus/devices/\n"
          f"  cat {mnt}/sys/bus/vmbus/devices/*/class_id\n"
          f"  grep . {mnt}/sys/bus/vmbus/devices/*/{{id,state,modalias,in_read_index}}\n"
          f"  mountctl status {mnt}\n"
          f"  mountctl down {mnt}", flush=True)


def _up_daemon(args: argparse.Namespace, mnt: str, config: Config) -> int:
    state = Path(config.machine.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    logpath = state / "vbusfs.log"
    rfd, wfd = os.pipe()
    cmd = [sys.executable, "-m", "mountctl"] + (["--debug"] if args.debug else []) + [
        "up", "--ready-fd", str(wfd)] + (["-c", args.config] if args.config else []) + [mnt]
    with open(logpath, "ab") as log:
        start = log.tell()              # what an earlier start left in the log is not ours
        proc = subprocess.Popen(cmd, pass_fds=(wfd,), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=log, start_new_session=True)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as r:
        line = r.readline()
    if line.strip() == b"ready":
        print(f"vbusfs: {config.machine.name} mounted on {mnt} (pid {proc.pid}, log {logpath})")
        return EXIT_OK
    code = proc.wait()
    tail = _tail(logpath, start)
    raise Failure(mnt, f"service exited with status {code} before it was ready" +
                  (f":\n{tail}" if tail else ""), code if code in (1, 2) else EXIT_FAILURE)


def _tail(path: Path, start: int, lines: int = 5) -> str:
    """The last ``lines`` lines written to ``path`` after byte ``start``."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _require_vbusfs(mnt: str) -> Path:
    fstype = mount_fstype(mnt)
    if fstype is None:
        raise Failure(mnt, "not a mount point", EXIT_USAGE)
    if fstype != FSTYPE:
        raise Failure(mnt, f"not a vbusfs mount (it is {fstype})", EXIT_USAGE)
    return Path(mnt) / CONTROL_DIR


def _down(args: argparse.Namespace) -> int:
    mnt = os.path.abspath(args.mountpoint)
    ctl = _require_vbusfs(mnt)
    try:
        pid = int((ctl / "pid").read_text())
        (ctl / "control").write_text("shutdown\n")
    except OSError as e:
        # The service is gone but the mount is stale ("Transport endpoint is not connected").
        subprocess.run(["fusermount3", "-u", "-z", mnt], check=False)
        raise Failure(mnt, f"service not answering ({e.strerror}); lazily unmounted") from None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if mount_fstype(mnt) != FSTYPE and not _alive(pid):
            return EXIT_OK
        time.sleep(0.05)
    raise Failure(mnt, f"service (pid {pid}) did not stop within 30 s")


def _discard(args: argparse.Namespace) -> int:
    from vbusfs.config import parse_size
    mnt = os.path.abspath(args.mountpoint)
    ctl = _require_vbusfs(mnt)
    try:
        offset, length = parse_size(args.offset), parse_size(args.length)
    except ValueError as e:
        raise Failure("discard", str(e), EXIT_USAGE) from None
    node = ctl / "block" / args.disk / "discard"
    if not node.exists():
        raise Failure(args.disk, f"no such disk in {mnt}", EXIT_USAGE)
    try:
        node.write_text(f"{offset} {length}\n")
    except OSError as e:
        code = EXIT_USAGE if e.errno in (errno.EINVAL, errno.EROFS) else EXIT_FAILURE
        raise Failure(args.disk, e.strerror or str(e), code) from None
    return EXIT_OK


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _status(args: argparse.Namespace) -> int:
    mnt = os.path.abspath(args.mountpoint)
    ctl = _require_vbusfs(mnt)
    doc = {
        "mountpoint": mnt,
        "machine": _read(ctl / "machine"),
        "pid": int(_read(ctl / "pid") or 0),
        "config": _read(ctl / "config"),
        "buses": {},
    }
    buses: dict[str, object] = {}
    bus_root = Path(mnt) / "sys/bus"
    if (bus_root / "vmbus").is_dir():
        devs = []
        for entry in sorted((bus_root / "vmbus/devices").iterdir()):
            drv = entry / "driver"
            devs.append({
                "name": entry.name,
                "id": int(_read(entry / "id") or 0),
                "class_id": _read(entry / "class_id"),
                "type": _vmbus_type(_read(entry / "class_id")),
                "state": int(_read(entry / "state") or 0),
                "driver": os.path.basename(os.readlink(drv)) if drv.is_symlink() else None,
                # a SCSI controller's disks: hostN/targetN:C:T/N:C:T:L/block/sdX
                "disks": sorted(p.name for p in entry.glob("host*/target*/*/block/*")),
            })
        devs.sort(key=lambda d: d["id"])  # type: ignore[arg-type, return-value]
        buses["vmbus"] = {"version": _read(ctl / "vmbus_version"), "devices": devs}
    if (bus_root / "xen/devices").is_dir():
        xdevs = []
        for entry in sorted((bus_root / "xen/devices").iterdir()):
            drv = entry / "driver"
            disks = sorted(p.name for p in (entry / "block").iterdir()) \
                if (entry / "block").is_dir() else []
            xdevs.append({
                "name": entry.name,
                "id": entry.name.split("-", 1)[-1],
                "type": _read(entry / "devtype"),
                "state": _read(entry / "state"),
                "driver": os.path.basename(os.readlink(drv)) if drv.is_symlink() else None,
                "disks": disks,
            })
        buses["xen"] = {"devices": xdevs}
    doc["buses"] = buses
    if args.json:
        print(json.dumps(doc, indent=2))
        return EXIT_OK
    print(f"machine {doc['machine']} on {mnt} (pid {doc['pid']}, config {doc['config']})")
    rows = []
    for bus, info in buses.items():
        assert isinstance(info, dict)
        for d in info["devices"]:
            state = d["state"] if isinstance(d["state"], str) else _STATE.get(d["state"], "?")
            dtype = d["type"] + (f" ({', '.join(d['disks'])})" if d.get("disks") else "")
            rows.append((bus, d["name"], str(d["id"]), dtype, state, d["driver"] or "-"))
    header = ("BUS", "DEVICE", "ID", "TYPE", "STATE", "DRIVER")
    table = rows if args.no_legend else [header, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))] if table else []
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return EXIT_OK


_STATE = {0: "offer", 1: "opening", 2: "offered", 3: "opened"}


def _vmbus_type(class_id: str) -> str:
    from vbusfs.protocols.guid import parse_guid
    from vbusfs.protocols.vmbus import messages as m
    try:
        cls = m.class_by_guid(parse_guid(class_id))
    except ValueError:
        return "?"
    return cls.type if cls else "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s"
                        if debug else "vbusfs: %(levelname)s: %(message)s")
    if not debug:
        logging.getLogger("vbusfs.drivers.vmbus.hv_utils").setLevel(logging.WARNING)
        logging.getLogger("backends").setLevel(logging.WARNING)
    handler = {Verb.UP: _up, Verb.DOWN: _down, Verb.STATUS: _status,
               Verb.DISCARD: _discard}[Verb(args.verb)]
    try:
        return handler(args)
    except Failure as e:
        print(f"{PROG}: {e.what}: {e.message}", file=sys.stderr)
        if e.hint:
            print(f"{PROG}: hint: {e.hint}", file=sys.stderr)
        if debug and e.__cause__ is not None:
            import traceback
            traceback.print_exception(e.__cause__)
        return e.code
    except KeyboardInterrupt:
        return EXIT_FAILURE
    except Exception as e:
        if debug:
            raise
        print(f"{PROG}: {type(e).__name__}: {e} (run with --debug for a traceback)",
              file=sys.stderr)
        return EXIT_FAILURE


def mount_helper(argv: Sequence[str] | None = None) -> int:
    """``mount.vbusfs CONFIG MOUNTPOINT [-o OPTS] [-s] [-f] [-n] [-v]`` (mount(8) helper)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="mount.vbusfs", allow_abbrev=False,
                                description="mount(8) helper: mount -t vbusfs CONFIG DIR")
    p.add_argument("config", metavar="CONFIG", help="machine config, or 'default'")
    p.add_argument("mountpoint", metavar="DIR")
    p.add_argument("-o", dest="options", default="", help="mount options (ignored: rw)")
    for flag in ("-s", "-f", "-n", "-v"):
        p.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.f:   # fake mount
        return EXIT_OK
    up = ["up", "-d"] + ([] if args.config == "default" else ["-c", args.config])
    return main([*up, args.mountpoint])


if __name__ == "__main__":
    sys.exit(main())
