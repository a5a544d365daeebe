"""The guest's VMBus drivers: the bus, its channels and sysfs, and the device drivers."""
