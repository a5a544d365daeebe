"""The one explicit map from VMBus config device types to host-side device models, and
the channel offers the config asks for."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from backends.vmbus.channel import ChannelSpec, DeviceModel
from backends.vmbus.devices import IdleDevice
from backends.vmbus.ic import IC_SERVICES, IcHostSettings, make_ic
from backends.vmbus.storvsp import Storvsp
from vbusfs.config.vmbus import VmbusDeviceConfig
from vbusfs.protocols.vmbus import messages as m

__all__ = ["VMBUS_MODELS", "vmbus_channel_specs"]

#: VMBUS_PIPE_TYPE_MESSAGE in the offer's user-defined area, and the offer flags a named-pipe
#: IC channel carries (reference/hv-services.md §1.1)
_PIPE_FLAGS = 0x1 | 0x10
_PIPE_MODE_MESSAGE = (4).to_bytes(4, "little")


#: a device model made from its device's config and the integration services' settings
ModelFactory = Callable[[VmbusDeviceConfig, IcHostSettings], DeviceModel]


def _ic(service: str) -> ModelFactory:
    return lambda _dev, settings: make_ic(service, settings)


VMBUS_MODELS: dict[str, ModelFactory] = {
    **{service: _ic(service) for service in IC_SERVICES},
    **{c.type: (lambda _dev, _settings: IdleDevice()) for c in m.DEVICE_CLASSES
       if c.type not in IC_SERVICES},
    "scsi": lambda dev, _settings: Storvsp.from_config(dev),
}


def vmbus_channel_specs(devices: Sequence[VmbusDeviceConfig],
                        ic: IcHostSettings | None = None) -> list[ChannelSpec]:
    """One offer per configured device, with its host-side model; the integration services
    take ``ic`` (defaults when absent)."""
    settings = ic or IcHostSettings()
    specs = []
    for dev in devices:
        cls = m.class_by_type(dev.type)
        assert cls is not None  # config validation guarantees it
        is_ic = dev.type in IC_SERVICES
        specs.append(ChannelSpec(
            name=dev.key, if_type=cls.guid, if_instance=dev.instance,
            model=VMBUS_MODELS[dev.type](dev, settings), monitor=dev.monitor,
            chn_flags=_PIPE_FLAGS if is_ic else 0,
            user_defined=_PIPE_MODE_MESSAGE if is_ic else b""))
    return specs
