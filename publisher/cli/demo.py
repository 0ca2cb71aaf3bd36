"""``hotreload demo``: find the example app and hand over to ``publisher.demo``.

``publisher.demo`` is imported only when this command runs (it starts gunicorn and a Redis),
and it never imports the CLI back: it runs ``hotreload`` commands as subprocesses, so the
output it shows is the real commands' output.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from publisher.cli.exits import EXIT_USAGE, fail
from publisher.cli.watch import missing_extra

__all__ = ["run_demo_command"]


def run_demo_command(args: argparse.Namespace) -> int:
    """Run the demo on ``--example-dir`` (default: ``deploy/example`` of this checkout)."""
    from publisher.demo import find_example_dir, run_demo

    example = Path(args.example_dir) if args.example_dir else find_example_dir()
    if example is None or not (example / "app.py").exists():
        return fail(
            "no example app found: run it from a checkout (make demo) or pass --example-dir",
            EXIT_USAGE,
        )
    missing = missing_extra("demo")  # its publisher is `hotreload watch`
    if missing is not None:
        return fail(missing, EXIT_USAGE)
    return run_demo(example)
