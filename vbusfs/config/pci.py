"""The ``[pci]`` section: a PCI root bus and the virtio functions in its slots."""

from __future__ import annotations

from dataclasses import dataclass
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
from vbusfs.protocols.virtio import ids

__all__ = ["PciConfig", "PciDeviceConfig", "PCI", "PCI_DEVICE", "BLK_FEATURES", "parse_pci",
           "FIRST_SLOT"]

#: what a virtio-blk device may offer; the transport's own two (indirect descriptors, event
#: index) included
BLK_FEATURES = ("flush", "discard", "write-zeroes", "topology", "multi-queue", "indirect",
                "event-idx")
_DEFAULT_BLK_FEATURES = ("flush", "discard", "write-zeroes", "topology", "indirect",
                         "event-idx")
#: keys only a virtio-blk device takes
_BLK_KEYS = ("image", "size", "readonly", "serial", "queue_size", "num_queues", "features",
             "sector_size")
FIRST_SLOT = 3               # slots picked for devices that name none start here


@dataclass(frozen=True)
class PciDeviceConfig:
    type: str                # a virtio type name (vbusfs.protocols.virtio.ids.TYPES)
    slot: int
    transitional: bool
    key: str
    # virtio-blk
    image: Path | None = None
    size: int = 0
    readonly: bool = False
    serial: str = ""
    queue_size: int = 256
    num_queues: int = 1
    features: frozenset[str] = frozenset()
    sector_size: int = 512
    # virtio-net
    mac: bytes = b""


@dataclass(frozen=True)
class PciConfig:
    devices: tuple[PciDeviceConfig, ...] = ()


PCI = Section("pci", "`[pci]`", "Present (even empty) = the machine has a PCI root bus "
              "`0000:00` with an Intel 440FX host bridge at\n00:00.0 and the virtio functions "
              "below; `/sys/bus/pci` and `/sys/bus/virtio`.", {
    "device": Key(list, "an array of tables", [], "array of tables",
                  "the functions, each in its own slot"),
})
PCI_DEVICE = Section("pci.device", "`[[pci.device]]`", "", {
    "type": Key(str, "a device type", ..., "string",
                "`" + "`, `".join(t.name for t in ids.TYPES) + "`"),
    "slot": Key(int, "a slot number", None, "integer 1–31",
                f"the PCI slot (device number); when absent the first free one from "
                f"{FIRST_SLOT}. Two functions in one slot are an error.", "next free"),
    "transport": Key(str, "\"modern\" or \"transitional\"", "modern", "string",
                     "`modern`: device id 0x1040 + virtio id, revision 1; `transitional`: "
                     "0x1000-based id, revision 0, with the legacy I/O BAR 0 as well (QEMU's "
                     "layouts)"),
    "image": Key(str, "an image path", None, "path",
                 "virtio-blk: the image, relative to `state_dir`; created sparse at `size`, "
                 "mode 0600, when it does not exist; an existing one must be whole sectors; "
                 "locked while mounted", "`vdX.img`"),
    "size": Key((str, int), "a size", "1G", "size",
                "virtio-blk: the size of a new image; a multiple of `sector_size`, no larger "
                "than a file on its filesystem can be"),
    "readonly": Key(bool, "true or false", False, "boolean",
                    "virtio-blk: read-only (`VIRTIO_BLK_F_RO`, `ro` 1, `EROFS`); needs an "
                    "existing image"),
    "serial": Key(str, "a serial number", None, "string (≤ 20 ASCII characters)",
                  "virtio-blk: what GET_ID answers (`serial` in sysfs); derived from the "
                  "machine name and slot when absent", "derived"),
    "queue_size": Key(int, "a queue size", 256, "integer",
                      "virtio-blk: entries per virtqueue, a power of two 16..1024 (QEMU's "
                      "`VIRTQUEUE_MAX_SIZE`; `seg_max` is this − 2)"),
    "num_queues": Key(int, "a queue count", 1, "integer 1–64",
                      "virtio-blk: request queues (more than 1 offers `multi-queue`)"),
    "sector_size": Key(int, "512, 1024, 2048 or 4096", 512, "integer",
                       "virtio-blk: logical block size (`blk_size`)"),
    "features": Key(list, "a list of feature names", list(_DEFAULT_BLK_FEATURES), "list",
                    "virtio-blk: which of `" + "`, `".join(BLK_FEATURES) + "` the device "
                    "offers. Without `flush` the image is opened `O_DSYNC` and the queue says "
                    "`write through`.", "all but `multi-queue`"),
    "mac": Key(str, "a MAC address", None, "string",
               "virtio-net: the MAC address (`52:54:00:xx:xx:xx` derived from the machine "
               "name and slot when absent)", "derived"),
}, outro="A key that another type takes (say, `image` on a `virtio-net`) is an error.")


def _mac(text: str) -> bytes:
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"not a MAC address: {text!r} (example: 52:54:00:12:34:56)")
    try:
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"not a MAC address: {text!r}") from None
    if mac[0] & 1:
        raise ValueError(f"{text} is a multicast address")
    return mac


def parse_pci(raw: Any, machine: MachineConfig) -> PciConfig:
    top = section("pci", raw, PCI)
    rows: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
    used: dict[int, str] = {}
    for i, rawd in enumerate(top["device"]):
        key = f"pci.device[{i}]"
        d = section(key, rawd, PCI_DEVICE)
        vtype = ids.type_by_name(d["type"])
        if vtype is None:
            raise ConfigError(f"{key}.type", f"unknown device type {d['type']!r} (known: " +
                              ", ".join(t.name for t in ids.TYPES) + ")")
        given = rawd if isinstance(rawd, dict) else {}
        if vtype.device_id != ids.DeviceId.BLOCK:
            for k in _BLK_KEYS:
                if k in given:
                    raise ConfigError(f"{key}.{k}", f"a {vtype.name} takes no {k}")
        if vtype.device_id != ids.DeviceId.NET and "mac" in given:
            raise ConfigError(f"{key}.mac", f"a {vtype.name} takes no mac")
        if d["slot"] is not None:
            if not 1 <= d["slot"] <= 31:
                raise ConfigError(f"{key}.slot", f"{d['slot']} is not a slot (1..31; 0 is "
                                  "the host bridge)")
            if d["slot"] in used:
                raise ConfigError(f"{key}.slot", f"slot {d['slot']} is also "
                                  f"{used[d['slot']]}")
            used[d["slot"]] = key
        if d["transport"] not in ("modern", "transitional"):
            raise ConfigError(f"{key}.transport", f"{d['transport']!r} is not \"modern\" or "
                              "\"transitional\"")
        rows.append((key, d, given))
    devices: list[PciDeviceConfig] = []
    free = (s for s in range(FIRST_SLOT, 32) if s not in used)
    for key, d, _ in rows:
        if d["slot"] is None:
            slot = next(free, None)
            if slot is None:
                raise ConfigError(f"{key}.slot", "no free slot left on bus 0")
            d["slot"] = slot
            used[slot] = key
    disk_order = sorted((d["slot"], key) for key, d, _ in rows if d["type"] == "virtio-blk")
    letters = {key: chr(ord("a") + n) if n < 26 else f"x{n}" for n, (_, key) in
               enumerate(disk_order)}
    images: dict[Path, str] = {}
    for key, d, _ in rows:
        transitional = d["transport"] == "transitional"
        if d["type"] == "virtio-net":
            mac = convert(f"{key}.mac", _mac, d["mac"]) if d["mac"] else \
                b"\x52\x54\x00" + derive_guid(machine.name, "pci", str(d["slot"])).bytes[:3]
            devices.append(PciDeviceConfig(d["type"], d["slot"], transitional, key, mac=mac))
            continue
        if d["type"] != "virtio-blk":
            devices.append(PciDeviceConfig(d["type"], d["slot"], transitional, key))
            continue
        devices.append(_blk(key, d, machine, transitional, letters[key], images))
    return PciConfig(tuple(sorted(devices, key=lambda c: c.slot)))


def _blk(key: str, d: dict[str, Any], machine: MachineConfig, transitional: bool, letter: str,
         images: dict[Path, str]) -> PciDeviceConfig:
    image = Path(d["image"] or f"vd{letter}.img")
    if not image.is_absolute():
        image = machine.state_dir / image
    if image in images:
        raise ConfigError(f"{key}.image", f"{image} is also the image of {images[image]}")
    images[image] = key
    ss = d["sector_size"]
    if ss not in (512, 1024, 2048, 4096):
        raise ConfigError(f"{key}.sector_size", f"{ss} is not 512, 1024, 2048 or 4096")
    size = convert(f"{key}.size", parse_size, d["size"])
    if size <= 0 or size % ss:
        raise ConfigError(f"{key}.size", f"{size} is not a positive multiple of the {ss}-byte "
                          "sector size")
    qs = d["queue_size"]
    if not 16 <= qs <= 1024 or qs & (qs - 1):
        raise ConfigError(f"{key}.queue_size", f"{qs} is not a power of two from 16 to 1024")
    if not 1 <= d["num_queues"] <= 64:
        raise ConfigError(f"{key}.num_queues", f"{d['num_queues']} is not between 1 and 64")
    for j, f in enumerate(d["features"]):
        if not isinstance(f, str) or f not in BLK_FEATURES:
            raise ConfigError(f"{key}.features[{j}]", f"unknown feature {f!r} (known: " +
                              ", ".join(BLK_FEATURES) + ")")
    serial = d["serial"] if d["serial"] is not None else \
        derive_guid(machine.name, "pci", str(d["slot"])).hex[:20]
    if len(serial) > 20 or not serial.isascii() or not serial.isprintable():
        raise ConfigError(f"{key}.serial", f"{serial!r} is not at most 20 printable ASCII "
                          "characters")
    return PciDeviceConfig(d["type"], d["slot"], transitional, key, image, size, d["readonly"],
                           serial, qs, d["num_queues"], frozenset(d["features"]), ss)
