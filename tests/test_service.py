"""The service's start-up: the machine comes up through ``nursery.start`` (ready means
every device negotiated), and one that never does is a clear timeout, not a hang or a
TooSlowError; nothing is mounted in either case."""

from __future__ import annotations

import errno
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
