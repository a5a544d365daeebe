"""KVP (data exchange) messages, the pool records ``hv_kvp_daemon`` stores, and the
string conversions Linux applies between them (reference/hv-services.md §2.4).

The message is ``struct hv_kvp_msg`` of uapi ``linux/hyperv.h`` placed at payload offset 28
(the layouts are checked against that header by tests/test_hv_ic_layout.py); offsets below
are relative to the start of the message. Strings on the wire are UTF-16LE and their sizes
count bytes including the terminating NUL; in the pools they are UTF-8, in 512 + 2048-byte
records (``struct kvp_record`` of ``tools/hv/hv_kvp_daemon.c``).

:func:`utf16s_to_utf8s` and :func:`utf8s_to_utf16s` follow Linux ``fs/nls/nls_base.c``
exactly (what is skipped, where they stop, when they fail), because the guest's answers
depend on it.
"""

from __future__ import annotations

import enum
import struct

from vbusfs.protocols.vmbus.hv_ic import ICMSG_HDR, ICMSGTYPE_KVPEXCHANGE, ic_message

__all__ = [
    "HV_KVP_EXCHANGE_MAX_KEY_SIZE", "HV_KVP_EXCHANGE_MAX_VALUE_SIZE", "KvpOp", "KvpPool",
    "KVP_POOL_COUNT", "REG_SZ", "REG_EXPAND_SZ", "REG_U32", "REG_U64", "REG_QWORD",
    "KVP_HDR", "EXCHG_VALUE", "GETSET_DATA", "ENUM_INDEX", "ENUM_DATA", "DELETE_MSG",
    "MSG_GS_VALUE_TYPE", "MSG_GS_KEY_SIZE", "MSG_GS_VALUE_SIZE", "MSG_GS_KEY", "MSG_GS_VALUE",
    "MSG_ENUM_KEY_SIZE", "MSG_ENUM_VALUE_SIZE", "MSG_ENUM_KEY", "MSG_ENUM_VALUE",
    "MSG_DELETE_KEY_SIZE", "MSG_DELETE_KEY", "KVP_MSG_STRUCT_SIZE",
    "KVP_MSG_SIZE", "IP_MSG_SIZE", "IP_ADAPTER_ID", "KVP_RECORD_SIZE", "RECORD_KEY",
    "RECORD_VALUE", "KVP_OP_REGISTER1", "HV_DRV_VERSION", "AUTO_POOL_KEYS",
    "utf16s_to_utf8s", "utf8s_to_utf16s", "kvp_request", "encode_utf16z", "parse_utf16z",
]

#: sizes in bytes, NUL included (uapi linux/hyperv.h)
HV_KVP_EXCHANGE_MAX_KEY_SIZE = 512
HV_KVP_EXCHANGE_MAX_VALUE_SIZE = 2048


class KvpOp(enum.IntEnum):
    """``enum hv_kvp_exchg_op``."""

    GET = 0
    SET = 1
    DELETE = 2
    ENUMERATE = 3
    GET_IP_INFO = 4
    SET_IP_INFO = 5


class KvpPool(enum.IntEnum):
    """``enum hv_kvp_exchg_pool``; the daemon keeps one file per pool."""

    EXTERNAL = 0
    GUEST = 1
    AUTO = 2
    AUTO_EXTERNAL = 3
    AUTO_INTERNAL = 4


KVP_POOL_COUNT = 5
# value types: Linux's REG_SZ/REG_U32/REG_U64; Windows and openvmm also use REG_EXPAND_SZ and
# REG_QWORD (11), which Linux's conversion switch does not know (reference §2.4)
REG_SZ = 1
REG_EXPAND_SZ = 2
REG_U32 = 4
REG_U64 = 8
REG_QWORD = 11

#: struct hv_kvp_hdr: operation, pool, pad
KVP_HDR = struct.Struct("<BBH")
#: struct hv_kvp_exchg_msg_value: value_type, key_size, value_size, key[512], value[2048]
EXCHG_VALUE = struct.Struct(f"<III{HV_KVP_EXCHANGE_MAX_KEY_SIZE}s"
                            f"{HV_KVP_EXCHANGE_MAX_VALUE_SIZE}s")
#: message offsets (from the start of hv_kvp_msg) of the GET/SET value, ENUMERATE's index
#: and value, and DELETE's key_size/key
GETSET_DATA = KVP_HDR.size
ENUM_INDEX = KVP_HDR.size
ENUM_DATA = KVP_HDR.size + 4
DELETE_MSG = struct.Struct(f"<I{HV_KVP_EXCHANGE_MAX_KEY_SIZE}s")
# the same fields one by one (hv_kvp_exchg_msg_value: value_type, key_size, value_size, key,
# value)
MSG_GS_VALUE_TYPE = GETSET_DATA
MSG_GS_KEY_SIZE = GETSET_DATA + 4
MSG_GS_VALUE_SIZE = GETSET_DATA + 8
MSG_GS_KEY = GETSET_DATA + 12
MSG_GS_VALUE = GETSET_DATA + 12 + HV_KVP_EXCHANGE_MAX_KEY_SIZE
MSG_ENUM_KEY_SIZE = ENUM_DATA + 4
MSG_ENUM_VALUE_SIZE = ENUM_DATA + 8
MSG_ENUM_KEY = ENUM_DATA + 12
MSG_ENUM_VALUE = ENUM_DATA + 12 + HV_KVP_EXCHANGE_MAX_KEY_SIZE
MSG_DELETE_KEY_SIZE = KVP_HDR.size
MSG_DELETE_KEY = KVP_HDR.size + 4
#: sizeof(struct hv_kvp_msg): the header and the body union, whose largest member is
#: hv_kvp_ipaddr_value (7426 bytes) but which hv_kvp_msg_delete (a u32 first, not packed)
#: aligns to 4: 7428
KVP_MSG_STRUCT_SIZE = KVP_HDR.size + 7428
#: the body openvmm sends for GET/SET/DELETE/ENUMERATE (header + 2578, O-ic KvpMessage)
KVP_MSG_SIZE = 2580
#: struct hv_kvp_ip_msg (no pad: adapter_id follows operation and pool)
IP_ADAPTER_ID = 2
IP_MSG_SIZE = 2 + 256 + 1 + 1 + 2048 + 2048 + 1024 + 2048
#: the daemon's registration opcode and the version string the kernel answers it with
KVP_OP_REGISTER1 = 100
HV_DRV_VERSION = "3.1"

#: ``struct kvp_record`` of hv_kvp_daemon.c: key then value, back to back, no header
RECORD_KEY = HV_KVP_EXCHANGE_MAX_KEY_SIZE
RECORD_VALUE = HV_KVP_EXCHANGE_MAX_VALUE_SIZE
KVP_RECORD_SIZE = RECORD_KEY + RECORD_VALUE

#: the AUTO pool's index → key, as the daemon (and the uapi header's comment) map them
AUTO_POOL_KEYS = ("FullyQualifiedDomainName", "IntegrationServicesVersion",
                  "NetworkAddressIPv4", "NetworkAddressIPv6", "OSBuildNumber", "OSName",
                  "OSMajorVersion", "OSMinorVersion", "OSVersion", "ProcessorArchitecture")

_SURROGATE_MASK = 0xFFFFF800
_SURROGATE_PAIR = 0x0000D800
_SURROGATE_LOW = 0x00000400
_SURROGATE_BITS = 0x000003FF
_PLANE_SIZE = 0x00010000
_UNICODE_MAX = 0x0010FFFF
_EINVAL = 22


def _utf8_len(u: int) -> int:
    return 1 if u <= 0x7F else 2 if u <= 0x7FF else 3 if u <= 0xFFFF else 4


def utf16s_to_utf8s(src: bytes | bytearray | memoryview, inlen: int, maxout: int) -> bytes:
    """Linux ``utf16s_to_utf8s(src, inlen, UTF16_LITTLE_ENDIAN, out, maxout)``: convert at
    most ``inlen`` UTF-16 units (the kernel passes the *byte* size the host sent, so it may
    read twice as far), stopping at a NUL unit or the end of ``src`` (the rest of the
    buffer reads as zeros); unpaired surrogates and characters that no longer fit in
    ``maxout`` bytes are skipped, not errors."""
    out = bytearray()
    n = len(src) // 2
    i = 0
    while inlen > 0 and maxout > 0:
        u = struct.unpack_from("<H", src, 2 * i)[0] if i < n else 0
        if not u:
            break
        i += 1
        inlen -= 1
        if u > 0x7F:
            if u & _SURROGATE_MASK == _SURROGATE_PAIR:
                if u & _SURROGATE_LOW:
                    continue                 # a lone low surrogate: ignored
                if inlen <= 0:
                    break
                v = struct.unpack_from("<H", src, 2 * i)[0] if i < n else 0
                if v & _SURROGATE_MASK != _SURROGATE_PAIR or not v & _SURROGATE_LOW:
                    continue                 # a high surrogate without its low half
                u = _PLANE_SIZE + ((u & _SURROGATE_BITS) << 10) + (v & _SURROGATE_BITS)
                i += 1
                inlen -= 1
            size = _utf8_len(u)
            if size > maxout:
                continue                     # utf32_to_utf8 returns -1: skipped
            out += chr(u).encode("utf-8")
            maxout -= size
        else:
            out.append(u)
            maxout -= 1
    return bytes(out)


def utf8s_to_utf16s(s: bytes, maxout: int) -> tuple[bytes, int]:
    """Linux ``utf8s_to_utf16s(s, strlen(s), UTF16_HOST_ENDIAN, out, maxout)`` on a
    little-endian host: (the UTF-16LE units written, their count), or the units written so
    far and ``-EINVAL`` when it reaches a sequence that is not UTF-8 (overlong forms,
    surrogates and code points past U+10FFFF included) while ``maxout`` still has room."""
    nul = s.find(b"\0")
    if nul >= 0:
        s = s[:nul]
    try:
        text, bad = s.decode("utf-8"), False
    except UnicodeDecodeError as e:
        text, bad = s[:e.start].decode("utf-8"), True
    out = bytearray()
    units = 0
    for ch in text:
        if maxout <= 0:
            return bytes(out), units
        if ord(ch) >= _PLANE_SIZE:
            if maxout < 2:
                return bytes(out), units
            maxout -= 2
            units += 2
        else:
            maxout -= 1
            units += 1
        out += ch.encode("utf-16-le")
    if bad and maxout > 0:
        return bytes(out), -_EINVAL
    return bytes(out), units


def encode_utf16z(text: str, max_bytes: int) -> bytes:
    """``text`` as a NUL-terminated UTF-16LE string of at most ``max_bytes`` bytes (what
    openvmm's ``write_str`` produces); ValueError if it does not fit or holds a NUL."""
    if "\0" in text:
        raise ValueError("a KVP string cannot contain NUL")
    data = text.encode("utf-16-le", "surrogatepass") + b"\0\0"
    if len(data) > max_bytes:
        raise ValueError(f"longer than {max_bytes // 2 - 1} UTF-16 units")
    return data


def parse_utf16z(field: bytes | bytearray | memoryview, size: int) -> str:
    """A string the guest answered with, checked as openvmm's ``parse_str`` checks it: an
    even size within the field, a NUL as the last unit, valid UTF-16; ValueError if not."""
    if size % 2 or size > len(field) or size == 0:
        raise ValueError(f"impossible string size {size}")
    data = bytes(field[:size])
    if data[-2:] != b"\0\0":
        raise ValueError("string without its terminating NUL")
    try:
        return data[:-2].decode("utf-16-le")
    except UnicodeDecodeError:
        raise ValueError("not valid UTF-16") from None


def kvp_request(op: int, pool: int, frame: tuple[int, int], msg: tuple[int, int], *,
                key: str = "", value: str | int = "", value_type: int = REG_SZ,
                index: int = 0) -> bytes:
    """A host request with openvmm's message size (2580 bytes after the IC header, §2.4):
    SET with a string, DWORD or QWORD value, GET and DELETE with a key, ENUMERATE with an
    index and a zeroed value."""
    body = bytearray(KVP_MSG_SIZE)
    KVP_HDR.pack_into(body, 0, op, pool, 0)
    if op == KvpOp.ENUMERATE:
        struct.pack_into("<I", body, ENUM_INDEX, index)
    elif op == KvpOp.DELETE:
        k = encode_utf16z(key, HV_KVP_EXCHANGE_MAX_KEY_SIZE)
        DELETE_MSG.pack_into(body, KVP_HDR.size, len(k), k)
    else:
        k = encode_utf16z(key, HV_KVP_EXCHANGE_MAX_KEY_SIZE)
        if isinstance(value, int):
            width = 4 if value_type == REG_U32 else 8
            v = value.to_bytes(width, "little")
        else:
            v = encode_utf16z(value, HV_KVP_EXCHANGE_MAX_VALUE_SIZE)
        size = len(v) if op == KvpOp.SET else 0
        EXCHG_VALUE.pack_into(body, GETSET_DATA, value_type if op == KvpOp.SET else 0, len(k),
                              size, k, v if op == KvpOp.SET else b"")
    return ic_message(ICMSGTYPE_KVPEXCHANGE, bytes(body), frame, msg)


assert EXCHG_VALUE.size == 12 + KVP_RECORD_SIZE
assert ICMSG_HDR + ENUM_DATA + EXCHG_VALUE.size == ICMSG_HDR + KVP_MSG_SIZE
