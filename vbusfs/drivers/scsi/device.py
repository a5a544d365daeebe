"""SCSI devices as the midlayer keeps them, what a low-level driver provides, and how a
command's outcome becomes an errno (Linux ``include/scsi/scsi_device.h``,
``scsi_host.h``, ``scsi_lib.c`` ``scsi_io_completion``).

A low-level driver is a :class:`HostAdapter`: Linux's ``scsi_host_template`` and the
``Scsi_Host`` limits it sets, plus ``queuecommand`` for the midlayer's own commands (the
scan, sd's probe) and the engine transport that carries a disk's block I/O. The driver
turns its transport's completion into a :class:`CmdResult` (host byte, SAM status, sense,
bytes moved); :func:`decide` is the midlayer's part: success, an errno, or a retry.
"""

from __future__ import annotations

import enum
import errno
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from vbusfs.block.contract import Command, Limits, Op, Transport
from vbusfs.block.engine import Engine
from vbusfs.protocols import scsi
from vbusfs.protocols.scsi import Asc, SenseKey, Status
from vbusfs.sysfs import Directory

__all__ = ["HostByte", "Direction", "CmdResult", "ScsiRequest", "CommandBuilder",
           "HostAdapter", "ScsiDevice", "decide", "execute", "RETRY", "MAX_RETRIES"]

#: sd's SD_MAX_RETRIES: how often a command that asks to be retried is sent again
MAX_RETRIES = 5
#: what :func:`decide` returns for "send it again"
RETRY = -1


class HostByte(enum.IntEnum):
    """``enum host_status`` (include/scsi/scsi_status.h): the driver's verdict."""

    DID_OK = 0x00
    DID_NO_CONNECT = 0x01
    DID_BUS_BUSY = 0x02
    DID_TIME_OUT = 0x03
    DID_BAD_TARGET = 0x04
    DID_ABORT = 0x05
    DID_ERROR = 0x07
    DID_RESET = 0x08
    DID_PASSTHROUGH = 0x0A
    DID_SOFT_ERROR = 0x0B
    DID_IMM_RETRY = 0x0C
    DID_REQUEUE = 0x0D


class Direction(enum.IntEnum):
    """``enum dma_data_direction`` as a command uses it."""

    NONE = 0
    TO_DEVICE = 1
    FROM_DEVICE = 2


class CmdResult(NamedTuple):
    """What a command came back with. A named tuple: one is made per command (a scan of
    an empty controller is 48 of them), and a tuple is built in C."""

    host: HostByte
    status: int                  # SAM status
    sense: bytes = b""
    transferred: int = 0         # data bytes moved (request length − residual)
    data: bytes = b""            # data in, for the midlayer's own commands


class ScsiRequest(NamedTuple):
    """What sd makes of an engine command: the CDB, the direction, and the data as
    ``length`` bytes in ``pages`` (guest frames, starting at offset 0 of the first). A
    named tuple: one is made per command, and a frozen dataclass sets each field through
    ``object.__setattr__``."""

    cdb: bytes
    direction: Direction
    length: int
    pages: list[int]


class CommandBuilder(Protocol):
    """sd's side of a disk's block I/O, which the driver's transport calls: the CDB for a
    command, the errno of its result, the pages a command needs besides its data, and the
    engine to complete commands on."""

    @property
    def engine(self) -> Engine | None: ...

    def extra_pages_for(self, op: Op) -> int: ...
    def setup(self, cmd: Command) -> ScsiRequest: ...
    def finish(self, cmd: Command, result: CmdResult) -> int: ...


class HostAdapter(Protocol):
    """A low-level SCSI driver's host (``scsi_host_template`` + ``Scsi_Host``)."""

    proc_name: str
    can_queue: int
    cmd_per_lun: int
    sg_tablesize: int
    max_sectors: int             # 512-byte units (max_hw_sectors)
    max_channel: int
    max_id: int                  # targets per channel
    max_lun: int                 # LUNs are below this
    max_cmd_len: int
    nr_hw_queues: int

    def host_busy(self) -> int: ...

    async def queuecommand(self, sdev: ScsiDevice, cdb: bytes, direction: Direction,
                           length: int, data_out: bytes = b"") -> CmdResult: ...

    def slave_configure(self, sdev: ScsiDevice) -> None: ...

    def block_transport(self, sdev: ScsiDevice, sd: CommandBuilder,
                        limits: Limits) -> Transport: ...


@dataclass(eq=False)
class ScsiDevice:
    """A logical unit (``struct scsi_device``); what its sysfs attributes show."""

    adapter: HostAdapter
    host_no: int
    channel: int
    id: int
    lun: int
    inquiry: bytes = b""
    vendor: bytes = b""
    model: bytes = b""
    rev: bytes = b""
    type: int = scsi.TYPE_DISK
    scsi_level: int = 0
    tagged: bool = False
    removable: bool = False
    vpd: dict[int, bytes] = field(default_factory=dict)   # whole pages, header included
    state: str = "created"
    timeout: int = 30            # seconds (the block layer's default until configured)
    eh_timeout: int = 10         # SCSI_DEFAULT_EH_TIMEOUT
    queue_depth: int = 1
    queue_ramp_up_period: int = 120_000    # ms (SCSI_DEFAULT_RAMP_UP_PERIOD)
    iorequest_cnt: int = 0
    iodone_cnt: int = 0
    ioerr_cnt: int = 0
    busy: int = 0                # commands in flight (device_busy)
    events: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("media_change", "inquiry_change_reported", "capacity_change_reported",
         "soft_threshold_reached", "mode_parameter_change_reported", "lun_change_reported"),
        0))
    dir: Directory | None = None
    disk: object = None          # sd's disk, while bound

    @property
    def name(self) -> str:
        return f"{self.host_no}:{self.channel}:{self.id}:{self.lun}"

    @property
    def running(self) -> bool:
        return self.state == "running"


async def execute(sdev: ScsiDevice, cdb: bytes, direction: Direction, length: int,
                  data_out: bytes = b"") -> CmdResult:
    """``scsi_execute``: one of the midlayer's own commands, counted in the device's
    ``iorequest_cnt``/``iodone_cnt``/``ioerr_cnt`` as every dispatched command is."""
    sdev.iorequest_cnt += 1
    r = await sdev.adapter.queuecommand(sdev, cdb, direction, length, data_out)
    sdev.iodone_cnt += 1
    if r.host != HostByte.DID_OK or r.status != Status.GOOD:
        sdev.ioerr_cnt += 1
    return r


def decide(result: CmdResult) -> int:
    """``scsi_io_completion`` / ``scsi_decide_disposition`` as far as errnos go: 0,
    :data:`RETRY`, or the errno the block layer would report (``blk_status_to_errno``)."""
    host = result.host
    if host == HostByte.DID_OK:
        if result.status == Status.GOOD:
            return 0
        if result.status in (Status.BUSY, Status.TASK_SET_FULL):
            return RETRY
        if result.status == Status.CHECK_CONDITION:
            sense = scsi.parse_sense(result.sense)
            if sense is None:
                return errno.EIO
            if sense.key == SenseKey.UNIT_ATTENTION:
                return RETRY
            if sense.key == SenseKey.ILLEGAL_REQUEST and \
                    sense.asc in (Asc.INVALID_COMMAND_OPCODE, Asc.INVALID_FIELD_IN_CDB):
                return errno.EREMOTEIO          # BLK_STS_TARGET
            if sense.key == SenseKey.NO_SENSE or sense.key == SenseKey.RECOVERED_ERROR:
                return 0
        return errno.EIO
    if host in (HostByte.DID_REQUEUE, HostByte.DID_IMM_RETRY, HostByte.DID_BUS_BUSY,
                HostByte.DID_SOFT_ERROR):
        return RETRY
    return errno.EIO                            # DID_ERROR, DID_NO_CONNECT, ...
