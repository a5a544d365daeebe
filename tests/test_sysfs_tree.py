"""The node library: modes, sizes, relative symlinks, inode lifetime, attribute groups."""

import errno
import os
import stat
from dataclasses import dataclass

import pytest

from vbusfs.sysfs import Attr, Attribute, Directory, Group, Symlink, Tree, add_group


def test_modes_and_sizes() -> None:
    t = Tree()
    d = t.root.makedirs("sys/bus/x")
    ro = d.add(Attribute("ro", lambda: "1\n"))
    rw = d.add(Attribute("rw", lambda: "1\n", lambda s: None))
    wo = d.add(Attribute("wo", None, lambda s: None))
    assert [stat.S_IMODE(n.mode) for n in (ro, rw, wo)] == [0o444, 0o644, 0o200]
    assert ro.size() == 4096 and stat.S_ISREG(ro.mode) and stat.S_ISDIR(d.mode)


def test_relative_symlinks_resolve_inside() -> None:
    t = Tree()
    target = t.root.makedirs("sys/devices/LNXSYSTM:00/VMBUS:00/abc")
    devices = t.root.makedirs("sys/bus/vmbus/devices")
    link = devices.add(Symlink("abc", target))
    assert isinstance(link, Symlink)
    rel = link.readlink()
    assert rel == "../../../devices/LNXSYSTM:00/VMBUS:00/abc"
    assert os.path.normpath(os.path.join("/sys/bus/vmbus/devices", rel)) == target.path()


def test_dangling_after_removal() -> None:
    t = Tree()
    target = t.root.makedirs("a/b")
    link = t.root.add(Symlink("l", target))
    assert isinstance(link, Symlink)
    assert isinstance(t.root.children["a"], Directory)
    t.root.children["a"].remove("b")   # type: ignore[union-attr]
    with pytest.raises(FileNotFoundError):
        link.readlink()


def test_inodes_stable_and_kept_until_forgotten() -> None:
    t = Tree()
    d = t.root.makedirs("x/y")
    a = d.add(Attribute("a", lambda: "v\n"))
    ino = a.ino
    assert t.get(ino) is a and ino > 1
    t.remember(ino)
    d.remove("a")
    assert t.get(ino) is a          # the kernel still holds it
    t.forget(ino, 1)
    with pytest.raises(FileNotFoundError):
        t.get(ino)
    b = d.add(Attribute("a", lambda: "v\n"))
    assert b.ino != ino             # never reused


def test_duplicate_names_refused() -> None:
    t = Tree()
    t.root.mkdir("x")
    with pytest.raises(FileExistsError):
        t.root.mkdir("x")
    with pytest.raises(ValueError):
        Directory("a/b")


def test_write_rules() -> None:
    a = Attribute("ro", lambda: "1\n")
    with pytest.raises(PermissionError) as e:
        a.write(b"2")
    assert e.value.errno == errno.EACCES
    b = Attribute("wo", None, lambda s: None)
    with pytest.raises(PermissionError):
        b.render()
    c = Attribute("rw", lambda: "x\n", lambda s: None)
    with pytest.raises(OSError) as e2:
        c.write(b"\xff\xfe")
    assert e2.value.errno == errno.EINVAL


@dataclass
class Obj:
    value: int
    monitored: bool


def test_group_visibility_and_binding() -> None:
    group: Group[Obj] = Group(
        attrs=(Attr("value", lambda o: f"{o.value}\n"),
               Attr("monitor_id", lambda o: "7\n")),
        is_visible=lambda o, a: a.name != "monitor_id" or o.monitored)
    t = Tree()
    d1, d2 = t.root.mkdir("one"), t.root.mkdir("two")
    o1, o2 = Obj(1, False), Obj(2, True)
    add_group(d1, o1, group)
    add_group(d2, o2, group)
    assert sorted(d1.children) == ["value"]               # hidden means absent
    assert sorted(d2.children) == ["monitor_id", "value"]
    o1.value = 42
    v = d1.children["value"]
    assert isinstance(v, Attribute) and v.render() == b"42\n"   # computed when read


def test_static_attribute_rendered_once_and_sized_by_its_text() -> None:
    t = Tree()
    d = t.root.makedirs("sys/x")
    calls = []

    def show() -> str:
        calls.append(1)
        return "{57164f39-9115-4e78-ab55-382f3bd5422d}\n"

    a = d.add(Attribute("class_id", show, static=True))
    live = d.add(Attribute("state", lambda: "3\n"))
    assert isinstance(a, Attribute) and isinstance(live, Attribute)
    # the kernel trims a cached file's i_size to where a read ended: the size is the text's
    assert a.size() == 39 and live.size() == 4096
    assert a.render() == a.render() == b"{57164f39-9115-4e78-ab55-382f3bd5422d}\n"
    assert len(calls) == 1


def test_static_attribute_failure_not_kept() -> None:
    t = Tree()
    results: list[str | OSError] = [OSError(errno.ENODEV, "no channel"), "1\n"]

    def show() -> str:
        r = results.pop(0)
        if isinstance(r, OSError):
            raise r
        return r

    a = t.root.add(Attribute("id", show, static=True))
    assert isinstance(a, Attribute)
    assert a.size() == 4096                  # the failure is not kept ...
    assert a.render() == b"1\n" and a.size() == 2     # ... the next open renders again


def test_writable_attribute_cannot_be_static() -> None:
    with pytest.raises(ValueError):
        Attribute("cpu", lambda: "0\n", lambda _t: None, static=True)
    with pytest.raises(ValueError):
        Attribute("bind", None, lambda _t: None, static=True)
    with pytest.raises(ValueError):
        add_group(Tree().root, object(), Group([Attr("x", lambda _o: "1\n",
                                                     lambda _o, _t: None, static=True)]))
