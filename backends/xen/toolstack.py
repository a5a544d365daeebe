"""The toolstack's part (what ``xl`` / libxl write): the domain's xenstore home, and for each
disk the frontend and backend directories in Initialising (reference/sysfs.md §2.3,
xenstore-paths.pandoc), written in one transaction; detaching follows ``xl block-detach``.
"""

from __future__ import annotations

import uuid

import trio

from backends.xen.xenstore import Store, domain_path
from vbusfs.config.xen import VbdConfig
from vbusfs.platform.xen.hypercall import XenVersionInfo
from vbusfs.protocols.xen.xenbus import State

__all__ = ["Toolstack", "version_info"]

#: XENFEAT_* bits an HVM guest typically sees: auto_translated_physmap (2),
#: hvm_callback_vector (8), hvm_safe_pvclock (9), hvm_pirqs (10), memory_op_vnode (13);
#: never dom0 (11). A plausible set, not one read from a particular host.
HVM_FEATURES = 1 << 2 | 1 << 8 | 1 << 9 | 1 << 10 | 1 << 13


def version_info(domid: int, guest_uuid: uuid.UUID, version: tuple[int, int]) -> XenVersionInfo:
    return XenVersionInfo(
        major=version[0], minor=version[1], extra=".0", compiler="gcc (Debian 12.2.0-14) 12.2.0",
        compiled_by="vbusfs", compile_date="Thu Jan  1 00:00:00 UTC 2026",
        capabilities="xen-3.0-x86_64 hvm-3.0-x86_32 hvm-3.0-x86_32p hvm-3.0-x86_64",
        changeset="vbusfs emulation", virtual_start=0, pagesize=4096,
        features=HVM_FEATURES, guest_type="HVM", guest_uuid=guest_uuid,
        buildid="<denied>", domid=domid)


class Toolstack:
    def __init__(self, store: Store, domid: int, name: str, dom_uuid: uuid.UUID) -> None:
        self.store = store
        self.domid = domid
        self.name = name
        self.uuid = dom_uuid

    def create_domain(self) -> None:
        s = self.store
        tx = s.transaction()
        tx.write(f"{domain_path(0)}/name", "Domain-0")
        tx.write(f"{domain_path(0)}/domid", "0")
        home = domain_path(self.domid)
        vm = f"/vm/{self.uuid}"
        tx.write(f"{home}/name", self.name)
        tx.write(f"{home}/domid", str(self.domid))
        tx.write(f"{home}/vm", vm)
        tx.mkdir(f"{home}/device")
        tx.write(f"{vm}/name", self.name)
        tx.write(f"{vm}/uuid", str(self.uuid))
        tx.end(commit=True)

    def paths(self, spec: VbdConfig, backend_domid: int = 0) -> tuple[str, str]:
        n = spec.vdev.number
        return (f"{domain_path(self.domid)}/device/vbd/{n}",
                f"{domain_path(backend_domid)}/backend/vbd/{self.domid}/{n}")

    def add_vbd(self, spec: VbdConfig, backend_domid: int = 0) -> None:
        fe, be = self.paths(spec, backend_domid)
        tx = self.store.transaction()
        tx.write(f"{fe}/backend", be)
        tx.write(f"{fe}/backend-id", str(backend_domid))
        tx.write(f"{fe}/virtual-device", str(spec.vdev.number))
        tx.write(f"{fe}/device-type", "disk")
        tx.write(f"{fe}/state", str(int(State.INITIALISING)))
        tx.write(f"{be}/frontend", fe)
        tx.write(f"{be}/frontend-id", str(self.domid))
        tx.write(f"{be}/params", str(spec.image))
        tx.write(f"{be}/type", "file")
        tx.write(f"{be}/mode", "r" if spec.readonly else "w")
        tx.write(f"{be}/online", "1")
        tx.write(f"{be}/removable", "0")
        tx.write(f"{be}/bootable", "1")
        tx.write(f"{be}/dev", spec.vdev.name)
        tx.write(f"{be}/discard-enable", "1" if "discard" in spec.features else "0")
        tx.write(f"{be}/state", str(int(State.INITIALISING)))
        tx.end(commit=True)

    async def remove_vbd(self, spec: VbdConfig, deadline: float = 10.0,
                         backend_domid: int = 0) -> bool:
        """``xl block-detach``: offline the backend and ask it to close; once the frontend
        is Closed (or the deadline passes) remove both directories. True if it closed."""
        fe, be = self.paths(spec, backend_domid)
        self.store.write(f"{be}/online", "0")
        self.store.write(f"{be}/state", str(int(State.CLOSING)))
        closed = False
        with trio.move_on_after(deadline):
            while True:
                try:
                    if int(self.store.read(f"{fe}/state")) == State.CLOSED:
                        closed = True
                        break
                except (OSError, ValueError):
                    break
                await trio.sleep(0.02)
        self.store.rm(fe)
        self.store.rm(be)
        return closed
