"""virtio wire formats: device IDs, split virtqueues, the virtio-pci registers and virtio-blk
(pure, no I/O)."""
