"""The two WSGI apps of the gunicorn benchmarks (load with ``--chdir deploy/example``).

- ``hotreload_app``: ``deploy/example/app.py`` itself, its ``TypedConfig.apply`` wrapped to
  report ``A <seq> <pid> <t_ns>`` to the pipe in ``$HR_BENCH_FD`` once a rate-limits config
  is applied (``seq`` is its ``requests_per_second``).
- ``plain_app``: the same app as one would write it without hotreload: the same config types,
  routes and JSON, the mounted files read once at import -- what gunicorn's own reload
  (``kill -HUP``, with ``preload_app`` off) reloads. Nothing of hotreload is imported.
- ``trivial_app``: for scale, the least an app can load: one number from the file, stdlib only
  (what the HUP figures of docs/design.md, "Measured facts to design by", were measured with).
- ``imported_app``: the plain app that also imports what the example imports of hotreload
  (``Subscriber``, ``TypedConfig``) and starts nothing: the memory baseline that tells what a
  *running* subscriber adds from what its import adds.
- ``twenty_app``: the example app plus 18 ``Subscriber`` objects on ``extra-NN.json`` (20
  keys, one shared follower per worker), each applied by a ``TypedConfig``.
- ``quiet_app``: the example app with its subscribers' Prometheus metrics off
  (``metrics=False``): what the metrics take of a running subscriber's memory.
- ``client_app``: the imported app whose worker, on its first request, opens one redis-py
  connection the way a subscriber does (``subscriber._redis.connect``) and sends ``PING``,
  starting no subscriber: what redis-py's connection code takes of a worker's memory.

Only the app named on the command line is built (module ``__getattr__``). Every app also
answers ``GET /__gc`` by running a full garbage collection and naming its pid: the memory
benchmark's steady state (a long-running worker collects every generation sooner or later).
"""

from __future__ import annotations

import gc
import importlib
import os
import time
from collections.abc import Callable, Iterable
from typing import Annotated, Any

import msgspec

_FD = int(os.environ.get("HR_BENCH_FD", "-1"))


# the example app's config types (deploy/example/app.py), for the plain app
class RateLimit(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    requests_per_second: Annotated[int, msgspec.Meta(gt=0)]
    burst: Annotated[int, msgspec.Meta(ge=0)]


class RateLimits(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    default: RateLimit
    routes: dict[str, RateLimit] = {}


_current: Callable[[], int] = lambda: -1  # noqa: E731


def current_seq() -> int:
    """The config this process runs (``requests_per_second`` of its rate limits)."""
    return _current()


def _hotreload_app() -> Any:
    from subscriber.typed import TypedConfig

    original = TypedConfig.apply

    def apply(self: TypedConfig[Any], content: str | bytes) -> None:
        original(self, content)
        seq = getattr(getattr(self.value, "default", None), "requests_per_second", None)
        if seq is not None:
            os.write(_FD, f"A {seq} {os.getpid()} {time.monotonic_ns()}\n".encode())

    # before the example creates its subscribers, which take the bound method
    TypedConfig.apply = apply  # type: ignore[method-assign]
    # deploy/example/app.py (gunicorn --chdir puts it on sys.path)
    example = importlib.import_module("app")

    global _current
    _current = lambda: example.rate_limits.value.default.requests_per_second  # noqa: E731
    return example.app


EXTRA_KEYS = [f"extra-{index:02d}.json" for index in range(18)]


def _twenty_app() -> Any:
    from subscriber import Subscriber, TypedConfig

    app = _hotreload_app()
    directory = os.environ.get("HOTRELOAD_CONFIG_DIR", "/etc/hotreload/config")
    configs = [TypedConfig(dict[str, int], "json") for _ in EXTRA_KEYS]
    extra = [
        Subscriber(key, config.apply, fallback_path=os.path.join(directory, key))
        for key, config in zip(EXTRA_KEYS, configs, strict=True)
    ]
    globals()["_extra"] = (configs, extra)
    return app


def _quiet_app() -> Any:
    from functools import partialmethod

    from subscriber import Subscriber

    # before the example creates its subscribers (it passes no metrics=)
    quiet = partialmethod(Subscriber.__init__, metrics=False)
    Subscriber.__init__ = quiet  # type: ignore[method-assign,assignment]
    return _hotreload_app()


def _client_app() -> Any:
    app = _imported_app()
    held: list[Any] = []

    def first_connects(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if not held:  # in the worker: after the fork, as a subscriber's start()
            from subscriber import _redis

            held.append(_redis.connect(os.environ["HOTRELOAD_REDIS_URL"], socket_timeout=5.0))
            held[0].ping()
        result: Iterable[bytes] = app(environ, start_response)
        return result

    return first_connects


def _imported_app() -> Any:
    from subscriber import Subscriber, TypedConfig

    globals()["_imported"] = (Subscriber, TypedConfig)
    return _plain_app()


def _plain_app() -> Any:
    import msgspec.yaml
    import prometheus_client

    directory = os.environ.get("HOTRELOAD_CONFIG_DIR", "/etc/hotreload/config")
    with open(os.path.join(directory, "rate_limits.yaml"), "rb") as fh:
        rate_limits = msgspec.yaml.decode(fh.read(), type=RateLimits)
    with open(os.path.join(directory, "flags.json"), "rb") as fh:
        flags = msgspec.json.decode(fh.read(), type=dict[str, bool])
    encoder = msgspec.json.Encoder()

    global _current
    _current = lambda: rate_limits.default.requests_per_second  # noqa: E731

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        status, content_type, body = "200 OK", "application/json", b""
        if path == "/":
            body = encoder.encode(
                {
                    "pid": os.getpid(),
                    "versions": {},
                    "rate_limits": msgspec.to_builtins(rate_limits),
                    "flags": flags,
                }
            )
        elif path in ("/readyz", "/healthz"):
            body, content_type = b"ok\n", "text/plain"
        elif path == "/metrics":
            body = prometheus_client.generate_latest()
            content_type = prometheus_client.CONTENT_TYPE_LATEST
        else:
            status, body, content_type = "404 Not Found", b"not found\n", "text/plain"
        headers = [("Content-Type", content_type), ("Content-Length", str(len(body)))]
        start_response(status, headers)
        return [body]

    return app


def _trivial_app() -> Any:
    """The least an app can import: the rate from the mounted file, the stdlib's json."""
    import json
    import re

    directory = os.environ.get("HOTRELOAD_CONFIG_DIR", "/etc/hotreload/config")
    with open(os.path.join(directory, "rate_limits.yaml")) as fh:
        found = re.search(r"requests_per_second: (\d+)", fh.read())
    rate = int(found.group(1)) if found else 0

    global _current
    _current = lambda: rate  # noqa: E731

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        current = {"pid": os.getpid(), "rate_limits": {"default": {"requests_per_second": rate}}}
        body = json.dumps(current).encode()
        start_response("200 OK", [("Content-Type", "application/json")])
        return [body]

    return app


def _collectable(app: Any) -> Any:
    def wrapped(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/__gc":
            gc.collect()
            body = str(os.getpid()).encode()
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [body]
        result: Iterable[bytes] = app(environ, start_response)
        return result

    return wrapped


def __getattr__(name: str) -> Any:
    builders = {
        "hotreload_app": _hotreload_app,
        "plain_app": _plain_app,
        "trivial_app": _trivial_app,
        "imported_app": _imported_app,
        "twenty_app": _twenty_app,
        "quiet_app": _quiet_app,
        "client_app": _client_app,
    }
    if name in builders:
        value = _collectable(builders[name]())
        globals()[name] = value
        return value
    raise AttributeError(name)
