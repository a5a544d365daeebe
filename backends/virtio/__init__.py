"""The host side of virtio over PCI: the virtio-pci transport, split virtqueues, the
virtio-blk device and the devices without a data path, and the PCI host that puts them in
their slots."""
