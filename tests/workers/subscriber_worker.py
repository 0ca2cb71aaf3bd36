"""A stand-in for an app worker process: runs one Subscriber and records what it applies.

    python -m tests.workers.subscriber_worker --url URL --key KEY --out FILE [options]

Every line of ``FILE`` is a JSON object with an ``event``:

- ``applied``: the callback accepted ``text`` (its ``sha256`` too)
- ``started``: ``start()`` returned (``version``, ``sha256``, ``status``, ``start_s``)
- ``failed``: ``start()`` raised (``type``, ``error``); the process exits with status 3
- ``stopped``: SIGTERM/SIGINT arrived and ``stop()`` returned after ``stop_s`` seconds

Content containing the ``--reject`` marker is refused by the callback, as an app's
validation would. ``--signing-key-file`` (repeatable) gives the subscriber its signing keys.
``--async`` runs an ``AsyncSubscriber`` in an asyncio loop instead of the
threaded ``Subscriber``, with the same records. Logging goes to ``FILE.log``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from subscriber import AsyncSubscriber, HotReloadError, Subscriber
from tests.workers.journal import Journal, block_stop_signals, wait_for_stop, wait_for_stop_async


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--reject", default="REJECT")
    parser.add_argument("--fallback", default=None)
    parser.add_argument("--block-ms", type=int, default=1000)
    parser.add_argument("--heartbeat", type=float, default=1.0)
    parser.add_argument("--start-timeout", type=float, default=10.0)
    parser.add_argument("--resync-interval", type=float, default=60.0)
    parser.add_argument("--signing-key-file", action="append", default=[])
    parser.add_argument("--async", dest="use_async", action="store_true", help="AsyncSubscriber")
    args = parser.parse_args()

    record = Journal(args.out)

    def apply(text: str) -> None:
        if args.reject in text:
            raise ValueError(f"refusing content marked {args.reject}")
        record("applied", text=text, sha256=hashlib.sha256(text.encode()).hexdigest())

    block_stop_signals()

    settings: dict[str, Any] = {
        "redis_url": args.url,
        "fallback_path": args.fallback,
        "start_timeout": args.start_timeout,
        "block_ms": args.block_ms,
        "heartbeat_interval": args.heartbeat,
        "resync_interval": args.resync_interval,
        "signing_key": [Path(path).read_bytes() for path in args.signing_key_file] or None,
    }
    if args.use_async:
        return asyncio.run(follow_async(AsyncSubscriber(args.key, apply, **settings), record))
    subscriber = Subscriber(args.key, apply, **settings)
    started = time.perf_counter()
    try:
        subscriber.start()
    except HotReloadError as exc:
        record("failed", type=type(exc).__name__, error=str(exc))
        return 3
    record(
        "started",
        version=subscriber.version,
        sha256=subscriber.last_hash,
        status=subscriber.status,
        start_s=time.perf_counter() - started,
    )
    wait_for_stop()
    began = time.perf_counter()
    subscriber.stop()
    record("stopped", stop_s=time.perf_counter() - began)
    return 0


async def follow_async(subscriber: AsyncSubscriber, record: Callable[..., None]) -> int:
    """The same with an ``AsyncSubscriber`` (``--async``): the callback runs in the loop."""
    started = time.perf_counter()
    try:
        await subscriber.start()
    except HotReloadError as exc:
        record("failed", type=type(exc).__name__, error=str(exc))
        return 3
    record(
        "started",
        version=subscriber.version,
        sha256=subscriber.last_hash,
        status=subscriber.status,
        start_s=time.perf_counter() - started,
    )
    await wait_for_stop_async()
    began = time.perf_counter()
    await subscriber.stop()
    record("stopped", stop_s=time.perf_counter() - began)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
