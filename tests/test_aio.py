"""What only the asyncio ``AsyncSubscriber`` has: construction without a loop, callbacks in
the loop's thread, async callbacks refused, cancellation, the loop ending, concurrent stops,
and a real ASGI server (uvicorn) lifespan.

The scenarios both clients share (replay, rejection, walk-back, fallback, faults, stop...)
run against it in test_subscribers.py. pytest-asyncio is not used: each test runs its
coroutine with ``asyncio.run``, so every loop, task and connection is closed when the test's
``run`` returns (filterwarnings=error fails a test that leaves an unclosed transport behind).
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest

from subscriber import AsyncSubscriber, ConfigurationError, NoAcceptableConfig, all_subscribers
from subscriber.protocol import WorkerState
from subscriber.testing import RedisServer, append_event, free_port
from tests.conftest import REPO, Processes
from tests.helpers import Recorder, eventually, settles
from tests.workers.harness import acks, worker_states

KEY = "app.yaml"
FAST: dict[str, Any] = {"block_ms": 300, "heartbeat_interval": 0.3}  # quick cycles for tests

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def publish(server: RedisServer, text: str, version: int) -> str:
    return append_event(server.url, KEY, text.encode(), version=version)


def state(server: RedisServer, worker: str) -> WorkerState | None:
    return worker_states(server.url, KEY).get(worker)


def test_construction_needs_no_loop_and_callbacks_run_in_the_loops_thread(
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
            assert sub.worker_id == "pod-a:1"
            assert repr(sub) == "<AsyncSubscriber 'app.yaml' applied version=3>"
            assert await sub.start() is sub  # again while running: nothing
            publish(redis_server, "rate: 4", 4)
            await eventually(lambda: sub.version == 4, "version 4 applied by the task")
            assert rec.applied == ["rate: 3", "rate: 4"]
            assert rec.threads == {"MainThread"}  # always in the event loop's thread
        finally:
            await sub.stop()
        return took

    took = run(main())
    print(f"AsyncSubscriber.start() replaying version 3 of 3 took {took * 1000:.1f} ms")
    assert sub.status == "stopped"
    got = state(redis_server, "pod-a:1")
    assert got is not None
    assert got.status == "stopped"


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


# -- cancellation, the loop ending, concurrent stops -------------------------------------


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


def test_concurrent_stops_both_return_once_stopped_is_written(
    redis_server: RedisServer,
) -> None:
    publish(redis_server, "rate: 1", 1)
    sub = AsyncSubscriber(KEY, Recorder(), redis_url=redis_server.url, worker_id="w",
                          block_ms=30_000)  # fmt: skip

    async def main() -> None:
        await sub.start()
        await asyncio.sleep(0.2)  # let the task settle into its 30 s blocking read
        await asyncio.gather(sub.stop(), sub.stop())  # both return once "stopped" is written
        got = state(redis_server, "w")
        assert got is not None
        assert got.status == "stopped"
        assert asyncio.all_tasks() == {asyncio.current_task()}  # the task is gone

    run(main())


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

        def running() -> tuple[int, str, int]:
            state = next(s for s in worker_states(redis_server.url, KEY).values())
            return (state.pid, state.status, state.version)

        assert settles(running, (server.pid, "applied", 3)) == (server.pid, "applied", 3)

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
