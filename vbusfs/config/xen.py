"""The ``[xen]`` section: the guest domain and its virtual disks."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vbusfs.config.common import (
    ConfigError,
    Key,
    MachineConfig,
    Section,
    convert,
    derive_guid,
    parse_size,
    section,
)
from vbusfs.protocols.guid import parse_guid
from vbusfs.protocols.xen.xenbus import Vdev, parse_vdev

__all__ = ["VBD_FEATURES", "VbdConfig", "XenConfig", "XEN", "VBD", "parse_xen"]

#: optional blkback features a disk may offer (reference/protocols.md §1.4)
VBD_FEATURES = ("flush", "barrier", "discard", "persistent")


@dataclass(frozen=True)
class VbdConfig:
    """One Xen virtual disk: what the toolstack writes and blkback serves."""

    vdev: Vdev
    image: Path
    size: int
    readonly: bool
    sector_size: int
    max_ring_page_order: int
    indirect_segments: int
    features: frozenset[str]
    key: str


@dataclass(frozen=True)
class XenConfig:
    domid: int
    uuid: uuid.UUID
    version: tuple[int, int]
    vbds: tuple[VbdConfig, ...] = field(default=())


XEN = Section("xen", "`[xen]`", "Present (even empty) = the machine has a Xen bus: xenstored, "
              "a toolstack and blkback in\ndomain 0, the guest in `domid`, and "
              "`/sys/hypervisor`.", {
    "domid": Key(int, "a domain id", 1, "integer", "the guest's domain id (1..32751)"),
    "uuid": Key(str, "a UUID", None, "UUID string",
                "`/vm/<uuid>` and `/sys/hypervisor/uuid`; blake3 of the machine name when "
                "absent", "derived"),
    "version": Key(str, "a Xen version such as \"4.17\"", "4.17", "string",
                   "the Xen version `/sys/hypervisor/version/*` shows"),
    "vbd": Key(list, "an array of tables", [], "array of tables", "the virtual disks"),
})
VBD = Section("xen.vbd", "`[[xen.vbd]]`", "", {
    "vdev": Key((str, int), "a virtual device such as \"xvda\" or 51712", ...,
                "string or integer",
                "`xvda`…, `xvda2` (a partition vdev), or the number (`51712`); names from "
                "`xvdq` on use the extended encoding `1<<28 \\| disk<<8`; `hd`/`sd` numbers "
                "map to `xvd` names as blkfront does. Two disks with the same name are an "
                "error."),
    "image": Key(str, "an image path", None, "path",
                 "the image, relative to `state_dir`; created sparse at `size`, mode 0600, "
                 "when it does not exist; an existing one must be whole sectors; locked while "
                 "mounted (a second mount gets \"in use\")",
                 "`<name>.img`"),
    "size": Key((str, int), "a size", "1G", "size",
                "the size of a new image (K/M/G/T); must be a multiple of `sector_size` and no "
                "larger than a file on its filesystem can be (not free space: images are "
                "sparse). An existing image keeps its size."),
    "readonly": Key(bool, "true or false", False, "boolean",
                    "a read-only disk (`info` 4, `ro` 1, `EROFS`); needs an existing image"),
    "sector_size": Key(int, "512, 1024, 2048 or 4096", 512, "integer",
                       "logical block size: 512, 1024, 2048 or 4096 (`sectors` stays in "
                       "512-byte units)"),
    "max_ring_page_order": Key(int, "0 to 4", 4, "integer",
                               "blkback's `max-ring-page-order` (0..4); the ring is min(this, "
                               "the frontend's 4)"),
    "indirect_segments": Key(int, "0 or 12 to 4096", 256, "integer",
                             "`feature-max-indirect-segments` (12..4096); `0` disables "
                             "indirect requests"),
    "features": Key(list, "a list of feature names", list(VBD_FEATURES), "list",
                    "which of `flush`, `barrier`, `discard`, `persistent` blkback offers. "
                    "Without `flush` and `barrier` the image is opened `O_DSYNC` and the "
                    "queue says `write through`.", "all four"),
})

def _parse_version(text: str) -> tuple[int, int]:
    parts = text.split(".")
    if len(parts) != 2 or not all(p.isdigit() for p in parts) or int(parts[1]) > 255:
        raise ValueError(f"not a Xen version: {text!r} (example: \"4.17\")")
    return int(parts[0]), int(parts[1])


def parse_xen(raw: Any, machine: MachineConfig) -> XenConfig:
    x = section("xen", raw, XEN)
    if not 1 <= x["domid"] < 0x7FF0:
        raise ConfigError("xen.domid", f"{x['domid']} is not a guest domain id (1..32751)")
    dom_uuid = convert("xen.uuid", parse_guid, x["uuid"]) if x["uuid"] else \
        derive_guid(machine.name, "xen", "uuid")
    version = convert("xen.version", _parse_version, x["version"])
    vbds: list[VbdConfig] = []
    seen: dict[str, str] = {}
    images: dict[Path, str] = {}
    for i, rawv in enumerate(x["vbd"]):
        key = f"xen.vbd[{i}]"
        v = section(key, rawv, VBD)
        vdev = convert(f"{key}.vdev", parse_vdev, v["vdev"])
        if vdev.name in seen:
            raise ConfigError(f"{key}.vdev", f"{vdev.name} is also {seen[vdev.name]}")
        seen[vdev.name] = key
        image = Path(v["image"] or f"{vdev.name}.img")
        if not image.is_absolute():
            image = machine.state_dir / image
        if image in images:
            raise ConfigError(f"{key}.image", f"{image} is also the image of {images[image]}")
        images[image] = key
        size = convert(f"{key}.size", parse_size, v["size"])
        if v["sector_size"] not in (512, 1024, 2048, 4096):
            raise ConfigError(f"{key}.sector_size", f"{v['sector_size']} is not 512, 1024, "
                              "2048 or 4096")
        if size <= 0 or size % v["sector_size"]:
            raise ConfigError(f"{key}.size", f"{size} is not a positive multiple of the "
                              f"{v['sector_size']}-byte sector size")
        if not 0 <= v["max_ring_page_order"] <= 4:
            raise ConfigError(f"{key}.max_ring_page_order",
                              f"{v['max_ring_page_order']} is not between 0 and 4")
        ind = v["indirect_segments"]
        if ind != 0 and not 12 <= ind <= 4096:
            raise ConfigError(f"{key}.indirect_segments", f"{ind} is not 0 (off) or between "
                              "12 and 4096 (8 pages of 512 segments)")
        feats = v["features"]
        for j, f in enumerate(feats):
            if f not in VBD_FEATURES:
                raise ConfigError(f"{key}.features[{j}]", f"unknown feature {f!r} (known: "
                                  + ", ".join(VBD_FEATURES) + ")")
        vbds.append(VbdConfig(vdev, image, size, v["readonly"], v["sector_size"],
                              v["max_ring_page_order"], ind, frozenset(feats), key))
    return XenConfig(x["domid"], dom_uuid, version, tuple(vbds))


