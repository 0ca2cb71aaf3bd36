"""Issue 22, asyncio side: an event loop's AsyncSubscribers share one connection and one task
(``subscriber._aiohub``), beside Subscribers of the same process sharing their thread; each
key still behaves as one of its own. Real redis-server processes throughout.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any, cast

import pytest

from subscriber import AsyncSubscriber, Subscriber, _aiohold, _aiohub
from subscriber._redis import connect
from subscriber.keys import stream_keys
from subscriber.testing import RedisServer, append_event
from tests.helpers import Recorder, eventually, wait_until
from tests.test_hub import (
    FAST,
    KEYS,
    at_version,
    blocked_reads,
    hub_threads,
    our_connections,
    publish_all,
)
from tests.workers.harness import acks, worker_states


@pytest.fixture(autouse=True)
def no_hub_left_over() -> None:
    """The thread counts below are this test's (see tests/test_hub.py)."""
    wait_until(lambda: not hub_threads(), "no shared follower left by an earlier test")


def hub_tasks() -> list[str]:
    return [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("hotreload-")]


async def start_all(url: str, keys: list[str], worker: str, **options: Any) -> list[Any]:
    recorders = [Recorder() for _ in keys]
    subs = [
        AsyncSubscriber(key, rec, redis_url=url, worker_id=worker, **{**FAST, **options})
        for key, rec in zip(keys, recorders, strict=True)
    ]
    for sub in subs:
        await sub.start()
    return [subs, recorders]


def test_twenty_async_subscribers_hold_one_connection_and_one_task(
    redis_server: RedisServer,
) -> None:
    url = redis_server.url
    publish_all(url, 1)

    async def scenario() -> None:
        caller = cast(asyncio.Task[None], asyncio.current_task()).get_name()
        subs, recorders = await start_all(url, KEYS, "a:1")
        try:
            assert hub_tasks() == ["hotreload-hub"]
            assert _aiohub.hub_count() == 1
            await eventually(lambda: len(our_connections(url, "a:1")) <= 2, "<= 2 connections")
            await eventually(lambda: len(blocked_reads(url, "a:1")) == 1, "one XREAD blocks")
            publish_all(url, 2)
            for sub in subs:
                await eventually(at_version(sub, 2), sub.key)
            for key, rec in zip(KEYS, recorders, strict=True):
                assert rec.applied == [f"{key} v1", f"{key} v2"]
                assert rec.tasks == {caller, "hotreload-hub"}  # start()'s task, then the hub
                await eventually(partial(lambda k: len(acks(url, k)) == 2, key), f"{key}: 2 acks")
            # one key stops: the others follow on
            await subs[0].stop()
            assert worker_states(url, KEYS[0])["a:1"].status == "stopped"
            publish_all(url, 3)
            for sub in subs[1:]:
                await eventually(at_version(sub, 3), sub.key)
            assert subs[0].version == 2
        finally:
            for sub in subs:
                await sub.stop()
        assert hub_tasks() == []
        assert _aiohub.hub_count() == 0

    asyncio.run(scenario())
    assert {worker_states(url, key)["a:1"].status for key in KEYS} == {"stopped"}
    wait_until(lambda: not our_connections(url, "a:1"), "every connection closed")


def test_a_loop_shut_down_without_stop_records_stopped_for_every_key(
    redis_server: RedisServer,
) -> None:
    url = redis_server.url
    keys = KEYS[:3]
    publish_all(url, 1, keys)

    async def scenario() -> None:
        await start_all(url, keys, "a:2")
        # asyncio.run cancels the hub's task on the way out

    asyncio.run(scenario())
    assert {worker_states(url, key)["a:2"].status for key in keys} == {"stopped"}


def test_an_async_key_started_during_a_long_block_is_read_at_once(
    redis_server: RedisServer,
) -> None:
    url = redis_server.url
    publish_all(url, 1, KEYS[:2])
    slow = {"block_ms": 60_000, "heartbeat_interval": 30.0}

    async def scenario() -> None:
        (first,), _ = await start_all(url, KEYS[:1], "a:3", **slow)
        second = None
        try:
            await eventually(lambda: blocked_reads(url, "a:3"), "the hub blocks for a minute")
            (second,), _ = await start_all(url, KEYS[1:2], "a:3", **slow)
            publish_all(url, 2, KEYS[1:2])
            await eventually(lambda: second.version == 2, "read at once, not a minute later")
        finally:
            await first.stop()
            if second is not None:
                await second.stop()

    asyncio.run(scenario())


def test_sync_and_async_keys_in_one_process_each_share_their_own_follower(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    url = redis_server.url
    publish_all(url, 1, KEYS[:8])
    threads = threading.active_count()
    syncs = [
        Subscriber(key, Recorder(), redis_url=url, worker_id="mix:1", **FAST) for key in KEYS[:4]
    ]
    try:
        for sub in syncs:
            sub.start()
        assert threading.active_count() - threads == 1

        async def scenario() -> None:
            subs, _ = await start_all(url, KEYS[4:8], "mix:1")
            try:
                # the thread's hub and the loop's task: one connection each (+ a waker each)
                await eventually(lambda: len(blocked_reads(url, "mix:1")) == 2, "2 reads block")
                assert len(our_connections(url, "mix:1")) <= 4
                # a junk entry on one async key, a rejection on one sync key
                from subscriber._redis import connect

                admin = connect(url, socket_timeout=5)
                try:
                    admin.xadd(stream_keys(KEYS[4]).events, {"junk": "x"})
                finally:
                    admin.close()
                publish_all(url, 2, KEYS[:8])
                publish_all(url, 3, KEYS[:1], text="REJECT")
                for sub in subs:
                    await eventually(at_version(sub, 2), sub.key)
                for sub in syncs:
                    await eventually(at_version(sub, 2), sub.key)
                await eventually(lambda: syncs[0].status == "rejected", "key 0 rejected v3")
                assert subs[0].error_count == 1  # the junk entry
                assert [s.error_count for s in subs[1:] + syncs[1:]] == [0] * 6
            finally:
                for sub in subs:
                    await sub.stop()

        with caplog.at_level(logging.WARNING):
            asyncio.run(scenario())
        assert "lost Redis" not in caplog.text
    finally:
        for sub in syncs:
            sub.stop()
    wait_until(lambda: not hub_threads(), "the thread's hub ends with its keys")
    assert {worker_states(url, key)["mix:1"].status for key in KEYS[:8]} == {"stopped"}


def test_async_keys_recover_after_a_redis_restart(redis_tcp: RedisServer) -> None:
    url = redis_tcp.url
    keys = KEYS[:5]
    publish_all(url, 1, keys)

    async def scenario() -> None:
        subs, _ = await start_all(url, keys, "a:4")
        try:
            await asyncio.to_thread(redis_tcp.restart)
            publish_all(url, 2, keys)
            for sub in subs:
                await eventually(at_version(sub, 2), sub.key, timeout=20)
        finally:
            for sub in subs:
                await sub.stop()

    asyncio.run(scenario())


def test_an_async_key_started_from_its_fallback_joins_the_hub_once_redis_answers(
    redis_tcp: RedisServer, tmp_path: Path
) -> None:
    url = redis_tcp.url
    redis_tcp.stop()
    fallback = tmp_path / "k00.yaml"
    fallback.write_text("from the mount")

    async def scenario() -> None:
        rec = Recorder()
        sub = AsyncSubscriber(
            KEYS[0], rec, redis_url=url, worker_id="a:5", fallback_path=fallback,
            start_timeout=0.5, **FAST,
        )  # fmt: skip
        await sub.start()
        try:
            assert (sub.status, sub._hub) == ("fallback", None)
            assert hub_tasks() == [f"hotreload-{KEYS[0]}"]
            await asyncio.to_thread(redis_tcp.start)
            publish_all(url, 1, KEYS[:1])
            await eventually(at_version(sub, 1), "applied from Redis")
            await eventually(lambda: hub_tasks() == ["hotreload-hub"], "moved into the hub")
            publish_all(url, 2, KEYS[:1])
            await eventually(at_version(sub, 2), "follows in the hub")
            assert rec.applied == ["from the mount", "k00.yaml v1", "k00.yaml v2"]
        finally:
            await sub.stop()
        assert hub_tasks() == []

    asyncio.run(scenario())
    assert worker_states(url, KEYS[0])["a:5"].status == "stopped"


def test_a_frozen_redis_times_the_shared_read_out_and_the_keys_follow_after_the_thaw(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A Redis that answers nothing (SIGSTOP) while the hub's read blocks: the read fails
    at the block (1 s) + the margin (3 s), by the hub's watchdog, not a timeout per read
    (``_aiohub._watch``); each key counts the loss, naming the socket as redis-py does (it
    said ":6379", a unix socket's unset port), and follows on after the thaw."""
    url = redis_server.url
    keys = KEYS[:3]
    publish_all(url, 1, keys)

    async def scenario() -> None:
        subs, _ = await start_all(url, keys, "a:5", block_ms=1000, heartbeat_interval=30.0)
        try:
            await eventually(lambda: len(blocked_reads(url, "a:5")) == 1, "one XREAD blocks")
            redis_server.freeze()
            try:
                with caplog.at_level(logging.WARNING):
                    await eventually(lambda: "Timeout reading" in caplog.text, "timed out", 15)
                assert f"(Timeout reading from {redis_server.socket_path})" in caplog.text
            finally:
                redis_server.thaw()
            publish_all(url, 2, keys)
            for sub in subs:
                await eventually(at_version(sub, 2), sub.key, timeout=20)
        finally:
            for sub in subs:
                await sub.stop()

    asyncio.run(scenario())


QUIET: dict[str, Any] = {"block_ms": 5000, "heartbeat_interval": 30.0, "metrics": False}


async def second_decides_in_the_firsts_hold(url: str, decided: list[float]) -> list[Any]:
    """Two hubs in one loop (two worker ids, a key each): the first decides v2 of its key,
    and appends v2 of the second's, which the second decides while the first's reports are
    held, slowly (its callback blocks the loop 0.1 s; ``decided``: when it returned)."""
    first_key, second_key = KEYS[:2]
    publish_all(url, 1, KEYS[:2])

    def first(text: str) -> None:
        if text.endswith("v2"):
            append_event(url, second_key, f"{second_key} v2".encode(), version=2)

    def second(text: str) -> None:
        if text.endswith("v2"):
            time.sleep(0.1)
            decided.append(time.time())

    subs = [
        AsyncSubscriber(first_key, first, redis_url=url, worker_id="a:q1", **QUIET),
        AsyncSubscriber(second_key, second, redis_url=url, worker_id="a:q2", **QUIET),
    ]
    for sub in subs:
        await sub.start()
    assert _aiohub.hub_count() == 2
    await eventually(lambda: blocked_reads(url, "a:q1"), "the first hub reads")
    await eventually(lambda: blocked_reads(url, "a:q2"), "the second hub reads")
    publish_all(url, 2, [first_key])
    for sub in subs:
        await eventually(at_version(sub, 2), sub.key)
    return subs


def test_held_reports_wait_for_the_loops_last_decision(redis_server: RedisServer) -> None:
    """The first hub's ack goes out once the loop has been quiet for ``LOOP_QUIET`` after the
    second's decision (``_aiohold.wait_held``), not at the end of its own hold, which is
    among the decisions still to come (before: as soon as the slow callback returned)."""
    url = redis_server.url
    decided: list[float] = []

    async def scenario() -> None:
        subs = await second_decides_in_the_firsts_hold(url, decided)
        try:
            for sub in subs:
                await eventually(partial(lambda k: len(acks(url, k)) == 2, sub.key), "acks")
        finally:
            for sub in subs:
                await sub.stop()

    asyncio.run(scenario())
    # Redis's clock (the ack's id) against the callback's: both the realtime clock, in ms
    first_ack_ms = ack_ids(url, KEYS[0])[1][0]
    assert first_ack_ms >= decided[0] * 1000 + _aiohold.LOOP_QUIET * 1000 * 2 / 3


def test_a_key_joining_a_hub_that_waits_for_its_loop_is_read_at_once(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first hub waits for the loop to be quiet (made 5 s here); a key joining it meanwhile
    ends the wait: its first read goes at once (``_aiohold.Hold``), not 5 s later."""
    monkeypatch.setattr(_aiohold, "LOOP_QUIET", 5.0)
    monkeypatch.setattr(_aiohold, "LOOP_HOLD_CAP", 10.0)
    url = redis_server.url
    third_key = KEYS[2]
    publish_all(url, 1, [third_key])

    async def scenario() -> None:
        subs = await second_decides_in_the_firsts_hold(url, [])
        try:
            subs.append(AsyncSubscriber(third_key, Recorder(), redis_url=url, worker_id="a:q1",
                                        **QUIET))  # fmt: skip
            await subs[-1].start()
            assert _aiohub.hub_count() == 2  # it joined the first hub
            publish_all(url, 2, [third_key])
            await eventually(at_version(subs[-1], 2), "read at once", timeout=3.0)
        finally:
            for sub in subs:
                await sub.stop()

    asyncio.run(scenario())


def ack_ids(url: str, key: str) -> list[tuple[int, int]]:
    """The ids of ``key``'s acks (Redis's clock, ms and sequence), oldest first."""
    client = connect(url, socket_timeout=5)
    try:
        entries = cast("list[tuple[bytes, Any]]", client.xrange(stream_keys(key).acks))
    finally:
        client.close()
    ids = (entry_id.decode().split("-") for entry_id, _ in entries)
    return [(int(ms), int(seq)) for ms, seq in ids]
