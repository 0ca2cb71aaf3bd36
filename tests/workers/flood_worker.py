"""A worker process with several Subscribers on one key, for what hostile entries cost it.

    python -m tests.workers.flood_worker --url URL --key KEY --subscribers 4 --wait-version N

Starts ``--subscribers`` threaded Subscribers on ``KEY`` (each replays the newest version),
prints ``ready`` on stdout, then waits until every one of them runs version ``--wait-version``
(the test appends the junk, then that genuine version, meanwhile) and prints one JSON line:
``seconds`` from ready until all ran it, the process's ``cpu_s`` (user + system) over that
time, its peak RSS before (``rss_ready_kib``) and after (``rss_peak_kib``), and how many
WARNING lines the subscribers logged (``warnings``). Used by tests/test_subscribers.py
(bounded memory and CPU for an oversized entry and a flood) and to measure them by hand.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time

from subscriber import Subscriber


class _Count(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--subscribers", type=int, default=4)
    parser.add_argument("--wait-version", type=int, required=True)
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()

    log = logging.getLogger("flood")
    log.propagate = False
    counter = _Count()
    log.addHandler(counter)
    subs = [
        Subscriber(
            args.key,
            lambda _text: None,
            redis_url=args.url,
            worker_id=f"flood:{n}",
            logger=log,
            block_ms=500,
        ).start()
        for n in range(args.subscribers)
    ]
    rss_ready = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cpu_ready, began = _cpu(), time.monotonic()
    print("ready", flush=True)
    deadline = began + args.timeout
    while any(sub.version < args.wait_version for sub in subs):
        if time.monotonic() > deadline:
            print(json.dumps({"timeout": [sub.version for sub in subs]}), flush=True)
            return 1
        time.sleep(0.01)
    seconds = time.monotonic() - began
    cpu = _cpu() - cpu_ready
    for sub in subs:
        sub.stop()
    result = {
        "seconds": round(seconds, 2),
        "cpu_s": round(cpu, 2),
        "rss_ready_kib": rss_ready,
        "rss_peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "warnings": counter.count,
        "error_counts": [sub.error_count for sub in subs],
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
