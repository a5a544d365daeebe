"""virtio and PCI layouts and constants against Debian's linux-libc-dev headers, compiled here
(``linux/virtio_ring.h``, ``virtio_blk.h``, ``virtio_pci.h``, ``virtio_config.h``,
``virtio_ids.h``, ``pci_regs.h``): the C program prints sizeof/offsetof and the macros, and
vbusfs's wire definitions must agree. The legacy ring sizes of reference/protocols.md §2.1
are checked too."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from vbusfs.protocols import pci
from vbusfs.protocols.virtio import blk, ids, ring
from vbusfs.protocols.virtio import pci as vp

C_PROGRAM = r"""
#include <stdio.h>
#include <stddef.h>
#include <linux/virtio_ring.h>
#include <linux/virtio_blk.h>
#include <linux/virtio_pci.h>
#include <linux/virtio_config.h>
#include <linux/virtio_ids.h>
#include <linux/pci_regs.h>
#define P(name, value) printf("%s %lu\n", name, (unsigned long)(value))
#define O(s, f) P(#s "." #f, offsetof(struct s, f))
int main(void) {
    P("vring_desc", sizeof(struct vring_desc));
    O(vring_desc, addr); O(vring_desc, len); O(vring_desc, flags); O(vring_desc, next);
    O(vring_avail, idx); O(vring_avail, ring);
    P("vring_used_elem", sizeof(struct vring_used_elem));
    O(vring_used, idx); O(vring_used, ring);
    P("VRING_DESC_F_NEXT", VRING_DESC_F_NEXT); P("VRING_DESC_F_WRITE", VRING_DESC_F_WRITE);
    P("VRING_DESC_F_INDIRECT", VRING_DESC_F_INDIRECT);
    P("VRING_USED_F_NO_NOTIFY", VRING_USED_F_NO_NOTIFY);
    P("VRING_AVAIL_F_NO_INTERRUPT", VRING_AVAIL_F_NO_INTERRUPT);
    P("VIRTIO_RING_F_INDIRECT_DESC", VIRTIO_RING_F_INDIRECT_DESC);
    P("VIRTIO_RING_F_EVENT_IDX", VIRTIO_RING_F_EVENT_IDX);
    for (unsigned q = 8; q <= 1024; q *= 2) {
        char name[32];
        snprintf(name, sizeof name, "vring_size%u", q);
        P(name, vring_size(q, 4096));
    }
    P("virtio_blk_outhdr", sizeof(struct virtio_blk_outhdr));
    O(virtio_blk_outhdr, type); O(virtio_blk_outhdr, ioprio); O(virtio_blk_outhdr, sector);
    O(virtio_blk_config, capacity); O(virtio_blk_config, size_max); O(virtio_blk_config, seg_max);
    O(virtio_blk_config, geometry); O(virtio_blk_config, blk_size);
    O(virtio_blk_config, physical_block_exp); O(virtio_blk_config, alignment_offset);
    O(virtio_blk_config, min_io_size); O(virtio_blk_config, opt_io_size);
    O(virtio_blk_config, wce); O(virtio_blk_config, num_queues);
    O(virtio_blk_config, max_discard_sectors); O(virtio_blk_config, max_discard_seg);
    O(virtio_blk_config, discard_sector_alignment);
    O(virtio_blk_config, max_write_zeroes_sectors); O(virtio_blk_config, max_write_zeroes_seg);
    O(virtio_blk_config, write_zeroes_may_unmap);
    O(virtio_blk_config, max_secure_erase_sectors);
    P("virtio_blk_discard_write_zeroes", sizeof(struct virtio_blk_discard_write_zeroes));
    O(virtio_blk_discard_write_zeroes, num_sectors); O(virtio_blk_discard_write_zeroes, flags);
    P("VIRTIO_BLK_T_IN", VIRTIO_BLK_T_IN); P("VIRTIO_BLK_T_OUT", VIRTIO_BLK_T_OUT);
    P("VIRTIO_BLK_T_FLUSH", VIRTIO_BLK_T_FLUSH); P("VIRTIO_BLK_T_GET_ID", VIRTIO_BLK_T_GET_ID);
    P("VIRTIO_BLK_T_DISCARD", VIRTIO_BLK_T_DISCARD);
    P("VIRTIO_BLK_T_WRITE_ZEROES", VIRTIO_BLK_T_WRITE_ZEROES);
    P("VIRTIO_BLK_S_OK", VIRTIO_BLK_S_OK); P("VIRTIO_BLK_S_IOERR", VIRTIO_BLK_S_IOERR);
    P("VIRTIO_BLK_S_UNSUPP", VIRTIO_BLK_S_UNSUPP); P("VIRTIO_BLK_ID_BYTES", VIRTIO_BLK_ID_BYTES);
    P("VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP", VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    P("VIRTIO_BLK_F_SIZE_MAX", VIRTIO_BLK_F_SIZE_MAX);
    P("VIRTIO_BLK_F_SEG_MAX", VIRTIO_BLK_F_SEG_MAX);
    P("VIRTIO_BLK_F_GEOMETRY", VIRTIO_BLK_F_GEOMETRY); P("VIRTIO_BLK_F_RO", VIRTIO_BLK_F_RO);
    P("VIRTIO_BLK_F_BLK_SIZE", VIRTIO_BLK_F_BLK_SIZE); P("VIRTIO_BLK_F_FLUSH", VIRTIO_BLK_F_FLUSH);
    P("VIRTIO_BLK_F_TOPOLOGY", VIRTIO_BLK_F_TOPOLOGY);
    P("VIRTIO_BLK_F_CONFIG_WCE", VIRTIO_BLK_F_CONFIG_WCE); P("VIRTIO_BLK_F_MQ", VIRTIO_BLK_F_MQ);
    P("VIRTIO_BLK_F_DISCARD", VIRTIO_BLK_F_DISCARD);
    P("VIRTIO_BLK_F_WRITE_ZEROES", VIRTIO_BLK_F_WRITE_ZEROES);
    P("VIRTIO_PCI_HOST_FEATURES", VIRTIO_PCI_HOST_FEATURES);
    P("VIRTIO_PCI_GUEST_FEATURES", VIRTIO_PCI_GUEST_FEATURES);
    P("VIRTIO_PCI_QUEUE_PFN", VIRTIO_PCI_QUEUE_PFN);
    P("VIRTIO_PCI_QUEUE_NUM", VIRTIO_PCI_QUEUE_NUM);
    P("VIRTIO_PCI_QUEUE_SEL", VIRTIO_PCI_QUEUE_SEL);
    P("VIRTIO_PCI_QUEUE_NOTIFY", VIRTIO_PCI_QUEUE_NOTIFY);
    P("VIRTIO_PCI_STATUS", VIRTIO_PCI_STATUS); P("VIRTIO_PCI_ISR", VIRTIO_PCI_ISR);
    P("VIRTIO_MSI_CONFIG_VECTOR", VIRTIO_MSI_CONFIG_VECTOR);
    P("VIRTIO_MSI_QUEUE_VECTOR", VIRTIO_MSI_QUEUE_VECTOR);
    P("VIRTIO_PCI_CONFIG_OFF0", VIRTIO_PCI_CONFIG_OFF(0));
    P("VIRTIO_PCI_CONFIG_OFF1", VIRTIO_PCI_CONFIG_OFF(1));
    P("VIRTIO_PCI_QUEUE_ADDR_SHIFT", VIRTIO_PCI_QUEUE_ADDR_SHIFT);
    P("VIRTIO_MSI_NO_VECTOR", VIRTIO_MSI_NO_VECTOR);
    P("VIRTIO_PCI_ISR_CONFIG", VIRTIO_PCI_ISR_CONFIG);
    P("VIRTIO_PCI_CAP_COMMON_CFG", VIRTIO_PCI_CAP_COMMON_CFG);
    P("VIRTIO_PCI_CAP_NOTIFY_CFG", VIRTIO_PCI_CAP_NOTIFY_CFG);
    P("VIRTIO_PCI_CAP_ISR_CFG", VIRTIO_PCI_CAP_ISR_CFG);
    P("VIRTIO_PCI_CAP_DEVICE_CFG", VIRTIO_PCI_CAP_DEVICE_CFG);
    P("VIRTIO_PCI_CAP_PCI_CFG", VIRTIO_PCI_CAP_PCI_CFG);
    P("virtio_pci_cap", sizeof(struct virtio_pci_cap));
    O(virtio_pci_cap, cfg_type); O(virtio_pci_cap, bar); O(virtio_pci_cap, offset);
    O(virtio_pci_cap, length);
    P("virtio_pci_notify_cap", sizeof(struct virtio_pci_notify_cap));
    O(virtio_pci_notify_cap, notify_off_multiplier);
    P("virtio_pci_cfg_cap", sizeof(struct virtio_pci_cfg_cap));
    O(virtio_pci_cfg_cap, pci_cfg_data);
    O(virtio_pci_common_cfg, device_feature_select); O(virtio_pci_common_cfg, device_feature);
    O(virtio_pci_common_cfg, guest_feature_select); O(virtio_pci_common_cfg, guest_feature);
    O(virtio_pci_common_cfg, msix_config); O(virtio_pci_common_cfg, num_queues);
    O(virtio_pci_common_cfg, device_status); O(virtio_pci_common_cfg, config_generation);
    O(virtio_pci_common_cfg, queue_select); O(virtio_pci_common_cfg, queue_size);
    O(virtio_pci_common_cfg, queue_msix_vector); O(virtio_pci_common_cfg, queue_enable);
    O(virtio_pci_common_cfg, queue_notify_off); O(virtio_pci_common_cfg, queue_desc_lo);
    O(virtio_pci_common_cfg, queue_desc_hi); O(virtio_pci_common_cfg, queue_avail_lo);
    O(virtio_pci_common_cfg, queue_avail_hi); O(virtio_pci_common_cfg, queue_used_lo);
    O(virtio_pci_common_cfg, queue_used_hi);
    P("virtio_pci_common_cfg", sizeof(struct virtio_pci_common_cfg));
    P("VIRTIO_CONFIG_S_ACKNOWLEDGE", VIRTIO_CONFIG_S_ACKNOWLEDGE);
    P("VIRTIO_CONFIG_S_DRIVER", VIRTIO_CONFIG_S_DRIVER);
    P("VIRTIO_CONFIG_S_DRIVER_OK", VIRTIO_CONFIG_S_DRIVER_OK);
    P("VIRTIO_CONFIG_S_FEATURES_OK", VIRTIO_CONFIG_S_FEATURES_OK);
    P("VIRTIO_CONFIG_S_NEEDS_RESET", VIRTIO_CONFIG_S_NEEDS_RESET);
    P("VIRTIO_CONFIG_S_FAILED", VIRTIO_CONFIG_S_FAILED);
    P("VIRTIO_F_NOTIFY_ON_EMPTY", VIRTIO_F_NOTIFY_ON_EMPTY);
    P("VIRTIO_F_ANY_LAYOUT", VIRTIO_F_ANY_LAYOUT);
    P("VIRTIO_F_VERSION_1", VIRTIO_F_VERSION_1);
    P("VIRTIO_F_ACCESS_PLATFORM", VIRTIO_F_ACCESS_PLATFORM);
    P("VIRTIO_ID_NET", VIRTIO_ID_NET); P("VIRTIO_ID_BLOCK", VIRTIO_ID_BLOCK);
    P("VIRTIO_ID_CONSOLE", VIRTIO_ID_CONSOLE); P("VIRTIO_ID_RNG", VIRTIO_ID_RNG);
    P("VIRTIO_ID_BALLOON", VIRTIO_ID_BALLOON);
    P("PCI_VENDOR_ID", PCI_VENDOR_ID); P("PCI_DEVICE_ID", PCI_DEVICE_ID);
    P("PCI_COMMAND", PCI_COMMAND); P("PCI_STATUS", PCI_STATUS);
    P("PCI_REVISION_ID", PCI_REVISION_ID); P("PCI_CLASS_PROG", PCI_CLASS_PROG);
    P("PCI_CLASS_DEVICE", PCI_CLASS_DEVICE); P("PCI_HEADER_TYPE", PCI_HEADER_TYPE);
    P("PCI_BASE_ADDRESS_0", PCI_BASE_ADDRESS_0);
    P("PCI_SUBSYSTEM_VENDOR_ID", PCI_SUBSYSTEM_VENDOR_ID); P("PCI_SUBSYSTEM_ID", PCI_SUBSYSTEM_ID);
    P("PCI_CAPABILITY_LIST", PCI_CAPABILITY_LIST); P("PCI_INTERRUPT_PIN", PCI_INTERRUPT_PIN);
    P("PCI_COMMAND_IO", PCI_COMMAND_IO); P("PCI_COMMAND_MEMORY", PCI_COMMAND_MEMORY);
    P("PCI_COMMAND_MASTER", PCI_COMMAND_MASTER);
    P("PCI_COMMAND_INTX_DISABLE", PCI_COMMAND_INTX_DISABLE);
    P("PCI_STATUS_CAP_LIST", PCI_STATUS_CAP_LIST);
    P("PCI_BASE_ADDRESS_SPACE_IO", PCI_BASE_ADDRESS_SPACE_IO);
    P("PCI_BASE_ADDRESS_MEM_TYPE_64", PCI_BASE_ADDRESS_MEM_TYPE_64);
    P("PCI_BASE_ADDRESS_MEM_PREFETCH", PCI_BASE_ADDRESS_MEM_PREFETCH);
    P("PCI_CAP_ID_VNDR", PCI_CAP_ID_VNDR); P("PCI_CAP_ID_MSIX", PCI_CAP_ID_MSIX);
    P("PCI_MSIX_FLAGS", PCI_MSIX_FLAGS); P("PCI_MSIX_FLAGS_ENABLE", PCI_MSIX_FLAGS_ENABLE);
    P("PCI_MSIX_FLAGS_MASKALL", PCI_MSIX_FLAGS_MASKALL);
    P("PCI_MSIX_FLAGS_QSIZE", PCI_MSIX_FLAGS_QSIZE); P("PCI_MSIX_TABLE", PCI_MSIX_TABLE);
    P("PCI_MSIX_PBA", PCI_MSIX_PBA); P("PCI_MSIX_ENTRY_SIZE", PCI_MSIX_ENTRY_SIZE);
    P("PCI_MSIX_ENTRY_CTRL_MASKBIT", PCI_MSIX_ENTRY_CTRL_MASKBIT);
    P("PCI_CFG_SPACE_SIZE", PCI_CFG_SPACE_SIZE);
    P("PCI_CFG_SPACE_EXP_SIZE", PCI_CFG_SPACE_EXP_SIZE);
    return 0;
}
"""


@pytest.fixture(scope="module")
def c(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed; run .ci/setup")
    if not Path("/usr/include/linux/virtio_pci.h").exists():
        pytest.skip("linux-libc-dev headers are not installed; run .ci/setup")
    d = tmp_path_factory.mktemp("c")
    (d / "p.c").write_text(C_PROGRAM)
    subprocess.run(["gcc", "-o", str(d / "p"), str(d / "p.c")], check=True)
    out = subprocess.run([str(d / "p")], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


def test_split_ring_layout(c: dict[str, int]) -> None:
    assert ring.DESC.size == c["vring_desc"] == 16
    assert [c["vring_desc.addr"], c["vring_desc.len"], c["vring_desc.flags"],
            c["vring_desc.next"]] == [0, 8, 12, 14]            # "<QIHH"
    assert ring.USED_ELEM.size == c["vring_used_elem"]
    assert (c["vring_avail.idx"], c["vring_avail.ring"]) == (2, 4)
    assert (c["vring_used.idx"], c["vring_used.ring"]) == (2, 4)
    assert ring.DESC_F_NEXT == c["VRING_DESC_F_NEXT"]
    assert ring.DESC_F_WRITE == c["VRING_DESC_F_WRITE"]
    assert ring.DESC_F_INDIRECT == c["VRING_DESC_F_INDIRECT"]
    assert ring.USED_F_NO_NOTIFY == c["VRING_USED_F_NO_NOTIFY"]
    assert ring.AVAIL_F_NO_INTERRUPT == c["VRING_AVAIL_F_NO_INTERRUPT"]
    assert ids.F_INDIRECT_DESC == c["VIRTIO_RING_F_INDIRECT_DESC"]
    assert ids.F_EVENT_IDX == c["VIRTIO_RING_F_EVENT_IDX"]
    q = 8
    while q <= 1024:
        assert ring.legacy_layout(q)[2] == c[f"vring_size{q}"]
        q *= 2
    # reference/protocols.md §2.1's table
    assert ring.legacy_layout(256) == (4096, 8192, 10246)
    assert ring.legacy_layout(1024) == (16384, 20480, 28678)
    assert ring.used_event_offset(256) == 4612 - 4096
    assert ring.avail_event_offset(256) == 10244 - 8192


def test_need_event_wraps() -> None:
    # vring_need_event((u16)(new - event - 1) < (u16)(new - old)), worked by hand
    assert ring.need_event(5, 6, 5)                 # crossed exactly
    assert not ring.need_event(10, 6, 5)            # not yet
    assert ring.need_event(0xFFFF, 1, 0xFFFE)       # across the wrap
    assert not ring.need_event(3, 3, 3)             # nothing new


def test_virtio_blk_layout(c: dict[str, int]) -> None:
    assert blk.OUTHDR.size == c["virtio_blk_outhdr"]
    assert (c["virtio_blk_outhdr.ioprio"], c["virtio_blk_outhdr.sector"]) == (4, 8)
    offsets = [c[f"virtio_blk_config.{f}"] for f in (
        "capacity", "size_max", "seg_max", "geometry", "blk_size", "physical_block_exp",
        "alignment_offset", "min_io_size", "opt_io_size", "wce", "num_queues",
        "max_discard_sectors", "max_discard_seg", "discard_sector_alignment",
        "max_write_zeroes_sectors", "max_write_zeroes_seg", "write_zeroes_may_unmap")]
    assert offsets == [0, 8, 12, 16, 20, 24, 25, 26, 28, 32, 34, 36, 40, 44, 48, 52, 56]
    # our struct: the prefix through write_zeroes_may_unmap and its padding
    assert blk.CONFIG_SIZE == c["virtio_blk_config.max_secure_erase_sectors"] == 60
    packed = blk.CONFIG.pack(*range(1, 20))
    assert int.from_bytes(packed[34:36], "little") == 13          # num_queues is field 13
    assert packed[56] == 19                                         # write_zeroes_may_unmap
    assert blk.DISCARD_SEG.size == c["virtio_blk_discard_write_zeroes"]
    assert (c["virtio_blk_discard_write_zeroes.num_sectors"],
            c["virtio_blk_discard_write_zeroes.flags"]) == (8, 12)
    for name in ("T_IN", "T_OUT", "T_FLUSH", "T_GET_ID", "T_DISCARD", "T_WRITE_ZEROES",
                 "S_OK", "S_IOERR", "S_UNSUPP", "ID_BYTES", "WRITE_ZEROES_FLAG_UNMAP",
                 "F_SIZE_MAX", "F_SEG_MAX", "F_GEOMETRY", "F_RO", "F_BLK_SIZE", "F_FLUSH",
                 "F_TOPOLOGY", "F_CONFIG_WCE", "F_MQ", "F_DISCARD", "F_WRITE_ZEROES"):
        assert getattr(blk, name) == c[f"VIRTIO_BLK_{name}"], name


def test_virtio_pci_layout(c: dict[str, int]) -> None:
    for ours, theirs in ((vp.HOST_FEATURES, "HOST_FEATURES"), (vp.GUEST_FEATURES,
                         "GUEST_FEATURES"), (vp.QUEUE_PFN, "QUEUE_PFN"),
                         (vp.QUEUE_NUM, "QUEUE_NUM"), (vp.QUEUE_SEL, "QUEUE_SEL"),
                         (vp.QUEUE_NOTIFY, "QUEUE_NOTIFY"), (vp.STATUS, "STATUS"),
                         (vp.ISR, "ISR"), (vp.QUEUE_ADDR_SHIFT, "QUEUE_ADDR_SHIFT"),
                         (vp.ISR_CONFIG, "ISR_CONFIG"), (vp.CAP_COMMON_CFG, "CAP_COMMON_CFG"),
                         (vp.CAP_NOTIFY_CFG, "CAP_NOTIFY_CFG"), (vp.CAP_ISR_CFG, "CAP_ISR_CFG"),
                         (vp.CAP_DEVICE_CFG, "CAP_DEVICE_CFG"), (vp.CAP_PCI_CFG, "CAP_PCI_CFG")):
        assert ours == c[f"VIRTIO_PCI_{theirs}"], theirs
    assert vp.MSI_CONFIG_VECTOR == c["VIRTIO_MSI_CONFIG_VECTOR"]
    assert vp.MSI_QUEUE_VECTOR == c["VIRTIO_MSI_QUEUE_VECTOR"]
    assert vp.MSI_NO_VECTOR == c["VIRTIO_MSI_NO_VECTOR"]
    assert [vp.legacy_config_offset(False), vp.legacy_config_offset(True)] == \
        [c["VIRTIO_PCI_CONFIG_OFF0"], c["VIRTIO_PCI_CONFIG_OFF1"]]
    assert vp.CAP.size == c["virtio_pci_cap"]
    assert [c["virtio_pci_cap.cfg_type"], c["virtio_pci_cap.bar"], c["virtio_pci_cap.offset"],
            c["virtio_pci_cap.length"]] == [3, 4, 8, 12]
    assert vp.NOTIFY_CAP.size == c["virtio_pci_notify_cap"]
    assert c["virtio_pci_notify_cap.notify_off_multiplier"] == 16
    assert vp.PCI_CFG_CAP.size == c["virtio_pci_cfg_cap"]
    assert c["virtio_pci_cfg_cap.pci_cfg_data"] == 16
    fields = {"device_feature_select": vp.C_DFSELECT, "device_feature": vp.C_DF,
              "guest_feature_select": vp.C_GFSELECT, "guest_feature": vp.C_GF,
              "msix_config": vp.C_MSIX, "num_queues": vp.C_NUMQ,
              "device_status": vp.C_STATUS, "config_generation": vp.C_CFGGENERATION,
              "queue_select": vp.C_Q_SELECT, "queue_size": vp.C_Q_SIZE,
              "queue_msix_vector": vp.C_Q_MSIX, "queue_enable": vp.C_Q_ENABLE,
              "queue_notify_off": vp.C_Q_NOFF, "queue_desc_lo": vp.C_Q_DESCLO,
              "queue_desc_hi": vp.C_Q_DESCHI, "queue_avail_lo": vp.C_Q_AVAILLO,
              "queue_avail_hi": vp.C_Q_AVAILHI, "queue_used_lo": vp.C_Q_USEDLO,
              "queue_used_hi": vp.C_Q_USEDHI}
    for name, ours in fields.items():
        assert ours == c[f"virtio_pci_common_cfg.{name}"], name
    assert vp.COMMON_CFG_SIZE == c["virtio_pci_common_cfg"]


def test_virtio_config_and_ids(c: dict[str, int]) -> None:
    s = ids.Status
    assert [s.ACKNOWLEDGE, s.DRIVER, s.DRIVER_OK, s.FEATURES_OK, s.DEVICE_NEEDS_RESET,
            s.FAILED] == [c[f"VIRTIO_CONFIG_S_{n}"] for n in (
                "ACKNOWLEDGE", "DRIVER", "DRIVER_OK", "FEATURES_OK", "NEEDS_RESET", "FAILED")]
    assert ids.F_NOTIFY_ON_EMPTY == c["VIRTIO_F_NOTIFY_ON_EMPTY"]
    assert ids.F_ANY_LAYOUT == c["VIRTIO_F_ANY_LAYOUT"]
    assert ids.F_VERSION_1 == c["VIRTIO_F_VERSION_1"]
    assert ids.F_ACCESS_PLATFORM == c["VIRTIO_F_ACCESS_PLATFORM"]
    for t in ids.DeviceId:
        assert t == c[f"VIRTIO_ID_{t.name}"]
    # reference/sysfs.md §3.3: QEMU's PCI ids and classes
    table = {t.name: (t.transitional_pci_id, t.modern_pci_id, t.class_code) for t in ids.TYPES}
    assert table == {"virtio-net": (0x1000, 0x1041, 0x020000),
                     "virtio-blk": (0x1001, 0x1042, 0x010000),
                     "virtio-console": (0x1003, 0x1043, 0x078000),
                     "virtio-rng": (0x1005, 0x1044, 0xFF0000),
                     "virtio-balloon": (0x1002, 0x1045, 0xFF0000)}


def test_pci_registers(c: dict[str, int]) -> None:
    for ours, theirs in ((pci.VENDOR_ID, "VENDOR_ID"), (pci.DEVICE_ID, "DEVICE_ID"),
                         (pci.COMMAND, "COMMAND"), (pci.STATUS, "STATUS"),
                         (pci.REVISION_ID, "REVISION_ID"), (pci.CLASS_PROG, "CLASS_PROG"),
                         (pci.CLASS_DEVICE, "CLASS_DEVICE"), (pci.HEADER_TYPE, "HEADER_TYPE"),
                         (pci.BASE_ADDRESS_0, "BASE_ADDRESS_0"),
                         (pci.SUBSYSTEM_VENDOR_ID, "SUBSYSTEM_VENDOR_ID"),
                         (pci.SUBSYSTEM_ID, "SUBSYSTEM_ID"),
                         (pci.CAPABILITY_LIST, "CAPABILITY_LIST"),
                         (pci.INTERRUPT_PIN, "INTERRUPT_PIN"), (pci.COMMAND_IO, "COMMAND_IO"),
                         (pci.COMMAND_MEMORY, "COMMAND_MEMORY"),
                         (pci.COMMAND_MASTER, "COMMAND_MASTER"),
                         (pci.COMMAND_INTX_DISABLE, "COMMAND_INTX_DISABLE"),
                         (pci.STATUS_CAP_LIST, "STATUS_CAP_LIST"),
                         (pci.BAR_SPACE_IO, "BASE_ADDRESS_SPACE_IO"),
                         (pci.BAR_MEM_TYPE_64, "BASE_ADDRESS_MEM_TYPE_64"),
                         (pci.BAR_MEM_PREFETCH, "BASE_ADDRESS_MEM_PREFETCH"),
                         (pci.CAP_ID_VNDR, "CAP_ID_VNDR"), (pci.CAP_ID_MSIX, "CAP_ID_MSIX"),
                         (pci.MSIX_FLAGS, "MSIX_FLAGS"),
                         (pci.MSIX_FLAGS_ENABLE, "MSIX_FLAGS_ENABLE"),
                         (pci.MSIX_FLAGS_MASKALL, "MSIX_FLAGS_MASKALL"),
                         (pci.MSIX_FLAGS_QSIZE, "MSIX_FLAGS_QSIZE"),
                         (pci.MSIX_TABLE, "MSIX_TABLE"), (pci.MSIX_PBA, "MSIX_PBA"),
                         (pci.MSIX_ENTRY_SIZE, "MSIX_ENTRY_SIZE"),
                         (pci.MSIX_ENTRY_VECTOR_CTRL_MASKBIT, "MSIX_ENTRY_CTRL_MASKBIT"),
                         (pci.CFG_SPACE_SIZE, "CFG_SPACE_SIZE"),
                         (pci.CFG_SPACE_EXP_SIZE, "CFG_SPACE_EXP_SIZE")):
        assert ours == c[f"PCI_{theirs}"], theirs


def test_sysfs_formats() -> None:
    # reference/sysfs.md §3.2 and the real guest's capture
    assert pci.bdf_name(0, 0, 4, 0) == "0000:00:04.0"
    assert pci.modalias(0x1AF4, 0x1042, 0x1AF4, 0x1042, 0x018000) == \
        "pci:v00001AF4d00001042sv00001AF4sd00001042bc01sc80i00"
    assert pci.modalias(0x8086, 0x0D57, 0, 0, 0x060000) == \
        "pci:v00008086d00000D57sv00000000sd00000000bc06sc00i00"
    assert ids.virtio_modalias(2, 0x1AF4) == "virtio:d00000002v00001AF4"
    # a 64-bit non-prefetchable memory BAR reads 0x140204 in the capture
    assert pci.resource_flags(0x4, io=False) == 0x140204
    assert pci.resource_flags(0x1, io=True) == 0x40101           # reference's I/O example
    assert pci.resource_flags(0xC, io=False) == 0x14220C         # 64-bit prefetchable
    assert pci.resource_flags(0x0, io=False) == 0x40200          # 32-bit memory
