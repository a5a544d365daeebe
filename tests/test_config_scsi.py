"""[[vmbus.device.lun]] validation: defaults, the default machine's disks, and every key's
refusal naming its key path."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from vbusfs.config import ConfigError, derive_guid, load_default, parse

HEAD = '[machine]\nname = "d"\nstate_dir = "st"\n[[vmbus.device]]\ntype = "scsi"\n'


def cfg(tmp: Path, text: str) -> object:
    return parse(tomllib.loads(HEAD + text), tmp, "<t>")


def test_the_default_machine_has_an_os_and_a_resource_disk() -> None:
    c = load_default()
    scsi = next(d for d in c.vmbus.devices if d.type == "scsi")
    assert str(scsi.instance) == "f8b3781a-1e82-4818-a1c3-63d806ec15bb"
    assert [(lun.lun, lun.size, lun.image.name) for lun in scsi.luns] == \
        [(0, 1 << 30, "scsi0-lun0.img"), (1, 512 << 20, "scsi0-lun1.img")]


def test_defaults_and_derived_identities(tmp_path: Path) -> None:
    c = parse(tomllib.loads(HEAD + "[[vmbus.device.lun]]\n[[vmbus.device.lun]]\nlun = 5\n"
                            '[[vmbus.device]]\ntype = "scsi"\n[[vmbus.device.lun]]\n'),
              tmp_path, "<t>")
    (a, b), (c2,) = c.vmbus.devices[0].luns, c.vmbus.devices[1].luns   # type: ignore[misc]
    assert (a.lun, b.lun, c2.lun) == (0, 5, 0)
    assert (a.vendor, a.model, a.sector_size, a.readonly, a.discard, a.write_cache,
            a.rotational, a.size) == ("Msft", "Virtual Disk", 512, False, True, True, False,
                                      1 << 30)
    assert a.image == tmp_path / "st/scsi0-lun0.img" and c2.image == tmp_path / "st/scsi1-lun0.img"
    assert a.serial == derive_guid("d", "vmbus", "scsi", "0", "lun", "0", "serial").hex
    assert a.disk_id == derive_guid("d", "vmbus", "scsi", "0", "lun", "0")
    assert len({a.serial, b.serial, c2.serial}) == 3
    assert a.key == "vmbus.device[0].lun[0]"


@pytest.mark.parametrize(("lun", "key", "words"), [
    ("lun = -1", "vmbus.device[0].lun[0].lun", "between 0 and 254"),
    ("lun = 255", "vmbus.device[0].lun[0].lun", "between 0 and 254"),
    ('lun = "0"', "vmbus.device[0].lun[0].lun", "expected a LUN number"),
    ("sector_size = 520", "vmbus.device[0].lun[0].sector_size", "512, 1024, 2048 or 4096"),
    ('size = "1000"', "vmbus.device[0].lun[0].size", "multiple of the 512-byte"),
    ('size = "0"', "vmbus.device[0].lun[0].size", "positive multiple"),
    ('size = "lots"', "vmbus.device[0].lun[0].size", "not a size"),
    ('readonly = "yes"', "vmbus.device[0].lun[0].readonly", "true or false"),
    ('serial = "caf\\u00e9"', "vmbus.device[0].lun[0].serial", "printable ASCII"),
    (f'serial = "{"x" * 256}"', "vmbus.device[0].lun[0].serial", "at most 255"),
    ('vendor = "NineChars"', "vmbus.device[0].lun[0].vendor", "at most 8"),
    ('model = "Seventeen chars!!"', "vmbus.device[0].lun[0].model", "at most 16"),
    ("discard = 1", "vmbus.device[0].lun[0].discard", "true or false"),
    ("write_cache = 0", "vmbus.device[0].lun[0].write_cache", "true or false"),
    ('colour = "blue"', "vmbus.device[0].lun[0].colour", "unknown key"),
])
def test_bad_keys_name_their_path(tmp_path: Path, lun: str, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as e:
        cfg(tmp_path, f"[[vmbus.device.lun]]\n{lun}\n")
    assert e.value.key == key and words in str(e.value), str(e.value)


def test_duplicates_and_luns_where_they_cannot_be(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        cfg(tmp_path, "[[vmbus.device.lun]]\nlun = 3\n[[vmbus.device.lun]]\nlun = 3\n")
    assert e.value.key == "vmbus.device[0].lun[1].lun" and "also" in str(e.value)
    with pytest.raises(ConfigError) as e:
        cfg(tmp_path, '[[vmbus.device.lun]]\nimage = "a.img"\n[[vmbus.device.lun]]\n'
                      'image = "a.img"\n')
    assert e.value.key == "vmbus.device[0].lun[1].image"
    with pytest.raises(ConfigError) as e:
        parse(tomllib.loads(HEAD + '[[vmbus.device.lun]]\nimage = "x.img"\n[xen]\n'
                            '[[xen.vbd]]\nvdev = "xvda"\nimage = "x.img"\n'), tmp_path, "<t>")
    assert e.value.key == "xen.vbd[0].image" and "vmbus.device[0].lun[0]" in str(e.value)
    with pytest.raises(ConfigError) as e:
        parse(tomllib.loads('[machine]\nname = "d"\n[[vmbus.device]]\ntype = "nic"\n'
                            '[[vmbus.device.lun]]\n'), tmp_path, "<t>")
    assert e.value.key == "vmbus.device[0].lun" and "only scsi" in str(e.value)
