"""vbusfs: paravirtual buses (VMBus, xenbus, virtio-pci) emulated in user space and mounted
as a Linux-sysfs-shaped FUSE tree.

The guest side lives in this package; the host side (bus emulation and device models) lives
in the sibling package ``backends``. See docs/architecture.md for the layering. This module
stays free of imports: ``mountctl`` reads the names below without loading the service.
"""

__version__ = "0.1.0"

#: the service's own directory at the top of a mount (not part of the sysfs tree)
CONTROL_DIR = ".vbusfs"
#: the type a vbusfs mount has in /proc/self/mountinfo
FSTYPE = "fuse.vbusfs"
