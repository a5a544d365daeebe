"""The Hyper-V host side of VMBus: the server, its channels and the device models."""

from backends.vmbus.channel import ChannelSpec, HostChannel
from backends.vmbus.host import VmbusHost

__all__ = ["ChannelSpec", "HostChannel", "VmbusHost"]
