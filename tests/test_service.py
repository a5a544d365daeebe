"""The service's start-up: the machine comes up through ``nursery.start`` (ready means
every device negotiated), and one that never does is a clear timeout, not a hang or a
TooSlowError; nothing is mounted in either case."""

from __future__ import annotations

import errno
import gc
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import trio
import trio.testing

from vbusfs import service
from vbusfs.errors import single_errors


class _Stuck:
    """A machine whose guest never finishes negotiating."""

    config = SimpleNamespace(machine=SimpleNamespace(name="stuck"),
                             vmbus=SimpleNamespace(devices=[None] * 100), xen=None, pci=None)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        await trio.sleep_forever()


class _Broken(_Stuck):
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        raise OSError(errno.EPROTO, "no common VMBus version")


async def test_a_machine_that_never_comes_up_is_a_timeout(
        autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch) -> None:
    mounted: list[str] = []
    monkeypatch.setattr(service.pyfuse3, "init", lambda *a: mounted.append("init"))
    with pytest.raises(OSError) as e, single_errors():              # as serve() reports it
        await service._run(_Stuck(), "/nowhere", lambda: None)    # type: ignore[arg-type]
    assert e.value.errno == errno.ETIMEDOUT
    # the bound grows with the machine: 100 devices give it one more second
    deadline = service.START_DEADLINE + 100 * service.START_PER_DEVICE
    assert f"{deadline:.0f} s" in str(e.value)
    assert trio.current_time() >= deadline and not mounted


async def test_a_machine_that_fails_to_start_reports_its_own_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    mounted: list[str] = []
    monkeypatch.setattr(service.pyfuse3, "init", lambda *a: mounted.append("init"))
    with pytest.raises(OSError) as e, single_errors():
        await service._run(_Broken(), "/nowhere", lambda: None)   # type: ignore[arg-type]
    assert e.value.errno == errno.EPROTO and not mounted


@pytest.fixture
def gc_state() -> Iterator[None]:
    """The test process's collector as it was, whatever the test froze or set."""
    thresholds = gc.get_threshold()
    gc.unfreeze()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


class _Kept:
    """A cycle the machine keeps, and one that is garbage once made."""

    def __init__(self) -> None:
        self.me = self


def test_start_up_skips_full_collections_then_freezes_what_it_built(gc_state: None) -> None:
    before = gc.get_threshold()
    with service.long_lived_start():
        assert gc.get_threshold()[:2] == before[:2]      # the young generations still run
        assert gc.get_threshold()[2] > 1_000_000          # no full collection
        kept = _Kept()
        garbage = weakref.ref(_Kept())
    assert gc.get_threshold() == before
    assert garbage() is None                             # collected, not frozen
    assert gc.get_freeze_count() > 0
    assert not any(o is kept for o in gc.get_objects())   # frozen: no collection walks it
    gc.unfreeze()
    assert any(o is kept for o in gc.get_objects())


def test_a_failed_start_up_freezes_nothing(gc_state: None) -> None:
    before = gc.get_threshold()
    with pytest.raises(OSError), service.long_lived_start():
        raise OSError(errno.EPROTO, "no common VMBus version")
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


async def test_the_service_starts_the_machine_that_way(
        monkeypatch: pytest.MonkeyPatch) -> None:
    entered: list[str] = []

    @contextmanager
    def spy() -> Iterator[None]:
        entered.append("start")
        yield
    monkeypatch.setattr(service, "long_lived_start", spy)
    monkeypatch.setattr(service.pyfuse3, "init", lambda *a: None)
    with pytest.raises(OSError), single_errors():
        await service._run(_Broken(), "/nowhere", lambda: None)   # type: ignore[arg-type]
    assert entered == ["start"]
