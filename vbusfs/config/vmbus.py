"""The ``[vmbus]`` section: the Hyper-V host's protocol version, the devices it offers, the
disks (LUNs) behind each synthetic SCSI controller (reference/hv-services.md §4), and
``[vmbus.ic]``: how the integration services behave (reference/hv-services.md §2): what the
service does when the guest accepts a power request, whether the guest can hibernate, the
host's heartbeat and time-sample cadence and clock skew, and the KVP items the host pushes."""

from __future__ import annotations

import math
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
from vbusfs.protocols.vmbus import messages as m

__all__ = ["VmbusConfig", "VmbusDeviceConfig", "ScsiLunConfig", "IcConfig", "VMBUS",
           "VMBUS_DEVICE", "VMBUS_LUN", "VMBUS_IC", "parse_vmbus", "POWER_REACTIONS",
           "KVP_MAX_KEY_UNITS", "KVP_MAX_VALUE_UNITS", "MAX_SKEW_S", "SCSI_SECTOR_SIZES",
           "MAX_LUN"]

#: logical block sizes a LUN may have (what Linux's sd accepts)
SCSI_SECTOR_SIZES = (512, 1024, 2048, 4096)
#: LUNs 0..254: storvsc's max_lun is STORVSC_MAX_LUNS_PER_TARGET (255), the scan's bound
MAX_LUN = 254


@dataclass(frozen=True)
class ScsiLunConfig:
    """One disk behind a synthetic SCSI controller: what storvsp serves at path 0, target 0,
    ``lun`` (reference/hv-services.md §4.8)."""

    lun: int
    image: Path
    size: int
    readonly: bool
    sector_size: int
    serial: str               # "" = no VPD page 0x80
    vendor: str
    model: str
    rotational: bool
    discard: bool
    write_cache: bool
    disk_id: uuid.UUID        # the GUID in VPD page 0x83 (derived, stable across runs)
    key: str


#: what the service may do when the guest accepts a power request
POWER_REACTIONS = ("unmount", "log")
#: the longest key and value a KVP message carries, in UTF-16 units without the NUL
#: (HV_KVP_EXCHANGE_MAX_KEY_SIZE 512 and _VALUE_SIZE 2048 bytes, NUL included)
KVP_MAX_KEY_UNITS = 255
KVP_MAX_VALUE_UNITS = 1023
#: the host clock's skew is bounded so that its time stays a valid 1601-based tick count
MAX_SKEW_S = 100 * 365 * 86400


@dataclass(frozen=True)
class VmbusDeviceConfig:
    type: str
    instance: uuid.UUID
    monitor: bool
    key: str          # where it came from, e.g. "vmbus.device[3]"
    luns: tuple[ScsiLunConfig, ...] = ()


@dataclass(frozen=True)
class IcConfig:
    """``[vmbus.ic]``."""

    on_shutdown: str = "unmount"
    on_reboot: str = "log"
    hibernation: bool = False
    heartbeat_interval: float = 2.0
    timesync_interval: float = 5.0
    timesync_skew_ns: int = 0
    kvp_external: tuple[tuple[str, str], ...] = ()          # pool 0
    kvp_auto_external: tuple[tuple[str, str], ...] = ()     # pool 3


@dataclass(frozen=True)
class VmbusConfig:
    version: m.Version                                  # the newest the host accepts
    devices: tuple[VmbusDeviceConfig, ...] = ()        # offered in this order
    ic: IcConfig = field(default_factory=IcConfig)


VMBUS = Section("vmbus", "`[vmbus]`", "", {
    "version": Key(str, "a VMBus version such as \"5.3\"", "5.3", "string",
                   "newest VMBus protocol the host accepts (`2.4`, `3.0`, `4.0`, `4.1`, "
                   "`5.0`–`5.3`)"),
    "device": Key(list, "an array of tables", [], "array of tables",
                  "the devices, offered in this order (relid 1, 2, ...)"),
    "ic": Key(dict, "a table", {}, "table", "the integration services: `[vmbus.ic]` below"),
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
    "lun": Key(list, "an array of tables", [], "array of tables",
               "`scsi` only: the disks behind the controller (below)"),
}, outro="Two devices with the same instance GUID are an error.")
VMBUS_LUN = Section("vmbus.device.lun", "`[[vmbus.device.lun]]`",
                    "A disk behind a `scsi` controller, served by storvsp at path 0, target 0 "
                    "and answering\nas Hyper-V does (reference/hv-services.md §4.8). In the "
                    "guest it is `sdX` under\n`host<N>/target<N>:0:0/<N>:0:0:<lun>/`.", {
    "lun": Key(int, "a LUN number", None, "integer 0–254",
               "the LUN; two disks of one controller cannot share it", "its position"),
    "image": Key(str, "an image path", None, "path",
                 "the image, relative to `state_dir`; created sparse at `size`, mode 0600, "
                 "when it does not exist; an existing one must be whole sectors; locked while "
                 "mounted (K: the controller's number among the "
                 "`scsi` devices)", "`scsi<K>-lun<L>.img`"),
    "size": Key((str, int), "a size", "1G", "size",
                "the size of a new image (K/M/G/T); a multiple of `sector_size`, no larger "
                "than a file on its filesystem can be (not free space: images are sparse). "
                "An existing image keeps its size."),
    "readonly": Key(bool, "true or false", False, "boolean",
                    "write-protected (MODE SENSE WP bit; writes get DATA PROTECT); needs an "
                    "existing image"),
    "sector_size": Key(int, "512, 1024, 2048 or 4096", 512, "integer",
                       "logical block size (READ CAPACITY)"),
    "serial": Key(str, "a serial number", None, "string",
                  "unit serial number, VPD page 0x80 (printable ASCII, at most 255 bytes); "
                  "`\"\"` = no page 0x80; when absent: 32 hex digits of blake3 of the "
                  "machine name and the disk's place", "derived"),
    "vendor": Key(str, "a vendor id", "Msft", "string",
                  "INQUIRY vendor (at most 8 printable ASCII characters)"),
    "model": Key(str, "a product id", "Virtual Disk", "string",
                 "INQUIRY product (at most 16 printable ASCII characters)"),
    "rotational": Key(bool, "true or false", False, "boolean",
                      "a spinning disk: VPD page 0xB1 rotation rate 7200 instead of 1 "
                      "(non-rotating). Hyper-V offers that page only with `discard`; "
                      "without it Linux takes every disk for a rotating one"),
    "discard": Key(bool, "true or false", True, "boolean",
                   "thin provisioned: UNMAP and WRITE SAME(16) with UNMAP, VPD pages "
                   "0xB0/0xB1/0xB2 and READ CAPACITY(16) LBPME"),
    "write_cache": Key(bool, "true or false", True, "boolean",
                       "MODE SENSE caching page WCE: with it the guest flushes with "
                       "SYNCHRONIZE CACHE; without it the image is opened `O_DSYNC` and the "
                       "queue says `write through`"),
}, outro="Two LUNs with the same image (or a LUN and another bus's disk) are an error.")


def _ascii(key: str, text: str, limit: int) -> str:
    if len(text.encode()) > limit or any(not 0x20 <= ord(c) < 0x7F for c in text):
        raise ConfigError(key, f"{text!r} is not at most {limit} printable ASCII characters")
    return text


def _parse_luns(key: str, raw: list[Any], machine: MachineConfig, ordinal: int,
                images: dict[Path, str]) -> tuple[ScsiLunConfig, ...]:
    """A controller's ``[[vmbus.device.lun]]`` tables; ``images`` holds the LUN images seen so
    far (two LUNs, of any controllers, never share one)."""
    luns: list[ScsiLunConfig] = []
    seen: dict[int, str] = {}
    for j, rawl in enumerate(raw):
        lkey = f"{key}.lun[{j}]"
        v = section(lkey, rawl, VMBUS_LUN)
        lun = j if v["lun"] is None else v["lun"]
        if not 0 <= lun <= MAX_LUN:
            raise ConfigError(f"{lkey}.lun", f"{lun} is not a LUN between 0 and {MAX_LUN}")
        if lun in seen:
            raise ConfigError(f"{lkey}.lun", f"LUN {lun} is also {seen[lun]}")
        seen[lun] = lkey
        image = Path(v["image"] or f"scsi{ordinal}-lun{lun}.img")
        if not image.is_absolute():
            image = machine.state_dir / image
        if image in images:
            raise ConfigError(f"{lkey}.image", f"{image} is also the image of {images[image]}")
        images[image] = lkey
        if v["sector_size"] not in SCSI_SECTOR_SIZES:
            raise ConfigError(f"{lkey}.sector_size", f"{v['sector_size']} is not 512, 1024, "
                              "2048 or 4096")
        size = convert(f"{lkey}.size", parse_size, v["size"])
        if size <= 0 or size % v["sector_size"]:
            raise ConfigError(f"{lkey}.size", f"{size} is not a positive multiple of the "
                              f"{v['sector_size']}-byte sector size")
        place = (machine.name, "vmbus", "scsi", str(ordinal), "lun", str(lun))
        serial = derive_guid(*place, "serial").hex if v["serial"] is None else \
            _ascii(f"{lkey}.serial", v["serial"], 255)
        luns.append(ScsiLunConfig(
            lun, image, size, v["readonly"], v["sector_size"], serial,
            _ascii(f"{lkey}.vendor", v["vendor"], 8), _ascii(f"{lkey}.model", v["model"], 16),
            v["rotational"], v["discard"], v["write_cache"], derive_guid(*place), lkey))
    return tuple(sorted(luns, key=lambda c: c.lun))


VMBUS_IC = Section("vmbus.ic", "`[vmbus.ic]`", "How the integration services behave "
                   "(reference/hv-services.md §2). Each applies when the machine has that "
                   "device.", {
    "on_shutdown": Key(str, "\"unmount\" or \"log\"", "unmount", "string",
                       "what the service does when the guest accepts a shutdown request from "
                       "the host (`mountctl shutdown`): `unmount` (close every device and "
                       "unmount, as the guest powers off) or `log` (report it in the tree and "
                       "the log only)"),
    "on_reboot": Key(str, "\"unmount\" or \"log\"", "log", "string",
                     "the same for a reboot request"),
    "hibernation": Key(bool, "true or false", False, "boolean",
                       "whether the guest can hibernate (ACPI S4): it then accepts "
                       "hibernate requests and `/sys/bus/vmbus/hibernation` reads 1; "
                       "otherwise it answers them HV_E_FAIL, as Linux does"),
    "heartbeat_interval": Key((int, float), "a number of seconds", 2, "seconds",
                              "how often the host sends a heartbeat (0 < s ≤ 3600)"),
    "timesync_interval": Key((int, float), "a number of seconds", 5, "seconds",
                             "how often the host sends a time sample after the first, which "
                             "carries SYNC (0 < s ≤ 3600)"),
    "timesync_skew": Key((int, float), "a number of seconds", 0, "seconds",
                         "how far the host's clock is ahead of this machine's (negative: "
                         "behind), within 100 years; the guest's computed offset shows it "
                         "(`MNT/.vbusfs/hv_utils/timesync/offset_ns`)"),
    "kvp_external": Key(dict, "a table of strings", {}, "table of strings",
                        "KVP pool 0 (External): items the host sets in the guest once KVP is "
                        "negotiated, `Key = \"value\"`; keys up to 255 and values up to "
                        "1023 UTF-16 units"),
    "kvp_auto_external": Key(dict, "a table of strings", None, "table of strings",
                             "KVP pool 3 (AutoExternal): the host's guest parameters, pushed "
                             "the same way", "`VirtualMachineName` (the machine name) and "
                             "`VirtualMachineId` (derived, upper case)"),
})


def _kvp_items(key: str, table: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    items = []
    for k, v in table.items():
        where = f"{key}.{k}"
        if not isinstance(v, str):
            raise ConfigError(where, f"expected a string, got {type(v).__name__} {v!r}")
        if not k or "\0" in k or len(k.encode("utf-16-le")) // 2 > KVP_MAX_KEY_UNITS:
            raise ConfigError(where, f"a key is 1 to {KVP_MAX_KEY_UNITS} UTF-16 units "
                              "without NUL")
        if "\0" in v or len(v.encode("utf-16-le")) // 2 > KVP_MAX_VALUE_UNITS:
            raise ConfigError(where, f"a value is at most {KVP_MAX_VALUE_UNITS} UTF-16 units "
                              "without NUL")
        items.append((k, v))
    return tuple(items)


def _seconds(key: str, value: float, lo: float, hi: float, lo_open: bool = True) -> float:
    if not math.isfinite(value) or value > hi or value < lo or (lo_open and value == lo):
        raise ConfigError(key, f"{value!r} is not within {'(' if lo_open else '['}{lo:g}, "
                          f"{hi:g}] seconds")
    return float(value)


def parse_ic(raw: Any, machine: MachineConfig) -> IcConfig:
    """``[vmbus.ic]``."""
    ic = section("vmbus.ic", raw, VMBUS_IC)
    for key in ("on_shutdown", "on_reboot"):
        if ic[key] not in POWER_REACTIONS:
            raise ConfigError(f"vmbus.ic.{key}", f"{ic[key]!r} is not one of "
                              + ", ".join(POWER_REACTIONS))
    auto = ic["kvp_auto_external"]
    if auto is None:
        auto = {"VirtualMachineName": machine.name,
                "VirtualMachineId": str(derive_guid(machine.name, "vm")).upper()}
    skew = _seconds("vmbus.ic.timesync_skew", ic["timesync_skew"], -MAX_SKEW_S, MAX_SKEW_S,
                    lo_open=False)
    return IcConfig(
        on_shutdown=ic["on_shutdown"], on_reboot=ic["on_reboot"],
        hibernation=ic["hibernation"],
        heartbeat_interval=_seconds("vmbus.ic.heartbeat_interval", ic["heartbeat_interval"],
                                    0, 3600),
        timesync_interval=_seconds("vmbus.ic.timesync_interval", ic["timesync_interval"],
                                   0, 3600),
        timesync_skew_ns=round(skew * 1e9),
        kvp_external=_kvp_items("vmbus.ic.kvp_external", ic["kvp_external"]),
        kvp_auto_external=_kvp_items("vmbus.ic.kvp_auto_external", auto))


def parse_vmbus(raw: Any, machine: MachineConfig) -> VmbusConfig:
    """``[vmbus]``, its ``[[vmbus.device]]`` tables with their ``[[vmbus.device.lun]]``
    tables, and ``[vmbus.ic]``."""
    name = machine.name
    images: dict[Path, str] = {}
    vm = section("vmbus", raw, VMBUS)
    version = convert("vmbus.version", m.Version.parse, vm["version"])
    if version < m.Version.WIN8:
        raise ConfigError("vmbus.version", "Linux guests need 2.4 (WIN8) or later")
    devices: list[VmbusDeviceConfig] = []
    seen: dict[uuid.UUID, str] = {}
    ordinal: dict[str, int] = {}
    known = ", ".join(c.type for c in m.DEVICE_CLASSES)
    for i, raw in enumerate(vm["device"]):
        key = f"vmbus.device[{i}]"
        dev = section(key, raw, VMBUS_DEVICE)
        cls = m.class_by_type(dev["type"])
        if cls is None:
            raise ConfigError(f"{key}.type", f"unknown device type {dev['type']!r} "
                              f"(known: {known})")
        n = ordinal.get(cls.type, 0)
        ordinal[cls.type] = n + 1
        if dev["instance"] is not None:
            instance = convert(f"{key}.instance", parse_guid, dev["instance"])
        else:
            instance = derive_guid(name, "vmbus", cls.type, str(n))
        if instance in seen:
            raise ConfigError(f"{key}.instance", f"duplicate device: {instance} is also "
                              f"{seen[instance]}")
        seen[instance] = key
        monitor = cls.perf_device if dev["monitor"] is None else dev["monitor"]
        luns: tuple[ScsiLunConfig, ...] = ()
        if dev["lun"]:
            if cls.type != "scsi":
                raise ConfigError(f"{key}.lun", f"only scsi controllers have LUNs, not "
                                  f"{cls.type}")
            luns = _parse_luns(key, dev["lun"], machine, n, images)
        devices.append(VmbusDeviceConfig(cls.type, instance, monitor, key, luns))
    if len(devices) > 128 and sum(d.monitor for d in devices) > 128:
        raise ConfigError("vmbus.device", "more than 128 monitored channels")
    return VmbusConfig(version, tuple(devices), parse_ic(vm["ic"], machine))
