"""One VMBus device as the guest sees it (Linux ``struct hv_device``): the offer, its
primary channel, and what the driver core keeps about it."""

from __future__ import annotations

import errno

from vbusfs.drivers.vmbus.channel import ChannelState, GuestChannel
from vbusfs.drivers.vmbus.connection import VmbusConnection
from vbusfs.protocols.guid import guid_text
from vbusfs.protocols.vmbus import messages as m
from vbusfs.sysfs import Directory

__all__ = ["VmbusDevice"]


class VmbusDevice:
    def __init__(self, conn: VmbusConnection, offer: m.OfferChannel) -> None:
        self.conn = conn
        self.offer: m.OfferChannel = offer
        self.name: str = guid_text(offer.if_instance)
        self.device_class: m.DeviceClass | None = m.class_by_guid(offer.if_type)
        self.channel = GuestChannel(conn, offer)
        self.driver_override: str | None = None
        self.driver: str | None = None
        self.drvdata: object = None          # the bound driver's own state
        self.dir: Directory | None = None

    @property
    def dev_type(self) -> int:
        return self.device_class.dev_type if self.device_class else m.HV_UNKNOWN

    async def set_target_cpu(self, cpu: int) -> None:
        """``channels/<relid>/cpu`` store (vmbus_drv.c ``target_cpu_store``)."""
        conn = self.conn
        if conn.version is None or conn.version < m.Version.WIN10_V4_1:
            raise OSError(errno.EIO, "needs VMBus protocol 4.1 or later")
        if not 0 <= cpu < conn.cpus:
            raise OSError(errno.EINVAL, f"cpu {cpu} is not online (0-{conn.cpus - 1})")
        chan = self.channel
        if chan.state != ChannelState.OPENED:
            raise OSError(errno.EIO, "channel is not open")
        if cpu == chan.target_cpu:
            return
        await conn.modify_channel(chan.relid, cpu)
        chan.target_cpu = cpu
