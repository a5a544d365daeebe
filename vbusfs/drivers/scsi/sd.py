"""sd: the SCSI disk driver (Linux ``drivers/scsi/sd.c``), bus-neutral.

Probe (``sd_revalidate_disk``): TEST UNIT READY, READ CAPACITY(16) first (the device is
beyond SPC-2, ``sd_try_rc16_first``) and (10) if that fails, the write-protect bit from MODE
SENSE(6) of all pages, the caching page (WCE, and DPOFUA from the header), then the block
limits (0xB0), characteristics (0xB1) and provisioning (0xB2) VPD pages the scan read.
From them the queue limits: logical and physical block size, flush when the write cache is
on, discard by UNMAP when the disk is thin-provisioned (READ CAPACITY(16) LBPME) and says
LBPU with a maximum unmap count, non-rotational when 0xB1 says a rotation rate of 1 (a SCSI
queue is rotational otherwise).

I/O: the engine's commands become READ/WRITE(10) (16 when the LBA or the disk needs more
than 32 bits), SYNCHRONIZE CACHE(10) and UNMAP with its parameter list in a page of its own.

Names and numbers: ``sd_format_disk_name`` (sda … sdz, sdaa …) and ``sd_major`` (the first
16 disks on major 8, then 65–71, then 128–135), 16 minors a disk.
"""

from __future__ import annotations

import errno
import logging
import struct

from vbusfs.block.contract import SECTOR, Command, Limits, Op
from vbusfs.block.engine import Engine
from vbusfs.block.gendisk import Disk
from vbusfs.drivers.scsi.device import (
    RETRY,
    CmdResult,
    Direction,
    HostByte,
    ScsiDevice,
    ScsiRequest,
    decide,
    execute,
)
from vbusfs.platform.memory import PAGE_SIZE, GuestMemory
from vbusfs.protocols import scsi
from vbusfs.protocols.scsi import Status

log = logging.getLogger(__name__)

__all__ = ["SdDisk", "sd_disk_name", "sd_devt", "SD_MINORS", "SCSI_DISK0_MAJOR",
           "SD_MAX_WS16_BLOCKS", "SD_DISK_DMA_ALIGNMENT"]

SD_MINORS = 16
#: include/uapi/linux/major.h
SCSI_DISK0_MAJOR = 8
SCSI_DISK1_MAJOR = 65
SCSI_DISK8_MAJOR = 128
#: the most blocks one UNMAP/WRITE SAME(16) may name (sd.h SD_MAX_WS16_BLOCKS)
SD_MAX_WS16_BLOCKS = 0x7FFFFF
#: a SCSI queue's DMA alignment: max(4, the cache line) − 1 (``__scsi_init_queue``; 64-byte
#: lines on x86)
SD_DISK_DMA_ALIGNMENT = 63
_UNMAP_PARAM_LEN = 24            # one descriptor: 8-byte header + 16
_DID_OK = int(HostByte.DID_OK)
_DATA_OPS = frozenset({Op.READ, Op.WRITE})


def sd_disk_name(index: int) -> str:
    """``sd_format_disk_name("sd", index)``: base 26 without a zero digit."""
    out = ""
    index += 1
    while index:
        index, rem = divmod(index - 1, 26)
        out = chr(ord("a") + rem) + out
    return "sd" + out


def sd_devt(index: int) -> tuple[int, int]:
    """(major, first minor) of disk ``index`` (``sd_major``, ``sd_probe``)."""
    major_idx = (index & 0xF0) >> 4
    if major_idx == 0:
        major = SCSI_DISK0_MAJOR
    elif major_idx < 8:
        major = SCSI_DISK1_MAJOR + major_idx - 1
    else:
        major = SCSI_DISK8_MAJOR + major_idx - 8
    return major, ((index & 0xF) << 4) | (index & 0xFFF00)


class SdDisk:
    """What sd knows about one disk (``struct scsi_disk``) and the commands it builds."""

    def __init__(self, sdev: ScsiDevice, index: int, memory: GuestMemory) -> None:
        self.sdev = sdev
        self.index = index
        self.name = sd_disk_name(index)
        self.major, self.minor = sd_devt(index)
        self.memory = memory
        self.blocks = 0
        self.block_size = 512
        self.phys_exp = 0
        self.write_prot = False
        self.wce = False
        self.rcd = False
        self.dpofua = False
        self.lbpme = False
        self.lbpvpd = False
        self.lbpu = False
        self.lbpws = False
        self.max_unmap_blocks = 0
        self.unmap_granularity = 0
        self.rotation = 0
        self.use16 = False
        # scsi_disk attributes that only hold a setting
        self.allow_restart = 0
        self.manage_start_stop = 0
        self.max_medium_access_timeouts = 2     # SD_MAX_MEDIUM_TIMEOUTS
        self.max_retries = 5                    # SD_MAX_RETRIES
        self.engine: Engine | None = None
        self.disk: Disk | None = None

    # -- probe -------------------------------------------------------------------------------
    async def _cmd(self, cdb: bytes, length: int) -> CmdResult:
        d = Direction.FROM_DEVICE if length else Direction.NONE
        return await execute(self.sdev, cdb, d, length)

    async def revalidate(self) -> None:
        """``sd_revalidate_disk``. Raises OSError when the capacity cannot be read."""
        for _ in range(3):                       # sd_spinup_disk: a unit attention passes
            r = await self._cmd(bytes(6), 0)
            if decide(r) != RETRY:
                break
        await self._read_capacity()
        r = await self._cmd(scsi.cdb_mode_sense6(scsi.MODE_PAGE_ALL, 4), 4)
        if r.status == Status.GOOD and len(r.data) >= 4:
            self.write_prot = bool(r.data[2] & scsi.MODE_DSP_WP)
        await self._read_cache_type()
        self._read_vpd_limits()

    async def _read_capacity(self) -> None:
        r = await self._cmd(scsi.cdb_read_capacity16(), 32)
        if r.host == 0 and r.status == Status.GOOD and len(r.data) >= 12:
            last, bs = struct.unpack_from(">QI", r.data)
            self.blocks = last + 1
            self.phys_exp = r.data[13] & 0x0F if len(r.data) > 13 else 0
            self.lbpme = bool(r.data[14] & 0x80) if len(r.data) > 14 else False
        else:
            r = await self._cmd(scsi.cdb_read_capacity10(), 8)
            if r.host != 0 or r.status != Status.GOOD or len(r.data) < 8:
                raise OSError(errno.EIO, f"{self.name}: READ CAPACITY failed")
            last, bs = struct.unpack_from(">II", r.data)
            self.blocks = last + 1
        if bs not in (512, 1024, 2048, 4096):
            raise OSError(errno.EIO, f"{self.name}: unsupported sector size {bs}")
        self.block_size = bs
        self.use16 = self.blocks > 0xFFFFFFFF

    async def _read_cache_type(self) -> None:
        r = await self._cmd(scsi.cdb_mode_sense6(scsi.MODE_PAGE_CACHING, 4), 4)
        data = r.data
        if r.status == Status.GOOD and len(data) >= 4 and data[0] + 1 > 4:
            want = min(data[0] + 1, 255)
            r = await self._cmd(scsi.cdb_mode_sense6(scsi.MODE_PAGE_CACHING, want), want)
            data = r.data
        if r.status != Status.GOOD or len(data) < 4:
            log.info("%s: assuming drive cache: write through", self.name)
            return
        self.dpofua = bool(data[2] & scsi.MODE_DSP_DPOFUA)
        at = 4 + data[3]                          # after the block descriptors
        if len(data) >= at + 3 and data[at] & 0x3F == scsi.MODE_PAGE_CACHING:
            self.wce = bool(data[at + 2] & scsi.CACHING_WCE)
            self.rcd = bool(data[at + 2] & 0x01)
        else:
            log.info("%s: assuming drive cache: write through", self.name)

    def _read_vpd_limits(self) -> None:
        """``sd_read_block_limits``, ``sd_read_block_characteristics``,
        ``sd_read_block_provisioning`` from the pages the scan cached."""
        b0 = self.sdev.vpd.get(scsi.VPD_BLOCK_LIMITS, b"")
        if len(b0) >= 64 and self.lbpme:
            lba_count, desc_count, gran = struct.unpack_from(">III", b0, 20)
            if lba_count and desc_count:
                self.max_unmap_blocks = lba_count
            self.unmap_granularity = gran
        b1 = self.sdev.vpd.get(scsi.VPD_BDC, b"")
        if len(b1) >= 6:
            self.rotation = struct.unpack_from(">H", b1, 4)[0]
        b2 = self.sdev.vpd.get(scsi.VPD_LBP, b"")
        if len(b2) >= 6:
            self.lbpvpd = True
            self.lbpu = bool(b2[5] & 0x80)
            self.lbpws = bool(b2[5] & 0x40)

    @property
    def provisioning_mode(self) -> str:
        """``sd_config_discard``'s choice, as ``provisioning_mode`` prints it."""
        if not self.lbpme:
            return "full"
        if not self.lbpvpd:
            return "unmap" if self.max_unmap_blocks else "writesame_16"
        if self.lbpu and self.max_unmap_blocks:
            return "unmap"
        return "disabled"

    def limits(self) -> Limits:
        """The queue limits: the host's (transfer, segments; a virt boundary makes the
        segment size unlimited) and the disk's."""
        a = self.sdev.adapter
        lbs = self.block_size
        discard = self.provisioning_mode == "unmap"
        max_blocks = min(self.max_unmap_blocks, SD_MAX_WS16_BLOCKS) if discard else 0
        return Limits(
            max_segments=a.sg_tablesize, max_segment_size=0xFFFFFFFF,
            max_transfer=a.max_sectors * SECTOR // PAGE_SIZE * PAGE_SIZE,
            logical_block_size=lbs, physical_block_size=lbs << self.phys_exp,
            dma_alignment=SD_DISK_DMA_ALIGNMENT,
            discard_granularity=max(lbs << self.phys_exp,
                                    self.unmap_granularity * lbs) if discard else 0,
            max_discard_bytes=max_blocks * lbs,
            flush=self.wce, barrier=False, fua=self.dpofua, rotational=self.rotation != 1)

    @property
    def sectors(self) -> int:
        return self.blocks * self.block_size // SECTOR

    # -- I/O ---------------------------------------------------------------------------------
    def setup(self, cmd: Command) -> ScsiRequest:
        """``sd_init_command``: the CDB and data of one engine command."""
        self.sdev.iorequest_cnt += 1
        lba = cmd.sector * SECTOR // self.block_size
        if cmd.op == Op.READ or cmd.op == Op.WRITE:
            write = cmd.op == Op.WRITE
            return ScsiRequest(scsi.cdb_rw(write, lba, cmd.nbytes // self.block_size,
                                           self.use16),
                               Direction.TO_DEVICE if write else Direction.FROM_DEVICE,
                               cmd.nbytes, cmd.pages)
        if cmd.op == Op.FLUSH:
            return ScsiRequest(scsi.cdb_sync_cache10(), Direction.NONE, 0, [])
        # DISCARD: UNMAP, one descriptor, the parameter list in the command's own page
        blocks = cmd.nsectors * SECTOR // self.block_size
        page = cmd.extra_pages[0]
        params = scsi.unmap_list([(lba, blocks)])
        self.memory.view(page)[:len(params)] = params
        return ScsiRequest(scsi.cdb_unmap(_UNMAP_PARAM_LEN), Direction.TO_DEVICE,
                           _UNMAP_PARAM_LEN, [page])

    def extra_pages_for(self, op: Op) -> int:
        return 1 if op == Op.DISCARD else 0

    def finish(self, cmd: Command, result: CmdResult) -> int:
        """``sd_done`` + ``scsi_io_completion``: 0, an errno, or RETRY. A read or write that
        moved less than asked failed (the engine has no partial completions)."""
        # decide() answers 0 at once for DID_OK and GOOD, the usual answer
        err = 0 if result.host == _DID_OK and result.status == Status.GOOD else \
            decide(result)
        if err == 0 and cmd.op in _DATA_OPS and result.transferred != cmd.nbytes:
            err = errno.EIO
        if err != RETRY:
            self.sdev.iodone_cnt += 1
            if err:
                self.sdev.ioerr_cnt += 1
        return err
