"""Hot-plug through xenstore (in process): a disk added after start is found through the
xenbus watch and connected; a detached disk goes Closing → Closed on both ends, vanishes
from /dev and sysfs, and leaves no grant or mapping behind."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import trio

from backends.xen.blkback import Blkback
from tests.xen_rig import xen_machine
from vbusfs.protocols.xen.xenbus import State, parse_vdev


async def test_attach_then_detach(tmp_path: Path) -> None:
    async with xen_machine(tmp_path, size="2M") as rig:
        xm = rig.xm
        spec = dataclasses.replace(xm.specs[0], vdev=parse_vdev("xvdc"),
                                   image=tmp_path / "state/xvdc.img", size=1 << 20)
        back = Blkback(xm.store, xm.grants, xm.evtchn, rig.memory, spec, xm.domid)
        async with trio.open_nursery() as n:
            xm.toolstack.add_vbd(spec)
            await n.start(back.run)
            with trio.fail_after(5):
                while "xvdc" not in rig.tree.resolve("dev").children:
                    await trio.sleep(0.01)
            disk = rig.tree.resolve("dev/xvdc").disk
            await disk.write(0, b"hot" * 100)
            assert await disk.read(0, 6) == b"hothot"
            assert back.state() == State.CONNECTED
            mapped_before = xm.grants.mapped
            states: list[str] = []
            fe_path, be_path = xm.toolstack.paths(spec)
            for path in (fe_path, be_path):
                xm.store.watch(f"{path}/state", "t", lambda p, t: states.append(
                    p.split("/")[3] + ":" + (xm.store.read(p) if xm.store.exists(p) else "-")))
            closed = await xm.toolstack.remove_vbd(spec)
            assert closed                                   # the frontend reached Closed
            with trio.fail_after(5):
                while "vbd-51744" in xm.xenbus.devices:
                    await trio.sleep(0.01)
            assert "xvdc" not in rig.tree.resolve("dev").children
            assert "vbd-51744" not in rig.tree.resolve("sys/devices").children
            assert "xvdc" not in rig.tree.resolve("sys/block").children
            assert back.ring is None and back.port == 0
            # domain 1 is the frontend, domain 0 the backend: both went Closing then Closed
            assert states.index("1:5") < states.index("1:6")
            assert states.index("0:5") < states.index("0:6")
            assert xm.grants.mapped < mapped_before
            n.cancel_scope.cancel()
        # the first disk is untouched and still works
        await rig.disk.write(0, b"still")
        assert await rig.disk.read(0, 5) == b"still"
    assert (rig.grants.granted, rig.grants.mapped) == (0, 0)


async def test_close_with_io_in_flight_completes_it(tmp_path: Path) -> None:
    async with xen_machine(tmp_path, size="8M") as rig:
        disk, front = rig.disk, rig.front
        results: list[object] = []

        async def write(i: int) -> None:
            try:
                results.append(await disk.write(i * 65536, bytes([i]) * 65536))
            except OSError as e:
                results.append(e)

        async with trio.open_nursery() as n:
            for i in range(100):
                n.start_soon(write, i)
            with trio.fail_after(2):            # let some reach the ring
                while len(rig.engine.busy) < 8:
                    await trio.sleep(0)
            in_flight = len(rig.engine.busy) + len(rig.engine.ready)
            with trio.fail_after(4):            # well inside the 5 s drain deadline
                await front.close()
        assert in_flight > 0
        errors = [r for r in results if isinstance(r, OSError)]
        # what was queued before close completed; only writes that had not reached the
        # engine yet may see the disk gone (ENXIO)
        assert all(e.errno == 6 for e in errors)            # ENXIO
        assert results.count(65536) >= in_flight
        assert rig.dev.state == State.CLOSED
    assert (rig.grants.granted, rig.grants.mapped) == (0, 0)
