"""virtio-blk (virtio 1.x §5.2, ``virtio_blk.h``; reference/protocols.md §2.2–2.4): request
header and types, status byte, the configuration layout and the device feature bits."""

from __future__ import annotations

import struct

__all__ = ["OUTHDR", "T_IN", "T_OUT", "T_FLUSH", "T_FLUSH_OUT", "T_GET_ID", "T_DISCARD",
           "T_WRITE_ZEROES", "S_OK", "S_IOERR", "S_UNSUPP", "ID_BYTES", "SECTOR",
           "DISCARD_SEG", "WRITE_ZEROES_FLAG_UNMAP", "CONFIG", "CONFIG_SIZE", "F_SIZE_MAX",
           "F_SEG_MAX", "F_GEOMETRY", "F_RO", "F_BLK_SIZE", "F_FLUSH", "F_TOPOLOGY",
           "F_CONFIG_WCE", "F_MQ", "F_DISCARD", "F_WRITE_ZEROES", "FEATURE_NAMES"]

#: ``struct virtio_blk_outhdr``: type le32, ioprio (reserved) le32, sector le64
OUTHDR = struct.Struct("<IIQ")
T_IN = 0
T_OUT = 1
T_FLUSH = 4
T_FLUSH_OUT = 5             # legacy synonym
T_GET_ID = 8
T_DISCARD = 11
T_WRITE_ZEROES = 13
S_OK = 0
S_IOERR = 1
S_UNSUPP = 2
ID_BYTES = 20               # VIRTIO_BLK_ID_BYTES: GET_ID's buffer
SECTOR = 512                # sectors are 512 bytes whatever blk_size says

#: ``struct virtio_blk_discard_write_zeroes``: sector le64, num_sectors le32, flags le32
DISCARD_SEG = struct.Struct("<QII")
WRITE_ZEROES_FLAG_UNMAP = 0x1

#: ``struct virtio_blk_config`` through write_zeroes_may_unmap and its padding (60 bytes):
#: capacity, size_max, seg_max, geometry (cylinders, heads, sectors), blk_size,
#: physical_block_exp, alignment_offset, min_io_size, opt_io_size, wce, unused, num_queues,
#: max_discard_sectors, max_discard_seg, discard_sector_alignment, max_write_zeroes_sectors,
#: max_write_zeroes_seg, write_zeroes_may_unmap, unused[3]
CONFIG = struct.Struct("<QIIHBBIBBHIBxHIIIIIB3x")
CONFIG_SIZE = CONFIG.size

F_SIZE_MAX = 1
F_SEG_MAX = 2
F_GEOMETRY = 4
F_RO = 5
F_BLK_SIZE = 6
F_FLUSH = 9
F_TOPOLOGY = 10
F_CONFIG_WCE = 11
F_MQ = 12
F_DISCARD = 13
F_WRITE_ZEROES = 14

#: config-file feature names → the device feature bits they switch on
FEATURE_NAMES = {"flush": (F_FLUSH,), "discard": (F_DISCARD,),
                 "write-zeroes": (F_WRITE_ZEROES,), "topology": (F_TOPOLOGY,),
                 "multi-queue": (F_MQ,)}
