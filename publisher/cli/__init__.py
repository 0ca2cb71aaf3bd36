"""The ``hotreload`` command (also ``python -m publisher``).

``main(argv=None) -> int`` parses, runs and returns the exit code (bad flags exit through
argparse's ``SystemExit(2)``); it is the only place in hotreload that configures logging. Bad
input is one line on stderr, ``hotreload: error: ...``, never a traceback; the exit codes are
in :mod:`publisher.cli.exits`.

- :mod:`.parser`: the commands, flags and argument types;
- :mod:`.watch`: ``hotreload watch``, the daemon (needs the ``[publisher]`` extra);
- :mod:`.queries`: ``history``, ``show``, ``diff``, ``status``, ``wait`` (redis + msgspec only);
- :mod:`.demo`: ``hotreload demo``, handing over to ``publisher.demo``;
- :mod:`.check`: ``hotreload check``, the workers' validation run on files (for CI);
- ``console``: ``hotreload console``, a web page (``publisher.console``);
- :mod:`.terminal`, :mod:`.render`, :mod:`.content`: how results are printed.

Each command's module is imported when it runs, so ``watch``'s dependencies (watchdog,
prometheus-client) are loaded by ``watch`` alone.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence

from publisher.cli.exits import EXIT_USAGE, fail
from publisher.cli.parser import build_parser
from subscriber.errors import HotReloadError

__all__ = ["build_parser", "main"]


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _discard_stdout() -> None:
    import contextlib
    import os

    # ValueError/UnsupportedOperation: no real descriptor (captured in tests), nothing to fix
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _run(args: argparse.Namespace) -> int:
    if args.command == "watch":
        from publisher.cli.watch import run_watch

        return run_watch(args)
    if args.command == "check":
        from publisher.cli.check import run_check

        return run_check(args)
    if args.command == "console":
        from publisher.console.command import run_console

        return run_console(args)
    if args.command == "demo":
        from publisher.cli.demo import run_demo_command

        return run_demo_command(args)
    from publisher.cli.queries import run_query

    return run_query(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``hotreload`` with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    args = build_parser().parse_args(argv)
    _configure_logging(getattr(args, "log_level", "WARNING"))
    try:
        return _run(args)
    except HotReloadError as exc:  # bad URL, key, prefix; unknown key or version
        return fail(str(exc), EXIT_USAGE)
    except BrokenPipeError:
        # `hotreload show KEY | head`: the reader left. Exit quietly as cat does, and keep
        # the interpreter's final flush from failing on the closed pipe.
        _discard_stdout()
        return 128 + signal.SIGPIPE
    except OSError as exc:
        return fail(str(exc), EXIT_USAGE)
    except KeyboardInterrupt:
        return 130  # Ctrl-C during `wait`: the shell's convention, no traceback
