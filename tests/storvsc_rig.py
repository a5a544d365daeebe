"""An in-process VMBus machine with one synthetic SCSI controller, without FUSE: the real
VMBus host with storvsp over the LUNs of a config, the guest's VMBus bus with storvsc and
the SCSI midlayer, wired as the service wires them (vbusfs/machine/vmbus.py), with the knobs
tests turn (the host's versions and transfer limit, the guest's ring size and versions)."""

from __future__ import annotations

import tomllib
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from backends.vmbus.channel import ChannelSpec
from backends.vmbus.host import VmbusHost
from backends.vmbus.storvsp import HOST_VERSIONS, MAX_TRANSFER, Storvsp, disk_params
from vbusfs.block.gendisk import Disk
from vbusfs.config import parse
from vbusfs.drivers.scsi.host import POOL_PAGES, ScsiBus
from vbusfs.drivers.scsi.sd import SdDisk
from vbusfs.drivers.vmbus.bus import VmbusBus
from vbusfs.drivers.vmbus.storvsc import RING_BYTES, Storvsc, StorvscDriver
from vbusfs.platform.memory import GuestMemory
from vbusfs.platform.vmbus.synic import Synic
from vbusfs.protocols.vmbus import storvsc as sv
from vbusfs.sysfs import Tree

SCSI_CLASS = uuid.UUID("ba6163d9-04a1-4d29-b605-72e2ffb1dc7f")
INSTANCE = uuid.UUID("f8b3781a-1e82-4818-a1c3-63d806ec15bb")
DEVICE_DIR = f"sys/devices/LNXSYSTM:00/LNXSYBUS:00/ACPI0004:00/VMBUS:00/{INSTANCE}"


def lun_toml(luns: list[dict[str, Any]]) -> str:
    lines = ["[machine]", 'name = "rig"', 'memory = "64M"', "[[vmbus.device]]",
             'type = "scsi"', f'instance = "{INSTANCE}"']
    for lun in luns:
        lines.append("[[vmbus.device.lun]]")
        for k, v in lun.items():
            if isinstance(v, bool):
                lines.append(f"{k} = {str(v).lower()}")
            elif isinstance(v, int):
                lines.append(f"{k} = {v}")
            else:
                lines.append(f'{k} = "{v}"')
    return "\n".join(lines) + "\n"


@dataclass
class StorvscRig:
    tree: Tree
    memory: GuestMemory
    host: VmbusHost
    storvsp: Storvsp
    bus: VmbusBus
    driver: StorvscDriver
    scsi: ScsiBus
    images: dict[int, Path]
    synic: Synic

    @property
    def ctrl(self) -> Storvsc:
        dev = next(iter(self.bus.devices.values()))
        assert isinstance(dev.drvdata, Storvsc)
        return dev.drvdata

    def sd(self, lun: int = 0) -> SdDisk:
        host = next(iter(self.scsi.hosts.values()))
        sd = host.devices[(0, 0, lun)].disk
        assert isinstance(sd, SdDisk)
        return sd

    def disk(self, lun: int = 0) -> Disk:
        d = self.sd(lun).disk
        assert d is not None
        return d

    def read(self, path: str) -> str:
        node = self.tree.resolve(path)
        return node.render().decode()             # type: ignore[union-attr]


@asynccontextmanager
async def storvsc_machine(state_dir: Path, luns: list[dict[str, Any]] | None = None, *,
                          host_versions: tuple[int, ...] = HOST_VERSIONS,
                          max_transfer: int = MAX_TRANSFER,
                          guest_versions: tuple[int, ...] = sv.LINUX_VERSIONS,
                          ring_bytes: int = RING_BYTES, pool_pages: int = POOL_PAGES,
                          expect_ready: bool = True,
                          first_host: int = 0) -> AsyncIterator[StorvscRig]:
    """``first_host``: the SCSI host numbers taken before this controller's (the hosts of the
    controllers a large machine probes first)."""
    luns = [{"lun": 0, "size": "16M"}] if luns is None else luns
    cfg = parse(tomllib.loads(lun_toml(luns)), state_dir, "<test>")
    cfg.machine.state_dir.mkdir(parents=True, exist_ok=True)
    (dev,) = cfg.vmbus.devices
    memory = GuestMemory(cfg.machine.memory)
    tree = Tree()
    tree.root.makedirs("sys/devices")
    tree.root.dir("dev")
    control = tree.root.makedirs(".vbusfs/block")
    synic = Synic()
    model = Storvsp(dev.key, ((c.lun, disk_params(c, f"storvsp {c.key}")) for c in dev.luns),
                    versions=host_versions, max_transfer=max_transfer)
    host = VmbusHost(synic, memory, [ChannelSpec("scsi", SCSI_CLASS, INSTANCE, model,
                                                 monitor=True)])
    scsi = ScsiBus(tree, memory, control, pool_pages)
    for _ in range(first_host):
        scsi._host_ids.take()
    bus = VmbusBus(synic, memory, tree, cpus=2)
    driver = StorvscDriver(scsi, ring_bytes, versions=guest_versions)
    bus.register(driver)
    rig = StorvscRig(tree, memory, host, model, bus, driver, scsi,
                     {c.lun: c.image for c in dev.luns}, synic)
    async with trio.open_nursery() as nursery:
        await nursery.start(model.serve_images)
        await nursery.start(host.run)
        await nursery.start(bus.run)
        with trio.fail_after(10):
            await driver.settle()
        try:
            yield rig
        finally:
            with trio.fail_after(10):
                await bus.unload()
            nursery.cancel_scope.cancel()
