"""Attributes declared as data: one row per attribute, collected into groups.

A Linux driver declares ``DEVICE_ATTR_RO(foo)`` plus a ``foo_show`` and lists them in an
``attribute_group`` with an ``is_visible`` hook; here one :class:`Attr` row carries the name
and a show/store function of the owning object, and :func:`add_group` instantiates a group for
one object. Hidden attributes are simply not created (they do not exist, reference §0).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from vbusfs.sysfs.nodes import Attribute, Directory

__all__ = ["Attr", "Group", "add_group"]

T = TypeVar("T")


@dataclass(frozen=True)
class Attr(Generic[T]):
    name: str
    show: Callable[[T], str] | None = None
    store: Callable[[T, str], Awaitable[str | None] | str | None] | None = None
    perm: int | None = None   # None: 0444 / 0644 / 0200 from show and store
    #: the text cannot change while the attribute exists (see :class:`Attribute`)
    static: bool = False


@dataclass(frozen=True)
class Group(Generic[T]):
    attrs: Sequence[Attr[T]]
    subdir: str | None = None
    is_visible: Callable[[T, Attr[T]], bool] | None = None


def _bind(obj: T, attr: Attr[T]) -> Attribute:
    show = attr.show
    store = attr.store
    return Attribute(
        attr.name,
        (lambda: show(obj)) if show is not None else None,
        (lambda text: store(obj, text)) if store is not None else None,
        attr.perm,
        static=attr.static,
    )


def add_group(directory: Directory, obj: T, group: Group[T]) -> list[Attribute]:
    """Create the visible attributes of ``group`` for ``obj`` under ``directory``."""
    target = directory.dir(group.subdir) if group.subdir else directory
    created: list[Attribute] = []
    for attr in group.attrs:
        if group.is_visible is not None and not group.is_visible(obj, attr):
            continue
        node = _bind(obj, attr)
        target.add(node)
        created.append(node)
    return created
