"""The Linux driver model's part of sysfs: buses, drivers, device directories, bind/unbind.

* ``/sys/bus/<bus>/{devices/,drivers/,drivers_autoprobe,drivers_probe,uevent}``
  (drivers/base/bus.c);
* ``/sys/bus/<bus>/drivers/<drv>/{bind,unbind,uevent,module}`` plus one link per bound device;
* in each device directory: ``uevent``, ``subsystem`` → the bus, ``driver`` → the driver while
  bound, ``power/``.

Bus drivers register a :class:`Bus` and call :meth:`Bus.add_device`; binding a driver is the
bus driver's business (it may need protocol round trips), reached through ``bind_hook`` /
``unbind_hook``.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Awaitable, Callable

from vbusfs.sysfs.nodes import Attribute, Directory, Symlink, Tree

__all__ = ["Bus", "Driver", "UEVENT_ACTIONS", "add_power_dir", "kstrtoint", "kstrtoul",
           "sysfs_bool"]

#: kobject_action_type names accepted by a write to ``uevent`` (lib/kobject_uevent.c)
UEVENT_ACTIONS = ("add", "remove", "change", "move", "online", "offline", "bind", "unbind")

BindHook = Callable[[str], Awaitable[None]]


def sysfs_bool(text: str) -> bool:
    """kstrtobool's accepted spellings; EINVAL otherwise."""
    t = text.strip().lower()
    if t in ("1", "y", "yes", "on", "true"):
        return True
    if t in ("0", "n", "no", "off", "false"):
        return False
    raise OSError(errno.EINVAL, f"not a boolean: {text.strip()!r}")


_KSTRTOX = re.compile(r"\+?(?:0[xX]([0-9a-fA-F]+)|(0[0-7]*)|([1-9][0-9]*))\n?")


def kstrtoul(text: str) -> int:
    """``kstrtoul(buf, 0, ...)``, as many stores parse a number: an optional ``+``, then hex
    after ``0x``, octal after ``0``, else decimal, and one newline at most. EINVAL for
    anything else, ERANGE past 64 bits. Like the C string it reads, it ends at a NUL."""
    text = text.split("\0", 1)[0]
    m = _KSTRTOX.fullmatch(text)
    if m is None:
        raise OSError(errno.EINVAL, f"not a number: {text.rstrip(chr(10))!r}")
    value = int(m[1], 16) if m[1] else int(m[2], 8) if m[2] else int(m[3])
    if value >= 1 << 64:
        raise OSError(errno.ERANGE, f"{text.strip()} does not fit in 64 bits")
    return value


def kstrtoint(text: str) -> int:
    """``kstrtoint(buf, 0, ...)``: :func:`kstrtoul`'s rules with an optional ``-``, and
    ERANGE outside a C ``int``."""
    text = text.split("\0", 1)[0]
    negative = text.startswith("-")
    value = kstrtoul(text[1:] if negative else text)
    if text[1:2] == "+" and negative:
        raise OSError(errno.EINVAL, f"not a number: {text.rstrip(chr(10))!r}")
    value = -value if negative else value
    if not -(1 << 31) <= value < 1 << 31:
        raise OSError(errno.ERANGE, f"{text.strip()} does not fit in an int")
    return value


def _check_uevent_action(text: str) -> None:
    action = text.strip().split(" ", 1)[0]
    if action not in UEVENT_ACTIONS:
        raise OSError(errno.EINVAL, f"unknown uevent action {action!r}")


def add_power_dir(devdir: Directory) -> Directory:
    """``power/`` as the driver core creates it for a device without runtime PM."""
    power = devdir.mkdir("power")
    state = {"control": "auto"}

    def store_control(text: str) -> None:
        value = text.strip()
        if value not in ("auto", "on"):
            raise OSError(errno.EINVAL, "power/control takes 'auto' or 'on'")
        state["control"] = value

    power.add(Attribute("control", lambda: state["control"] + "\n", store_control))
    power.add(Attribute("runtime_status", lambda: "unsupported\n", static=True))
    power.add(Attribute("runtime_active_time", lambda: "0\n", static=True))
    power.add(Attribute("runtime_suspended_time", lambda: "0\n", static=True))
    return power


class Driver:
    """``/sys/bus/<bus>/drivers/<name>/``."""

    def __init__(self, bus: Bus, name: str, module: str | None) -> None:
        self.bus = bus
        self.name = name
        self.dir = bus.drivers.mkdir(name)
        self.dir.add(Attribute("bind", None, self._bind))
        self.dir.add(Attribute("unbind", None, self._unbind))
        self.dir.add(Attribute("uevent", None, _check_uevent_action))
        if module is not None:
            self.dir.add(Symlink("module", bus.tree.root.makedirs(f"sys/module/{module}")))

    async def _bind(self, text: str) -> None:
        name = text.strip()
        devdir = self.bus.devices_by_name.get(name)
        if devdir is None or self.bus.match_hook is None or \
                not self.bus.match_hook(name, self.name):
            raise OSError(errno.ENODEV, f"no device {name!r} this driver can bind")
        if "driver" in devdir.children:
            raise OSError(errno.EBUSY, f"{name} is already bound")
        if self.bus.bind_hook is not None:
            await self.bus.bind_hook(name)

    async def _unbind(self, text: str) -> None:
        name = text.strip()
        if name not in self.dir.children or name not in self.bus.devices_by_name:
            raise OSError(errno.ENODEV, f"{name!r} is not bound to {self.name}")
        if self.bus.unbind_hook is not None:
            await self.bus.unbind_hook(name)


class Bus:
    """``/sys/bus/<name>/``."""

    def __init__(self, tree: Tree, name: str) -> None:
        self.tree = tree
        self.name = name
        self.dir = tree.root.makedirs(f"sys/bus/{name}")
        self.devices = self.dir.mkdir("devices")
        self.drivers = self.dir.mkdir("drivers")
        self.autoprobe = True
        self.dir.add(Attribute("drivers_autoprobe", lambda: f"{int(self.autoprobe)}\n",
                               self._store_autoprobe))
        self.dir.add(Attribute("drivers_probe", None, self._probe))
        self.dir.add(Attribute("uevent", None, _check_uevent_action))
        self.driver_dirs: dict[str, Driver] = {}
        self.devices_by_name: dict[str, Directory] = {}
        self.match_hook: Callable[[str, str], bool] | None = None
        self.bind_hook: BindHook | None = None
        self.unbind_hook: BindHook | None = None

    def _store_autoprobe(self, text: str) -> None:
        self.autoprobe = sysfs_bool(text)

    async def _probe(self, text: str) -> None:
        name = text.strip()
        devdir = self.devices_by_name.get(name)
        if devdir is None:
            raise OSError(errno.ENODEV, f"no device {name!r}")
        if "driver" not in devdir.children and self.bind_hook is not None and \
                self.match_hook is not None and self.match_hook(name, ""):
            await self.bind_hook(name)

    def driver(self, name: str, module: str | None = None) -> Driver:
        drv = self.driver_dirs.get(name)
        if drv is None:
            drv = Driver(self, name, module or name)
            self.driver_dirs[name] = drv
        return drv

    def add_device(self, devdir: Directory, uevent: Callable[[], str]) -> None:
        """Register a device directory that already sits under /sys/devices."""
        devdir.add(Attribute("uevent", uevent, _check_uevent_action))
        devdir.add(Symlink("subsystem", self.dir))
        add_power_dir(devdir)
        self.devices.add(Symlink(devdir.name, devdir))
        self.devices_by_name[devdir.name] = devdir

    def remove_device(self, name: str) -> None:
        devdir = self.devices_by_name.pop(name)
        self.devices.remove(name)
        for drv in self.driver_dirs.values():
            if name in drv.dir.children:
                drv.dir.remove(name)
        if devdir.parent is not None:
            devdir.parent.remove(devdir.name)

    def bind(self, name: str, driver: str) -> None:
        devdir = self.devices_by_name[name]
        drv = self.driver(driver)
        devdir.add(Symlink("driver", drv.dir))
        drv.dir.add(Symlink(name, devdir))

    def unbind(self, name: str) -> None:
        devdir = self.devices_by_name[name]
        if "driver" in devdir.children:
            drv = devdir.children["driver"]
            devdir.remove("driver")
            assert isinstance(drv, Symlink) and isinstance(drv.target, Directory)
            drv.target.remove(name)
