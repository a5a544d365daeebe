"""What every section of the machine config shares: the error, sizes, derived GUIDs, the
table rows that drive validation and the reference, and the ``[machine]`` section."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import blake3

__all__ = ["ConfigError", "MachineConfig", "Key", "Section", "MACHINE", "parse_size",
           "derive_guid", "section", "convert", "no_unknown", "parse_machine"]


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


def typed(key: str, value: Any, want: type | tuple[type, ...], what: str) -> Any:
    if isinstance(value, bool) and want is not bool and bool not in (
            want if isinstance(want, tuple) else (want,)):
        raise ConfigError(key, f"expected {what}, got a boolean")
    if not isinstance(value, want):
        raise ConfigError(key, f"expected {what}, got {type(value).__name__} {value!r}")
    return value


def no_unknown(key: str, table: dict[str, Any], allowed: dict[str, Any]) -> None:
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
                     "directory for runtime files (the `-d` log, images), created mode 0700; "
                     "relative to the config file "
                     "(for the embedded default: `$VBUSFS_STATE`, else `/var/lib/vbusfs` as "
                     "root, else `~/.local/state/vbusfs`)"),
    "cpus": Key(int, "a vCPU count", 2, "integer 1–4096",
                "vCPUs; storage/network channels are spread over them, the rest target CPU 0"),
    "memory": Key((str, int), "a size", "64M", "size (`\"64M\"`, bytes)",
                  "guest memory, at least 16M"),
})
def section(key: str, table: Any, section: Section) -> dict[str, Any]:
    typed(key, table, dict, "a table")
    no_unknown(key, table, section.keys)
    out: dict[str, Any] = {}
    for name, row in section.keys.items():
        sub = f"{key}.{name}" if key else name
        if name in table:
            out[name] = typed(sub, table[name], row.types, row.what)
        elif row.default is ...:
            raise ConfigError(sub, "missing (required)")
        else:
            out[name] = row.default
    return out


def convert(key: str, fn: Callable[[Any], Any], value: Any) -> Any:
    try:
        return fn(value)
    except ValueError as e:
        raise ConfigError(key, str(e)) from None


def parse_machine(raw: Any, base_dir: Path) -> MachineConfig:
    mach = section("machine", raw, MACHINE)
    name = mach["name"]
    if not name or "/" in name or name.strip() != name:
        raise ConfigError("machine.name", f"{name!r} is not a usable name")
    if not 1 <= mach["cpus"] <= 4096:
        raise ConfigError("machine.cpus", f"{mach['cpus']} is not between 1 and 4096")
    memory = convert("machine.memory", parse_size, mach["memory"])
    if memory < 16 * 1024 * 1024 or memory % 4096:
        raise ConfigError("machine.memory", "must be at least 16M and a multiple of 4K")
    state_dir = Path(mach["state_dir"])
    machine = MachineConfig(name, state_dir if state_dir.is_absolute() else base_dir / state_dir,
                            mach["cpus"], memory)

    return machine
