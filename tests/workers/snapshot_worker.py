"""A stand-in app worker following a snapshot key: records every whole map it applies.

    python -m tests.workers.snapshot_worker --url URL --key NAME --out FILE [--async]

Every line of ``FILE`` is a JSON object with an ``event``:

- ``applied``: the callback accepted ``files`` (the whole key -> value map, as given)
- ``started``: ``start()`` returned (``version``, ``status``)
- ``failed``: ``start()`` raised (``type``, ``error``); the process exits with status 3

A map holding a value equal to ``--reject`` is refused by the callback. ``--async`` runs an
``AsyncSubscriber`` instead of the threaded ``Subscriber``. Logging goes to ``FILE.log``.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from subscriber import AsyncSubscriber, HotReloadError, Subscriber
from tests.workers.journal import Journal, block_stop_signals, wait_for_stop, wait_for_stop_async


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--reject", default="REJECT")
    parser.add_argument("--async", dest="use_async", action="store_true")
    args = parser.parse_args()

    record = Journal(args.out)

    def apply(files: dict[str, str]) -> None:
        if not isinstance(files, dict):
            raise TypeError(f"expected a dict, got {type(files).__name__}")
        if args.reject in files.values():
            raise ValueError(f"refusing a map holding {args.reject}")
        record("applied", files=files)

    block_stop_signals()
    settings: dict[str, Any] = {
        "redis_url": args.url,
        "snapshot": True,
        "block_ms": 1000,
        "heartbeat_interval": 1.0,
    }
    if args.use_async:
        return asyncio.run(follow_async(AsyncSubscriber(args.key, apply, **settings), record))
    subscriber = Subscriber(args.key, apply, **settings)
    try:
        subscriber.start()
    except HotReloadError as exc:
        record("failed", type=type(exc).__name__, error=str(exc))
        return 3
    record("started", version=subscriber.version, status=subscriber.status)
    wait_for_stop()
    subscriber.stop()
    return 0


async def follow_async(subscriber: AsyncSubscriber, record: Any) -> int:
    try:
        await subscriber.start()
    except HotReloadError as exc:
        record("failed", type=type(exc).__name__, error=str(exc))
        return 3
    record("started", version=subscriber.version, status=subscriber.status)
    await wait_for_stop_async()
    await subscriber.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
