"""What the layout promises and import-linter cannot say: the block layer speaks no
transport's words (its contract is errnos, Ops, Limits and an opaque slot)."""

from __future__ import annotations

import re

from tests.conftest import ROOT


def test_the_block_layer_speaks_no_transports_words() -> None:
    words = re.compile(r"blkif|grant|gref|virtqueue|descriptor|\bsrb\b", re.IGNORECASE)
    found = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
             for p in sorted((ROOT / "vbusfs/block").glob("*.py"))
             for n, line in enumerate(p.read_text().splitlines(), 1) if words.search(line)]
    assert not found, "\n".join(found)
