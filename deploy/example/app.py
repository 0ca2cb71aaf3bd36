"""Example WSGI app whose rate limits (YAML) and feature flags (JSON) hot-reload.

The subscribers are created at import time (safe under ``preload_app``: no I/O, no thread);
``subscriber.gunicorn.post_worker_init`` starts them in each worker before it serves. A config
the types below reject never reaches a request: the worker keeps the previous one and reports
the rejection (``hotreload status``).

Routes: ``/`` the config this worker runs (JSON), ``/readyz`` 200 once every subscriber has a
config, ``/healthz``, ``/metrics`` (Prometheus, aggregated over workers in multiprocess mode).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any

import msgspec
import prometheus_client  # imported before the subscribers start: they record metrics

from subscriber import Subscriber, TypedConfig


class RateLimit(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    requests_per_second: Annotated[int, msgspec.Meta(gt=0)]
    burst: Annotated[int, msgspec.Meta(ge=0)]


class RateLimits(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    default: RateLimit
    routes: dict[str, RateLimit] = {}


CONFIG_DIR = os.environ.get("HOTRELOAD_CONFIG_DIR", "/etc/hotreload/config")
# Signed events (docs/operations.md): the key the publisher signs with (its
# --signing-key-file, or the same $HOTRELOAD_SIGNING_KEY_FILE), read from that file -- a
# mounted Secret, never an environment variable. Unset: signatures are not checked.
KEY_FILE = os.environ.get("HOTRELOAD_SIGNING_KEY_FILE")
SIGNING_KEY = Path(KEY_FILE).read_bytes() if KEY_FILE else None

rate_limits = TypedConfig(RateLimits, "yaml")
flags = TypedConfig(dict[str, bool], "json")
subscribers = [
    Subscriber(
        "rate_limits.yaml",
        rate_limits.apply,
        fallback_path=os.path.join(CONFIG_DIR, "rate_limits.yaml"),
        signing_key=SIGNING_KEY,
    ),
    Subscriber(
        "flags.json",
        flags.apply,
        fallback_path=os.path.join(CONFIG_DIR, "flags.json"),
        signing_key=SIGNING_KEY,
    ),
]

_json = msgspec.json.Encoder()
StartResponse = Callable[[str, list[tuple[str, str]]], Any]


def _metrics() -> bytes:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = prometheus_client.CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return prometheus_client.generate_latest(registry)
    return prometheus_client.generate_latest()


def _current() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "versions": {s.key: s.version for s in subscribers},
        "rate_limits": msgspec.to_builtins(rate_limits.value) if rate_limits.loaded else None,
        "flags": flags.value if flags.loaded else None,
    }


def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "/")
    status, content_type, body = "200 OK", "application/json", b""
    if path == "/":
        body = _json.encode(_current())
    elif path == "/readyz":
        ready = all(s.started and s.status != "starting" for s in subscribers)
        status = "200 OK" if ready else "503 Service Unavailable"
        body = b"ok\n" if ready else b"config not loaded yet\n"
        content_type = "text/plain"
    elif path == "/healthz":
        body, content_type = b"ok\n", "text/plain"
    elif path == "/metrics":
        body, content_type = _metrics(), prometheus_client.CONTENT_TYPE_LATEST
    else:
        status, body, content_type = "404 Not Found", b"not found\n", "text/plain"
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body)))])
    return [body]
