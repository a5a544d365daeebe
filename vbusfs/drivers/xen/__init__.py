"""The guest's Xen drivers: xenstore client, xenbus, blkfront, xenstore view, /sys/hypervisor."""
