"""``mountctl up|down|status|discard|shutdown|kvp`` and the ``mount.vbusfs`` helper.

Exit codes: 0 ok; 1 runtime failure (the guest refused or did not answer, the service did
not stop); 2 bad usage or bad config (nothing mounted, or nothing sent).
Errors print as ``mountctl: <what>: <message>``; tracebacks only with ``--debug``.
Every verb but ``up`` talks to a running mount only through files in its tree: ``shutdown``
and ``kvp`` through the host's transaction files ``MNT/.vbusfs/host/shutdown`` and ``kvp``
(write a request, read the guest's answer as JSON on the same open file).
"""

from __future__ import annotations

import argparse
import enum
import errno
import json
import logging
import os
import signal
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
    SHUTDOWN = "shutdown"
    KVP = "kvp"


#: KVP pools by the names mountctl accepts (enum hv_kvp_exchg_pool)
KVP_POOLS = ("external", "guest", "auto", "auto_external", "auto_internal")
KVP_TYPES = ("string", "expand_string", "dword", "qword", "u64")


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
    sd = sub.add_parser(
        Verb.SHUTDOWN.value, allow_abbrev=False,
        help="have the host ask the guest to shut down",
        description="The Hyper-V host sends the guest a shutdown request through the shutdown "
                    "integration service (or reboot, or hibernate). When the guest accepts "
                    "and the machine's vmbus.ic config says 'unmount' (the default for "
                    "shutdown), wait until the service has stopped and unmounted.",
        epilog="exit codes: 0 the guest accepted (and, if so configured, the mount is gone); "
               "1 the guest refused (e.g. hibernate without hibernation), did not answer, or "
               "the service did not stop; 2 bad usage, not a vbusfs mount, no shutdown "
               "service")
    how = sd.add_mutually_exclusive_group()
    how.add_argument("--reboot", action="store_true", help="ask for a restart")
    how.add_argument("--hibernate", action="store_true", help="ask for hibernation")
    sd.add_argument("--force", action="store_true", help="set the force flag (Linux always "
                    "forces)")
    sd.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                    help=argparse.SUPPRESS)
    sd.add_argument("mountpoint", metavar="MOUNTPOINT")
    kv = sub.add_parser(
        Verb.KVP.value, allow_abbrev=False, help="KVP (data exchange) from the host's side",
        description="The Hyper-V host's side of KVP: set, get and delete keys in a pool of "
                    "the guest, or list a pool (the host enumerates it until the guest "
                    "answers no more). The guest keeps pools as files, "
                    "MOUNTPOINT/var/lib/hyperv/.kvp_pool_N.",
        epilog="pools: 0 external (host to guest), 1 guest (what the guest publishes), "
               "2 auto (computed by the guest: FullyQualifiedDomainName, OSName, ...), "
               "3 auto_external (the host's guest parameters), 4 auto_internal. "
               "exit codes: 0 the guest answered S_OK (list: reached the end); 1 it answered "
               "anything else or not at all; 2 bad usage, not a vbusfs mount, no KVP service")
    kv.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                    help=argparse.SUPPRESS)
    kv.add_argument("mountpoint", metavar="MOUNTPOINT")
    ops = kv.add_subparsers(dest="kvp_op", required=True, metavar="OP")

    def kvp_op(name: str, help_: str) -> argparse.ArgumentParser:
        op = ops.add_parser(name, allow_abbrev=False, help=help_, description=help_)
        op.add_argument("--pool", default="external", help="pool number (0-4) or name: "
                        + ", ".join(KVP_POOLS) + " (default: external)")
        op.add_argument("--json", action="store_true", help="print the guest's whole answer")
        op.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS)
        return op
    st_ = kvp_op("set", "set KEY to VALUE in the guest's pool")
    st_.add_argument("key", metavar="KEY")
    st_.add_argument("value", metavar="VALUE")
    st_.add_argument("--type", default="string", choices=KVP_TYPES,
                     help="value type: string (REG_SZ), expand_string, dword (REG_U32), "
                          "qword (REG_QWORD 11, as Windows sends; Linux leaves it "
                          "unconverted), u64 (Linux's REG_U64 8)")
    kvp_op("get", "get KEY from the guest's pool").add_argument("key", metavar="KEY")
    kvp_op("delete", "delete KEY from the guest's pool").add_argument("key", metavar="KEY")
    kvp_op("list", "list the guest's pool, KEY=VALUE per line")
    return p


def _dead_mount(mnt: str) -> Failure | None:
    """A mount whose FUSE server is gone (killed, crashed) answers every access with
    ENOTCONN ("Transport endpoint is not connected"): say so, and how to clear it."""
    try:
        os.stat(mnt)
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            fstype = mount_fstype(mnt) or "FUSE"
            what = "vbusfs" if fstype == FSTYPE else fstype
            return Failure(mnt, f"is a dead {what} mount: its service is no longer running "
                           "(transport endpoint is not connected)", EXIT_FAILURE,
                           f"'mountctl down {mnt}' removes it" if fstype == FSTYPE else
                           f"'umount -l {mnt}' removes it")
    return None


def _check_mountpoint(mnt: str) -> None:
    p = Path(mnt)
    dead = _dead_mount(mnt)
    if dead is not None:
        dead.code = EXIT_USAGE                  # nothing was mounted: refused
        raise dead
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
    from mountctl.preflight import check_images
    from vbusfs.config import ConfigError, load, load_default
    try:
        config = load(path) if path else load_default()
        check_images(config)
        return config
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
            try:
                _print_hello(mnt, config.machine.name)
            except BrokenPipeError:
                # whoever read the greeting is gone; the service carries on without stdout
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())

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
    from backends.storage.files import make_state_dir
    state = Path(config.machine.state_dir)
    make_state_dir(state)
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


def _require_vbusfs(mnt: str, *, alive: bool = True) -> Path:
    fstype = mount_fstype(mnt)
    if fstype is None:
        raise Failure(mnt, "not a mount point", EXIT_USAGE)
    if fstype != FSTYPE:
        raise Failure(mnt, f"not a vbusfs mount (it is {fstype})", EXIT_USAGE)
    if alive:
        dead = _dead_mount(mnt)
        if dead is not None:
            raise dead
    return Path(mnt) / CONTROL_DIR


def _down(args: argparse.Namespace) -> int:
    mnt = os.path.abspath(args.mountpoint)
    ctl = _require_vbusfs(mnt, alive=False)
    if _dead_mount(mnt) is not None:
        return _remove_dead_mount(mnt)
    try:
        pid = int((ctl / "pid").read_text())
        (ctl / "control").write_text("shutdown\n")
    except OSError as e:
        if e.errno == errno.ENOTCONN:               # it died just now
            return _remove_dead_mount(mnt)
        raise Failure(mnt, f"the service is not answering ({e.strerror})",
                      hint=f"'umount -l {mnt}' detaches the mount; the service may still "
                           "hold its images") from None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if mount_fstype(mnt) != FSTYPE and not _alive(pid):
            return EXIT_OK
        time.sleep(0.05)
    raise Failure(mnt, f"service (pid {pid}) did not stop within 30 s")


def _remove_dead_mount(mnt: str) -> int:
    """The service is gone: nothing is left to stop or drain, only the mount to detach. A
    lazy unmount (``MNT_DETACH``) succeeds even while a process still has a file of it open
    (those accesses keep failing with ENOTCONN until closed)."""
    out = subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True, text=True,
                         check=False)
    if mount_fstype(mnt) == FSTYPE:
        raise Failure(mnt, "the service is no longer running and the dead mount could not be "
                      "removed: " + (out.stderr.strip() or f"fusermount3 exit {out.returncode}"))
    print(f"vbusfs: {mnt}: the service had already stopped; its dead mount is removed")
    return EXIT_OK


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


def _transact(node: Path, request: str) -> dict[str, object]:
    """Write ``request`` to a host transaction file; the guest's answer."""
    fd = os.open(node, os.O_RDWR)
    try:
        os.write(fd, request.encode())
        chunks = []
        off = 0
        while chunk := os.pread(fd, 1 << 20, off):
            chunks.append(chunk)
            off += len(chunk)
    finally:
        os.close(fd)
    doc = json.loads(b"".join(chunks))
    assert isinstance(doc, dict)
    return doc


def _ic_failure(what: str, e: OSError) -> Failure:
    """The host's errors from a transaction file, for people."""
    if e.errno == errno.EINVAL:
        return Failure(what, f"the service refused the request ({e.strerror})", EXIT_USAGE)
    reason = {
        errno.ENOTCONN: "the guest has not negotiated this integration service (its channel "
                        "is not open)",
        errno.EPROTO: "the host stopped this integration service after a protocol error "
                      "(see the service's log)",
        errno.ETIMEDOUT: "the guest did not answer",
    }.get(e.errno or 0, e.strerror or str(e))
    return Failure(what, reason)


def _ic_node(mnt: str, name: str, service: str) -> Path:
    node = _require_vbusfs(mnt) / "host" / name
    if not node.exists():
        raise Failure(mnt, f"this machine has no {service} integration service", EXIT_USAGE)
    return node


def _wait_gone(mnt: str, pid: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if mount_fstype(mnt) != FSTYPE and not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def _shutdown(args: argparse.Namespace) -> int:
    mnt = os.path.abspath(args.mountpoint)
    node = _ic_node(mnt, "shutdown", "shutdown")
    kind = "reboot" if args.reboot else "hibernate" if args.hibernate else "shutdown"
    try:
        pid = int((node.parent.parent / "pid").read_text())
        reply = _transact(node, kind + (" force" if args.force else "") + "\n")
    except OSError as e:
        raise _ic_failure(kind, e) from None
    if reply.get("status_name") != "S_OK":
        raise Failure(kind, f"the guest refused the request: {reply.get('status_name')} "
                      f"({reply.get('status')})")
    if reply.get("action") != "unmount":
        print(f"the guest accepted the {kind} request; the service reports it and stays "
              f"mounted (vmbus.ic.on_{kind} = log)")
        return EXIT_OK
    if not _wait_gone(mnt, pid):
        raise Failure(mnt, f"the guest accepted the {kind} request but the service (pid "
                      f"{pid}) did not stop within 30 s")
    print(f"the guest accepted the {kind} request; {mnt} is unmounted")
    return EXIT_OK


def _kvp_pool(word: str) -> int:
    if word in KVP_POOLS:
        return KVP_POOLS.index(word)
    if len(word) == 1 and "0" <= word < str(len(KVP_POOLS)):     # ASCII digits only
        return int(word)
    raise Failure("kvp", f"no pool {word!r} (0-4, or {', '.join(KVP_POOLS)})", EXIT_USAGE)


def _units(text: str) -> int:
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def _kvp_check(args: argparse.Namespace) -> None:
    """What a KVP message can carry (HV_KVP_EXCHANGE_MAX_KEY_SIZE 512 and _VALUE_SIZE 2048
    bytes of UTF-16, NUL included), checked before anything is sent."""
    if args.kvp_op == "list":
        return
    for what in ("key", "value"):
        text = getattr(args, what, None)
        if text is None:
            continue
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise Failure("kvp", f"the {what} is not valid UTF-8 text", EXIT_USAGE) from None
    if not args.key or "\0" in args.key or _units(args.key) > 255:
        raise Failure("kvp", "a key is 1 to 255 UTF-16 units without NUL", EXIT_USAGE)
    if args.kvp_op != "set":
        return
    if args.type in ("string", "expand_string"):
        if "\0" in args.value or _units(args.value) > 1023:
            raise Failure("kvp", "a value is at most 1023 UTF-16 units without NUL",
                          EXIT_USAGE)
        return
    bits = 32 if args.type == "dword" else 64
    try:
        number = int(args.value, 0)
    except ValueError:
        number = -1
    if not 0 <= number < 1 << bits:
        raise Failure("kvp", f"{args.value!r} is not a {bits}-bit unsigned number",
                      EXIT_USAGE)


def _kvp(args: argparse.Namespace) -> int:
    import shlex
    mnt = os.path.abspath(args.mountpoint)
    node = _ic_node(mnt, "kvp", "KVP")
    pool = _kvp_pool(args.pool)
    _kvp_check(args)
    op = args.kvp_op
    words = [op, str(pool)]
    if op in ("set", "get", "delete"):
        words.append(args.key)
    if op == "set":
        words += [args.value, args.type]
    what = f"kvp {op}" + (f" {args.key}" if op != "list" else "") + \
        f" (pool {pool} {KVP_POOLS[pool]})"
    try:
        reply = _transact(node, shlex.join(words) + "\n")
    except OSError as e:
        raise _ic_failure(what, e) from None
    status = f"{reply.get('status_name')} ({reply.get('status')})"
    if args.json:
        print(json.dumps(reply, indent=2, ensure_ascii=False))
    elif op == "get" and reply.get("status_name") == "S_OK":
        print(reply.get("value"))
    elif op == "list":
        items = reply.get("items", [])
        assert isinstance(items, list)
        for item in items:
            assert isinstance(item, dict)
            print(f"{item['key']}={str(item['value']).replace(chr(10), chr(92) + 'n')}")
    elif op in ("set", "delete"):
        print(f"the guest answered {status}")
    if op == "list":
        if reply.get("status_name") not in ("S_CONT", "S_OK"):
            raise Failure(what, f"the enumeration ended with {status}")
        return EXIT_OK
    if reply.get("status_name") != "S_OK":
        raise Failure(what, "no such key: the guest answered " + status
                      if op != "set" and reply.get("status_name") == "S_CONT"
                      else f"the guest answered {status}")
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
    if (bus_root / "pci/devices").is_dir():
        buses["pci"] = {"devices": [_pci_row(e) for e in
                                    sorted((bus_root / "pci/devices").iterdir())]}
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
#: virtio device ids → the config's type names (vbusfs.protocols.virtio.ids)
_VIRTIO_TYPES = {1: "virtio-net", 2: "virtio-blk", 3: "virtio-console", 4: "virtio-rng",
                 5: "virtio-balloon"}


def _link_name(path: Path) -> str | None:
    return os.path.basename(os.readlink(path)) if path.is_symlink() else None


def _pci_row(entry: Path) -> dict[str, object]:
    """A PCI function and the virtio device on it, read as lspci and a user would."""
    row: dict[str, object] = {
        "name": entry.name,
        "id": f"{_read(entry / 'vendor')[2:]}:{_read(entry / 'device')[2:]}",
        "type": "host bridge" if _read(entry / "class").startswith("0x0600") else
                f"class {_read(entry / 'class')}",
        "state": "enabled" if _read(entry / "enable") not in ("", "0") else "-",
        "driver": _link_name(entry / "driver"),
        "disks": [],
    }
    virtio = next((c for c in sorted(entry.iterdir()) if c.name.startswith("virtio") and
                   c.is_dir() and not c.is_symlink()), None)
    if virtio is not None:
        try:
            status = int(_read(virtio / "status") or "0", 16)
            dev_id = int(_read(virtio / "device") or "0", 16)
        except ValueError:
            status = dev_id = 0
        row["type"] = _VIRTIO_TYPES.get(dev_id, f"virtio {dev_id}")
        row["virtio"] = virtio.name
        row["state"] = "failed" if status & 0x80 else "needs-reset" if status & 0x40 else \
            "driver-ok" if status & 0x4 else f"status {status:#x}"
        row["driver"] = _link_name(virtio / "driver") or row["driver"]
        if (virtio / "block").is_dir():
            row["disks"] = sorted(p.name for p in (virtio / "block").iterdir())
    return row


def _vmbus_type(class_id: str) -> str:
    from vbusfs.protocols.guid import parse_guid
    from vbusfs.protocols.vmbus import messages as m
    try:
        cls = m.class_by_guid(parse_guid(class_id))
    except ValueError:
        return "?"
    return cls.type if cls else "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()             # buffered output meets a closed pipe here, not at exit
    except BrokenPipeError:
        _die_of_sigpipe()
    return code


def _die_of_sigpipe() -> None:
    """The reader of our output went away (``mountctl status MNT | head -1``): end as C
    tools do when they write to a closed pipe, killed by SIGPIPE without a word (the shell
    reports 141). Python ignores SIGPIPE, so the write raised instead; restore the default
    action and take the signal."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())      # nothing left to flush at exit either
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGPIPE)
    raise SystemExit(128 + signal.SIGPIPE)     # not reached


def _main(argv: Sequence[str] | None) -> int:
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
               Verb.DISCARD: _discard, Verb.SHUTDOWN: _shutdown,
               Verb.KVP: _kvp}[Verb(args.verb)]
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
    except BrokenPipeError:
        raise
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
