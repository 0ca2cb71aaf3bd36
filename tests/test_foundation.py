"""The skeleton itself: fixtures start real private servers, the vendored writer is current."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from subscriber import _redis, _target
from subscriber.defaults import ENV_URL
from subscriber.errors import ConfigurationError
from subscriber.keys import stream_keys, validate_key
from subscriber.testing import RedisServer
from tests.conftest import REPO


def test_vendored_atomic_writer_matches_shared() -> None:
    shared = REPO.parent / "shared" / "k8s_atomic_writer.py"
    if not shared.exists():
        pytest.skip("../shared is not beside this checkout")
    vendored = REPO / "tests" / "_vendor" / "k8s_atomic_writer.py"
    assert vendored.read_bytes() == shared.read_bytes()


def test_redis_fixture_is_private_and_stopped_by_pid(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "r")
    with server:
        pid = server.pid
        client = _redis.connect(server.url, socket_timeout=2)
        assert client.ping()
        info = client.info("server")
        assert info["tcp_port"] == 0  # unix socket only, never 6379
        assert int(info["process_id"]) == pid
        client.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_tcp_fixture_uses_a_free_port(redis_tcp: RedisServer) -> None:
    assert redis_tcp.port not in (0, 6379)
    client = _redis.connect(redis_tcp.url, socket_timeout=2)
    assert client.info("server")["tcp_port"] == redis_tcp.port
    client.close()


def test_key_names_are_hash_tagged() -> None:
    keys = stream_keys("app.yaml")
    assert keys.events == "hotreload:{app.yaml}:events"
    assert keys.acks == "hotreload:{app.yaml}:acks"
    assert keys.workers == "hotreload:{app.yaml}:workers"
    assert stream_keys("a", "team-x").events == "team-x:{a}:events"


@pytest.mark.parametrize("bad", ["", "a/b", "a:b", "{a}", "..", "a b", "x" * 254])
def test_bad_key_names_are_refused(bad: str) -> None:
    with pytest.raises(ConfigurationError, match="invalid config key"):
        validate_key(bad)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("", "no Redis URL"),
        ("http://x", "scheme must be"),
        ("redis://:secret@host:notaport/0", "malformed"),
        ("unix://", "socket path"),
        ("redis://", "no host"),
    ],
)
def test_bad_urls_get_clear_errors(url: str, message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_URL, raising=False)
    with pytest.raises(ConfigurationError, match=message) as info:
        _target.resolve_url(url or None)
    assert "secret" not in str(info.value)


def test_url_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_URL, "unix:///tmp/x.sock")
    assert _target.resolve_url(None) == "unix:///tmp/x.sock"
    assert _target.redacted("redis://u:pw@h:1/0") == "redis://u:***@h:1/0"


def test_every_error_of_the_subscriber_package_is_a_hotreload_error() -> None:
    """One root: ``except HotReloadError`` catches whatever hotreload raises (internal
    control-flow exceptions, with a leading underscore, aside)."""
    import importlib
    import inspect
    import pkgutil

    import redis

    import subscriber
    from subscriber._cluster import TopologyChanged
    from subscriber.errors import HotReloadError

    found = []
    for module_info in pkgutil.iter_modules(subscriber.__path__):
        module = importlib.import_module(f"subscriber.{module_info.name}")
        for name, value in vars(module).items():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__ == module.__name__
                and not name.startswith("_")
            ):
                found.append(value)
                assert issubclass(value, HotReloadError), f"{module.__name__}.{name}"
    assert TopologyChanged in found
    assert issubclass(TopologyChanged, redis.ConnectionError)  # a lost connection to the loops


def test_a_url_is_parsed_once_into_a_frozen_target() -> None:
    target = _target.parse("rediss://app:p%40ss@Redis-0:6380/2?ssl_ca_certs=/ca.crt")
    assert (target.scheme, target.host, target.port, target.db) == ("rediss", "redis-0", 6380, 2)
    assert (target.username, target.password, target.tls) == ("app", "p@ss", True)
    assert target.options == {"ssl_ca_certs": "/ca.crt"}
    assert target.redacted() == "rediss://app:***@Redis-0:6380/2?ssl_ca_certs=/ca.crt"
    assert _target.parse("redis://h/0?db=3").db == 3  # ?db= wins over the path, as in redis-py
    assert _target.parse("redis://h").port == 6379
    unix = _target.parse("unix:///run/redis.sock?db=1")
    assert (unix.unix, unix.path, unix.db, unix.host) == (True, "/run/redis.sock", 1, "")
    with pytest.raises(ConfigurationError, match="not a number"):
        _target.parse("redis://h/0?db=x")
    with pytest.raises(AttributeError):
        target.host = "elsewhere"  # type: ignore[misc]
