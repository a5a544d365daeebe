"""virtio-blk over PCI in process (no FUSE): both transports, multi-queue, GET_ID, read-only,
write-zeroes, the device-status state machine and feature negotiation, a device that needs
a reset, and unbinding. What every block transport must do is in test_block_contract.py."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import trio

from backends.virtio.transport import COMMON_OFF, MODERN_BAR
from tests.conftest import Logs
from tests.pci_rig import pci_machine
from vbusfs.drivers.virtio.virtqueue import DriverQueue
from vbusfs.protocols.virtio import blk, ids
from vbusfs.protocols.virtio import pci as vp


def _virtio_attr(rig: object, name: str, index: int = 0) -> str:
    dev = next(d for d in rig.pm.virtio.devices.values()            # type: ignore[attr-defined]
               if d.index == index)
    return dev.dir.children[name].render().decode()                  # type: ignore[no-any-return]


@pytest.mark.parametrize(("transport", "legacy"), [("modern", False), ("transitional", False),
                                                    ("transitional", True)])
async def test_data_through_each_transport(tmp_path: Path, transport: str,
                                           legacy: bool) -> None:
    dev = {"type": "virtio-blk", "size": "8M", "transport": transport, "serial": "ABC-123"}
    async with pci_machine(tmp_path, [dev], force_legacy=legacy) as rig:
        vdev = next(iter(rig.pm.virtio.devices.values()))
        assert vdev.transport.modern is not legacy
        assert vdev.device_id == ids.DeviceId.BLOCK and vdev.vendor == 0x1AF4
        # a legacy driver never sees VERSION_1 nor FEATURES_OK (status 0x07, not 0x0f)
        assert _virtio_attr(rig, "status") == ("0x00000007\n" if legacy else "0x0000000f\n")
        features = _virtio_attr(rig, "features")
        assert len(features) == 129 and features[ids.F_VERSION_1] == ("0" if legacy else "1")
        blob = os.urandom(3 << 20)
        assert await rig.disk.write(512, blob) == len(blob)
        await rig.disk.flush()
        assert await rig.disk.read(512, len(blob)) == blob
        assert rig.image.read_bytes()[512:512 + len(blob)] == blob
        assert rig.state.serial == "ABC-123"


async def test_multi_queue_spreads_requests(tmp_path: Path) -> None:
    dev = {"type": "virtio-blk", "size": "8M", "num_queues": 2}
    async with pci_machine(tmp_path, [dev], cpus=2) as rig:
        queues = rig.state.transport.queues
        assert len(queues) == 2
        async with trio.open_nursery() as n:
            for i in range(64):
                n.start_soon(rig.disk.write, i * 4096, os.urandom(4096))
        assert all(q.last_used > 0 for q in queues)                # both carried requests
    async with pci_machine(tmp_path / "one", [dev], cpus=1) as rig:
        assert len(rig.state.transport.queues) == 1               # no more than the CPUs


async def test_read_only_disk(tmp_path: Path) -> None:
    img = tmp_path / "ro.img"
    img.write_bytes(b"r" * (1 << 20))
    dev = {"type": "virtio-blk", "image": str(img), "readonly": True}
    async with pci_machine(tmp_path, [dev]) as rig:
        assert rig.disk.readonly and rig.state.dev.has(blk.F_RO)
        with pytest.raises(OSError) as e:
            await rig.disk.write(0, b"w" * 512)
        assert e.value.errno == errno.EROFS
        with pytest.raises(OSError) as e:                         # forced past the gendisk:
            await rig.engine.write(0, memoryview(b"w" * 512))     # the device says IOERR
        assert e.value.errno == errno.EIO
        assert img.read_bytes() == b"r" * (1 << 20)


async def test_write_zeroes_zeroes_and_keeps_the_allocation(tmp_path: Path) -> None:
    async with pci_machine(tmp_path, [{"type": "virtio-blk", "size": "4M"}]) as rig:
        await rig.disk.write(0, b"\xff" * (1 << 20))
        await rig.disk.flush()
        fn, memory = rig.fn, rig.memory
        # a request of our own on a fresh queue of the device, through the real rings:
        # WRITE_ZEROES, without and with the unmap flag
        state = rig.state
        q: DriverQueue = state.transport.queues[0]
        area = memory.alloc(1)
        view = memory.view(area)
        for k, (flags, at) in enumerate(((0, 8), (blk.WRITE_ZEROES_FLAG_UNMAP, 1024))):
            blk.OUTHDR.pack_into(view, 0, blk.T_WRITE_ZEROES, 0, 0)
            blk.DISCARD_SEG.pack_into(view, 16, at, 8, flags)
            view[40] = 0xEE
            before = q.last_used
            q.add([(area * 4096, 16), (area * 4096 + 16, 16)], [(area * 4096 + 40, 1)],
                  token=900 + k, table_gpa=(area + 0) * 4096 + 2048)
            state.bells[0].handler = None          # take the answer ourselves
            q.kick()
            with trio.fail_after(5):
                while (used := q.get_used()) is None:
                    await trio.sleep(0.001)
            assert used[0] == 900 + k and view[40] == blk.S_OK and q.last_used == before + 1
        data = rig.image.read_bytes()
        assert data[4096:8192] == bytes(4096) and data[:4096] == b"\xff" * 4096
        assert data[1024 * 512:1032 * 512] == bytes(4096)
        memory.free(area, 1)
        assert fn is not None


async def test_feature_negotiation_and_status_machine(tmp_path: Path) -> None:
    async with pci_machine(tmp_path, [{"type": "virtio-blk", "size": "1M"}]) as rig:
        fn = rig.fn
        offered = fn.device_features

        def common(field: int, size: int, value: int | None = None) -> int:
            if value is None:
                return fn.region_read(MODERN_BAR, COMMON_OFF + field, size)
            fn.region_write(MODERN_BAR, COMMON_OFF + field, size, value)
            return 0

        common(vp.C_STATUS, 1, 0)                               # reset
        assert fn.status == 0 and not any(q.enabled for q in fn.queues)
        common(vp.C_STATUS, 1, ids.Status.ACKNOWLEDGE | ids.Status.DRIVER)
        common(vp.C_GFSELECT, 4, 0)
        common(vp.C_GF, 4, 1 << 3)                              # bit 3: never offered
        common(vp.C_STATUS, 1, 0x0B)
        assert not common(vp.C_STATUS, 1) & ids.Status.FEATURES_OK   # refused, driver sees it
        common(vp.C_STATUS, 1, 0)
        common(vp.C_STATUS, 1, 0x03)
        common(vp.C_GFSELECT, 4, 0)
        common(vp.C_GF, 4, offered & 0xFFFFFFFF)                # modern without VERSION_1
        common(vp.C_STATUS, 1, 0x0B)
        assert not common(vp.C_STATUS, 1) & ids.Status.FEATURES_OK
        common(vp.C_GFSELECT, 4, 1)
        common(vp.C_GF, 4, offered >> 32)
        common(vp.C_STATUS, 1, 0x0B)
        assert common(vp.C_STATUS, 1) & ids.Status.FEATURES_OK
        # once FEATURES_OK, the driver's features are fixed
        common(vp.C_GF, 4, 0)
        assert fn.driver_features == offered
        # the config generation moves when the configuration changes
        gen = common(vp.C_CFGGENERATION, 1)
        fn.config_changed()
        assert common(vp.C_CFGGENERATION, 1) == (gen + 1) & 0xFF
        assert common(0x3, 1) == 0                              # not a field: reads 0


async def test_a_broken_queue_needs_a_reset_and_fails_io(tmp_path: Path, logs: Logs) -> None:
    logs.expect(r"device needs reset")
    logs.expect(r"the device needs a reset", 40)
    async with pci_machine(tmp_path, [{"type": "virtio-blk", "size": "1M"}]) as rig:
        q = rig.state.transport.queues[0]
        # the driver side goes wrong: a head outside the queue in the available ring
        import struct
        struct.pack_into("<H", q._avail, 4 + 2 * (q.avail_idx % q.size), 999)
        q.avail_idx = (q.avail_idx + 1) & 0xFFFF
        q.kick()
        assert rig.fn.broken and rig.fn.status & ids.Status.DEVICE_NEEDS_RESET
        assert int(_virtio_attr(rig, "status"), 16) & ids.Status.DEVICE_NEEDS_RESET
        with pytest.raises(OSError) as e:                       # the config interrupt failed
            await rig.disk.read(0, 512)                         # the disk's I/O
        assert e.value.errno == errno.EIO


async def test_unbinding_resets_the_device_and_leaves_acknowledge(tmp_path: Path) -> None:
    async with pci_machine(tmp_path, [{"type": "virtio-blk", "size": "1M"}]) as rig:
        before = rig.memory.free_frames()
        vdev = next(iter(rig.pm.virtio.devices.values()))
        await rig.pm.virtio.drivers.unbind(vdev)                # virtio_blk lets go
        assert rig.fn.status == ids.Status.ACKNOWLEDGE          # reset, then ACKNOWLEDGE
        assert _virtio_attr(rig, "status") == "0x00000001\n"
        assert "driver" not in vdev.dir.children
        pdev = next(d for d in rig.pm.pci.devices.values() if d.driver == "virtio-pci")
        await rig.pm.pci.drivers.unbind(pdev)                   # virtio-pci lets go
        assert rig.fn.status == 0 and not rig.pm.virtio.devices
        assert "vda" not in rig.tree.resolve("dev").children
        assert rig.memory.free_frames() > before                # rings, header area back
        assert not rig.fn.msix.enabled
