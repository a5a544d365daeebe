"""The guest's xenstore client (Linux ``xenbus_xs.c``): requests and watch events over the
``xenstore_domain_interface`` page and its event channel.

Requests may be issued concurrently; each carries its own ``req_id`` and waits for the reply
with that id. A message is written to the request ring whole (waiting for room if needed).
Watch events are delivered to a memory channel per watch. Errors come back as
``OSError(errno)`` from the name xenstored sent.
"""

from __future__ import annotations

import errno
import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from vbusfs.platform.memory import GuestMemory
from vbusfs.platform.xen.event_channel import EventChannels
from vbusfs.platform.xen.xs_ring import RingIndexError, request_ring, response_ring
from vbusfs.protocols.xen import xenstore as xs

__all__ = ["XenstoreClient", "XsTransaction"]

log = logging.getLogger(__name__)


class _Pending:
    __slots__ = ("done", "msg_type", "payload")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.msg_type = 0
        self.payload = b""


class XenstoreClient:
    def __init__(self, memory: GuestMemory, evtchn: EventChannels, domid: int, page_pfn: int,
                 port: int) -> None:
        self.evtchn = evtchn
        self.domid = domid
        self.port = port
        page = memory.view(page_pfn)
        self.req = request_ring(page)
        self.rsp = response_ring(page)
        self._next_id = 1
        self._pending: dict[int, _Pending] = {}
        self._write_lock = trio.Lock()
        self._space = trio.Event()
        self._inbuf = bytearray()
        self._watches: dict[str, trio.MemorySendChannel[str]] = {}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        bell = self.evtchn.get(self.domid, self.port).bell
        task_status.started()
        while True:
            await bell.wait()
            self._space.set()
            self._space = trio.Event()
            self._drain()

    def _drain(self) -> None:
        try:
            n = self.rsp.readable()
        except RingIndexError as e:               # xb_read: reset the indices, -EIO
            self.rsp.consume_all()
            self._broken(str(e))
            return
        if not n:
            return
        self._inbuf += self.rsp.read(n)
        self.evtchn.send(self.domid, self.port)   # room in the response ring
        while len(self._inbuf) >= xs.HEADER.size:
            msg_type, req_id, _tx, length = xs.HEADER.unpack_from(self._inbuf)
            if length > xs.PAYLOAD_MAX:             # process_msg: -EINVAL
                self._broken(f"a reply header claims {length} bytes")
                return
            end = xs.HEADER.size + length
            if len(self._inbuf) < end:
                break
            payload = bytes(self._inbuf[xs.HEADER.size:end])
            del self._inbuf[:end]
            if msg_type == xs.XsType.WATCH_EVENT:
                parts = xs.split_strings(payload)
                if len(parts) >= 2 and parts[1] in self._watches:
                    self._watches[parts[1]].send_nowait(parts[0])
                continue
            waiter = self._pending.pop(req_id, None)
            if waiter is not None:
                waiter.msg_type, waiter.payload = msg_type, payload
                waiter.done.set()

    def _broken(self, why: str) -> None:
        """The host sent what no xenstored may: what is buffered cannot be framed any more,
        so it is dropped and every request waiting for an answer fails with ``EIO`` (as
        Linux's xenbus reports a read error); later requests start on a clean stream."""
        log.warning("xenstore: the host broke the protocol (%s); %d pending request(s) "
                    "fail with EIO", why, len(self._pending))
        self._inbuf.clear()
        pending, self._pending = self._pending, {}
        for waiter in pending.values():
            waiter.msg_type, waiter.payload = xs.XsType.ERROR, b"EIO\0"
            waiter.done.set()

    async def request(self, msg_type: xs.XsType, payload: bytes, tx_id: int = 0) -> bytes:
        req_id = self._next_id
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF or 1
        waiter = _Pending()
        self._pending[req_id] = waiter
        msg = memoryview(xs.pack(msg_type, req_id, tx_id, payload))
        async with self._write_lock:
            while msg:
                try:
                    n = self.req.write(msg)
                except RingIndexError as e:
                    self._pending.pop(req_id, None)
                    raise OSError(errno.EIO, f"xenstore {msg_type.name}: {e}") from None
                msg = msg[n:]
                self.evtchn.send(self.domid, self.port)
                if msg:
                    await self._space.wait()
        await waiter.done.wait()
        if waiter.msg_type == xs.XsType.ERROR:
            name = xs.split_strings(waiter.payload)[0] if waiter.payload else "EIO"
            code = xs.errno_of(name)
            raise OSError(code, f"xenstore {msg_type.name}: {name}")
        if waiter.msg_type != msg_type:               # xs_talkv: "unexpected type"
            log.warning("xenstore: the host broke the protocol (a reply of type %d to a "
                        "%s request); the request fails with EINVAL", waiter.msg_type,
                        msg_type.name)
            raise OSError(errno.EINVAL, f"xenstore {msg_type.name}: a reply of type "
                                        f"{waiter.msg_type}")
        return waiter.payload

    # -- the xenbus_* helpers --------------------------------------------------------------
    async def read(self, path: str, tx_id: int = 0) -> str:
        data = await self.request(xs.XsType.READ, path.encode() + b"\0", tx_id)
        return data.decode("utf-8", "replace")

    async def read_or(self, path: str, default: str) -> str:
        try:
            return await self.read(path)
        except FileNotFoundError:
            return default

    async def read_int(self, path: str, default: int | None = None) -> int:
        """``xenbus_scanf(..., "%u")``: EINVAL if the value is not a number."""
        try:
            text = await self.read(path)
        except FileNotFoundError:
            if default is None:
                raise
            return default
        try:
            return int(text.strip(), 0 if text.strip().startswith("0x") else 10)
        except ValueError:
            raise OSError(errno.EINVAL, f"{path}: {text!r} is not a number") from None

    async def write(self, path: str, value: str, tx_id: int = 0) -> None:
        await self.request(xs.XsType.WRITE, path.encode() + b"\0" + value.encode(), tx_id)

    async def rm(self, path: str, tx_id: int = 0) -> None:
        await self.request(xs.XsType.RM, path.encode() + b"\0", tx_id)

    async def directory(self, path: str, tx_id: int = 0) -> list[str]:
        return xs.split_strings(await self.request(xs.XsType.DIRECTORY,
                                                   path.encode() + b"\0", tx_id))

    async def exists(self, path: str) -> bool:
        try:
            await self.read(path)
        except FileNotFoundError:
            return False
        return True

    async def watch(self, path: str, token: str) -> trio.MemoryReceiveChannel[str]:
        """Register a watch; the returned channel yields changed paths (first: ``path``)."""
        send, recv = trio.open_memory_channel[str](math.inf)
        self._watches[token] = send
        try:
            await self.request(xs.XsType.WATCH, path.encode() + b"\0" + token.encode() + b"\0")
        except BaseException:
            del self._watches[token]
            raise
        return recv

    async def unwatch(self, path: str, token: str) -> None:
        send = self._watches.pop(token, None)
        if send is not None:
            send.close()
        await self.request(xs.XsType.UNWATCH, path.encode() + b"\0" + token.encode() + b"\0")

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[XsTransaction]:
        """One transaction attempt; commits on exit, raises EAGAIN on conflict."""
        tx_id = int(xs.split_strings(await self.request(xs.XsType.TRANSACTION_START,
                                                        b"\0"))[0])
        tx = XsTransaction(self, tx_id)
        try:
            yield tx
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.request(xs.XsType.TRANSACTION_END, b"F\0", tx_id)
            raise
        await self.request(xs.XsType.TRANSACTION_END, b"T\0", tx_id)


class XsTransaction:
    def __init__(self, client: XenstoreClient, tx_id: int) -> None:
        self.client = client
        self.id = tx_id

    async def read(self, path: str) -> str:
        return await self.client.read(path, self.id)

    async def write(self, path: str, value: str) -> None:
        await self.client.write(path, value, self.id)

    async def rm(self, path: str) -> None:
        await self.client.rm(path, self.id)
