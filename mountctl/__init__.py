"""mountctl: mount, inspect and unmount vbusfs machines (see ``mountctl --help``)."""
