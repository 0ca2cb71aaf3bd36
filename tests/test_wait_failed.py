"""``hotreload wait`` never succeeds silently while a worker of the key stopped with an error
(issue 23): its follower ended ("the follower ended on ...: restart it"), so its process may
go on serving its old config while following nothing. Real workers (``Subscriber``) on a
private redis-server, the CLI in its own process.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from publisher.publish import Publisher
from subscriber import Subscriber
from subscriber._redis import connect
from subscriber.testing import RedisServer
from tests.helpers import wait_until

KEY = "app.yaml"


class _Boom(BaseException):
    """A bug outside the callback: the follower ends on it."""


class _Dying(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        if "applied version 2" in record.getMessage():
            raise _Boom("a bug")


def hotreload_wait(url: str, *args: str) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "publisher", "wait", KEY, *args, "--redis", url],
        capture_output=True,
        check=False,
        timeout=60,
        env={**os.environ, "NO_COLOR": "1", "HOTRELOAD_REDIS_URL": ""},
    )
    return done.returncode, done.stdout.decode()


@pytest.fixture
def a_dead_follower(redis_server: RedisServer) -> Iterator[tuple[Publisher, Subscriber]]:
    """Two workers on v1; the follower of ``dying`` ends on a bug as it applies v2, while
    ``healthy`` (yielded, with the publisher) goes on."""
    client = connect(redis_server.url, socket_timeout=5)
    publisher = Publisher(client)
    publisher.publish(KEY, b"v: 1\n")
    log = logging.getLogger(f"tests.dying.{time.monotonic_ns()}")
    log.propagate = False
    log.setLevel(logging.INFO)
    log.addHandler(_Dying())
    healthy = Subscriber(
        KEY, lambda text: None, redis_url=redis_server.url, worker_id="healthy",
        heartbeat_interval=0.5, metrics=False,
    )  # fmt: skip
    dying = Subscriber(
        KEY, lambda text: None, redis_url=redis_server.url, worker_id="dying", logger=log,
        heartbeat_interval=0.5, metrics=False,
    )  # fmt: skip
    with healthy, dying:
        publisher.publish(KEY, b"v: 2\n")
        wait_until(lambda: dying.status == "stopped", timeout=10)
        wait_until(lambda: healthy.version == 2, timeout=10)
        yield publisher, healthy
    client.close()


def test_wait_fails_naming_a_worker_that_stopped_with_an_error(
    redis_server: RedisServer, a_dead_follower: tuple[Publisher, Subscriber]
) -> None:
    publisher, healthy = a_dead_follower
    publisher.publish(KEY, b"v: 3\n")  # which the healthy worker alone runs
    wait_until(lambda: healthy.version == 3, timeout=10)
    started = time.monotonic()
    code, out = hotreload_wait(redis_server.url, "--timeout", "20")

    assert code == 1, out  # as a rejection: at once, not after the timeout
    assert time.monotonic() - started < 15
    lines = out.splitlines()
    assert lines[0].startswith(f"{KEY} v3 (")
    assert lines[0].endswith(
        ": 1 stopped with an error without running it (1/1 live workers run it):"
    )
    assert lines[1].startswith("  dying: stopped on v2: the follower ended on _Boom: a bug")
    assert "restart it" in lines[1]


def test_a_worker_that_stopped_with_an_error_on_the_target_does_not_fail_wait(
    redis_server: RedisServer, a_dead_follower: tuple[Publisher, Subscriber]
) -> None:
    # v2 is what it ran when its follower ended: this wait is answered, it is not failed
    code, out = hotreload_wait(redis_server.url, "--timeout", "20")
    assert code == 0, out
    assert ": all 1 live workers run it (after " in out.splitlines()[0], out
