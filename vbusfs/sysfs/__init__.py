"""The sysfs-shaped tree: nodes, attribute descriptors and groups, inode numbers.

This package is a leaf library: it imports nothing else from vbusfs, so bus drivers and the
block layer can publish into it (as Linux drivers call into kernfs) without cycles.
"""

from vbusfs.sysfs.attrs import Attr, Group, add_group
from vbusfs.sysfs.nodes import (
    Attribute,
    BinAttribute,
    BlockDevice,
    BlockFile,
    DataFile,
    Directory,
    Node,
    Symlink,
    Tree,
    relpath_between,
)

__all__ = [
    "Attr", "Group", "add_group", "Attribute", "BinAttribute", "BlockDevice", "BlockFile",
    "DataFile", "Directory", "Node", "Symlink", "Tree", "relpath_between",
]
