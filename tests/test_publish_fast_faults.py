"""Faults around the path for large contents (``publisher/_fast.py``), each against a real
redis-server: Redis users whose ACL lets only part of the transaction run, and a key someone
else wrote at ``:aside``. What must hold whatever the ACL or the keyspace: the same decisions
as through Lua, no entry the script did not decide on, the stream never left at ``:aside``
nor replaced, one warning for a user the path is not for. (Found by a review; each test
failed on the code before its fix.)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis

from publisher import _fast
from publisher._admin import connect_any
from publisher._head import head_key
from publisher.publish import Publisher
from subscriber._redis import connect
from subscriber.keys import stream_keys
from subscriber.protocol import now_ms, sha256_hex
from tests.conftest import Processes
from tests.helpers import events, wait_until
from tests.test_sentinel import SERVICE, SentinelSetup

EVENTS = stream_keys("app.yaml").events
ASIDE = _fast.aside_key(EVENTS)
HEAD = head_key("app.yaml", "hotreload")
SIZE = 100 * 1024  # above FAST_FROM
PASSWORD = "faulty-password-1234"


def big(label: str) -> bytes:
    head = f"rev: {label}\n".encode()
    return head + b"#" * (SIZE - len(head))


def moves(client: redis.Redis) -> int:
    """How many RENAMEs Redis ran (two per publish around Lua)."""
    stats = cast(dict[str, dict[str, Any]], client.info("commandstats"))
    return int(stats.get("cmdstat_rename", {}).get("calls", 0))


@pytest.fixture(autouse=True)
def _from_64_kib(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_fast, "FAST_FROM", 64 * 1024)


@pytest.fixture
def user(client: redis.Redis) -> Iterator[redis.Redis]:
    """A connection as the user ``faulty``, whose ACL each test sets first."""
    kwargs = client.connection_pool.connection_kwargs
    connection = redis.Redis(
        unix_socket_path=kwargs.get("path"), username="faulty", password=PASSWORD
    )
    try:
        yield connection
    finally:
        connection.close()


def acl(client: redis.Redis, *rules: str) -> None:
    setuser = ("ACL", "SETUSER", "faulty", "reset", "on", f">{PASSWORD}", *rules)
    client.execute_command(*setuser)  # type: ignore[no-untyped-call]


def warned(caplog: pytest.LogCaptureFixture) -> int:
    return len([r for r in caplog.records if "gen-users-acl.sh" in r.getMessage()])


def test_a_user_who_may_not_multi_publishes_through_lua_warning_once(
    client: redis.Redis, user: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Without MULTI the queued commands would each run on their own (the stream missing
    between them for every other client) and every large publish failed with "EXEC without
    MULTI", the first of a key too: the publisher now asks before the first one."""
    acl(client, "~*", "&*", "+@all", "-multi")
    publisher = Publisher(user)
    with caplog.at_level(logging.WARNING, logger="publisher._fast"):
        results = [publisher.publish("app.yaml", big(label)) for label in "1223"]
    assert [(r.written, r.version) for r in results] == [
        (True, 1), (True, 2), (False, 2), (True, 3)
    ]  # fmt: skip
    assert [e.content for e in events(client, "app.yaml")] == [big("1"), big("2"), big("3")]
    assert moves(client) == 0  # nothing queued outside a transaction
    assert warned(caplog) == 1


def test_a_user_who_may_not_exists_never_appends_an_undecided_entry(
    client: redis.Redis, user: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Step 1 runs EXISTS before its RENAME: refused, the stream stayed in place and the
    queued XADD appended the proposal whatever the script decided (here: a copy of the newest
    content, numbered 1)."""
    ahead = Publisher(client)
    for label in "12":
        ahead.publish("app.yaml", big(label))
    acl(client, "~*", "&*", "+@all", "-exists")
    with caplog.at_level(logging.WARNING, logger="publisher._fast"):
        found = Publisher(user).publish("app.yaml", big("2"))
        written = Publisher(user).publish("app.yaml", big("3"))
    assert (found.written, found.version) == (False, 2)
    assert (written.written, written.version) == (True, 3)
    assert [e.content for e in events(client, "app.yaml")] == [big("1"), big("2"), big("3")]
    assert warned(caplog) == 2  # one per Publisher: each asks once


def test_a_rename_allowed_one_way_only_never_leaves_the_stream_aside(
    client: redis.Redis, user: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """RENAME :events -> :aside allowed (write on :aside is enough for a destination), the
    way back not (its source needs read too): the stream was moved aside and stayed there,
    :events missing for every reader, and every publish raised."""
    acl(client, "%RW~*", "&*", "+@all", "-rename", "(%RW~*:events %W~*:aside +rename)")
    publisher = Publisher(user)
    with caplog.at_level(logging.WARNING, logger="publisher._fast"):
        results = [publisher.publish("app.yaml", big(label)) for label in "123"]
    assert [(r.written, r.version) for r in results] == [(True, 1), (True, 2), (True, 3)]
    assert sorted(client.keys("*")) == sorted([EVENTS.encode(), b"hotreload:{app.yaml}:head"])
    assert moves(client) == 0
    assert warned(caplog) == 1


@pytest.mark.parametrize("junk", ["string", "hash"])
def test_a_key_someone_wrote_at_aside_never_becomes_the_stream(
    client: redis.Redis, junk: str
) -> None:
    """The first publish of a key (no :events yet) moved whatever was at :aside to :events
    in its last step: a junk string became the stream, and every publish after failed with
    WRONGTYPE where Lua writes the first entry."""
    if junk == "string":
        client.set(ASIDE, "junk")
    else:
        client.hset(ASIDE, "junk", "1")
    publisher = Publisher(client)
    results = [publisher.publish("app.yaml", big(label)) for label in "12"]

    assert [(r.written, r.version) for r in results] == [(True, 1), (True, 2)]
    assert client.type(EVENTS) == b"stream"
    assert [e.content for e in events(client, "app.yaml")] == [big("1"), big("2")]
    assert moves(client) == 2  # the second went around Lua (and overwrote the junk)
    assert client.exists(ASIDE) == 0


def test_multi_refused_after_the_probe_is_a_refusal_not_an_exception(
    client: redis.Redis, user: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """The ACL changed while the publisher runs (the probe is asked once): MULTI refused, the
    EXEC answered "EXEC without MULTI", which was raised from every large publish."""
    acl(client, "~*", "&*", "+@all")
    publisher = Publisher(user)
    for label in "12":
        publisher.publish("app.yaml", big(label))
    acl(client, "~*", "&*", "+@all", "-multi")
    with caplog.at_level(logging.WARNING, logger="publisher._fast"):
        third = publisher.publish("app.yaml", big("3"))
        fourth = publisher.publish("app.yaml", big("4"))
    assert (third.version, fourth.version, fourth.written) == (3, 4, True)
    assert [e.version for e in events(client, "app.yaml")] == [1, 2, 3, 4]
    assert warned(caplog) == 1


def test_a_head_written_for_a_refused_xadd_never_vouches_once_the_length_matches(
    client: redis.Redis,
) -> None:
    """The script consents to an id above the newest entry, Redis refuses it (a deleted entry
    had a higher one): the head records a length the stream does not have. Should nothing be
    appended next (the publisher stopped before publishing through Lua) while the stream is
    trimmed to exactly that length (make_room, an operator's XTRIM), that head matched the
    stream and vouched for the entry that never was: its content counted as published."""
    publisher = Publisher(client, history=2)
    for label in "123":
        publisher.publish("app.yaml", big(label))
    newest = cast(list[tuple[bytes, object]], client.xrevrange(EVENTS, count=1))[0][0]
    ghost = client.xadd(EVENTS, {"junk": "1"}, id=f"{int(time.time() * 1000) + 700}-0")
    client.xdel(EVENTS, ghost)
    fast = cast(_fast.FastPath, publisher._fast)
    keys = [EVENTS, HEAD]
    args: list[bytes | str | int | float] = [
        sha256_hex(big("4")), big("4"), now_ms(), publisher.publisher_id, "app.yaml", 1, 2, 3,
        newest.decode(), sha256_hex(big("3")), 0,
    ]  # fmt: skip
    length = int(client.xlen(EVENTS))
    maxlen = 2 if length == 3 else 3
    reply = fast._transaction(keys, args, 4, f"{int(time.time() * 1000)}-0", maxlen)
    assert reply is None  # consented, refused by Redis: nothing written
    client.xtrim(EVENTS, maxlen=min(length + 1, maxlen))  # the length that head recorded

    result = Publisher(client, history=2).publish("app.yaml", big("4"))

    assert (result.written, result.version) == (True, 4)
    assert events(client, "app.yaml")[-1].content == big("4")


@pytest.mark.slow
def test_a_sentinel_failover_mid_stream_keeps_one_entry_per_content_and_nothing_aside(
    tmp_path: Path, processes: Processes
) -> None:
    """SENTINEL FAILOVER while one publisher publishes large contents every 20 ms: until the
    sentinels demote the old master it is written to (its connections are pooled: as through
    Lua), then its answers (READONLY, a ConnectionError from redis-py's Sentinel pool) send the
    publish through Lua on the new master, and every later one goes around Lua there. The new
    master ends with increasing versions, one entry per content, no :aside, and the demoted
    master with exactly its stream."""
    setup = SentinelSetup(tmp_path, processes)
    try:
        replica = connect(setup.replica.url, socket_timeout=5)
        old = connect(setup.master.url, socket_timeout=5)
        wait_until(lambda: replica.info("replication")["master_link_status"] == "up", timeout=30)
        publisher = Publisher(cast(redis.Redis, connect_any(setup.url, socket_timeout=5)))
        published: list[int] = []
        stop = threading.Event()

        def run() -> None:
            label = 0
            while not stop.is_set():
                label += 1
                while not stop.is_set():
                    try:
                        publisher.publish("app.yaml", big(str(label)))
                    except (redis.ConnectionError, redis.TimeoutError):
                        time.sleep(0.05)  # no master known for a moment: as the daemon does
                        continue
                    published.append(label)
                    time.sleep(0.02)
                    break

        thread = threading.Thread(target=run)
        thread.start()
        try:
            wait_until(lambda: len(published) > 20, timeout=30)
            wait_until(lambda: _failover(setup.ports[0]), timeout=30)
            wait_until(lambda: old.info("replication")["role"] == "slave", timeout=60)
            after = len(published)
            wait_until(lambda: len(published) > after + 20, timeout=30)
        finally:
            stop.set()
            thread.join(30)
        entries = events(replica, "app.yaml")  # the promoted master
        labels = [int(e.content.split(b"\n")[0].split(b" ")[1]) for e in entries]
        versions = [e.version for e in entries]
        assert labels == sorted(set(labels))
        assert versions == sorted(set(versions))
        assert labels[-1] == published[-1]
        assert moves(replica) > 0  # around Lua on the new master
        for server in (replica, old):
            assert ASIDE.encode() not in server.keys("*")
        wait_until(lambda: old.xrange(EVENTS) == replica.xrange(EVENTS), timeout=10)
        old.close()
        replica.close()
    finally:
        setup.stop()


def _failover(port: int) -> bool:
    """SENTINEL FAILOVER, False while the sentinel has no replica it deems good yet
    (NOGOODSLAVE: its view of the replica is refreshed every few seconds)."""
    asker = redis.Redis(port=port, socket_timeout=5)
    try:
        asker.execute_command("SENTINEL", "FAILOVER", SERVICE)  # type: ignore[no-untyped-call]
    except redis.ResponseError:
        return False
    finally:
        asker.close()
    return True


def test_a_key_of_another_type_at_events_stays_there_as_through_lua(
    client: redis.Redis,
) -> None:
    """Not a stream at :events: through Lua the publish fails (WRONGTYPE) and nothing moves.
    Around Lua it must too: moved aside by step 1 and left there by a last step that moves
    back only a stream, :events would be missing and published to afresh (on the master
    alone: the moves are not replicated, the XADD is)."""
    client.set(EVENTS, "junk")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        Publisher(client).publish("app.yaml", big("1"))
    assert client.get(EVENTS) == b"junk"
    assert client.exists(ASIDE) == 0
