"""The ``[vmbus]`` section: the Hyper-V host's protocol version and the devices it offers."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from vbusfs.config.common import (
    ConfigError,
    Key,
    MachineConfig,
    Section,
    convert,
    derive_guid,
    section,
)
from vbusfs.protocols.guid import parse_guid
from vbusfs.protocols.vmbus import messages as m

__all__ = ["VmbusConfig", "VmbusDeviceConfig", "VMBUS", "VMBUS_DEVICE", "parse_vmbus"]


@dataclass(frozen=True)
class VmbusDeviceConfig:
    type: str
    instance: uuid.UUID
    monitor: bool
    key: str          # where it came from, e.g. "vmbus.device[3]"


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
}, outro="Two devices with the same instance GUID are an error.")


def parse_vmbus(raw: Any, machine: MachineConfig) -> VmbusConfig:
    """``[vmbus]`` and its ``[[vmbus.device]]`` tables."""
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
        devices.append(VmbusDeviceConfig(cls.type, instance, monitor, key))
    if len(devices) > 128 and sum(d.monitor for d in devices) > 128:
        raise ConfigError("vmbus.device", "more than 128 monitored channels")
    return VmbusConfig(version, tuple(devices))
