"""``bench/run --quick --json`` works: every workload ran against vbusfs and the baselines it
could set up, the ratios the issue names are there, and nothing is left mounted."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.mount


def test_quick_bench_reports_ratios(tmp_path: Path) -> None:
    work = tmp_path / "bench"
    proc = subprocess.run([str(ROOT / "bench" / "run"), "--quick", "--json",
                           "--workdir", str(work)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert doc["quick"] is True and doc["runs"] >= 3
    skipped = doc["skipped"]
    # vbusfs and the two baselines that need nothing from outside always run
    for w in ("seq_write", "seq_read"):
        cell = doc["workloads"][w]
        for target in ("vbusfs", "virtio", "passthrough", "image"):
            assert len(cell[target]["runs"]) == doc["runs"]
            assert cell[target]["min"] <= cell[target]["median"] <= cell[target]["max"]
            assert cell[target]["median"] > 0
    ratios = doc["ratios"]
    want = ["seq_write_vs_passthrough", "seq_read_vs_passthrough", "attr_scan_vs_tmpfs",
            "attr_scan_vs_treefs"]
    if "fio" not in skipped:
        want += ["rand4k_qd1_read_vs_passthrough", "rand4k_qd1_write_vs_passthrough",
                 "rand4k_qd16_read_vs_passthrough"]
    if "qsd" not in skipped:
        want += ["seq_write_vs_qsd", "seq_read_vs_qsd"]
    for key in want:
        assert ratios[key] > 0, key
        if not key.startswith("attr"):               # virtio-blk (vda) has its own ratios
            assert ratios["virtio_" + key] > 0, key
    # the ratio is the quotient of the medians it names
    w = doc["workloads"]["seq_read"]
    assert ratios["seq_read_vs_passthrough"] == pytest.approx(
        w["vbusfs"]["median"] / w["passthrough"]["median"], rel=1e-2)
    assert doc["mount_100_s"] > 0 and doc["rss_100_mib"] > 0
    assert doc["attr_scan"]["files"] > 1000       # 100 devices' attributes were scanned
    for target in ("vbusfs", "treefs", "tmpfs"):
        assert len(doc["attr_scan"][f"scan_{target}_s"]) == doc["runs"]
    assert set(doc["targets_met"]) >= {"seq_read_vs_passthrough", "attr_scan_vs_tmpfs"}
    assert "vbusfs" in doc["table"] and "targets:" in doc["table"]
    # every mount it made is gone
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(work) not in mounts
