"""An in-process Xen machine without FUSE: the real xenstored, toolstack, blkback, xenstore
client, xenbus and blkfront, wired exactly as the service wires them."""

from __future__ import annotations

import tomllib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import trio

from vbusfs.block.gendisk import Disk
from vbusfs.config import parse
from vbusfs.drivers.xen.blkfront import Blkfront
from vbusfs.machine.xen import XenMachine
from vbusfs.platform.memory import GuestMemory
from vbusfs.sysfs import Tree


def vbd_toml(**disk: Any) -> str:
    lines = ["[machine]", 'name = "rig"', 'memory = "64M"', "[xen]", "[[xen.vbd]]"]
    disk.setdefault("vdev", "xvda")
    disk.setdefault("size", "16M")
    for k, v in disk.items():
        if isinstance(v, bool):
            lines.append(f"{k} = {str(v).lower()}")
        elif isinstance(v, (int, list)):
            lines.append(f"{k} = {v!r}".replace("'", '"'))
        else:
            lines.append(f'{k} = "{v}"')
    return "\n".join(lines) + "\n"


@asynccontextmanager
async def xen_machine(state_dir: Path, ring_start: int = 0, pool_pages: int = 0, **disk: Any
                      ) -> AsyncIterator[SimpleNamespace]:
    cfg = parse(tomllib.loads(vbd_toml(**disk)), state_dir, "<test>")
    cfg.machine.state_dir.mkdir(parents=True, exist_ok=True)
    tree = Tree()
    tree.root.makedirs("sys/devices")
    tree.root.dir("dev")
    memory = GuestMemory(cfg.machine.memory)
    control = tree.root.makedirs(".vbusfs/block")
    assert cfg.xen is not None
    xm = XenMachine(cfg.xen, cfg.machine, memory, tree, control)
    xm.env.ring_start = ring_start
    if pool_pages:
        xm.env.pool_pages = pool_pages
    async with trio.open_nursery() as nursery:
        await xm.start(nursery)
        dev = next(iter(xm.xenbus.devices.values()))
        front = dev.drvdata
        assert isinstance(front, Blkfront) and front.disk is not None
        rig = SimpleNamespace(xm=xm, tree=tree, memory=memory, dev=dev, front=front,
                              disk=front.disk, engine=front.engine, back=xm.blkbacks[0],
                              grants=xm.grants, image=xm.specs[0].image,
                              executor=xm.blkbacks[0].executor)
        try:
            yield rig
        finally:
            await xm.xenbus.close_all(5)
            nursery.cancel_scope.cancel()


def disk_of(rig: SimpleNamespace) -> Disk:
    d = rig.disk
    assert isinstance(d, Disk)
    return d
