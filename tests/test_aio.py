"""The asyncio AsyncSubscriber against a real private redis-server, and inside a real ASGI
server (uvicorn) lifespan.

pytest-asyncio is not used: each test runs its coroutine with ``asyncio.run``, so every
loop, task and connection is closed when the test's ``run`` returns (filterwarnings=error
fails a test that leaves an unclosed transport behind).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest

from subscriber import (
    AsyncSubscriber,
    ConfigurationError,
    InitialLoadError,
    NoAcceptableConfig,
    RedisUnavailable,
    all_subscribers,
)
from subscriber._redis import connect
from subscriber.keys import stream_keys
from subscriber.protocol import SCHEMA_VERSION, WorkerState, now_ms, sha256_hex
from subscriber.testing import RedisServer, append_event, free_port
from tests.conftest import REPO, Processes
from tests.workers.harness import acks, worker_states

KEY = "app.yaml"
EVENTS = stream_keys(KEY).events
FAST: dict[str, Any] = {"block_ms": 300, "heartbeat_interval": 0.3}  # quick cycles for tests

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


async def eventually(predicate: Callable[[], T | None], what: str, timeout: float = 10.0) -> T:
    """Poll ``predicate`` without blocking the loop; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.02)


class Recorder:
    """An app callback: refuses content containing ``REJECT``, records the rest and the
    asyncio task each call ran in; fails if it is ever re-entered."""

    def __init__(self) -> None:
        self.applied: list[str] = []
        self.tasks: set[str] = set()
        self.threads: set[str] = set()
        self._inside = False

    def __call__(self, text: str) -> None:
        assert not self._inside, "callbacks ran concurrently"
        self._inside = True
        try:
            task = asyncio.current_task()
            self.tasks.add(task.get_name() if task else "")
            self.threads.add(threading.current_thread().name)
            if "REJECT" in text:
                raise ValueError("rate must be a positive integer")
            self.applied.append(text)
        finally:
            self._inside = False


def publish(server: RedisServer, text: str, version: int) -> str:
    return append_event(server.url, KEY, text.encode(), version=version)


def state(server: RedisServer, worker: str) -> WorkerState | None:
    return worker_states(server.url, KEY).get(worker)


def valid_fields(content: bytes, version: int) -> dict[str, bytes | str | int]:
    return {
        "schema": SCHEMA_VERSION,
        "key": KEY,
        "version": version,
        "sha256": sha256_hex(content),
        "content": content,
        "published_at": now_ms(),
        "publisher": "test:1",
    }


def write_raw(server: RedisServer, fields: dict[str, bytes | str | int]) -> str:
    client = connect(server.url, socket_timeout=5.0)
    try:
        return cast("bytes", client.xadd(EVENTS, cast("dict[Any, Any]", fields))).decode()
    finally:
        client.close()


# -- replay and follow ------------------------------------------------------------------


def test_construction_does_no_io_and_start_replays_then_follows(
    redis_server: RedisServer,
) -> None:
    for version in (1, 2, 3):
        publish(redis_server, f"rate: {version}", version)
    rec = Recorder()
    threads = threading.active_count()
    # Outside any event loop: construction needs none, and touches neither Redis nor threads.
    sub = AsyncSubscriber(KEY, rec, redis_url=redis_server.url, worker_id="pod-a:1", **FAST)
    assert threading.active_count() == threads
    assert not sub.started
    registered: list[object] = list(all_subscribers())
    assert sub not in registered  # the (sync) gunicorn hooks must not start or stop it
    assert (sub.version, sub.content, sub.status) == (0, None, "starting")

    async def main() -> float:
        tasks = asyncio.all_tasks()
        late = AsyncSubscriber(KEY, Recorder(), redis_url=redis_server.url)
        assert asyncio.all_tasks() == tasks  # no task at construction either
        assert not late.started
        began = time.perf_counter()
        await sub.start()
        took = time.perf_counter() - began
        try:
            assert rec.applied == ["rate: 3"]  # only the newest: history is not replayed
            caller = asyncio.current_task()
            assert caller is not None
            assert rec.tasks == {caller.get_name()}  # in start(), i.e. in the caller's task
            assert (sub.version, sub.status, sub.reload_count, sub.error_count) == (
                3,
                "applied",
                1,
                0,
            )
            assert (sub.last_hash, sub.content) == (sha256_hex(b"rate: 3"), b"rate: 3")
            assert sub.last_reload_time is not None
            assert abs(sub.last_reload_time - time.time()) < 5
            assert sub.started
            assert sub.worker_id == "pod-a:1"
            assert repr(sub) == "<AsyncSubscriber 'app.yaml' applied version=3>"
            assert await sub.start() is sub  # again while running: nothing

            publish(redis_server, "rate: 4", 4)
            await eventually(lambda: sub.version == 4, "version 4 applied by the task")
            assert rec.applied == ["rate: 3", "rate: 4"]
            assert rec.tasks == {caller.get_name(), "hotreload-app.yaml"}
            assert rec.threads == {"MainThread"}  # always in the event loop's thread
            got = state(redis_server, "pod-a:1")
            assert got is not None
            assert (got.status, got.version, got.sha256) == ("applied", 4, sha256_hex(b"rate: 4"))
            assert [(a.version, a.status, a.worker) for a in acks(redis_server.url, KEY)] == [
                (3, "applied", "pod-a:1"),
                (4, "applied", "pod-a:1"),
            ]
        finally:
            await sub.stop()
        return took

    took = run(main())
    print(f"AsyncSubscriber.start() replaying version 3 of 3 took {took * 1000:.1f} ms")
    assert sub.status == "stopped"
    got = state(redis_server, "pod-a:1")
    assert got is not None
    assert got.status == "stopped"


def test_rejection_keeps_the_previous_config_and_reaches_acks(
    redis_server: RedisServer,
) -> None:
    publish(redis_server, "rate: 1", 1)
    rec = Recorder()

    async def main() -> None:
        async with AsyncSubscriber(
            KEY, rec, redis_url=redis_server.url, worker_id="w", **FAST
        ) as sub:
            publish(redis_server, "rate: REJECT", 2)
            await eventually(lambda: sub.error_count == 1, "the rejection")
            assert (sub.version, sub.content, sub.status) == (1, b"rate: 1", "rejected")
            ack = (
                await eventually(
                    lambda: [a for a in acks(redis_server.url, KEY) if a.status == "rejected"],
                    "rejection ack",
                )
            )[0]
            assert (ack.version, ack.worker) == (2, "w")
            assert ack.error == "ValueError: rate must be a positive integer"
            got = await eventually(lambda: state(redis_server, "w"), "state")
            assert (got.status, got.version, got.rejected_version) == ("rejected", 1, 2)
            assert got.error == ack.error

            publish(redis_server, "rate: 3", 3)  # a fixed config is picked up as usual
            await eventually(lambda: sub.version == 3, "version 3")
            assert sub.status == "applied"
        assert sub.started
        assert str(sub.status) == "stopped"  # __aexit__ stopped it

    run(main())
    assert rec.applied == ["rate: 1", "rate: 3"]


def test_start_walks_back_past_rejected_versions(redis_server: RedisServer) -> None:
    publish(redis_server, "rate: 1", 1)
    publish(redis_server, "rate: 2", 2)
    publish(redis_server, "rate: REJECT 3", 3)
    publish(redis_server, "rate: REJECT 4", 4)
    rec = Recorder()

    async def main() -> None:
        async with AsyncSubscriber(
            KEY, rec, redis_url=redis_server.url, worker_id="late", **FAST
        ) as sub:
            assert rec.applied == ["rate: 2"]  # what siblings that rejected 3 and 4 run
            assert (sub.version, sub.status, sub.error_count) == (2, "rejected", 2)
            reported = [(a.version, a.status) for a in acks(redis_server.url, KEY)]
            assert reported == [(4, "rejected"), (3, "rejected"), (2, "applied")]
            got = state(redis_server, "late")
            assert got is not None
            assert (got.status, got.version, got.rejected_version) == ("rejected", 2, 4)

    run(main())


def test_no_acceptable_config_raises_and_the_start_can_be_retried(
    redis_server: RedisServer,
) -> None:
    publish(redis_server, "REJECT 1", 1)
    publish(redis_server, "REJECT 2", 2)
    sub = AsyncSubscriber(KEY, Recorder(), redis_url=redis_server.url, worker_id="w", **FAST)

    async def main() -> None:
        with pytest.raises(NoAcceptableConfig) as info:
            await sub.start()
        assert info.value.reasons[0].startswith("version 2")
        assert "version 1" in str(info.value)
        assert "rate must be a positive integer" in str(info.value)
        assert not sub.started  # a failed start may be retried
        assert [a.status for a in acks(redis_server.url, KEY)] == ["rejected", "rejected"]
        publish(redis_server, "rate: 3", 3)
        try:
            await sub.start()
            assert sub.version == 3
        finally:
            await sub.stop()

    run(main())


def test_empty_stream_waits_for_the_first_event_then_times_out_to_the_fallback(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    rec = Recorder()

    async def main() -> None:
        waiting = AsyncSubscriber(KEY, rec, redis_url=redis_server.url, start_timeout=10, **FAST)
        loop = asyncio.get_running_loop()
        loop.call_later(0.5, publish, redis_server, "rate: 1", 1)  # the publisher comes up
        began = time.monotonic()
        async with waiting:
            assert 0.4 < time.monotonic() - began < 5
            assert (rec.applied, waiting.version) == (["rate: 1"], 1)

        nothing = AsyncSubscriber("empty.yaml", Recorder(), redis_url=redis_server.url,
                                  start_timeout=0.3, **FAST)  # fmt: skip
        with pytest.raises(NoAcceptableConfig, match=r"nothing was published.*hotreload watch"):
            await nothing.start()
        mounted = tmp_path / "empty.yaml"
        mounted.write_text("rate: 0")
        fallback = Recorder()
        async with AsyncSubscriber(
            "empty.yaml", fallback, redis_url=redis_server.url, start_timeout=0.3,
            fallback_path=mounted, **FAST,
        ) as sub:  # fmt: skip
            assert (fallback.applied, sub.status, sub.version) == (["rate: 0"], "fallback", 0)

    run(main())


def test_unreachable_redis_uses_the_fallback_then_follows_redis(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "late-redis")  # not started yet
    mounted = tmp_path / KEY
    mounted.write_text("rate: 0")
    rec = Recorder()

    async def main() -> None:
        url = f"unix://{tmp_path}/nothing-here.sock"
        refused = AsyncSubscriber(KEY, Recorder(), redis_url=url, start_timeout=0.5, **FAST)
        began = time.monotonic()
        with pytest.raises(RedisUnavailable) as info:
            await refused.start()
        assert time.monotonic() - began < 2
        assert url in str(info.value)
        assert "fallback_path" in str(info.value)
        missing = AsyncSubscriber(KEY, Recorder(), redis_url=url, start_timeout=0.2,
                                  fallback_path=tmp_path / "missing")  # fmt: skip
        with pytest.raises(InitialLoadError, match="missing"):
            await missing.start()

        sub = AsyncSubscriber(
            KEY, rec, redis_url=server.url, start_timeout=0.5, fallback_path=mounted, **FAST
        )
        began = time.monotonic()
        async with sub:
            assert time.monotonic() - began < 2
            assert (rec.applied, sub.status, sub.version) == (["rate: 0"], "fallback", 0)
            with server:
                append_event(server.url, KEY, b"rate: 0", version=1)  # same content
                await eventually(lambda: sub.version == 1, "adopted once Redis is up")
                assert (rec.applied, sub.status) == (["rate: 0"], "applied")  # no callback
                append_event(server.url, KEY, b"rate: 2", version=2)
                await eventually(lambda: sub.version == 2, "version 2")
                await sub.stop()  # while Redis is still up, to record "stopped"
            assert rec.applied == ["rate: 0", "rate: 2"]

    run(main())


def test_malformed_and_forged_entries_are_rejected_without_a_crash(
    redis_server: RedisServer,
) -> None:
    publish(redis_server, "rate: 1", 1)
    rec = Recorder()
    bad_entries: list[tuple[dict[str, bytes | str | int], str]] = [
        ({"garbage": b"\x00\x01\xff"}, "missing required field"),
        ({**valid_fields(b"rate: 3", 3), "version": "three"}, "Expected `int`"),
        ({**valid_fields(b"rate: 4\xff\xfe", 4)}, "not valid UTF-8"),
        ({**valid_fields(b"rate: 5", 5), "sha256": sha256_hex(b"other")}, "forged"),
        ({**valid_fields(b"rate: 6", 6), "key": "other.yaml"}, "not 'app.yaml'"),
        ({**valid_fields(b"rate: 7", 7), "schema": 99}, "upgrade the subscriber"),
    ]

    async def main() -> None:
        async with AsyncSubscriber(
            KEY, rec, redis_url=redis_server.url, worker_id="w", **FAST
        ) as sub:
            expected = {write_raw(redis_server, fields): reason for fields, reason in bad_entries}
            await eventually(lambda: sub.error_count == len(bad_entries), "each one rejected")
            assert (rec.applied, sub.version) == (["rate: 1"], 1)
            rejected = {
                a.entry_id: a for a in acks(redis_server.url, KEY) if a.status == "rejected"
            }
            assert rejected.keys() == expected.keys()
            for entry_id, reason in expected.items():
                assert reason in rejected[entry_id].error, (reason, rejected[entry_id].error)
            publish(redis_server, "rate: 8", 8)  # the task is alive and well
            await eventually(lambda: sub.version == 8, "version 8")

    run(main())


def test_an_async_callback_is_refused_and_an_awaitable_result_rejects(
    redis_server: RedisServer,
) -> None:
    async def async_apply(text: str) -> None:
        pass

    with pytest.raises(ConfigurationError, match="plain function"):
        AsyncSubscriber(KEY, async_apply, redis_url=redis_server.url)

    class AsyncCall:
        async def __call__(self, text: str) -> None:
            pass

    with pytest.raises(ConfigurationError, match="plain function"):
        AsyncSubscriber(KEY, AsyncCall(), redis_url=redis_server.url)

    publish(redis_server, "rate: 1", 1)

    def sneaky(text: str) -> object:
        return async_apply(text)  # a coroutine: closed, and the content rejected

    async def main() -> None:
        sub = AsyncSubscriber(KEY, sneaky, redis_url=redis_server.url, **FAST)
        with pytest.raises(NoAcceptableConfig, match="returned an awaitable"):
            await sub.start()

    run(main())  # and no "coroutine was never awaited" warning (warnings are errors)


# -- faults -----------------------------------------------------------------------------


def test_redis_killed_and_restarted_empty_converges(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    from prometheus_client import REGISTRY

    def connection_errors() -> float:
        value = REGISTRY.get_sample_value(
            "hotreload_subscriber_connection_errors_total", {"key": KEY}
        )
        return value or 0.0

    publish(redis_server, "rate: 1", 1)
    publish(redis_server, "rate: 2", 2)
    rec = Recorder()
    caplog.set_level(logging.INFO, logger="subscriber.aio")

    async def main() -> None:
        async with AsyncSubscriber(
            KEY, rec, redis_url=redis_server.url, worker_id="w", metrics=True, **FAST
        ) as sub:
            errors = connection_errors()
            assert sub.version == 2
            redis_server.kill()  # SIGKILL: everything is lost, ids and versions included
            await asyncio.sleep(0.5)  # the outage; the subscriber keeps its config
            assert (sub.version, sub.content) == (2, b"rate: 2")
            redis_server.start()  # empty
            publish(redis_server, "rate: reseeded", 1)  # the publisher re-seeds at version 1
            await eventually(lambda: sub.content == b"rate: reseeded", "converged", 15)
            assert sub.version == 1
            got = await eventually(lambda: state(redis_server, "w"), "state rewritten")
            assert (got.status, got.version) == ("applied", 1)
            assert connection_errors() > errors  # the metrics hook saw the lost connection
            publish(redis_server, "rate: 3", 2)  # and it follows from there
            await eventually(lambda: sub.version == 2 and sub.content == b"rate: 3", "v2")

    run(main())
    assert rec.applied == ["rate: 2", "rate: reseeded", "rate: 3"]
    assert "lost Redis" in caplog.text
    assert "Redis is back" in caplog.text


def test_a_stream_recreated_behind_the_cursor_is_found_by_the_periodic_check(
    redis_server: RedisServer,
) -> None:
    # An id from a clock far ahead: after the stream is deleted and re-created, new ids are
    # lower than the subscriber's position, so XREAD alone would never see them.
    client = connect(redis_server.url, socket_timeout=5.0)
    try:
        client.xadd(
            EVENTS, cast("dict[Any, Any]", valid_fields(b"rate: 1", 1)), id="9999999999999-0"
        )
        rec = Recorder()

        async def main() -> None:
            async with AsyncSubscriber(
                KEY, rec, redis_url=redis_server.url, resync_interval=0.3, **FAST
            ) as sub:
                client.delete(EVENTS)
                publish(redis_server, "rate: 2", 1)
                await eventually(lambda: rec.applied[-1] == "rate: 2", "re-created stream")
                assert sub.version == 1

        run(main())
    finally:
        client.close()


def test_stop_is_prompt_with_a_long_block_and_records_stopped(
    redis_server: RedisServer,
) -> None:
    publish(redis_server, "rate: 1", 1)
    sub = AsyncSubscriber(KEY, Recorder(), redis_url=redis_server.url, worker_id="w",
                          block_ms=30_000)  # fmt: skip

    async def main() -> float:
        await sub.start()
        await asyncio.sleep(0.2)  # let the task settle into its 30 s blocking read
        began = time.perf_counter()
        await asyncio.gather(sub.stop(), sub.stop())  # both return once "stopped" is written
        took = time.perf_counter() - began
        assert asyncio.all_tasks() == {asyncio.current_task()}  # the task is gone
        await sub.stop()  # idempotent
        with pytest.raises(RuntimeError, match="create a new one"):
            await sub.start()
        return took

    took = run(main())
    print(f"AsyncSubscriber.stop() with a 30 s block took {took * 1000:.1f} ms")
    assert took < 1.0
    got = state(redis_server, "w")
    assert got is not None
    assert got.status == "stopped"


def test_stop_is_prompt_while_redis_is_frozen(redis_server: RedisServer) -> None:
    publish(redis_server, "rate: 1", 1)

    async def main() -> float:
        sub = await AsyncSubscriber(KEY, Recorder(), redis_url=redis_server.url).start()
        redis_server.freeze()
        try:
            await asyncio.sleep(0.2)
            began = time.perf_counter()
            await sub.stop()  # the final state write gives up after FINAL_WRITE_TIMEOUT
            return time.perf_counter() - began
        finally:
            redis_server.thaw()

    took = run(main())
    print(f"AsyncSubscriber.stop() with Redis frozen took {took * 1000:.1f} ms")
    assert took < 1.5


def test_a_cancelled_start_leaves_it_unstarted_and_leaks_nothing(
    redis_server: RedisServer,
) -> None:
    async def main() -> None:
        sub = AsyncSubscriber(KEY, Recorder(), redis_url=redis_server.url, start_timeout=10)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(sub.start(), 0.3)  # waiting for a first event
        assert not sub.started
        publish(redis_server, "rate: 1", 1)
        async with sub:  # may be started again
            assert sub.version == 1

    run(main())  # an unclosed connection would fail the test (warnings are errors)


def test_stop_during_start_records_stopped_and_does_not_follow(
    redis_server: RedisServer,
) -> None:
    async def main() -> None:
        sub = AsyncSubscriber(KEY, Recorder(), redis_url=redis_server.url, worker_id="w",
                              start_timeout=10, **FAST)  # fmt: skip
        starting = asyncio.create_task(sub.start())  # waits for a first event
        await asyncio.sleep(0.2)
        began = time.perf_counter()
        await sub.stop()  # e.g. a shutdown during startup: returns at once
        assert time.perf_counter() - began < 0.1
        publish(redis_server, "rate: 1", 1)
        assert await starting is sub  # the replay completes, then nothing follows
        assert (sub.version, sub.status) == (1, "stopped")
        assert asyncio.all_tasks() == {asyncio.current_task()}

    run(main())
    got = state(redis_server, "w")
    assert got is not None
    assert (got.status, got.version) == ("stopped", 1)


def test_the_loop_ending_without_stop_still_records_stopped(redis_server: RedisServer) -> None:
    publish(redis_server, "rate: 1", 1)

    async def main() -> AsyncSubscriber:
        return await AsyncSubscriber(
            KEY, Recorder(), redis_url=redis_server.url, worker_id="w", **FAST
        ).start()

    sub = run(main())  # asyncio.run cancels the leftover task, which writes its final state
    got = state(redis_server, "w")
    assert got is not None
    assert got.status == "stopped"
    run(sub.stop())  # still fine afterwards, in another loop


# -- a real ASGI server --------------------------------------------------------------------


def http_get(port: int) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
            return cast("dict[str, Any]", json.loads(response.read()))
    except (urllib.error.URLError, ConnectionError):
        return None  # not listening yet


def test_uvicorn_lifespan_starts_follows_and_stops_the_subscriber(
    redis_server: RedisServer, processes: Processes, tmp_path: Path
) -> None:
    publish(redis_server, "rate: 1", 1)
    publish(redis_server, "rate: REJECT", 2)  # the replay walks back past it
    port = free_port()
    log = (tmp_path / "uvicorn.log").open("wb")
    began = time.monotonic()
    with log:
        server = processes.python(
            "-m", "uvicorn", "tests.workers.asgi_app:app", "--host", "127.0.0.1", "--port",
            str(port), "--lifespan", "on", "--log-level", "info",
            env={"HOTRELOAD_REDIS_URL": redis_server.url, "ASGI_KEY": KEY},
            cwd=str(REPO), stdout=log, stderr=log,
        )  # fmt: skip
        # uvicorn listens only once lifespan.startup completed, i.e. after start() replayed:
        # the very first answer already carries the config.
        deadline = time.monotonic() + 20
        first = http_get(port)
        while first is None:
            assert server.poll() is None, (tmp_path / "uvicorn.log").read_text()
            assert time.monotonic() < deadline, "uvicorn did not answer"
            time.sleep(0.02)
            first = http_get(port)
        ready = time.monotonic() - began
        assert (first["version"], first["content"], first["status"]) == (1, "rate: 1", "rejected")
        assert first["applied"] == 1
        assert first["pid"] == server.pid

        published = time.monotonic()
        publish(redis_server, "rate: 3", 3)
        deadline = published + 10
        while (answer := http_get(port)) is None or answer["version"] != 3:
            assert time.monotonic() < deadline, answer
            time.sleep(0.005)
        served = time.monotonic() - published
        assert (answer["content"], answer["status"]) == ("rate: 3", "applied")
        running = next(s for s in worker_states(redis_server.url, KEY).values())
        assert (running.pid, running.status, running.version) == (server.pid, "applied", 3)

        server.send_signal(signal.SIGTERM)  # uvicorn shuts down: lifespan.shutdown -> stop()
        # after a graceful shutdown uvicorn re-raises the signal it caught
        assert server.wait(10) in (0, -signal.SIGTERM)
    print(f"uvicorn: first answer {ready * 1000:.0f} ms after spawn; "
          f"version 3 served {served * 1000:.1f} ms after publishing")  # fmt: skip
    output = (tmp_path / "uvicorn.log").read_text()
    assert "Application shutdown complete" in output, output
    stopped = worker_states(redis_server.url, KEY)
    assert [(s.pid, s.status, s.version) for s in stopped.values()] == [(server.pid, "stopped", 3)]
    # Reports are written at least once: the ack of version 3 rode on the blocking read that
    # stop() cut short, so it may be written again with the final state (as Subscriber does).
    reported = [(a.version, a.status) for a in acks(redis_server.url, KEY)]
    assert list(dict.fromkeys(reported)) == [(2, "rejected"), (1, "applied"), (3, "applied")]


def test_leaving_async_with_at_once_still_records_stopped(redis_server: RedisServer) -> None:
    """stop() right after start(): the follow task is cancelled before its first step, so its
    own clean-up never runs; stop() writes the final state itself."""
    append_event(redis_server.url, KEY, b"a: 1\n", version=1)

    async def scenario() -> str:
        async with AsyncSubscriber(KEY, lambda _c: None, redis_url=redis_server.url) as sub:
            return sub.worker_id

    worker = asyncio.run(scenario())
    assert worker_states(redis_server.url, KEY)[worker].status == "stopped"
