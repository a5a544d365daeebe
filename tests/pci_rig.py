"""An in-process PCI machine without FUSE: the real PCI host with its virtio functions, and
the guest's PCI bus, virtio-pci, the virtio bus and virtio-blk, wired as the service wires
them."""

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
from vbusfs.drivers.virtio.blk import POOL_PAGES, _DiskState
from vbusfs.machine.pci import PciMachine
from vbusfs.platform.memory import GuestMemory
from vbusfs.sysfs import Tree


def pci_toml(devices: list[dict[str, Any]]) -> str:
    lines = ["[machine]", 'name = "rig"', 'memory = "64M"', "[pci]"]
    for dev in devices:
        lines.append("[[pci.device]]")
        for k, v in dev.items():
            if isinstance(v, bool):
                lines.append(f"{k} = {str(v).lower()}")
            elif isinstance(v, (int, list)):
                lines.append(f"{k} = {v!r}".replace("'", '"'))
            else:
                lines.append(f'{k} = "{v}"')
    return "\n".join(lines) + "\n"


@asynccontextmanager
async def pci_machine(state_dir: Path, devices: list[dict[str, Any]] | None = None,
                      force_legacy: bool = False, cpus: int = 2, pool_pages: int = 0
                      ) -> AsyncIterator[SimpleNamespace]:
    if devices is None:
        devices = [{"type": "virtio-blk", "size": "16M"}]
    cfg = parse(tomllib.loads(pci_toml(devices).replace('memory = "64M"',
                                                        f'memory = "64M"\ncpus = {cpus}')),
                state_dir, "<test>")
    cfg.machine.state_dir.mkdir(parents=True, exist_ok=True)
    tree = Tree()
    tree.root.makedirs("sys/devices")
    tree.root.dir("dev")
    memory = GuestMemory(cfg.machine.memory)
    control = tree.root.makedirs(".vbusfs/block")
    assert cfg.pci is not None
    pm = PciMachine(cfg.pci, cfg.machine, memory, tree, control, force_legacy=force_legacy,
                    blk_pool_pages=pool_pages or POOL_PAGES)
    async with trio.open_nursery() as nursery:
        await pm.start(nursery)
        disks = []
        for vdev in pm.virtio.devices.values():
            state = vdev.drvdata
            if isinstance(state, _DiskState) and state.disk is not None:
                disks.append(state)
        rig = SimpleNamespace(pm=pm, tree=tree, memory=memory, root=pm.root, states=disks,
                              functions=pm.host.functions)
        if disks:
            s = disks[0]
            slot = next(iter(pm.host.functions))
            fn = pm.host.functions[slot]
            rig.state, rig.disk, rig.engine = s, s.disk, s.engine
            rig.fn = fn
            rig.executor = fn.model.executor
            rig.image = fn.model.executor.image.path
        try:
            yield rig
        finally:
            await pm.stop(5)
            nursery.cancel_scope.cancel()


def disk_of(rig: SimpleNamespace) -> Disk:
    d = rig.disk
    assert isinstance(d, Disk)
    return d
