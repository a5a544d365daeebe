"""Machine config validation: every error names its key path; nothing invalid gets through."""

from pathlib import Path

import pytest

from tests.conftest import ROOT
from vbusfs.config import (
    SECTIONS,
    ConfigError,
    derive_guid,
    load,
    load_default,
    parse,
    parse_size,
    reference,
)
from vbusfs.protocols.vmbus import messages as m


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "m.toml"
    p.write_text(text)
    return p


def test_default_machine_is_a_gen2_guest() -> None:
    cfg = load_default()
    types = [d.type for d in cfg.vmbus.devices]
    for want in ("shutdown", "timesync", "heartbeat", "kvp", "nic", "keyboard", "framebuffer",
                 "scsi"):
        assert want in types
    scsi = next(d for d in cfg.vmbus.devices if d.type == "scsi")
    assert str(scsi.instance) == "f8b3781a-1e82-4818-a1c3-63d806ec15bb"   # Azure scsi0
    assert cfg.vmbus.version == m.Version.WIN10_V5_3


def test_minimal_config_and_relative_state_dir(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, '[machine]\nname = "demo"\nstate_dir = "st"\n'
                               '[[vmbus.device]]\ntype = "heartbeat"\n'))
    assert cfg.machine.state_dir == tmp_path / "st"
    (dev,) = cfg.vmbus.devices
    assert dev.instance == derive_guid("demo", "vmbus", "heartbeat", "0")
    assert dev.instance.version == 4


def test_derived_guids_are_stable_and_distinct(tmp_path: Path) -> None:
    text = '[machine]\nname = "demo"\n' + '[[vmbus.device]]\ntype = "nic"\n' * 2
    a = load(write(tmp_path, text))
    b = load(write(tmp_path, text))
    assert [d.instance for d in a.vmbus.devices] == [d.instance for d in b.vmbus.devices]
    assert a.vmbus.devices[0].instance != a.vmbus.devices[1].instance
    other = load(write(tmp_path, text.replace("demo", "other")))
    assert other.vmbus.devices[0].instance != a.vmbus.devices[0].instance


@pytest.mark.parametrize(("text", "key", "words"), [
    ('[machine]\nname = "d"\ncolour = 1\n', "machine.colour", "unknown key"),
    ('[machine]\nname = 5\n', "machine.name", "expected a machine name"),
    ('[machine]\nname = "d"\ncpus = "two"\n', "machine.cpus", "expected"),
    ('[machine]\nname = "d"\ncpus = true\n', "machine.cpus", "boolean"),
    ('[machine]\nstate_dir = "x"\n', "machine.name", "missing"),
    ('[machine]\nname = "d"\n[[vmbus.device]]\ntype = "toaster"\n', "vmbus.device[0].type",
     "unknown device type"),
    ('[machine]\nname = "d"\n[[vmbus.device]]\ntype = "nic"\ninstance = "zz"\n',
     "vmbus.device[0].instance", "not a GUID"),
    ('[machine]\nname = "d"\n[[vmbus.device]]\ntype = "nic"\n'
     'instance = "f8b3781a-1e82-4818-a1c3-63d806ec15bb"\n'
     '[[vmbus.device]]\ntype = "scsi"\ninstance = "{F8B3781A-1E82-4818-A1C3-63D806EC15BB}"\n',
     "vmbus.device[1].instance", "duplicate device"),
    ('[machine]\nname = "d"\n[[vmbus.device]]\ntype = "nic"\nmonitor = "yes"\n',
     "vmbus.device[0].monitor", "true or false"),
    ('[machine]\nname = "d"\n[vmbus]\nversion = "1.1"\n', "vmbus.version", "2.4"),
    ('[machine]\nname = "d"\n[vmbus]\nversion = "7"\n', "vmbus.version", "not a VMBus"),
    ('[machine]\nname = "d"\nmemory = "lots"\n', "machine.memory", "not a size"),
    ('[machine]\nname = "d"\n[xenbus]\n', "xenbus", "unknown key"),
    ('[vmbus]\n', "machine", "missing"),
])
def test_errors_name_their_key(tmp_path: Path, text: str, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load(write(tmp_path, text))
    assert exc.value.key == key
    assert str(exc.value).startswith(key + ": ") and words in str(exc.value)


def test_not_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(write(tmp_path, "[machine\n"))
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "absent.toml")


def test_sizes() -> None:
    assert parse_size("64M") == 64 << 20 and parse_size("1G") == 1 << 30
    assert parse_size(4096) == 4096 and parse_size("2KiB") == 2048
    with pytest.raises(ValueError):
        parse_size("-1")


def test_the_reference_is_generated_from_the_tables() -> None:
    """docs/config.md is what the validation tables say (regenerate it with
    ``python -m vbusfs.config > docs/config.md``)."""
    assert (ROOT / "docs/config.md").read_text() == reference()


def test_every_key_the_parser_takes_is_in_the_reference() -> None:
    doc = (ROOT / "docs/config.md").read_text()
    for section in SECTIONS:
        assert f"## {section.heading}" in doc
        for name in section.keys:
            assert f"| `{name}` |" in doc
    # and a key outside the tables is refused, naming it
    with pytest.raises(ConfigError) as e:
        parse({"machine": {"name": "x", "colour": "red"}}, Path("/tmp"), "<t>")
    assert e.value.key == "machine.colour"
