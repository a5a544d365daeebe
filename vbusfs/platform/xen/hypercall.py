"""What a guest learns from the hypervisor by hypercall rather than by bus: Xen's version
and build information (``XENVER_*``), read by ``drivers/xen/sys-hypervisor.c``."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

__all__ = ["XenVersionInfo"]


@dataclass(frozen=True)
class XenVersionInfo:
    major: int
    minor: int
    extra: str
    compiler: str
    compiled_by: str
    compile_date: str
    capabilities: str
    changeset: str
    virtual_start: int
    pagesize: int
    features: int            # XENVER_get_features submap 0
    guest_type: str          # "HVM", "PV", "PVH"
    guest_uuid: uuid.UUID    # XENVER_guest_handle
    buildid: str
    domid: int

    @property
    def version(self) -> int:
        """``XENVER_version``: major << 16 | minor."""
        return self.major << 16 | self.minor
