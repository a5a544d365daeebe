"""``python -m vbusfs.config``: print the config reference (docs/config.md)."""

from vbusfs.config import reference

print(reference(), end="")
