"""Scenarios of what others get wrong, run against ``Subscriber`` and ``AsyncSubscriber``
alike (a real private redis-server each time): callbacks that raise ``SystemExit`` or any
``BaseException`` or call ``stop()``, a follower that dies, and hostile entries -- junk
versions, oversized entries, a flood of junk (issue 23).

The driver and the helpers are test_subscribers.py's; a callback that never returns (only a
thread can be given up on) is in test_subscriber.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest
import redis

from subscriber import AsyncSubscriber, Subscriber, _reasons
from subscriber._reasons import MAX_ERROR_CHARS
from subscriber.protocol import MAX_ENTRY_BYTES, WorkerState
from subscriber.testing import RedisServer
from tests.helpers import Recorder, wait_until
from tests.subscriber_driver import Make
from tests.test_subscribers import (
    EVENTS,
    FAST,
    KEY,
    publish,
    state_in,
    subscribers,
    valid_fields,
    write_raw,
)
from tests.workers.harness import acks

__all__ = ["subscribers"]  # the fixture, imported to be used here


class _Boom(BaseException):
    """A BaseException that is neither SystemExit nor KeyboardInterrupt."""


@pytest.mark.parametrize("raised", [SystemExit(2), KeyboardInterrupt(), _Boom("boom")])
def test_a_callback_raising_a_base_exception_is_a_rejection_and_the_follower_goes_on(
    redis_server: RedisServer, subscribers: Make, raised: BaseException
) -> None:
    publish(redis_server, "rate: 1", 1)

    def validate(text: str) -> None:
        if "EXIT" in text:
            raise raised  # e.g. a validator calling sys.exit()

    sub = subscribers(KEY, validate, redis_url=redis_server.url, worker_id="w", **FAST).start()
    publish(redis_server, "rate: EXIT", 2)
    ack = wait_until(
        lambda: [a for a in acks(redis_server.url, KEY) if a.status == "rejected"], "the ack"
    )[0]
    assert (ack.version, ack.error) == (2, _reasons.describe(raised))
    assert (sub.status, sub.version) == ("rejected", 1)
    publish(redis_server, "rate: 3", 3)  # still following (and the event loop still runs)
    wait_until(lambda: sub.version == 3, "version 3 applied")
    assert wait_until(lambda: state_in(redis_server, "w", "applied"), "applied").version == 3


def test_a_follower_that_dies_says_so_and_is_never_counted_as_applied(
    redis_server: RedisServer, subscribers: Make
) -> None:
    class Dying(logging.Handler):  # a bug outside the callback: the follower ends on it
        def emit(self, record: logging.LogRecord) -> None:
            if "applied version 2" in record.getMessage():
                raise _Boom("a bug")

    log = logging.getLogger(f"tests.dying.{time.monotonic_ns()}")
    log.propagate = False
    log.setLevel(logging.INFO)
    log.addHandler(Dying())
    publish(redis_server, "rate: 1", 1)
    sub = subscribers(
        KEY, Recorder(), redis_url=redis_server.url, worker_id="w", logger=log, **FAST
    )
    sub.start()
    publish(redis_server, "rate: 2", 2)
    state = wait_until(lambda: state_in(redis_server, "w", "stopped"), "stopped in :workers")
    assert "the follower ended on _Boom: a bug" in state.error
    assert "restart it" in state.error
    assert sub.status == "stopped"
    wait_until(lambda: sub.background() == [], "the thread or task is gone")


def test_a_callback_calling_stop_during_start_records_stopped(
    redis_server: RedisServer, subscribers: Make
) -> None:
    publish(redis_server, "rate: 1", 1)
    holder: list[Subscriber | AsyncSubscriber] = []

    def stop_now(text: str) -> None:
        target = holder[0]
        if isinstance(target, AsyncSubscriber):  # stop() is a coroutine: it runs at once
            asyncio.get_running_loop().create_task(target.stop())
        else:
            target.stop()

    sub = subscribers(KEY, stop_now, redis_url=redis_server.url, worker_id="w", **FAST)
    holder.append(sub.sub)
    sub.start()
    wait_until(lambda: state_in(redis_server, "w", "stopped"), "stopped in :workers")
    assert sub.status == "stopped"
    assert sub.background() == []


def test_junk_versions_are_malformed_and_never_block_the_next_version(
    redis_server: RedisServer, client: redis.Redis, subscribers: Make
) -> None:
    publish(redis_server, "rate: 1", 1)
    sub = subscribers(KEY, Recorder(), redis_url=redis_server.url, worker_id="w", **FAST)
    sub.start()
    for junk in (2**63, "1e17", 2**53, -5):  # unsigned: what a version claims counts
        write_raw(client, {**valid_fields(b"rate: junk", 2), "version": junk})
    wait_until(lambda: sub.error_count == 4, "the junk versions rejected")
    publish(redis_server, "rate: 2", 2)  # not a replay: no junk version was believed
    wait_until(lambda: sub.version == 2, "version 2 applied")

    def applied_v2() -> WorkerState | None:
        state = state_in(redis_server, "w", "applied")
        return state if state is not None and state.version == 2 else None

    state = wait_until(applied_v2, "state applied v2")
    assert (state.version, state.seen) == (2, 2)


def test_an_oversized_entry_is_refused_unread_and_its_error_is_bounded(
    redis_server: RedisServer, client: redis.Redis, subscribers: Make
) -> None:
    publish(redis_server, "rate: 1", 1)
    sub = subscribers(KEY, Recorder(), redis_url=redis_server.url, worker_id="w", **FAST)
    sub.start()
    padded = {**valid_fields(b"rate: 2", 2), "padding": b"x" * (MAX_ENTRY_BYTES + 1)}
    big_id = write_raw(client, padded)  # a valid config, but over the wire limit
    wait_until(lambda: sub.error_count == 1, "the oversized entry rejected")
    assert sub.version == 1
    huge_key = {**valid_fields(b"", 3), "key": "k" * 1_000_000}  # quoted in its error
    write_raw(client, huge_key)
    wait_until(lambda: sub.error_count == 2, "the entry for another key rejected")
    rejected = wait_until(lambda: rejections(redis_server)[1:] and rejections(redis_server))
    assert rejected[0].entry_id == big_id
    assert f"over the {MAX_ENTRY_BYTES} limit" in rejected[0].error
    assert all(len(a.error) <= MAX_ERROR_CHARS for a in rejected)
    publish(redis_server, "rate: 4", 4)
    wait_until(lambda: sub.version == 4, "version 4")


def test_a_flood_of_junk_costs_one_ack_per_read_and_a_few_log_lines(
    redis_server: RedisServer,
    client: redis.Redis,
    subscribers: Make,
    caplog: pytest.LogCaptureFixture,
) -> None:
    publish(redis_server, "rate: 1", 1)
    caplog.set_level(logging.WARNING, logger="subscriber")
    sub = subscribers(KEY, Recorder(), redis_url=redis_server.url, worker_id="w", **FAST)
    sub.start()
    client.config_resetstat()
    pipe = client.pipeline(transaction=False)
    junk = 4000
    for index in range(junk):
        pipe.xadd(EVENTS, {"garbage": b"junk %d" % index})
    pipe.execute()
    publish(redis_server, "rate: 2", 2)
    wait_until(lambda: sub.version == 2, "the genuine version behind the junk", timeout=30)
    # each one refused and counted (but those read with version 2: older, so superseded) ...
    assert junk - 8 < sub.error_count <= junk
    xadds = client.info("commandstats")["cmdstat_xadd"]["calls"] - junk - 1
    lines = [r for r in caplog.records if "malformed" in r.getMessage()]
    print(f"{sub.kind}: {junk} junk entries -> {xadds} ack XADDs, {len(lines)} log lines")
    # ... but past the first MALFORMED_TOLD_ONE_BY_ONE (10), acked once per read of up to 8
    # (batch_size) and logged in one summary line per MALFORMED_LOG_INTERVAL
    assert xadds <= 10 + junk // 8 + 20
    assert len(lines) <= 10 + 3


def rejections(redis_server: RedisServer) -> list[Any]:
    """The rejected acks in ``:acks`` (written after the callback: poll for them)."""
    return [a for a in acks(redis_server.url, KEY) if a.status == "rejected"]
