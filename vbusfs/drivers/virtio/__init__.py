"""The guest's virtio: the virtio-pci transport (a PCI driver), the virtio bus and core, the
driver side of split virtqueues, virtio-blk on the block engine, and the drivers that only
negotiate (net, console, rng, balloon)."""
