"""``hotreload console``: connect (exit 3 when Redis cannot be reached), listen (exit 2 when
the host or port cannot be used), print the URL and serve until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from types import FrameType

from publisher.cli.exits import EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE, fail
from publisher.console.model import Model
from publisher.console.server import Console, is_loopback
from subscriber._target import redacted, resolve_url

__all__ = ["CONSOLE_REDIS_TIMEOUT_S", "run_console"]

CONSOLE_REDIS_TIMEOUT_S = 2.0  # connect and per-command, as the query commands


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(EXIT_OK)


def run_console(args: argparse.Namespace) -> int:
    import redis
    from redis.exceptions import RedisClusterException

    from publisher._admin import connect_any
    from publisher.cli.queries import signing_key_of
    from subscriber._redis import describe_failure

    signing_key = signing_key_of(args)
    url = resolve_url(args.redis)  # a malformed URL: ConfigurationError, exit 2
    try:
        client = connect_any(
            url,
            socket_timeout=CONSOLE_REDIS_TIMEOUT_S,
            connect_timeout=CONSOLE_REDIS_TIMEOUT_S,
            client_name="hotreload-console",
        )
        client.ping()
    except (redis.RedisError, RedisClusterException) as exc:
        reason = describe_failure(exc, url)
        return fail(f"cannot reach Redis at {redacted(url)}: {reason}", EXIT_UNAVAILABLE)
    try:
        model = Model(
            client,
            prefix=args.prefix,
            reveal=args.reveal,
            signing_key=signing_key,
            redis_label=redacted(url),
        )
        try:
            console = Console(model, host=args.host, port=args.port, interval=args.interval)
        except (OSError, OverflowError) as exc:  # no such address, port taken, not ours
            reason = getattr(exc, "strerror", None) or str(exc)
            return fail(f"cannot listen on {args.host} port {args.port}: {reason}", EXIT_USAGE)
        if not is_loopback(args.host):
            print(
                f"hotreload console: listening on {args.host}, not loopback: anyone who can "
                "reach it sees every key's workers and errors (there is no login)",
                file=sys.stderr,
            )
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _stop)
        print(f"hotreload console: {console.url} (read-only; Ctrl-C stops)", flush=True)
        try:
            console.serve_forever()
        finally:
            console.close()
        return EXIT_OK
    finally:
        client.close()
