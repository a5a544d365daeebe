"""``/sys/hypervisor`` of a Xen guest (``drivers/xen/sys-hypervisor.c``; reference/sysfs.md
§2.4), from the version information the hypervisor gives by hypercall."""

from __future__ import annotations

from vbusfs.platform.xen.hypercall import XenVersionInfo
from vbusfs.sysfs import Attribute, Tree

__all__ = ["add_sys_hypervisor"]


def add_sys_hypervisor(tree: Tree, info: XenVersionInfo) -> None:
    hv = tree.root.makedirs("sys/hypervisor")

    def attr(path: str, text: str) -> None:
        head, _, name = path.rpartition("/")
        d = hv.makedirs(head) if head else hv
        d.add(Attribute(name, lambda: text, static=True))

    attr("type", "xen\n")
    attr("guest_type", info.guest_type + "\n")
    attr("uuid", f"{info.guest_uuid}\n")
    attr("version/major", f"{info.version >> 16}\n")
    attr("version/minor", f"{info.version & 0xFF}\n")     # the kernel prints the low byte
    attr("version/extra", info.extra + "\n")
    attr("compilation/compiler", info.compiler + "\n")
    attr("compilation/compiled_by", info.compiled_by + "\n")
    attr("compilation/compile_date", info.compile_date + "\n")
    attr("properties/capabilities", info.capabilities + "\n")
    attr("properties/changeset", info.changeset + "\n")
    attr("properties/virtual_start", f"{info.virtual_start:x}\n")
    attr("properties/pagesize", f"{info.pagesize:x}\n")
    attr("properties/features", f"{info.features:08x}\n")
    attr("properties/buildid", info.buildid)               # no newline, as in Linux
    attr("start_flags/privileged", "0\n")
    attr("start_flags/initdomain", "0\n")
