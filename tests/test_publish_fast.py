"""Large contents published around Lua (``publisher/_fast.py``) against real redis-servers:
one transaction moves the stream aside, lets ``publish.lua`` decide on everything but the
content, appends the content with a plain ``XADD`` only on the script's consent, and moves the
stream back. What must hold: the same entries as through Lua, nothing but the ``XADD``
propagated (an AOF restart with the default user off, a replica), no duplicate among racing
publishers, blocked readers served only what was written, a refused proposal retried, a head
that never vouches for an entry the ``XADD`` did not append, and today's path for an ACL
without the new commands. Each test also checks that the path around Lua was taken (Redis
counts its ``RENAME`` calls), so it fails with the path turned off.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, cast

import pytest
import redis

from publisher import _fast
from publisher._head import head_key
from publisher.publish import Publisher
from subscriber._redis import connect
from subscriber.keys import stream_keys
from subscriber.protocol import now_ms, sha256_hex
from subscriber.testing import RedisServer
from tests.deploy.render import PASSWORDS
from tests.deploy.servers import generate_acl, password_env
from tests.helpers import events, race_publishers, start_redis_without_probe, wait_until

EVENTS = stream_keys("app.yaml").events
HEAD = head_key("app.yaml", "hotreload")
SIZE = 100 * 1024  # above FAST_FROM


def big(label: str, size: int = SIZE) -> bytes:
    """A content of ``size`` bytes, distinct per label."""
    head = f"rev: {label}\n".encode()
    return head + b"#" * (size - len(head))


def moves(client: redis.Redis) -> int:
    """How many RENAMEs Redis ran: two per publish around Lua, none through it."""
    stats = cast(dict[str, dict[str, Any]], client.info("commandstats"))
    return int(stats.get("cmdstat_rename", {}).get("calls", 0))


def head(client: redis.Redis) -> dict[str, str]:
    raw = cast(dict[bytes, bytes], client.hgetall(HEAD))
    return {k.decode(): v.decode() for k, v in raw.items()}


def newest_id(client: redis.Redis) -> str:
    newest = cast(list[tuple[bytes, object]], client.xrevrange(EVENTS, count=1))
    return newest[0][0].decode()


def test_a_large_content_is_appended_by_a_plain_xadd_with_its_head(client: redis.Redis) -> None:
    publisher = Publisher(client, history=3)
    publisher.publish("app.yaml", big("1"))  # no stream yet: through Lua
    before = moves(client)
    publisher.publish("app.yaml", big("2"))
    # the same fields, in the same order, as the entry the script wrote itself
    lua, around = cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrange(EVENTS))
    assert list(around[1]) == list(lua[1])
    results = [publisher.publish("app.yaml", big(str(i))) for i in range(3, 7)]
    again = Publisher(client, history=3).publish("app.yaml", big("6"))

    assert moves(client) - before == 2 * 6  # every call after the first went around Lua
    assert [r.version for r in results] == [3, 4, 5, 6]
    assert (again.written, again.entry_id) == (False, results[-1].entry_id)
    published = events(client, "app.yaml")
    assert published[-1].content == big("6")
    assert 3 <= len(published) <= 4  # history, or one more (the MAXLEN that is not XLEN)
    record = head(client)
    assert (record["id"], record["len"]) == (newest_id(client), str(client.xlen(EVENTS)))
    assert record["version"] == "6"
    assert sorted(client.keys("*")) == sorted([EVENTS.encode(), HEAD.encode()])


def test_a_small_publish_is_a_hand_packed_evalsha_and_a_flushed_script_still_publishes(
    client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not through redis-py's ``Script`` (its packing and command machinery were ~0.1 ms of
    a 1 KiB publish); ``NOSCRIPT`` goes to it, which loads the script again."""
    through_redis_py: list[object] = []
    evalsha = client.evalsha

    def counted(*args: Any, **kwargs: Any) -> Any:
        through_redis_py.append(args[0])
        return evalsha(*args, **kwargs)

    monkeypatch.setattr(client, "evalsha", counted)
    publisher = Publisher(client)
    first = publisher.publish("app.yaml", b"rev: 1\n")  # not loaded yet: NOSCRIPT, loaded
    assert through_redis_py
    through_redis_py.clear()
    again = publisher.publish("app.yaml", b"rev: 1\n")
    assert (first.written, first.version, again.written, again.version) == (True, 1, False, 1)
    assert through_redis_py == []
    client.script_flush()
    second = publisher.publish("app.yaml", b"rev: 2\n")
    assert (second.written, second.version) == (True, 2)
    assert through_redis_py  # NOSCRIPT: loaded again by redis-py's Script
    through_redis_py.clear()
    third = publisher.publish("app.yaml", b"rev: 3\n")
    assert (third.written, third.version, through_redis_py) == (True, 3, [])
    assert [e.content for e in events(client, "app.yaml")] == [
        b"rev: 1\n",
        b"rev: 2\n",
        b"rev: 3\n",
    ]


def test_signed_sensitive_and_rollout_fields_go_around_lua_too(client: redis.Redis) -> None:
    publisher = Publisher(client, signing_key=b"k" * 32)
    publisher.publish("app.yaml", big("1"), sensitive=True)
    before = moves(client)
    written = publisher.publish("app.yaml", big("2"), sensitive=True)
    found = Publisher(client, signing_key=b"k" * 32).publish("app.yaml", big("2"), sensitive=True)

    assert moves(client) - before == 4
    assert (written.written, written.version, found.written) == (True, 2, False)
    entry = events(client, "app.yaml")[-1]
    assert (entry.content, entry.sensitive, entry.kid) == (big("2"), True, publisher.key_id)


def test_a_refused_proposal_is_proposed_again_with_the_scripts_version(
    client: redis.Redis,
) -> None:
    ahead = Publisher(client)
    for label in ("1", "2", "3"):
        ahead.publish("app.yaml", big(label))
    behind = Publisher(client)  # proposes version 1: the script wants 4
    before = moves(client)
    result = behind.publish("app.yaml", big("4"))

    assert (result.written, result.version) == (True, 4)
    assert moves(client) - before == 4  # refused (aside and back), then consented
    assert [e.version for e in events(client, "app.yaml")] == [1, 2, 3, 4]


def test_racing_publishers_of_large_contents_write_one_entry_per_content(
    redis_server: RedisServer,
) -> None:
    contents = [big(str(i)) for i in range(40)]
    race_publishers(redis_server.url, contents)
    client = connect(redis_server.url, socket_timeout=5)
    try:
        published = events(client, "app.yaml")
        assert moves(client) > 0
    finally:
        client.close()
    assert [e.content for e in published] == contents
    assert [e.version for e in published] == list(range(1, 41))


def test_a_head_never_vouches_for_an_entry_the_xadd_refused(client: redis.Redis) -> None:
    """The script consents to an id above the newest entry; Redis refuses it when a deleted
    entry's id was higher (the stream's last id). The head the script wrote then records a
    length the stream does not have, and the publish goes through Lua."""
    publisher = Publisher(client)
    publisher.publish("app.yaml", big("1"))
    publisher.publish("app.yaml", big("2"))
    ms = int(time.time() * 1000) + 700  # ahead, within the second the script allows
    ghost = client.xadd(EVENTS, {"junk": "1"}, id=f"{ms}-0")
    client.xdel(EVENTS, ghost)
    before = cast(dict[str, dict[str, Any]], client.info("commandstats"))["cmdstat_xadd"]

    result = Publisher(client).publish("app.yaml", big("3"))

    after = cast(dict[str, dict[str, Any]], client.info("commandstats"))["cmdstat_xadd"]
    assert after.get("failed_calls", 0) > before.get("failed_calls", 0)  # refused the id
    assert (result.written, result.version) == (True, 3)
    assert [e.content for e in events(client, "app.yaml")] == [big("1"), big("2"), big("3")]
    record = head(client)
    assert (record["id"], record["len"]) == (result.entry_id, "3")
    assert Publisher(client).publish("app.yaml", big("3")).written is False


def test_a_blocked_reader_is_served_only_what_was_written(client: redis.Redis) -> None:
    publisher = Publisher(client)
    last = publisher.publish("app.yaml", big("1")).entry_id
    publisher.publish("app.yaml", big("2"))
    start = publisher.publish("app.yaml", big("1"))  # a revert: written (v3)
    served: list[Any] = []
    kwargs = client.connection_pool.connection_kwargs
    reader = redis.Redis(unix_socket_path=kwargs.get("path"), socket_timeout=10)

    def read() -> None:
        served.append(reader.xread({EVENTS: start.entry_id}, block=8000))

    thread = threading.Thread(target=read)
    thread.start()
    try:
        wait_until(lambda: any(c.get("cmd") == "xread" for c in client.client_list()))
        before = moves(client)
        skipped = Publisher(client).publish("app.yaml", big("1"))  # found: nothing written
        superseded = publisher.publish("app.yaml", big("1"))  # found too
        written = publisher.publish("app.yaml", big("4"))
        thread.join(10)
    finally:
        reader.close()
    assert moves(client) - before == 6
    assert (skipped.written, superseded.written, written.written) == (False, False, True)
    assert last != start.entry_id
    [[_stream, entries]] = served[0]
    assert [entry_id.decode() for entry_id, _ in entries] == [written.entry_id]


def test_a_user_without_the_new_commands_publishes_through_lua_warning_once(
    client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """The publisher user of deploy/redis/gen-users-acl.sh before this: no RENAME, no
    :aside key."""
    client.acl_setuser(
        "publisher", enabled=True, passwords=["+publisher-password-1234"], reset_keys=True,
        keys=["%RW~hotreload:{*}:events", "%RW~hotreload:{*}:head"],
        commands=["+ping", "+evalsha", "+script|load", "+xadd", "+xrevrange", "+xrange",
                  "+xlen", "+exists", "+hgetall", "+hset", "+time", "+multi", "+exec",
                  "+spublish"],
        channels=["hotreload:{*}:notify"],
    )  # fmt: skip
    kwargs = client.connection_pool.connection_kwargs
    user = redis.Redis(
        unix_socket_path=kwargs.get("path"), username="publisher",
        password="publisher-password-1234",
    )  # fmt: skip
    try:
        publisher = Publisher(user)
        with caplog.at_level(logging.WARNING, logger="publisher._fast"):
            results = [publisher.publish("app.yaml", big(str(i))) for i in (1, 2, 2, 3)]
    finally:
        user.close()
    assert [(r.written, r.version) for r in results] == [
        (True, 1), (True, 2), (False, 2), (True, 3)
    ]  # fmt: skip
    warnings = [r for r in caplog.records if "move" in r.getMessage()]
    assert len(warnings) == 1
    assert "gen-users-acl.sh" in warnings[0].getMessage()
    assert moves(client) == 0


# --------------------------------------------------- what is propagated: AOF and a replica
def test_large_entries_survive_an_aof_restart_with_the_default_user_off(tmp_path: Path) -> None:
    """deploy/redis: appendonly, the default user off; a transaction propagating two writes
    would be refused at the AOF load (see publisher/_head.py): only the XADD is propagated."""
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
        written = [publisher.publish("app.yaml", big(label)).entry_id for label in "1231"]
        publisher.publish("app.yaml", big("1"))  # found: refused
        assert moves(client) == 2 * 4
        time.sleep(1.5)  # appendfsync everysec
        client.close()
        process.kill()
        process.wait(5)
        process = start_redis_without_probe(server, url)
        client = connect(url, socket_timeout=5)
        try:
            assert [e.id for e in events(client, "app.yaml")] == written
            assert client.acl_log() == []  # nothing refused while loading the AOF
            assert sorted(client.keys("*")) == [EVENTS.encode()]  # no head, nothing aside
            assert Publisher(client).publish("app.yaml", big("1")).written is False
            assert Publisher(client).publish("app.yaml", big("4")).version == 5
        finally:
            client.close()
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(5)


def test_a_replica_ends_with_exactly_the_masters_stream_and_runs_only_xadds(
    tmp_path: Path,
) -> None:
    master = RedisServer(tmp_path / "m", unix=False)
    master.start()
    try:
        replica = RedisServer(
            tmp_path / "r", unix=False, extra_args=("--replicaof", "127.0.0.1", str(master.port))
        )
        replica.start()
        try:
            _publish_and_compare(master, replica)
        finally:
            replica.stop()
    finally:
        master.stop()


def _publish_and_compare(master: RedisServer, replica: RedisServer) -> None:
    client = connect(master.url, socket_timeout=5)
    copy = connect(replica.url, socket_timeout=5)
    try:
        wait_until(lambda: copy.info("replication")["master_link_status"] == "up", timeout=10)
        a, b = Publisher(client, history=3), Publisher(client, history=3)
        for label in ("1", "2", "3", "2", "4", "5", "6"):
            a.publish("app.yaml", big(label))
            b.publish("app.yaml", big(label))  # found, or superseded, or a refused proposal
        assert moves(client) >= 2 * 12

        def caught_up() -> bool:
            offset = client.info("replication")["master_repl_offset"]
            return bool(copy.info("replication")["master_repl_offset"] == offset)

        wait_until(caught_up, timeout=10)
        assert copy.xrange(EVENTS) == client.xrange(EVENTS)
        assert (
            copy.xinfo_stream(EVENTS)["last-generated-id"]
            == client.xinfo_stream(EVENTS)["last-generated-id"]
        )
        assert sorted(copy.keys("*")) == [EVENTS.encode()]  # the head is the master's alone
        ran = {
            name
            for name, stats in cast(dict[str, dict[str, Any]], copy.info("commandstats")).items()
            if stats.get("calls", 0) > 0
        }
        # what the replica executed from the master: the XADDs (as themselves) and its own
        # probes; never a script, a RENAME, a transaction or anything at :aside
        assert "cmdstat_xadd" in ran
        never = {"cmdstat_rename", "cmdstat_eval", "cmdstat_evalsha", "cmdstat_exec",
                 "cmdstat_multi", "cmdstat_hset", "cmdstat_set", "cmdstat_del",
                 "cmdstat_script"}  # fmt: skip
        assert not ran & never
    finally:
        client.close()
        copy.close()


@pytest.fixture(autouse=True)
def _from_64_kib(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped threshold, whatever another test module set."""
    monkeypatch.setattr(_fast, "FAST_FROM", 64 * 1024)


def test_the_shipped_publisher_user_goes_around_lua_with_no_acl_denial(tmp_path: Path) -> None:
    """deploy/redis/gen-users-acl.sh's publisher user, loaded by a real redis-server."""
    acl = tmp_path / "users.acl"
    generated = generate_acl(acl, password_env())
    assert generated.returncode == 0, generated.stderr
    with acl.open("a") as lines:  # someone to read the ACL log with
        lines.write("user admin on >admin-password-1234 ~* &* +@all\n")
    server = RedisServer(tmp_path / "r", extra_args=("--aclfile", str(acl)))
    admin_url = f"unix://admin:admin-password-1234@{server.socket_path}"
    process = start_redis_without_probe(server, admin_url)
    try:
        admin = connect(admin_url, socket_timeout=5)
        user = connect(
            f"unix://publisher:{PASSWORDS['publisher']}@{server.socket_path}", socket_timeout=5
        )
        try:
            publisher = Publisher(user)
            results = [publisher.publish("app.yaml", big(label)) for label in "12213"]
            assert [r.version for r in results] == [1, 2, 2, 3, 4]
            assert moves(admin) == 2 * 4
            assert admin.acl_log() == []
        finally:
            user.close()
            admin.close()
    finally:
        process.kill()
        process.wait(5)


def test_a_maxlen_equal_to_the_streams_length_is_refused_so_a_head_cannot_lie(
    client: redis.Redis,
) -> None:
    """With n = XLEN the head's length would match the stream whether or not the XADD
    appended: the script refuses such a proposal (8) and nothing is written."""
    publisher = Publisher(client, history=2)
    for label in "123":
        publisher.publish("app.yaml", big(label))
    length = client.xlen(EVENTS)
    assert length in (2, 3)
    fast = cast(_fast.FastPath, publisher._fast)
    keys = [EVENTS, HEAD]
    args: list[bytes | str | int | float] = [
        sha256_hex(big("4")), big("4"), now_ms(), publisher.publisher_id, "app.yaml", 1, 2, 3,
        newest_id(client), sha256_hex(big("3")), 0,
    ]  # fmt: skip
    entry_id = f"{int(time.time() * 1000)}-0"
    reply = fast._transaction(keys, args, 4, entry_id, length)

    assert reply is not None
    assert (int(reply[0]), int(reply[1]), int(reply[3])) == (_fast.REFUSED, 4, length)
    assert [e.version for e in events(client, "app.yaml")][-1] == 3
    assert head(client)["version"] == "3"
    other = 2 if length == 3 else 3  # the MAXLEN that is not the length: consented
    entry_id = f"{int(time.time() * 1000)}-0"  # afresh: an id must be within 1 s of Redis' clock
    reply = fast._transaction(keys, args, 4, entry_id, other)
    assert reply is not None
    assert int(reply[0]) == _fast.WRITTEN
    assert [e.version for e in events(client, "app.yaml")][-1] == 4


def test_after_a_script_flush_the_queued_xadd_appends_nothing(client: redis.Redis) -> None:
    """NOSCRIPT inside the EXEC: the XADD still runs, and must find no stream to append to."""
    publisher = Publisher(client)
    publisher.publish("app.yaml", big("1"))
    publisher.publish("app.yaml", big("2"))
    client.script_flush()
    before = moves(client)
    result = publisher.publish("app.yaml", big("3"))  # around Lua: NOSCRIPT; then through it

    assert moves(client) - before == 2  # aside and back, nothing appended in between
    assert (result.written, result.version) == (True, 3)
    assert [e.content for e in events(client, "app.yaml")] == [big("1"), big("2"), big("3")]


def test_a_user_who_may_not_rename_never_queues_an_undecided_xadd(
    client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Scripts and every key allowed, RENAME not: a refused RENAME inside the first step would
    leave the stream in place for the XADD, so the publisher asks before the first one."""
    client.acl_setuser(
        "norename", enabled=True, passwords=["+norename-password-1234"], keys=["~*"],
        channels=["*"], commands=["+@all", "-rename"],
    )  # fmt: skip
    kwargs = client.connection_pool.connection_kwargs
    user = redis.Redis(
        unix_socket_path=kwargs.get("path"), username="norename",
        password="norename-password-1234",
    )  # fmt: skip
    try:
        publisher = Publisher(user)
        with caplog.at_level(logging.WARNING, logger="publisher._fast"):
            results = [publisher.publish("app.yaml", big(label)) for label in "1223"]
    finally:
        user.close()
    assert [(r.written, r.version) for r in results] == [
        (True, 1), (True, 2), (False, 2), (True, 3)
    ]  # fmt: skip
    assert [e.version for e in events(client, "app.yaml")] == [1, 2, 3]  # no duplicate
    assert len([r for r in caplog.records if "move" in r.getMessage()]) == 1
