"""mountctl's integration-service verbs without a mount: help and usage errors."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import mountctl


def test_help() -> None:
    for verb in (["shutdown"], ["kvp"], ["kvp", "/m", "set"], ["kvp", "/m", "get"],
                 ["kvp", "/m", "delete"], ["kvp", "/m", "list"]):
        out = mountctl(*verb, "--help")
        assert out.returncode == 0 and "usage:" in out.stdout, verb
    out = mountctl("kvp", "--help")
    assert "auto_external" in out.stdout and "exit codes" in out.stdout
    assert "--hibernate" in mountctl("shutdown", "--help").stdout


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert mountctl("shutdown").returncode == 2
    assert mountctl("kvp", str(tmp_path)).returncode == 2                 # no operation
    assert mountctl("kvp", str(tmp_path), "set", "k").returncode == 2     # no value
    out = mountctl("kvp", str(tmp_path), "list")
    assert out.returncode == 2 and "not a mount point" in out.stderr
    out = mountctl("shutdown", str(tmp_path))
    assert out.returncode == 2 and "not a mount point" in out.stderr
