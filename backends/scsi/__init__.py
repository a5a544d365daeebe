"""The host's SCSI targets, bus-neutral: what a disk answers to a CDB, whichever transport
(storvsp on VMBus today, virtio-scsi later) carried it there."""
