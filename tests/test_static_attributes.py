"""Which attributes are static (README, "Attributes the kernel caches"): the default machine
runs in-process (no FUSE), every static attribute is read once (its text is kept, as the
first reader's open keeps it), then the machine is churned the way users and hosts churn
one: every bound device unbound from its driver and bound again, a channel moved to another
CPU, I/O on every disk, a PCI function removed and rescanned, a SCSI disk deleted and the
host rescanned. A static attribute whose ``show`` now says something else than the text
kept would be served stale by the kernel: the test fails and names it."""

from __future__ import annotations

import inspect
import tomllib
from pathlib import Path

import trio

from backends.storage.files import make_state_dir
from vbusfs.config import DEFAULT_CONFIG, parse
from vbusfs.machine import Machine
from vbusfs.sysfs import Attribute, BlockFile, Directory, Node, Symlink, Tree


def _attributes(tree: Tree) -> list[Attribute]:
    return [n for n in tree.root.walk() if isinstance(n, Attribute)]


def _resolve(tree: Tree, path: str) -> Node:
    """``path`` from the root, following symlinks on the way (``sys/bus/*/devices/*``)."""
    node: Node = tree.root
    for part in path.strip("/").split("/"):
        while isinstance(node, Symlink):
            node = node.target
        assert isinstance(node, Directory), path
        node = node.children[part]
    return node


async def _write(tree: Tree, path: str, text: str) -> None:
    node = _resolve(tree, path)
    assert isinstance(node, Attribute), path
    result = node.write(text.encode())
    if inspect.isawaitable(result):
        await result


def _stale(tree: Tree) -> list[str]:
    """Static attributes in the tree whose ``show`` no longer gives the text kept."""
    out = []
    for a in _attributes(tree):
        if a.static:
            assert a.show is not None
            kept = a.render()
            if a.show().encode() != kept:
                out.append(f"{a.path()}: kept {kept!r}, now {a.show().encode()!r}")
    return out


async def _churn(tree: Tree, stale: list[str]) -> None:
    # every device bound to a driver: unbind, then bind again (storvsc takes its SCSI hosts
    # and disks with it, hv_utils its channels, sd its disk, virtio-pci its virtio device).
    # (The buses whose ``bind`` binds: xen and virtio devices are unbound only with their
    # parents here, and virtio's are, through virtio-pci.)
    for busname in ("vmbus", "pci", "scsi"):
        bus = tree.resolve(f"sys/bus/{busname}")
        assert isinstance(bus, Directory)
        drivers = bus.children.get("drivers")
        assert isinstance(drivers, Directory)
        for drv in list(drivers.children.values()):
            assert isinstance(drv, Directory)
            bound = [n.name for n in drv.children.values()
                     if isinstance(n, Symlink) and n.name != "module"]
            for name in bound:
                base = f"sys/bus/{bus.name}/drivers/{drv.name}"
                await _write(tree, f"{base}/unbind", name)
                stale += _stale(tree)            # unbound: DRIVER= is gone from uevent
                await _write(tree, f"{base}/bind", name)
    # a channel to the other CPU
    vmbus = tree.resolve("sys/bus/vmbus/devices")
    assert isinstance(vmbus, Directory)
    for link in vmbus.children.values():
        assert isinstance(link, Symlink) and isinstance(link.target, Directory)
        channels = link.target.children.get("channels")
        if isinstance(channels, Directory):
            for relid in channels.children:
                await _write(tree, f"{link.target.path()}/channels/{relid}/cpu", "1")
            break
    # I/O on every disk
    dev = tree.resolve("dev")
    assert isinstance(dev, Directory)
    for f in dev.children.values():
        if isinstance(f, BlockFile):
            await f.disk.write(0, await f.disk.read(0, 65536))
            await f.disk.flush()
    # hot-remove and rescan: a PCI function, a SCSI disk
    await _write(tree, "sys/bus/pci/devices/0000:00:04.0/remove", "1")
    await _write(tree, "sys/bus/pci/rescan", "1")
    scsi = tree.resolve("sys/bus/scsi/devices")
    assert isinstance(scsi, Directory)
    lun = next(n for n in scsi.children if n.endswith(":1"))
    await _write(tree, f"sys/bus/scsi/devices/{lun}/delete", "1")
    await _write(tree, f"sys/class/scsi_host/host{lun.split(':')[0]}/scan", "- - -")


async def test_static_attributes_stay_what_they_were_under_churn(tmp_path: Path) -> None:
    cfg = parse(tomllib.loads(DEFAULT_CONFIG), tmp_path, "<test>")
    make_state_dir(Path(cfg.machine.state_dir))
    machine = Machine(cfg)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(machine.run)
            tree = machine.tree
            attrs = _attributes(tree)
            static = [a for a in attrs if a.static]
            # no writable attribute is static (the constructor refuses it), and both kinds
            # are there in numbers
            assert not [a.path() for a in static if a.writable]
            assert len(static) > 100 and len(attrs) - len(static) > 100
            for a in static:
                a.render()
            stale: list[str] = []
            await _churn(tree, stale)
            assert stale + _stale(tree) == []
            # what the churn removed and brought back is new nodes, so new inode numbers:
            # the kernel's cache of the old ones cannot be served for them
            inos = {a.ino for a in static}
            back = _resolve(tree, "sys/bus/pci/devices/0000:00:04.0/vendor")
            assert isinstance(back, Attribute) and back.static and back.ino not in inos
            assert back.render() == b"0x1af4\n"
            await machine.stop()
            nursery.cancel_scope.cancel()
    finally:
        machine.close()
