"""``bench/run --quick --json`` works: every workload ran against every vbusfs disk type and
the baselines it could set up, the ratios the issue names are there, and nothing is left mounted."""

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
    disks = ("xvda", "vda", "sda")
    # the vbusfs disks and the baselines that need nothing from outside always run
    for w in ("seq_write", "seq_read"):
        cell = doc["workloads"][w]
        for target in (*disks, "inline", "threaded", "image"):
            assert len(cell[target]["runs"]) == doc["runs"]
            assert cell[target]["min"] <= cell[target]["median"] <= cell[target]["max"]
            assert cell[target]["median"] > 0
        for target in (*disks, "inline", "threaded"):     # processes: CPU per request
            assert cell[target]["cpu_us_per_req"]["median"] >= 0
        assert "cpu_us_per_req" not in cell["image"]
    # the baselines are mounted as vbusfs is (only the file system's name differs)
    opts = doc["mount_options"]
    assert opts["inline"].replace("inline", "vbusfs") == opts["xvda"]
    assert opts["threaded"].replace("threaded", "vbusfs") == opts["xvda"]
    ratios = doc["ratios"]
    keys = ["seq_write", "seq_read"]
    if "fio" not in skipped:
        keys += ["rand4k_qd1_read", "rand4k_qd1_write", "rand4k_qd16_read",
                 "rand4k_qd16_write", "rand4k_qd16_randrw"]
    bases = ["inline", "threaded", "image"] + ([] if "qsd" in skipped else ["qsd"])
    for d in disks:                                       # every disk type, its own ratios
        for key in keys:
            for base in bases:
                assert ratios[f"{d}_{key}_vs_{base}"] > 0, (d, key, base)
        if "fio" not in skipped:
            assert ratios[f"{d}_rand4k_qd16_read_vs_qd1"] > 0
            assert ratios[f"{d}_rand4k_qd16_write_vs_qd1"] > 0
    # the ratio is the quotient of the medians it names
    w = doc["workloads"]["seq_read"]
    assert ratios["sda_seq_read_vs_inline"] == pytest.approx(
        w["sda"]["median"] / w["inline"]["median"], rel=1e-2)
    for kind in ("first", "repeat"):
        assert ratios[f"attr_scan_{kind}_vs_tmpfs"] > 0
        assert ratios[f"attr_scan_{kind}_vs_treefs"] > 0
    attr = doc["attr_scan"]
    assert attr["files"] > 1000                   # 100 devices' attributes were scanned
    for key in ("first_vbusfs_s", "first_treefs_s", "repeat_vbusfs_s", "repeat_treefs_s",
                "repeat_tmpfs_s"):
        assert len(attr[key]["runs"]) == doc["runs"]
    # scale: 0, 100 and 1000 devices in --quick, each per device above the empty machine
    assert set(doc["scale"]) == {"0", "100", "1000"}
    for n in (100, 1000):
        assert doc[f"mount_{n}_s"] > 0 and doc[f"rss_{n}_mib"] > 0
        assert doc[f"mount_{n}_ms_per_device"] > 0 and doc[f"rss_{n}_kib_per_device"] > 0
    met = doc["targets_met"]
    assert {"xvda_seq_read_vs_inline", "sda_seq_write_vs_qsd" if "qsd" not in skipped
            else "sda_seq_write_vs_inline", "attr_scan_first_vs_tmpfs",
            "mount_1000_s"} <= set(met)
    assert "mount_10000_s" not in met                  # not in --quick
    assert "xvda" in doc["table"] and "\ntargets (" in doc["table"]
    # every mount it made is gone
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(work) not in mounts
