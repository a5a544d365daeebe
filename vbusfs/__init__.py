"""vbusfs: paravirtual buses (VMBus, xenbus, virtio-pci) emulated in user space and mounted
as a Linux-sysfs-shaped FUSE tree.

The guest side lives in this package; the host side (bus emulation and device models) lives
in the sibling package ``backends``. See docs/architecture.md for the layering.
"""

__version__ = "0.1.0"
