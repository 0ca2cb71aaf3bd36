"""What only the threaded ``Subscriber`` has: the registry the gunicorn hooks use
(``all_subscribers``, ``unstarted``), construction that starts no thread, the URL and worker
id from the environment, and the ``with`` block; a callback that never returns (only a thread can
be given up on: a hung callback blocks an ``AsyncSubscriber``'s whole event loop).

The scenarios both clients share (replay, rejection, walk-back, fallback, faults, stop, idle
cost...) run against it in test_subscribers.py; worker processes, fan-out and Redis faults
across processes in test_subscriber_processes.py.
"""

from __future__ import annotations

import gc
import subprocess
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from subscriber import Subscriber, all_subscribers, unstarted
from subscriber.defaults import STOP_TIMEOUT
from subscriber.testing import RedisServer, append_event
from tests.helpers import Recorder, wait_until
from tests.workers.harness import worker_states

if TYPE_CHECKING:
    from tests.conftest import Processes

KEY = "app.yaml"
FAST: dict[str, Any] = {"block_ms": 300, "heartbeat_interval": 0.3}  # quick cycles for tests


def publish(server: RedisServer, text: str, version: int) -> str:
    return append_event(server.url, KEY, text.encode(), version=version)


def test_construction_does_no_io_and_the_registry_finds_unstarted_subscribers(
    tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # subscribers of other tests in this process (xdist) are theirs: held here so that their
    # ids stay theirs, and left out below (two fresh clones of session 7 failed here: a
    # failed start()'s Subscriber was kept alive by _fastreply's shared exception instance,
    # whose traceback held the whole stack; fixed, and tested in test_fastreply)
    earlier = all_subscribers()
    threads = threading.active_count()
    # an unreachable URL: constructing must not touch it
    idle = Subscriber(KEY, Recorder(), redis_url=f"unix://{tmp_path}/none.sock")
    assert threading.active_count() == threads
    assert idle in all_subscribers()
    assert idle in unstarted()

    monkeypatch.setenv("HOSTNAME", "pod-xyz")
    monkeypatch.setenv("HOTRELOAD_REDIS_URL", redis_server.url)
    publish(redis_server, "rate: 1", 1)
    with Subscriber(KEY, Recorder(), **FAST) as sub:  # URL from the environment
        assert sub not in unstarted()
        assert sub.worker_id.startswith("pod-xyz:")
        assert sub.version == 1
    assert sub.status == "stopped"
    idle.stop()
    del idle, sub
    gc.collect()
    theirs = {id(s) for s in earlier}
    mine = [s for s in all_subscribers() if id(s) not in theirs]
    assert all(s.key != KEY or s.status == "stopped" for s in mine)


# -- a callback that never returns ------------------------------------------------------


def test_a_hung_callback_shows_as_stalled_and_stop_gives_up_on_it_after_its_timeout(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    publish(redis_server, "rate: 1", 1)
    release = threading.Event()

    def hang_on_2(text: str) -> None:
        if text == "rate: 2":
            release.wait(30)

    sub = Subscriber(
        KEY, hang_on_2, redis_url=redis_server.url, worker_id="w", slow_callback=0.3, **FAST
    ).start()
    try:
        publish(redis_server, "rate: 2", 2)
        wait_until(lambda: sub.status == "stalled", "the status says stalled")
        assert sub.callback_seconds > 0.3
        began = time.perf_counter()
        sub.stop(timeout=0.5)
        took = time.perf_counter() - began
        assert 0.5 <= took < 2.0, took
        assert sub.status == "stopped"
        state = worker_states(redis_server.url, KEY)["w"]
        assert state.status == "stopped"
        assert "stop() gave up after 0.5 s" in state.error
        assert "hang_on_2" in state.error  # names the callback
        assert "hang_on_2" in caplog.text
    finally:
        release.set()
    followers = (f"hotreload-{KEY}", "hotreload-hub")
    wait_until(lambda: not [t for t in threading.enumerate() if t.name in followers])


_HUNG_AT_EXIT = """
import sys, threading
from subscriber import Subscriber
entered = threading.Event()
def apply(text):
    if text == "rate: 2":
        entered.set()
        threading.Event().wait()  # never returns
Subscriber("app.yaml", apply, redis_url=sys.argv[1], worker_id="hung", block_ms=300).start()
print("ready", flush=True)
entered.wait(30)
print("hung", flush=True)
"""  # then the main thread ends: the atexit hook stops the subscriber


def test_a_process_exits_despite_a_hung_callback_and_records_stopped(
    redis_server: RedisServer, processes: Processes
) -> None:
    publish(redis_server, "rate: 1", 1)
    process = processes.python("-c", _HUNG_AT_EXIT, redis_server.url, stdout=subprocess.PIPE)
    assert process.stdout is not None
    with process.stdout:
        assert process.stdout.readline() == b"ready\n"
        publish(redis_server, "rate: 2", 2)
        assert process.stdout.readline() == b"hung\n"
        began = time.monotonic()
        assert process.wait(STOP_TIMEOUT + 10) == 0  # before: waited for the callback forever
    print(f"exit with a hung callback took {time.monotonic() - began:.1f} s")
    state = worker_states(redis_server.url, KEY)["hung"]
    assert state.status == "stopped"
    assert "gave up" in state.error
