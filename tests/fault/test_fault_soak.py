"""The fault scenarios again and again on one pod, in a seeded random order, for
``SOAK_SECONDS`` (``make soak``; never in the default run).

One pod runs throughout (Redis with its AOF, so a restart can keep or lose its data; the daemon
with a 2 s resync, for the inotify overflow; daemon and workers signed, so an old entry can be
replayed with a signature that verifies), so every fault meets whatever the previous ones
left: stale workers, two daemons' entries, a long history. After each fault the pod must have
reconverged and ``Pod.check`` must hold.
"""

from __future__ import annotations

import os
import random
import statistics
import time

import pytest

from tests.fault.conftest import MakePod
from tests.fault.pod import KEY, Pod, rev_of
from tests.fault.results import record
from tests.fault.scenarios import BURST_PAD, SCENARIOS
from tests.stress.run import seed_from_env
from tests.workers.harness import acks

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "300"))
# SOAK_SCENARIOS=two_daemons,redis_sigstop: only those (to reproduce a failure); default all
ONLY = [n for n in os.environ.get("SOAK_SCENARIOS", "").split(",") if n]


def explain(pod: Pod, order: list[str]) -> str:
    """What a failure needs to be read: the faults in order (each with the first revision it
    wrote), the stream (version, revision, publisher) and every worker's acks."""
    lines = [f"seed {seed_from_env()}, faults in order:", *(f"  {o}" for o in order)]
    try:
        lines.append("stream: " + ", ".join(
            f"{i} v{f[b'version'].decode()} rev {rev_of(f[b'content'].decode())} "
            f"{f.get(b'publisher', b'?').decode()}"
            for i, f in pod.stream()
        ))  # fmt: skip
        by_worker: dict[str, list[str]] = {}
        for a in acks(pod.redis.url, KEY):
            by_worker.setdefault(a.worker, []).append(
                f"{a.entry_id} v{a.version} {a.status}{' unchanged' if a.unchanged else ''}"
                f"{' ' + a.error[:60] if a.error else ''}"
            )
        lines += [f"acks {w}: {' | '.join(rows[-40:])}" for w, rows in by_worker.items()]
    except Exception as exc:  # Redis may be what failed
        lines.append(f"(stream/acks unreadable: {exc!r})")
    lines.append(pod.diagnose())
    return "\n".join(lines)


@pytest.mark.soak
@pytest.mark.timeout(int(SOAK_SECONDS) + 600)
def test_fault_soak(make_pod: MakePod) -> None:
    seed = seed_from_env()
    rng = random.Random(seed)
    pod = make_pod(
        appendonly=True, signed=True, daemon_args=("--resync-interval", "2"), size=BURST_PAD // 8
    )
    deadline = time.monotonic() + SOAK_SECONDS
    times: dict[str, list[float]] = {}
    order: list[str] = []
    while time.monotonic() < deadline:
        name = rng.choice(sorted(ONLY or SCENARIOS))
        order.append(f"{name} (from rev {pod.rev + 1}, {time.strftime('%H:%M:%S')})")
        try:
            outcome = SCENARIOS[name](pod)
            times.setdefault(name, []).extend(outcome.reconverge_s)
            pod.check()
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{explain(pod, order)}") from None
        if len(pod.live_workers()) < 6:  # keep six running
            pod.spawn(6 - len(pod.live_workers()))
    counts = pod.check()
    record(
        "fault_soak",
        f"seed-{seed}-{SOAK_SECONDS:g}s",
        {
            "seed": seed,
            "seconds": SOAK_SECONDS,
            "faults": len(order),
            "workers_started": len(pod.workers),
            "per_fault": {
                name: {
                    "runs": len(values),
                    "reconverge_max_s": round(max(values), 3),
                    "reconverge_median_s": round(statistics.median(values), 3),
                }
                for name, values in sorted(times.items())
            },
            **counts,
        },
    )
