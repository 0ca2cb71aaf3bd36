"""The ``hotreload`` argument parser: its commands, flags and argument types.

Argument types reject bad values with what is wrong (``'x' is not a whole number``), and a
bad flag is one ``hotreload: error:`` line, not argparse's usage block. Building the parser
imports no command: ``hotreload --help`` and the query commands load neither watchdog nor
prometheus_client.
"""

from __future__ import annotations

import argparse
from typing import NoReturn

from publisher.cli.exits import EXIT_USAGE
from publisher.publish import DEFAULT_HISTORY
from subscriber.defaults import DEFAULT_FORGET_WORKERS_AFTER, DEFAULT_PREFIX, ENV_URL

__all__ = ["ENV_SIGNING_KEY_FILE", "build_parser"]

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


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be more than 0 seconds")
    return value


def _canary(text: str) -> str:
    from publisher._rolloutwire import parse_canary

    try:
        parse_canary(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


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
        "--redis-password-file",
        metavar="PATH",
        default=None,
        help=(
            "read the Redis user's password from this file (a mounted Secret's key), not from "
            "the URL (default: $HOTRELOAD_REDIS_PASSWORD_FILE for a URL without a password)"
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
        default=DEFAULT_FORGET_WORKERS_AFTER,
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
    watch.add_argument(
        "--canary",
        metavar="N|P%",
        type=_canary,
        default=None,
        help="publish each new content first to N live workers (or P %% of them, at least "
        "one), promote it to everyone once each applied it and survived --canary-hold, halt "
        "it (back to the previous content) if one rejects it, dies or goes stale before; "
        "default: every content to everyone at once",
    )
    watch.add_argument(
        "--canary-hold",
        type=_seconds,
        default=30.0,
        metavar="SECONDS",
        help="how long each canary worker must survive the new content (default: %(default)g)",
    )
    _add_queries(commands)
    _add_control(commands)
    _add_check(commands)
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


def _add_queries(commands: argparse._SubParsersAction[_Parser]) -> None:
    def add(name: str, summary: str) -> _Parser:
        parser = commands.add_parser(name, help=summary, description=summary)
        _connection(parser)
        parser.add_argument(
            "--signing-key-file",
            metavar="PATH",
            default=None,
            help="verify entries with the key in PATH (the one `watch` signs with): the newest "
            "is the highest version that verifies, `history` marks the others, `status` and "
            f"`wait` ignore them (default: ${ENV_SIGNING_KEY_FILE})",
        )
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
    status.add_argument(
        "--all",
        "--verbose",
        action="store_true",
        help="a row for every gone (stopped) worker too, not only their count",
    )

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

    from publisher.console.options import add_console_arguments  # argparse alone

    add_console_arguments(add("console", "a local, read-only web page of keys and workers, live"))


def _add_control(commands: argparse._SubParsersAction[_Parser]) -> None:
    summaries = {
        "rollback": "run an earlier content on every worker now, and pin it: the content "
        "rolled back from is not published again while a mount still shows it",
        "promote": "end a running canary now: its content for everyone",
        "halt": "end a running canary now: every worker back on the previous content, the "
        "canary content published no further",
    }
    for name, summary in summaries.items():
        parser = commands.add_parser(
            name,
            help=summary,
            description=summary + ". Carried out by the `hotreload watch` daemon (it holds "
            "the signing key): exit 0 done, 1 refused (the message says why), 2 bad input or "
            "no daemon answered within --timeout, 3 Redis unreachable.",
        )
        _connection(parser)
        parser.add_argument("key", metavar="KEY")
        if name == "rollback":
            parser.add_argument(
                "--to",
                type=_positive_int,
                default=0,
                metavar="VERSION",
                help="the version whose content to run (default: the content before the "
                "current one)",
            )
        parser.add_argument(
            "--timeout", type=_seconds, default=10.0, help="seconds (default: %(default)g)"
        )


def _add_check(commands: argparse._SubParsersAction[_Parser]) -> None:
    check = commands.add_parser(
        "check",
        help="run the workers' validation on config files before they are applied (for CI)",
        description="Run what a worker runs on each FILE: exit 0 if every one is accepted, 1 "
        "if any is rejected (with the error a worker would report), 2 on bad input. MODULE is "
        "imported from the current directory too.",
    )
    check.add_argument("files", nargs="+", metavar="FILE")
    how = check.add_mutually_exclusive_group(required=True)
    how.add_argument(
        "--validator", metavar="MODULE:CALLABLE", help="the workers' callback (app:limits.apply)"
    )
    how.add_argument(
        "--type",
        dest="type_spec",
        metavar="MODULE:TYPE",
        help="the type a typed_subscriber decodes into (app:RateLimits)",
    )
    check.add_argument(
        "--format",
        choices=["yaml", "json", "toml"],
        help="with --type (default: from the file's extension)",
    )
    check.add_argument(
        "--snapshot",
        action="store_true",
        help="each FILE is a directory checked as one snapshot (subscribers with snapshot=True)",
    )
    check.add_argument(
        "--bytes", action="store_true", help="the callback takes bytes (Subscriber decode=False)"
    )
    check.add_argument(
        "--sensitive", action="store_true", help="redact the error as for a --sensitive key"
    )
    check.add_argument("--json", action="store_true", help="machine-readable output")
