"""A worker following several config keys, with a validator, recording every decision.

    python -m tests.workers.stress_worker --url URL --keys a.yaml,b.json --out FILE [options]

One ``Subscriber`` per key (``--async``: one ``AsyncSubscriber`` per key, in one event loop).
The validator refuses content containing ``--invalid`` (default
``INVALID``), as an app's validation would. Every line of ``FILE`` is a JSON object:

- ``applied``: ``key``, ``seq`` (the content's ``seq:`` line), ``sha256`` of the content the
  callback accepted, and ``intact``: whether the content's own ``check:`` line (a SHA-256 of
  the lines above it, written by the test) matches -- content torn or altered on its way would
  not be intact
- ``refused``: ``key``, ``sha256``: the validator refused it
- ``started``: ``key``, ``version``, ``sha256``, ``status`` once that key's ``start()`` returned
- ``failed``: ``start()`` raised (``key``, ``type``, ``error``); the process exits with status 3
- ``stopped``: SIGTERM/SIGINT arrived and every subscriber stopped (``stop_s``)

Logging goes to ``FILE.log``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import time
from collections.abc import Callable
from typing import Any

from subscriber import AsyncSubscriber, HotReloadError, Subscriber
from tests.workers.journal import Journal, block_stop_signals, wait_for_stop, wait_for_stop_async


def parse(text: str) -> tuple[int, bool]:
    """The content's ``seq`` and whether its ``check:`` line matches the rest."""
    body, _, check = text.rpartition("check: ")
    seq = -1
    for line in body.splitlines():
        if line.startswith("seq: "):
            try:
                seq = int(line.removeprefix("seq: "))
            except ValueError:
                seq = -1
            break
    intact = hashlib.sha256(body.encode()).hexdigest() == check.strip()
    return seq, intact


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--keys", required=True, help="comma-separated config keys")
    parser.add_argument("--out", required=True)
    parser.add_argument("--invalid", default="INVALID")
    parser.add_argument("--block-ms", type=int, default=500)
    parser.add_argument("--heartbeat", type=float, default=1.0)
    parser.add_argument("--start-timeout", type=float, default=20.0)
    parser.add_argument("--resync-interval", type=float, default=5.0)
    parser.add_argument("--async", dest="use_async", action="store_true", help="AsyncSubscriber")
    args = parser.parse_args()

    record = Journal(args.out)

    def validator(key: str) -> Callable[[str], None]:
        def apply(text: str) -> None:
            digest = hashlib.sha256(text.encode()).hexdigest()
            if args.invalid in text:
                record("refused", key=key, sha256=digest)
                raise ValueError(f"refusing content marked {args.invalid}")
            seq, intact = parse(text)
            record("applied", key=key, seq=seq, sha256=digest, intact=intact)

        return apply

    block_stop_signals()
    settings: dict[str, Any] = {
        "redis_url": args.url,
        "start_timeout": args.start_timeout,
        "block_ms": args.block_ms,
        "heartbeat_interval": args.heartbeat,
        "resync_interval": args.resync_interval,
    }
    keys = args.keys.split(",")
    if args.use_async:
        return asyncio.run(follow_async(keys, validator, settings, record))
    subscribers = [Subscriber(key, validator(key), **settings) for key in keys]
    for sub in subscribers:
        try:
            sub.start()
        except HotReloadError as exc:
            record("failed", key=sub.key, type=type(exc).__name__, error=str(exc))
            return 3
        record("started", key=sub.key, version=sub.version, sha256=sub.last_hash, status=sub.status)
    wait_for_stop()
    began = time.perf_counter()
    for sub in subscribers:
        sub.stop()
    record("stopped", stop_s=time.perf_counter() - began)
    return 0


async def follow_async(
    keys: list[str],
    validator: Callable[[str], Callable[[str], None]],
    settings: dict[str, Any],
    record: Callable[..., None],
) -> int:
    """The same with one ``AsyncSubscriber`` per key in one event loop (``--async``)."""
    subscribers = [AsyncSubscriber(key, validator(key), **settings) for key in keys]
    for sub in subscribers:
        try:
            await sub.start()
        except HotReloadError as exc:
            record("failed", key=sub.key, type=type(exc).__name__, error=str(exc))
            return 3
        record("started", key=sub.key, version=sub.version, sha256=sub.last_hash, status=sub.status)
    await wait_for_stop_async()
    began = time.perf_counter()
    for sub in subscribers:
        await sub.stop()
    record("stopped", stop_s=time.perf_counter() - began)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
