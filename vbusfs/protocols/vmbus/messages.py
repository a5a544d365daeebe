"""VMBus channel-management messages, protocol versions and the well-known device classes.

Layouts are Linux's ``include/linux/hyperv.h`` (reference/protocols.md §3.3–3.4); every message
starts with ``{u32 msgtype, u32 padding}`` and carries at most 240 bytes
(``HV_MESSAGE_PAYLOAD_BYTE_COUNT``). Each message class has ``pack()`` and ``unpack(buf)``;
``unpack`` raises :class:`MessageError` for a buffer shorter than the fixed part.
"""

from __future__ import annotations

import enum
import struct
import uuid
from dataclasses import dataclass, field, fields
from typing import ClassVar, Self

__all__ = [
    "MAX_MESSAGE_SIZE", "MessageType", "MessageError", "Version", "KNOWN_VERSIONS",
    "VMBUS_MESSAGE_CONNECTION_ID", "VMBUS_MESSAGE_CONNECTION_ID_4", "VMBUS_MESSAGE_SINT",
    "message_type", "DeviceClass", "DEVICE_CLASSES", "class_by_guid", "class_by_type",
    "InitiateContact", "VersionResponse", "RequestOffers", "AllOffersDelivered", "OfferChannel",
    "RescindOffer", "GpadlHeader", "GpadlBody", "GpadlCreated", "GpadlTeardown", "GpadlTorndown",
    "OpenChannel", "OpenResult", "CloseChannel", "RelidReleased", "Unload", "UnloadResponse",
    "ModifyChannel", "ModifyChannelResponse", "GPADL_HEADER_MAX_PFNS", "GPADL_BODY_MAX_PFNS",
    "MONITOR_PAGE",
]

#: HV_MESSAGE_PAYLOAD_BYTE_COUNT: the most a SynIC message can carry.
MAX_MESSAGE_SIZE = 240

# include/linux/hyperv.h / drivers/hv/hyperv_vmbus.h
VMBUS_MESSAGE_CONNECTION_ID = 1      # initial contact for protocol < 5.0
VMBUS_MESSAGE_CONNECTION_ID_4 = 4    # initial contact for protocol >= 5.0
VMBUS_MESSAGE_SINT = 2


class MessageError(ValueError):
    """A channel message that is malformed: too short, too long, or with impossible fields."""


class MessageType(enum.IntEnum):
    INVALID = 0
    OFFERCHANNEL = 1
    RESCIND_CHANNELOFFER = 2
    REQUESTOFFERS = 3
    ALLOFFERS_DELIVERED = 4
    OPENCHANNEL = 5
    OPENCHANNEL_RESULT = 6
    CLOSECHANNEL = 7
    GPADL_HEADER = 8
    GPADL_BODY = 9
    GPADL_CREATED = 10
    GPADL_TEARDOWN = 11
    GPADL_TORNDOWN = 12
    RELID_RELEASED = 13
    INITIATE_CONTACT = 14
    VERSION_RESPONSE = 15
    UNLOAD = 16
    UNLOAD_RESPONSE = 17
    TL_CONNECT_REQUEST = 21
    MODIFYCHANNEL = 22
    TL_CONNECT_RESULT = 23
    MODIFYCHANNEL_RESPONSE = 24


class Version(enum.IntEnum):
    """VMBus protocol versions, ``major << 16 | minor`` (reference/protocols.md §3.4)."""

    WS2008 = 0x0000000D
    WIN7 = 0x00010001
    WIN8 = 0x00020004
    WIN8_1 = 0x00030000
    WIN10 = 0x00040000
    WIN10_V4_1 = 0x00040001
    WIN10_V5 = 0x00050000
    WIN10_V5_1 = 0x00050001
    WIN10_V5_2 = 0x00050002
    WIN10_V5_3 = 0x00050003

    @property
    def text(self) -> str:
        return f"{self >> 16}.{self & 0xFFFF}"

    @classmethod
    def parse(cls, text: str) -> Version:
        """``"5.3"`` → ``Version.WIN10_V5_3``; ValueError for an unknown version."""
        try:
            major, minor = (int(p) for p in text.split("."))
        except ValueError:
            raise ValueError(f"not a VMBus version: {text!r} (expected MAJOR.MINOR)") from None
        try:
            return cls(major << 16 | minor)
        except ValueError:
            known = ", ".join(v.text for v in cls)
            raise ValueError(f"unknown VMBus version {text!r} (known: {known})") from None


#: The versions a modern Linux guest offers, newest first (it no longer speaks WS2008/WIN7).
KNOWN_VERSIONS: tuple[Version, ...] = (
    Version.WIN10_V5_3, Version.WIN10_V5_2, Version.WIN10_V5_1, Version.WIN10_V5,
    Version.WIN10_V4_1, Version.WIN10, Version.WIN8_1, Version.WIN8,
)

_HDR = struct.Struct("<II")


def message_type(buf: bytes) -> int:
    """The ``msgtype`` of a raw message; MessageError if it has no header."""
    if len(buf) < _HDR.size:
        raise MessageError(f"message of {len(buf)} bytes has no header")
    return int(_HDR.unpack_from(buf)[0])


def _check(buf: bytes, size: int, what: str) -> None:
    if len(buf) < size:
        raise MessageError(f"{what}: {len(buf)} bytes, needs at least {size}")
    if len(buf) > MAX_MESSAGE_SIZE:
        raise MessageError(f"{what}: {len(buf)} bytes, more than {MAX_MESSAGE_SIZE}")


@dataclass(frozen=True)
class _Fixed:
    """A message whose fields after the 8-byte header are exactly ``FMT``'s, in order."""

    TYPE: ClassVar[MessageType]
    FMT: ClassVar[struct.Struct]

    def pack(self) -> bytes:
        return self.FMT.pack(self.TYPE, 0, *(getattr(self, f.name) for f in fields(self)))

    @classmethod
    def unpack(cls, buf: bytes) -> Self:
        _check(buf, cls.FMT.size, cls.TYPE.name)
        return cls(*cls.FMT.unpack_from(buf)[2:])


@dataclass(frozen=True)
class InitiateContact(_Fixed):
    TYPE: ClassVar[MessageType] = MessageType.INITIATE_CONTACT
    FMT: ClassVar[struct.Struct] = struct.Struct("<II II BB6x QQ")  # 40 bytes
    version_requested: int
    target_vcpu: int
    msg_sint: int          # >= 5.0: reuses the interrupt_page field
    msg_vtl: int
    monitor_page1: int     # GPA of the host→guest monitor page ("server")
    monitor_page2: int     # GPA of the guest→host monitor page ("client")



@dataclass(frozen=True)
class VersionResponse(_Fixed):
    TYPE: ClassVar[MessageType] = MessageType.VERSION_RESPONSE
    FMT: ClassVar[struct.Struct] = struct.Struct("<II BBxx I")  # 16 bytes
    version_supported: int    # bool on the wire
    connection_state: int
    msg_conn_id: int



@dataclass(frozen=True)
class _Bare(_Fixed):
    """A message that is only the 8-byte header."""

    FMT: ClassVar[struct.Struct] = _HDR


@dataclass(frozen=True)
class RequestOffers(_Bare):
    TYPE: ClassVar[MessageType] = MessageType.REQUESTOFFERS


@dataclass(frozen=True)
class AllOffersDelivered(_Bare):
    TYPE: ClassVar[MessageType] = MessageType.ALLOFFERS_DELIVERED


@dataclass(frozen=True)
class Unload(_Bare):
    TYPE: ClassVar[MessageType] = MessageType.UNLOAD


@dataclass(frozen=True)
class UnloadResponse(_Bare):
    TYPE: ClassVar[MessageType] = MessageType.UNLOAD_RESPONSE


@dataclass(frozen=True)
class OfferChannel:
    """CHANNELMSG_OFFERCHANNEL, 196 bytes: ``vmbus_channel_offer`` (176) at offset 8."""

    TYPE: ClassVar[MessageType] = MessageType.OFFERCHANNEL
    FMT: ClassVar[struct.Struct] = struct.Struct("<II 16s16s QQ HH 120s H2x I B B H I")
    if_type: uuid.UUID
    if_instance: uuid.UUID
    chn_flags: int
    mmio_megabytes: int
    user_defined: bytes
    sub_channel_index: int
    child_relid: int
    monitorid: int
    monitor_allocated: bool
    is_dedicated_interrupt: bool
    connection_id: int

    def pack(self) -> bytes:
        return self.FMT.pack(
            self.TYPE, 0, self.if_type.bytes_le, self.if_instance.bytes_le, 0, 0,
            self.chn_flags, self.mmio_megabytes, self.user_defined.ljust(120, b"\0"),
            self.sub_channel_index, self.child_relid, self.monitorid,
            1 if self.monitor_allocated else 0, 1 if self.is_dedicated_interrupt else 0,
            self.connection_id)

    @classmethod
    def unpack(cls, buf: bytes) -> OfferChannel:
        _check(buf, cls.FMT.size, "OFFERCHANNEL")
        (_, _, t, i, _r1, _r2, flags, mmio, ud, sub, relid, monid, monbits, dedbits,
         conn) = cls.FMT.unpack_from(buf)
        return cls(uuid.UUID(bytes_le=t), uuid.UUID(bytes_le=i), flags, mmio, ud, sub, relid,
                   monid, bool(monbits & 1), bool(dedbits & 1), conn)


@dataclass(frozen=True)
class _RelidOnly(_Fixed):
    FMT: ClassVar[struct.Struct] = struct.Struct("<II I")  # 12 bytes
    child_relid: int



@dataclass(frozen=True)
class RescindOffer(_RelidOnly):
    TYPE: ClassVar[MessageType] = MessageType.RESCIND_CHANNELOFFER


@dataclass(frozen=True)
class CloseChannel(_RelidOnly):
    TYPE: ClassVar[MessageType] = MessageType.CLOSECHANNEL


@dataclass(frozen=True)
class RelidReleased(_RelidOnly):
    TYPE: ClassVar[MessageType] = MessageType.RELID_RELEASED


@dataclass(frozen=True)
class GpadlTorndown(_Fixed):
    TYPE: ClassVar[MessageType] = MessageType.GPADL_TORNDOWN
    FMT: ClassVar[struct.Struct] = struct.Struct("<II I")
    gpadl: int



#: 240-byte limit: header 20 + range 8 leaves 26 PFNs; a body message 16 leaves 28.
GPADL_HEADER_MAX_PFNS = (MAX_MESSAGE_SIZE - 20 - 8) // 8
GPADL_BODY_MAX_PFNS = (MAX_MESSAGE_SIZE - 16) // 8


@dataclass(frozen=True)
class GpadlHeader:
    """GPADL_HEADER with one ``gpa_range`` (the only form Linux sends).

    ``range_buflen`` covers the range header and *all* PFNs, including those that follow in
    GPADL_BODY messages; ``pfns`` holds only the ones in this message.
    """

    TYPE: ClassVar[MessageType] = MessageType.GPADL_HEADER
    FMT: ClassVar[struct.Struct] = struct.Struct("<II II HH")  # 20 bytes
    RANGE: ClassVar[struct.Struct] = struct.Struct("<II")       # byte_count, byte_offset
    child_relid: int
    gpadl: int
    range_buflen: int
    rangecount: int
    byte_count: int
    byte_offset: int
    pfns: tuple[int, ...] = field(default=())

    def pack(self) -> bytes:
        return (self.FMT.pack(self.TYPE, 0, self.child_relid, self.gpadl, self.range_buflen,
                              self.rangecount)
                + self.RANGE.pack(self.byte_count, self.byte_offset)
                + struct.pack(f"<{len(self.pfns)}Q", *self.pfns))

    @classmethod
    def unpack(cls, buf: bytes) -> GpadlHeader:
        _check(buf, cls.FMT.size + cls.RANGE.size, "GPADL_HEADER")
        _, _, relid, gpadl, buflen, count = cls.FMT.unpack_from(buf)
        nbytes, off = cls.RANGE.unpack_from(buf, cls.FMT.size)
        rest = len(buf) - cls.FMT.size - cls.RANGE.size
        if rest % 8:
            raise MessageError(f"GPADL_HEADER: PFN array of {rest} bytes is not whole u64s")
        pfns = struct.unpack_from(f"<{rest // 8}Q", buf, cls.FMT.size + cls.RANGE.size)
        return cls(relid, gpadl, buflen, count, nbytes, off, tuple(pfns))


@dataclass(frozen=True)
class GpadlBody:
    TYPE: ClassVar[MessageType] = MessageType.GPADL_BODY
    FMT: ClassVar[struct.Struct] = struct.Struct("<II II")  # 16 bytes
    msgnumber: int
    gpadl: int
    pfns: tuple[int, ...]

    def pack(self) -> bytes:
        return (self.FMT.pack(self.TYPE, 0, self.msgnumber, self.gpadl)
                + struct.pack(f"<{len(self.pfns)}Q", *self.pfns))

    @classmethod
    def unpack(cls, buf: bytes) -> GpadlBody:
        _check(buf, cls.FMT.size, "GPADL_BODY")
        _, _, num, gpadl = cls.FMT.unpack_from(buf)
        rest = len(buf) - cls.FMT.size
        if rest % 8:
            raise MessageError(f"GPADL_BODY: PFN array of {rest} bytes is not whole u64s")
        return cls(num, gpadl, tuple(struct.unpack_from(f"<{rest // 8}Q", buf, cls.FMT.size)))


@dataclass(frozen=True)
class GpadlCreated(_Fixed):
    TYPE: ClassVar[MessageType] = MessageType.GPADL_CREATED
    FMT: ClassVar[struct.Struct] = struct.Struct("<II III")  # 20 bytes
    child_relid: int
    gpadl: int
    creation_status: int



@dataclass(frozen=True)
class GpadlTeardown(_Fixed):
    TYPE: ClassVar[MessageType] = MessageType.GPADL_TEARDOWN
    FMT: ClassVar[struct.Struct] = struct.Struct("<II II")  # 16 bytes
    child_relid: int
    gpadl: int



@dataclass(frozen=True)
class OpenChannel(_Fixed):
    TYPE: ClassVar[MessageType] = MessageType.OPENCHANNEL
    FMT: ClassVar[struct.Struct] = struct.Struct("<II IIIII 120s")  # 148 bytes
    child_relid: int
    openid: int
    ringbuffer_gpadlhandle: int
    target_vp: int
    downstream_ringbuffer_pageoffset: int
    userdata: bytes = b""      # struct pads it to 120 bytes



@dataclass(frozen=True)
class OpenResult(_Fixed):
    TYPE: ClassVar[MessageType] = MessageType.OPENCHANNEL_RESULT
    FMT: ClassVar[struct.Struct] = struct.Struct("<II III")  # 20 bytes
    child_relid: int
    openid: int
    status: int



@dataclass(frozen=True)
class ModifyChannel(_Fixed):
    TYPE: ClassVar[MessageType] = MessageType.MODIFYCHANNEL
    FMT: ClassVar[struct.Struct] = struct.Struct("<II II")  # 16 bytes
    child_relid: int
    target_vp: int



@dataclass(frozen=True)
class ModifyChannelResponse(_Fixed):
    TYPE: ClassVar[MessageType] = MessageType.MODIFYCHANNEL_RESPONSE
    FMT: ClassVar[struct.Struct] = struct.Struct("<II Ii")  # 16 bytes
    child_relid: int
    status: int



class MONITOR_PAGE:  # noqa: N801 - a namespace of offsets named like the C struct
    """Offsets in ``struct hv_monitor_page`` (hyperv-tlfs.h), 4096 bytes."""

    TRIGGER_GROUP = 8          # union hv_monitor_trigger_group[4]: {u32 pending, u32 armed}
    LATENCY = 576              # u16 latency[4][32]
    PARAMETER = 1088           # struct hv_monitor_parameter[4][32]: {u32 connid, u16 flag, u16}

    @staticmethod
    def pending_offset(monitorid: int) -> int:
        return MONITOR_PAGE.TRIGGER_GROUP + 8 * (monitorid // 32)

    @staticmethod
    def latency_offset(monitorid: int) -> int:
        return MONITOR_PAGE.LATENCY + 2 * (32 * (monitorid // 32) + monitorid % 32)

    @staticmethod
    def parameter_offset(monitorid: int) -> int:
        return MONITOR_PAGE.PARAMETER + 8 * (32 * (monitorid // 32) + monitorid % 32)


@dataclass(frozen=True)
class DeviceClass:
    """One row of Linux's ``vmbus_devs[]`` plus the names vbusfs uses for it.

    ``dev_type`` is what the ``device`` attribute prints (index in ``vmbus_devs[]``, 0x10 for
    HV_UNKNOWN); ``driver`` is the Linux driver that binds to it (None: nothing binds);
    ``perf_device`` is Linux's flag that spreads the channel over CPUs.
    """

    type: str
    guid: uuid.UUID
    dev_type: int
    driver: str | None
    perf_device: bool
    description: str


def _dc(type_: str, guid: str, dev_type: int, driver: str | None, perf: bool,
        description: str) -> DeviceClass:
    return DeviceClass(type_, uuid.UUID(guid), dev_type, driver, perf, description)


#: reference/sysfs.md §1.5 (class GUIDs, device index, driver, lsvmbus label).
DEVICE_CLASSES: tuple[DeviceClass, ...] = (
    _dc("ide", "32412632-86cb-44a2-9b5c-50d1417354f5", 0x0, "hv_storvsc", True,
        "Synthetic IDE Controller"),
    _dc("scsi", "ba6163d9-04a1-4d29-b605-72e2ffb1dc7f", 0x1, "hv_storvsc", True,
        "Synthetic SCSI Controller"),
    _dc("fc", "2f9bcc4a-0069-4af3-b76b-6fd0be528cda", 0x2, "hv_storvsc", True,
        "Synthetic fiber channel adapter"),
    _dc("nic", "f8615163-df3e-46c5-913f-f2d2f965ed0e", 0x3, "hv_netvsc", True,
        "Synthetic network adapter"),
    _dc("nd", "8c2eaf3d-32a7-4b09-ab99-bd1f1c86b501", 0x4, None, True,
        "Synthetic RDMA adapter"),
    _dc("pcie", "44c4f61d-4444-4400-9d52-802e27ede19f", 0x5, "hv_pci", False,
        "PCI Express pass-through"),
    _dc("framebuffer", "da0a7802-e377-4aac-8e77-0558eb1073f8", 0x6, "hyperv_fb", False,
        "Synthetic framebuffer adapter"),
    _dc("keyboard", "f912ad6d-2b17-48ea-bd65-f927a61c7684", 0x7, "hyperv_keyboard", False,
        "Synthetic keyboard"),
    _dc("mouse", "cfa8b69e-5b4a-4cc0-b98b-8ba1a1f3f95a", 0x8, "hid_hyperv", False,
        "Synthetic mouse"),
    _dc("kvp", "a9a0f4e7-5a45-4d96-b827-8a841e8c03e6", 0x9, "hv_utils", False,
        "Data Exchange"),
    _dc("timesync", "9527e630-d0ae-497b-adce-e80ab0175caf", 0xA, "hv_utils", False,
        "Time Synchronization"),
    _dc("heartbeat", "57164f39-9115-4e78-ab55-382f3bd5422d", 0xB, "hv_utils", False,
        "Heartbeat"),
    _dc("shutdown", "0e0b6031-5213-4934-818b-38d90ced39db", 0xC, "hv_utils", False,
        "Operating system shutdown"),
    _dc("fcopy", "34d14be3-dee4-41c8-9ae7-6b174977c192", 0xD, "hv_utils", False,
        "Guest services"),
    _dc("vss", "35fa2e29-ea23-4236-96ae-3a6ebacba440", 0xE, "hv_utils", False,
        "Backup (volume checkpoint)"),
    _dc("balloon", "525074dc-8985-46e2-8057-a307dc18a502", 0xF, "hv_balloon", False,
        "Dynamic Memory"),
    _dc("avma1", "f8e65716-3cb3-4a06-9a60-1889c5cccab5", 0x10, None, False,
        "Reserved system device"),
    _dc("avma2", "3375baf4-9e15-4b30-b765-67acb10d607b", 0x10, None, False,
        "Reserved system device"),
    _dc("rdv", "276aacf4-ac15-426c-98dd-7521ad3f01fe", 0x10, None, False,
        "Reserved system device"),
    _dc("imc", "c376c1c3-d276-48d2-90a9-c04748072c60", 0x10, None, False, "Unknown"),
)

_BY_GUID = {c.guid: c for c in DEVICE_CLASSES}
_BY_TYPE = {c.type: c for c in DEVICE_CLASSES}
HV_UNKNOWN = 0x10


def class_by_guid(guid: uuid.UUID) -> DeviceClass | None:
    return _BY_GUID.get(guid)


def class_by_type(name: str) -> DeviceClass | None:
    return _BY_TYPE.get(name)
