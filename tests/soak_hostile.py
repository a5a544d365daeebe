"""The soak's hostile peers: the generators and checks of the hostile-peer tests, run with the
soak's seed and count, one campaign per transport and direction.

Run one campaign (what ``tests/soak`` does in a subprocess, with a timeout, so that a crash or
a hang of the receiving side is a failure and not the soak's end)::

    python -m tests.soak_hostile CAMPAIGN --seed S --count N

It prints one JSON line: ``{"campaign", "seed", "cases", "seconds", "failure"}``, where
``failure`` is null or the exception with hypothesis's falsifying example (the case).
Hypothesis campaigns are replayed by the same seed and count (no example database).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.hostile_cases import ENV


@dataclass(frozen=True)
class Campaign:
    transport: str
    direction: str          # "guest→host" (malformed requests) or "host→guest" (responses)
    what: str


CAMPAIGNS: dict[str, Campaign] = {
    "blkif-requests": Campaign("blkif", "guest→host",
                               "malformed blkif requests on a real ring to blkback "
                               "(tests/test_blkback_hostile.py)"),
    "vmbus-ic-from-host": Campaign("vmbus_ring", "host→guest",
                                   "hostile integration-service packets on VMBus rings to "
                                   "hv_utils (tests/test_ic_hostile.py)"),
    "vmbus-ic-from-guest": Campaign("vmbus_ring", "guest→host",
                                    "hostile IC replies to the host's services "
                                    "(tests/test_ic_hostile.py)"),
    "vmbus-messages": Campaign("vmbus_messages", "guest→host",
                               "garbage channel messages to the VMBus host "
                               "(tests/test_vmbus_bus.py)"),
    "blkif-responses": Campaign("blkif", "host→guest",
                                "hostile blkif responses and producer indices to blkfront "
                                "(tests/test_blkfront.py)"),
    "vmbus-messages-from-host": Campaign("vmbus_messages", "host→guest",
                                         "garbage channel messages to the guest's VMBus "
                                         "driver (tests/test_vmbus_bus.py)"),
    "xenstore-requests": Campaign("xenstore", "guest→host",
                                  "garbage xenstore wire messages to xenstored "
                                  "(tests/test_xenstore.py)"),
    "xenstore-replies": Campaign("xenstore", "host→guest",
                                 "garbage replies, watch events, lying headers and ring "
                                 "indices to the guest's xenstore client "
                                 "(tests/test_xenstore.py)"),
    "virtio-chains": Campaign("virtio", "guest→host",
                              "hostile descriptor tables and available rings to virtio-blk "
                              "(tests/test_virtio_hostile.py)"),
    "virtio-used": Campaign("virtio", "host→guest",
                            "hostile used rings to the driver's virtqueue "
                            "(tests/test_virtio_hostile.py)"),
    "storvsc-packets": Campaign("storvsc", "guest→host",
                                "hostile storvsc packets to storvsp "
                                "(tests/test_storvsp_hostile.py)"),
    "storvsc-completions": Campaign("storvsc", "host→guest",
                                    "nonsense completions, strays and double answers from "
                                    "storvsp to storvsc (tests/test_storvsc.py)"),
}


class _Collector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


#: examples a hypothesis campaign has run so far (reported also when it fails)
_EXAMPLES = [0]


def _given(fn: Any, seed: int, **kwargs: Any) -> int:
    """Run a hypothesis test with ``seed``; count the examples it ran."""
    import hypothesis
    n = _EXAMPLES
    inner = fn.hypothesis.inner_test

    def counted(*a: Any, **kw: Any) -> Any:
        n[0] += 1
        return inner(*a, **kw)

    fn.hypothesis.inner_test = counted
    try:
        hypothesis.seed(seed)(fn)(**kwargs)
    finally:
        fn.hypothesis.inner_test = inner
    return n[0]


def _run(name: str, seed: int, count: int, tmp: Path, logs: Any) -> int:
    import trio

    if name == "blkif-requests":
        from tests.test_blkback_hostile import malformed_requests
        return trio.run(malformed_requests, tmp, seed, count)
    if name == "vmbus-ic-from-host":
        from tests import test_ic_hostile
        return _given(test_ic_hostile.test_guest_answers_anything_the_host_sends, seed)
    if name == "vmbus-ic-from-guest":
        from tests import test_ic_hostile
        return _given(test_ic_hostile.test_host_takes_anything_the_guest_answers, seed)
    if name == "vmbus-messages":
        from tests.test_vmbus_bus import garbage_messages, start_rig

        async def messages() -> int:
            async with trio.open_nursery() as nursery:
                rig = await start_rig(nursery)
                sent = await garbage_messages(rig, logs, seed, count)
                nursery.cancel_scope.cancel()
            return sent

        return trio.run(messages)
    if name == "blkif-responses":
        from tests.test_blkfront import hostile_responses
        return trio.run(hostile_responses, tmp, logs, seed, count)
    if name == "vmbus-messages-from-host":
        from tests.test_vmbus_bus import garbage_from_host, start_rig

        async def from_host() -> int:
            async with trio.open_nursery() as nursery:
                rig = await start_rig(nursery)
                sent = await garbage_from_host(rig, logs, seed, count)
                nursery.cancel_scope.cancel()
            return sent

        return trio.run(from_host)
    if name == "xenstore-requests":
        from tests.test_xenstore import garbage_requests
        return garbage_requests(logs, seed, count)
    if name == "xenstore-replies":
        from tests.test_xenstore import garbage_replies
        return garbage_replies(logs, seed, count)
    if name == "virtio-chains":
        from tests import test_virtio_hostile
        return _given(test_virtio_hostile.test_hostile_descriptor_chains, seed, logs=logs)
    if name == "virtio-used":
        from tests import test_virtio_hostile
        return _given(test_virtio_hostile.test_hostile_used_ring, seed)
    if name == "storvsc-packets":
        from tests.test_storvsp_hostile import hostile_packets
        return hostile_packets(tmp, logs, seed)
    if name == "storvsc-completions":
        from tests.test_storvsc import hostile_completions
        return trio.run(hostile_completions, tmp, logs, seed, count)
    raise KeyError(name)


def run_campaign(name: str, seed: int, count: int) -> dict[str, Any]:
    """Run one campaign in this process (its generators sized by ``count`` through the
    environment, so call this before the test modules are imported)."""
    from tests.conftest import Logs
    os.environ[ENV] = str(count)
    logs = Logs()
    handler = _Collector()
    logging.getLogger().addHandler(handler)
    t0 = time.monotonic()
    failure = None
    cases = 0
    try:
        with tempfile.TemporaryDirectory(prefix="vbusfs-hostile-") as tmp:
            cases = _run(name, seed, count, Path(tmp), logs)
        logs.records = handler.records
        problems = logs.problems()
        if problems:
            failure = "log check: " + "; ".join(problems[:5])
    except BaseException as e:           # the case and the trace are the report
        cases = cases or _EXAMPLES[0]
        notes = "\n".join(getattr(e, "__notes__", []))
        failure = "".join(traceback.format_exception_only(e)).strip() + \
            (("\n" + notes) if notes else "") + "\n" + "".join(traceback.format_tb(
                e.__traceback__)[-3:])
    finally:
        logging.getLogger().removeHandler(handler)
    return {"campaign": name, "transport": CAMPAIGNS[name].transport,
            "direction": CAMPAIGNS[name].direction, "seed": seed, "cases": cases,
            "seconds": round(time.monotonic() - t0, 2), "failure": failure}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.soak_hostile")
    p.add_argument("campaign", choices=sorted(CAMPAIGNS))
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--count", type=int, required=True)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    logging.getLogger().handlers[0].setLevel(logging.CRITICAL)   # the collector judges them
    out = run_campaign(a.campaign, a.seed, a.count)
    print(json.dumps(out), flush=True)
    return 1 if out["failure"] else 0


if __name__ == "__main__":
    sys.exit(main())
