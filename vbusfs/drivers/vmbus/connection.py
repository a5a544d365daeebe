"""The guest's VMBus connection: channel-management requests and their responses.

Mirrors Linux ``drivers/hv/connection.c`` (``vmbus_connect``: INITIATE_CONTACT newest version
first, retrying lower ones on ``version_supported = 0``; ``vmbus_post_msg``) and the request
halves of ``channel.c`` (GPADL, OPENCHANNEL, MODIFYCHANNEL, UNLOAD). Every request that
expects an answer goes through :meth:`VmbusConnection.request`, which waits for the response
naming it and turns a host that never answers into ``ETIMEDOUT``.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Sequence

import trio

from vbusfs.platform.memory import PAGE_SIZE, GuestMemory
from vbusfs.platform.vmbus.synic import HvStatus, Synic
from vbusfs.protocols.vmbus import messages as m

log = logging.getLogger(__name__)

__all__ = ["VmbusConnection", "OpenError", "RESPONSE_TIMEOUT"]

RESPONSE_TIMEOUT = 5.0
FIRST_GPADL_HANDLE = 0xE1E10   # Linux's first guest-chosen GPADL handle


class OpenError(Exception):
    """The host refused a GPADL or an OPENCHANNEL."""


#: response type → how to find the request it answers (its key)
_RESPONSES: dict[int, Callable[[bytes], int]] = {
    m.MessageType.VERSION_RESPONSE: lambda b: 0,
    m.MessageType.GPADL_CREATED: lambda b: m.GpadlCreated.unpack(b).gpadl,
    m.MessageType.GPADL_TORNDOWN: lambda b: m.GpadlTorndown.unpack(b).gpadl,
    m.MessageType.OPENCHANNEL_RESULT: lambda b: m.OpenResult.unpack(b).child_relid,
    m.MessageType.MODIFYCHANNEL_RESPONSE: lambda b: m.ModifyChannelResponse.unpack(b).child_relid,
    m.MessageType.UNLOAD_RESPONSE: lambda b: 0,
}


class _Waiter:
    """A request waiting for its response: the first answer, and the event that says it
    came (an event and a slot: a memory channel per request cost more to make than the
    rest of the request)."""

    __slots__ = ("answered", "answer")

    def __init__(self) -> None:
        self.answered = trio.Event()
        self.answer: bytes | None = None


class VmbusConnection:
    def __init__(self, synic: Synic, memory: GuestMemory, cpus: int = 2,
                 versions: tuple[m.Version, ...] = m.KNOWN_VERSIONS) -> None:
        self.synic = synic
        self.memory = memory
        self.cpus = cpus
        self.versions = versions
        self.version: m.Version | None = None
        self.msg_conn_id = m.VMBUS_MESSAGE_CONNECTION_ID
        self.monitor_pfns: tuple[int, int] = (0, 0)
        self._next_gpadl = FIRST_GPADL_HANDLE
        self._waiters: dict[tuple[int, int], _Waiter] = {}

    # -- messages ----------------------------------------------------------------------------
    def post(self, payload: bytes) -> None:
        status = self.synic.post_message(self.msg_conn_id, payload)
        if status != HvStatus.SUCCESS:
            raise OSError(errno.EIO, f"HvPostMessage failed: {HvStatus(status).name}")

    async def request(self, payloads: Sequence[bytes], reply_type: m.MessageType,
                      key: int) -> bytes:
        """Post ``payloads`` in order and wait for the ``reply_type`` message that names
        ``key``; a host that does not answer within RESPONSE_TIMEOUT is ``ETIMEDOUT``."""
        waiter = self._waiters[(reply_type, key)] = _Waiter()
        try:
            for payload in payloads:
                self.post(payload)
            with trio.fail_after(RESPONSE_TIMEOUT):
                await waiter.answered.wait()
            assert waiter.answer is not None
            return waiter.answer
        except trio.TooSlowError:
            raise OSError(errno.ETIMEDOUT, f"VMBus host did not answer with "
                          f"{reply_type.name} within {RESPONSE_TIMEOUT:.0f} s") from None
        finally:
            self._waiters.pop((reply_type, key), None)

    def on_response(self, mtype: int, buf: bytes) -> bool:
        """Hand a response to the request waiting for it; False if ``mtype`` is not a
        response. Raises :class:`~vbusfs.protocols.vmbus.messages.MessageError` for a
        response too short to name its request."""
        key_of = _RESPONSES.get(mtype)
        if key_of is None:
            return False
        key = key_of(buf)
        waiter = self._waiters.get((mtype, key))
        name = m.MessageType(mtype).name
        if waiter is None:
            log.warning("vmbus: unexpected %s (key %#x) dropped", name, key)
            return True
        if waiter.answer is not None:
            log.warning("vmbus: duplicate %s dropped", name)
        else:
            waiter.answer = buf
            waiter.answered.set()
        return True

    # -- connection --------------------------------------------------------------------------
    async def connect(self) -> None:
        """INITIATE_CONTACT, newest version first; EPROTO when none is accepted."""
        m1 = self.memory.alloc(1)
        m2 = self.memory.alloc(1)
        self.monitor_pfns = (m1, m2)
        for version in self.versions:
            self.msg_conn_id = m.VMBUS_MESSAGE_CONNECTION_ID_4 \
                if version >= m.Version.WIN10_V5 else m.VMBUS_MESSAGE_CONNECTION_ID
            req = m.InitiateContact(version, 0, m.VMBUS_MESSAGE_SINT, 0, m1 * PAGE_SIZE,
                                    m2 * PAGE_SIZE)
            resp = m.VersionResponse.unpack(
                await self.request([req.pack()], m.MessageType.VERSION_RESPONSE, 0))
            if resp.version_supported:
                self.version = version
                if version >= m.Version.WIN10_V5:
                    self.msg_conn_id = resp.msg_conn_id
                log.info("vmbus: Vmbus version:%s", version.text)
                return
        raise OSError(errno.EPROTO, "VMBus host supports none of the versions this guest "
                      "speaks (" + ", ".join(v.text for v in self.versions) + ")")

    async def unload(self) -> None:
        """UNLOAD, waiting (bounded) for the host's answer."""
        if self.version is not None:
            with trio.move_on_after(RESPONSE_TIMEOUT):
                await self.request([m.Unload().pack()], m.MessageType.UNLOAD_RESPONSE, 0)
            self.version = None

    # -- GPADL / open / modify ----------------------------------------------------------------
    async def create_gpadl(self, relid: int, pfns: list[int]) -> int:
        """GPADL_HEADER (+ GPADL_BODY for what does not fit) → GPADL_CREATED."""
        handle = self._next_gpadl
        self._next_gpadl += 1
        first, rest = pfns[:m.GPADL_HEADER_MAX_PFNS], pfns[m.GPADL_HEADER_MAX_PFNS:]
        msgs = [m.GpadlHeader(relid, handle, 8 + 8 * len(pfns), 1, len(pfns) * PAGE_SIZE, 0,
                              tuple(first)).pack()]
        for n, at in enumerate(range(0, len(rest), m.GPADL_BODY_MAX_PFNS), start=1):
            msgs.append(m.GpadlBody(n, handle,
                                    tuple(rest[at:at + m.GPADL_BODY_MAX_PFNS])).pack())
        created = m.GpadlCreated.unpack(
            await self.request(msgs, m.MessageType.GPADL_CREATED, handle))
        if created.creation_status != 0:
            raise OpenError(f"host refused GPADL {handle:#x}: status "
                            f"{created.creation_status:#x}")
        return handle

    async def teardown_gpadl(self, relid: int, handle: int) -> None:
        await self.request([m.GpadlTeardown(relid, handle).pack()],
                           m.MessageType.GPADL_TORNDOWN, handle)

    async def open_channel(self, req: m.OpenChannel) -> None:
        resp = m.OpenResult.unpack(await self.request(
            [req.pack()], m.MessageType.OPENCHANNEL_RESULT, req.child_relid))
        if resp.status != 0:
            raise OpenError(f"host refused to open relid {req.child_relid}: "
                            f"status {resp.status:#x}")

    async def modify_channel(self, relid: int, cpu: int) -> None:
        """MODIFYCHANNEL; from 5.3 on the host answers and the answer is checked."""
        req = m.ModifyChannel(relid, cpu).pack()
        if self.version is not None and self.version >= m.Version.WIN10_V5_3:
            resp = m.ModifyChannelResponse.unpack(await self.request(
                [req], m.MessageType.MODIFYCHANNEL_RESPONSE, relid))
            if resp.status != 0:
                raise OSError(errno.EIO, f"host refused to move relid {relid}")
        else:
            self.post(req)
