"""The Hyper-V host's integration-service controls, as files under ``MNT/.vbusfs/host/``
(what an administrator does on the host, for ``mountctl`` and the shell; reference/
hv-services.md §2). Not sysfs: the service's own area.

* ``shutdown``, ``kvp``, ``vss``, ``fcopy``: transaction files. A write is one request
  (validated first: a bad one is EINVAL and sends nothing); it returns once the guest has
  answered, and a read on the same open file then returns the answer as one JSON document
  (``cat`` of the file shows the last answer). The guest's status is part of the answer;
  errors are the host's: ENOTCONN (the service is not negotiated, or its channel is closed),
  EPROTO (the host stopped the service after a protocol error), ETIMEDOUT (no answer).
* ``timesync_skew``: the host clock's skew in seconds; a write moves the clock and sends the
  guest a sample of the new time at once.
* ``status``: each service's state on the host side, as JSON.

Requests, one line each (``shlex`` quoting, so keys and values may hold spaces):

* ``shutdown``: ``shutdown|reboot|hibernate [force]``;
* ``kvp``: ``set POOL KEY VALUE [string|expand_string|dword|qword|u64]``, ``get POOL KEY``,
  ``delete POOL KEY``, ``enumerate POOL INDEX``, ``list POOL``; POOL is 0–4 or ``external``,
  ``guest``, ``auto``, ``auto_external``, ``auto_internal``;
* ``vss``: an operation (``freeze``, ``thaw``, ``hot_backup``, ``get_dm_info``,
  ``bu_complete``, ``create``, ``delete``, ``auto_recover``) or its number;
* ``fcopy``: ``start FILE PATH [SIZE [FLAGS]]``, ``write OFFSET TEXT``, ``complete``,
  ``cancel``.
"""

from __future__ import annotations

import errno
import json
import math
import shlex
from collections.abc import Callable
from typing import Any

from backends.vmbus.ic import (
    SHUTDOWN_KINDS,
    FcopyIc,
    HeartbeatIc,
    IcDevice,
    KvpIc,
    KvpItem,
    ShutdownIc,
    TimesyncIc,
    VssIc,
)
from vbusfs.config.vmbus import KVP_MAX_KEY_UNITS, KVP_MAX_VALUE_UNITS, MAX_SKEW_S
from vbusfs.protocols.vmbus import hv_ic, hv_kvp
from vbusfs.sysfs import Attribute, Directory

__all__ = ["add_host_controls", "POOL_NAMES", "VALUE_TYPES"]

POOL_NAMES = {p.name.lower(): int(p) for p in hv_kvp.KvpPool}
#: value types a ``set`` may name: Windows' REG_QWORD (11) is not Linux's REG_U64 (8), and
#: Linux does not convert it (reference §2.4)
VALUE_TYPES = {"string": hv_kvp.REG_SZ, "expand_string": hv_kvp.REG_EXPAND_SZ,
               "dword": hv_kvp.REG_U32, "qword": hv_kvp.REG_QWORD, "u64": hv_kvp.REG_U64}
_TYPE_NAMES = {v: k for k, v in VALUE_TYPES.items()}


def _bad(message: str) -> OSError:
    return OSError(errno.EINVAL, message)


def _words(text: str) -> list[str]:
    try:
        words = shlex.split(text)
    except ValueError as e:
        raise _bad(f"cannot split the request: {e}") from None
    if not words:
        raise _bad("empty request")
    return words


def _status(status: int) -> dict[str, Any]:
    return {"status": f"{status:#010x}", "status_name": hv_ic.status_name(status)}


def _dump(doc: dict[str, Any]) -> str:
    return json.dumps(doc, ensure_ascii=False) + "\n"


class _Transaction:
    """A transaction file's last answer, for ``cat``."""

    def __init__(self) -> None:
        self.last = "{}\n"

    def done(self, doc: dict[str, Any]) -> str:
        self.last = _dump(doc)
        return self.last


def _pool(word: str) -> int:
    pool = POOL_NAMES.get(word.lower())
    if pool is None:
        try:
            pool = int(word, 10)
        except ValueError:
            pool = -1
    if not 0 <= pool < hv_kvp.KVP_POOL_COUNT:
        raise _bad(f"no pool {word!r} (0-4, or " + ", ".join(POOL_NAMES) + ")")
    return pool


def _units(text: str) -> int:
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def _key(word: str) -> str:
    if not word or "\0" in word or _units(word) > KVP_MAX_KEY_UNITS:
        raise _bad(f"a key is 1 to {KVP_MAX_KEY_UNITS} UTF-16 units without NUL")
    return word


def _item(key: str, value: str, vtype_name: str) -> KvpItem:
    vtype = VALUE_TYPES.get(vtype_name)
    if vtype is None:
        raise _bad(f"no value type {vtype_name!r} (" + ", ".join(VALUE_TYPES) + ")")
    if vtype in (hv_kvp.REG_SZ, hv_kvp.REG_EXPAND_SZ):
        if "\0" in value or _units(value) > KVP_MAX_VALUE_UNITS:
            raise _bad(f"a value is at most {KVP_MAX_VALUE_UNITS} UTF-16 units without NUL")
        return KvpItem(key, value, vtype)
    try:
        number = int(value, 0)
    except ValueError:
        raise _bad(f"{value!r} is not a number") from None
    if not 0 <= number < (1 << 32 if vtype == hv_kvp.REG_U32 else 1 << 64):
        raise _bad(f"{number} does not fit a {vtype_name}")
    return KvpItem(key, number, vtype)


def _item_doc(item: KvpItem) -> dict[str, Any]:
    return {"key": item.key, "value": item.value,
            "type": _TYPE_NAMES.get(item.value_type, item.value_type)}


def _shutdown_file(ic: ShutdownIc, reaction: Callable[[str], str]) -> Attribute:
    tx = _Transaction()

    async def store(text: str) -> str:
        words = text.split()
        if not words or words[0] not in SHUTDOWN_KINDS or len(words) > 2 or \
                (len(words) == 2 and words[1] != "force"):
            raise _bad("shutdown takes 'shutdown', 'reboot' or 'hibernate', then 'force'")
        kind, force = words[0], len(words) == 2
        status = await ic.request(kind, force)
        return tx.done({"request": kind, "force": force, **_status(status),
                        "action": reaction(kind) if status == hv_ic.HV_S_OK else "none"})
    return Attribute("shutdown", lambda: tx.last, store)


def _kvp_file(ic: KvpIc) -> Attribute:
    tx = _Transaction()

    async def store(text: str) -> str:
        words = _words(text)
        op, args = words[0], words[1:]
        shapes = {"set": (3, 4), "get": (2, 2), "delete": (2, 2), "enumerate": (2, 2),
                  "list": (1, 1)}
        if op not in shapes or not shapes[op][0] <= len(args) <= shapes[op][1]:
            raise _bad("kvp takes: set POOL KEY VALUE [TYPE], get POOL KEY, delete POOL KEY, "
                       "enumerate POOL INDEX, list POOL")
        pool = _pool(args[0])
        doc: dict[str, Any] = {"op": op, "pool": pool}
        if op == "set":
            item = _item(_key(args[1]), args[2], args[3] if len(args) > 3 else "string")
            result = await ic.set(pool, item)
            doc.update(_item_doc(item))
        elif op == "get":
            key = _key(args[1])
            result = await ic.get(pool, key)
            doc["key"] = key
            if result.item is not None:
                doc.update(_item_doc(result.item))
        elif op == "delete":
            doc["key"] = _key(args[1])
            result = await ic.delete(pool, doc["key"])
        elif op == "enumerate":
            try:
                index = int(args[1], 10)
            except ValueError:
                index = -1
            if not 0 <= index < 1 << 32:
                raise _bad(f"{args[1]!r} is not an index (0 to 2^32-1)")
            doc["index"] = index
            result = await ic.enumerate(pool, index)
            if result.item is not None:
                doc.update(_item_doc(result.item))
        else:
            items, status = await ic.items(pool)
            doc["items"] = [_item_doc(i) for i in items]
            return tx.done({**doc, **_status(status)})
        return tx.done({**doc, **_status(result.status)})
    return Attribute("kvp", lambda: tx.last, store)


def _vss_file(ic: VssIc) -> Attribute:
    tx = _Transaction()
    names = {v: k for k, v in hv_ic.VSS_OPS.items()}

    async def store(text: str) -> str:
        word = text.strip()
        op = hv_ic.VSS_OPS.get(word)
        if op is None:
            try:
                op = int(word, 10)
            except ValueError:
                op = -1
            if not 0 <= op <= 255:
                raise _bad("vss takes an operation: " + ", ".join(hv_ic.VSS_OPS) +
                           ", or its number")
        status, flags = await ic.request(op)
        return tx.done({"op": names.get(op, op), **_status(status), "flags": flags})
    return Attribute("vss", lambda: tx.last, store)


def _fcopy_file(ic: FcopyIc) -> Attribute:
    tx = _Transaction()

    def number(word: str, bits: int) -> int:
        try:
            n = int(word, 0)
        except ValueError:
            n = -1
        if not 0 <= n < 1 << bits:
            raise _bad(f"{word!r} is not a {bits}-bit number")
        return n

    async def store(text: str) -> str:
        words = _words(text)
        op, args = words[0], words[1:]
        fields: dict[str, Any] = {}
        if op == "start" and 2 <= len(args) <= 4:
            for name in args[:2]:
                if "\0" in name or _units(name) >= hv_ic.W_MAX_PATH:
                    raise _bad(f"a name is at most {hv_ic.W_MAX_PATH - 1} UTF-16 units")
            fields = {"file_name": args[0], "path_name": args[1],
                      "file_size": number(args[2], 64) if len(args) > 2 else 0,
                      "copy_flags": number(args[3], 32) if len(args) > 3 else 0}
        elif op == "write" and len(args) == 2:
            data = args[1].encode()
            if len(data) > hv_ic.DATA_FRAGMENT:
                raise _bad(f"a fragment carries at most {hv_ic.DATA_FRAGMENT} bytes")
            fields = {"offset": number(args[0], 64), "data": data}
        elif op not in ("complete", "cancel") or args:
            raise _bad("fcopy takes: start FILE PATH [SIZE [FLAGS]], write OFFSET TEXT, "
                       "complete, cancel")
        status = await ic.request(hv_ic.FCOPY_OPS[op], **fields)
        return tx.done({"op": op, **_status(status)})
    return Attribute("fcopy", lambda: tx.last, store)


def _skew_file(ic: TimesyncIc) -> Attribute:
    async def store(text: str) -> None:
        try:
            seconds = float(text.strip())
        except ValueError:
            raise _bad(f"not a number of seconds: {text.strip()!r}") from None
        if not math.isfinite(seconds) or abs(seconds) > MAX_SKEW_S:
            raise _bad(f"the skew is within ±{MAX_SKEW_S} s")
        await ic.set_skew(round(seconds * 1e9))
    return Attribute("timesync_skew", lambda: f"{ic.skew_ns / 1e9:.9f}\n", store)


def _version(v: tuple[int, int] | None) -> str | None:
    return None if v is None else f"{v[0]}.{v[1]}"


def _status_doc(ics: dict[str, IcDevice]) -> str:
    doc: dict[str, Any] = {}
    for name, ic in ics.items():
        entry: dict[str, Any] = {
            "state": ic.state,
            "framework": _version(ic.framework), "version": _version(ic.version),
            "requests": ic.requests, "failure": ic.failure}
        if isinstance(ic, HeartbeatIc):
            entry.update(acked=ic.heartbeats_acked, missed=ic.heartbeats_missed)
        elif isinstance(ic, TimesyncIc):
            entry.update(samples=ic.samples_sent, skew_ns=ic.skew_ns,
                         last_parent_time=ic.last_parent_time)
        elif isinstance(ic, KvpIc):
            entry["pushed"] = [{"pool": p, "key": k, **_status(s)} for p, k, s in ic.pushed]
        doc[name] = entry
    return _dump(doc)


def add_host_controls(d: Directory, ics: dict[str, IcDevice],
                      reaction: Callable[[str], str]) -> None:
    """The files for the services this machine has (the first device of each type);
    ``reaction(kind)`` says what the service will do once the guest accepts ``kind``."""
    for ic in ics.values():
        if isinstance(ic, ShutdownIc):
            d.add(_shutdown_file(ic, reaction))
        elif isinstance(ic, KvpIc):
            d.add(_kvp_file(ic))
        elif isinstance(ic, VssIc):
            d.add(_vss_file(ic))
        elif isinstance(ic, FcopyIc):
            d.add(_fcopy_file(ic))
        elif isinstance(ic, TimesyncIc):
            d.add(_skew_file(ic))
    d.add(Attribute("status", lambda: _status_doc(ics)))
