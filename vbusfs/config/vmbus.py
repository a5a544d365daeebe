"""The ``[vmbus]`` section: the Hyper-V host's protocol version, the devices it offers, and
the disks (LUNs) behind each synthetic SCSI controller (reference/hv-services.md §4)."""

from __future__ import annotations

import uuid
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
from vbusfs.protocols.guid import parse_guid
from vbusfs.protocols.vmbus import messages as m

__all__ = ["VmbusConfig", "VmbusDeviceConfig", "ScsiLunConfig", "VMBUS", "VMBUS_DEVICE",
           "VMBUS_LUN", "parse_vmbus", "SCSI_SECTOR_SIZES", "MAX_LUN"]

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


@dataclass(frozen=True)
class VmbusDeviceConfig:
    type: str
    instance: uuid.UUID
    monitor: bool
    key: str          # where it came from, e.g. "vmbus.device[3]"
    luns: tuple[ScsiLunConfig, ...] = ()


@dataclass(frozen=True)
class VmbusConfig:
    version: m.Version                                  # the newest the host accepts
    devices: tuple[VmbusDeviceConfig, ...] = ()        # offered in this order


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
                 "the image, relative to `state_dir`; created sparse at `size` when it does "
                 "not exist; locked while mounted (K: the controller's number among the "
                 "`scsi` devices)", "`scsi<K>-lun<L>.img`"),
    "size": Key((str, int), "a size", "1G", "size",
                "the size of a new image (K/M/G/T); a multiple of `sector_size`. An existing "
                "image keeps its size."),
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
}, outro="Two LUNs with the same image (or a LUN and a Xen disk) are an error.")


def _ascii(key: str, text: str, limit: int) -> str:
    if len(text.encode()) > limit or any(not 0x20 <= ord(c) < 0x7F for c in text):
        raise ConfigError(key, f"{text!r} is not at most {limit} printable ASCII characters")
    return text


def _parse_luns(key: str, raw: list[Any], machine: MachineConfig, ordinal: int,
                images: dict[Path, str]) -> tuple[ScsiLunConfig, ...]:
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


def parse_vmbus(raw: Any, machine: MachineConfig,
                images: dict[Path, str] | None = None) -> VmbusConfig:
    """``[vmbus]``, its ``[[vmbus.device]]`` tables and their ``[[vmbus.device.lun]]``
    tables. ``images`` collects every disk image path (with the key that names it), so
    disks of other buses can be checked against them."""
    images = {} if images is None else images
    name = machine.name
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
    return VmbusConfig(version, tuple(devices))
