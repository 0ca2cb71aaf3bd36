"""Faults around the path for large contents (``publisher/_fast.py``), each against a real
redis-server: Redis users whose ACL lets only part of the transaction run, and a key someone
else wrote at ``:aside``. What must hold whatever the ACL or the keyspace: the same decisions
as through Lua, no entry the script did not decide on, the stream never left at ``:aside``
nor replaced, one warning for a user the path is not for. (Found by a review; each test
failed on the code before its fix.)
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, cast

import pytest
import redis

from publisher import _fast
from publisher.publish import Publisher
from subscriber.keys import stream_keys
from tests.helpers import events

EVENTS = stream_keys("app.yaml").events
ASIDE = _fast.aside_key(EVENTS)
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
