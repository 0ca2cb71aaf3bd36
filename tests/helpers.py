"""Small helpers shared by tests: polling waits and reading the events stream."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

import redis

from subscriber.keys import stream_keys
from subscriber.protocol import Event, decode_event

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T | None],
    what: str = "",
    timeout: float = 10.0,
    interval: float = 0.02,
) -> T:
    """Poll ``predicate`` until it returns something truthy (and return that); fail after
    ``timeout`` seconds, naming ``what`` (or the predicate)."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what or predicate}")
        time.sleep(interval)


def events(client: redis.Redis, key: str, prefix: str = "hotreload") -> list[Event]:
    """Every entry of ``key``'s events stream, decoded and hash-verified."""
    raw = cast(
        list[tuple[bytes, dict[bytes, bytes]]], client.xrange(stream_keys(key, prefix).events)
    )
    return [decode_event(i, f) for i, f in raw]


def has_events(client: redis.Redis, key: str, count: int) -> Callable[[], bool]:
    """A predicate for ``wait_until``: ``key`` has exactly ``count`` entries."""
    return lambda: len(events(client, key)) == count


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc (clock ticks -> seconds)."""
    import os

    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def race_publishers(url: str, contents: list[bytes], racers: int = 4, **options: Any) -> None:
    """``racers`` publishers (as that many pods would) publish ``contents`` to ``app.yaml``,
    each content at the same moment (a barrier), each with its own connection."""
    import threading

    from publisher.publish import Publisher
    from subscriber._redis import connect

    barrier = threading.Barrier(racers)
    errors: list[BaseException] = []

    def run() -> None:
        client = connect(url, socket_timeout=5)
        publisher = Publisher(client, history=1000, **options)
        try:
            for content in contents:
                barrier.wait(10)
                publisher.publish("app.yaml", content)
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()
        finally:
            client.close()

    threads = [threading.Thread(target=run) for _ in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
