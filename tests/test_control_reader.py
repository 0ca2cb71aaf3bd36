"""The daemon's ``:control`` reader (``publisher.control``) in-process, on a real Redis: its
blocking read is long (an idle daemon's thread wakes once per block), so keys added during
one are followed by cutting it short, not at its end."""

from __future__ import annotations

import threading
import uuid
from typing import Any, cast

import redis

from publisher._rolloutwire import control_key
from publisher.control import _BLOCK_MS, Control
from subscriber.testing import RedisServer
from tests.helpers import wait_until

PREFIX = "hotreload"


def reader_blocked(client: redis.Redis) -> bool:
    clients = cast(list[dict[str, Any]], client.client_list())
    return any(
        c["name"].startswith("hotreload-control") and c["cmd"] == "xread" and "b" in c["flags"]
        for c in clients
    )


def request(client: redis.Redis, key: str) -> None:
    seconds, micros = client.time()
    at = int(seconds) * 1000 + int(micros) // 1000
    fields = {"op": "halt", "id": uuid.uuid4().hex, "by": "test:1", "at": at}
    client.xadd(control_key(key, PREFIX), fields)  # type: ignore[arg-type]


def test_a_key_added_during_the_readers_block_has_its_requests_read_before_the_block_ends(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    assert _BLOCK_MS >= 20_000  # long enough that waiting it out fails the wait below
    names = ["a.yaml"]
    read = threading.Event()
    control = Control(redis_server.url, lambda: list(names), prefix=PREFIX, wake=read.set)
    control.start()
    try:
        wait_until(lambda: reader_blocked(client), "the reader blocked in XREAD on a.yaml")
        names.append("b.yaml")  # a ConfigMap gained a key
        # the loop's step: no request queued, so nothing is carried out (no client needed)
        control.run(client, cast(Any, None), cast(Any, None))
        request(client, "b.yaml")
        wait_until(read.is_set, "the request on the added key read", timeout=10)
        read.clear()
        wait_until(lambda: reader_blocked(client), "the reader blocked again")
        request(client, "a.yaml")  # the first key is still followed
        wait_until(read.is_set, "a request on the first key read", timeout=10)
    finally:
        control.stop()
