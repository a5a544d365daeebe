"""`[pci]` config validation: every bad value is refused naming its key path; what is valid
gets the defaults docs/config.md promises. The README's example machine parses."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import ROOT
from vbusfs.config import ConfigError, load, load_default

HEAD = '[machine]\nname = "d"\nstate_dir = "st"\n[pci]\n'


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "m.toml"
    p.write_text(text)
    return p


def dev(type_: str, **keys: object) -> str:
    lines = [f'type = "{type_}"'] + [
        f"{k} = {v!r}".replace("'", '"').replace("True", "true").replace("False", "false")
        for k, v in keys.items()]
    return "[[pci.device]]\n" + "\n".join(lines) + "\n"


@pytest.mark.parametrize(("text", "key", "words"), [
    (dev("virtio-gpu"), "pci.device[0].type", "unknown device type"),
    (dev("virtio-net", image="x.img"), "pci.device[0].image", "takes no image"),
    (dev("virtio-rng", queue_size=64), "pci.device[0].queue_size", "takes no queue_size"),
    (dev("virtio-blk", mac="52:54:00:00:00:01"), "pci.device[0].mac", "takes no mac"),
    (dev("virtio-net", slot=0), "pci.device[0].slot", "host bridge"),
    (dev("virtio-net", slot=32), "pci.device[0].slot", "not a slot"),
    (dev("virtio-net", slot=4) + dev("virtio-rng", slot=4), "pci.device[1].slot",
     "also pci.device[0]"),
    (dev("virtio-net", transport="legacy"), "pci.device[0].transport", "not \"modern\""),
    (dev("virtio-net", mac="52:54:00:00:01"), "pci.device[0].mac", "not a MAC address"),
    (dev("virtio-net", mac="53:54:00:00:00:01"), "pci.device[0].mac", "multicast"),
    (dev("virtio-blk", queue_size=100), "pci.device[0].queue_size", "power of two"),
    (dev("virtio-blk", queue_size=8), "pci.device[0].queue_size", "power of two"),
    (dev("virtio-blk", queue_size=2048), "pci.device[0].queue_size", "16 to 1024"),
    (dev("virtio-blk", num_queues=0), "pci.device[0].num_queues", "between 1 and 64"),
    (dev("virtio-blk", sector_size=768), "pci.device[0].sector_size", "not 512"),
    (dev("virtio-blk", size="1000"), "pci.device[0].size", "multiple of the 512-byte"),
    (dev("virtio-blk", size="big"), "pci.device[0].size", "not a size"),
    (dev("virtio-blk", features=["flush", "trim"]), "pci.device[0].features[1]",
     "unknown feature 'trim'"),
    (dev("virtio-blk", serial="x" * 21), "pci.device[0].serial", "20 printable ASCII"),
    (dev("virtio-blk", serial="caf\u00e9"), "pci.device[0].serial", "20 printable ASCII"),
    (dev("virtio-blk", image="a.img") + dev("virtio-blk", image="a.img"),
     "pci.device[1].image", "also the image of pci.device[0]"),
    (dev("virtio-blk", readonly="yes"), "pci.device[0].readonly", "true or false"),
    (dev("virtio-blk", colour=1), "pci.device[0].colour", "unknown key"),
    (dev("virtio-net") * 30, "pci.device[29].slot", "no free slot"),
])
def test_errors_name_their_key(tmp_path: Path, text: str, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load(write(tmp_path, HEAD + text))
    assert exc.value.key == key
    assert str(exc.value).startswith(key + ": ") and words in str(exc.value)


def test_an_image_is_one_disk_across_buses(tmp_path: Path) -> None:
    """The image lock would refuse the second open at start; the config says which two keys
    meant the same file before anything is mounted."""
    text = ('[machine]\nname = "d"\nstate_dir = "st"\n'
            '[xen]\n[[xen.vbd]]\nvdev = "xvda"\nimage = "shared.img"\n'
            '[pci]\n' + dev("virtio-blk", image="shared.img"))
    with pytest.raises(ConfigError) as exc:
        load(write(tmp_path, text))
    assert exc.value.key == "pci.device[0].image"
    assert "also the image of xen.vbd[0]" in str(exc.value)


def test_defaults_and_slot_assignment(tmp_path: Path) -> None:
    """docs/config.md: slots from 3 when absent, skipping taken ones; disks vda, vdb in slot
    order; images vdX.img in state_dir; queue 256; one queue; all features but multi-queue;
    modern transport; MACs 52:54:00:xx:xx:xx."""
    cfg = load(write(tmp_path, HEAD + dev("virtio-blk", slot=4) + dev("virtio-net")
                     + dev("virtio-blk") + dev("virtio-rng", transport="transitional")))
    assert cfg.pci is not None
    got = [(d.type, d.slot, d.transitional) for d in cfg.pci.devices]
    assert got == [("virtio-net", 3, False), ("virtio-blk", 4, False),
                   ("virtio-blk", 5, False), ("virtio-rng", 6, True)]
    net, vda, vdb, _ = cfg.pci.devices
    assert vda.image == tmp_path / "st/vda.img" and vdb.image == tmp_path / "st/vdb.img"
    assert vda.queue_size == 256 and vda.num_queues == 1 and vda.size == 1 << 30
    assert vda.features == {"flush", "discard", "write-zeroes", "topology", "indirect",
                            "event-idx"}
    assert len(vda.serial) == 20 and vda.serial != vdb.serial
    assert net.mac[:3] == b"\x52\x54\x00" and len(net.mac) == 6


def test_the_default_machine_has_qemus_pc_layout() -> None:
    cfg = load_default()
    assert cfg.pci is not None
    assert [(d.type, d.slot) for d in cfg.pci.devices] == [
        ("virtio-net", 3), ("virtio-blk", 4), ("virtio-rng", 5), ("virtio-balloon", 6)]


def test_the_readmes_example_config_parses(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## The machine config", 1)[1]
    example = re.search(r"```toml\n(.*?)```", section, re.S)
    assert example is not None
    cfg = load(write(tmp_path, example.group(1)))
    assert cfg.xen is not None and cfg.pci is not None
    (vda,) = cfg.pci.devices
    assert (vda.type, vda.slot, vda.size, vda.queue_size) == ("virtio-blk", 4, 512 << 20, 256)


def test_a_lun_and_a_virtio_disk_cannot_share_an_image(tmp_path: Path) -> None:
    text = ('[machine]\nname = "d"\nstate_dir = "st"\n'
            '[[vmbus.device]]\ntype = "scsi"\n[[vmbus.device.lun]]\nimage = "shared.img"\n'
            '[pci]\n' + dev("virtio-blk", image="shared.img"))
    with pytest.raises(ConfigError) as exc:
        load(write(tmp_path, text))
    assert exc.value.key == "pci.device[0].image"
    assert "also the image of vmbus.device[0].lun[0]" in str(exc.value)
