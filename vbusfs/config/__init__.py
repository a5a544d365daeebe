"""The machine config: TOML, validated completely before anything is built or mounted.

Every problem is reported as :class:`ConfigError` with the key path that caused it
(``vmbus.device[2].instance``). One table per section (:data:`SECTIONS`) drives both the
validation and the reference, docs/config.md, which is generated from it
(``python -m vbusfs.config > docs/config.md``; a test keeps the two equal): each row is a
key, its types, its default, and how the reference describes it.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from vbusfs.config.common import (
    MACHINE,
    ConfigError,
    Key,
    MachineConfig,
    derive_guid,
    no_unknown,
    parse_machine,
    parse_size,
)
from vbusfs.config.pci import PCI, PCI_DEVICE, PciConfig, PciDeviceConfig, parse_pci
from vbusfs.config.vmbus import (
    VMBUS,
    VMBUS_DEVICE,
    VMBUS_IC,
    VMBUS_LUN,
    IcConfig,
    ScsiLunConfig,
    VmbusConfig,
    VmbusDeviceConfig,
    parse_vmbus,
)
from vbusfs.config.xen import VBD, VBD_FEATURES, XEN, VbdConfig, XenConfig, parse_xen

__all__ = ["ConfigError", "Config", "MachineConfig", "VmbusConfig", "VmbusDeviceConfig",
           "IcConfig", "ScsiLunConfig", "XenConfig", "VbdConfig", "VBD_FEATURES", "load",
           "load_default", "parse", "DEFAULT_CONFIG", "derive_guid", "parse_size", "SECTIONS",
           "reference", "PciConfig", "PciDeviceConfig", "DiskImage"]


@dataclass(frozen=True)
class Config:
    machine: MachineConfig
    vmbus: VmbusConfig
    source: str = "<embedded default>"
    xen: XenConfig | None = None
    pci: PciConfig | None = None

    def disks(self) -> list[DiskImage]:
        return disk_images(self.vmbus, self.xen, self.pci)


#: every section, in the order the reference lists them
SECTIONS = (MACHINE, VMBUS, VMBUS_DEVICE, VMBUS_LUN, VMBUS_IC, XEN, VBD, PCI, PCI_DEVICE)


def _shown(key: Key) -> str:
    if key.shown_default is not None:
        return key.shown_default
    if key.default is ...:
        return "required"
    if isinstance(key.default, bool):
        return f"`{str(key.default).lower()}`"
    if isinstance(key.default, str):
        return f'`"{key.default}"`'
    return f"`{key.default!r}`"


def reference() -> str:
    """docs/config.md, from the tables."""
    out = ["# Machine config reference", "",
           "TOML. Every key below is checked; anything else is an error naming its key path.",
           "This page is generated from the tables in `vbusfs/config.py` "
           "(`python -m vbusfs.config > docs/config.md`).", ""]
    for s in SECTIONS:
        out += [f"## {s.heading}", ""]
        if s.intro:
            out += [s.intro, ""]
        out += ["| key | type | default | meaning |", "|---|---|---|---|"]
        out += [f"| `{name}` | {k.kind} | {_shown(k)} | {k.doc} |" for name, k in s.keys.items()]
        out += [""]
        if s.outro:
            out += [s.outro, ""]
    return "\n".join(out)


def parse(doc: dict[str, Any], base_dir: Path, source: str) -> Config:
    no_unknown("", doc, {"machine": 0, "vmbus": 0, "xen": 0, "pci": 0})
    if "machine" not in doc:
        raise ConfigError("machine", "missing (required)")
    machine = parse_machine(doc["machine"], base_dir)
    vmbus = parse_vmbus(doc.get("vmbus", {}), machine)
    xen = parse_xen(doc["xen"], machine) if "xen" in doc else None
    pci = parse_pci(doc["pci"], machine) if "pci" in doc else None
    _one_disk_per_image(vmbus, xen, pci)
    return Config(machine, vmbus, source, xen, pci)


class DiskImage(NamedTuple):
    """What every bus's disk says about its image: where, how big a new one is, its
    sector size, whether it is read-only, and the key path of the disk's table."""

    image: Path
    size: int
    sector_size: int
    readonly: bool
    key: str


def disk_images(vmbus: VmbusConfig, xen: XenConfig | None,
                pci: PciConfig | None) -> list[DiskImage]:
    """Every disk of the machine, SCSI LUNs, then Xen disks, then virtio-blk functions."""
    out = [DiskImage(lun.image, lun.size, lun.sector_size, lun.readonly, lun.key)
           for dev in vmbus.devices for lun in dev.luns]
    out += [DiskImage(v.image, v.size, v.sector_size, v.readonly, v.key)
            for v in (xen.vbds if xen else ())]
    out += [DiskImage(d.image, d.size, d.sector_size, d.readonly, d.key)
            for d in (pci.devices if pci else ()) if d.image is not None]
    return out


def _one_disk_per_image(vmbus: VmbusConfig, xen: XenConfig | None,
                        pci: PciConfig | None) -> None:
    """Each bus checks its own disks; an image is also never two buses' disk at once."""
    owner: dict[Path, str] = {}
    for disk in disk_images(vmbus, xen, pci):
        if disk.image in owner:
            raise ConfigError(f"{disk.key}.image",
                              f"{disk.image} is also the image of {owner[disk.image]}")
        owner[disk.image] = disk.key


def load(path: str | os.PathLike[str]) -> Config:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError("", f"cannot read {p}: {e.strerror}") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("", f"not valid TOML: {e}") from None
    return parse(doc, p.resolve().parent, str(p))


#: A typical Hyper-V generation-2 guest, plus two Xen virtual disks (xvda 1 GiB, xvdb 256 MiB)
#: and a PCI bus with QEMU's virtio-net, virtio-blk (vda, 512 MiB), virtio-rng and
#: virtio-balloon, so all three buses and their block paths are there out of the box (images
#: sparse in the state directory). The integration services and the first SCSI controller
#: use the instance GUIDs Hyper-V/Azure use (reference/hv-services.md §2.7, reference/sysfs.md
#: §1.5), so tools find them; that controller carries an OS disk at LUN 0 and a resource disk
#: at LUN 1, where a cloud agent looks for them on a Gen2 Azure guest (reference/sysfs.md
#: §5.4–5.5).
DEFAULT_CONFIG = """\
[machine]
name = "hyperv-gen2"
state_dir = "hyperv-gen2"
cpus = 2
memory = "64M"

[vmbus]
version = "5.3"

[[vmbus.device]]
type = "shutdown"
instance = "b6650ff7-33bc-4840-8048-e0676786f393"

[[vmbus.device]]
type = "timesync"
instance = "2dd1ce17-079e-403c-b352-a1921ee207ee"

[[vmbus.device]]
type = "heartbeat"
instance = "fd149e91-82e0-4a7d-afa6-2a4166cbd7c0"

[[vmbus.device]]
type = "kvp"
instance = "242ff919-07db-4180-9c2e-b86cb68c8c55"

[[vmbus.device]]
type = "vss"

[[vmbus.device]]
type = "fcopy"
instance = "eb765408-105f-49b6-b4aa-c123b64d17d4"

[[vmbus.device]]
type = "balloon"

[[vmbus.device]]
type = "keyboard"

[[vmbus.device]]
type = "mouse"

[[vmbus.device]]
type = "framebuffer"

[[vmbus.device]]
type = "nic"

[[vmbus.device]]
type = "scsi"
instance = "f8b3781a-1e82-4818-a1c3-63d806ec15bb"

[[vmbus.device.lun]]
lun = 0
size = "1G"

[[vmbus.device.lun]]
lun = 1
size = "512M"

[xen]
domid = 1

[[xen.vbd]]
vdev = "xvda"
size = "1G"

[[xen.vbd]]
vdev = "xvdb"
size = "256M"

[pci]

[[pci.device]]
type = "virtio-net"
slot = 3

[[pci.device]]
type = "virtio-blk"
slot = 4
size = "512M"

[[pci.device]]
type = "virtio-rng"
slot = 5

[[pci.device]]
type = "virtio-balloon"
slot = 6
"""


def default_state_root() -> Path:
    env = os.environ.get("VBUSFS_STATE")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/vbusfs")
    return Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local/state")) / "vbusfs"


def load_default() -> Config:
    return parse(tomllib.loads(DEFAULT_CONFIG), default_state_root(), "<embedded default>")

