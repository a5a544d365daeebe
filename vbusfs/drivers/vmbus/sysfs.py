"""The VMBus sysfs attributes, declared as tables (reference/sysfs.md §1.2–1.4).

Everything is computed when read: ring indices come from the ``hv_ring_buffer`` headers in
guest memory, monitor values from the monitor pages the host writes, state from the channel.
"""

from __future__ import annotations

import errno
import struct
import uuid
from collections.abc import Callable

from vbusfs.drivers.vmbus.device import VmbusDevice
from vbusfs.protocols.guid import guid_braced, guid_modalias_hex, parse_guid
from vbusfs.protocols.vmbus import messages as m
from vbusfs.protocols.vmbus.ring import Ring
from vbusfs.sysfs import Attr, Attribute, Directory, Group, add_group
from vbusfs.sysfs.driver_core import Bus
from vbusfs.sysfs.nodes import ATTR_SIZE

__all__ = ["add_bus_files", "add_driver_files", "add_device_files", "uevent", "DEVICE_GROUP",
           "CHANNEL_GROUP"]


def _monitor(dev: VmbusDevice, page: int, offset_of: Callable[[int], int], fmt: str) -> str:
    mem = dev.conn.memory.view(dev.conn.monitor_pfns[page])
    (value,) = struct.unpack_from(fmt, mem, offset_of(dev.offer.monitorid))
    return f"{value}\n"


def _pending(page: int) -> Callable[[VmbusDevice], str]:
    return lambda d: _monitor(d, page, m.MONITOR_PAGE.pending_offset, "<I")


def _latency(page: int) -> Callable[[VmbusDevice], str]:
    return lambda d: _monitor(d, page, m.MONITOR_PAGE.latency_offset, "<H")


def _conn_id(page: int) -> Callable[[VmbusDevice], str]:
    return lambda d: _monitor(d, page, m.MONITOR_PAGE.parameter_offset, "<I")


def _ring_info(direction: str, field: Callable[[Ring], int]) -> Callable[[VmbusDevice], str]:
    """``hv_ringbuffer_get_debuginfo``: EINVAL while the ring is not mapped."""
    return lambda d: f"{field(d.channel.ring(direction))}\n"


_RING_FIELDS: tuple[tuple[str, Callable[[Ring], int]], ...] = (
    ("intr_mask", lambda r: r.interrupt_mask),
    ("read_index", lambda r: r.read_index),
    ("write_index", lambda r: r.write_index),
    ("read_bytes_avail", lambda r: r.bytes_to_read()),
    ("write_bytes_avail", lambda r: r.bytes_to_write()),
)


def _store_driver_override(dev: VmbusDevice, text: str) -> None:
    """driver_set_override: at most PAGE_SIZE-1 bytes, one trailing newline dropped,
    empty clears."""
    if len(text.encode()) >= ATTR_SIZE:
        raise OSError(errno.EINVAL, "driver_override too long")
    value = text[:-1] if text.endswith("\n") else text
    dev.driver_override = value or None


_MONITOR_ATTRS = {"monitor_id", "server_monitor_pending", "client_monitor_pending",
                  "server_monitor_latency", "client_monitor_latency",
                  "server_monitor_conn_id", "client_monitor_conn_id", "pending", "latency"}


def _visible(dev: VmbusDevice, attr: Attr[VmbusDevice]) -> bool:
    """vmbus_dev_attr_is_visible / vmbus_chan_attr_is_visible: monitor attributes exist only
    when the offer allocated a monitor."""
    return attr.name not in _MONITOR_ATTRS or dev.offer.monitor_allocated


DEVICE_GROUP: Group[VmbusDevice] = Group(attrs=(
    Attr("id", lambda d: f"{d.offer.child_relid}\n", static=True),
    Attr("state", lambda d: f"{int(d.channel.state)}\n"),
    Attr("monitor_id", lambda d: f"{d.offer.monitorid}\n", static=True),
    Attr("class_id", lambda d: guid_braced(d.offer.if_type) + "\n", static=True),
    Attr("device_id", lambda d: guid_braced(d.offer.if_instance) + "\n", static=True),
    Attr("modalias", lambda d: f"vmbus:{guid_modalias_hex(d.offer.if_type)}\n", static=True),
    Attr("numa_node", lambda d: "0\n", static=True),
    Attr("server_monitor_pending", _pending(0)),
    Attr("client_monitor_pending", _pending(1)),
    Attr("server_monitor_latency", _latency(0)),
    Attr("client_monitor_latency", _latency(1)),
    Attr("server_monitor_conn_id", _conn_id(0)),
    Attr("client_monitor_conn_id", _conn_id(1)),
    *(Attr(f"{direction}_{name}", _ring_info(direction, field))
      for direction in ("out", "in") for name, field in _RING_FIELDS),
    Attr("channel_vp_mapping", lambda d: f"{d.channel.relid}:{d.channel.target_cpu}\n"),
    Attr("vendor", lambda d: "0x1414\n", static=True),
    Attr("device", lambda d: f"{d.dev_type:#x}\n", static=True),
    Attr("driver_override",
         lambda d: f"{d.driver_override if d.driver_override is not None else '(null)'}\n",
         _store_driver_override),
), is_visible=_visible)


def _endpoint_count(name: str) -> Callable[[VmbusDevice], str]:
    def show(d: VmbusDevice) -> str:
        ep = d.channel.endpoint
        return f"{getattr(ep, name) if ep is not None else 0}\n"
    return show


async def _store_cpu(d: VmbusDevice, text: str) -> None:
    try:
        cpu = int(text.strip(), 10)
    except ValueError:
        raise OSError(errno.EINVAL, f"not a CPU number: {text.strip()!r}") from None
    await d.set_target_cpu(cpu)


CHANNEL_GROUP: Group[VmbusDevice] = Group(attrs=(
    Attr("out_mask", lambda d: f"{d.channel.ring('out').interrupt_mask}\n"),
    Attr("in_mask", lambda d: f"{d.channel.ring('in').interrupt_mask}\n"),
    Attr("read_avail", lambda d: f"{d.channel.ring('in').bytes_to_read()}\n"),
    Attr("write_avail", lambda d: f"{d.channel.ring('out').bytes_to_write()}\n"),
    Attr("cpu", lambda d: f"{d.channel.target_cpu}\n", _store_cpu),
    Attr("pending", _pending(1)),
    Attr("latency", _latency(1)),
    Attr("interrupts", lambda d: f"{d.channel.interrupts}\n"),
    Attr("events", _endpoint_count("signals_sent")),
    Attr("intr_in_full", _endpoint_count("intr_in_full")),
    Attr("intr_out_empty", _endpoint_count("intr_out_empty")),
    Attr("out_full_first", _endpoint_count("out_full_first")),
    Attr("out_full_total", _endpoint_count("out_full_total")),
    Attr("monitor_id", lambda d: f"{d.offer.monitorid}\n", static=True),
    Attr("subchannel_id", lambda d: f"{d.offer.sub_channel_index}\n", static=True),
), is_visible=_visible)


def uevent(dev: VmbusDevice) -> str:
    lines = [f"DRIVER={dev.driver}"] if dev.driver else []
    lines.append(f"MODALIAS=vmbus:{guid_modalias_hex(dev.offer.if_type)}")
    return "\n".join(lines) + "\n"


def add_device_files(dev: VmbusDevice) -> None:
    assert dev.dir is not None
    add_group(dev.dir, dev, DEVICE_GROUP)
    chan_dir = dev.dir.mkdir("channels").mkdir(str(dev.channel.relid))
    add_group(chan_dir, dev, CHANNEL_GROUP)


def _dynid_store(dynids: set[uuid.UUID], add: bool) -> Callable[[str], None]:
    def store(text: str) -> None:
        try:
            guid = parse_guid(text)
        except ValueError as e:
            raise OSError(errno.EINVAL, str(e)) from None
        if add:
            if guid in dynids:
                raise OSError(errno.EEXIST, f"{guid} is already a dynamic id")
            dynids.add(guid)
        else:
            if guid not in dynids:
                raise OSError(errno.ENODEV, f"{guid} is not a dynamic id")
            dynids.discard(guid)
    return store


def add_bus_files(bus: Bus, hibernation: bool = False) -> None:
    """``/sys/bus/vmbus/hibernation``: ``hv_is_hibernation_supported()``, whether the
    platform offers ACPI S4."""
    bus.dir.add(Attribute("hibernation", lambda: f"{int(hibernation)}\n", static=True))


def add_driver_files(drv_dir: Directory, dynids: set[uuid.UUID]) -> None:
    """A driver's ``new_id`` and ``remove_id`` (its dynamic ids)."""
    drv_dir.add(Attribute("new_id", None, _dynid_store(dynids, True)))
    drv_dir.add(Attribute("remove_id", None, _dynid_store(dynids, False)))
