"""``hotreload console``'s flags, added by ``publisher.cli.parser`` (which imports no command:
this module needs argparse alone)."""

from __future__ import annotations

import argparse

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "add_console_arguments"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765


def _listen_port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port number (0-65535; 0: any free)")
    return value


def _host(text: str) -> str:
    host = text.strip().removeprefix("[").removesuffix("]")
    if not host or any(c.isspace() or c in "/?#@" for c in host):
        raise argparse.ArgumentTypeError(f"{text!r} is not a host name or IP address")
    return host


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0.1 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"{text} must be from 0.1 to 3600 seconds")
    return value


def add_console_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host",
        type=_host,
        default=DEFAULT_HOST,
        help="address to listen on (default: %(default)s; the page has no login)",
    )
    parser.add_argument(
        "--port",
        type=_listen_port,
        default=DEFAULT_PORT,
        help="port to listen on, 0 any free one (default: %(default)s)",
    )
    parser.add_argument(
        "--interval",
        type=_interval,
        default=1.0,
        metavar="SECONDS",
        help="how often the page refreshes from Redis (default: %(default)g)",
    )
    parser.add_argument(
        "--reveal",
        action="store_true",
        help="show diffs of sensitive keys too (default: masked, as `show` and `diff`)",
    )
