"""What only the threaded ``Subscriber`` has: the registry the gunicorn hooks use
(``all_subscribers``, ``unstarted``), construction that starts no thread, the URL and worker
id from the environment, and the ``with`` block.

The scenarios both clients share (replay, rejection, walk-back, fallback, faults, stop, idle
cost...) run against it in test_subscribers.py; worker processes, fan-out and Redis faults
across processes in test_subscriber_processes.py.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from subscriber import Subscriber, all_subscribers, unstarted
from subscriber.testing import RedisServer, append_event
from tests.helpers import Recorder

KEY = "app.yaml"
FAST: dict[str, Any] = {"block_ms": 300, "heartbeat_interval": 0.3}  # quick cycles for tests


def publish(server: RedisServer, text: str, version: int) -> str:
    return append_event(server.url, KEY, text.encode(), version=version)


def test_construction_does_no_io_and_the_registry_finds_unstarted_subscribers(
    tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
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
    assert all(s.key != KEY or s.status == "stopped" for s in all_subscribers())
