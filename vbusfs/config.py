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
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import blake3

from vbusfs.protocols.guid import parse_guid
from vbusfs.protocols.vmbus import messages as m
from vbusfs.protocols.xen.xenbus import Vdev, parse_vdev

__all__ = ["ConfigError", "Config", "MachineConfig", "VmbusDeviceConfig", "XenConfig",
           "VbdConfig", "VBD_FEATURES", "load", "load_default", "parse", "DEFAULT_CONFIG",
           "derive_guid", "parse_size", "SECTIONS", "reference"]

#: optional blkback features a disk may offer (reference/protocols.md §1.4)
VBD_FEATURES = ("flush", "barrier", "discard", "persistent")


class ConfigError(ValueError):
    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key


@dataclass(frozen=True)
class MachineConfig:
    name: str
    state_dir: Path
    cpus: int
    memory: int


@dataclass(frozen=True)
class VmbusDeviceConfig:
    type: str
    instance: uuid.UUID
    monitor: bool
    key: str          # where it came from, e.g. "vmbus.device[3]"


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


@dataclass(frozen=True)
class Config:
    machine: MachineConfig
    vmbus_version: m.Version
    vmbus_devices: tuple[VmbusDeviceConfig, ...] = field(default=())
    source: str = "<embedded default>"
    xen: XenConfig | None = None


def parse_size(text: str | int) -> int:
    """``"64M"`` → 67108864; K/M/G/T are powers of 1024; a bare number is bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError("a size cannot be negative")
        return text
    if not isinstance(text, str):
        raise ValueError("expected a size such as \"64M\"")
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = 1
    if t and t[-1] in "KMGT":
        mult = 1024 ** ("KMGT".index(t[-1]) + 1)
        t = t[:-1]
    if not t.isdigit():
        raise ValueError(f"not a size: {text!r} (examples: 4096, 64M, 1G)")
    return int(t) * mult


def derive_guid(*parts: str) -> uuid.UUID:
    """A stable, random-looking (version 4 layout) GUID from blake3 of the parts."""
    digest = blake3.blake3("\0".join(parts).encode()).digest(16)
    return uuid.UUID(bytes=digest, version=4)


def _typed(key: str, value: Any, want: type | tuple[type, ...], what: str) -> Any:
    if isinstance(value, bool) and want is not bool and bool not in (
            want if isinstance(want, tuple) else (want,)):
        raise ConfigError(key, f"expected {what}, got a boolean")
    if not isinstance(value, want):
        raise ConfigError(key, f"expected {what}, got {type(value).__name__} {value!r}")
    return value


def _no_unknown(key: str, table: dict[str, Any], allowed: dict[str, Any]) -> None:
    for k in table:
        if k not in allowed:
            where = f"{key}.{k}" if key else k
            raise ConfigError(where, "unknown key (allowed: " + ", ".join(allowed) + ")")


class Key(NamedTuple):
    """One row of a section's table."""

    types: type | tuple[type, ...]
    what: str              # for errors: "expected <what>"
    default: Any           # ... = required
    kind: str              # the reference's type column
    doc: str               # the reference's meaning column
    shown_default: str | None = None    # the reference's default column, when not the value


@dataclass(frozen=True)
class Section:
    path: str              # "machine", "vmbus.device", ...
    heading: str
    intro: str
    keys: dict[str, Key]
    outro: str = ""


MACHINE = Section("machine", "`[machine]` (required)", "", {
    "name": Key(str, "a machine name", ..., "string", "machine name; seeds derived GUIDs"),
    "state_dir": Key(str, "a directory path", "state", "string",
                     "directory for runtime files (the `-d` log); relative to the config file "
                     "(for the embedded default: `$VBUSFS_STATE`, else `/var/lib/vbusfs` as "
                     "root, else `~/.local/state/vbusfs`)"),
    "cpus": Key(int, "a vCPU count", 2, "integer 1–4096",
                "vCPUs; storage/network channels are spread over them, the rest target CPU 0"),
    "memory": Key((str, int), "a size", "64M", "size (`\"64M\"`, bytes)",
                  "guest memory, at least 16M"),
})
VMBUS = Section("vmbus", "`[vmbus]`", "", {
    "version": Key(str, "a VMBus version such as \"5.3\"", "5.3", "string",
                   "newest VMBus protocol the host accepts (`2.4`, `3.0`, `4.0`, `4.1`, "
                   "`5.0`–`5.3`)"),
    "device": Key(list, "an array of tables", [], "array of tables",
                  "the devices, offered in this order (relid 1, 2, ...)"),
})
VMBUS_DEVICE = Section("vmbus.device", "`[[vmbus.device]]`", "", {
    "type": Key(str, "a device type", ..., "string",
                "`" + " ".join(c.type for c in m.DEVICE_CLASSES) + "` (the Linux class GUIDs "
                "of reference §1.5)"),
    "instance": Key(str, "a GUID", None, "GUID string, braces optional",
                    "instance GUID (the device directory name); when absent: blake3 of machine "
                    "name, `vmbus`, type and the ordinal among devices of that type, as a "
                    "version-4 GUID — stable across runs", "derived"),
    "monitor": Key(bool, "true or false", None, "boolean",
                   "whether the host allocates a monitor id (storage and network types by "
                   "default)", "per type"),
}, outro="Two devices with the same instance GUID are an error.")
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
                 "the image, relative to `state_dir`; created sparse at `size` when it does "
                 "not exist; locked while mounted (a second mount gets \"in use\")",
                 "`<name>.img`"),
    "size": Key((str, int), "a size", "1G", "size",
                "the size of a new image (K/M/G/T); must be a multiple of `sector_size`. An "
                "existing image keeps its size."),
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

#: every section, in the order the reference lists them
SECTIONS = (MACHINE, VMBUS, VMBUS_DEVICE, XEN, VBD)


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


def _section(key: str, table: Any, section: Section) -> dict[str, Any]:
    _typed(key, table, dict, "a table")
    _no_unknown(key, table, section.keys)
    out: dict[str, Any] = {}
    for name, row in section.keys.items():
        sub = f"{key}.{name}" if key else name
        if name in table:
            out[name] = _typed(sub, table[name], row.types, row.what)
        elif row.default is ...:
            raise ConfigError(sub, "missing (required)")
        else:
            out[name] = row.default
    return out


def _convert(key: str, fn: Callable[[Any], Any], value: Any) -> Any:
    try:
        return fn(value)
    except ValueError as e:
        raise ConfigError(key, str(e)) from None


def parse(doc: dict[str, Any], base_dir: Path, source: str) -> Config:
    _no_unknown("", doc, {"machine": 0, "vmbus": 0, "xen": 0})
    if "machine" not in doc:
        raise ConfigError("machine", "missing (required)")
    mach = _section("machine", doc["machine"], MACHINE)
    name = mach["name"]
    if not name or "/" in name or name.strip() != name:
        raise ConfigError("machine.name", f"{name!r} is not a usable name")
    if not 1 <= mach["cpus"] <= 4096:
        raise ConfigError("machine.cpus", f"{mach['cpus']} is not between 1 and 4096")
    memory = _convert("machine.memory", parse_size, mach["memory"])
    if memory < 16 * 1024 * 1024 or memory % 4096:
        raise ConfigError("machine.memory", "must be at least 16M and a multiple of 4K")
    state_dir = Path(mach["state_dir"])
    machine = MachineConfig(name, state_dir if state_dir.is_absolute() else base_dir / state_dir,
                            mach["cpus"], memory)

    vm = _section("vmbus", doc.get("vmbus", {}), VMBUS)
    version = _convert("vmbus.version", m.Version.parse, vm["version"])
    if version < m.Version.WIN8:
        raise ConfigError("vmbus.version", "Linux guests need 2.4 (WIN8) or later")
    devices: list[VmbusDeviceConfig] = []
    seen: dict[uuid.UUID, str] = {}
    ordinal: dict[str, int] = {}
    known = ", ".join(c.type for c in m.DEVICE_CLASSES)
    for i, raw in enumerate(vm["device"]):
        key = f"vmbus.device[{i}]"
        dev = _section(key, raw, VMBUS_DEVICE)
        cls = m.class_by_type(dev["type"])
        if cls is None:
            raise ConfigError(f"{key}.type", f"unknown device type {dev['type']!r} "
                              f"(known: {known})")
        n = ordinal.get(cls.type, 0)
        ordinal[cls.type] = n + 1
        if dev["instance"] is not None:
            instance = _convert(f"{key}.instance", parse_guid, dev["instance"])
        else:
            instance = derive_guid(name, "vmbus", cls.type, str(n))
        if instance in seen:
            raise ConfigError(f"{key}.instance", f"duplicate device: {instance} is also "
                              f"{seen[instance]}")
        seen[instance] = key
        monitor = cls.perf_device if dev["monitor"] is None else dev["monitor"]
        devices.append(VmbusDeviceConfig(cls.type, instance, monitor, key))
    if len(devices) > 128 and sum(d.monitor for d in devices) > 128:
        raise ConfigError("vmbus.device", "more than 128 monitored channels")
    xen = _parse_xen(doc["xen"], machine) if "xen" in doc else None
    return Config(machine, version, tuple(devices), source, xen)


def _parse_version(text: str) -> tuple[int, int]:
    parts = text.split(".")
    if len(parts) != 2 or not all(p.isdigit() for p in parts) or int(parts[1]) > 255:
        raise ValueError(f"not a Xen version: {text!r} (example: \"4.17\")")
    return int(parts[0]), int(parts[1])


def _parse_xen(raw: Any, machine: MachineConfig) -> XenConfig:
    x = _section("xen", raw, XEN)
    if not 1 <= x["domid"] < 0x7FF0:
        raise ConfigError("xen.domid", f"{x['domid']} is not a guest domain id (1..32751)")
    dom_uuid = _convert("xen.uuid", parse_guid, x["uuid"]) if x["uuid"] else \
        derive_guid(machine.name, "xen", "uuid")
    version = _convert("xen.version", _parse_version, x["version"])
    vbds: list[VbdConfig] = []
    seen: dict[str, str] = {}
    images: dict[Path, str] = {}
    for i, rawv in enumerate(x["vbd"]):
        key = f"xen.vbd[{i}]"
        v = _section(key, rawv, VBD)
        vdev = _convert(f"{key}.vdev", parse_vdev, v["vdev"])
        if vdev.name in seen:
            raise ConfigError(f"{key}.vdev", f"{vdev.name} is also {seen[vdev.name]}")
        seen[vdev.name] = key
        image = Path(v["image"] or f"{vdev.name}.img")
        if not image.is_absolute():
            image = machine.state_dir / image
        if image in images:
            raise ConfigError(f"{key}.image", f"{image} is also the image of {images[image]}")
        images[image] = key
        size = _convert(f"{key}.size", parse_size, v["size"])
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


#: A typical Hyper-V generation-2 guest, plus two Xen virtual disks (xvda 1 GiB, xvdb 256 MiB,
#: sparse images in the state directory) so the block path is there out of the box. The
#: integration services and the first SCSI controller use the instance GUIDs Hyper-V/Azure
#: use (reference/hv-services.md §2.7, reference/sysfs.md §1.5), so tools find them.
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

[xen]
domid = 1

[[xen.vbd]]
vdev = "xvda"
size = "1G"

[[xen.vbd]]
vdev = "xvdb"
size = "256M"
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


if __name__ == "__main__":
    print(reference(), end="")
