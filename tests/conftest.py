"""Shared fixtures: real mounts run `mountctl up -d` in a subprocess on a temp directory.

Logs are a test oracle (as in s3ql): a test fails if anything logged a WARNING or worse that
the test did not declare with the ``logs`` fixture, and a declared warning that never came
fails it too. Real mounts are held to the same rule through the service's log file.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class _Expected:
    pattern: re.Pattern[str]
    level: int
    seen: int = 0


@dataclass
class Logs:
    """What a test expects to be logged at WARNING or worse: ``logs.expect(regex)``."""

    expected: list[_Expected] = field(default_factory=list)
    records: list[logging.LogRecord] = field(default_factory=list)

    def expect(self, pattern: str, level: int = logging.WARNING) -> None:
        """Declare a record (at ``level`` or worse) whose message matches ``pattern``; it
        must be logged at least once, and may be logged any number of times. Declaring
        the same one again (say, once per generated example) changes nothing."""
        if not any(e.pattern.pattern == pattern and e.level == level for e in self.expected):
            self.expected.append(_Expected(re.compile(pattern), level))

    def problems(self) -> list[str]:
        out = []
        for r in self.records:
            msg = r.getMessage()
            match = next((e for e in self.expected
                          if r.levelno >= e.level and e.pattern.search(msg)), None)
            if match is None:
                out.append(f"unexpected {r.levelname} from {r.name}: {msg}")
            else:
                match.seen += 1
        out += [f"expected a log record matching {e.pattern.pattern!r}, none came"
                for e in self.expected if not e.seen]
        return out


class _Collector(logging.Handler):
    def __init__(self, logs: Logs) -> None:
        super().__init__(logging.WARNING)
        self.logs = logs

    def emit(self, record: logging.LogRecord) -> None:
        self.logs.records.append(record)


_LOGS = pytest.StashKey[Logs]()


def _logs_of(item: pytest.Item) -> Logs:
    if _LOGS not in item.stash:
        item.stash[_LOGS] = Logs()
    return item.stash[_LOGS]


@pytest.fixture
def logs(request: pytest.FixtureRequest) -> Logs:
    return _logs_of(request.node)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    logs = _logs_of(item)
    handler = _Collector(logs)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        result = yield
    finally:
        root.removeHandler(handler)
    problems = logs.problems()
    if problems:
        pytest.fail("log check:\n  " + "\n  ".join(problems), pytrace=False)
    return result


def mount_unavailable() -> str | None:
    """Why a real FUSE mount cannot be made here, or None when it can."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse on this machine"
    if os.geteuid() != 0:
        return "FUSE mount tests need root (allow_other, mount -t)"
    if shutil.which("fusermount3") is None:
        return "fusermount3 (package fuse3) is not installed; run .ci/setup"
    return None


def mountctl(*args: str, env: dict[str, str] | None = None,
             check: bool = False) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "mountctl", *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"mountctl {' '.join(args)} -> {proc.returncode}\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def state_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["VBUSFS_STATE"] = str(tmp_path / "state")
    return env


class Mounted:
    def __init__(self, path: Path, env: dict[str, str]) -> None:
        self.path = path
        self.env = env

    def down(self) -> subprocess.CompletedProcess[str]:
        return mountctl("down", str(self.path), env=self.env)


_SERVICE_PROBLEM = re.compile(r"^vbusfs: (WARNING|ERROR|CRITICAL): (.*)$|^Traceback ")


def service_log_problems(log: Path, expected: list[str]) -> list[str]:
    """Lines of a service log (``mountctl up -d`` writes STATE_DIR/vbusfs.log) at WARNING or
    worse, and tracebacks, that match none of the ``expected`` regexes."""
    try:
        text = log.read_text(errors="replace")
    except FileNotFoundError:
        return []
    return [line for line in text.splitlines()
            if _SERVICE_PROBLEM.match(line) and not any(re.search(e, line) for e in expected)]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``mount`` (and every test that uses ``mnt``) need a real FUSE mount; where
    one cannot be made they are skipped with the precise reason. ``pytest -m "not mount"``
    runs only the tests below the mount."""
    why = mount_unavailable()
    for item in items:
        if "mnt" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.mount)
        if why and item.get_closest_marker("mount") is not None:
            item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture(scope="module")
def mnt(request: pytest.FixtureRequest,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mounted]:
    """The embedded default machine, mounted once per test module. When it is taken down, its
    log must hold no warning the module did not declare in ``SERVICE_LOG_EXPECTED``."""
    base = tmp_path_factory.mktemp("mnt")
    path = base / "m"
    path.mkdir()
    env = dict(os.environ)
    env["VBUSFS_STATE"] = str(base / "state")
    mountctl("up", "-d", str(path), env=env, check=True)
    m = Mounted(path, env)
    try:
        yield m
    finally:
        if m.down().returncode != 0:
            subprocess.run(["fusermount3", "-u", "-z", str(path)], check=False)
    expected = getattr(request.module, "SERVICE_LOG_EXPECTED", [])
    problems = service_log_problems(base / "state/hyperv-gen2/vbusfs.log", expected)
    if problems:
        pytest.fail("service log check:\n  " + "\n  ".join(problems), pytrace=False)


@pytest.fixture
def loop_available() -> None:
    if shutil.which("losetup") is None or shutil.which("mkfs.ext4") is None:
        pytest.skip("losetup/mkfs.ext4 missing (util-linux, e2fsprogs); run .ci/setup")
    if not os.path.exists("/dev/loop-control"):
        pytest.skip("no /dev/loop-control: this kernel has no loop devices")
