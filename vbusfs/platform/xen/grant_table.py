"""A Xen grant table, version 1, kept in guest memory as the real one is.

The granting domain (the guest) owns the table: frames of 8-byte ``grant_entry_v1``
(``flags`` u16, ``domid`` u16, ``frame`` u32; 512 per frame). To grant, it writes ``frame``
and ``domid`` and *then* ``flags`` = ``GTF_permit_access`` [| ``GTF_readonly``]. The mapping
domain (the host side) reaches guest frames only through :meth:`map`, which checks the entry
as Xen does — type, domain, and read-only against the direction — and marks it
``GTF_reading``/``GTF_writing`` while mapped. Ending access fails while the entry is mapped,
so a leak on either side shows up in :attr:`granted` / :attr:`mapped` (``grant_table.h``).
"""

from __future__ import annotations

import struct

from vbusfs.platform.memory import PAGE_SIZE, GuestMemory

__all__ = ["GrantTable", "GrantError", "GTF_permit_access", "GTF_readonly", "GTF_reading",
           "GTF_writing", "GTF_type_mask", "NR_RESERVED_ENTRIES", "ENTRY"]

GTF_invalid = 0
GTF_permit_access = 1
GTF_type_mask = 3
GTF_readonly = 1 << 2
GTF_reading = 1 << 3
GTF_writing = 1 << 4
NR_RESERVED_ENTRIES = 8
ENTRY = struct.Struct("<HHI")
_FLAGS = struct.Struct("<H")
ENTRIES_PER_FRAME = PAGE_SIZE // ENTRY.size

# GNTST_* status codes (grant_table.h)
GNTST_general_error = -1
GNTST_bad_domain = -2
GNTST_bad_gntref = -3
GNTST_permission_denied = -8
GNTST_bad_page = -9
GNTST_no_space = -13


class GrantError(Exception):
    """A grant operation failed; ``status`` is the GNTST_* code Xen would return."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class GrantTable:
    def __init__(self, memory: GuestMemory, domid: int, nr_frames: int = 32) -> None:
        self.memory = memory
        self.domid = domid
        self.nr_entries = nr_frames * ENTRIES_PER_FRAME
        self.table_pfn = memory.alloc(nr_frames)
        self._table = memory.view(self.table_pfn, nr_frames)
        self._free = list(range(self.nr_entries - 1, NR_RESERVED_ENTRIES - 1, -1))
        self._maps: dict[int, int] = {}      # ref -> map count (host side)
        self.granted = 0                     # guest side: live grants
        self.mapped = 0                      # host side: live mappings

    # -- granting side (guest) ------------------------------------------------------------
    def grant_access(self, domid: int, pfn: int, readonly: bool) -> int:
        """``gnttab_grant_foreign_access``: returns the new reference."""
        if not self._free:
            raise GrantError(GNTST_no_space, "grant table full")
        ref = self._free.pop()
        off = ref * ENTRY.size
        ENTRY.pack_into(self._table, off, 0, domid, pfn)
        _FLAGS.pack_into(self._table, off, GTF_permit_access | (GTF_readonly if readonly else 0))
        self.granted += 1
        return ref

    def end_access(self, ref: int) -> bool:
        """``gnttab_end_foreign_access_ref``: False while the other side still maps it."""
        off = self._off(ref)
        flags = _FLAGS.unpack_from(self._table, off)[0]
        if flags & (GTF_reading | GTF_writing):
            return False
        if flags & GTF_type_mask == GTF_invalid:
            raise GrantError(GNTST_bad_gntref, f"grant {ref} is not in use")
        ENTRY.pack_into(self._table, off, 0, 0, 0)
        self._free.append(ref)
        self.granted -= 1
        return True

    def free_refs(self) -> int:
        return len(self._free)

    # -- mapping side (host) --------------------------------------------------------------
    def _off(self, ref: int) -> int:
        if not NR_RESERVED_ENTRIES <= ref < self.nr_entries:
            raise GrantError(GNTST_bad_gntref, f"grant reference {ref} is out of range")
        return ref * ENTRY.size

    def map(self, ref: int, domid: int, write: bool) -> int:
        """``GNTTABOP_map_grant_ref``: validate the entry for ``domid`` and the direction;
        returns the frame. ``write`` means the mapper will write into the page."""
        off = self._off(ref)
        flags, entry_dom, frame = ENTRY.unpack_from(self._table, off)
        if flags & GTF_type_mask != GTF_permit_access:
            raise GrantError(GNTST_bad_gntref, f"grant {ref} does not permit access")
        if entry_dom != domid:
            raise GrantError(GNTST_bad_domain, f"grant {ref} is for domain {entry_dom}")
        if write and flags & GTF_readonly:
            raise GrantError(GNTST_permission_denied, f"grant {ref} is read-only")
        if not 0 < frame < self.memory.nr_frames:
            raise GrantError(GNTST_bad_page, f"grant {ref} names frame {frame}")
        _FLAGS.pack_into(self._table, off, flags | (GTF_writing if write else GTF_reading))
        self._maps[ref] = self._maps.get(ref, 0) + 1
        self.mapped += 1
        return int(frame)

    def unmap(self, ref: int) -> None:
        """``GNTTABOP_unmap_grant_ref``."""
        count = self._maps.get(ref)
        if not count:
            raise GrantError(GNTST_general_error, f"grant {ref} is not mapped")
        self.mapped -= 1
        if count > 1:
            self._maps[ref] = count - 1
            return
        del self._maps[ref]
        off = ref * ENTRY.size
        flags = _FLAGS.unpack_from(self._table, off)[0]
        _FLAGS.pack_into(self._table, off, flags & ~(GTF_reading | GTF_writing))

    def entry(self, ref: int) -> tuple[int, int, int]:
        """The raw (flags, domid, frame) of an entry, for tests and diagnostics."""
        flags, domid, frame = ENTRY.unpack_from(self._table, self._off(ref))
        return int(flags), int(domid), int(frame)
