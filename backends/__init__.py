"""The host side: bus emulations and device models, built from the machine config.

It imports the wire formats (``vbusfs.protocols``), the emulated hardware both halves share
(``vbusfs.platform``: guest memory, SynIC, grant table, event channels, doorbells) and the
machine description (``vbusfs.config``), never the guest side (``vbusfs.drivers``, the block
engine, the sysfs tree, FUSE): the two halves meet only in guest memory and the protocols.
The import-linter contracts in pyproject.toml hold it to that.
"""
