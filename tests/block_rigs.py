"""One in-process disk per block transport, behind the same small interface, for the engine
contract suite (tests/test_block_contract.py).

Each rig builds a real machine half of both sides: the guest's driver and the block engine,
the transport's real ring in guest memory, the host's backend and the shared image executor
over a real image file. The options are the engine's words; a rig maps them onto its
transport's configuration. A transport joins the suite by adding its rig to ``RIGS``.
"""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from backends.storage.executor import ImageExecutor
from tests.storvsc_rig import DEVICE_DIR, storvsc_machine
from tests.xen_rig import xen_machine
from vbusfs.block.engine import Engine
from vbusfs.block.gendisk import Disk
from vbusfs.sysfs import Tree


@dataclass
class BlockRig:
    transport: str
    engine: Engine
    disk: Disk
    image: Path                   # the image file behind the disk
    executor: ImageExecutor       # the backend's executor (for spies and injected faults)
    tree: Tree
    queue_dir: str                # path of the disk's queue/ directory in the tree
    #: errnos the transport's wire carries back as themselves; any other is EIO
    wire_errnos: frozenset[int]


@dataclass(frozen=True)
class Options:
    size: str = "4M"
    flush: bool = True
    barrier: bool = False         # ordered writes as barriers, where the transport has them
    discard: bool = True
    small_queue: bool = False     # the transport's smallest queue depth
    max_segments: int = 0         # 0: the transport's default; else at most this many
    pool_pages: int = 0           # 0: the driver's default
    sector_size: int = 512


RigFactory = Callable[[Path, Options], AbstractAsyncContextManager[BlockRig]]


@asynccontextmanager
async def blkif_rig(tmp: Path, opts: Options) -> AsyncIterator[BlockRig]:
    """Xen: blkfront on the blkif ring to blkback (persistent grants on)."""
    features = [f for f, on in (("flush", opts.flush), ("barrier", opts.barrier),
                                ("discard", opts.discard)) if on] + ["persistent"]
    indirect = 256 if not opts.max_segments or opts.max_segments > 256 else \
        0 if opts.max_segments <= 11 else opts.max_segments
    async with xen_machine(tmp, pool_pages=opts.pool_pages, size=opts.size,
                           features=features, sector_size=opts.sector_size,
                           max_ring_page_order=0 if opts.small_queue else 4,
                           indirect_segments=indirect) as rig:
        yield BlockRig("blkif", rig.engine, rig.disk, rig.image, rig.executor, rig.tree,
                       f"sys/devices/{rig.dev.name}/block/{rig.disk.name}/queue",
                       frozenset({0, errno.EIO, errno.EOPNOTSUPP}))


@asynccontextmanager
async def storvsc_rig(tmp: Path, opts: Options) -> AsyncIterator[BlockRig]:
    """VMBus: storvsc on a synthetic SCSI controller's channel to storvsp, LUN 0. SCSI has
    no barrier (ordered writes are single-stepped); flush is the write cache (WCE);
    discard is UNMAP; the queue depth is the guest's ring size (storvsc_ringbuffer_size);
    segments are the host's max transfer (sg_tablesize = max_transfer / 4 KiB + 1)."""
    lun = {"lun": 0, "size": opts.size, "write_cache": opts.flush, "discard": opts.discard,
           "sector_size": opts.sector_size}
    kw = {}
    if opts.max_segments:
        kw["max_transfer"] = max(1, opts.max_segments - 1) * 4096
    async with storvsc_machine(tmp, [lun], ring_bytes=8 * 1024 if opts.small_queue else
                               128 * 1024, pool_pages=opts.pool_pages or 1024,
                               **kw) as rig:
        sd = rig.sd(0)
        disk = rig.disk(0)
        assert sd.engine is not None and rig.storvsp.luns[0].executor is not None
        yield BlockRig("storvsc", sd.engine, disk, rig.images[0],
                       rig.storvsp.luns[0].executor, rig.tree,
                       f"{DEVICE_DIR}/host0/target0:0:0/0:0:0:0/block/{disk.name}/queue",
                       frozenset({0, errno.EIO}))


#: every transport the contract suite runs against (virtio-blk joins here)
RIGS: dict[str, RigFactory] = {"blkif": blkif_rig, "storvsc": storvsc_rig}
#: transports whose device can order writes with barriers
BARRIER_TRANSPORTS = frozenset({"blkif"})
