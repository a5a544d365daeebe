"""GUIDs as Hyper-V and Linux print them.

Linux keeps a ``guid_t`` as the 16 raw bytes of the Windows layout (first three fields
little-endian). ``%pUl`` prints it as the ordinary lowercase text form; VMBus ``modalias``
prints the raw bytes in hex (reference/sysfs.md §1.2).
"""

from __future__ import annotations

import re
import uuid

__all__ = ["GUID_RE", "parse_guid", "guid_text", "guid_braced", "guid_modalias_hex"]

GUID_RE = re.compile(
    r"^\{?([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})\}?$"
)


def parse_guid(text: str) -> uuid.UUID:
    """Parse ``xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`` with or without braces.

    Raises ValueError with the offending text for anything else (no bare 32-hex form, no
    ``urn:uuid:`` prefix: configs should say exactly one thing).
    """
    m = GUID_RE.match(text.strip())
    if m is None or (text.strip().startswith("{") != text.strip().endswith("}")):
        raise ValueError(f"not a GUID: {text!r} (expected xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)")
    return uuid.UUID(m.group(1))


def guid_text(g: uuid.UUID) -> str:
    """``%pUl``: lowercase, no braces — the VMBus device directory name."""
    return str(g)


def guid_braced(g: uuid.UUID) -> str:
    """``{%pUl}``: what ``class_id`` and ``device_id`` print."""
    return "{" + str(g) + "}"


def guid_modalias_hex(g: uuid.UUID) -> str:
    """``%*phN`` of the raw guid_t: the little-endian byte layout in lowercase hex."""
    return g.bytes_le.hex()
