"""The guest's SCSI midlayer, bus-neutral (Linux ``drivers/scsi/``: hosts, targets, devices,
the scan, ``sd``): a low-level driver (storvsc on VMBus; virtio-scsi could be another)
supplies a :class:`~vbusfs.drivers.scsi.device.HostAdapter` and the engine transport that
carries its commands; everything that is SCSI and not the bus lives here."""
