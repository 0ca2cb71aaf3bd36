"""The ``hotreload`` command (also ``python -m publisher``).

``main(argv=None) -> int`` parses, runs and returns the exit code (bad flags exit through
argparse's ``SystemExit(2)``); it is the only place in hotreload that configures logging. Bad
input is one line on stderr, ``hotreload: error: ...``, never a traceback. Exit codes:

== =========================================================================================
0  success (``wait``: every live worker runs the version)
1  ``wait``: a live worker rejected the version (each one's reason is printed)
2  bad flags or input: unknown key or version, malformed URL, invalid key name or prefix;
   and ``wait`` timing out (the workers still behind are named)
3  Redis unreachable or failing (the query commands connect with a 2 s timeout)
== =========================================================================================

The query commands (``history``, ``show``, ``diff``, ``status``, ``wait``) only read; their
queries are in ``publisher.inspect`` and their renderings in ``publisher._format``. ``show``
and ``diff`` refuse a sensitive key's content (exit 2) unless ``--reveal`` is given. A
snapshot key (``watch --snapshot NAME``, a whole ConfigMap) is shown as ``KEY=value`` lines
(``show --raw``: its encoded bytes) and diffed key by key. ``--redis`` may name any node of a
Redis Cluster (``publisher._admin.connect_any``): each key is read from its slot's master and
``status`` without a key lists the keys of every master.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NoReturn

from publisher import _format, inspect
from publisher.publish import DEFAULT_HISTORY
from subscriber._target import resolve_url
from subscriber.defaults import DEFAULT_PREFIX, ENV_URL
from subscriber.errors import HotReloadError
from subscriber.protocol import is_snapshot

if TYPE_CHECKING:
    from publisher._admin import AnyRedis

__all__ = ["main"]

EXIT_OK = 0
EXIT_REJECTED = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 2  # as the issue specifies; "behind" and bad input are both "not done"
EXIT_UNAVAILABLE = 3
CLI_REDIS_TIMEOUT_S = 2.0  # connect and per-command: an unreachable Redis fails in ~2 s
ENV_SIGNING_KEY_FILE = "HOTRELOAD_SIGNING_KEY_FILE"


class _Parser(argparse.ArgumentParser):
    """Bad flags: one ``hotreload: error:`` line instead of argparse's usage block.

    It still exits with ``SystemExit(2)`` from inside ``main`` as argparse does (callers and
    tests of ``watch`` rely on that), so ``sys.exit(main())`` sees 2 either way.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"hotreload: error: {message} (see: {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port number (0-65535; 0 disables)")
    return value


def _seconds_or_zero(text: str) -> float:
    if text.strip() in {"0", "0.0"}:
        return 0.0
    return _seconds(text)


def _sha256_hex(text: str) -> str:
    value = text.strip().lower()
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a hex SHA-256 (64 hex digits)")
    return value


def _file_sha256(path: str) -> str:
    """The hex SHA-256 of the file's bytes: what the publisher puts in the event."""
    from subscriber.protocol import sha256_hex

    try:
        with open(path, "rb") as fh:
            return sha256_hex(fh.read())
    except OSError as exc:
        raise OSError(f"--file {path}: {exc.strerror or exc}") from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be more than 0 seconds")
    return value


def _connection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--redis",
        metavar="URL",
        default=None,
        help=(
            "redis://, rediss://, unix:// or redis+sentinel:// URL; any node of a Redis "
            f"Cluster (default: ${ENV_URL})"
        ),
    )
    parser.add_argument(
        "--prefix", default=DEFAULT_PREFIX, help="Redis key prefix (default: %(default)s)"
    )


def _common(parser: argparse.ArgumentParser) -> None:
    _connection(parser)
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="(default: %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="hotreload",
        description="Hot-reload ConfigMap volume mounts into every worker process via Redis.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    watch = commands.add_parser(
        "watch",
        help="watch mounted config files and publish every change (the per-pod daemon)",
        description="Watch PATHs (ConfigMap mount directories or files) and publish each key's "
        "content to Redis once per distinct content. Runs until SIGTERM or SIGINT.",
    )
    watch.add_argument("paths", nargs="*", metavar="PATH")
    _common(watch)
    watch.add_argument(
        "--history",
        type=_positive_int,
        default=DEFAULT_HISTORY,
        help="versions kept per key (default: %(default)s)",
    )
    watch.add_argument(
        "--metrics-port",
        type=_port,
        default=9102,
        help="port for /metrics, /healthz, /readyz; 0 disables (default: %(default)s)",
    )
    watch.add_argument(
        "--resync-interval",
        type=_seconds,
        default=30.0,
        help="seconds between full re-hashes of the mounted files (default: %(default)s)",
    )
    watch.add_argument(
        "--forget-workers-after",
        type=_seconds_or_zero,
        default=3600.0,
        metavar="SECONDS",
        help="remove workers not heard of for this long from `status` (stopped, killed, of "
        "pods long gone); 0 keeps them (default: %(default)g)",
    )
    watch.add_argument(
        "--signing-key-file",
        metavar="PATH",
        default=None,
        help="sign every event (HMAC-SHA256) with the key in PATH, a mounted Secret re-read "
        f"when it changes; subscribers verify with signing_key= (default: ${ENV_SIGNING_KEY_FILE})",
    )
    watch.add_argument(
        "--sensitive",
        metavar="KEY",
        action="append",
        default=[],
        help="mark KEY's events sensitive: `show`/`diff` need --reveal (repeatable; keys of "
        "a Secret mount, on tmpfs, are marked without it)",
    )
    watch.add_argument(
        "--snapshot",
        metavar="NAME[=DIR]",
        action="append",
        default=[],
        help="also publish a whole directory as ONE key NAME, one event per kubelet swap "
        "(subscribe with snapshot=True); NAME alone means the one directory PATH (whose keys "
        "are still published one by one too); NAME=DIR any directory, PATH or not (repeatable)",
    )
    _add_queries(commands)
    demo = commands.add_parser(
        "demo",
        help="run the whole system on this machine and walk through updates (make demo)",
        description="Start a private Redis, the publisher and the example gunicorn app (4 "
        "workers), walk through a good update, a rejected one, a fix and a killed worker, "
        "then stop everything.",
    )
    demo.add_argument(
        "--example-dir",
        metavar="DIR",
        help="the example app (default: deploy/example of this checkout)",
    )
    return parser


def _demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from publisher.demo import find_example_dir, run_demo

    example = Path(args.example_dir) if args.example_dir else find_example_dir()
    if example is None or not (example / "app.py").exists():
        return _fail(
            "no example app found: run it from a checkout (make demo) or pass --example-dir",
            EXIT_USAGE,
        )
    return run_demo(example)


def _add_queries(commands: argparse._SubParsersAction[_Parser]) -> None:
    def add(name: str, summary: str) -> _Parser:
        parser = commands.add_parser(name, help=summary, description=summary)
        _connection(parser)
        return parser

    history = add("history", "list a key's published versions, newest first")
    history.add_argument("key", metavar="KEY")
    history.add_argument(
        "--limit", type=_positive_int, default=20, help="versions shown (default: %(default)s)"
    )
    history.add_argument("--json", action="store_true", help="machine-readable output")

    show = add("show", "write a version's raw content to stdout")
    show.add_argument("key", metavar="KEY")
    show.add_argument(
        "version", metavar="VERSION", type=_positive_int, nargs="?", help="(default: the newest)"
    )
    show.add_argument("--reveal", action="store_true", help="show it even if it is sensitive")
    show.add_argument(
        "--raw",
        action="store_true",
        help="a snapshot's encoded bytes, not its KEY=value lines (MessagePack, see "
        "subscriber.protocol)",
    )

    diff = add("diff", "unified diff between two versions of a key")
    diff.add_argument("key", metavar="KEY")
    diff.add_argument("old", metavar="V1", type=_positive_int)
    diff.add_argument(
        "new", metavar="V2", type=_positive_int, nargs="?", help="(default: the newest)"
    )
    diff.add_argument("--reveal", action="store_true", help="diff it even if it is sensitive")

    status = add("status", "every worker's version, status and heartbeat; a summary per key")
    status.add_argument("key", metavar="KEY", nargs="?", help="(default: every key)")
    status.add_argument("--json", action="store_true", help="machine-readable output")

    wait = add(
        "wait",
        "exit 0 once every live worker runs the version, 1 as soon as one rejects it, "
        "2 on timeout (with no live worker it keeps waiting: workers may be starting)",
    )
    wait.add_argument("key", metavar="KEY")
    target = wait.add_mutually_exclusive_group()
    target.add_argument(
        "--version",
        type=_positive_int,
        help="(default: the newest now); a version not published yet is waited for",
    )
    target.add_argument(
        "--file",
        metavar="PATH",
        help="the version with this file's content (e.g. the file `kubectl apply` just sent), "
        "waited for until published",
    )
    target.add_argument(
        "--sha256", type=_sha256_hex, help="the version with this content hash (hex)"
    )
    wait.add_argument(
        "--timeout", type=_seconds, default=60.0, help="seconds (default: %(default)s)"
    )


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _snapshots(paths: Sequence[str], given: Sequence[str]) -> dict[str, str]:
    """``--snapshot NAME[=DIR]`` values as name -> directory (``ConfigurationError``)."""
    import os

    from subscriber.errors import ConfigurationError

    snapshots: dict[str, str] = {}
    for value in given:
        name, sep, directory = value.partition("=")
        if not sep:
            dirs = sorted({os.path.abspath(p) for p in paths if os.path.isdir(p)})
            if len(dirs) != 1:
                raise ConfigurationError(
                    f"--snapshot {name}: there are {len(dirs)} directory PATHs, not one; "
                    f"name the directory: --snapshot {name}=DIR"
                )
            directory = dirs[0]
        if name in snapshots:
            raise ConfigurationError(f"--snapshot {name} is given twice")
        snapshots[name] = directory
    return snapshots


def _watch(args: argparse.Namespace) -> int:
    import os

    from publisher.daemon import Daemon

    daemon = Daemon(
        args.paths,
        redis_url=resolve_url(args.redis),
        prefix=args.prefix,
        history=args.history,
        resync_interval=args.resync_interval,
        metrics_port=args.metrics_port,
        forget_workers_after=args.forget_workers_after,
        signing_key_file=args.signing_key_file or os.environ.get(ENV_SIGNING_KEY_FILE) or None,
        sensitive=args.sensitive,
        snapshots=_snapshots(args.paths, args.snapshot),
    )

    def on_signal(signum: int, _frame: object) -> None:
        logging.getLogger(__name__).info("%s received, stopping", signal.Signals(signum).name)
        daemon.request_stop()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        daemon.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return EXIT_OK


def _history(client: AnyRedis, args: argparse.Namespace) -> int:
    rows = inspect.history(client, args.key, prefix=args.prefix, limit=args.limit)
    if args.json:
        print(json.dumps(_format.history_json(rows), indent=2))
    else:
        print("\n".join(_format.history_lines(args.key, rows, _terminal())))
    return EXIT_OK


def _show(client: AnyRedis, args: argparse.Namespace) -> int:
    event = inspect.find_event(
        client, args.key, args.version, prefix=args.prefix, reveal=args.reveal
    )
    if is_snapshot(event.content) and not args.raw:
        lines = _format.snapshot_lines(event.content)
        if lines:
            print("\n".join(lines))
        return EXIT_OK
    sys.stdout.flush()  # raw bytes go under the text layer: keep the order
    sys.stdout.buffer.write(event.content)
    sys.stdout.buffer.flush()
    return EXIT_OK


def _diff(client: AnyRedis, args: argparse.Namespace) -> int:
    old = inspect.find_event(client, args.key, args.old, prefix=args.prefix, reveal=args.reveal)
    new = inspect.find_event(client, args.key, args.new, prefix=args.prefix, reveal=args.reveal)
    lines = _format.diff_lines(args.key, old, new, _terminal())
    if lines:
        print("\n".join(lines))
    return EXIT_OK  # like `git diff`: a difference is an answer, not a failure


def _status(client: AnyRedis, args: argparse.Namespace) -> int:
    report = inspect.status(client, args.key, prefix=args.prefix)
    if args.json:
        print(json.dumps(_format.status_json(report), indent=2))
    else:
        print("\n".join(_format.status_lines(report, _terminal(), args.prefix)))
    return EXIT_OK


def _wait(client: AnyRedis, args: argparse.Namespace) -> int:
    result = inspect.wait_for(
        client,
        args.key,
        args.version,
        sha256=args.sha256,
        prefix=args.prefix,
        timeout=args.timeout,
    )
    print("\n".join(_format.wait_lines(result, args.timeout)))
    if result.timed_out:
        return EXIT_TIMEOUT
    return EXIT_REJECTED if result.convergence.state == "rejected" else EXIT_OK


def _terminal() -> _format.Terminal:
    return _format.Terminal.for_stream(sys.stdout)


_QUERIES: dict[str, Callable[[AnyRedis, argparse.Namespace], int]] = {
    "history": _history,
    "show": _show,
    "diff": _diff,
    "status": _status,
    "wait": _wait,
}


def _query(args: argparse.Namespace) -> int:
    import redis
    from redis.exceptions import RedisClusterException

    from publisher._admin import connect_any
    from subscriber._redis import describe_failure
    from subscriber._target import redacted

    url = resolve_url(args.redis)
    client: AnyRedis | None = None
    try:
        # a Redis Cluster node (any one) gets redis-py's cluster client: see _redis
        client = connect_any(
            url,
            socket_timeout=CLI_REDIS_TIMEOUT_S,
            connect_timeout=CLI_REDIS_TIMEOUT_S,
            client_name="hotreload-cli",
        )
        return _QUERIES[args.command](client, args)
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        reason = describe_failure(exc, url)  # names what to check when TLS failed
        return _fail(f"cannot reach Redis at {redacted(url)}: {reason}", EXIT_UNAVAILABLE)
    except redis.RedisError as exc:
        reason = describe_failure(exc, url)  # a MOVED reply says what to grant
        return _fail(f"Redis at {redacted(url)} failed: {reason}", EXIT_UNAVAILABLE)
    except RedisClusterException as exc:  # not a RedisError: no node reachable, no slot map
        return _fail(f"Redis Cluster at {redacted(url)} failed: {exc}", EXIT_UNAVAILABLE)
    finally:
        if client is not None:
            client.close()


def _discard_stdout() -> None:
    import contextlib
    import os

    # ValueError/UnsupportedOperation: no real descriptor (captured in tests), nothing to fix
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _fail(message: str, code: int) -> int:
    print(f"hotreload: error: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(getattr(args, "log_level", "WARNING"))
    try:
        if args.command == "watch":
            return _watch(args)
        if args.command == "demo":
            return _demo(args)
        if args.command == "wait" and args.file is not None:
            args.sha256 = _file_sha256(args.file)
        return _query(args)
    except HotReloadError as exc:  # bad URL, key, prefix; unknown key or version
        return _fail(str(exc), EXIT_USAGE)
    except BrokenPipeError:
        # `hotreload show KEY | head`: the reader left. Exit quietly as cat does, and keep
        # the interpreter's final flush from failing on the closed pipe.
        _discard_stdout()
        return 128 + signal.SIGPIPE
    except OSError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except KeyboardInterrupt:
        return 130  # Ctrl-C during `wait`: the shell's convention, no traceback


if __name__ == "__main__":
    sys.exit(main())
