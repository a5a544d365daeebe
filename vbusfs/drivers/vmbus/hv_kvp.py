"""The KVP service of ``hv_utils`` (Linux ``drivers/hv/hv_kvp.c``), with ``hv_kvp_daemon``
registered (reference/hv-services.md §2.4).

For each KVPEXCHANGE request the kernel builds the daemon's ``struct hv_kvp_msg``
(``kvp_send_key``: keys and string values converted from UTF-16 with
:func:`~vbusfs.protocols.vmbus.hv_kvp.utf16s_to_utf8s`, REG_U32/REG_U64 values printed with
``%u``/``%llu``, any other value type left unconverted), the daemon
(:class:`~vbusfs.drivers.vmbus.kvp_daemon.KvpDaemon`) answers, and ``kvp_respond_to_host``
writes the answer into the received buffer: only the status for SET/DELETE/IP info and for
any error; the value (read at the ENUMERATE offset, as Linux does) for GET; key and value for
ENUMERATE and for operations the kernel does not know, always as REG_SZ, converted back with
:func:`~vbusfs.protocols.vmbus.hv_kvp.utf8s_to_utf16s` (a conversion failure is HV_E_FAIL).
The receive buffer is 16 KiB; a message shorter than a field reads zeros there (Linux reads
what its buffer last held).
"""

from __future__ import annotations

import logging
import struct

import trio

from vbusfs.drivers.vmbus.kvp_daemon import EAI_AGAIN, KvpDaemon, getaddrinfo_failed
from vbusfs.drivers.vmbus.util_service import HvUtilsPlatform, UtilService
from vbusfs.platform.memory import PAGE_SIZE
from vbusfs.protocols.vmbus import hv_ic, hv_kvp
from vbusfs.protocols.vmbus.hv_kvp import (
    HV_KVP_EXCHANGE_MAX_KEY_SIZE,
    HV_KVP_EXCHANGE_MAX_VALUE_SIZE,
    KVP_MSG_STRUCT_SIZE,
    REG_SZ,
    REG_U32,
    REG_U64,
    KvpOp,
    utf8s_to_utf16s,
    utf16s_to_utf8s,
)
from vbusfs.sysfs import Attr

log = logging.getLogger("vbusfs.drivers.vmbus.hv_utils")

__all__ = ["KvpService", "FQDN_TIMEOUT"]

#: how long the daemon's host-name lookup may take before it reports its failure text
FQDN_TIMEOUT = 5.0
_RECV_BUFFER = 4 * PAGE_SIZE        # HV_HYP_PAGE_SIZE * 4, also the channel's max_pkt_size
_BODY = hv_ic.ICMSG_HDR             # where struct hv_kvp_msg starts in the payload
# offsets in struct hv_kvp_msg: GET/SET value, ENUMERATE index and value, DELETE key
_GS_TYPE, _GS_KEY_SIZE, _GS_VALUE_SIZE = (hv_kvp.MSG_GS_VALUE_TYPE, hv_kvp.MSG_GS_KEY_SIZE,
                                          hv_kvp.MSG_GS_VALUE_SIZE)
_GS_KEY, _GS_VALUE = hv_kvp.MSG_GS_KEY, hv_kvp.MSG_GS_VALUE
_EN_INDEX, _EN_DATA = hv_kvp.ENUM_INDEX, hv_kvp.ENUM_DATA
_EN_KEY, _EN_VALUE = hv_kvp.MSG_ENUM_KEY, hv_kvp.MSG_ENUM_VALUE
_DEL_KEY_SIZE, _DEL_KEY = hv_kvp.MSG_DELETE_KEY_SIZE, hv_kvp.MSG_DELETE_KEY


def _put(buf: bytearray, off: int, data: bytes) -> None:
    """Write into the reply; what falls past the request's length is not sent."""
    if off < len(buf):
        buf[off:off + len(data)] = data[:len(buf) - off]


def _cstr(mem: bytes | bytearray, off: int) -> bytes:
    nul = mem.find(b"\0", off)
    return bytes(mem[off:nul if nul >= 0 else len(mem)])


class KvpService(UtilService):
    label = "KVP"
    msgtype = hv_ic.ICMSGTYPE_KVPEXCHANGE
    recv_limit = _RECV_BUFFER
    reply_to_wrong_type = False

    def __init__(self, service: str, platform: HvUtilsPlatform) -> None:
        super().__init__(service, platform)
        self.daemon: KvpDaemon | None = None
        self.last_operation: int | None = None

    async def start(self) -> None:
        """The daemon, started with the device: its OS identity, its host name and its
        pool files (``kvp_get_os_info``, ``kvp_file_init``)."""
        if self.daemon is not None:
            return
        if self.platform.lookups_in_thread:
            identity = await trio.to_thread.run_sync(self.platform.os_identity)
        else:
            identity = self.platform.os_identity()
        self.daemon = KvpDaemon(identity)
        await self._resolve()
        if self.platform.root is not None:
            self.daemon.attach(self.platform.root)

    async def _resolve(self) -> None:
        assert self.daemon is not None
        if not self.platform.lookups_in_thread:
            self.daemon.fqdn = self.platform.fqdn()
            return
        with trio.move_on_after(FQDN_TIMEOUT):
            self.daemon.fqdn = await trio.to_thread.run_sync(self.platform.fqdn,
                                                             abandon_on_cancel=True)
            return
        self.daemon.fqdn = getaddrinfo_failed(EAI_AGAIN, "Temporary failure in name "
                                              "resolution")

    def handle(self, buf: bytearray) -> bytearray | None:
        assert self.daemon is not None, "the KVP daemon starts before the channel opens"
        # the host's message as the kernel's 16 KiB receive buffer holds it
        inmsg = bytes(buf[_BODY:]).ljust(_RECV_BUFFER - _BODY, b"\0")
        op, pool = inmsg[0], inmsg[1]
        self.requests += 1
        self.last_operation = op
        message = self._send_key(inmsg)
        error = self.daemon.handle(message)
        if error is None:
            log.warning("KVP: pool %d does not exist: hv_kvp_daemon would index past its "
                        "pools; answered HV_E_FAIL as the kernel does for a daemon that "
                        "does not answer", pool)
            error = hv_ic.HV_E_FAIL
        return self._respond(buf, op, message, error)

    def _send_key(self, inmsg: bytes) -> bytearray:
        """``kvp_send_key``: the daemon's message, from a zeroed one."""
        message = bytearray(KVP_MSG_STRUCT_SIZE)
        op = message[0] = inmsg[0]
        message[1] = inmsg[1]

        def key_into(size_off: int, key_off: int, in_size_off: int, in_key_off: int) -> None:
            (inlen,) = struct.unpack_from("<i", inmsg, in_size_off)
            key = utf16s_to_utf8s(inmsg[in_key_off:], inlen, HV_KVP_EXCHANGE_MAX_KEY_SIZE - 1)
            struct.pack_into("<I", message, size_off, len(key) + 1)
            message[key_off:key_off + len(key)] = key

        if op == KvpOp.SET:
            vtype, _, inlen = struct.unpack_from("<IIi", inmsg, _GS_TYPE)
            value: bytes | None = None
            if vtype == REG_SZ:
                value = utf16s_to_utf8s(inmsg[_GS_VALUE:], inlen,
                                        HV_KVP_EXCHANGE_MAX_VALUE_SIZE - 1)
            elif vtype == REG_U32:
                value = str(struct.unpack_from("<I", inmsg, _GS_VALUE)[0]).encode()
            elif vtype == REG_U64:
                value = str(struct.unpack_from("<Q", inmsg, _GS_VALUE)[0]).encode()
            # any other type (REG_QWORD 11 included) is not converted: value_size stays 0
            if value is not None:
                struct.pack_into("<I", message, _GS_VALUE_SIZE, len(value) + 1)
                message[_GS_VALUE:_GS_VALUE + len(value)] = value
            key_into(_GS_KEY_SIZE, _GS_KEY, _GS_KEY_SIZE, _GS_KEY)
        elif op == KvpOp.GET:
            key_into(_GS_KEY_SIZE, _GS_KEY, _GS_KEY_SIZE, _GS_KEY)
        elif op == KvpOp.DELETE:
            key_into(_DEL_KEY_SIZE, _DEL_KEY, _DEL_KEY_SIZE, _DEL_KEY)
        elif op == KvpOp.ENUMERATE:
            message[_EN_INDEX:_EN_INDEX + 4] = inmsg[_EN_INDEX:_EN_INDEX + 4]
        # GET_IP_INFO/SET_IP_INFO carry the adapter to the daemon, whose answer here does not
        # depend on it (the guest has no network interface)
        return message

    def _respond(self, buf: bytearray, op: int, message: bytearray,
                 error: int) -> bytearray:
        """``kvp_respond_to_host``."""
        struct.pack_into("<I", buf, hv_ic.HDR_STATUS, error)
        if error or op in (KvpOp.GET_IP_INFO, KvpOp.SET_IP_INFO, KvpOp.SET, KvpOp.DELETE):
            return self.reply(buf)
        keylen = 0
        if op == KvpOp.GET:
            data = _BODY + _GS_TYPE
        else:
            data = _BODY + _EN_DATA
            key, keylen = utf8s_to_utf16s(_cstr(message, _EN_KEY),
                                          HV_KVP_EXCHANGE_MAX_KEY_SIZE // 2 - 2)
            _put(buf, data + 12, key)
            _put(buf, data + 4, struct.pack("<I", (2 * (keylen + 1)) & 0xFFFFFFFF))
        # the value comes from the ENUMERATE offset for GET too (Linux's ``copy_value``)
        value, valuelen = utf8s_to_utf16s(_cstr(message, _EN_VALUE),
                                          HV_KVP_EXCHANGE_MAX_VALUE_SIZE // 2 - 2)
        _put(buf, data + 12 + HV_KVP_EXCHANGE_MAX_KEY_SIZE, value)
        _put(buf, data + 8, struct.pack("<I", (2 * (valuelen + 1)) & 0xFFFFFFFF))
        if keylen < 0 or valuelen < 0:
            struct.pack_into("<I", buf, hv_ic.HDR_STATUS, hv_ic.HV_E_FAIL)
        _put(buf, data, struct.pack("<I", REG_SZ))
        return self.reply(buf)

    def status_attrs(self) -> list[Attr[UtilService]]:
        return [Attr("last_operation", lambda s: _op_text(s))]


def _op_text(s: UtilService) -> str:
    assert isinstance(s, KvpService)
    if s.last_operation is None:
        return "none\n"
    try:
        return KvpOp(s.last_operation).name.lower() + "\n"
    except ValueError:
        return f"{s.last_operation}\n"
