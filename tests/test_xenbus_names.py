"""Virtual-device numbers and names, and xenbus state strings, against reference/sysfs.md
§2.2 and §2.5 (the tables there are the expected values)."""

from __future__ import annotations

import pytest

from vbusfs.protocols.xen.xenbus import disk_name, parse_vdev, strstate

# reference/sysfs.md §2.5: xenstore vdev, name, dev (major:minor)
VDEV_TABLE = [
    (51712, "xvda", "202:0"),
    (51728, "xvdb", "202:16"),
    (51952, "xvdp", "202:240"),
    (268439552, "xvdq", "202:4096"),
    (268442112, "xvdaa", "202:6656"),
]


@pytest.mark.parametrize(("number", "name", "dev"), VDEV_TABLE)
def test_reference_vdev_table(number: int, name: str, dev: str) -> None:
    by_number = parse_vdev(number)
    assert by_number.name == name
    assert f"202:{by_number.minor}" == dev
    by_name = parse_vdev(name)          # the config accepts names, encoded as xl does
    assert by_name.number == number


def test_partitions_and_ranges() -> None:
    assert parse_vdev("xvda2").number == 202 << 8 | 2
    assert parse_vdev("xvda2").range == 1
    assert parse_vdev("xvda").range == 16 and parse_vdev("xvdq").range == 256
    # hd and sd numbers map to xvd names (blkfront): 768 = hda, 2048 = sda
    assert parse_vdev(3 << 8).name == "xvda"
    assert parse_vdev(22 << 8 | 64).name == "xvdd"
    assert parse_vdev(8 << 8 | 16).name == "xvdb"


@pytest.mark.parametrize("bad", ["sda", "xvd", "xvdA", "xvd1", "12<<8", "-5", "xvdabcde"])
def test_bad_names(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_vdev(bad)


def test_base26() -> None:
    assert [disk_name(i) for i in (0, 25, 26, 27, 701, 702)] == \
        ["a", "z", "aa", "ab", "zz", "aaa"]


def test_strstate() -> None:
    # reference/sysfs.md §2.2
    assert [strstate(i) for i in range(10)] == [
        "Unknown", "Initialising", "InitWait", "Initialised", "Connected", "Closing",
        "Closed", "Reconfiguring", "Reconfigured", "INVALID"]
