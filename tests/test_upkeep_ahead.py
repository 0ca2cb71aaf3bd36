"""The check sent ahead (``publisher._ahead``) against a real redis-server: the loop's thread
wakes once a check, not twice, and the check still finds what it found when it was asked at
its time -- a deleted stream, a restart -- including when the replies sent ahead are older
than they should be (a late check, a block ended early by an entry).

The checks here run as the daemon's loop runs them: sleep until ``next_check``, then ``due``.
Wake-ups are counted by the kernel (the thread's voluntary context switches), not timed.
"""

from __future__ import annotations

import select
import threading
import time
from pathlib import Path
from typing import cast

import pytest
import redis

from publisher._ahead import WAIT_KEY
from publisher.upkeep import SWEEP_EVERY, Upkeep
from subscriber._replycap import REPLY_CAP
from subscriber.keys import stream_keys
from subscriber.testing import RedisServer
from tests.test_upkeep import seed

INTERVAL = 0.5  # s: long enough to send the next check ahead (LEAD + Redis's 100 ms tick)


def checked(client: redis.Redis, names: list[str], published: dict[str, int]) -> Upkeep:
    """An upkeep connected and past its first check (a sweep), which found nothing to do."""
    upkeep = Upkeep(prefix="hotreload", check_interval=INTERVAL, forget_workers_after=0)
    upkeep.connected(client, names)
    until_due(upkeep)
    assert upkeep.due(client, names, published) == []
    return upkeep


def until_due(upkeep: Upkeep) -> None:
    """Sleep as the loop does until the next check is due."""
    threading.Event().wait(max(0.0, upkeep.next_check - time.monotonic()))


def replied(upkeep: Upkeep) -> None:
    """Wait until the commands sent ahead have run (their replies are in the socket)."""
    connection = upkeep._ahead._connection
    assert connection is not None, "nothing was sent ahead"
    readable, _, _ = select.select([connection._sock], [], [], 5.0)
    assert readable, "the commands sent ahead did not run"


def blocked(client: redis.Redis) -> None:
    """Wait until Redis runs the read sent ahead (blocked in it, the commands behind it
    waiting): an entry added before would not end it."""
    deadline = time.monotonic() + 5.0
    while int(cast("dict[str, int]", client.info("clients"))["blocked_clients"]) != 1:
        assert time.monotonic() < deadline, "the read sent ahead never blocked"
        time.sleep(0.01)


def voluntary_switches() -> int:
    """This thread's voluntary context switches: about how often it blocked and woke."""
    for line in Path("/proc/thread-self/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches in /proc/thread-self/status")


def test_an_idle_loop_wakes_once_a_check(redis_server: RedisServer, client: redis.Redis) -> None:
    """Without the check sent ahead, each check was a timer wake-up and a round trip's:
    ``2 * checks``. Counted from the second check on: the first, right after connecting, is
    a sweep read at its time (the script loaded then); the next sweep went out ahead too."""
    names = seed(client, 3)
    published = dict.fromkeys(names, 3)
    upkeep = checked(client, names, published)
    checks = SWEEP_EVERY + 2
    before = voluntary_switches()
    for _ in range(checks):
        until_due(upkeep)
        assert upkeep.due(client, names, published) == []
    woke = voluntary_switches() - before
    assert woke <= checks + 2, f"{woke} wake-ups for {checks} checks"


def test_a_deleted_stream_or_a_flush_is_found_at_the_next_check(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    names = seed(client, 5)
    published = dict.fromkeys(names, 3)
    upkeep = checked(client, names, published)
    client.delete(stream_keys("k0003.yaml").events)
    until_due(upkeep)
    assert upkeep.due(client, names, published) == ["k0003.yaml"]
    client.flushall()
    until_due(upkeep)
    assert upkeep.due(client, names, published) == names


def test_a_check_later_than_its_time_asks_again(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    """The loop was busy (publishing) when the check came due: the replies sent ahead are
    older than ``LEAD``; a stream deleted after they ran is found all the same."""
    names = seed(client, 5)
    published = dict.fromkeys(names, 3)
    upkeep = checked(client, names, published)  # a sweep; the next check is not
    replied(upkeep)
    client.delete(stream_keys("k0001.yaml").events)
    time.sleep(max(0.0, upkeep.next_check - time.monotonic()) + 0.3)
    assert upkeep.due(client, names, published) == ["k0001.yaml"]


def test_a_block_ended_early_by_an_entry_asks_again(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    """An entry on the stream the read waits on (nothing of hotreload writes there) ends
    it early: the replies behind it ran then, not just before the check."""
    names = seed(client, 5)
    wait_key = WAIT_KEY.format(prefix="hotreload")
    client.xadd(wait_key, {"x": "1"})  # as many keys after the entry below
    published = dict.fromkeys(names, 3)
    upkeep = checked(client, names, published)  # a sweep; the next check is not
    blocked(client)
    client.xadd(wait_key, {"x": "2"})
    replied(upkeep)
    client.delete(stream_keys("k0004.yaml").events)
    until_due(upkeep)
    assert upkeep.due(client, names, published) == ["k0004.yaml"]


def test_a_sweep_sent_ahead_is_not_trusted_after_a_publish(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    """The sweep's call ran ahead and read v3; the daemon then published v4 (on a watcher's
    thread, while the loop slept): the key is not "behind this daemon" (which would publish
    it again for nothing), the sweep is read again."""
    names = seed(client, 2)
    upkeep = Upkeep(prefix="hotreload", check_interval=INTERVAL, forget_workers_after=0)
    upkeep.connected(client, names)
    published = dict.fromkeys(names, 3)
    while True:  # to a check whose next one is a sweep: its call goes out ahead
        until_due(upkeep)
        assert upkeep.due(client, names, published) == []
        if upkeep._planned is not None:
            break
    replied(upkeep)
    client.xadd(stream_keys(names[0]).events, {"version": 4, "content": "x: 2\n"})
    published = {**published, names[0]: 4}
    until_due(upkeep)
    assert upkeep.due(client, names, published) == []


def test_a_restart_is_found_at_the_next_check(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    names = seed(client, 5)
    published = dict.fromkeys(names, 3)
    upkeep = checked(client, names, published)
    client.save()
    redis_server.kill()
    redis_server.start()
    until_due(upkeep)
    with pytest.raises(redis.ConnectionError):
        upkeep.due(client, names, published)
    client.connection_pool.disconnect()  # as the loop does, then connected()
    upkeep.connected(client, names)
    for _ in range(SWEEP_EVERY + 1):
        until_due(upkeep)
        assert upkeep.due(client, names, published) == []


def test_a_big_entry_where_the_read_waits_is_not_a_lost_connection(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    """An entry too big for the check's reader (over ``REPLY_CAP``) on the stream the read
    waits on: that check is asked again, the next ones go ahead as before -- no error, so
    no reconnect and re-seed of every key."""
    names = seed(client, 5)
    wait_key = WAIT_KEY.format(prefix="hotreload")
    client.xadd(wait_key, {"x": "1"})
    published = dict.fromkeys(names, 3)
    upkeep = checked(client, names, published)
    blocked(client)
    client.xadd(wait_key, {"x": b"y" * (REPLY_CAP + 1)})
    client.delete(stream_keys("k0002.yaml").events)
    until_due(upkeep)
    assert upkeep.due(client, names, published) == ["k0002.yaml"]
    for _ in range(2):
        until_due(upkeep)
        assert upkeep.due(client, names, published) == []
    replied(upkeep)  # sent ahead again


def test_a_read_ended_by_an_error_asks_again_and_goes_on_ahead(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    """The read ahead ended by an error reply (``UNBLOCKED``: what Redis 7 answers a blocked
    client when its master becomes a replica; here ``CLIENT UNBLOCK ... ERROR``): that check
    is asked again, and the next ones still go ahead (only a refused read stops that)."""
    names = seed(client, 5)
    published = dict.fromkeys(names, 3)
    upkeep = checked(client, names, published)
    blocked(client)
    (reader,) = [c for c in client.client_list() if c["cmd"] == "xread"]
    assert client.client_unblock(int(reader["id"]), error=True)
    client.delete(stream_keys("k0000.yaml").events)
    until_due(upkeep)
    assert upkeep.due(client, names, published) == ["k0000.yaml"]
    until_due(upkeep)
    assert upkeep.due(client, names, published) == []
    replied(upkeep)  # sent ahead again
