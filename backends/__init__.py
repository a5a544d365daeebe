"""The host side: bus emulations and device models, built from the machine config.

Nothing here imports the guest side (``vbusfs.drivers`` and up): the two halves meet only in
``vbusfs.platform`` (guest memory, SynIC, doorbells) and the wire formats of
``vbusfs.protocols``.
"""
