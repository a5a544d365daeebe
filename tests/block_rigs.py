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
from backends.vmbus.storvsp import MAX_TRANSFER
from tests.pci_rig import pci_machine
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
    few_segments: bool = False    # the fewest segments a command may have on the transport
    small_pool: bool = False      # room for one biggest command and a small one, no more
    sector_size: int = 512


RigFactory = Callable[[Path, Options], AbstractAsyncContextManager[BlockRig]]


@asynccontextmanager
async def blkif_rig(tmp: Path, opts: Options) -> AsyncIterator[BlockRig]:
    """Xen: blkfront on the blkif ring to blkback (persistent grants on)."""
    features = [f for f, on in (("flush", opts.flush), ("barrier", opts.barrier),
                                ("discard", opts.discard)) if on] + ["persistent"]
    indirect = 0 if opts.few_segments else 256             # 11 direct segments, or 256
    pool = (11 if opts.few_segments else 256) + 1 if opts.small_pool else 0
    async with xen_machine(tmp, pool_pages=pool, size=opts.size,
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
    # few segments: a 40 KiB maximum transfer (sg_tablesize 11, as blkif without indirect)
    max_transfer = 10 * 4096 if opts.few_segments else MAX_TRANSFER
    # a small pool: one biggest command's pages and one more
    pool = max_transfer // 4096 + 1 if opts.small_pool else 1024
    async with storvsc_machine(tmp, [lun], ring_bytes=8 * 1024 if opts.small_queue else
                               128 * 1024, pool_pages=pool,
                               max_transfer=max_transfer) as rig:
        sd = rig.sd(0)
        disk = rig.disk(0)
        assert sd.engine is not None and rig.storvsp.luns[0].executor is not None
        yield BlockRig("storvsc", sd.engine, disk, rig.images[0],
                       rig.storvsp.luns[0].executor, rig.tree,
                       f"{DEVICE_DIR}/host0/target0:0:0/0:0:0:0/block/{disk.name}/queue",
                       frozenset({0, errno.EIO}))


@asynccontextmanager
async def virtio_blk_rig(tmp: Path, opts: Options) -> AsyncIterator[BlockRig]:
    """virtio over PCI: virtio-blk on a modern function, indirect descriptors and EVENT_IDX
    on (the queue depth is then the queue size)."""
    features = [f for f, on in (("flush", opts.flush), ("discard", opts.discard)) if on]
    qsize = 16 if opts.small_queue or opts.few_segments else 256   # seg_max is qsize - 2
    dev: dict[str, object] = {
        "type": "virtio-blk", "size": opts.size, "sector_size": opts.sector_size,
        "features": [*features, "indirect", "event-idx"], "queue_size": qsize}
    # a command is its data pages and one indirect table
    pool = qsize - 2 + 1 + 2 if opts.small_pool else 0
    async with pci_machine(tmp, [dev], pool_pages=pool) as rig:
        yield BlockRig("virtio-blk", rig.engine, rig.disk, rig.image, rig.executor, rig.tree,
                       _disk_path(rig.disk) + "/queue",
                       frozenset({0, errno.EIO, errno.EOPNOTSUPP}))


def _disk_path(disk: Disk) -> str:
    assert disk.dir is not None
    return disk.dir.path().lstrip("/")


#: every transport the contract suite runs against
RIGS: dict[str, RigFactory] = {"blkif": blkif_rig, "storvsc": storvsc_rig,
                               "virtio-blk": virtio_blk_rig}
#: transports whose device can order writes with barriers
BARRIER_TRANSPORTS = frozenset({"blkif"})
