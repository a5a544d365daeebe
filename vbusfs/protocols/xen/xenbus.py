"""xenbus device states and virtual-device numbers (``io/xenbus.h``, xen-vbd-interface.7).

States are stored in xenstore as decimal numbers and shown in sysfs as
``xenbus_strstate`` strings (reference/sysfs.md §2.2). A ``virtual-device`` number names an
xvd disk: ``202<<8 | disk<<4 | part`` up to disk 15, ``1<<28 | disk<<8 | part`` beyond;
``sd`` (8) and ``hd`` (3, 22) numbers map onto xvd names as Linux blkfront does (§2.5).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["State", "strstate", "Vdev", "parse_vdev", "disk_name", "XENVBD_MAJOR",
           "PROTOCOL_NATIVE"]

XENVBD_MAJOR = 202
PARTS_PER_DISK = 16
PARTS_PER_EXT_DISK = 256
EXT_SHIFT = 28
PROTOCOL_NATIVE = "x86_64-abi"


class State(enum.IntEnum):
    UNKNOWN = 0
    INITIALISING = 1
    INIT_WAIT = 2
    INITIALISED = 3
    CONNECTED = 4
    CLOSING = 5
    CLOSED = 6
    RECONFIGURING = 7
    RECONFIGURED = 8


_NAMES = ("Unknown", "Initialising", "InitWait", "Initialised", "Connected", "Closing",
          "Closed", "Reconfiguring", "Reconfigured")


def strstate(value: int) -> str:
    return _NAMES[value] if 0 <= value < len(_NAMES) else "INVALID"


def disk_name(index: int) -> str:
    """Base-26 letters as sd/xvd use them: 0 → a, 25 → z, 26 → aa, 701 → zz, 702 → aaa."""
    if index < 0:
        raise ValueError("disk index cannot be negative")
    letters = ""
    n = index
    while True:
        letters = chr(ord("a") + n % 26) + letters
        n = n // 26 - 1
        if n < 0:
            return letters


@dataclass(frozen=True)
class Vdev:
    number: int       # the xenstore virtual-device value
    disk: int         # disk index (xvda = 0)
    partition: int    # 0 for a whole disk

    @property
    def extended(self) -> bool:
        return bool(self.number >> EXT_SHIFT)

    @property
    def name(self) -> str:
        base = "xvd" + disk_name(self.disk)
        return base + (str(self.partition) if self.partition else "")

    @property
    def minor(self) -> int:
        per = PARTS_PER_EXT_DISK if self.extended else PARTS_PER_DISK
        return self.disk * per + self.partition

    @property
    def range(self) -> int:
        """Minors the gendisk reserves: 1 for a partition vdev, else 16 (extended: 256)."""
        if self.partition:
            return 1
        return PARTS_PER_EXT_DISK if self.extended else PARTS_PER_DISK


def _from_number(n: int) -> Vdev:
    if n >> EXT_SHIFT:
        if n >> EXT_SHIFT != 1:
            raise ValueError(f"virtual-device {n}: unknown extended encoding")
        return Vdev(n, (n >> 8) & ((1 << 20) - 1), n & 0xFF)
    major, minor = n >> 8, n & 0xFF
    if major == XENVBD_MAJOR:
        return Vdev(n, minor >> 4, minor & 0xF)
    if major == 8:                       # sd
        return Vdev(n, minor >> 4, minor & 0xF)
    if major == 3:                       # hda, hdb
        return Vdev(n, minor >> 6, minor & 0x3F)
    if major == 22:                      # hdc, hdd
        return Vdev(n, (minor >> 6) + 2, minor & 0x3F)
    raise ValueError(f"virtual-device {n}: major {major} is not xvd, sd or hd")


def parse_vdev(text: str | int) -> Vdev:
    """A vdev from its number or from an ``xvdX[N]`` name (the xl disk-spec form)."""
    if isinstance(text, int):
        return _from_number(text)
    t = text.strip()
    if t.isdigit():
        return _from_number(int(t))
    if not t.startswith("xvd"):
        raise ValueError(f"not a virtual device: {text!r} (examples: xvda, xvdb2, 51712)")
    rest = t[3:]
    letters = rest.rstrip("0123456789")
    digits = rest[len(letters):]
    if not letters or not letters.isalpha() or not letters.islower() or len(letters) > 4:
        raise ValueError(f"not a virtual device: {text!r} (examples: xvda, xvdb2, 51712)")
    disk = 0
    for ch in letters:
        disk = disk * 26 + (ord(ch) - ord("a") + 1)
    disk -= 1
    part = int(digits) if digits else 0
    if disk < 16 and part < 16:
        return Vdev(XENVBD_MAJOR << 8 | disk << 4 | part, disk, part)
    if disk >= 1 << 20 or part > 255:
        raise ValueError(f"{text!r}: disk or partition number too large")
    return Vdev(1 << EXT_SHIFT | disk << 8 | part, disk, part)
