"""Hyper-V host side: the VMBus channel-management server and per-channel device models."""

from backends.vmbus.host import ChannelSpec, HostChannel, VmbusHost

__all__ = ["ChannelSpec", "HostChannel", "VmbusHost"]
