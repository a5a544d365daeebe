"""The PCI configuration space of vbusfs's virtio functions, field by field: against a real
guest's virtio-blk function (reference/real-virtio-pci-sysfs.txt, 0000:00:02.0, quoted
below) for everything a virtio-pci function must have in common with it, and against QEMU's
documented identities and layout (reference/sysfs.md §3.3–3.4) where the reference VMM
differs. Then the hardware behaviour a guest relies on, through the root complex: BAR sizing,
decode only while enabled, MSI-X masking, the host bridge."""

from __future__ import annotations

import struct

from backends.pci.host_bridge import HostBridge
from backends.virtio.simple import rng_device
from backends.virtio.transport import VirtioPciFunction
from vbusfs.platform.doorbell import Doorbell
from vbusfs.platform.memory import GuestMemory
from vbusfs.platform.pci import APIC_BASE, PciRoot
from vbusfs.protocols.virtio import ids

#: ``config`` of the real guest's 0000:00:02.0 (virtio-blk, modern), its first 160 bytes
REAL_BLK = bytes.fromhex(
    "f41a421006041000010080010000000004000800400000000000000000000000"
    "000000000000000000000000f41a421000000000400000000000000000000000"
    "0950100100000000000000003800000009601003000000000020000001000000"
    "0970100400000000004000000010000009841402000000000060000000100000"
    "0400000009981405000000000000000000000000000000001100018000800000")


def _caps(cfg: bytes) -> list[tuple[int, int, bytes]]:
    """(offset, id, the capability's bytes) by walking the list, independent of vbusfs."""
    out = []
    at = cfg[0x34]
    while at and len(out) < 48:
        cid, nxt = cfg[at], cfg[at + 1]
        ln = cfg[at + 2] if cid == 0x09 else 12
        out.append((at, cid, bytes(cfg[at:at + ln])))
        at = nxt
    return out


def _vendor(cap: bytes) -> tuple[int, int, int, int, int]:
    """cap_len, cfg_type, bar, offset, length of a struct virtio_pci_cap."""
    return cap[2], cap[3], cap[4], *struct.unpack_from("<II", cap, 8)


class _Blk:
    """A device model with virtio-blk's shape, for the transport's layout."""

    device_id = ids.DeviceId.BLOCK
    num_queues = 1
    queue_size = 256

    def features(self) -> int:
        return 0

    def config(self) -> bytes:
        return bytes(60)

    def config_write(self, offset: int, data: bytes) -> None: ...
    def start(self, fn: VirtioPciFunction) -> None: ...
    def reset(self) -> None: ...


def _function(transitional: bool) -> tuple[PciRoot, VirtioPciFunction]:
    root = PciRoot()
    vtype = ids.type_by_name("virtio-blk")
    assert vtype is not None
    fn = VirtioPciFunction(root.msi, GuestMemory(16 << 20), _Blk(), vtype,  # type: ignore[arg-type]
                           transitional)
    root.attach(4, 0, fn)
    return root, fn


def _config(root: PciRoot, devfn: int) -> bytes:
    return b"".join(root.config_read(devfn, at, 4).to_bytes(4, "little")
                    for at in range(0, 256, 4))


def test_the_real_capture_is_what_the_test_thinks_it_is() -> None:
    assert REAL_BLK[:4] == bytes.fromhex("f41a4210")          # 1af4:1042
    assert [c[1] for c in _caps(REAL_BLK)] == [9, 9, 9, 9, 9, 0x11]


def test_modern_virtio_blk_matches_the_real_function_where_all_virtio_pci_must() -> None:
    root, _ = _function(transitional=False)
    ours = _config(root, 4 << 3)
    real = REAL_BLK
    # vendor, device, revision, header type, the capability-list status bit
    for at, size in ((0, 2), (2, 2), (8, 1), (0x0E, 1)):
        assert ours[at:at + size] == real[at:at + size], hex(at)
    assert struct.unpack_from("<H", ours, 6)[0] & 0x10 == struct.unpack_from("<H", real, 6)[0] \
        & 0x10
    assert ours[0x2C:0x2E] == real[0x2C:0x2E]                   # subsystem vendor 1af4
    # the same five vendor capabilities, the same shapes, then MSI-X
    real_caps, our_caps = _caps(real), _caps(ours)
    types = lambda caps: sorted(_vendor(c)[1] for _, cid, c in caps if cid == 9)  # noqa: E731
    assert types(our_caps) == types(real_caps) == [1, 2, 3, 4, 5]
    shape = lambda caps: {_vendor(c)[1]: _vendor(c)[0] for _, cid, c in caps  # noqa: E731
                          if cid == 9}
    assert shape(our_caps) == shape(real_caps) == {1: 16, 2: 20, 3: 16, 4: 16, 5: 20}
    assert [cid for _, cid, _ in our_caps].count(0x11) == 1
    # every structure but PCI_CFG lies in a 64-bit memory BAR, as in the real function
    for caps, cfg in ((our_caps, ours), (real_caps, real)):
        for _, cid, c in caps:
            if cid == 9 and _vendor(c)[1] != 5:
                bar = _vendor(c)[2]
                low = struct.unpack_from("<I", cfg, 0x10 + 4 * bar)[0]
                assert low & 0x7 == 0x4, (bar, hex(low))
    # the common configuration is the 0x38-byte 1.0 structure or a region that holds it
    real_common = next(_vendor(c) for _, cid, c in real_caps if cid == 9 and c[3] == 1)
    our_common = next(_vendor(c) for _, cid, c in our_caps if cid == 9 and c[3] == 1)
    assert real_common[4] == 0x38 and our_common[4] >= 0x38


def test_qemu_identity_and_layout() -> None:
    """reference/sysfs.md §3.3–3.4: QEMU's ids, revision, subsystem, class and BARs."""
    root, _ = _function(transitional=False)
    cfg = _config(root, 4 << 3)
    assert struct.unpack_from("<HH", cfg, 0) == (0x1AF4, 0x1042)
    assert cfg[8] == 1                                            # revision 1
    assert int.from_bytes(cfg[9:12], "little") == 0x010000        # SCSI storage controller
    assert struct.unpack_from("<HH", cfg, 0x2C) == (0x1AF4, 0x1100)
    # QEMU prepends: the list starts at MSI-X 0x98 and runs 0x84, 0x70, 0x60, 0x50, 0x40
    assert [at for at, _, _ in _caps(cfg)] == [0x98, 0x84, 0x70, 0x60, 0x50, 0x40]
    vend = {_vendor(c)[1]: _vendor(c) for _, cid, c in _caps(cfg) if cid == 9}
    assert {t: (v[2], v[3]) for t, v in vend.items() if t != 5} == {
        1: (4, 0x0000), 3: (4, 0x1000), 4: (4, 0x2000), 2: (4, 0x3000)}
    assert struct.unpack_from("<I", _caps(cfg)[2][2], 16)[0] == 4   # notify_off_multiplier
    assert struct.unpack_from("<I", cfg, 0x10)[0] == 0            # no I/O BAR 0 when modern
    troot, _ = _function(transitional=True)
    tcfg = _config(troot, 4 << 3)
    assert struct.unpack_from("<HH", tcfg, 0) == (0x1AF4, 0x1001)
    assert tcfg[8] == 0 and struct.unpack_from("<HH", tcfg, 0x2C) == (0x1AF4, 2)
    assert struct.unpack_from("<I", tcfg, 0x10)[0] & 0x3 == 0x1   # legacy I/O BAR 0


def test_bars_size_themselves_and_decode_only_when_enabled() -> None:
    root, _ = _function(transitional=True)
    devfn = 4 << 3
    sizes = {}
    for bar in (0, 1, 4):
        at = 0x10 + 4 * bar
        root.config_write(devfn, at, 4, 0xFFFFFFFF)
        sizes[bar] = root.config_read(devfn, at, 4)
    root.config_write(devfn, 0x24, 4, 0xFFFFFFFF)                 # BAR 4's upper half
    upper = root.config_read(devfn, 0x24, 4)
    assert sizes[1] == 0xFFFFF000                                  # 4 KiB, 32-bit memory
    assert sizes[4] == 0xFFFFC00C and upper == 0xFFFFFFFF          # 16 KiB 64-bit prefetch
    io_size = (~(sizes[0] & ~0x3) & 0xFFFFFFFF) + 1
    assert sizes[0] & 0x3 == 0x1 and io_size & (io_size - 1) == 0 and io_size >= 0x40
    root.config_write(devfn, 0x14, 4, 0xFE000000)                  # program BAR 1
    assert root.read(False, 0xFE000000 + 12, 4) == 0xFFFFFFFF      # decode off: master abort
    root.config_write(devfn, 0x04, 2, 0x2)                         # memory space on
    assert root.read(False, 0xFE000000 + 12, 4) == 1               # MSI-X entry 0: masked


def test_msix_masks_and_delivers() -> None:
    root, fn = _function(transitional=False)
    devfn = 4 << 3
    root.config_write(devfn, 0x14, 4, 0xFE000000)
    root.config_write(devfn, 0x04, 2, 0x6)
    bell = Doorbell("t")
    vector = root.msi.bind(bell)
    root.write(False, 0xFE000000, 4, APIC_BASE)                    # entry 0 → our vector
    root.write(False, 0xFE000008, 4, vector)
    cap = 0x98
    root.config_write(devfn, cap + 2, 2, 0x8000)                   # MSI-X on, entry masked
    assert fn.msix is not None and fn.msix.notify(0)
    assert bell.count == 0 and root.read(False, 0xFE000800, 1) & 1   # pending, not lost
    root.write(False, 0xFE00000C, 4, 0)                            # unmask: delivered
    assert bell.count == 1 and root.read(False, 0xFE000800, 1) & 1 == 0
    assert not fn.msix.notify(7)                                   # no such vector


def test_host_bridge_is_qemus_440fx() -> None:
    root = PciRoot()
    root.attach(0, 0, HostBridge(root.msi))
    cfg = _config(root, 0)
    assert struct.unpack_from("<HH", cfg, 0) == (0x8086, 0x1237)
    assert cfg[8] == 2 and int.from_bytes(cfg[9:12], "little") == 0x060000
    assert struct.unpack_from("<HH", cfg, 0x2C) == (0x1AF4, 0x1100)
    assert root.config_read(1 << 3, 0, 4) == 0xFFFFFFFF            # empty slot
    assert root.config_read(0, 0x101, 2) == 0xFFFF                 # outside the space


def test_rng_function_has_qemus_class() -> None:
    root = PciRoot()
    vtype = ids.type_by_name("virtio-rng")
    assert vtype is not None
    root.attach(5, 0, VirtioPciFunction(root.msi, GuestMemory(16 << 20), rng_device(), vtype,
                                        False))
    cfg = _config(root, 5 << 3)
    assert struct.unpack_from("<H", cfg, 2)[0] == 0x1044
    assert int.from_bytes(cfg[9:12], "little") == 0xFF0000
