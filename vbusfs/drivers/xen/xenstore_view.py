"""``MNT/xenstore/...``: the xenstore tree as read-only files, kept current by a watch on
``/`` (so it is what the guest can read over its xenstore connection, never the store
itself). A node with children is a directory, a leaf is a file holding its value and a
newline, as ``xenstore-read`` prints it.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from vbusfs.drivers.xen.xenstore_client import XenstoreClient
from vbusfs.sysfs import Attribute, Directory, Node, Tree

__all__ = ["XenstoreView"]


class XenstoreView:
    def __init__(self, tree: Tree, client: XenstoreClient, name: str = "xenstore") -> None:
        self.client = client
        self.root = tree.root.mkdir(name)
        self.values: dict[str, str] = {}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        watch = await self.client.watch("/", "xenstore-view")
        await watch.receive()
        await self.sync("/")
        task_status.started()
        async for path in watch:
            pending = {path}
            while True:
                try:
                    pending.add(watch.receive_nowait())
                except trio.WouldBlock:
                    break
            for p in sorted(pending, key=len):
                await self.sync(p)

    def _show(self, path: str) -> Callable[[], str]:
        return lambda: self.values.get(path, "") + "\n"

    def _node(self, path: str) -> Node | None:
        node: Node = self.root
        for part in path.strip("/").split("/"):
            if not part:
                continue
            if not isinstance(node, Directory) or part not in node.children:
                return None
            node = node.children[part]
        return node

    def _parent_dir(self, path: str) -> Directory:
        d = self.root
        for part in path.strip("/").split("/")[:-1]:
            child = d.children.get(part)
            if not isinstance(child, Directory):
                if child is not None:
                    d.remove(part)
                child = d.mkdir(part)
            d = child
        return d

    def _drop(self, path: str) -> None:
        node = self._node(path)
        if node is not None and node.parent is not None:
            node.parent.remove(node.name)
        for p in [p for p in self.values if p == path or p.startswith(path + "/")]:
            del self.values[p]

    async def sync(self, path: str) -> None:
        try:
            value = await self.client.read(path)
            children = await self.client.directory(path)
        except FileNotFoundError:
            self._drop(path)
            return
        self.values[path] = value
        if path == "/":
            node: Node | None = self.root
        else:
            parent = self._parent_dir(path)
            name = path.rsplit("/", 1)[1]
            node = parent.children.get(name)
            want_dir = bool(children)
            if node is not None and isinstance(node, Directory) != want_dir:
                parent.remove(name)
                node = None
            if node is None:
                if want_dir:
                    node = parent.mkdir(name)
                else:
                    node = parent.add(Attribute(name, self._show(path)))
        if isinstance(node, Directory):
            for gone in [n for n in node.children if n not in children]:
                self._drop(f"{path.rstrip('/')}/{gone}")
            for child in children:
                await self.sync(f"{path.rstrip('/')}/{child}")
