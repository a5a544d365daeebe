"""Grant table v1: access checks by domain and direction, in-use tracking, leak accounting
(xen/include/public/grant_table.h semantics)."""

from __future__ import annotations

import pytest

from vbusfs.platform.memory import GuestMemory
from vbusfs.platform.xen import grant_table as gt
from vbusfs.platform.xen.grant_table import GrantError, GrantTable


@pytest.fixture
def table() -> GrantTable:
    return GrantTable(GuestMemory(16 << 20), domid=1, nr_frames=1)


def test_entry_bytes_in_guest_memory(table: GrantTable) -> None:
    pfn = table.memory.alloc(1)
    ref = table.grant_access(0, pfn, readonly=True)
    assert ref >= gt.NR_RESERVED_ENTRIES
    raw = bytes(table.memory.view(table.table_pfn)[ref * 8:ref * 8 + 8])
    assert raw == (gt.GTF_permit_access | gt.GTF_readonly).to_bytes(2, "little") + \
        (0).to_bytes(2, "little") + pfn.to_bytes(4, "little")


def test_readonly_grant_refuses_writes(table: GrantTable) -> None:
    pfn = table.memory.alloc(1)
    ref = table.grant_access(0, pfn, readonly=True)
    with pytest.raises(GrantError) as e:
        table.map(ref, 0, write=True)
    assert e.value.status == gt.GNTST_permission_denied
    assert table.map(ref, 0, write=False) == pfn
    assert table.entry(ref)[0] & gt.GTF_reading
    table.unmap(ref)
    assert not table.entry(ref)[0] & gt.GTF_reading


def test_wrong_domain_and_bad_refs(table: GrantTable) -> None:
    ref = table.grant_access(0, table.memory.alloc(1), readonly=False)
    with pytest.raises(GrantError) as e:
        table.map(ref, 7, write=False)
    assert e.value.status == gt.GNTST_bad_domain
    for bad in (0, 1, 7, table.nr_entries, 2**32 - 1):
        with pytest.raises(GrantError):
            table.map(bad, 0, write=False)
    with pytest.raises(GrantError):
        table.map(ref + 1, 0, write=False)       # granted nothing


def test_end_access_fails_while_mapped_and_leaks_show(table: GrantTable) -> None:
    ref = table.grant_access(0, table.memory.alloc(1), readonly=False)
    table.map(ref, 0, write=True)
    assert table.end_access(ref) is False           # the backend still has it
    assert (table.granted, table.mapped) == (1, 1)
    table.unmap(ref)
    assert table.end_access(ref) is True
    assert (table.granted, table.mapped) == (0, 0)
    with pytest.raises(GrantError):
        table.unmap(ref)


def test_table_full(table: GrantTable) -> None:
    pfn = table.memory.alloc(1)
    n = table.free_refs()
    for _ in range(n):
        table.grant_access(0, pfn, True)
    with pytest.raises(GrantError) as e:
        table.grant_access(0, pfn, True)
    assert e.value.status == gt.GNTST_no_space
