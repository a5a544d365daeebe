"""What a Xen guest gets from the hypervisor: grant table, event channels, the xenstore page."""
