"""storvsc ↔ storvsp: the synthetic SCSI protocol on a VMBus channel (reference/hv-services.md
§4.1–4.6, reference/protocols.md §3.5).

Every message is a ``struct vstor_packet``: {operation u32, flags u32, status u32 (NTSTATUS)}
and a 52-byte union (``vmscsi_request``, channel properties, protocol version, sub-channel
count). The SRB (``vmscsi_request``) is 52 bytes from WIN8 on and 36 before; a reply is as
long as the request it answers (trap 5 of §5). Linux's driver is the source of the names;
OpenVMM's ``storvsp_protocol`` agrees on every offset.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

__all__ = [
    "Operation", "REQUEST_COMPLETION_FLAG", "ProtocolVersion", "LINUX_VERSIONS",
    "VSTOR_PACKET_SIZE", "PRE_WIN8_PACKET_SIZE", "SRB_SIZE", "PRE_WIN8_SRB_SIZE", "HEADER",
    "SRB", "PROPERTIES", "VERSION", "Srb", "SrbStatus", "SRB_STATUS_AUTOSENSE_VALID",
    "SRB_STATUS_QUEUE_FROZEN", "srb_status_code", "SrbFlags", "DataIn", "NtStatus",
    "MULTI_CHANNEL", "VMBUS_RQST_INIT", "VMBUS_RQST_RESET", "SENSE_BUFFER_SIZE",
    "STORVSC_MAX_CMD_LEN", "pack_packet", "unpack_header", "srb_status_to_ntstatus",
    "SP_UNTAGGED", "SRB_SIMPLE_TAG_REQUEST", "STORVSC_TIMEOUT_VALUE",
]


class Operation(enum.IntEnum):
    """``enum vstor_packet_operation`` (EVENT_NOTIFICATION is OpenVMM's)."""

    COMPLETE_IO = 1
    REMOVE_DEVICE = 2
    EXECUTE_SRB = 3
    RESET_LUN = 4
    RESET_ADAPTER = 5
    RESET_BUS = 6
    BEGIN_INITIALIZATION = 7
    END_INITIALIZATION = 8
    QUERY_PROTOCOL_VERSION = 9
    QUERY_PROPERTIES = 10
    ENUMERATE_BUS = 11
    FCHBA_DATA = 12
    CREATE_SUB_CHANNELS = 13
    EVENT_NOTIFICATION = 14


#: vstor_packet.flags: the sender wants a completion (Linux sets it on every request)
REQUEST_COMPLETION_FLAG = 0x1


class ProtocolVersion(enum.IntEnum):
    """``major << 8 | minor`` in a u16 (not ``<< 16`` as VMBus itself)."""

    WIN6 = 0x0200
    WIN7 = 0x0402
    WIN8 = 0x0501
    WIN8_1 = 0x0600              # "BLUE"
    WIN10 = 0x0602               # "THRESHOLD"


#: what Linux (≥ 5.19) asks for, in order (reference §4.1)
LINUX_VERSIONS = (ProtocolVersion.WIN10, ProtocolVersion.WIN8_1, ProtocolVersion.WIN8)

VSTOR_PACKET_SIZE = 64           # sizeof(struct vstor_packet) from WIN8 on
PRE_WIN8_PACKET_SIZE = 48        # vmscsi_size_delta = 16 before WIN8
SRB_SIZE = 0x34                  # sizeof(struct vmscsi_request) from WIN8 on
PRE_WIN8_SRB_SIZE = 0x24
SENSE_BUFFER_SIZE = 0x14         # STORVSC_SENSE_BUFFER_SIZE (0x12 before WIN8)
STORVSC_MAX_CMD_LEN = 0x10

HEADER = struct.Struct("<III")                   # operation, flags, status
#: vmscsi_request: length, srb_status, scsi_status, port_number, path_id, target_id, lun,
#: cdb_length, sense_info_length, data_in, reserved, data_transfer_length, cdb/sense union
#: (20), then the WIN8 extension: reserve, queue_tag, queue_action, srb_flags,
#: time_out_value, queue_sort_key
SRB = struct.Struct("<HBBBBBBBBBBI20sHBBIII")
PROPERTIES = struct.Struct("<IHHIIQ")            # reserved, max_channel_cnt, reserved1,
#                                                  flags, max_transfer_bytes, reserved2
VERSION = struct.Struct("<HH")                   # major_minor, revision
assert SRB.size == SRB_SIZE and HEADER.size + SRB.size == VSTOR_PACKET_SIZE

#: vmstorage_channel_properties.flags: STORAGE_CHANNEL_SUPPORTS_MULTI_CHANNEL
MULTI_CHANNEL = 0x1
#: VMBUS_RQST_INIT / VMBUS_RQST_RESET (include/linux/hyperv.h): the fixed transaction ids of
#: the init and reset packets; I/O uses a tag + 1, so 0 stays free for host messages
VMBUS_RQST_INIT = 2**64 - 3
VMBUS_RQST_RESET = 2**64 - 4
#: queue_tag / queue_action Linux sets for a tagged device (SP_UNTAGGED,
#: SRB_SIMPLE_TAG_REQUEST), and the SRB's own time_out_value in seconds
SP_UNTAGGED = 0xFF
SRB_SIMPLE_TAG_REQUEST = 0x20
STORVSC_TIMEOUT_VALUE = 60


class SrbStatus(enum.IntEnum):
    """SRB_STATUS_* (Linux storvsc_drv.c, OpenVMM ``srb.rs``): the low six bits."""

    PENDING = 0x00
    SUCCESS = 0x01
    ABORTED = 0x02
    ERROR = 0x04
    BUSY = 0x05
    INVALID_REQUEST = 0x06
    INVALID_PATH_ID = 0x07
    NO_DEVICE = 0x08
    TIMEOUT = 0x09
    SELECTION_TIMEOUT = 0x0A
    COMMAND_TIMEOUT = 0x0B
    BUS_RESET = 0x0E
    DATA_OVERRUN = 0x12
    BAD_SRB_BLOCK_LENGTH = 0x15
    REQUEST_FLUSHED = 0x16
    INVALID_LUN = 0x20
    INVALID_TARGET_ID = 0x21
    BAD_FUNCTION = 0x22
    INTERNAL_ERROR = 0x30


SRB_STATUS_QUEUE_FROZEN = 0x40
SRB_STATUS_AUTOSENSE_VALID = 0x80


def srb_status_code(value: int) -> int:
    """``SRB_STATUS(x)``: the status without the two flag bits."""
    return value & 0x3F


class SrbFlags(enum.IntFlag):
    QUEUE_ACTION_ENABLE = 0x00000002
    DISABLE_SYNCH_TRANSFER = 0x00000008
    DATA_IN = 0x00000040
    DATA_OUT = 0x00000080
    NO_QUEUE_FREEZE = 0x00000100


class DataIn(enum.IntEnum):
    """``vmscsi_request.data_in`` (``enum storvsc_request_type``)."""

    WRITE = 0                    # data out: the host reads guest memory
    READ = 1                     # data in: the host writes guest memory
    UNKNOWN = 2                  # no data


class NtStatus(enum.IntEnum):
    """The NTSTATUS values storvsp puts in ``vstor_packet.status`` (reference §4.6)."""

    SUCCESS = 0x00000000
    BUFFER_OVERFLOW = 0x80000005
    DEVICE_BUSY = 0x80000011
    UNSUCCESSFUL = 0xC0000001
    INVALID_PARAMETER = 0xC000000D
    INVALID_DEVICE_REQUEST = 0xC0000010
    REVISION_MISMATCH = 0xC0000059
    DEVICE_NOT_CONNECTED = 0xC000009D
    IO_TIMEOUT = 0xC00000B5
    DEVICE_DOES_NOT_EXIST = 0xC00000C0
    CANCELLED = 0xC0000120
    INVALID_DEVICE_STATE = 0xC0000184
    IO_DEVICE_ERROR = 0xC0000185


def srb_status_to_ntstatus(status: int) -> NtStatus:
    """What the host reports beside an SRB status (OpenVMM
    ``convert_srb_status_to_nt_status``)."""
    code = srb_status_code(status)
    if code == SrbStatus.SUCCESS:
        return NtStatus.SUCCESS
    if code == SrbStatus.BUSY:
        return NtStatus.DEVICE_BUSY
    if code in (SrbStatus.INVALID_LUN, SrbStatus.INVALID_TARGET_ID, SrbStatus.NO_DEVICE):
        return NtStatus.DEVICE_DOES_NOT_EXIST
    if code in (SrbStatus.COMMAND_TIMEOUT, SrbStatus.TIMEOUT):
        return NtStatus.IO_TIMEOUT
    if code == SrbStatus.SELECTION_TIMEOUT:
        return NtStatus.DEVICE_NOT_CONNECTED
    if code in (SrbStatus.BAD_FUNCTION, SrbStatus.BAD_SRB_BLOCK_LENGTH):
        return NtStatus.INVALID_DEVICE_REQUEST
    if code == SrbStatus.DATA_OVERRUN:
        return NtStatus.BUFFER_OVERFLOW
    if code == SrbStatus.REQUEST_FLUSHED:
        return NtStatus.UNSUCCESSFUL
    if code == SrbStatus.ABORTED:
        return NtStatus.CANCELLED
    return NtStatus.IO_DEVICE_ERROR


@dataclass(frozen=True)
class Srb:
    """A ``vmscsi_request``. ``cdb`` holds the 20-byte union: the CDB in a request, the
    sense data in a completion."""

    length: int = SRB_SIZE
    srb_status: int = 0
    scsi_status: int = 0
    port_number: int = 0
    path_id: int = 0
    target_id: int = 0
    lun: int = 0
    cdb_length: int = 0
    sense_info_length: int = SENSE_BUFFER_SIZE
    data_in: int = DataIn.UNKNOWN
    reserved: int = 0
    data_transfer_length: int = 0
    cdb: bytes = b""
    reserve: int = 0
    queue_tag: int = 0
    queue_action: int = 0
    srb_flags: int = 0
    time_out_value: int = 0
    queue_sort_key: int = 0

    def pack(self) -> bytes:
        return SRB.pack(self.length, self.srb_status, self.scsi_status, self.port_number,
                        self.path_id, self.target_id, self.lun, self.cdb_length,
                        self.sense_info_length, self.data_in, self.reserved,
                        self.data_transfer_length, self.cdb.ljust(20, b"\0")[:20],
                        self.reserve, self.queue_tag, self.queue_action, self.srb_flags,
                        self.time_out_value, self.queue_sort_key)

    @classmethod
    def unpack(cls, body: bytes) -> Srb:
        """An SRB from however many bytes of it a packet holds (36 before WIN8, 52 after;
        whatever is missing reads as zero)."""
        return cls(*SRB.unpack(bytes(body[:SRB_SIZE]).ljust(SRB_SIZE, b"\0")))


def pack_packet(operation: int, body: bytes = b"", *, flags: int = 0, status: int = 0,
                size: int = VSTOR_PACKET_SIZE) -> bytes:
    """A vstor_packet of exactly ``size`` bytes: the body zero-padded or cut to fit."""
    payload = HEADER.pack(operation, flags, status) + body
    return payload[:size].ljust(size, b"\0")


def unpack_header(payload: bytes) -> tuple[int, int, int]:
    """(operation, flags, status); ValueError when the packet is shorter than them."""
    if len(payload) < HEADER.size:
        raise ValueError(f"vstor_packet of {len(payload)} bytes: shorter than its header")
    op, flags, status = HEADER.unpack_from(payload)
    return int(op), int(flags), int(status)
