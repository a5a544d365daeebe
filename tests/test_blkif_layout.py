"""blkif and shared-ring layouts compared with Debian's libxen-dev headers, compiled here.

The C program prints sizeof/offsetof of the real structs and the ring sizes for 1–16 pages
(``__CONST_RING_SIZE``); the Python definitions must agree. Values in the reference table
(reference/protocols.md §1.1) are checked too.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from vbusfs.platform.xen import grant_table as gt
from vbusfs.protocols.xen import blkif
from vbusfs.protocols.xen import xenstore as xs
from vbusfs.protocols.xen.ring import ring_size
from vbusfs.protocols.xen.xenbus import State

HEADER = Path("/usr/include/xen/io/blkif.h")

C_PROGRAM = r"""
#include <stdio.h>
#include <stddef.h>
#include <stdint.h>
#include <xen/xen.h>
#include <xen/io/blkif.h>
#include <xen/io/xs_wire.h>
#include <xen/io/xenbus.h>
#include <xen/grant_table.h>
#define P(name, value) printf("%s %lu\n", name, (unsigned long)(value))
int main(void) {
    P("segment", sizeof(struct blkif_request_segment));
    P("request", sizeof(struct blkif_request));
    P("request.seg", offsetof(struct blkif_request, seg));
    P("request.id", offsetof(struct blkif_request, id));
    P("request.sector_number", offsetof(struct blkif_request, sector_number));
    P("discard", sizeof(struct blkif_request_discard));
    P("discard.nr_sectors", offsetof(struct blkif_request_discard, nr_sectors));
    P("indirect", sizeof(struct blkif_request_indirect));
    P("indirect.handle", offsetof(struct blkif_request_indirect, handle));
    P("indirect.indirect_grefs", offsetof(struct blkif_request_indirect, indirect_grefs));
    P("response", sizeof(struct blkif_response));
    P("response.status", offsetof(struct blkif_response, status));
    P("slot", sizeof(union blkif_sring_entry));
    P("sring.ring", offsetof(struct blkif_sring, ring));
    for (int pages = 1; pages <= 16; pages *= 2) {
        char name[32];
        snprintf(name, sizeof name, "ring%d", pages);
        P(name, __CONST_RING_SIZE(blkif, 4096 * pages));
    }
    P("BLKIF_MAX_SEGMENTS_PER_REQUEST", BLKIF_MAX_SEGMENTS_PER_REQUEST);
    P("BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST", BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST);
    P("BLKIF_OP_INDIRECT", BLKIF_OP_INDIRECT);
    P("BLKIF_OP_DISCARD", BLKIF_OP_DISCARD);
    P("BLKIF_OP_FLUSH_DISKCACHE", BLKIF_OP_FLUSH_DISKCACHE);
    P("xsd_sockmsg", sizeof(struct xsd_sockmsg));
    P("xs.req_cons", offsetof(struct xenstore_domain_interface, req_cons));
    P("xs.req_prod", offsetof(struct xenstore_domain_interface, req_prod));
    P("xs.rsp_cons", offsetof(struct xenstore_domain_interface, rsp_cons));
    P("xs.rsp_prod", offsetof(struct xenstore_domain_interface, rsp_prod));
    P("xs.server_features", offsetof(struct xenstore_domain_interface, server_features));
    P("xs.connection", offsetof(struct xenstore_domain_interface, connection));
    P("xs.error", offsetof(struct xenstore_domain_interface, error));
    P("xs.size", sizeof(struct xenstore_domain_interface));
    P("XENSTORE_PAYLOAD_MAX", XENSTORE_PAYLOAD_MAX);
    P("XS_WATCH_EVENT", XS_WATCH_EVENT);
    P("XS_TRANSACTION_END", XS_TRANSACTION_END);
    P("XS_DIRECTORY_PART", XS_DIRECTORY_PART);
    P("XS_RESET_WATCHES", XS_RESET_WATCHES);
    P("XS_ERROR", XS_ERROR);
    P("XenbusStateReconfigured", XenbusStateReconfigured);
    P("XenbusStateClosing", XenbusStateClosing);
    P("grant_entry_v1", sizeof(struct grant_entry_v1));
    P("grant_entry_v1.domid", offsetof(struct grant_entry_v1, domid));
    P("grant_entry_v1.frame", offsetof(struct grant_entry_v1, frame));
    P("GTF_readonly", GTF_readonly);
    P("GTF_reading", GTF_reading);
    P("GTF_writing", GTF_writing);
    P("GNTTAB_NR_RESERVED_ENTRIES", GNTTAB_NR_RESERVED_ENTRIES);
    return 0;
}
"""


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    if not HEADER.exists():
        pytest.skip(f"{HEADER} missing: Debian's libxen-dev is not installed (.ci/setup "
                    "installs it)")
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    d = tmp_path_factory.mktemp("blkif")
    (d / "layout.c").write_text(C_PROGRAM)
    subprocess.run([cc, "-std=c99", "-o", str(d / "layout"), str(d / "layout.c")], check=True)
    out = subprocess.run([str(d / "layout")], check=True, capture_output=True, text=True)
    return {k: int(v) for k, v in (line.split() for line in out.stdout.splitlines())}


def test_struct_sizes_match_header(c_layout: dict[str, int]) -> None:
    assert c_layout["segment"] == blkif.SEGMENT.size
    assert c_layout["request"] == blkif.REQUEST_HEAD.size + 11 * blkif.SEGMENT.size
    assert c_layout["request.seg"] == blkif.REQUEST_HEAD.size
    assert c_layout["request.id"] == 8 and c_layout["request.sector_number"] == 16
    assert c_layout["discard"] == blkif.DISCARD.size
    assert c_layout["discard.nr_sectors"] == 24
    assert c_layout["indirect"] == blkif.INDIRECT.size
    assert (c_layout["indirect.handle"], c_layout["indirect.indirect_grefs"]) == (24, 28)
    assert c_layout["response"] == blkif.RESPONSE.size
    assert c_layout["response.status"] == 10
    assert c_layout["slot"] == blkif.SLOT_SIZE and c_layout["sring.ring"] == 64


def test_ring_sizes_match_header(c_layout: dict[str, int]) -> None:
    for pages in (1, 2, 4, 8, 16):
        assert ring_size(4096 * pages, blkif.SLOT_SIZE) == c_layout[f"ring{pages}"]


def test_constants_match_header(c_layout: dict[str, int]) -> None:
    assert c_layout["BLKIF_MAX_SEGMENTS_PER_REQUEST"] == blkif.MAX_SEGMENTS_PER_REQUEST
    assert c_layout["BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST"] == blkif.MAX_INDIRECT_PAGES
    assert c_layout["BLKIF_OP_INDIRECT"] == blkif.Op.INDIRECT
    assert c_layout["BLKIF_OP_DISCARD"] == blkif.Op.DISCARD
    assert c_layout["BLKIF_OP_FLUSH_DISKCACHE"] == blkif.Op.FLUSH_DISKCACHE


def test_reference_ring_table() -> None:
    # reference/protocols.md §1.1: 1, 2, 4, 8, 16 pages → 32, 64, 128, 256, 512 entries
    assert [ring_size(4096 * p, 112) for p in (1, 2, 4, 8, 16)] == [32, 64, 128, 256, 512]


def test_xenstore_wire_matches_header(c_layout: dict[str, int]) -> None:
    assert c_layout["xsd_sockmsg"] == xs.HEADER.size
    assert (c_layout["xs.req_cons"], c_layout["xs.req_prod"], c_layout["xs.rsp_cons"],
            c_layout["xs.rsp_prod"]) == (xs.REQ_CONS, xs.REQ_PROD, xs.RSP_CONS, xs.RSP_PROD)
    assert (c_layout["xs.server_features"], c_layout["xs.connection"],
            c_layout["xs.error"]) == (xs.SERVER_FEATURES, xs.CONNECTION, xs.ERROR_FIELD)
    # Xen 4.17's header ends at `error`; newer ones append evtchn_port right after it
    assert c_layout["xs.size"] in (xs.EVTCHN_PORT, xs.EVTCHN_PORT + 4)
    assert c_layout["XENSTORE_PAYLOAD_MAX"] == xs.PAYLOAD_MAX
    for name in ("WATCH_EVENT", "TRANSACTION_END", "DIRECTORY_PART", "RESET_WATCHES", "ERROR"):
        assert c_layout[f"XS_{name}"] == xs.XsType[name], name
    assert c_layout["XenbusStateReconfigured"] == State.RECONFIGURED
    assert c_layout["XenbusStateClosing"] == State.CLOSING


def test_grant_entry_matches_header(c_layout: dict[str, int]) -> None:
    assert c_layout["grant_entry_v1"] == gt.ENTRY.size
    assert (c_layout["grant_entry_v1.domid"], c_layout["grant_entry_v1.frame"]) == (2, 4)
    assert (c_layout["GTF_readonly"], c_layout["GTF_reading"], c_layout["GTF_writing"]) == \
        (gt.GTF_readonly, gt.GTF_reading, gt.GTF_writing)
    assert c_layout["GNTTAB_NR_RESERVED_ENTRIES"] == gt.NR_RESERVED_ENTRIES
