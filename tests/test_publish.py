"""Compare-and-publish against a real redis-server: one entry per distinct content."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from publisher.publish import Publisher
from subscriber._redis import connect
from subscriber.errors import ContentTooLarge
from subscriber.keys import stream_keys
from subscriber.protocol import MAX_CONTENT_BYTES, Event, sha256_hex
from subscriber.testing import RedisServer
from tests.helpers import events, race_publishers

EVENTS = stream_keys("app.yaml").events


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    c = connect(redis_server.url, socket_timeout=5)
    yield c
    c.close()


def entries(client: redis.Redis, key: str = "app.yaml") -> list[Event]:
    return events(client, key)


def test_same_content_is_published_once(client: redis.Redis) -> None:
    publisher = Publisher(client)
    first = publisher.publish("app.yaml", b"limit: 1\n")
    again = publisher.publish("app.yaml", b"limit: 1\n")
    assert (first.written, first.version) == (True, 1)
    assert (again.written, again.version, again.entry_id) == (False, 1, first.entry_id)
    [event] = entries(client)
    assert event.content == b"limit: 1\n"
    assert event.sha256 == sha256_hex(b"limit: 1\n")
    assert event.key == "app.yaml"
    assert event.publisher == publisher.publisher_id


def test_versions_increase_and_an_old_content_is_a_new_version(client: redis.Redis) -> None:
    publisher = Publisher(client)
    versions = [publisher.publish("app.yaml", c).version for c in (b"a", b"b", b"a", b"a")]
    assert versions == [1, 2, 3, 3]
    assert [e.content for e in entries(client)] == [b"a", b"b", b"a"]


def test_keys_are_numbered_independently(client: redis.Redis) -> None:
    publisher = Publisher(client)
    publisher.publish("app.yaml", b"a")
    publisher.publish("app.yaml", b"b")
    assert publisher.publish("flags.json", b"{}").version == 1


def test_floor_keeps_versions_rising_after_redis_lost_the_stream(client: redis.Redis) -> None:
    publisher = Publisher(client)
    for content in (b"1", b"2", b"3"):
        publisher.publish("app.yaml", content)
    client.delete(EVENTS)
    republished = publisher.publish("app.yaml", b"3")
    assert republished.written
    assert republished.version == 4
    # another publisher that never saw the old stream continues from the newest entry
    assert Publisher(client).publish("app.yaml", b"4").version == 5


def test_flushed_script_cache_is_reloaded(client: redis.Redis) -> None:
    publisher = Publisher(client)
    publisher.publish("app.yaml", b"a")
    client.script_flush()
    assert publisher.publish("app.yaml", b"b").version == 2


def test_malformed_newest_entry_does_not_break_publishing(client: redis.Redis) -> None:
    publisher = Publisher(client)
    publisher.publish("app.yaml", b"a")
    client.xadd(EVENTS, {"garbage": "yes", "version": "not-a-number"})
    result = publisher.publish("app.yaml", b"b")
    assert (result.written, result.version) == (True, 2)


def test_history_is_bounded(client: redis.Redis) -> None:
    publisher = Publisher(client, history=10)
    for i in range(500):
        publisher.publish("app.yaml", str(i).encode())
    length = client.xlen(EVENTS)
    # approximate trimming works in whole stream nodes (100 entries by default)
    assert 10 <= length <= 110
    assert entries(client)[-1].version == 500


def test_oversized_content_is_refused_before_sending(client: redis.Redis) -> None:
    publisher = Publisher(client)
    publisher.publish("app.yaml", b"small")
    with pytest.raises(ContentTooLarge) as info:
        publisher.publish("app.yaml", b"x" * (MAX_CONTENT_BYTES + 1))
    assert info.value.size == MAX_CONTENT_BYTES + 1
    assert "app.yaml" in str(info.value)
    assert str(MAX_CONTENT_BYTES + 1) in str(info.value)
    largest = publisher.publish("app.yaml", b"y" * MAX_CONTENT_BYTES)
    assert largest.written
    assert [e.content[:5] for e in entries(client)] == [b"small", b"yyyyy"]


def test_racing_publishers_write_one_entry_per_content(redis_server: RedisServer) -> None:
    """4 publishers (as 4 pods would) publish the same 150 contents at the same moments."""
    contents = [f"rev: {i}\n".encode() for i in range(150)]
    race_publishers(redis_server.url, contents)
    client = connect(redis_server.url, socket_timeout=5)
    try:
        published = entries(client)
    finally:
        client.close()
    assert [e.content for e in published] == contents
    assert [e.version for e in published] == list(range(1, 151))
