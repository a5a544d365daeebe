"""Xen wire formats: the shared ring, blkif, xenstore and xenbus (pure, no I/O)."""
