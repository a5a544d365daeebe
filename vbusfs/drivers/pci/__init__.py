"""The guest's PCI bus: enumeration through configuration space, resources, the PCI sysfs
tree, and the drivers that bind to functions."""
