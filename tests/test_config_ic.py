"""``[vmbus.ic]``: defaults, a full table, and errors that name their key path."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vbusfs.config import ConfigError, derive_guid, load, load_default

HEAD = '[machine]\nname = "d"\n[vmbus.ic]\n'


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "m.toml"
    p.write_text(text)
    return p


def test_defaults() -> None:
    ic = load_default().vmbus.ic
    assert (ic.on_shutdown, ic.on_reboot, ic.hibernation) == ("unmount", "log", False)
    assert (ic.heartbeat_interval, ic.timesync_interval, ic.timesync_skew_ns) == (2, 5, 0)
    assert ic.kvp_external == ()
    items = dict(ic.kvp_auto_external)
    assert items["VirtualMachineName"] == "hyperv-gen2"
    assert items["VirtualMachineId"] == str(derive_guid("hyperv-gen2", "vm")).upper()
    assert re.fullmatch(r"[0-9A-F]{8}(-[0-9A-F]{4}){3}-[0-9A-F]{12}", items["VirtualMachineId"])


def test_a_full_table(tmp_path: Path) -> None:
    ic = load(write(tmp_path, HEAD + 'on_shutdown = "log"\non_reboot = "unmount"\n'
                    'hibernation = true\nheartbeat_interval = 0.5\ntimesync_interval = 60\n'
                    'timesync_skew = -1.5\nkvp_external = { Role = "web", "Key with space" = '
                    '"v" }\n[vmbus.ic.kvp_auto_external]\nHostName = "h1"\n')).vmbus.ic
    assert (ic.on_shutdown, ic.on_reboot, ic.hibernation) == ("log", "unmount", True)
    assert (ic.heartbeat_interval, ic.timesync_interval) == (0.5, 60.0)
    assert ic.timesync_skew_ns == -1_500_000_000
    assert ic.kvp_external == (("Role", "web"), ("Key with space", "v"))
    assert ic.kvp_auto_external == (("HostName", "h1"),)


@pytest.mark.parametrize("text,key,words", [
    ('on_shutdown = "reboot"\n', "vmbus.ic.on_shutdown", "not one of unmount, log"),
    ('on_reboot = 1\n', "vmbus.ic.on_reboot", "expected"),
    ('hibernation = "yes"\n', "vmbus.ic.hibernation", "true or false"),
    ('timesync_skew = "1h"\n', "vmbus.ic.timesync_skew", "a number of seconds"),
    ('timesync_skew = true\n', "vmbus.ic.timesync_skew", "boolean"),
    ('timesync_skew = nan\n', "vmbus.ic.timesync_skew", "not within"),
    ('timesync_skew = 4e9\n', "vmbus.ic.timesync_skew", "not within"),
    ('timesync_interval = 0\n', "vmbus.ic.timesync_interval", "not within"),
    ('heartbeat_interval = 7200\n', "vmbus.ic.heartbeat_interval", "not within"),
    ('kvp_external = { Role = 5 }\n', "vmbus.ic.kvp_external.Role", "expected a string"),
    ('kvp_external = { "" = "x" }\n', "vmbus.ic.kvp_external.", "1 to 255"),
    (f'kvp_external = {{ {"k" * 256} = "x" }}\n', f"vmbus.ic.kvp_external.{'k' * 256}",
     "1 to 255"),
    (f'kvp_auto_external = {{ k = "{"v" * 1024}" }}\n', "vmbus.ic.kvp_auto_external.k",
     "at most 1023"),
    ('kvp_external = "Role=web"\n', "vmbus.ic.kvp_external", "a table of strings"),
    ('bogus = 1\n', "vmbus.ic.bogus", "unknown key"),
])
def test_errors_name_their_key(tmp_path: Path, text: str, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load(write(tmp_path, HEAD + text))
    assert exc.value.key == key
    assert str(exc.value).startswith(key + ": ") and words in str(exc.value)
