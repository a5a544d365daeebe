"""storvsc and the SCSI midlayer against storvsp, in process (tests/storvsc_rig.py): the init
sequence with version fallback, the packets storvsc builds (reference/hv-services.md
§4.2–4.4), the scan and the tree it makes (§4.8–4.9), how completions become errnos (§4.5),
hot add and remove through ENUMERATE_BUS, and a host that answers nonsense. Expected values
are the references', written out."""

from __future__ import annotations

import dataclasses
import errno
import os
import struct
from pathlib import Path

import pytest
import trio

from backends.scsi.disk import ScsiDisk
from backends.vmbus.storvsp import Storvsp
from tests.conftest import Logs
from tests.storvsc_rig import DEVICE_DIR, storvsc_machine
from vbusfs.drivers.scsi.device import RETRY, CmdResult, HostByte, decide
from vbusfs.drivers.scsi.sd import sd_devt, sd_disk_name
from vbusfs.protocols.vmbus.ring import Packet, parse_gpa_direct
from vbusfs.sysfs import Attribute, BinAttribute, Directory, Symlink

SDEV = f"{DEVICE_DIR}/host0/target0:0:0/0:0:0:0"


def spy_packets(monkeypatch: pytest.MonkeyPatch, model: Storvsp) -> list[Packet]:
    seen: list[Packet] = []
    real = model._handle

    def handle(pkt: Packet) -> None:
        seen.append(pkt)
        real(pkt)

    monkeypatch.setattr(model, "_handle", handle)
    return seen


# -- init --------------------------------------------------------------------------------------

async def test_init_falls_back_to_the_newest_version_the_host_has(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tried: list[int] = []
    real = Storvsp._init

    def init(self: Storvsp, pkt: Packet, op: int, size: int) -> None:
        if op == 9:
            tried.append(int.from_bytes(pkt.payload[12:14], "little"))
        real(self, pkt, op, size)

    monkeypatch.setattr(Storvsp, "_init", init)
    async with storvsc_machine(tmp_path, host_versions=(0x0501, 0x0402)) as rig:
        assert tried == [0x0602, 0x0600, 0x0501]       # Linux's list, newest first
        assert rig.ctrl.version == 0x0501 and rig.storvsp.version == 0x0501
        assert rig.read(f"{SDEV}/scsi_level") == "6\n"  # SPC-3 forced on WIN8 for Msft
        assert "sda" in rig.tree.resolve("sys/block").children


async def test_a_host_with_only_pre_win8_versions_is_obsolete(tmp_path: Path,
                                                               logs: Logs) -> None:
    logs.expect(r"probe of hv_storvsc failed: .*storvsc: Obsolete Hyper-V version",
                level=40)
    async with storvsc_machine(tmp_path, host_versions=(0x0402, 0x0200)) as rig:
        dev = next(iter(rig.bus.devices.values()))
        assert dev.driver is None                      # not bound
        assert not rig.scsi.hosts and "sda" not in rig.tree.resolve("dev").children
        assert rig.read(f"{DEVICE_DIR}/state") == "2\n"   # the channel was closed again


async def test_init_packets_as_linux_sends_them(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Packet] = []
    real = Storvsp._handle

    def handle(self: Storvsp, pkt: Packet) -> None:
        seen.append(pkt)
        real(self, pkt)

    monkeypatch.setattr(Storvsp, "_handle", handle)
    async with storvsc_machine(tmp_path):
        init = [p for p in seen if p.trans_id == 2**64 - 3]     # VMBUS_RQST_INIT
        ops = [int.from_bytes(p.payload[:4], "little") for p in init]
        assert ops == [7, 9, 9, 10, 8]        # BEGIN, WIN10 refused, WIN8_1, PROPERTIES, END
        for p in init:
            assert (p.type, p.flags, len(p.payload)) == (6, 1, 64)
            assert int.from_bytes(p.payload[4:8], "little") == 1   # REQUEST_COMPLETION_FLAG


# -- I/O packets ---------------------------------------------------------------------------------

async def test_io_packets_are_gpa_direct_srbs(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    async with storvsc_machine(tmp_path) as rig:
        seen = spy_packets(monkeypatch, rig.storvsp)
        disk = rig.disk()
        await disk.write(8192, os.urandom(8192))
        await disk.read(8192, 8192)
        await disk.flush()
        await disk.discard(0, 4096)
        (w, r, f, u) = seen
        for pkt, kind, n in ((w, 0x2A, 2), (r, 0x28, 2)):
            assert pkt.type == 9 and pkt.flags == 1 and pkt.trans_id >= 1
            # reference §4.4: desc_size = 32 + 8n, offset8 = 4 + n, len8 = 12 + n
            assert 16 + len(pkt.header) == 32 + 8 * n
            assert (16 + len(pkt.header) + len(pkt.payload)) // 8 == 12 + n
            (rng,) = parse_gpa_direct(pkt.header)
            assert (rng.length, rng.offset, len(rng.pfns)) == (8192, 0, n)
            p = pkt.payload
            assert struct.unpack_from("<III", p) == (3, 1, 0)          # EXECUTE_SRB
            srb = p[12:64]
            assert struct.unpack_from("<H", srb)[0] == 0x34
            assert (srb[4], srb[5], srb[6], srb[7], srb[8], srb[9]) == (0, 0, 0, 0, 10, 0x14)
            assert srb[10] == (1 if kind == 0x28 else 0)             # data_in
            assert struct.unpack_from("<I", srb, 12)[0] == 8192
            assert srb[16] == kind and struct.unpack_from(">IxH", srb, 18) == (16, 16)
            assert (srb[38], srb[39]) == (0xFF, 0x20)                 # SP_UNTAGGED, simple
            flags, timeout = struct.unpack_from("<II", srb, 40)
            assert flags == (0x14A if kind == 0x28 else 0x18A) and timeout == 60
        assert f.type == 6 and f.payload[28] == 0x35                  # SYNCHRONIZE CACHE(10)
        assert struct.unpack_from("<I", f.payload, 52)[0] == 0x10A
        assert u.type == 9 and u.payload[28] == 0x42                  # UNMAP, one page
        (rng,) = parse_gpa_direct(u.header)
        assert rng.length == 24 and u.payload[22] == 0                # data out
        assert rig.ctrl.host_busy() == 0


async def test_host_numbers_past_255(tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """vmscsi_request.port_number is a byte (reference §4.2) and Linux stores the host number
    in it: host 300's requests carry 300 & 0xFF, and the disk works."""
    async with storvsc_machine(tmp_path, first_host=300) as rig:
        assert rig.ctrl.host is not None and rig.ctrl.host.host_no == 300
        assert rig.tree.resolve(f"{DEVICE_DIR}/host300/target300:0:0/300:0:0:0/block/sda")
        seen = spy_packets(monkeypatch, rig.storvsp)
        data = os.urandom(4096)
        disk = rig.disk()
        await disk.write(4096, data)
        assert await disk.read(4096, 4096) == data
        assert [pkt.payload[12 + 4] for pkt in seen] == [300 & 0xFF] * 2


# -- the tree ------------------------------------------------------------------------------------

async def test_scan_builds_the_scsi_tree(tmp_path: Path) -> None:
    async with storvsc_machine(tmp_path, [{"lun": 0, "size": "16M"},
                                          {"lun": 1, "size": "8M", "serial": "RES"}]) as rig:
        t = rig.tree
        host = t.resolve(f"{DEVICE_DIR}/host0")
        assert isinstance(host, Directory)
        assert {"uevent", "subsystem", "power", "scsi_host", "target0:0:0"} <= \
            set(host.children)
        assert rig.read(f"{DEVICE_DIR}/host0/uevent") == "DEVTYPE=scsi_host\n"
        cls = f"{DEVICE_DIR}/host0/scsi_host/host0"
        want = {"proc_name": "storvsc_host\n", "cmd_per_lun": "2048\n",
                # (132 KiB - 4 KiB) / 360 = 364 requests per channel, 90 % of them
                "can_queue": "327\n", "sg_tablesize": "65\n", "state": "running\n",
                "unique_id": "0\n", "host_busy": "0\n", "use_blk_mq": "1\n",
                "supported_mode": "Initiator\n", "active_mode": "Initiator\n",
                "eh_deadline": "off\n", "nr_hw_queues": "2\n", "sg_prot_tablesize": "0\n",
                "prot_capabilities": "0\n", "prot_guard_type": "0\n"}
        assert {k: rig.read(f"{cls}/{k}") for k in want} == want
        assert isinstance(t.resolve("sys/class/scsi_host/host0"), Symlink)
        sdev = t.resolve(SDEV)
        assert isinstance(sdev, Directory)
        want = {"vendor": "Msft    \n", "model": "Virtual Disk    \n", "rev": "1.0 \n",
                "type": "0\n", "scsi_level": "6\n", "state": "running\n", "timeout": "180\n",
                "eh_timeout": "10\n", "device_blocked": "0\n", "device_busy": "0\n",
                "queue_depth": "327\n", "queue_type": "simple\n", "iocounterbits": "32\n",
                "modalias": "scsi:t-0x00\n", "dh_state": "detached\n",
                "uevent": "DEVTYPE=scsi_device\nDRIVER=sd\nMODALIAS=scsi:t-0x00\n"}
        assert {k: rig.read(f"{SDEV}/{k}") for k in want} == want
        assert rig.read(f"{SDEV}/wwid").startswith("naa.60022480")
        assert int(rig.read(f"{SDEV}/iorequest_cnt"), 16) > 0
        for name in ("inquiry", "vpd_pg0", "vpd_pg80", "vpd_pg83", "vpd_pgb0", "vpd_pgb1",
                     "vpd_pgb2"):
            node = sdev.children[name]
            assert isinstance(node, BinAttribute) and node.size() == 0
        assert "vpd_pg89" not in sdev.children
        pg80 = sdev.children["vpd_pg80"]
        assert isinstance(pg80, BinAttribute) and pg80.reader is not None
        serial = t.resolve(f"{DEVICE_DIR}/host0/target0:0:0/0:0:0:1/vpd_pg80")
        assert isinstance(serial, BinAttribute) and serial.reader is not None
        assert serial.reader(0, 100) == bytes((0, 0x80, 0, 3)) + b"RES"
        link = sdev.children["driver"]
        assert isinstance(link, Symlink) and link.readlink() == \
            "../../../../../../../../../bus/scsi/drivers/sd"
        assert {"block", "scsi_device", "scsi_disk", "power", "subsystem"} <= \
            set(sdev.children)
        assert sorted(t.resolve("sys/bus/scsi/devices").children) == \
            ["0:0:0:0", "0:0:0:1", "host0", "target0:0:0"]
        blk = t.resolve("sys/block/sda")
        assert isinstance(blk, Symlink)
        dev_link = t.resolve(f"{SDEV}/block/sda/device")
        assert isinstance(dev_link, Symlink) and dev_link.readlink() == "../../../0:0:0:0"
        assert rig.read(f"{SDEV}/block/sda/dev") == "8:0\n"
        assert rig.read(f"{DEVICE_DIR}/host0/target0:0:0/0:0:0:1/block/sdb/dev") == "8:16\n"
        q = f"{SDEV}/block/sda/queue"
        assert [rig.read(f"{q}/{a}") for a in ("max_hw_sectors_kb", "max_segments",
                                               "max_segment_size", "rotational",
                                               "write_cache", "discard_granularity",
                                               "discard_max_hw_bytes")] == \
            ["256\n", "65\n", "4294967295\n", "0\n", "write back\n", "512\n",
             f"{0x7FFFFF * 512}\n"]
        sdk = f"{SDEV}/scsi_disk/0:0:0:0"
        assert [rig.read(f"{sdk}/{a}") for a in ("cache_type", "FUA", "thin_provisioning",
                                                 "provisioning_mode", "max_retries")] == \
            ["write back\n", "1\n", "1\n", "unmap\n", "5\n"]


async def test_writable_attributes_refuse_bad_values(tmp_path: Path) -> None:
    async with storvsc_machine(tmp_path) as rig:
        def write(name: str, text: str) -> int:
            node = rig.tree.resolve(f"{SDEV}/{name}")
            assert isinstance(node, Attribute)
            try:
                node.write(text.encode())
            except OSError as e:
                return e.errno or 0
            return 0

        assert write("queue_depth", "64\n") == 0 and rig.read(f"{SDEV}/queue_depth") == "64\n"
        for bad in ("0", "328", "x", "-1"):
            assert write("queue_depth", bad) == errno.EINVAL
        assert rig.read(f"{SDEV}/queue_depth") == "64\n"
        assert write("timeout", "30") == 0 and rig.read(f"{SDEV}/timeout") == "30\n"
        assert write("timeout", "soon") == errno.EINVAL
        assert rig.read(f"{SDEV}/timeout") == "30\n"
        assert write("state", "running\n") == 0
        assert write("state", "blocked\n") == errno.EINVAL
        assert write("evt_media_change", "2") == errno.EINVAL
        for name in ("type", "vendor", "device_blocked", "scsi_level"):
            node = rig.tree.resolve(f"{SDEV}/{name}")
            assert isinstance(node, Attribute) and not node.writable
        # still usable at depth 64 and a device taken offline fails its I/O
        disk = rig.disk()
        await disk.write(0, b"x" * 4096)
        assert write("state", "offline\n") == 0
        with pytest.raises(OSError) as e:
            await disk.read(0, 4096)
        assert e.value.errno == errno.EIO
        assert write("state", "running\n") == 0
        assert await disk.read(0, 4096) == b"x" * 4096


def test_sd_names_and_numbers() -> None:
    # sd_format_disk_name and sd_major/first_minor (drivers/scsi/sd.c); majors from
    # include/uapi/linux/major.h
    major = {}
    for line in Path("/usr/include/linux/major.h").read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "#define" and parts[1].startswith("SCSI_DISK"):
            major[parts[1]] = int(parts[2])
    assert [sd_disk_name(i) for i in (0, 25, 26, 27, 701, 702)] == \
        ["sda", "sdz", "sdaa", "sdab", "sdzz", "sdaaa"]
    assert sd_devt(0) == (major["SCSI_DISK0_MAJOR"], 0)
    assert sd_devt(15) == (major["SCSI_DISK0_MAJOR"], 240)
    assert sd_devt(16) == (major["SCSI_DISK1_MAJOR"], 0)           # sdq
    assert sd_devt(127) == (major["SCSI_DISK7_MAJOR"], 240)
    assert sd_devt(128) == (major["SCSI_DISK8_MAJOR"], 0)
    assert sd_devt(256) == (major["SCSI_DISK0_MAJOR"], 256)


# -- outcomes --------------------------------------------------------------------------------

def test_outcomes_become_errnos() -> None:
    """scsi_io_completion: ILLEGAL REQUEST with INVALID COMMAND OPERATION CODE or INVALID
    FIELD IN CDB is BLK_STS_TARGET (EREMOTEIO); UNIT ATTENTION and BUSY are retried; other
    failures are EIO."""
    def sense(key: int, asc: int, ascq: int = 0) -> bytes:
        return bytes((0x70, 0, key, 0, 0, 0, 0, 10, 0, 0, 0, 0, asc, ascq, 0, 0, 0, 0))

    ok = HostByte.DID_OK
    assert decide(CmdResult(ok, 0)) == 0
    assert decide(CmdResult(ok, 2, sense(5, 0x20))) == errno.EREMOTEIO
    assert decide(CmdResult(ok, 2, sense(5, 0x24))) == errno.EREMOTEIO
    assert decide(CmdResult(ok, 2, sense(5, 0x21))) == errno.EIO
    assert decide(CmdResult(ok, 2, sense(3, 0))) == errno.EIO
    assert decide(CmdResult(ok, 2, sense(7, 0x27))) == errno.EIO
    assert decide(CmdResult(ok, 2, sense(6, 0x2A, 9))) == RETRY
    assert decide(CmdResult(ok, 0x08)) == RETRY                        # BUSY
    assert decide(CmdResult(ok, 2)) == errno.EIO                       # no sense at all
    assert decide(CmdResult(HostByte.DID_REQUEUE, 0)) == RETRY
    assert decide(CmdResult(HostByte.DID_NO_CONNECT, 0)) == errno.EIO
    assert decide(CmdResult(HostByte.DID_ERROR, 0)) == errno.EIO


async def test_a_failing_image_is_eio_and_readonly_is_erofs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logs: Logs) -> None:
    logs.expect(r"I/O error")
    (tmp_path / "ro.img").write_bytes(b"R" * (1 << 20))
    async with storvsc_machine(tmp_path, [{"lun": 0, "size": "4M"},
                                          {"lun": 1, "image": str(tmp_path / "ro.img"),
                                           "readonly": True}]) as rig:
        img = rig.storvsp.luns[0].image
        assert img is not None

        def fail(*_a: object) -> None:
            raise OSError(errno.EIO, "injected")

        monkeypatch.setattr(img, "pwritev", fail)
        with pytest.raises(OSError) as e:
            await rig.disk(0).write(0, b"w" * 4096)
        assert e.value.errno == errno.EIO
        assert int(rig.read(f"{SDEV}/ioerr_cnt"), 16) == 1
        ro = rig.disk(1)
        assert ro.readonly and rig.read(
            f"{DEVICE_DIR}/host0/target0:0:0/0:0:0:1/block/sdb/ro") == "1\n"
        with pytest.raises(OSError) as e:
            await ro.write(0, b"w" * 512)
        assert e.value.errno == errno.EROFS
        assert await ro.read(0, 4) == b"RRRR"


# -- hot add and remove -----------------------------------------------------------------------

async def test_enumerate_bus_adds_and_removes_disks(tmp_path: Path) -> None:
    async with storvsc_machine(tmp_path) as rig:
        first: ScsiDisk = rig.storvsp.luns[0]
        await rig.storvsp.add_lun(4, dataclasses.replace(first.params, name="hot",
                                                         image=tmp_path / "hot.img"))
        removed = rig.storvsp.luns[4]
        with trio.fail_after(5):
            while "sdb" not in rig.tree.resolve("dev").children:
                await trio.sleep(0.01)
        assert "0:0:0:4" in rig.tree.resolve("sys/bus/scsi/devices").children
        await rig.disk(4).write(0, b"hot" * 100)
        await rig.storvsp.remove_lun(4)
        with trio.fail_after(5):
            while "sdb" in rig.tree.resolve("dev").children or \
                    "0:0:0:4" in rig.tree.resolve("sys/bus/scsi/devices").children:
                await trio.sleep(0.01)
        assert rig.ctrl.rescans >= 2
        assert "sda" in rig.tree.resolve("dev").children          # the other stays
        assert removed.image is None and removed.executor is None   # closed at removal
        await rig.storvsp.add_lun(5, dataclasses.replace(first.params, name="hot2",
                                                         image=tmp_path / "hot2.img"))
        hot = rig.storvsp.luns[5]
        assert hot.image is not None
    # the machine is down: the disk added while it ran is closed too (its image and thread)
    assert hot.image is None and hot.executor is None and first.image is None


async def test_a_removed_disk_gives_its_pages_back(tmp_path: Path) -> None:
    """Delete and rescan, again and again (as `echo 1 > delete` and the host's `scan`): each
    disk's page pool goes back to guest memory when it goes, so nothing runs out."""
    async with storvsc_machine(tmp_path) as rig:
        host = rig.ctrl.host
        assert host is not None

        def taken() -> int:
            return rig.memory.nr_frames - rig.memory.free_frames() - len(rig.ctrl._bounce)

        before = taken()
        for _ in range(3):
            await rig.disk().write(0, b"x" * 4096)
            await host.remove_device(host.devices[(0, 0, 0)])
            assert (0, 0, 0) not in host.devices and taken() < before
            await host.scan()
            assert taken() == before
        assert await rig.disk().read(0, 4096) == b"x" * 4096


# -- a host that answers nonsense -----------------------------------------------------------------

async def test_nonsense_completions_are_dropped_or_fail_the_command(
        tmp_path: Path, logs: Logs, monkeypatch: pytest.MonkeyPatch) -> None:
    logs.expect(r"Incorrect transaction ID")
    logs.expect(r"Invalid packet with ID of 0")
    logs.expect(r"invalid completion for tag \d+ .* the command fails")
    async with storvsc_machine(tmp_path) as rig:
        ep = rig.storvsp._ep
        assert ep is not None
        ep.try_write(0x0B, 0, 0x7777, bytes(64))                  # no such tag
        ep.try_write(0x0B, 0, 0, struct.pack("<III", 1, 0, 0) + bytes(52))   # id 0
        ep.flush_signal()
        await trio.sleep(0.01)
        assert rig.ctrl.bogus == 2

        def short(self: Storvsp, trans_id: int, size: int, r: object) -> None:
            self._write(0x0B, trans_id, bytes(20))                # too short to decode

        monkeypatch.setattr(Storvsp, "_complete", short)
        with pytest.raises(OSError) as e:
            await rig.disk().flush()
        assert e.value.errno == errno.EIO
        monkeypatch.undo()
        await rig.disk().write(0, b"ok" * 256)                    # still works
        assert await rig.disk().read(0, 512) == b"ok" * 256


async def test_completions_decode_as_linux_does(tmp_path: Path) -> None:
    """storvsc_on_io_completion / storvsc_handle_error (reference §4.5): INQUIRY and MODE
    SENSE(6) always succeed; sense only with CHECK CONDITION and AUTOSENSE_VALID; INVALID_LUN
    is no connect; ERROR without sense is DID_ERROR but for TEST UNIT READY; the transfer
    length is zeroed on failure (but DATA_OVERRUN) and clamped to the request."""
    from vbusfs.drivers.scsi.device import Direction, ScsiDevice, ScsiRequest
    from vbusfs.drivers.vmbus.storvsc import _Slot

    def completion(srb_status: int, scsi_status: int, dtl: int,
                   sense: bytes = b"") -> bytes:
        return struct.pack("<III", 1, 0, 0) + struct.pack(
            "<HBBBBBBBBBBI20s", 0x34, srb_status, scsi_status, 0, 0, 0, 0, 16, 0x14, 0, 0,
            dtl, sense) + bytes(16)

    sense = bytes((0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x24, 0, 0, 0, 0, 0))
    async with storvsc_machine(tmp_path) as rig:
        stray = ScsiDevice(rig.ctrl, 0, 0, 1, 9)          # not a device of the host

        def decode(op: int, length: int, payload: bytes) -> CmdResult:
            req = ScsiRequest(bytes((op,)) + bytes(9), Direction.FROM_DEVICE, length, [])
            return rig.ctrl._decode(_Slot(stray, req), payload)

        for op in (0x12, 0x1A):                           # INQUIRY, MODE SENSE(6)
            assert decode(op, 36, completion(0x86, 2, 0, sense)) == \
                CmdResult(HostByte.DID_OK, 0, b"", 0)
        r = decode(0x5A, 36, completion(0x86, 2, 0, sense))   # MODE SENSE(10): not forced
        assert (r.host, r.status, r.sense[:14]) == (HostByte.DID_OK, 2, sense[:14])
        assert decide(r) == errno.EREMOTEIO
        r = decode(0x28, 512, completion(0x06, 2, 512, sense))   # no AUTOSENSE: no sense
        assert (r.host, r.sense, r.transferred) == (HostByte.DID_ERROR, b"", 0)
        assert decode(0x00, 0, completion(0x04, 2, 0)).host == HostByte.DID_OK   # TUR
        assert decode(0x28, 512, completion(0x20, 2, 0)).host == HostByte.DID_NO_CONNECT
        assert decode(0x28, 512, completion(0x12, 0, 300)).transferred == 300    # overrun
        assert decode(0x28, 512, completion(0x01, 0, 99999)).transferred == 512  # clamped
        assert decode(0x28, 512, completion(0x01, 0, 100)) == \
            CmdResult(HostByte.DID_OK, 0, b"", 100)                              # short


async def test_unanswered_command_keeps_its_tag_and_pages_until_the_answer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logs: Logs) -> None:
    """A command of the midlayer's own that the host does not answer within the device's
    timeout fails with DID_TIME_OUT; its tag and bounce page stay the host's (a late answer
    must not land in reused memory), and come back when the answer does."""
    from vbusfs.drivers.scsi.device import Direction, execute
    from vbusfs.protocols import scsi

    logs.expect(r"command 0x12 timed out")
    async with storvsc_machine(tmp_path) as rig:
        ctrl, sdev = rig.ctrl, rig.sd(0).sdev
        held: list[Packet] = []
        real = rig.storvsp._handle

        def handle(pkt: Packet) -> None:
            if pkt.payload[12 + 16] == 0x12 and not held:     # the first INQUIRY: held
                held.append(pkt)
            else:
                real(pkt)

        monkeypatch.setattr(rig.storvsp, "_handle", handle)

        def taken() -> int:
            return rig.memory.nr_frames - rig.memory.free_frames() - len(ctrl._bounce)

        before = taken()
        sdev.timeout = 0.2
        r = await execute(sdev, scsi.cdb_inquiry(96, None), Direction.FROM_DEVICE, 96)
        assert r.host == HostByte.DID_TIME_OUT and len(held) == 1
        assert ctrl.host_busy() == 1 and taken() == before + 1
        # the device still works meanwhile
        r = await execute(sdev, scsi.cdb_inquiry(96, None), Direction.FROM_DEVICE, 96)
        assert (r.host, r.status, r.data[8:12]) == (HostByte.DID_OK, 0, b"Msft")
        real(held[0])                                          # the late answer,
        rig.storvsp._interrupt()                               # published
        await trio.testing.wait_all_tasks_blocked()
        assert ctrl.host_busy() == 0 and taken() == before


async def test_srb_status_codes_are_compared_whole(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """storvsc_handle_error switches on SRB_STATUS(srb_status), the low six bits (reference
    §4.5): ERROR, ABORTED, INVALID_REQUEST and INTERNAL_ERROR with autosense and capacity
    changed (2A/09) or operating conditions changed (3F, but not 03 or 0E) are requeued and
    the device rescanned; without autosense they are DID_ERROR; INVALID_LUN (0x20) alone
    removes the LUN, so INTERNAL_ERROR (0x30), INVALID_TARGET_ID (0x21) and BAD_FUNCTION
    (0x22), which share its bit, do not."""
    from vbusfs.drivers.scsi.device import Direction, ScsiRequest
    from vbusfs.drivers.vmbus.storvsc import _Slot

    def completion(srb_status: int, scsi_status: int, sense: bytes = b"") -> bytes:
        return struct.pack("<III", 1, 0, 0) + struct.pack(
            "<HBBBBBBBBBBI20s", 0x34, srb_status, scsi_status, 0, 0, 0, 0, 16, 0x14, 0, 0,
            0, sense) + bytes(16)

    def sense(key: int, asc: int, ascq: int) -> bytes:
        return bytes((0x70, 0, key, 0, 0, 0, 0, 10, 0, 0, 0, 0, asc, ascq, 0, 0, 0, 0))

    async with storvsc_machine(tmp_path) as rig:
        host = rig.ctrl.host
        assert host is not None
        sdev = host.devices[(0, 0, 0)]
        rescanned: list[object] = []
        monkeypatch.setattr(host, "rescan_device_soon", rescanned.append)

        def decode(payload: bytes, op: int = 0x28) -> CmdResult:
            req = ScsiRequest(bytes((op,)) + bytes(9), Direction.FROM_DEVICE, 512, [])
            return rig.ctrl._decode(_Slot(sdev, req), payload)

        capacity = sense(0x06, 0x2A, 0x09)
        for code in (0x04, 0x02, 0x06, 0x30):
            r = decode(completion(code | 0x80, 2, capacity))
            assert r.host == HostByte.DID_REQUEUE and decide(r) == RETRY, hex(code)
            r = decode(completion(code, 2))
            assert r.host == HostByte.DID_ERROR and decide(r) == errno.EIO, hex(code)
            assert decode(completion(code, 2), op=0x00).host == HostByte.DID_OK   # TUR
        assert rescanned == [sdev] * 4
        r = decode(completion(0x84, 2, sense(0x06, 0x3F, 0x05)))
        assert r.host == HostByte.DID_REQUEUE
        for ascq in (0x03, 0x0E):                       # left to the midlayer
            assert decode(completion(0x84, 2, sense(0x06, 0x3F, ascq))).host == \
                HostByte.DID_OK
        for code in (0x30, 0x21, 0x22, 0x12 | 0x20):
            decode(completion(code, 2))
            await trio.testing.wait_all_tasks_blocked()
            assert sdev.state == "running" and (0, 0, 0) in host.devices, hex(code)
        assert decode(completion(0x20, 2)).host == HostByte.DID_NO_CONNECT
        await trio.testing.wait_all_tasks_blocked()
        assert (0, 0, 0) not in host.devices


async def test_concurrent_deletes_remove_the_device_once(tmp_path: Path) -> None:
    """Two writes to ``delete`` at once (Linux serializes scsi_remove_device; the second
    finds the device deleted and returns), and the driver's removal of a LUN it saw vanish
    racing a host rescan's: each returns once the device is gone, none fails."""
    async with storvsc_machine(tmp_path) as rig:
        host = rig.ctrl.host
        assert host is not None
        node = rig.tree.resolve(f"{SDEV}/delete")
        assert isinstance(node, Attribute)

        async def delete() -> None:
            await node.write(b"1\n")                  # type: ignore[misc]
            assert (0, 0, 0) not in host.devices

        async with trio.open_nursery() as n:
            n.start_soon(delete)
            n.start_soon(delete)
        assert "0:0:0:0" not in rig.tree.resolve("sys/bus/scsi/devices").children
        assert "sda" not in rig.tree.resolve("dev").children
        await host.scan()
        sdev = host.devices[(0, 0, 0)]
        async with trio.open_nursery() as n:
            host.lun_gone(sdev)
            n.start_soon(host.remove_device, sdev)
        assert not host.devices and not host.targets
        await host.scan()
        assert await rig.disk().read(0, 512) == bytes(512)


async def test_a_failed_background_rescan_leaves_the_controller_running(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logs: Logs) -> None:
    """A capacity change makes storvsc rescan the device in the background (reference
    §4.5); when READ CAPACITY then fails (here: a medium error) the rescan fails and says
    so in the log, as a work item of the driver does; the controller and its disks go on
    (Linux's scsi_rescan_device returns nothing to fail with)."""
    from backends.scsi import disk as host_disk

    logs.expect(r"0:0:0:0: rescan failed: .*READ CAPACITY failed")
    async with storvsc_machine(tmp_path) as rig:
        host = rig.ctrl.host
        assert host is not None
        medium = host_disk._MEDIUM_ERROR
        monkeypatch.setitem(host_disk._CONTROL, 0x25, lambda d, c, b: medium)
        monkeypatch.setitem(host_disk._CONTROL, 0x9E, lambda d, c, b: medium)
        host.rescan_device_soon(host.devices[(0, 0, 0)])
        await trio.testing.wait_all_tasks_blocked()
        monkeypatch.undo()
        assert not rig.ctrl.broken and rig.ctrl.host is host
        await rig.disk().write(0, b"still" * 100)
        assert await rig.disk().read(0, 500) == b"still" * 100


async def test_a_vpd_page_longer_than_an_inquiry_can_ask_for(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A host whose VPD page header claims 0xFFFF bytes: the page and its header are more
    than INQUIRY's 16-bit allocation length can ask for (SPC-3 §6.4.1), so the scan asks for
    65535 and keeps what comes; the device is added and the scan goes on."""
    from backends.scsi import disk as host_disk

    real = host_disk.ScsiDisk._inquiry

    def inquiry(d: ScsiDisk, cdb: bytes, buf: object) -> object:
        if cdb[1] & 1 and cdb[2] == 0x80:
            asked = struct.unpack_from(">H", cdb, 3)[0]
            page = bytes((0, 0x80, 0xFF, 0xFF)) + b"S" * 0xFFFF
            return d._answer(buf, page[:asked])            # type: ignore[arg-type]
        return real(d, cdb, buf)                           # type: ignore[arg-type]

    monkeypatch.setitem(host_disk._CONTROL, 0x12, inquiry)
    async with storvsc_machine(tmp_path, [{"lun": 0, "size": "16M"},
                                          {"lun": 1, "size": "16M"}]) as rig:
        host = rig.ctrl.host
        assert host is not None and set(host.devices) == {(0, 0, 0), (0, 0, 1)}
        pg80 = rig.tree.resolve(f"{SDEV}/vpd_pg80")
        assert isinstance(pg80, BinAttribute) and pg80.length == 0xFFFF
        assert rig.read(f"{SDEV}/vendor") == "Msft    \n"


async def test_host_scan_reads_fields_as_scsi_scan_does(tmp_path: Path) -> None:
    """`scan` (scsi_sysfs.c store_scan → scsi_scan): three fields of at most 10 characters,
    each '-' or a number as simple_strtoull(s, &last, 0) reads it with nothing left over —
    so hex and octal are fine, a sign or a '_' is EINVAL; a number out of range is EINVAL.
    A refused write scans nothing."""
    async with storvsc_machine(tmp_path) as rig:
        scan = rig.tree.resolve(f"{DEVICE_DIR}/host0/scsi_host/host0/scan")
        assert isinstance(scan, Attribute)

        async def write(text: str) -> int:
            try:
                out = scan.write(text.encode())
                if out is not None and not isinstance(out, str):
                    await out
            except OSError as e:
                return e.errno or 0
            return 0

        for good in ("- - -\n", "0 0 0", "0x0 00 -", "0 1 0x1"):
            assert await write(good) == 0, good
        for bad in ("1_0 0 0", "+0 0 0", "0 0", "0 0 0 0", "- - - x", "09 0 0", "0x 0 0",
                    "00000000000 0 0", "8 0 0", "0 2 0", "0 0 255", "٠ 0 0", "-1 0 0"):
            assert await write(bad) == errno.EINVAL, bad


async def test_number_attributes_take_ascii_numbers_only(tmp_path: Path) -> None:
    """The numeric stores parse as Linux's do (scsi_sysfs.c, sd.c, lib/kstrtox.c): ASCII
    digits only (a Unicode digit such as '²' or '١' is not one: EINVAL, nothing changed,
    never an EIO from a failed conversion); kstrtouint's ERANGE above 2^32 - 1
    (eh_timeout, max_medium_access_timeouts), EINVAL where the store maps every error to it
    (queue_ramp_up_period; eh_deadline past UINT_MAX jiffies at the default HZ of 250);
    queue_depth as simple_strtoul(buf, NULL, 0) reads it, so 0x10 is 16; the disk's discard
    control takes byte counts in ASCII digits. Then thousands of
    arbitrary byte strings: each is taken or refused with EINVAL/ERANGE, and a refusal
    changes nothing."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    shost = f"{DEVICE_DIR}/host0/scsi_host/host0"
    sdisk = f"{SDEV}/scsi_disk/0:0:0:0"
    async with storvsc_machine(tmp_path) as rig:
        def write(path: str, data: bytes) -> int:
            node = rig.tree.resolve(path)
            assert isinstance(node, Attribute)
            try:
                out = node.write(data)
                assert out is None
            except OSError as e:
                return e.errno or 0
            return 0

        for name in ("queue_depth", "timeout", "eh_timeout", "queue_ramp_up_period"):
            before = rig.read(f"{SDEV}/{name}")
            for bad in ("²", "١٢", "1²", "½"):
                assert write(f"{SDEV}/{name}", bad.encode()) == errno.EINVAL, (name, bad)
            assert rig.read(f"{SDEV}/{name}") == before
        assert write(f"{SDEV}/eh_timeout", b"4294967295\n") == 0
        assert rig.read(f"{SDEV}/eh_timeout") == "4294967295\n"
        assert write(f"{SDEV}/eh_timeout", b"4294967296") == errno.ERANGE
        assert write(f"{SDEV}/eh_timeout", b"9" * 5000) == errno.ERANGE
        assert write(f"{SDEV}/eh_timeout", b"+7") == 0 and rig.read(f"{SDEV}/eh_timeout") == "7\n"
        assert write(f"{SDEV}/queue_ramp_up_period", b"4294967296") == errno.EINVAL
        assert write(f"{SDEV}/queue_depth", b"0x10") == 0
        assert rig.read(f"{SDEV}/queue_depth") == "16\n"
        assert write(f"{shost}/eh_deadline", b"17179869") == 0            # 4294967250 jiffies
        assert write(f"{shost}/eh_deadline", b"17179870") == errno.EINVAL
        assert write(f"{shost}/eh_deadline", "³".encode()) == errno.EINVAL
        assert rig.read(f"{shost}/eh_deadline") == "17179869\n"
        assert write(f"{sdisk}/max_medium_access_timeouts", b"4294967296") == errno.ERANGE
        assert write(f"{sdisk}/max_retries", "٣".encode()) == errno.EINVAL
        assert write(f"{sdisk}/max_retries", b"-1\n") == 0
        assert rig.read(f"{sdisk}/max_retries") == "-1\n"
        discard = rig.tree.resolve(".vbusfs/block/sda/discard")
        assert isinstance(discard, Attribute)
        with pytest.raises(OSError) as e:
            await discard.write("0 ٤٠٩٦".encode())      # type: ignore[misc]
        assert e.value.errno == errno.EINVAL

        targets = [f"{SDEV}/{n}" for n in ("queue_depth", "timeout", "eh_timeout",
                                             "queue_ramp_up_period", "state")] + \
            [f"{shost}/eh_deadline", f"{sdisk}/max_medium_access_timeouts",
             f"{sdisk}/max_retries"]
        text = st.text(alphabet=st.sampled_from("0123456789+-x \n\0²١٣½abOFfrunig"),
                       max_size=24).map(str.encode)

        @settings(max_examples=3000, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(st.sampled_from(targets), st.one_of(st.binary(max_size=24), text))
        def fuzz(path: str, data: bytes) -> None:
            before = rig.read(path)
            err = write(path, data)
            assert err in (0, errno.EINVAL, errno.ERANGE), (path, data, err)
            after = rig.read(path)
            if err:
                assert after == before, (path, data)
            else:
                assert after.isascii() and after.endswith("\n")

        fuzz()
        write(f"{SDEV}/state", b"running\n")
        assert await rig.disk().read(0, 512) == bytes(512)
        # store_state_field: the name, then a newline; what follows it is not looked at
        assert write(f"{SDEV}/state", b"offline\nanything") == 0
        assert rig.read(f"{SDEV}/state") == "offline\n"
        for bad in (b"offline", b"offlinex\n", b" running\n", b"running \n"):
            assert write(f"{SDEV}/state", bad) == errno.EINVAL, bad
        assert write(f"{SDEV}/state", b"running\n\n") == 0
        assert rig.read(f"{SDEV}/state") == "running\n"


# -- a hostile storvsp, generated ---------------------------------------------------------------

async def hostile_completions(tmp_path: Path, logs: Logs, seed: int, count: int) -> int:
    """A host that answers ``count`` commands (rounded up to whole rounds) with generated
    nonsense: a completion of any length and any statuses for the command's own transaction
    id (sometimes right, sometimes a second time), or packets under ids nobody asked for,
    of any type. Every read, write and flush must end, with its data or an ``OSError``,
    nothing else; the driver never dies, and a well-answered command works afterwards.
    Returns the nonsense answers given."""
    import random
    logs.expect(r"Incorrect transaction ID")               # what the driver drops or
    logs.expect(r"invalid completion for tag \d+ .* the command fails")     # fails, said
    logs.expect(r"packet of \d+ bytes dropped")
    rng = random.Random(seed)
    real = Storvsp._complete
    given = 0

    def hostile(self: Storvsp, trans_id: int, size: int, r: object) -> None:
        nonlocal given
        given += 1
        kind = rng.randrange(5)
        if kind == 0:                                         # the right answer
            real(self, trans_id, size, r)  # type: ignore[arg-type]
            return
        if kind == 1:             # any bytes, its own id, then the answer: what the guest
            self._write(rng.choice([0x0B, 0x0B, 6, 9, rng.randrange(0x10000)]), trans_id,
                        rng.randbytes(rng.choice([0, 4, 12, 20, 63, 64, 200])))  # drops
            real(self, trans_id, size, r)  # type: ignore[arg-type]  # leaves it waiting, and
            return                 # block I/O has no timeout (README, Known limits)
        if kind == 2:                                         # a COMPLETE_IO of nonsense
            srb = bytearray(rng.randbytes(52))
            self._write(0x0B, trans_id, struct.pack("<III", rng.choice([1, 1, 2, 99]),
                        rng.randrange(4), rng.randrange(2**32)) +
                        bytes(srb[:rng.choice([size, 52, 20, rng.randrange(53)])]))
            return
        if kind == 3:                                         # strays first, then right
            for _ in range(rng.randrange(1, 3)):
                self._write(0x0B, rng.choice([0, trans_id + 1, rng.randrange(2**64)]),
                            rng.randbytes(64))
            real(self, trans_id, size, r)  # type: ignore[arg-type]
            return
        real(self, trans_id, size, r)  # type: ignore[arg-type]  # answered twice
        self._write(0x0B, trans_id, rng.randbytes(64))

    machines = 0
    while given < count:              # a fresh machine when the guest removed its disk
        machines += 1
        async with storvsc_machine(tmp_path / str(machines)) as rig:
            disk = rig.disk()
            Storvsp._complete = hostile  # type: ignore[method-assign]
            try:
                while given < count and not disk.dead:
                    op = rng.randrange(3)
                    off = rng.randrange(0, (16 << 20) // 4096) * 4096
                    with trio.fail_after(10):
                        try:
                            if op == 0:
                                await disk.read(off, rng.choice([512, 4096, 65536]))
                            elif op == 1:
                                await disk.write(off, rng.randbytes(4096))
                            else:
                                await disk.flush()
                        except OSError:
                            pass
                        await trio.sleep(0)
            finally:
                Storvsp._complete = real  # type: ignore[method-assign]
            if disk.dead:        # INVALID_LUN and the like: removed, as Linux does
                continue
            with trio.fail_after(10):
                await disk.write(0, b"ok" * 256)              # still works
                assert await disk.read(0, 512) == b"ok" * 256
    return given


async def test_a_hostile_host_never_hangs_or_kills_the_driver(tmp_path: Path,
                                                              logs: Logs) -> None:
    assert await hostile_completions(tmp_path, logs, 5, 1000) >= 1000
