"""The head key (``publisher/_head.py``) against a real redis-server: the publish script reads
the newest entry's version and hash from ``{prefix}:{KEY}:head`` instead of copying the
entry, and falls back to the stream whenever the head does not match it. Each test here
makes the head disagree with the stream the way something in the field would, and checks
that the stream, not the head, decides. And: no version is ever numbered above
``MAX_VERSION`` (issue 23).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import cast

import pytest
import redis

from publisher import _fast
from publisher._head import head_key
from publisher.publish import Publisher, VersionsExhausted
from subscriber._redis import connect
from subscriber.keys import stream_keys
from subscriber.protocol import MAX_VERSION, sha256_hex
from subscriber.testing import RedisServer
from tests.helpers import events, start_redis_without_probe

EVENTS = stream_keys("app.yaml").events
HEAD = head_key("app.yaml", "hotreload")
X, Y, Z = b"rev: x\n", b"rev: y\n", b"rev: z\n"


@pytest.fixture(autouse=True, params=["lua", "around-lua"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every decision both ways: the content through publish.lua, and around it
    (publisher._fast, from 0 bytes instead of 64 KiB)."""
    monkeypatch.setattr(_fast, "FAST_FROM", None if request.param == "lua" else 0)
    return str(request.param)


def head(client: redis.Redis) -> dict[str, str]:
    raw = cast(dict[bytes, bytes], client.hgetall(HEAD))
    return {k.decode(): v.decode() for k, v in raw.items()}


def junk(client: redis.Redis, version: str, content: bytes = b"junk") -> str:
    """An entry appended with a plain XADD, as by a publisher that predates the head."""
    fields = {"schema": "1", "key": "app.yaml", "version": version,
              "sha256": sha256_hex(content), "content": content, "published_at": "1",
              "publisher": "old:1"}  # fmt: skip
    return cast(bytes, client.xadd(EVENTS, fields)).decode()  # type: ignore[arg-type]


def test_every_entry_written_writes_the_head_in_the_streams_slot(client: redis.Redis) -> None:
    publisher = Publisher(client, signing_key=b"k" * 32)
    result = publisher.publish("app.yaml", X, sensitive=True)

    assert HEAD == "hotreload:{app.yaml}:head"  # the events stream's hash tag
    record = head(client)
    assert record["id"] == result.entry_id
    assert record["len"] == "1"
    assert record["version"] == "1"
    assert record["sha256"] == sha256_hex(X)
    assert record["kid"] == publisher.key_id
    assert record["sig"]
    assert record["sensitive"] == "1"
    assert "content" not in record
    assert record["rollout"] == ""  # every field, so none of an older entry's stays

    again = publisher.publish("app.yaml", X, sensitive=True)  # read from the head: found
    assert (again.written, again.entry_id) == (False, result.entry_id)


def test_an_entry_appended_without_the_head_is_the_newest(client: redis.Redis) -> None:
    publisher = Publisher(client)
    publisher.publish("app.yaml", X)
    junk(client, "7", Y)  # an older publisher, or anyone with XADD

    written = publisher.publish("app.yaml", Z)
    assert (written.written, written.version) == (True, 8)  # above the entry, not the head
    assert Publisher(client).publish("app.yaml", Z).written is False
    assert head(client)["version"] == "8"


def test_the_newest_entry_deleted_under_the_head_is_not_taken_for_the_newest(
    client: redis.Redis,
) -> None:
    publisher = Publisher(client)
    publisher.publish("app.yaml", X)
    y = publisher.publish("app.yaml", Y)
    client.xdel(EVENTS, y.entry_id)  # the head still names Y's entry

    again = Publisher(client).publish("app.yaml", Y)  # a fresh publisher with Y

    assert again.written
    assert [e.content for e in events(client, "app.yaml")] == [X, Y]


def test_a_deleted_or_emptied_stream_is_written_again_despite_its_head(
    client: redis.Redis,
) -> None:
    publisher = Publisher(client)
    publisher.publish("app.yaml", X)
    client.delete(EVENTS)
    assert Publisher(client).publish("app.yaml", X).written
    client.xtrim(EVENTS, maxlen=0)
    assert Publisher(client).publish("app.yaml", X).written
    assert [e.content for e in events(client, "app.yaml")] == [X]


def test_a_trimmed_stream_reads_its_newest_entry_and_the_head_follows(client: redis.Redis) -> None:
    publisher = Publisher(client)
    for content in (X, Y, Z):
        publisher.publish("app.yaml", content)
    client.xtrim(EVENTS, maxlen=1, approximate=False)  # as make_room does at maxmemory

    assert Publisher(client).publish("app.yaml", Z).written is False
    assert publisher.publish("app.yaml", X).version == 4
    assert head(client)["len"] == "2"


@pytest.mark.parametrize("damage", ["missing", "wrong type", "junk id", "lying"])
def test_a_missing_or_damaged_head_never_decides(client: redis.Redis, damage: str) -> None:
    publisher = Publisher(client)
    publisher.publish("app.yaml", X)
    y = publisher.publish("app.yaml", Y)
    if damage == "missing":  # a Redis restored without it, or only ever published without
        client.delete(HEAD)
    elif damage == "wrong type":
        client.delete(HEAD)
        client.set(HEAD, b"not a hash")
    elif damage == "junk id":
        client.hset(HEAD, "id", "not-an-id")
    else:  # names an entry that is not the newest, with the stream's length
        first = cast(list[tuple[bytes, object]], client.xrange(EVENTS, count=1))[0][0]
        client.hset(HEAD, mapping={"id": first.decode(), "version": "1", "sha256": "0" * 64})

    assert Publisher(client).publish("app.yaml", Y).written is False  # Y is the newest
    result = publisher.publish("app.yaml", Z)
    assert (y.version, result.written, result.version) == (2, True, 3)
    assert Publisher(client).publish("app.yaml", Z).written is False
    if damage != "wrong type":  # a string is left alone: every publish reads the stream
        assert head(client)["version"] == "3"


def test_a_publisher_user_without_the_head_still_publishes(client: redis.Redis) -> None:
    """An ACL written before the head (deploy/redis/gen-users-acl.sh of an older release)."""
    client.acl_setuser(
        "old-publisher", enabled=True, passwords=["+old-password-1234"], reset_keys=True,
        keys=["hotreload:{*}:events"],
        commands=["+evalsha", "+eval", "+script|load", "+xadd", "+xrevrange", "+xrange",
                  "+xlen", "+hgetall", "+ping"],
    )  # fmt: skip
    kwargs = client.connection_pool.connection_kwargs
    old = redis.Redis(
        unix_socket_path=kwargs.get("path"), username="old-publisher",
        password="old-password-1234",
    )  # fmt: skip
    try:
        publisher = Publisher(old)
        assert publisher.publish("app.yaml", X).written
        assert publisher.publish("app.yaml", X).written is False
        assert publisher.publish("app.yaml", Y).version == 2
    finally:
        old.close()
    assert client.exists(HEAD) == 0


# ------------------------------------------------------------- no version above MAX_VERSION
@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_a_junk_entry_at_max_version_is_refused_by_name_never_numbered_past(
    client: redis.Redis, signed: bool
) -> None:
    publisher = Publisher(client, signing_key=b"k" * 32 if signed else None)
    publisher.publish("app.yaml", X)
    entry_id = junk(client, str(MAX_VERSION))

    for attempt in (publisher, Publisher(client)):  # with and without a floor
        with pytest.raises(VersionsExhausted) as raised:
            attempt.publish("app.yaml", Y)
        message = str(raised.value)
        assert f"entry {entry_id} of {EVENTS} is numbered {MAX_VERSION}" in message
        assert f"XDEL {EVENTS} {entry_id}" in message
        assert raised.value.entry_id == entry_id
    versions = cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrange(EVENTS))
    assert [f[b"version"] for _, f in versions] == [b"1", str(MAX_VERSION).encode()]

    client.xdel(EVENTS, entry_id)  # what the message says to do
    assert Publisher(client).publish("app.yaml", Y).version == 2


def test_workers_reporting_max_version_refuse_the_publish_naming_them(
    client: redis.Redis,
) -> None:
    publisher = Publisher(client)
    publisher.publish("app.yaml", X)
    with pytest.raises(VersionsExhausted, match=r"a worker of app\.yaml reports"):
        publisher.publish("app.yaml", Y, above=MAX_VERSION)
    assert len(events(client, "app.yaml")) == 1
    # one below: the last version there is, written and readable
    assert publisher.publish("app.yaml", Y, above=MAX_VERSION - 1).version == MAX_VERSION
    assert events(client, "app.yaml")[-1].version == MAX_VERSION


# ----------------------------------------------------------------- AOF, as deploy/redis runs
def test_entries_survive_an_aof_restart_with_the_default_user_off(tmp_path: Path) -> None:
    """deploy/redis: appendonly, the default user off. A script propagating two writes is
    wrapped in MULTI/EXEC, which Redis 7.0 loading its AOF runs as the default user: refused,
    the entry with it. The head is therefore not propagated: the AOF holds the XADD alone."""
    server = RedisServer(
        tmp_path / "r", appendonly=True,
        extra_args=("--user", "admin", "on", ">admin-password-1234", "~*", "&*", "+@all",
                    "--user", "default", "off"),
    )  # fmt: skip
    url = f"unix://admin:admin-password-1234@{server.socket_path}"

    process = start_redis_without_probe(server, url)
    try:
        client = connect(url, socket_timeout=5)
        publisher = Publisher(client)
        written = [publisher.publish("app.yaml", c).entry_id for c in (X, Y)]
        time.sleep(1.5)  # appendfsync everysec
        client.close()
        process.kill()
        process.wait(5)
        process = start_redis_without_probe(server, url)
        client = connect(url, socket_timeout=5)
        try:
            assert [e.id for e in events(client, "app.yaml")] == written
            assert client.acl_log() == []  # nothing refused while loading the AOF
            assert Publisher(client).publish("app.yaml", Y).written is False
            assert Publisher(client).publish("app.yaml", Z).version == 3
        finally:
            client.close()
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(5)
