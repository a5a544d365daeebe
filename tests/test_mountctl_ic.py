"""mountctl's integration-service verbs without a mount: help and usage errors."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from mountctl import cli
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


def test_pools_are_named_or_ascii_digits() -> None:
    """`--pool ²` passed str.isdigit() and then crashed int() (exit 1); `٣` was pool 3."""
    assert [cli._kvp_pool(w) for w in ("0", "4", "auto", "guest")] == [0, 4, 2, 1]
    for word in ("²", "٣", "5", "01", "-1", " 1", ""):
        with pytest.raises(cli.Failure) as e:
            cli._kvp_pool(word)
        assert e.value.code == cli.EXIT_USAGE, word


def test_keys_and_values_must_be_utf8() -> None:
    """A key that came from the command line as undecodable bytes (a lone surrogate) is bad
    usage, not an encoding error at send time."""
    for key, value in (("k\udcff", "v"), ("k", "v\udcff")):
        args = argparse.Namespace(kvp_op="set", key=key, value=value, type="string")
        with pytest.raises(cli.Failure) as e:
            cli._kvp_check(args)
        assert e.value.code == cli.EXIT_USAGE
    cli._kvp_check(argparse.Namespace(kvp_op="set", key="clé", value="ναι", type="string"))
