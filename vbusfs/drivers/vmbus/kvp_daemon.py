"""The guest's ``hv_kvp_daemon`` (Linux ``tools/hv/hv_kvp_daemon.c``): five pool files and
the answers it gives the kernel (reference/hv-services.md §2.4).

The pools are the files ``/var/lib/hyperv/.kvp_pool_0`` … ``_4`` (directory 0755, files
0644), here ``MNT/var/lib/hyperv/``: 2560-byte records (``char key[512]`` + ``char
value[2048]``, UTF-8, NUL-terminated), back to back, no header. As the daemon does, every
operation first reads the file again (so what a user wrote is what the next request sees),
takes whole records only, and writes back the whole file (``fopen("w")`` + ``fwrite``), so a
trailing partial record disappears on the next write.

The daemon talks to the kernel through ``struct hv_kvp_msg`` (uapi ``linux/hyperv.h``): here,
:meth:`KvpDaemon.handle` takes that message as the kernel built it and changes it in place
the way the daemon's main loop does, byte for byte at the C offsets, because the kernel's
answer to the host reads fields the daemon may not have written (an empty value for GET, a
key that runs on into its value when it has no NUL). Strings are C strings: compared with
``memcmp`` over ``key_size`` bytes, copied with ``memcpy`` and ``strcpy``. Bytes the daemon
leaves uninitialised (the rest of a new record) are zeros here.

The AUTO pool is computed: the host's index 0..9 maps to the keys the daemon knows
(FullyQualifiedDomainName from ``gethostname`` + ``getaddrinfo``, the OS fields from
``uname`` and ``/etc/os-release`` of the machine this runs on, as the daemon running on it
would report). The emulated guest has no network interface (netvsc is not emulated), so the
address keys are empty.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from vbusfs.protocols.vmbus import hv_kvp
from vbusfs.protocols.vmbus.hv_ic import HV_E_FAIL, HV_GUID_NOTFOUND, HV_S_CONT, HV_S_OK
from vbusfs.protocols.vmbus.hv_kvp import (
    AUTO_POOL_KEYS,
    HV_DRV_VERSION,
    HV_KVP_EXCHANGE_MAX_KEY_SIZE,
    HV_KVP_EXCHANGE_MAX_VALUE_SIZE,
    KVP_POOL_COUNT,
    KVP_RECORD_SIZE,
    KvpOp,
    KvpPool,
)
from vbusfs.sysfs import DataFile, Directory

log = logging.getLogger(__name__)

__all__ = ["KvpDaemon", "OsIdentity", "os_identity", "resolve_fqdn", "POOL_DIR",
           "MAX_RECORDS"]

#: KVP_CONFIG_LOC, relative to the mount
POOL_DIR = "var/lib/hyperv"
#: how many records a pool file may hold here: it lives in the service's memory (2.5 MiB)
MAX_RECORDS = 1024

# offsets in struct hv_kvp_msg: the daemon's error overlays the header (a union)
_ERROR = 0
_SET_KEY_SIZE, _SET_VALUE_SIZE = hv_kvp.MSG_GS_KEY_SIZE, hv_kvp.MSG_GS_VALUE_SIZE
_SET_KEY, _SET_VALUE = hv_kvp.MSG_GS_KEY, hv_kvp.MSG_GS_VALUE
_ENUM_INDEX, _ENUM_KEY, _ENUM_VALUE = hv_kvp.ENUM_INDEX, hv_kvp.MSG_ENUM_KEY, hv_kvp.MSG_ENUM_VALUE
_DEL_KEY_SIZE, _DEL_KEY = hv_kvp.MSG_DELETE_KEY_SIZE, hv_kvp.MSG_DELETE_KEY


@dataclass(frozen=True)
class OsIdentity:
    """What ``kvp_get_os_info`` gathers once, when the daemon starts."""

    os_name: str
    os_major: str
    os_minor: str
    os_version: str          # uname release cut at its first '-'
    os_build: str            # uname release, whole
    processor_arch: str


def _os_release_value(raw: str) -> str:
    """The daemon's un-quoting: quotes and newlines dropped, a backslash keeps the next
    character."""
    out = []
    i = 0
    while i < len(raw):
        c = raw[i]
        if c == "\\":
            i += 1
            if i >= len(raw):
                break
            out.append(raw[i])
        elif c not in "'\"\n":
            out.append(c)
        i += 1
    return "".join(out)


def os_identity(os_release: Path = Path("/etc/os-release")) -> OsIdentity:
    """``kvp_get_os_info``: uname, then NAME and VERSION_ID of os-release if it exists."""
    uts = os.uname()
    name, major = uts.sysname, ""
    try:
        text = os_release.read_text(errors="replace")
    except OSError:
        text = None
    if text is not None:
        for line in text.splitlines(keepends=True):
            if line.startswith("#") or "=" not in line:
                continue
            key, _, raw = line.partition("=")
            if key == "NAME":
                name = _os_release_value(raw)
            elif key == "VERSION_ID":
                major = _os_release_value(raw)
    return OsIdentity(name, major, "", uts.release.split("-", 1)[0], uts.release, uts.machine)


#: getaddrinfo's EAI_AGAIN and EAI_SYSTEM (glibc's values)
EAI_AGAIN, EAI_SYSTEM = -3, -11


def getaddrinfo_failed(code: int, text: str) -> str:
    """The daemon's text when the lookup fails: ``"getaddrinfo failed: 0x%x %s"`` with the
    EAI code (printed as an unsigned int) and ``gai_strerror``."""
    return f"getaddrinfo failed: 0x{code & 0xFFFFFFFF:x} {text}"


def resolve_fqdn() -> str:
    """``kvp_get_domain_name``: the canonical name of ``gethostname()`` (IPv4 only), or the
    daemon's own error text. Blocking: call it from a thread."""
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET,
                                   socket.SOCK_STREAM, 0, socket.AI_CANONNAME)
    except socket.gaierror as e:
        return getaddrinfo_failed(e.errno if e.errno is not None else EAI_SYSTEM,
                                  e.strerror or "")
    except OSError as e:
        return getaddrinfo_failed(EAI_SYSTEM, e.strerror or "System error")
    return infos[0][3] if infos else getaddrinfo_failed(EAI_AGAIN, "no address")


def _cstr(mem: bytes | bytearray, off: int, limit: int | None = None) -> bytes:
    """The C string at ``off`` (up to its NUL, or the end of ``mem``)."""
    end = len(mem) if limit is None else min(len(mem), limit)
    nul = mem.find(b"\0", off, end)
    return bytes(mem[off:nul if nul >= 0 else end])


class KvpDaemon:
    """The daemon's state: the pools' bytes, its OS identity, the FQDN it last resolved."""

    def __init__(self, identity: OsIdentity, fqdn: str = "",
                 lic_version: str = HV_DRV_VERSION) -> None:
        self.identity = identity
        self.fqdn = fqdn
        self.lic_version = lic_version     # the version string the kernel registered
        self.pools = [bytearray() for _ in range(KVP_POOL_COUNT)]
        self.files: list[DataFile] = []
        self.transactions = 0

    def attach(self, root: Directory) -> None:
        """``kvp_file_init``: the directory and one file per pool, in the tree."""
        if self.files:
            return
        d = root.makedirs(POOL_DIR)
        for i, data in enumerate(self.pools):
            f = DataFile(f".kvp_pool_{i}", data, MAX_RECORDS * KVP_RECORD_SIZE)
            d.add(f)
            self.files.append(f)

    # -- the file, as kvp_update_mem_state / kvp_update_file see it ------------------------
    def _records(self, pool: int) -> bytearray:
        data = self.pools[pool]
        return bytearray(data[:len(data) // KVP_RECORD_SIZE * KVP_RECORD_SIZE])

    def _store(self, pool: int, records: bytearray) -> None:
        data = self.pools[pool]
        data[:] = records                   # in place: the DataFile shares this bytearray
        if self.files:
            self.files[pool].mtime_ns = time.time_ns()

    def _find(self, records: bytearray, key: bytes, key_size: int) -> int | None:
        want = key[:key_size].ljust(key_size, b"\0")
        for i in range(len(records) // KVP_RECORD_SIZE):
            if records[i * KVP_RECORD_SIZE:i * KVP_RECORD_SIZE + key_size] == want:
                return i
        return None

    # -- the daemon's operations -----------------------------------------------------------
    def add_or_modify(self, pool: int, key: bytes, key_size: int, value: bytes,
                      value_size: int) -> bool:
        """``kvp_key_add_or_modify``; False is its failure (the host sees HV_S_CONT)."""
        if key_size > HV_KVP_EXCHANGE_MAX_KEY_SIZE or value_size > HV_KVP_EXCHANGE_MAX_VALUE_SIZE:
            return False
        records = self._records(pool)
        i = self._find(records, key, key_size)
        if i is None:
            if len(records) // KVP_RECORD_SIZE >= MAX_RECORDS:
                return False                 # the daemon's realloc failing
            i = len(records) // KVP_RECORD_SIZE
            records.extend(bytes(KVP_RECORD_SIZE))
            base = i * KVP_RECORD_SIZE
            records[base:base + key_size] = key[:key_size].ljust(key_size, b"\0")
        base = i * KVP_RECORD_SIZE + HV_KVP_EXCHANGE_MAX_KEY_SIZE
        records[base:base + value_size] = value[:value_size].ljust(value_size, b"\0")
        self._store(pool, records)
        return True

    def get_value(self, pool: int, key: bytes, key_size: int, value_size: int
                  ) -> bytes | None:
        """``kvp_get_value``: the first ``value_size`` bytes of the value, None if absent."""
        if key_size > HV_KVP_EXCHANGE_MAX_KEY_SIZE or value_size > HV_KVP_EXCHANGE_MAX_VALUE_SIZE:
            return None
        records = self._records(pool)
        i = self._find(records, key, key_size)
        if i is None:
            return None
        base = i * KVP_RECORD_SIZE + HV_KVP_EXCHANGE_MAX_KEY_SIZE
        return bytes(records[base:base + max(value_size, 0)])

    def delete(self, pool: int, key: bytes, key_size: int) -> bool:
        """``kvp_key_delete``: the later records move up one, key and value each copied
        with ``strcpy`` (so a shorter string leaves the tail of the one it overwrote)."""
        records = self._records(pool)
        i = self._find(records, key, key_size)
        if i is None:
            return False
        n = len(records) // KVP_RECORD_SIZE
        for j in range(i, n - 1):
            for field in (0, HV_KVP_EXCHANGE_MAX_KEY_SIZE):
                _strcpy(records, j * KVP_RECORD_SIZE + field, (j + 1) * KVP_RECORD_SIZE + field)
        del records[(n - 1) * KVP_RECORD_SIZE:]
        self._store(pool, records)
        return True

    def enumerate(self, pool: int, index: int) -> tuple[bytes, bytes] | None:
        """``kvp_pool_enumerate``: record ``index`` whole (key field, value field)."""
        records = self._records(pool)
        if index >= len(records) // KVP_RECORD_SIZE:
            return None
        base = index * KVP_RECORD_SIZE
        return (bytes(records[base:base + HV_KVP_EXCHANGE_MAX_KEY_SIZE]),
                bytes(records[base + HV_KVP_EXCHANGE_MAX_KEY_SIZE:base + KVP_RECORD_SIZE]))

    def _auto(self, index: int) -> tuple[str, str] | None:
        """The AUTO pool's key and value for ``index`` (the daemon's switch)."""
        ident = self.identity
        values = [self.fqdn, self.lic_version, "", "", ident.os_build, ident.os_name,
                  ident.os_major, ident.os_minor, ident.os_version, ident.processor_arch]
        if not 0 <= index < len(values):
            return None
        return AUTO_POOL_KEYS[index], values[index]

    # -- one request from the kernel -------------------------------------------------------
    def handle(self, msg: bytearray) -> int | None:
        """The daemon's main loop for one ``struct hv_kvp_msg`` (changed in place); returns
        the error it sets, or None where the real daemon would index past its pools (a pool
        number of 5 or more: undefined behaviour in C)."""
        self.transactions += 1
        op, pool = msg[0], msg[1]
        struct.pack_into("<I", msg, _ERROR, HV_S_OK)
        error = HV_S_OK
        if op == KvpOp.GET_IP_INFO:
            return HV_E_FAIL                 # no interface has the host's MAC address
        if op == KvpOp.SET_IP_INFO:
            return HV_GUID_NOTFOUND          # no interface has the host's adapter GUID
        if op in (KvpOp.SET, KvpOp.GET, KvpOp.DELETE, KvpOp.ENUMERATE) and \
                pool >= KVP_POOL_COUNT:
            return None
        if op == KvpOp.SET:
            key_size, value_size = struct.unpack_from("<ii", msg, _SET_KEY_SIZE)
            if not self.add_or_modify(pool, bytes(msg[_SET_KEY:_SET_KEY + max(key_size, 0)]),
                                      key_size, bytes(msg[_SET_VALUE:_SET_VALUE +
                                                          max(value_size, 0)]), value_size):
                error = HV_S_CONT
        elif op == KvpOp.GET:
            key_size, value_size = struct.unpack_from("<ii", msg, _SET_KEY_SIZE)
            value = self.get_value(pool, bytes(msg[_SET_KEY:_SET_KEY + max(key_size, 0)]),
                                   key_size, value_size)
            if value is None:
                error = HV_S_CONT
            else:
                msg[_SET_VALUE:_SET_VALUE + len(value)] = value
        elif op == KvpOp.DELETE:
            (key_size,) = struct.unpack_from("<i", msg, _DEL_KEY_SIZE)
            if not self.delete(pool, bytes(msg[_DEL_KEY:_DEL_KEY + max(key_size, 0)]),
                               key_size):
                error = HV_S_CONT
        if op != KvpOp.ENUMERATE:
            struct.pack_into("<I", msg, _ERROR, error)
            return error
        (index,) = struct.unpack_from("<i", msg, _ENUM_INDEX)
        if pool != KvpPool.AUTO:
            # the daemon compares a signed index; a negative one would read before its
            # records, so it is treated as past the end
            found = self.enumerate(pool, index) if index >= 0 else None
            if found is None:
                error = HV_S_CONT
            else:
                key, value = found
                msg[_ENUM_KEY:_ENUM_KEY + len(key)] = key
                msg[_ENUM_VALUE:_ENUM_VALUE + len(value)] = value
        else:
            auto = self._auto(index)
            if auto is None:
                error = HV_S_CONT
            else:
                key_s, value_s = auto
                _put_cstr(msg, _ENUM_KEY, key_s.encode(), HV_KVP_EXCHANGE_MAX_KEY_SIZE)
                # the address keys write nothing when no interface has an address
                if key_s not in ("NetworkAddressIPv4", "NetworkAddressIPv6"):
                    _put_cstr(msg, _ENUM_VALUE, value_s.encode(),
                              HV_KVP_EXCHANGE_MAX_VALUE_SIZE)
        struct.pack_into("<I", msg, _ERROR, error)
        return error


def _strcpy(mem: bytearray, dst: int, src: int) -> None:
    """C ``strcpy`` within one buffer; a source without a NUL stops at the buffer's end."""
    s = _cstr(mem, src)
    end = min(len(mem), dst + len(s) + 1)
    mem[dst:end] = (s + b"\0")[:end - dst]


def _put_cstr(mem: bytearray, off: int, s: bytes, room: int) -> None:
    data = s[:room - 1] + b"\0"
    mem[off:off + len(data)] = data
