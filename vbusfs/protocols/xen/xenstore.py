"""The XenStore wire protocol (``xen/include/public/io/xs_wire.h``).

A message is a 16-byte ``xsd_sockmsg`` header (type, req_id, tx_id, len) followed by ``len``
bytes of payload, at most 4096, usually NUL-terminated strings. Errors travel as the errno
*name* (``"ENOENT\\0"``). A domain reaches xenstored through one shared page, the
``xenstore_domain_interface``: a 1024-byte request ring, a 1024-byte response ring, then the
four free-running u32 indices; see :mod:`vbusfs.platform.xen.xs_ring`.
"""

from __future__ import annotations

import enum
import errno
import struct

__all__ = [
    "XsType", "HEADER", "PAYLOAD_MAX", "RING_SIZE", "REQ_OFF", "RSP_OFF", "REQ_CONS",
    "REQ_PROD", "RSP_CONS", "RSP_PROD", "SERVER_FEATURES", "CONNECTION", "ERROR_FIELD",
    "EVTCHN_PORT", "ERRORS", "errno_name", "errno_of", "pack", "split_strings",
]


class XsType(enum.IntEnum):
    CONTROL = 0
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    RESET_WATCHES = 21
    DIRECTORY_PART = 22


HEADER = struct.Struct("<IIII")
PAYLOAD_MAX = 4096
RING_SIZE = 1024
REQ_OFF, RSP_OFF = 0, 1024
REQ_CONS, REQ_PROD, RSP_CONS, RSP_PROD = 2048, 2052, 2056, 2060
SERVER_FEATURES, CONNECTION, ERROR_FIELD, EVTCHN_PORT = 2064, 2068, 2072, 2076

#: xsd_errors[], in the header's order
ERRORS = ("EINVAL", "EACCES", "EEXIST", "EISDIR", "ENOENT", "ENOMEM", "ENOSPC", "EIO",
          "ENOTEMPTY", "ENOSYS", "EROFS", "EBUSY", "EAGAIN", "EISCONN", "E2BIG", "EPERM")


def errno_name(code: int) -> str:
    name = errno.errorcode.get(code, "EINVAL")
    return name if name in ERRORS else "EINVAL"


def errno_of(name: str) -> int:
    return int(getattr(errno, name, errno.EINVAL)) if name in ERRORS else errno.EINVAL


def pack(msg_type: int, req_id: int, tx_id: int, payload: bytes) -> bytes:
    if len(payload) > PAYLOAD_MAX:
        raise ValueError(f"xenstore payload of {len(payload)} bytes exceeds {PAYLOAD_MAX}")
    return HEADER.pack(msg_type, req_id, tx_id, len(payload)) + payload


def split_strings(payload: bytes) -> list[str]:
    """NUL-separated strings; a trailing NUL does not make an empty last string."""
    if payload.endswith(b"\0"):
        payload = payload[:-1]
    return [p.decode("utf-8", "replace") for p in payload.split(b"\0")] if payload else []
