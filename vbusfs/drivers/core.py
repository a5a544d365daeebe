"""The driver contract every bus shares (Linux ``drivers/base/bus.c`` and ``dd.c``).

A driver registers with a bus; the bus consults its :class:`DriverTable` to match each
device (as Linux matches by class GUID, devtype or modalias: each driver's ``match`` knows
its bus's ids) and binds the first driver that matches:

* ``probe(dev, task_status=...)`` runs as a task for as long as the driver is bound. It sets
  the device up (open a channel, negotiate with the backend) and calls
  ``task_status.started()`` once the device is ready; a probe that raises before that has
  failed, and the device stays unbound. After that the task serves the device.
* ``remove(dev)`` is the orderly unbind, called while ``probe``'s task still runs: the
  driver quiesces the device (closes its channel, goes Closing/Closed with the backend).
  Then the bus cancels what is left of the task.

The table creates the driver's directory under ``/sys/bus/<bus>/drivers/`` when it
registers, and the ``driver`` links while a device is bound. A bus never imports a concrete
driver: whoever assembles the machine registers them, as a module's init does in Linux.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import trio

from vbusfs.errors import single_errors
from vbusfs.sysfs.driver_core import Bus

log = logging.getLogger(__name__)

__all__ = ["Device", "Driver", "DriverTable"]


class Device(Protocol):
    @property
    def name(self) -> str: ...          # the device's directory name on its bus

    driver: str | None                  # the bound driver's name (set by the table)


D = TypeVar("D", bound=Device)
D_contra = TypeVar("D_contra", bound=Device, contravariant=True)


class Driver(Protocol[D_contra]):
    @property
    def name(self) -> str: ...          # /sys/bus/<bus>/drivers/<name>

    @property
    def module(self) -> str: ...        # /sys/module/<module>, where the driver dir links

    def match(self, dev: D_contra) -> bool: ...

    async def probe(self, dev: D_contra, *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None: ...

    async def remove(self, dev: D_contra) -> None: ...


@dataclass
class _Binding(Generic[D]):
    driver: Driver[D]
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    gone: trio.Event = field(default_factory=trio.Event)
    removing: bool = False


class _Ready:
    """What ``probe`` gets as its task status: ``started()`` binds the device, then reports
    it ready to whoever bound it."""

    def __init__(self, ready: Callable[[], None]) -> None:
        self._ready = ready

    def started(self, value: None = None) -> None:
        self._ready()


class DriverTable(Generic[D]):
    """One bus's registered drivers and bound devices. ``on_bind``/``on_unbind`` let the bus
    add and take away what a bound device shows besides the ``driver`` link."""

    def __init__(self, sysfs: Bus, on_bind: Callable[[D], None] | None = None,
                 on_unbind: Callable[[D], None] | None = None) -> None:
        self.sysfs = sysfs
        self.drivers: dict[str, Driver[D]] = {}
        self._bound: dict[str, _Binding[D]] = {}
        self._on_bind = on_bind
        self._on_unbind = on_unbind

    def register(self, drv: Driver[D]) -> None:
        if drv.name in self.drivers:
            raise ValueError(f"driver {drv.name} is already registered on {self.sysfs.name}")
        self.drivers[drv.name] = drv
        self.sysfs.driver(drv.name, drv.module)

    def match(self, dev: D, override: str | None = None) -> Driver[D] | None:
        """The first registered driver that matches ``dev``; with ``override``
        (``driver_override``) only the driver of that name, which always matches."""
        if override is not None:
            return self.drivers.get(override)
        return next((d for d in self.drivers.values() if d.match(dev)), None)

    async def bind(self, nursery: trio.Nursery, dev: D, drv: Driver[D]) -> None:
        """Probe ``drv`` on ``dev`` in ``nursery``; returns once the device is ready, and
        raises what the probe raised if it failed."""
        if dev.name in self._bound:
            raise RuntimeError(f"{dev.name} is already bound")
        await nursery.start(self._run, dev, drv)

    async def _run(self, dev: D, drv: Driver[D], *,
                   task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        b = _Binding(drv)
        self._bound[dev.name] = b
        started = False

        def ready() -> None:
            nonlocal started
            started = True
            dev.driver = drv.name
            self.sysfs.bind(dev.name, drv.name)
            if self._on_bind is not None:
                self._on_bind(dev)
            task_status.started()

        try:
            with b.scope, single_errors():     # a failed probe reports its own error
                await drv.probe(dev, task_status=_Ready(ready))
        finally:
            if started:
                dev.driver = None
                if dev.name in self.sysfs.devices_by_name:
                    self.sysfs.unbind(dev.name)
                if self._on_unbind is not None:
                    self._on_unbind(dev)
            del self._bound[dev.name]
            b.gone.set()

    async def unbind(self, dev: D, deadline: float = float("inf")) -> None:
        """The driver's ``remove`` (given at most ``deadline`` seconds), then the end of its
        task. Nothing happens for a device that is not bound."""
        b = self._bound.get(dev.name)
        if b is None:
            return
        if b.removing:                  # another unbind runs remove (Linux: device_lock)
            await b.gone.wait()
            return
        b.removing = True
        try:
            with trio.move_on_after(deadline) as waited:
                await b.driver.remove(dev)
            if waited.cancelled_caught:
                log.warning("%s: %s did not finish removing within %.0f s", dev.name,
                            b.driver.name, deadline)
        finally:
            b.scope.cancel()
            with trio.CancelScope(shield=True):
                await b.gone.wait()

    def bound(self) -> list[str]:
        return list(self._bound)
