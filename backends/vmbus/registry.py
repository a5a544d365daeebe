"""The one explicit map from VMBus config device types to host-side device models, and
the channel offers the config asks for."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from backends.vmbus.channel import ChannelSpec, DeviceModel
from backends.vmbus.devices import IC_SERVICES, IcDevice, IdleDevice
from backends.vmbus.storvsp import Storvsp
from vbusfs.config.vmbus import VmbusDeviceConfig
from vbusfs.protocols.vmbus import messages as m

__all__ = ["VMBUS_MODELS", "vmbus_channel_specs"]

#: VMBUS_PIPE_TYPE_MESSAGE in the offer's user-defined area, and the offer flags a named-pipe
#: IC channel carries (reference/hv-services.md §1.1)
_PIPE_FLAGS = 0x1 | 0x10
_PIPE_MODE_MESSAGE = (4).to_bytes(4, "little")


def _ic(service: str) -> Callable[[VmbusDeviceConfig], DeviceModel]:
    return lambda _dev: IcDevice(service)


#: config type → a model for one device of that type, built from its config
VMBUS_MODELS: dict[str, Callable[[VmbusDeviceConfig], DeviceModel]] = {
    **{service: _ic(service) for service in IC_SERVICES},
    **{c.type: (lambda _dev: IdleDevice()) for c in m.DEVICE_CLASSES
       if c.type not in IC_SERVICES},
    "scsi": Storvsp.from_config,
}


def vmbus_channel_specs(devices: Sequence[VmbusDeviceConfig]) -> list[ChannelSpec]:
    specs = []
    for dev in devices:
        cls = m.class_by_type(dev.type)
        assert cls is not None  # config validation guarantees it
        is_ic = dev.type in IC_SERVICES
        specs.append(ChannelSpec(
            name=dev.key, if_type=cls.guid, if_instance=dev.instance,
            model=VMBUS_MODELS[dev.type](dev), monitor=dev.monitor,
            chn_flags=_PIPE_FLAGS if is_ic else 0,
            user_defined=_PIPE_MODE_MESSAGE if is_ic else b""))
    return specs
