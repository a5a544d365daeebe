"""The SCSI midlayer's sysfs attributes, declared as tables (Linux 6.1
``drivers/scsi/scsi_sysfs.c`` ``scsi_sysfs_shost_attrs`` and ``scsi_sdev_attrs``, ``sd.c``
``sd_disk_attrs``; reference/hv-services.md §4.9).

Formats are Linux's; writable attributes are the ones Linux makes writable, and a value
Linux would refuse is EINVAL with nothing changed. Where Linux's store has an effect this
guest does not model (MODE SELECT for ``cache_type``, switching ``provisioning_mode``), the
store takes the value the attribute already has and refuses any other with EINVAL.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Awaitable, Callable
from typing import Protocol

from vbusfs.drivers.scsi.device import ScsiDevice
from vbusfs.drivers.scsi.sd import SdDisk
from vbusfs.protocols import scsi
from vbusfs.sysfs import Attr, BinAttribute, Directory, Group
from vbusfs.sysfs.driver_core import kstrtoul, sysfs_bool

__all__ = ["HostView", "SHOST_GROUP", "SDEV_GROUP", "SD_DISK_GROUP", "add_vpd_files",
           "wwid", "SDEV_STATES"]

#: ``sdev_states`` names (scsi_sysfs.c), in Linux's order
SDEV_STATES = ("created", "running", "cancel", "deleted", "quiesce", "offline",
               "transport-offline", "blocked", "created-blocked")
#: ``shost_states`` names
SHOST_STATES = ("created", "running", "cancel", "deleted", "recovery", "cancel/recovery",
                "deleted/recovery")
#: sd_cache_types: index RCD + 2 * WCE
_CACHE_TYPES = ("write through", "none", "write back", "write back, no read (daft)")


class HostView(Protocol):
    """What the host attributes read (the midlayer's ScsiHost)."""

    host_no: int
    state: str
    eh_deadline: int | None

    @property
    def proc_name(self) -> str: ...
    @property
    def can_queue(self) -> int: ...
    @property
    def cmd_per_lun(self) -> int: ...
    @property
    def sg_tablesize(self) -> int: ...
    @property
    def nr_hw_queues(self) -> int: ...
    def host_busy(self) -> int: ...
    def scan_store(self, text: str) -> Awaitable[None]: ...


#: kstrtouint(buf, 10, ...)'s syntax: an optional '+', ASCII digits, one newline at most
_DECIMAL = re.compile(r"\+?([0-9]+)\n?")
UINT_MAX = 0xFFFFFFFF
#: CONFIG_HZ's default (kernel/Kconfig.hz): eh_deadline is kept in jiffies
HZ = 250


def _uint(text: str, limit: int = UINT_MAX) -> int:
    """``kstrtouint(buf, 10, ...)`` (``kstrtoul`` with ``limit`` 2^64 - 1): EINVAL for
    anything but ASCII decimal digits (no Unicode digits, no spaces), ERANGE above
    ``limit``. Like the C string it reads, the text ends at a NUL."""
    m = _DECIMAL.fullmatch(text.split("\0", 1)[0])
    if m is None:
        raise OSError(errno.EINVAL, f"not an unsigned decimal number: {text.strip()!r}")
    digits = m[1].lstrip("0") or "0"
    if len(digits) > 20 or int(digits) > limit:         # (no 4300-digit int() either)
        raise OSError(errno.ERANGE, f"{digits[:24]} is out of range")
    return int(digits)


def _uint_einval(text: str, limit: int = UINT_MAX) -> int:
    """:func:`_uint` for stores that answer every parse failure with EINVAL."""
    try:
        return _uint(text, limit)
    except OSError as e:
        raise OSError(errno.EINVAL, e.strerror) from None


def _store_hstate(h: HostView, text: str) -> None:
    """``store_shost_state``: a state name and a newline; the transitions a running host
    allows (to running, cancel, deleted; recovery is the error handler's)."""
    if not text.endswith("\n") or text[:-1] not in SHOST_STATES:
        raise OSError(errno.EINVAL, "not a host state")
    if text[:-1] != h.state:
        raise OSError(errno.EINVAL, f"a {h.state} host cannot go {text[:-1]} here")


def _store_host_reset(h: HostView, text: str) -> None:
    if text.strip() not in ("adapter", "firmware"):
        raise OSError(errno.EINVAL, "host_reset takes 'adapter' or 'firmware'")
    raise OSError(errno.EOPNOTSUPP, "this host template has no host_reset")


def _store_eh_deadline(h: HostView, text: str) -> None:
    """``store_shost_eh_deadline``: "off", or seconds (kstrtoul) whose jiffies fit in an
    unsigned int (EINVAL otherwise)."""
    if text.startswith("off"):
        h.eh_deadline = None
        return
    deadline = _uint(text, 2**64 - 1)
    if deadline * HZ > UINT_MAX:
        raise OSError(errno.EINVAL, f"eh_deadline of {deadline} s is too long")
    h.eh_deadline = deadline


def _no_store(_h: object, _text: str) -> None:
    """An attribute Linux declares writable (0644) without a store: writes fail."""
    raise OSError(errno.EIO, "no store for this attribute")


SHOST_GROUP: Group[HostView] = Group([
    Attr("use_blk_mq", lambda h: "1\n", static=True),
    Attr("unique_id", lambda h: "0\n", static=True),
    Attr("host_busy", lambda h: f"{h.host_busy()}\n"),
    Attr("cmd_per_lun", lambda h: f"{h.cmd_per_lun}\n", static=True),
    Attr("can_queue", lambda h: f"{h.can_queue}\n", static=True),
    Attr("sg_tablesize", lambda h: f"{h.sg_tablesize}\n", static=True),
    Attr("sg_prot_tablesize", lambda h: "0\n", static=True),
    Attr("proc_name", lambda h: f"{h.proc_name}\n", static=True),
    Attr("scan", None, lambda h, t: h.scan_store(t)),
    Attr("state", lambda h: f"{h.state}\n", _store_hstate),
    Attr("supported_mode", lambda h: "Initiator\n", _no_store),
    Attr("active_mode", lambda h: "Initiator\n", _no_store),
    Attr("prot_capabilities", lambda h: "0\n", static=True),
    Attr("prot_guard_type", lambda h: "0\n", static=True),
    Attr("host_reset", None, _store_host_reset),
    Attr("eh_deadline", lambda h: "off\n" if h.eh_deadline is None else f"{h.eh_deadline}\n",
         _store_eh_deadline),
    Attr("nr_hw_queues", lambda h: f"{h.nr_hw_queues}\n", static=True),
])


# -- scsi_device -------------------------------------------------------------------------------

def wwid(sdev: ScsiDevice) -> str:
    """``scsi_vpd_lun_id``: the best designator of VPD page 0x83 (SCSI name string, NAA
    registered extended, EUI-64 16/12 bytes, NAA registered, NAA extended, EUI-64 8 bytes,
    T10 vendor id), as ``naa.``/``eui.``/``t10.`` text; ENXIO without the page."""
    page = sdev.vpd.get(scsi.VPD_IDS)
    if page is None:
        raise OSError(errno.ENXIO, "no VPD page 0x83")
    best, best_prio = "", 0
    at = 4
    while at + 4 <= len(page):
        d = page[at:at + 4 + page[at + 3]]
        at += 4 + page[at + 3]
        if len(d) < 4 or d[1] & 0x30 or d[3] == 0:
            continue
        kind, n, body = d[1] & 0x0F, d[3], d[4:]
        prio, text = 0, ""
        if kind == 8:
            prio, text = 9, body.rstrip(b"\0").decode(errors="replace")
        elif kind == 3 and n in (8, 16):
            prio = {6: 8, 5: 5, 4: 4, 3: 1}.get(body[0] >> 4, 0)
            text = "naa." + body.hex()
        elif kind == 2 and n in (8, 12, 16):
            prio, text = {16: 7, 12: 6, 8: 3}[n], "eui." + body.hex()
        elif kind == 1:
            prio = 1
            text = "t10." + "".join(chr(c) if 0x20 <= c < 0x7F else f"\\x{c:02x}"
                                    for c in body)
        if prio and prio >= best_prio:
            best, best_prio = text, prio
    if not best:
        raise OSError(errno.EINVAL, "no usable designator in VPD page 0x83")
    return best + "\n"


def _store_state(s: ScsiDevice, text: str) -> None:
    """``store_state_field``: 'running' or 'offline' and a newline (what follows the
    newline is not looked at, as strncmp + buf[len] == '\\n' does not)."""
    name, newline, _ = text.partition("\n")
    if not newline or name not in ("running", "offline"):
        raise OSError(errno.EINVAL, "state takes running or offline")
    if s.state not in ("running", "offline", "blocked"):
        raise OSError(errno.EINVAL, f"a {s.state} device cannot change state")
    s.state = name


def _store_timeout(s: ScsiDevice, text: str) -> None:
    """Seconds; what Linux's sscanf would not read as a number, or one whose jiffies do not
    fit in an int, is EINVAL here (Linux would keep garbage)."""
    t = _uint_einval(text.lstrip(" \t"))
    if t > 0x7FFFFFFF // 1000:
        raise OSError(errno.EINVAL, f"not a timeout in seconds: {t}")
    s.timeout = t


def _store_eh_timeout(s: ScsiDevice, text: str) -> None:
    s.eh_timeout = _uint(text)


def _store_queue_depth(s: ScsiDevice, text: str) -> None:
    """``sdev_store_queue_depth``: 1..can_queue (storvsc changes depth with
    ``scsi_change_queue_depth``)."""
    try:
        depth = kstrtoul(text.strip(" \t"))       # simple_strtoul(buf, NULL, 0)
    except OSError:
        raise OSError(errno.EINVAL, f"not a queue depth: {text.strip()!r}") from None
    if not 1 <= depth <= s.adapter.can_queue:
        raise OSError(errno.EINVAL, f"queue_depth must be between 1 and "
                      f"{s.adapter.can_queue}")
    s.queue_depth = depth


def _store_queue_type(s: ScsiDevice, text: str) -> None:
    """Deprecated: Linux ignores what a tagged device is told, and refuses an untagged."""
    if not s.tagged:
        raise OSError(errno.EINVAL, "the device does not take tagged commands")


def _store_ramp(s: ScsiDevice, text: str) -> None:
    s.queue_ramp_up_period = _uint_einval(text)


def _store_dh_state(s: ScsiDevice, text: str) -> None:
    """No device handler is loaded, so none can attach (``scsi_dh_attach``: EINVAL)."""
    raise OSError(errno.EINVAL, f"no device handler {text.strip()!r}")


def _evt(name: str) -> Attr[ScsiDevice]:
    def store(s: ScsiDevice, text: str) -> None:
        v = text.strip()
        if v not in ("0", "1"):
            raise OSError(errno.EINVAL, "0 or 1")
        s.events[name] = int(v)
    return Attr(f"evt_{name}", lambda s: f"{s.events[name]}\n", store)


def _vendor(s: ScsiDevice) -> str:
    return s.vendor.decode("latin-1") + "\n"


SDEV_GROUP: Group[ScsiDevice] = Group([
    Attr("device_blocked", lambda s: "0\n", static=True),
    Attr("type", lambda s: f"{s.type}\n", static=True),
    Attr("scsi_level", lambda s: f"{s.scsi_level}\n"),
    Attr("device_busy", lambda s: f"{s.busy}\n"),
    Attr("vendor", _vendor, static=True),
    Attr("model", lambda s: s.model.decode("latin-1") + "\n", static=True),
    Attr("rev", lambda s: s.rev.decode("latin-1") + "\n", static=True),
    Attr("state", lambda s: f"{s.state}\n", _store_state),
    Attr("timeout", lambda s: f"{s.timeout}\n", _store_timeout),
    Attr("eh_timeout", lambda s: f"{s.eh_timeout}\n", _store_eh_timeout),
    Attr("iocounterbits", lambda s: "32\n", static=True),
    Attr("iorequest_cnt", lambda s: f"{s.iorequest_cnt:#x}\n"),
    Attr("iodone_cnt", lambda s: f"{s.iodone_cnt:#x}\n"),
    Attr("ioerr_cnt", lambda s: f"{s.ioerr_cnt:#x}\n"),
    Attr("modalias", lambda s: f"scsi:t-0x{s.type:02x}\n", static=True),
    Attr("queue_depth", lambda s: f"{s.queue_depth}\n", _store_queue_depth),
    Attr("queue_type", lambda s: "simple\n" if s.tagged else "none\n", _store_queue_type),
    Attr("wwid", wwid),
    # storvsc's slave_alloc: BLIST_REPORTLUN2 | BLIST_TRY_VPD_PAGES (bits 17 and 28)
    Attr("blacklist", lambda s: "REPORTLUN2 TRY_VPD_PAGES\n", static=True),
    Attr("dh_state", lambda s: "detached\n", _store_dh_state),
    Attr("queue_ramp_up_period", lambda s: f"{s.queue_ramp_up_period}\n", _store_ramp),
    *(_evt(n) for n in ("media_change", "inquiry_change_reported",
                        "capacity_change_reported", "soft_threshold_reached",
                        "mode_parameter_change_reported", "lun_change_reported")),
])

#: the binary VPD attributes Linux 6.1 has, by page (each exists only when the page was read)
_VPD_FILES = {0x00: "vpd_pg0", 0x80: "vpd_pg80", 0x83: "vpd_pg83", 0x89: "vpd_pg89",
              0xB0: "vpd_pgb0", 0xB1: "vpd_pgb1", 0xB2: "vpd_pgb2"}


def _bin(name: str, data: bytes) -> BinAttribute:
    """A read-only binary attribute declared, as Linux declares these, with size 0."""
    return BinAttribute(name, len(data),
                        lambda off, n: bytes(data[off:off + n]), stat_size=0)


def add_vpd_files(d: Directory, sdev: ScsiDevice) -> None:
    """``inquiry`` and the ``vpd_pg*`` files of the pages the scan read."""
    for page, name in _VPD_FILES.items():
        if page in sdev.vpd:
            d.add(_bin(name, sdev.vpd[page]))
    d.add(_bin("inquiry", sdev.inquiry))


# -- scsi_disk -------------------------------------------------------------------------------

def _keep(current: Callable[[SdDisk], str]) -> Callable[[SdDisk, str], None]:
    """A store that takes only the value already in force (see the module docstring)."""
    def store(sd: SdDisk, text: str) -> None:
        if text.strip() != current(sd).strip():
            raise OSError(errno.EINVAL, f"only {current(sd).strip()!r} is possible here")
    return store


def _cache_type(sd: SdDisk) -> str:
    return _CACHE_TYPES[int(sd.rcd) + 2 * int(sd.wce)] + "\n"


def _store_flag(name: str) -> Callable[[SdDisk, str], None]:
    def store(sd: SdDisk, text: str) -> None:
        setattr(sd, name, int(sysfs_bool(text)))
    return store


def _store_timeouts(sd: SdDisk, text: str) -> None:
    sd.max_medium_access_timeouts = _uint(text)


def _store_retries(sd: SdDisk, text: str) -> None:
    """``max_retries_store``: kstrtoint(buf, 10), then -1 (no limit) to SD_MAX_RETRIES."""
    m = re.fullmatch(r"([+-]?)([0-9]+)\n?", text.split("\0", 1)[0])
    if m is None:
        raise OSError(errno.EINVAL, f"not a number: {text.strip()!r}")
    v = _uint(m[2], 0x7FFFFFFF + (m[1] == "-"))
    v = -v if m[1] == "-" else v
    if not -1 <= v <= 5:
        raise OSError(errno.EINVAL, "max_retries must be between -1 and 5")
    sd.max_retries = v


SD_DISK_GROUP: Group[SdDisk] = Group([
    Attr("cache_type", _cache_type, _keep(_cache_type)),
    Attr("FUA", lambda sd: f"{int(sd.dpofua)}\n"),
    Attr("allow_restart", lambda sd: f"{sd.allow_restart}\n", _store_flag("allow_restart")),
    Attr("manage_start_stop", lambda sd: f"{sd.manage_start_stop}\n",
         _store_flag("manage_start_stop")),
    Attr("protection_type", lambda sd: "0\n", _keep(lambda sd: "0")),
    Attr("protection_mode", lambda sd: "none\n", static=True),
    Attr("app_tag_own", lambda sd: "0\n", static=True),
    Attr("thin_provisioning", lambda sd: f"{int(sd.lbpme)}\n"),
    Attr("provisioning_mode", lambda sd: f"{sd.provisioning_mode}\n",
         _keep(lambda sd: sd.provisioning_mode)),
    Attr("zeroing_mode", lambda sd: "write\n", _keep(lambda sd: "write")),
    # storvsc sets no_write_same: sd_config_write_same leaves no WRITE SAME blocks
    Attr("max_write_same_blocks", lambda sd: "0\n", _keep(lambda sd: "0")),
    Attr("max_medium_access_timeouts", lambda sd: f"{sd.max_medium_access_timeouts}\n",
         _store_timeouts),
    Attr("zoned_cap", lambda sd: "none\n", static=True),
    Attr("max_retries", lambda sd: f"{sd.max_retries}\n", _store_retries),
])
