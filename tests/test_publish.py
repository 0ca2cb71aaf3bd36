"""Compare-and-publish against a real redis-server: one entry per distinct content.

Several ``Publisher`` objects on one Redis stand for the daemons of several pods whose
kubelets update their mounts at different times: a publisher "replaying" contents is one
whose mount lags. None of them may put an older content over a newer one.
"""

from __future__ import annotations

from typing import cast

import pytest
import redis

from publisher import _fast
from publisher.publish import Publisher
from subscriber._redis import connect
from subscriber.errors import ContentTooLarge
from subscriber.keys import stream_keys
from subscriber.protocol import (
    MAX_CONTENT_BYTES,
    SCHEMA_VERSION,
    Event,
    now_ms,
    sha256_hex,
    sign,
    signing_key,
)
from subscriber.testing import RedisServer
from tests.helpers import events, race_publishers

EVENTS = stream_keys("app.yaml").events
KEY = b"a3f1c0de9b7e4f2a8c6d5e4f3a2b1c0d"
KEY_NEW = b"7e4f2a8c6d5e4f3a2b1c0da3f1c0de9b"
X, Y, Z = b"rev: x\n", b"rev: y\n", b"rev: z\n"


@pytest.fixture(autouse=True, params=["lua", "around-lua"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every decision both ways: the content through publish.lua, and around it
    (publisher._fast, from 0 bytes instead of 64 KiB)."""
    monkeypatch.setattr(_fast, "FAST_FROM", None if request.param == "lua" else 0)
    return str(request.param)


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


# ---------------------------------------------------------------- publishers whose mounts lag


def two_publishers(client: redis.Redis, **options: object) -> tuple[Publisher, Publisher]:
    """A fast and a slow publisher that both started on X (the fast one wrote it)."""
    fast = Publisher(client, publisher_id="fast:1", **options)  # type: ignore[arg-type]
    slow = Publisher(client, publisher_id="slow:2", **options)  # type: ignore[arg-type]
    assert fast.publish("app.yaml", X).written
    assert not slow.publish("app.yaml", X).written
    return fast, slow


def contents_and_versions(client: redis.Redis) -> list[tuple[bytes, int]]:
    return [(e.content, e.version) for e in entries(client)]


def test_a_lagging_publisher_never_publishes_an_older_content(client: redis.Redis) -> None:
    fast, slow = two_publishers(client)
    fast.publish("app.yaml", Y)
    fast.publish("app.yaml", Z)
    late = [slow.publish("app.yaml", c) for c in (Y, Z)]  # its kubelet is seconds behind
    assert [(r.written, r.version) for r in late] == [(False, 2), (False, 3)]
    assert contents_and_versions(client) == [(X, 1), (Y, 2), (Z, 3)]
    # the next change seen first by the slow one is published by it, as the next version
    assert (slow.publish("app.yaml", b"w").written, fast.publish("app.yaml", b"w").written) == (
        True,
        False,
    )
    assert [e.version for e in entries(client)] == [1, 2, 3, 4]


def test_a_lagging_publisher_that_skipped_a_version_publishes_nothing(
    client: redis.Redis,
) -> None:
    fast, slow = two_publishers(client)
    fast.publish("app.yaml", Y)
    fast.publish("app.yaml", Z)
    assert not slow.publish("app.yaml", Z).written  # its kubelet went from X straight to Z
    assert not slow.publish("app.yaml", Z).written
    assert contents_and_versions(client) == [(X, 1), (Y, 2), (Z, 3)]


def test_a_revert_is_published_and_a_lagging_publisher_replaying_it_writes_nothing(
    client: redis.Redis,
) -> None:
    fast, slow = two_publishers(client)
    assert [fast.publish("app.yaml", c).written for c in (Y, X)] == [True, True]
    assert contents_and_versions(client) == [(X, 1), (Y, 2), (X, 3)]
    late = [slow.publish("app.yaml", c) for c in (Y, X)]
    assert [(r.written, r.version) for r in late] == [(False, 2), (False, 3)]
    assert len(entries(client)) == 3


def test_a_flapping_config_seen_late_is_followed_step_by_step(client: redis.Redis) -> None:
    """X -> Y -> X -> Y: the slow one's first Y is the stream's v2, not the newest v4 (taken
    for v4, its late X would then be published over the newest Y)."""
    fast, slow = two_publishers(client)
    for content in (Y, X, Y):
        fast.publish("app.yaml", content)
    late = [slow.publish("app.yaml", c) for c in (Y, X, Y)]
    assert [(r.written, r.version) for r in late] == [(False, 2), (False, 3), (False, 4)]
    assert contents_and_versions(client) == [(X, 1), (Y, 2), (X, 3), (Y, 4)]


def test_reseeding_an_older_content_after_the_stream_moved_on_writes_nothing(
    client: redis.Redis,
) -> None:
    """After a reconnect every publisher publishes every key again; a lagging mount's
    content is not the newest any more and must stay where it is in the history."""
    fast, slow = two_publishers(client)
    fast.publish("app.yaml", Y)
    for _reconnect in range(3):
        reseeded = slow.publish("app.yaml", X)
        assert (reseeded.written, reseeded.version) == (False, 1)
        assert not fast.publish("app.yaml", Y).written
    assert contents_and_versions(client) == [(X, 1), (Y, 2)]


def test_a_deleted_stream_is_written_again_and_converges_on_the_newest(
    client: redis.Redis,
) -> None:
    fast, slow = two_publishers(client)
    fast.publish("app.yaml", Y)
    client.delete(EVENTS)
    # the lagging one happens to re-seed first: an empty stream takes whatever comes
    assert (slow.publish("app.yaml", X).written, slow.publish("app.yaml", X).version) == (True, 2)
    restored = fast.publish("app.yaml", Y)
    assert (restored.written, restored.version) == (True, 3)
    assert not slow.publish("app.yaml", Y).written  # its mount catches up
    assert contents_and_versions(client) == [(X, 2), (Y, 3)]


def test_a_base_newer_than_the_newest_entry_compares_with_the_newest_only(
    client: redis.Redis,
) -> None:
    """Redis lost its newest writes (an AOF tail, a failover to a lagging replica)."""
    fast, slow = two_publishers(client)
    fast.publish("app.yaml", Y)
    lost = fast.publish("app.yaml", Z)
    client.xdel(EVENTS, lost.entry_id)
    restored = fast.publish("app.yaml", Z)
    assert (restored.written, restored.version) == (True, 4)  # numbering continues
    assert not slow.publish("app.yaml", Y).written  # older than Z: not published again
    assert contents_and_versions(client) == [(X, 1), (Y, 2), (Z, 4)]


def test_a_restarted_publisher_publishes_a_revert_it_finds(client: redis.Redis) -> None:
    """No base (a daemon just started): the newest entry alone decides, as ever; a single
    per-pod daemon restarted after the ConfigMap went back to X publishes X again."""
    first = Publisher(client)
    first.publish("app.yaml", X)
    first.publish("app.yaml", Y)
    restarted = Publisher(client)
    result = restarted.publish("app.yaml", X)
    assert (result.written, result.version) == (True, 3)


def test_a_base_trimmed_from_the_history_skips_only_contents_still_retained(
    client: redis.Redis,
) -> None:
    """A publisher more than ``history`` versions behind (its base entry was trimmed)."""
    fast, slow = two_publishers(client, history=10)
    contents = [f"rev: {i}\n".encode() for i in range(2, 302)]
    for content in contents:
        fast.publish("app.yaml", content)
    retained = entries(client)
    assert retained[0].version > 1  # slow's base is gone
    caught_up = slow.publish("app.yaml", contents[-5])
    assert (caught_up.written, caught_up.version) == (False, 297)
    assert not slow.publish("app.yaml", contents[-1]).written
    assert fast.highest_version["app.yaml"] == 301
    other = Publisher(client, history=10)
    other.publish("app.yaml", contents[-1])
    other.base_ids["app.yaml"] = "1-0"  # as old as can be
    new = other.publish("app.yaml", b"rev: new\n")
    assert (new.written, new.version) == (True, 302)


def test_a_base_that_is_not_an_id_counts_as_unknown(client: redis.Redis) -> None:
    publisher = Publisher(client)
    publisher.publish("app.yaml", X)
    publisher.publish("app.yaml", Y)
    publisher.base_ids["app.yaml"] = "not-an-id"
    assert not publisher.publish("app.yaml", Y).written
    publisher.base_ids["app.yaml"] = "junk"
    assert publisher.publish("app.yaml", X).written


# ------------------------------------- publishers that start while their mount lags


def pod_a_wrote(client: redis.Redis, *contents: bytes, **options: object) -> Publisher:
    """pod-a's publisher, which wrote ``contents`` in turn."""
    pod_a = Publisher(client, publisher_id="pod-a:1", **options)  # type: ignore[arg-type]
    for content in contents:
        assert pod_a.publish("app.yaml", content).written
    return pod_a


def test_a_publisher_starting_on_another_host_with_an_older_content_writes_nothing(
    client: redis.Redis,
) -> None:
    """pod-b's daemon starts (scale-up, restart) while its kubelet still shows X and pod-a
    published Y and Z already: no X over Z, and catching up (through Y) writes nothing."""
    pod_a_wrote(client, X, Y, Z)
    newest = entries(client)[-1]
    pod_b = Publisher(client, publisher_id="pod-b:2")
    late = pod_b.publish("app.yaml", X)
    assert (late.written, late.superseded) == (False, True)
    assert (late.version, late.entry_id) == (3, newest.id)  # the newest entry, as superseded
    assert pod_b.base_ids["app.yaml"] == entries(client)[0].id  # X's: where its mount is
    assert pod_b.highest_version.get("app.yaml", 0) == 0
    again = pod_b.publish("app.yaml", X)  # a reconnect's re-seed, the mount still at X
    assert (again.written, again.version) == (False, 1)
    caught_up = [pod_b.publish("app.yaml", c) for c in (Y, Z)]  # its kubelet catches up
    assert [(r.written, r.superseded, r.version) for r in caught_up] == [
        (False, False, 2),
        (False, False, 3),
    ]
    assert contents_and_versions(client) == [(X, 1), (Y, 2), (Z, 3)]
    # and the next change, seen first by pod-b, is written by it
    w = b"rev: w\n"
    assert (pod_b.publish("app.yaml", w).written, pod_b.publish("app.yaml", w).version) == (
        True,
        4,
    )


def test_a_publisher_starting_on_another_host_with_the_newest_content_later_writes_nothing(
    client: redis.Redis,
) -> None:
    """Superseded first, then the mount shows the newest content: found, not written."""
    pod_a_wrote(client, X, Y)
    pod_b = Publisher(client, publisher_id="pod-b:2")
    assert pod_b.publish("app.yaml", X).superseded
    newest = pod_b.publish("app.yaml", Y)
    assert (newest.written, newest.superseded, newest.version) == (False, False, 2)
    assert contents_and_versions(client) == [(X, 1), (Y, 2)]


def test_a_publisher_restarted_on_the_same_host_writes_a_revert(client: redis.Redis) -> None:
    """pod-a's publisher restarted (a new pid) while its ConfigMap went back from Y to X: it
    wrote Y itself, so X is a revert, not a lagging mount. X may have been written by
    another pod: only the entries newer than X's count."""
    pod_b = Publisher(client, publisher_id="pod-b:2")
    assert pod_b.publish("app.yaml", X).written
    pod_a_wrote(client, Y)
    restarted = Publisher(client, publisher_id="pod-a:7")
    revert = restarted.publish("app.yaml", X)
    assert (revert.written, revert.superseded, revert.version) == (True, False, 3)
    assert restarted.base_ids["app.yaml"] == revert.entry_id
    assert contents_and_versions(client) == [(X, 1), (Y, 2), (X, 3)]
    assert not pod_b.publish("app.yaml", X).written  # its mount showed X all along
    assert len(entries(client)) == 3


def test_a_publisher_restarted_on_a_host_that_wrote_only_some_newer_entries_writes_nothing(
    client: redis.Redis,
) -> None:
    """X -> Y (pod-a) -> Z (pod-b): pod-a's restarted publisher holding X cannot tell a revert
    from its mount lagging behind pod-b's Z; held back (every publisher down during a revert
    is the case this leaves unpublished until the next change)."""
    pod_a = pod_a_wrote(client, X, Y)
    assert Publisher(client, publisher_id="pod-b:2").publish("app.yaml", Z).written
    restarted = Publisher(client, publisher_id="pod-a:7")
    assert restarted.publish("app.yaml", X).superseded
    assert restarted.publish("app.yaml", Y).version == 2  # found: catching up
    assert not pod_a.publish("app.yaml", Z).written
    assert contents_and_versions(client) == [(X, 1), (Y, 2), (Z, 3)]


def test_a_publisher_starting_with_a_content_never_published_writes_it(
    client: redis.Redis,
) -> None:
    pod_a_wrote(client, X, Y)
    started = Publisher(client, publisher_id="pod-b:2").publish("app.yaml", Z)
    assert (started.written, started.superseded, started.version) == (True, False, 3)
    # nor is the first publish into a missing stream held back
    assert Publisher(client, publisher_id="pod-b:3").publish("flags.json", X).written
    assert contents_and_versions(client) == [(X, 1), (Y, 2), (Z, 3)]


def test_a_starting_publisher_looks_only_through_the_retained_history(
    client: redis.Redis,
) -> None:
    """A content older than every retained entry, or than the maxlen + 100 newest entries
    (the most the script reads), is not found: written, as a new content."""
    newer = [f"rev: {i}\n".encode() for i in range(2, 150)]
    pod_a_wrote(client, X, *newer, history=1000)
    bounded = Publisher(client, publisher_id="pod-b:2", history=10)  # reads 110 entries
    assert Publisher(client, publisher_id="pod-c:3").publish("app.yaml", X).superseded
    beyond = bounded.publish("app.yaml", X)
    assert (beyond.written, beyond.version) == (True, 150)
    pod_a_wrote(client, *newer[:140], history=10)  # trimmed: X's entries are gone
    assert entries(client)[0].content != X
    late = Publisher(client, publisher_id="pod-d:4", history=10).publish("app.yaml", X)
    assert (late.written, late.version) == (True, 291)


def test_a_starting_publisher_takes_an_entry_without_a_publisher_for_another_hosts(
    client: redis.Redis,
) -> None:
    pod_a_wrote(client, X)
    client.xadd(EVENTS, {"version": "2", "sha256": sha256_hex(Y), "content": Y})
    assert Publisher(client, publisher_id="pod-a:2").publish("app.yaml", X).superseded
    assert client.xlen(EVENTS) == 2


def test_a_host_is_everything_before_the_last_colon(client: redis.Redis) -> None:
    pod_a_wrote(client, X)
    Publisher(client, publisher_id="10.0.0.1:80:5").publish("app.yaml", Y)
    assert Publisher(client, publisher_id="10.0.0.1:80:6").publish("app.yaml", X).written
    assert Publisher(client, publisher_id="10.0.0.1:7").publish("app.yaml", Y).superseded


# ------------------------------------------- Redis restarted empty, or with older data


def restart(server: RedisServer, client: redis.Redis, data: bytes | None = None) -> None:
    """Redis restarted without its data (no persistence: the streams and the script cache are
    gone), or, with ``data`` (a DUMP of the stream taken earlier), with older data: an old
    AOF, or a replica promoted before it had the last writes."""
    server.kill()
    server.start()
    if data is not None:
        client.restore(EVENTS, 0, data)


def id_tuple(entry_id: str) -> tuple[int, int]:
    ms, seq = entry_id.split("-")
    return int(ms), int(seq)


def lagging_at_x(client: redis.Redis, **options: object) -> tuple[Publisher, Publisher]:
    """The fast publisher wrote X, Y, Z; the slow one's mount still shows X (re-seeded: v1)."""
    fast, slow = two_publishers(client, **options)
    fast.publish("app.yaml", Y)
    fast.publish("app.yaml", Z)
    assert (slow.publish("app.yaml", X).written, slow.base_ids["app.yaml"]) == (
        False,
        entries(client)[0].id,
    )
    return fast, slow


def test_after_an_empty_restart_a_lagging_publisher_with_nothing_new_writes_nothing(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    """The up-to-date publisher re-seeds Z first; the lagging one's base entry is gone and its
    X is unchanged since: comparing with the newest alone, it would put X back on top."""
    fast, slow = lagging_at_x(client)
    restart(redis_server, client)
    reseeded = fast.publish("app.yaml", Z)
    assert (reseeded.written, reseeded.version) == (True, 4)
    late = slow.publish("app.yaml", X)
    assert (late.written, late.superseded, late.version) == (False, True, 4)
    assert late.entry_id == reseeded.entry_id == slow.base_ids["app.yaml"]
    assert slow.highest_version["app.yaml"] == 1  # its content is not v4's: the floor stays
    again = slow.publish("app.yaml", X)  # another reconnect, the mount still lags
    assert (again.written, again.superseded, again.entry_id) == (False, True, late.entry_id)
    caught_up = slow.publish("app.yaml", Z)  # its kubelet catches up: found, not superseded
    assert (caught_up.written, caught_up.superseded, caught_up.version) == (False, False, 4)
    assert contents_and_versions(client) == [(Z, 4)]
    # and the next change, seen first by the slow one, is written by it
    assert (slow.publish("app.yaml", b"w").written, fast.publish("app.yaml", b"w").written) == (
        True,
        False,
    )
    assert contents_and_versions(client) == [(Z, 4), (b"w", 5)]


def test_after_an_empty_restart_a_publisher_holding_a_newer_content_writes_it(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    """The ConfigMap changed to W while Redis was away and the slow node's kubelet showed it
    first: changed since its base, it is written after Z, and the fast publisher, Z unchanged,
    does not put Z back over it on its next re-seed."""
    fast, slow = lagging_at_x(client)
    restart(redis_server, client)
    assert fast.publish("app.yaml", Z).written
    assert slow.publish("app.yaml", X).superseded
    w = b"rev: w\n"
    newer = slow.publish("app.yaml", w)
    assert (newer.written, newer.version) == (True, 5)
    reseeded = fast.publish("app.yaml", Z)  # a reconnect: found at its base, as ever
    assert (reseeded.written, reseeded.version) == (False, 4)
    assert not fast.publish("app.yaml", w).written
    assert contents_and_versions(client) == [(Z, 4), (w, 5)]
    # the newer content written first into the empty stream: the same end
    restart(redis_server, client)
    assert (slow.publish("app.yaml", w).written, fast.publish("app.yaml", w).written) == (
        True,
        False,
    )
    assert contents_and_versions(client) == [(w, 6)]


def test_a_superseded_publisher_that_reseeds_an_empty_redis_first_does_not_hold_back_the_newest(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    """An empty stream takes whatever comes first, and the lagging publisher's older X comes
    first; numbered from its own floor, X is not taken for a content newer than the fast
    publisher's Z, which it restores over X."""
    fast, slow = lagging_at_x(client)
    restart(redis_server, client)
    fast.publish("app.yaml", Z)
    assert slow.publish("app.yaml", X).superseded
    restart(redis_server, client)
    first = slow.publish("app.yaml", X)
    assert (first.written, first.version) == (True, 2)
    restored = fast.publish("app.yaml", Z)
    assert (restored.written, restored.version) == (True, 5)
    assert not slow.publish("app.yaml", X).written  # found at its base, as ever
    assert contents_and_versions(client) == [(X, 2), (Z, 5)]


def test_a_lagging_publisher_whose_base_was_trimmed_reseeds_nothing(client: redis.Redis) -> None:
    """More than ``history`` versions behind with its content unchanged: not in the retained
    history, and not newer than the newest entry either."""
    fast, slow = two_publishers(client, history=10)
    for i in range(2, 302):
        fast.publish("app.yaml", f"rev: {i}\n".encode())
    assert entries(client)[0].version > 1  # slow's base is gone
    reseeded = slow.publish("app.yaml", X)
    assert (reseeded.written, reseeded.superseded, reseeded.version) == (False, True, 301)
    assert entries(client)[-1].content == b"rev: 301\n"


def test_redis_restarted_with_older_data_restores_the_newer_content(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    """The stream comes back as it was at Y (an old AOF): the newest entry is older than the
    fast publisher's base, so Z is restored, as the next version; the slow one finds X."""
    fast, slow = two_publishers(client)
    fast.publish("app.yaml", Y)
    at_y = cast(bytes, client.dump(EVENTS))
    lost = fast.publish("app.yaml", Z)
    restart(redis_server, client, at_y)
    assert not slow.publish("app.yaml", X).written  # its base is still there
    restored = fast.publish("app.yaml", Z)
    assert (restored.written, restored.superseded, restored.version) == (True, False, 4)
    assert id_tuple(restored.entry_id) > id_tuple(lost.entry_id)
    assert not fast.publish("app.yaml", Z).written
    assert contents_and_versions(client) == [(X, 1), (Y, 2), (Z, 4)]


def test_after_a_failover_that_lost_writes_a_content_changed_since_the_base_is_written(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    """The replica promoted had X and Y only. The fast publisher restores Z, whose new entry
    id is newer than every lost base; a third publisher, whose base was the lost Z and whose
    mount got W meanwhile, still writes W (changed since its base), and the fast one does not
    put Z back over it."""
    fast, _slow = two_publishers(client)
    third = Publisher(client, publisher_id="third:3")
    third.publish("app.yaml", X)
    fast.publish("app.yaml", Y)
    at_y = cast(bytes, client.dump(EVENTS))
    lost = fast.publish("app.yaml", Z)
    assert not third.publish("app.yaml", Z).written
    restart(redis_server, client, at_y)
    restored = fast.publish("app.yaml", Z)
    assert (restored.written, restored.version) == (True, 4)
    assert id_tuple(restored.entry_id) > id_tuple(lost.entry_id)
    w = b"rev: w\n"
    newer = third.publish("app.yaml", w)
    assert (newer.written, newer.version) == (True, 5)
    assert not fast.publish("app.yaml", Z).written
    assert contents_and_versions(client) == [(X, 1), (Y, 2), (Z, 4), (w, 5)]


def test_after_a_failover_a_lagging_publisher_that_restores_first_is_overwritten(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    """The promoted replica had X only and the lagging publisher (at Y) restores first: its
    entry is newer than the fast publisher's lost base, but numbered from its own floor, so
    the fast one is not superseded by it and restores Z over it."""
    fast, slow = two_publishers(client)
    at_x = cast(bytes, client.dump(EVENTS))
    fast.publish("app.yaml", Y)
    assert not slow.publish("app.yaml", Y).written
    fast.publish("app.yaml", Z)
    restart(redis_server, client, at_x)
    first = slow.publish("app.yaml", Y)
    assert (first.written, first.version) == (True, 3)
    restored = fast.publish("app.yaml", Z)
    assert (restored.written, restored.version) == (True, 4)
    assert not slow.publish("app.yaml", Y).written
    assert contents_and_versions(client) == [(X, 1), (Y, 3), (Z, 4)]


# ------------------------------------------------------------------------------- signed


def xadd_forged(client: redis.Redis, content: bytes, version: int) -> str:
    """A copy of ``content`` with our key id and a signature that does not verify."""
    fields = {
        "schema": SCHEMA_VERSION,
        "key": "app.yaml",
        "version": version,
        "sha256": sha256_hex(content),
        "content": content,
        "published_at": now_ms(),
        "publisher": "attacker:1",
        "sig": "0" * 64,
        "kid": Publisher(client, signing_key=KEY).key_id,
    }
    return cast(bytes, client.xadd(EVENTS, fields)).decode()  # type: ignore[arg-type]


def assert_all_signed(client: redis.Redis, secret: bytes = KEY) -> None:
    key = signing_key(secret)
    for e in entries(client):
        assert e.sig == sign(key, e.key, e.version, e.sha256, e.published_at)


def test_signed_a_lagging_publisher_never_publishes_an_older_content(
    client: redis.Redis,
) -> None:
    fast, slow = two_publishers(client, signing_key=KEY)
    fast.publish("app.yaml", Y)
    fast.publish("app.yaml", Z)
    late = [slow.publish("app.yaml", c) for c in (Y, Z, Y)]
    assert [(r.written, r.version) for r in late] == [(False, 2), (False, 3), (True, 4)]
    assert contents_and_versions(client) == [(X, 1), (Y, 2), (Z, 3), (Y, 4)]
    assert_all_signed(client)


def test_signed_and_sensitive_reseed_of_an_older_content_writes_nothing(
    client: redis.Redis,
) -> None:
    fast, slow = two_publishers(client, signing_key=KEY)
    fast.publish("app.yaml", Y, sensitive=True)
    fast.publish("app.yaml", Z, sensitive=True)
    slow.publish("app.yaml", Y, sensitive=True)
    assert not slow.publish("app.yaml", Y, sensitive=True).written  # re-seed
    assert not slow.publish("app.yaml", Z, sensitive=True).written
    assert [e.sensitive for e in entries(client)] == [False, True, True]
    assert_all_signed(client)


def test_signed_a_forged_copy_neither_holds_back_nor_causes_a_rollback(
    client: redis.Redis,
) -> None:
    fast, slow = two_publishers(client, signing_key=KEY)
    fast.publish("app.yaml", Y)
    xadd_forged(client, Z, 3)  # appended by someone with write access, ahead of the real Z
    real = fast.publish("app.yaml", Z)
    assert (real.written, real.version) == (True, 4)
    # the slow one finds the forged Z first (at or after its base), looks past it to the real
    late = [slow.publish("app.yaml", c) for c in (Y, Z)]
    assert [(r.written, r.version) for r in late] == [(False, 2), (False, 4)]
    assert [e.publisher for e in entries(client)] == ["fast:1", "fast:1", "attacker:1", "fast:1"]


def test_signed_a_publisher_on_the_previous_key_does_not_publish_over_the_rotated_one(
    client: redis.Redis,
) -> None:
    """The key Secret reaches one pod first: it publishes every key again with the new key;
    a pod still on the old key that re-seeds must not put its old-key copy back on top."""
    fast, slow = two_publishers(client, signing_key=KEY)
    fast.set_signing_key(KEY_NEW)
    rotated = fast.publish("app.yaml", X)
    assert (rotated.written, rotated.version) == (True, 2)
    assert not slow.publish("app.yaml", X).written  # re-seed, still on the old key
    slow.set_signing_key(KEY_NEW)
    assert not slow.publish("app.yaml", X).written  # its Secret mount caught up
    assert [e.kid for e in entries(client)] == [
        Publisher(client, signing_key=KEY).key_id,
        fast.key_id,
    ]


def test_signed_after_an_empty_restart_a_lagging_publisher_with_nothing_new_writes_nothing(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    fast, slow = lagging_at_x(client, signing_key=KEY)
    restart(redis_server, client)
    assert fast.publish("app.yaml", Z).written
    late = slow.publish("app.yaml", X)
    assert (late.written, late.superseded, late.version) == (False, True, 4)
    assert slow.publish("app.yaml", X).superseded
    assert not slow.publish("app.yaml", Z).written
    assert contents_and_versions(client) == [(Z, 4)]
    assert_all_signed(client)


def test_sensitive_after_an_empty_restart_a_lagging_publisher_with_nothing_new_writes_nothing(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    """Unsigned but sensitive (the script's extended mode)."""
    fast = Publisher(client, publisher_id="fast:1")
    slow = Publisher(client, publisher_id="slow:2")
    fast.publish("app.yaml", X, sensitive=True)
    assert not slow.publish("app.yaml", X, sensitive=True).written
    fast.publish("app.yaml", Y, sensitive=True)
    fast.publish("app.yaml", Z, sensitive=True)
    restart(redis_server, client)
    assert fast.publish("app.yaml", Z, sensitive=True).written
    late = slow.publish("app.yaml", X, sensitive=True)
    assert (late.written, late.superseded, late.version) == (False, True, 4)
    assert not slow.publish("app.yaml", Z, sensitive=True).written
    assert [(e.content, e.version, e.sensitive) for e in entries(client)] == [(Z, 4, True)]


def test_signed_a_publisher_starting_on_another_host_with_an_older_content_writes_nothing(
    client: redis.Redis,
) -> None:
    pod_a_wrote(client, X, Y, Z, signing_key=KEY)
    pod_b = Publisher(client, publisher_id="pod-b:2", signing_key=KEY)
    late = pod_b.publish("app.yaml", X)
    assert (late.written, late.superseded, late.version, late.kid) == (
        False,
        True,
        3,
        pod_b.key_id,
    )
    caught_up = [pod_b.publish("app.yaml", c) for c in (X, Y, Z)]
    assert [(r.written, r.version) for r in caught_up] == [(False, 1), (False, 2), (False, 3)]
    # same host, new pid: a revert, signed for the next version
    revert = Publisher(client, publisher_id="pod-a:9", signing_key=KEY).publish("app.yaml", Y)
    assert (revert.written, revert.version) == (True, 4)
    # a content never published
    new = Publisher(client, publisher_id="pod-c:3", signing_key=KEY).publish("app.yaml", b"w")
    assert (new.written, new.version) == (True, 5)
    assert contents_and_versions(client) == [(X, 1), (Y, 2), (Z, 3), (Y, 4), (b"w", 5)]
    assert_all_signed(client)


def test_signed_and_sensitive_a_starting_publisher_matches_key_id_and_mark(
    client: redis.Redis,
) -> None:
    """An older entry of the content with another key id, or unmarked, does not carry it: a
    new signing key or a newly sensitive key is published again, as ever."""
    pod_a_wrote(client, X, Y, signing_key=KEY)
    rotated = Publisher(client, publisher_id="pod-b:2", signing_key=KEY_NEW)
    assert rotated.publish("app.yaml", X).written
    marked = Publisher(client, publisher_id="pod-c:3", signing_key=KEY_NEW)
    assert marked.publish("app.yaml", Y, sensitive=True).written
    late = Publisher(client, publisher_id="pod-d:4", signing_key=KEY_NEW)
    assert late.publish("app.yaml", X).superseded  # found v3, and pod-c wrote v4 after it
    assert [(e.content, e.sensitive) for e in entries(client)] == [
        (X, False),
        (Y, False),
        (X, False),
        (Y, True),
    ]


def test_signed_a_starting_publisher_looks_past_a_forged_newest_entry(
    client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Superseded by a newest entry that does not verify: as for any superseded answer, the
    forged entry is looked past (and the content written) rather than trusted."""
    pod_a_wrote(client, X, Y, signing_key=KEY)
    xadd_forged(client, Z, 3)
    late = Publisher(client, publisher_id="pod-a:2", signing_key=KEY).publish("app.yaml", Y)
    assert (late.written, late.version) == (True, 4)
    assert "newest entry v3, written after this publisher's previous call" in caplog.text
    assert [e.publisher for e in entries(client)] == ["pod-a:1", "pod-a:1", "attacker:1", "pod-a:2"]


def test_signed_a_forged_newest_entry_does_not_hold_back_a_restore(
    redis_server: RedisServer, client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """After an empty restart someone appends a forged entry with a high version ahead of the
    re-seeds: the fast publisher, Z unchanged, looks past it and restores Z."""
    fast, slow = lagging_at_x(client, signing_key=KEY)
    restart(redis_server, client)
    xadd_forged(client, b"rev: forged\n", 9)
    restored = fast.publish("app.yaml", Z)
    assert (restored.written, restored.version) == (True, 10)
    assert "newest entry v9, written after this publisher's previous call" in caplog.text
    late = slow.publish("app.yaml", X)  # superseded by the genuine Z
    assert (late.written, late.superseded, late.version) == (False, True, 10)
    assert [e.publisher for e in entries(client)] == ["attacker:1", "fast:1"]
