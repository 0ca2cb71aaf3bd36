"""``hotreload check FILE...``: the workers' validation, run on files before they are applied.

For CI, before ``kubectl apply``: each FILE (or, with ``--snapshot``, each ConfigMap
directory) goes through what a worker would run -- ``--validator MODULE:CALLABLE`` (the
worker's callback, e.g. ``app:rate_limits.apply``) or ``--type MODULE:TYPE`` (a
``typed_subscriber``'s type, in ``--format`` or the one the file's extension says) -- and is
printed ``accepted`` or ``rejected: <the error a worker would write in :acks>``
(:mod:`subscriber.check` runs the worker's own code for both).

Exit codes: 0 every file accepted, 1 any rejected, 2 bad input (a file that cannot be read,
a module that does not import, a name that is not there or not callable, a format that
cannot be told) -- one line, no traceback, and nothing is checked then. ``MODULE`` is
imported with the current directory on ``sys.path`` (as gunicorn and uvicorn do), so
``hotreload check app.yaml --validator app:limits.apply`` works from the app's directory, and
with ``$HOTRELOAD_REDIS_URL`` set to a placeholder when it is unset: an app creates its
subscribers at import, which takes a URL but connects nowhere, and a CI job has no Redis.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

from publisher._mount import read_mount
from publisher._printable import printable
from publisher.cli.exits import EXIT_OK, EXIT_REJECTED, EXIT_USAGE, fail
from subscriber.check import load_object, rejection, typed_callback
from subscriber.defaults import ENV_URL
from subscriber.errors import ConfigurationError
from subscriber.protocol import encode_snapshot
from subscriber.typed import Format, format_for_key

__all__ = ["PLACEHOLDER_URL", "run_check"]

PLACEHOLDER_URL = "unix:///nonexistent/hotreload-check.sock"


def _read(path: str, *, snapshot: bool) -> bytes:
    """The content a publisher would publish for ``path``; ``ConfigurationError`` if none."""
    try:
        if not snapshot:
            with open(path, "rb") as fh:
                return fh.read()
        if not os.path.isdir(path):
            raise ConfigurationError(f"{path}: --snapshot takes a directory (a ConfigMap)")
        mount = read_mount(path, None, ())
    except OSError as exc:
        raise ConfigurationError(f"cannot read {path}: {exc.strerror or exc}") from None
    if mount.unreadable:
        name, problem = next(iter(mount.unreadable.items()))
        raise ConfigurationError(f"cannot read {os.path.join(path, name)}: {problem}")
    return encode_snapshot(mount.files)


def _callback(args: argparse.Namespace, path: str) -> Callable[[Any], object]:
    if args.validator is not None:
        found = load_object(args.validator)
        if not callable(found):
            raise ConfigurationError(f"{args.validator!r} is {type(found).__name__}, not callable")
        return found  # type: ignore[no-any-return]
    fmt: Format = "snapshot" if args.snapshot else (args.format or format_for_key(path))
    return typed_callback(load_object(args.type_spec), fmt)


@contextlib.contextmanager
def _placeholder_url() -> Iterator[None]:
    """An app creates its subscribers at import, which takes a Redis URL but connects
    nowhere, and a CI job has no Redis: while the app imports, an unset
    ``$HOTRELOAD_REDIS_URL`` is a placeholder (check never starts a subscriber)."""
    if os.environ.get(ENV_URL):
        yield
        return
    os.environ[ENV_URL] = PLACEHOLDER_URL
    try:
        yield
    finally:
        os.environ.pop(ENV_URL, None)


def run_check(args: argparse.Namespace) -> int:
    if args.format is not None and args.type_spec is None:
        return fail("--format goes with --type (a validator reads the content itself)", EXIT_USAGE)
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        with _placeholder_url():  # everything loaded first: bad input checks nothing
            jobs = [(path, _read(path, snapshot=args.snapshot), _callback(args, path))
                    for path in args.files]  # fmt: skip
    except ConfigurationError as exc:
        return fail(str(exc), EXIT_USAGE)
    results: list[dict[str, Any]] = []
    for path, content, callback in jobs:
        error = rejection(content, callback, decode=not args.bytes, snapshot=args.snapshot,
                          sensitive=args.sensitive)  # fmt: skip
        results.append(
            {"file": path, "status": "accepted" if error is None else "rejected", "error": error}
        )
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for row in results:
            shown = printable(row["file"], limit=None)
            if row["error"] is None:
                print(f"{shown}: accepted")
            else:
                print(f"{shown}: rejected: {printable(row['error'], limit=None)}")
    return EXIT_REJECTED if any(r["error"] is not None for r in results) else EXIT_OK
