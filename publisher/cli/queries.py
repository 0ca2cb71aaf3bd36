"""The read-only commands: ``history``, ``show``, ``diff``, ``status``, ``wait``.

Each connects once (:func:`run_query`, a 2 s connect and command timeout, so an unreachable
Redis fails fast with exit 3), asks ``publisher.inspect`` and prints a rendering. ``show`` and
``diff`` refuse a sensitive key's content (exit 2) unless ``--reveal`` is given. A snapshot key
(``watch --snapshot NAME``, a whole ConfigMap) is shown as ``KEY=value`` lines (``show --raw``:
its encoded bytes) and diffed key by key. ``--redis`` may name any node of a Redis Cluster
(``subscriber._redis.connect_any``): each key is read from its slot's master and ``status``
without a key lists the keys of every master.

Only redis and msgspec are needed here: these commands work where the worker's dependencies
alone are installed (an operator's laptop, a worker's container).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from publisher._printable import printable
from publisher.cli.content import diff_lines, snapshot_lines
from publisher.cli.control import request_control
from publisher.cli.exits import EXIT_OK, EXIT_REJECTED, EXIT_TIMEOUT, EXIT_UNAVAILABLE, fail
from publisher.cli.parser import ENV_SIGNING_KEY_FILE
from publisher.cli.render import history_json, history_lines, status_json, status_lines, wait_lines
from publisher.cli.terminal import Terminal
from publisher.inspect import find_event, history, status, wait_for
from subscriber._target import resolve_url
from subscriber.errors import ConfigurationError
from subscriber.protocol import is_snapshot, sha256_hex
from subscriber.protocol import signing_key as normalized_key

if TYPE_CHECKING:
    from publisher._admin import AnyRedis

__all__ = ["QUERIES", "file_sha256", "run_query"]

CLI_REDIS_TIMEOUT_S = 2.0  # connect and per-command: an unreachable Redis fails in ~2 s


def file_sha256(path: str) -> str:
    """The hex SHA-256 of the file's bytes (``wait --file``): what the publisher puts in the
    event. An unreadable file is an ``OSError`` naming the flag."""
    try:
        with open(path, "rb") as fh:
            return sha256_hex(fh.read())
    except OSError as exc:
        raise OSError(f"--file {path}: {exc.strerror or exc}") from None


def signing_key_of(args: argparse.Namespace) -> bytes | None:
    """The normalized key of ``--signing-key-file`` (or ``$HOTRELOAD_SIGNING_KEY_FILE``),
    ``None`` without either; an unreadable or too short key is a ``ConfigurationError``
    naming it (exit 2)."""
    path = getattr(args, "signing_key_file", None) or os.environ.get(ENV_SIGNING_KEY_FILE)
    if not path:
        return None
    try:
        with open(path, "rb") as fh:
            return normalized_key(fh.read())
    except OSError as exc:
        message = f"--signing-key-file: cannot read {path}: {exc.strerror or exc}"
        raise ConfigurationError(message) from None
    except ValueError as exc:
        raise ConfigurationError(f"--signing-key-file {path}: {exc}") from None


def _terminal() -> Terminal:
    return Terminal.for_stream(sys.stdout)


def _history(client: AnyRedis, args: argparse.Namespace) -> int:
    rows = history(
        client, args.key, prefix=args.prefix, limit=args.limit, signing_key=args.signing_key
    )
    if args.json:
        print(json.dumps(history_json(rows), indent=2))
    else:
        print("\n".join(history_lines(args.key, rows, _terminal())))
    return EXIT_OK


def _show(client: AnyRedis, args: argparse.Namespace) -> int:
    event = find_event(
        client,
        args.key,
        args.version,
        prefix=args.prefix,
        reveal=args.reveal,
        signing_key=args.signing_key,
    )
    if is_snapshot(event.content) and not args.raw:
        lines = snapshot_lines(event.content, terminal=sys.stdout.isatty())
        if lines:
            print("\n".join(lines))
        return EXIT_OK
    sys.stdout.flush()  # raw bytes go under the text layer: keep the order
    sys.stdout.buffer.write(event.content)
    sys.stdout.buffer.flush()
    return EXIT_OK


def _diff(client: AnyRedis, args: argparse.Namespace) -> int:
    found = [
        find_event(
            client,
            args.key,
            version,
            prefix=args.prefix,
            reveal=args.reveal,
            signing_key=args.signing_key,
        )
        for version in (args.old, args.new)
    ]
    old, new = found
    lines = diff_lines(args.key, old, new, _terminal())
    if lines:
        print("\n".join(lines))
    return EXIT_OK  # like `git diff`: a difference is an answer, not a failure


def _status(client: AnyRedis, args: argparse.Namespace) -> int:
    report = status(
        client, args.key, prefix=args.prefix, signing_key=args.signing_key, check_memory=True
    )
    if args.json:
        print(json.dumps(status_json(report), indent=2))
    else:
        print("\n".join(status_lines(report, _terminal(), args.prefix, all_workers=args.all)))
    code = EXIT_OK
    for key, reason in report.unreadable:  # the other keys were reported all the same
        code = fail(f"{key} cannot be read: {printable(reason)}", EXIT_UNAVAILABLE)
    return code


def _wait(client: AnyRedis, args: argparse.Namespace) -> int:
    result = wait_for(
        client,
        args.key,
        args.version,
        sha256=args.sha256,
        prefix=args.prefix,
        timeout=args.timeout,
        signing_key=args.signing_key,
    )
    print("\n".join(wait_lines(result, args.timeout)))
    if result.timed_out:
        return EXIT_TIMEOUT
    seen = result.convergence
    rejected = result.halted or seen.state == "rejected" or seen.failed
    return EXIT_REJECTED if rejected else EXIT_OK


QUERIES: dict[str, Callable[[AnyRedis, argparse.Namespace], int]] = {
    "history": _history,
    "show": _show,
    "diff": _diff,
    "status": _status,
    "wait": _wait,
    "rollback": request_control,
    "promote": request_control,
    "halt": request_control,
}


def run_query(args: argparse.Namespace) -> int:
    """Connect to ``--redis`` and run ``args.command``; Redis failures are exit 3."""
    import redis
    from redis.exceptions import RedisClusterException

    from publisher._admin import connect_any
    from subscriber._redis import describe_failure
    from subscriber._target import redacted

    if args.command == "wait" and args.file is not None:
        args.sha256 = file_sha256(args.file)
    args.signing_key = signing_key_of(args) if hasattr(args, "signing_key_file") else None
    url = resolve_url(args.redis, getattr(args, "redis_password_file", None))
    client: AnyRedis | None = None
    try:
        # a Redis Cluster node (any one) gets redis-py's cluster client: see _redis
        client = connect_any(
            url,
            socket_timeout=CLI_REDIS_TIMEOUT_S,
            connect_timeout=CLI_REDIS_TIMEOUT_S,
            client_name="hotreload-cli",
        )
        return QUERIES[args.command](client, args)
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        reason = describe_failure(exc, url)  # names what to check when TLS failed
        return fail(f"cannot reach Redis at {redacted(url)}: {reason}", EXIT_UNAVAILABLE)
    except redis.RedisError as exc:
        reason = describe_failure(exc, url)  # a MOVED reply says what to grant
        return fail(f"Redis at {redacted(url)} failed: {reason}", EXIT_UNAVAILABLE)
    except RedisClusterException as exc:  # not a RedisError: no node reachable, no slot map
        return fail(f"Redis Cluster at {redacted(url)} failed: {exc}", EXIT_UNAVAILABLE)
    finally:
        if client is not None:
            client.close()
