"""``hotreload watch``: the per-pod daemon, run until SIGTERM or SIGINT.

The daemon needs the ``[publisher]`` extra (watchdog for the mount, prometheus-client for
``/metrics``), which a worker's install leaves out. So nothing here imports them before the
command runs, and without them the command says what to install (exit 2) instead of failing
with a traceback; every other command works without them.
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib
import logging
import os
import signal
from collections.abc import Callable, Sequence

from publisher._rolloutwire import CanaryPolicy, parse_canary
from publisher.cli.exits import EXIT_OK, EXIT_USAGE, fail
from publisher.cli.parser import ENV_SIGNING_KEY_FILE
from subscriber._target import resolve_url
from subscriber.errors import ConfigurationError

__all__ = ["PUBLISHER_EXTRA", "Stopper", "missing_extra", "run_watch"]

# the distributions of the [publisher] extra, by the module each one installs
PUBLISHER_EXTRA = {"watchdog": "watchdog", "prometheus_client": "prometheus-client"}


def missing_extra(command: str) -> str | None:
    """The error line for ``hotreload COMMAND`` when the ``[publisher]`` extra is missing
    (which distribution, what to install), or ``None`` when it is installed."""
    for module, distribution in PUBLISHER_EXTRA.items():
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise  # the extra is there but broken: its own traceback says more
            return (
                f"`hotreload {command}` needs {distribution}, which is not installed: "
                "pip install 'configmap-hotreload[publisher]'"
            )
    return None


def snapshots(paths: Sequence[str], given: Sequence[str]) -> dict[str, str]:
    """``--snapshot NAME[=DIR]`` values as name -> directory (``ConfigurationError``)."""
    found: dict[str, str] = {}
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
        if name in found:
            raise ConfigurationError(f"--snapshot {name} is given twice")
        found[name] = directory
    return found


def canary_policy(args: argparse.Namespace) -> CanaryPolicy | None:
    """``--canary`` / ``--canary-hold`` (validated by the parser already)."""
    if args.canary is None:
        return None
    policy = parse_canary(args.canary)
    return CanaryPolicy(policy.count, policy.percent, args.canary_hold)


def run_watch(args: argparse.Namespace) -> int:
    """Build the ``Daemon`` from the flags and run it; SIGTERM / SIGINT stop it cleanly."""
    missing = missing_extra("watch")
    if missing is not None:
        return fail(missing, EXIT_USAGE)
    from publisher.daemon import Daemon

    daemon = Daemon(
        args.paths,
        redis_url=resolve_url(args.redis, getattr(args, "redis_password_file", None)),
        prefix=args.prefix,
        history=args.history,
        resync_interval=args.resync_interval,
        metrics_port=args.metrics_port,
        forget_workers_after=args.forget_workers_after,
        signing_key_file=args.signing_key_file or os.environ.get(ENV_SIGNING_KEY_FILE) or None,
        sensitive=args.sensitive,
        snapshots=snapshots(args.paths, args.snapshot),
        canary=canary_policy(args),
    )

    on_signal = Stopper(daemon.request_stop)
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        daemon.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return EXIT_OK


class Stopper:
    """The daemon's SIGTERM / SIGINT handler. The first asks it to stop; one more while it is
    still stopping writes every thread's stack to stderr (``faulthandler``) and says so in the
    log: a daemon that does not stop (seen once, session 10, at load 28: two SIGTERMs, no
    "stopped", nothing to tell where it waited) then shows where it waits before the kubelet's
    SIGKILL ends it. It never exits by itself: the stop it waits for flushes nothing, but what
    it waits on is what the stack is for."""

    def __init__(self, request_stop: Callable[[], None]) -> None:
        self._request_stop = request_stop
        self.received = 0

    def __call__(self, signum: int, _frame: object) -> None:
        self.received += 1
        name = signal.Signals(signum).name
        log = logging.getLogger(__name__)
        if self.received == 1:
            log.info("%s received, stopping", name)
            self._request_stop()
            return
        log.warning(
            "%s received again, still stopping: every thread's stack follows on stderr", name
        )
        faulthandler.dump_traceback(all_threads=True)
