"""The subscriber's own connection (``subscriber._light``) behaves as redis-py's would.

Every check runs the same thing through the light client and through redis-py's client with
an ``InterruptiblePool`` (what the subscriber used before) against a real redis-server, and
compares: what the server sees of the connection (``CLIENT INFO``), the errors (class and
message) of a refused password, an unknown database and a refused connection, the reply
cap, an interrupted blocked read, a password file read anew for every connection.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from subscriber import _light, _redis
from subscriber._light import LightClient
from subscriber._pool import InterruptiblePool, execute
from subscriber._redis import connect
from subscriber._replycap import Oversized
from subscriber._wire import Batch
from subscriber.protocol import MAX_ENTRY_BYTES
from subscriber.testing import RedisServer

NAME = "hotreload-sub:light-test"


def _both(url: str, timeout: float = 5.0) -> tuple[redis.Redis, redis.Redis]:
    light = _light.connect(url, socket_timeout=timeout, connect_timeout=2.0, client_name=NAME)
    heavy = _redis.connect(
        url, socket_timeout=timeout, connect_timeout=2.0, client_name=NAME,
        pool_class=InterruptiblePool,
    )  # fmt: skip
    assert isinstance(light, LightClient)
    assert isinstance(heavy, redis.Redis)
    return light, heavy


def _one(client: redis.Redis, *args: Any) -> Any:
    batch = Batch()
    batch.command(*args)
    (reply,) = execute(client, batch, raise_on_error=True)
    return reply


def _info(client: redis.Redis) -> dict[str, str]:
    fields = dict(f.split("=", 1) for f in _one(client, "CLIENT", "INFO").decode().split())
    wanted = ("name", "db", "user", "resp", "lib-name", "lib-ver", "flags")
    return {k: fields.get(k, "") for k in wanted}  # lib-*: Redis 7.2 and later


def _failure(make: Any) -> tuple[type[BaseException], str]:
    with pytest.raises(redis.RedisError) as caught:
        make()
    return type(caught.value), str(caught.value)


@pytest.fixture
def acl_server(redis_tcp: RedisServer) -> RedisServer:
    """``redis_tcp`` with an ACL user ``sub``."""
    admin = connect(redis_tcp.url, socket_timeout=5.0, pool_class=InterruptiblePool)
    _one(admin, "ACL", "SETUSER", "sub", "on", ">sub-password-0123", "~*", "+@all")
    admin.close()
    return redis_tcp


@pytest.mark.parametrize("query", ["", "?protocol=2", "?protocol=3"])
def test_the_server_sees_the_same_connection_with_a_user_a_database_and_either_protocol(
    acl_server: RedisServer, query: str
) -> None:
    url = f"redis://sub:sub-password-0123@127.0.0.1:{acl_server.port}/2{query}"
    light, heavy = _both(url)
    try:
        seen = _info(light)
        assert seen == _info(heavy)
        assert seen["user"] == "sub"
        assert seen["db"] == "2"
        assert seen["name"] == NAME
        assert seen["resp"] == ("2" if query == "?protocol=2" else "3")
        assert _one(light, "SET", "k", "v") == _one(heavy, "SET", "k", "v")
        assert _one(light, "GET", "nothing") is None  # RESP2's null bulk string too
        assert _one(light, "HGETALL", "nothing") == _one(heavy, "HGETALL", "nothing")
    finally:
        light.close()
        heavy.close()


def test_a_unix_socket_and_a_password_only_url_connect_as_with_redis_py(
    redis_server: RedisServer,
) -> None:
    admin = redis.Redis(unix_socket_path=redis_server.socket_path)
    admin.config_set("requirepass", "only-a-password")
    admin.close()
    url = f"unix://:only-a-password@{redis_server.socket_path}?db=3"
    light, heavy = _both(url)
    try:
        assert _info(light) == _info(heavy)
        assert _info(light)["db"] == "3"
        assert _info(light)["user"] == "default"
    finally:
        light.close()
        heavy.close()


def test_refusals_raise_what_redis_py_raises(acl_server: RedisServer, tmp_path: Path) -> None:
    port = acl_server.port
    for url in (
        f"redis://sub:wrong@127.0.0.1:{port}",
        f"redis://sub:wrong@127.0.0.1:{port}?protocol=2",
        f"redis://sub:sub-password-0123@127.0.0.1:{port}/99",
    ):
        light, heavy = _both(url)
        assert _failure(lambda c=light: _info(c)) == _failure(lambda c=heavy: _info(c)), url
    closed = RedisServer(tmp_path / "closed", unix=False)  # never started
    light, heavy = _both(f"redis://127.0.0.1:{closed.port}")
    assert _failure(lambda: _info(light)) == _failure(lambda: _info(heavy))
    light, heavy = _both("unix:///nonexistent/light.sock")
    assert _failure(lambda: _info(light)) == _failure(lambda: _info(heavy))


def test_a_bulk_string_over_the_cap_is_dropped_as_with_redis_py(
    redis_server: RedisServer,
) -> None:
    admin = redis.Redis(unix_socket_path=redis_server.socket_path)
    admin.set("big", b"x" * (MAX_ENTRY_BYTES + 10))
    admin.close()
    light, heavy = _both(redis_server.url)
    try:
        got = _one(light, "GET", "big")
        assert isinstance(got, Oversized)
        assert len(got) == MAX_ENTRY_BYTES + 10
        assert got == _one(heavy, "GET", "big")
        assert _one(light, "PING") == _one(heavy, "PING")  # the connection read on
    finally:
        light.close()
        heavy.close()


def test_interrupt_ends_a_blocked_read_with_a_connection_error(
    redis_server: RedisServer,
) -> None:
    light = _light.connect(
        redis_server.url, socket_timeout=30.0, connect_timeout=2.0, client_name=NAME
    )
    pool = light.connection_pool
    pool.held()  # type: ignore[attr-defined]
    errors: list[BaseException] = []

    def blocked() -> None:
        try:
            _one(light, "BLPOP", "never", 25)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=blocked)
    began = time.monotonic()
    thread.start()
    time.sleep(0.2)
    pool.interrupt()  # type: ignore[attr-defined]
    thread.join(10)
    assert not thread.is_alive()
    assert time.monotonic() - began < 10
    assert len(errors) == 1
    assert isinstance(errors[0], redis.ConnectionError)
    light.close()


def test_a_password_file_is_read_anew_for_every_connection(
    acl_server: RedisServer, tmp_path: Path
) -> None:
    secret = tmp_path / "password"
    secret.write_text("sub-password-0123\n")
    url = f"redis://sub@127.0.0.1:{acl_server.port}?password_file={secret}"
    light = _light.connect(url, socket_timeout=5.0, connect_timeout=2.0, client_name=NAME)
    assert isinstance(light, LightClient)
    assert _info(light)["user"] == "sub"
    light.close()
    secret.write_text("rotated-away\n")
    cls, message = _failure(lambda: _info(light))
    assert issubclass(cls, redis.AuthenticationError), message


def test_tls_and_keepalive_keep_redis_py(redis_tcp: RedisServer) -> None:
    for url in (
        f"rediss://127.0.0.1:{redis_tcp.port}",
        f"redis://127.0.0.1:{redis_tcp.port}?socket_keepalive=true",
    ):
        client = _light.connect(url, socket_timeout=5.0, connect_timeout=2.0, client_name=NAME)
        assert isinstance(client, redis.Redis), url
        assert isinstance(client.connection_pool, InterruptiblePool)


def test_the_warm_up_reads_a_cycle_in_process_and_leaves_nothing_open() -> None:
    """``_warm.warm`` (``pre_fork``): the connection's handshake and one cycle against
    canned replies on a socketpair -- every reply read as a real server's would be."""
    import os

    from subscriber._warm import warm

    def descriptors() -> int:
        return len(os.listdir("/proc/self/fd"))

    before, threads = descriptors(), threading.active_count()
    replies = warm()
    assert descriptors() == before
    assert threading.active_count() == threads
    entry = (b"1700000000000-0", {b"v": b"1", b"c": b"ab"})
    assert replies[:6] == [7, 1, b"1700000000000-0", [entry], [[b"k", [entry]]], []]
    assert isinstance(replies[6], redis.ResponseError)


def test_after_a_read_timeout_the_next_batch_connects_again_as_with_redis_py(
    redis_server: RedisServer,
) -> None:
    light, heavy = _both(redis_server.url, timeout=0.2)
    try:
        messages = []
        for client in (light, heavy):
            _info(client)
            with pytest.raises(redis.TimeoutError) as caught:
                _one(client, "BLPOP", "never", 2)
            messages.append(str(caught.value))
            assert _one(client, "PING") in (b"PONG", "PONG", True)
        # redis-py 8.2 names the peer ("Timeout reading from /path/redis.sock"), as ours
        # does; 8.0 says "from socket" (make test-oldest)
        if tuple(int(part) for part in redis.__version__.split(".")[:2]) >= (8, 2):
            assert messages[0] == messages[1]
        assert messages[0].startswith("Timeout reading from ")
        assert _info(light)["name"] == NAME
    finally:
        light.close()
        heavy.close()


def test_the_server_is_sent_the_same_handshake(acl_server: RedisServer) -> None:
    """``MONITOR`` sees the same commands from both (passwords redacted by the server; a
    Redis before 7.2 refuses CLIENT SETINFO, so it shows no such command)."""
    url = f"redis://sub:sub-password-0123@127.0.0.1:{acl_server.port}/2"
    watcher = redis.Redis(host="127.0.0.1", port=acl_server.port, socket_timeout=5.0)
    seen: dict[str, list[str]] = {}
    with watcher.monitor() as monitor:  # type: ignore[no-untyped-call]
        light, heavy = _both(url)
        try:
            for client in (light, heavy):
                _info(client)
            while sum(c.count("CLIENT INFO") for c in seen.values()) < 2:
                command = monitor.next_command()
                where = f"{command['client_address']}:{command['client_port']}"
                seen.setdefault(where, []).append(command["command"])
        finally:
            light.close()
            heavy.close()
    light_sent, heavy_sent = seen.values()
    assert light_sent == heavy_sent
    assert light_sent[:3] == [
        "HELLO 3 AUTH (redacted) (redacted)",
        f"CLIENT SETNAME {NAME}",
        "SELECT 2",
    ]
