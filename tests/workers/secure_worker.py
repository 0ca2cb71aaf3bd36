"""A worker process for the security tests: one Subscriber (or AsyncSubscriber), DEBUG logs.

    python -m tests.workers.secure_worker --url URL --key KEY --out FILE [options]

Every line of ``FILE`` is a JSON object with an ``event``; content itself is never recorded
(only its hash and size), so the tests can search every file a worker writes for a secret:

- ``applied``: the callback accepted content (``sha256``, ``size``)
- ``started``: ``start()`` returned (``version``, ``sha256``, ``status``)
- ``failed``: ``start()`` raised (``type``, ``error``); the process exits with status 3

``--signing-key-file`` (repeatable: a rotation) gives the subscriber its keys. Content
containing ``--reject`` is refused; with ``--echo`` the refusal quotes the content, as a
careless validator would, to prove that a sensitive entry's rejection text is scrubbed.
Logging (every logger, DEBUG) goes to ``FILE.log``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
from pathlib import Path
from typing import Any

from subscriber import AsyncSubscriber, HotReloadError, Subscriber
from tests.workers.journal import Journal, block_stop_signals, wait_for_stop, wait_for_stop_async


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--signing-key-file", action="append", default=[])
    parser.add_argument("--aio", action="store_true")
    parser.add_argument("--reject", default="REJECT")
    parser.add_argument("--echo", action="store_true")
    parser.add_argument("--start-timeout", type=float, default=5.0)
    args = parser.parse_args()

    record = Journal(args.out, logging.DEBUG)

    def apply(text: str) -> None:
        if args.reject in text:
            detail = f": {text!r}" if args.echo else ""
            raise ValueError(f"refusing content marked {args.reject}{detail}")
        data = text.encode()
        record("applied", sha256=hashlib.sha256(data).hexdigest(), size=len(data))

    keys = [Path(path).read_bytes() for path in args.signing_key_file]
    options: dict[str, Any] = {
        "redis_url": args.url,
        "start_timeout": args.start_timeout,
        "block_ms": 500,
        "heartbeat_interval": 1.0,
        "signing_key": keys or None,
    }
    block_stop_signals()
    if args.aio:
        return asyncio.run(_run_async(args.key, apply, options, record))
    subscriber = Subscriber(args.key, apply, **options)
    try:
        subscriber.start()
    except HotReloadError as exc:
        record("failed", type=type(exc).__name__, error=str(exc))
        return 3
    record("started", version=subscriber.version, sha256=subscriber.last_hash, status="ok")
    wait_for_stop()
    subscriber.stop()
    return 0


async def _run_async(key: str, apply: Any, options: dict[str, Any], record: Any) -> int:
    subscriber = AsyncSubscriber(key, apply, **options)
    try:
        await subscriber.start()
    except HotReloadError as exc:
        record("failed", type=type(exc).__name__, error=str(exc))
        return 3
    record("started", version=subscriber.version, sha256=subscriber.last_hash, status="ok")
    await wait_for_stop_async()
    await subscriber.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
