"""Every scenario both clients must pass alike, run against ``Subscriber`` and
``AsyncSubscriber`` (a real private redis-server each time).

``subscribers`` hands out either client behind the same blocking calls
(tests/subscriber_driver.py). What only one client has is tested beside it: threads and the
gunicorn registry in test_subscriber.py, tasks, cancellation and ASGI in test_aio.py.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis

from subscriber import (
    ConfigurationError,
    InitialLoadError,
    NoAcceptableConfig,
    RedisUnavailable,
)
from subscriber.keys import stream_keys
from subscriber.protocol import (
    SCHEMA_VERSION,
    Ack,
    WorkerState,
    decode_worker_state,
    key_id,
    now_ms,
    sha256_hex,
    sign,
    signing_key,
)
from subscriber.testing import RedisServer, append_event
from tests.helpers import Recorder, published_long_ago, settles, wait_until
from tests.subscriber_driver import KINDS, Kind, Make, drivers
from tests.workers.harness import acks, worker_states

KEY = "app.yaml"
EVENTS = stream_keys(KEY).events
FAST: dict[str, Any] = {"block_ms": 300, "heartbeat_interval": 0.3}  # quick cycles for tests


@pytest.fixture(params=KINDS)
def subscribers(request: pytest.FixtureRequest) -> Iterator[Make]:
    kind: Kind = request.param
    yield from drivers(kind)


def publish(server: RedisServer, text: str, version: int) -> str:
    return append_event(server.url, KEY, text.encode(), version=version)


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


def write_raw(client: redis.Redis, fields: dict[str, bytes | str | int]) -> str:
    return cast("bytes", client.xadd(EVENTS, cast("dict[Any, Any]", fields))).decode()


def state_in(server: RedisServer, worker: str, status: str) -> WorkerState | None:
    """``worker``'s state in ``:workers`` once it has ``status``."""
    state = worker_states(server.url, KEY).get(worker)
    return state if state is not None and state.status == status else None


# -- replay and follow ------------------------------------------------------------------


def test_start_replays_the_newest_version_then_follows(
    redis_server: RedisServer, subscribers: Make
) -> None:
    for version in (1, 2, 3):
        publish(redis_server, f"rate: {version}", version)
    rec = Recorder()
    sub = subscribers(KEY, rec, redis_url=redis_server.url, worker_id="pod-a:1", **FAST)
    assert not sub.started
    sub.start()
    assert sub.started
    assert rec.applied == ["rate: 3"]  # only the newest: history is not replayed in full
    assert sub.places(rec) == {sub.caller}  # the replay ran in start(), before it returned
    assert (sub.version, sub.status, sub.reload_count, sub.error_count) == (3, "applied", 1, 0)
    assert (sub.last_hash, sub.content) == (sha256_hex(b"rate: 3"), b"rate: 3")
    assert sub.last_reload_time is not None
    assert abs(sub.last_reload_time - time.time()) < 5

    publish(redis_server, "rate: 4", 4)
    wait_until(lambda: sub.version == 4, "version 4 applied in the background")
    assert rec.applied == ["rate: 3", "rate: 4"]
    assert sub.places(rec) == {sub.caller, sub.follower}

    def state_now() -> tuple[str, int, str]:
        state = worker_states(redis_server.url, KEY)["pod-a:1"]
        return (state.status, state.version, state.sha256)

    expected_state = ("applied", 4, sha256_hex(b"rate: 4"))
    assert settles(state_now, expected_state) == expected_state
    expected_acks = [(3, "applied", "pod-a:1"), (4, "applied", "pod-a:1")]
    decided = settles(
        lambda: [(a.version, a.status, a.worker) for a in acks(redis_server.url, KEY)],
        expected_acks,
    )
    assert decided == expected_acks
    sub.stop()
    assert sub.status == "stopped"
    assert worker_states(redis_server.url, KEY)["pod-a:1"].status == "stopped"


def test_rejection_keeps_the_previous_config_and_the_reason_reaches_acks(
    redis_server: RedisServer, subscribers: Make
) -> None:
    publish(redis_server, "rate: 1", 1)
    rec = Recorder()
    with subscribers(KEY, rec, redis_url=redis_server.url, worker_id="w", **FAST) as sub:
        publish(redis_server, "rate: REJECT", 2)
        # a pass counts a rejection as it meets it and sets the status at its end: wait for both
        wait_until(lambda: sub.error_count == 1 and sub.status == "rejected", "the rejection")
        assert (sub.version, sub.content, sub.status) == (1, b"rate: 1", "rejected")
        ack = wait_until(
            lambda: [a for a in acks(redis_server.url, KEY) if a.status == "rejected"],
            "rejection ack",
        )[0]
        assert (ack.version, ack.worker) == (2, "w")
        assert ack.error == "ValueError: rate must be a positive integer"

        state = wait_until(lambda: state_in(redis_server, "w", "rejected"), "the rejected state")
        assert (state.status, state.version, state.rejected_version) == ("rejected", 1, 2)
        assert state.error == ack.error

        publish(redis_server, "rate: 3", 3)  # a fixed config is picked up as usual
        wait_until(lambda: sub.version == 3, "version 3")
        assert sub.status == "applied"
    assert sub.started
    assert str(sub.status) == "stopped"  # leaving the with block stopped it
    assert rec.applied == ["rate: 1", "rate: 3"]


def test_start_walks_back_past_rejected_versions_and_reports_them(
    redis_server: RedisServer, subscribers: Make
) -> None:
    publish(redis_server, "rate: 1", 1)
    publish(redis_server, "rate: 2", 2)
    publish(redis_server, "rate: REJECT 3", 3)
    publish(redis_server, "rate: REJECT 4", 4)
    rec = Recorder()
    sub = subscribers(KEY, rec, redis_url=redis_server.url, worker_id="late", **FAST).start()
    assert rec.applied == ["rate: 2"]  # what siblings that rejected 3 and 4 are running
    assert (sub.version, sub.status, sub.error_count) == (2, "rejected", 2)
    reported = [(a.version, a.status) for a in acks(redis_server.url, KEY)]
    assert reported == [(4, "rejected"), (3, "rejected"), (2, "applied")]
    state = worker_states(redis_server.url, KEY)["late"]
    assert (state.status, state.version, state.rejected_version) == ("rejected", 2, 4)


def test_no_acceptable_version_raises_and_the_start_can_be_retried(
    redis_server: RedisServer, subscribers: Make
) -> None:
    publish(redis_server, "REJECT 1", 1)
    publish(redis_server, "REJECT 2", 2)
    sub = subscribers(KEY, Recorder(), redis_url=redis_server.url, worker_id="w", **FAST)
    with pytest.raises(NoAcceptableConfig) as info:
        sub.start()
    message = str(info.value)
    assert "version 2" in message
    assert "version 1" in message
    assert "rate must be a positive integer" in message
    assert "hotreload history" in message  # says what to do
    assert info.value.reasons[0].startswith("version 2")
    assert [a.status for a in acks(redis_server.url, KEY)] == ["rejected", "rejected"]
    assert not sub.started  # a failed start can be retried
    publish(redis_server, "rate: 3", 3)
    sub.start()
    assert sub.version == 3


def test_start_waits_for_the_first_event_of_an_empty_stream(
    redis_server: RedisServer, subscribers: Make
) -> None:
    rec = Recorder()
    sub = subscribers(KEY, rec, redis_url=redis_server.url, start_timeout=10, **FAST)
    timer = threading.Timer(0.5, publish, (redis_server, "rate: 1", 1))  # the publisher comes up
    timer.start()
    started = time.monotonic()
    sub.start()
    timer.join()
    assert 0.4 < time.monotonic() - started < 5
    assert (rec.applied, sub.version) == (["rate: 1"], 1)


def test_nothing_published_in_time_raises_or_uses_the_fallback(
    redis_server: RedisServer, subscribers: Make, tmp_path: Path
) -> None:
    sub = subscribers(KEY, Recorder(), redis_url=redis_server.url, start_timeout=0.3, **FAST)
    with pytest.raises(NoAcceptableConfig, match=r"nothing was published.*hotreload watch"):
        sub.start()

    mounted = tmp_path / KEY
    mounted.write_text("rate: 0")
    rec = Recorder()
    sub = subscribers(
        KEY, rec, redis_url=redis_server.url, start_timeout=0.3, fallback_path=mounted, **FAST
    ).start()
    assert (rec.applied, sub.status, sub.version) == (["rate: 0"], "fallback", 0)
    # The publisher catches up: the same content is adopted without a callback, new
    # content is applied.
    publish(redis_server, "rate: 0", 1)
    wait_until(lambda: sub.version == 1, "version 1 adopted")
    assert (rec.applied, sub.status) == (["rate: 0"], "applied")
    publish(redis_server, "rate: 2", 2)
    wait_until(lambda: sub.version == 2, "version 2")
    assert rec.applied == ["rate: 0", "rate: 2"]


def test_unreachable_redis_uses_the_fallback_then_follows_redis_when_it_appears(
    tmp_path: Path, subscribers: Make
) -> None:
    server = RedisServer(tmp_path / "late-redis")  # not started yet
    mounted = tmp_path / KEY
    mounted.write_text("rate: 0")
    rec = Recorder()
    sub = subscribers(
        KEY, rec, redis_url=server.url, start_timeout=0.5, fallback_path=mounted, **FAST
    )
    started = time.monotonic()
    sub.start()
    assert time.monotonic() - started < 2
    assert (rec.applied, sub.status, sub.version) == (["rate: 0"], "fallback", 0)
    with server:
        append_event(server.url, KEY, b"rate: 0", version=1)  # same content
        wait_until(lambda: sub.version == 1, "adopted once Redis is up", timeout=10)
        assert (rec.applied, sub.status) == (["rate: 0"], "applied")  # no callback
        append_event(server.url, KEY, b"rate: 2", version=2)
        wait_until(lambda: sub.version == 2, "version 2", timeout=10)
        assert rec.applied == ["rate: 0", "rate: 2"]
        sub.stop()  # while Redis is still up, to record "stopped"


def test_unreachable_redis_without_a_usable_fallback_raises_a_clear_error(
    tmp_path: Path, subscribers: Make
) -> None:
    url = f"unix://{tmp_path}/nothing-here.sock"
    sub = subscribers(KEY, Recorder(), redis_url=url, start_timeout=0.5, **FAST)
    started = time.monotonic()
    with pytest.raises(RedisUnavailable) as info:
        sub.start()
    assert time.monotonic() - started < 2
    assert url in str(info.value)
    assert "fallback_path" in str(info.value)  # says what to do

    missing = subscribers(
        KEY, Recorder(), redis_url=url, start_timeout=0.2, fallback_path=tmp_path / "missing"
    )
    with pytest.raises(InitialLoadError, match="missing"):
        missing.start()

    bad = tmp_path / "bad.yaml"
    bad.write_text("REJECT")
    refused = subscribers(KEY, Recorder(), redis_url=url, start_timeout=0.2, fallback_path=bad)
    with pytest.raises(InitialLoadError, match="rate must be a positive integer"):
        refused.start()


def test_start_against_a_frozen_redis_keeps_to_its_timeout(
    redis_server: RedisServer, subscribers: Make, tmp_path: Path
) -> None:
    publish(redis_server, "rate: 1", 1)
    mounted = tmp_path / KEY
    mounted.write_text("rate: 0")
    sub = subscribers(
        KEY, Recorder(), redis_url=redis_server.url, start_timeout=1.0, fallback_path=mounted,
        block_ms=5000,
    )  # fmt: skip
    redis_server.freeze()
    try:
        began = time.monotonic()
        sub.start()
        took = time.monotonic() - began
    finally:
        redis_server.thaw()
    assert took < 2.0
    assert sub.status == "fallback"
    wait_until(lambda: sub.version == 1, "Redis followed after the thaw", timeout=15)


# -- what the entries say ----------------------------------------------------------------


def test_malformed_and_forged_entries_are_rejected_without_a_crash(
    redis_server: RedisServer, client: redis.Redis, subscribers: Make
) -> None:
    publish(redis_server, "rate: 1", 1)
    rec = Recorder()
    sub = subscribers(KEY, rec, redis_url=redis_server.url, worker_id="w", **FAST).start()
    bad_entries: list[tuple[dict[str, bytes | str | int], str]] = [
        ({"garbage": b"\x00\x01\xff"}, "missing required field"),
        ({"version": 2, "content": b"rate: 2"}, "missing required field"),
        ({**valid_fields(b"rate: 3", 3), "version": "three"}, "not a decimal integer"),
        ({**valid_fields(b"rate: 4\xff\xfe", 4)}, "not valid UTF-8"),
        ({**valid_fields(b"rate: 5", 5), "sha256": sha256_hex(b"other")}, "forged"),
        ({**valid_fields(b"rate: 6", 6), "key": "other.yaml"}, "not 'app.yaml'"),
        ({**valid_fields(b"rate: 7", 7), "schema": 99}, "upgrade the subscriber"),
    ]
    expected = {write_raw(client, fields): reason for fields, reason in bad_entries}
    wait_until(lambda: sub.error_count == len(bad_entries), "every bad entry rejected")
    assert (rec.applied, sub.version) == (["rate: 1"], 1)

    def rejected_now() -> dict[str, Any]:
        return {a.entry_id: a for a in acks(redis_server.url, KEY) if a.status == "rejected"}

    settles(lambda: rejected_now().keys(), expected.keys())
    rejected = rejected_now()
    assert rejected.keys() == expected.keys()  # a few: each one reported, whatever the batching
    for entry_id, reason in expected.items():
        assert reason in rejected[entry_id].error, (reason, rejected[entry_id].error)
        if "UTF-8" not in reason:  # well-formed but not text: refused like a bad config
            assert rejected[entry_id].error.startswith(f"malformed entry {entry_id}")
    publish(redis_server, "rate: 8", 8)  # the thread or task is alive and well
    wait_until(lambda: sub.version == 8, "version 8")


def test_same_content_is_acknowledged_without_calling_back(
    redis_server: RedisServer, subscribers: Make
) -> None:
    publish(redis_server, "rate: 1", 1)
    rec = Recorder()
    sub = subscribers(KEY, rec, redis_url=redis_server.url, worker_id="w", **FAST).start()
    publish(redis_server, "rate: 1", 2)  # e.g. re-seeded by a publisher after a reset
    wait_until(lambda: sub.version == 2, "version 2 adopted")
    assert rec.applied == ["rate: 1"]
    assert sub.reload_count == 1

    def last_ack() -> tuple[int, str, bool]:
        last = acks(redis_server.url, KEY)[-1]
        return (last.version, last.status, last.unchanged)

    assert settles(last_ack, (2, "applied", True)) == (2, "applied", True)


def test_a_burst_applies_the_newest_and_acks_what_it_decided(
    redis_server: RedisServer, subscribers: Make
) -> None:
    publish(redis_server, "rate: 1", 1)
    gate, inside = threading.Event(), threading.Event()
    applied: list[str] = []

    def slow_apply(text: str) -> None:
        if text == "rate: 2":
            inside.set()
            gate.wait(10)  # hold the follower while the burst piles up
        if "REJECT" in text:
            raise ValueError("no")
        applied.append(text)

    sub = subscribers(KEY, slow_apply, redis_url=redis_server.url, worker_id="w", **FAST)
    sub.start()
    publish(redis_server, "rate: 2", 2)
    inside.wait(5)
    for version in (3, 4, 5):
        publish(redis_server, f"rate: {version}", version)
    publish(redis_server, "rate: REJECT", 6)
    gate.set()
    wait_until(lambda: sub.error_count == 1, "the burst decided")
    assert applied == ["rate: 1", "rate: 2", "rate: 5"]  # 3 and 4 superseded, never applied
    expected = [(1, "applied"), (2, "applied"), (6, "rejected"), (5, "applied")]
    decided = settles(
        lambda: [(a.version, a.status) for a in acks(redis_server.url, KEY)], expected
    )
    assert decided == expected
    assert (sub.version, sub.status) == (5, "rejected")


def test_decode_false_passes_bytes_and_decode_true_rejects_non_utf8(
    redis_server: RedisServer, subscribers: Make
) -> None:
    append_event(redis_server.url, KEY, b"\xff\xfe binary", version=1)
    received: list[bytes] = []
    raw = subscribers(KEY, received.append, redis_url=redis_server.url, decode=False, **FAST)
    raw.start()
    assert received == [b"\xff\xfe binary"]
    text = subscribers(KEY, Recorder(), redis_url=redis_server.url, **FAST)
    with pytest.raises(NoAcceptableConfig, match=r"not valid UTF-8.*decode=False"):
        text.start()


# -- Redis's faults ---------------------------------------------------------------------


def test_redis_killed_and_restarted_empty_converges(
    redis_server: RedisServer, subscribers: Make, caplog: pytest.LogCaptureFixture
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
    caplog.set_level(logging.INFO, logger="subscriber")
    sub = subscribers(KEY, rec, redis_url=redis_server.url, worker_id="w", metrics=True, **FAST)
    sub.start()
    errors = connection_errors()
    assert sub.version == 2
    redis_server.kill()  # SIGKILL: everything is lost, ids and versions included
    time.sleep(0.5)  # the outage; the subscriber keeps its config
    assert (sub.version, sub.content) == (2, b"rate: 2")
    redis_server.start()  # empty
    # A publisher that forgot too re-seeds at version 1: below what the worker has seen, so
    # the worker holds its config, says why, and reports the entry as a replay.
    publish(redis_server, "rate: stale", 1)
    state = wait_until(lambda: state_in(redis_server, "w", "holding"), "visibly holding", 15)
    assert (state.version, state.seen) == (2, 2)
    assert state.error.startswith("holding v2: the stream")
    assert (sub.status, sub.content) == ("holding", b"rate: 2")
    assert connection_errors() > errors  # the metrics hook saw the lost connection
    publish(redis_server, "rate: reseeded", 3)  # re-published above what workers have seen
    wait_until(lambda: sub.content == b"rate: reseeded", "converged", 15)
    assert (sub.version, sub.status) == (3, "applied")
    state = wait_until(lambda: state_in(redis_server, "w", "applied"), "state rewritten")
    assert (state.version, state.error) == (3, "")
    publish(redis_server, "rate: 3", 4)  # and it follows from there
    wait_until(lambda: sub.version == 4 and sub.content == b"rate: 3", "v4")
    sub.stop()
    assert rec.applied == ["rate: 2", "rate: reseeded", "rate: 3"]
    assert "lost Redis" in caplog.text
    assert "Redis is back" in caplog.text


def test_a_stream_recreated_behind_the_cursor_is_found_by_the_periodic_check(
    redis_server: RedisServer, client: redis.Redis, subscribers: Make,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    # An entry id from a clock far ahead; after the stream is deleted and re-created,
    # new ids are lower than the subscriber's position, so XREAD alone would never see them.
    client.xadd(EVENTS, cast("dict[Any, Any]", valid_fields(b"rate: 1", 1)), id="9999999999999-0")
    rec = Recorder()
    sub = subscribers(KEY, rec, redis_url=redis_server.url, resync_interval=0.3, **FAST)
    sub.start()
    client.delete(EVENTS)
    caplog.set_level(logging.INFO, logger="subscriber")
    publish(redis_server, "rate: 2", 2)  # the publisher re-publishes, above what it published
    wait_until(lambda: rec.applied[-1] == "rate: 2", "the re-created stream followed")
    assert sub.version == 2
    assert "reset behind the subscriber" in caplog.text


def test_a_key_of_the_wrong_type_is_survived(
    redis_server: RedisServer, client: redis.Redis, subscribers: Make,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    publish(redis_server, "rate: 1", 1)
    rec = Recorder()
    sub = subscribers(KEY, rec, redis_url=redis_server.url, **FAST).start()
    caplog.set_level(logging.WARNING, logger="subscriber")
    client.delete(EVENTS)
    client.set(EVENTS, "not a stream")  # an operator's mistake
    wait_until(lambda: "WRONGTYPE" in caplog.text, "the refusal logged")
    assert (sub.version, sub.content) == (1, b"rate: 1")  # still running its config
    client.delete(EVENTS)
    publish(redis_server, "rate: 2", 2)
    wait_until(lambda: rec.applied[-1:] == ["rate: 2"], "following again", timeout=10)


# -- versions only go up ---------------------------------------------------------------

SIGNING_KEY = b"0123456789abcdef0123456789abcdef"


def publish_signed(client: redis.Redis, text: str, version: int) -> str:
    """XADD an event signed as the publisher signs it (``--signing-key-file``)."""
    content = text.encode()
    fields = valid_fields(content, version)
    secret = signing_key(SIGNING_KEY)
    fields["sig"] = sign(
        secret, KEY, version, sha256_hex(content), cast("int", fields["published_at"])
    )
    fields["kid"] = key_id(secret)
    return write_raw(client, fields)


def append_again(client: redis.Redis, entry_id: str) -> str:
    """What an attacker with write access does: one entry's fields, copied from XRANGE, in
    one XADD at the end of the stream -- an entry published an hour ago (signed for then),
    as a genuinely old one is: a fresh worker tells it by its id being far after it."""
    [(_, fields)] = cast(
        "list[tuple[bytes, dict[bytes, bytes]]]", client.xrange(EVENTS, entry_id, entry_id)
    )
    old = published_long_ago(fields, secret=SIGNING_KEY)
    return cast("bytes", client.xadd(EVENTS, old)).decode()  # type: ignore[arg-type]


def replay_ack(server: RedisServer, worker: str, entry_id: str) -> Ack | None:
    found = [a for a in acks(server.url, KEY) if (a.worker, a.entry_id) == (worker, entry_id)]
    return found[0] if found else None


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_an_old_entry_appended_again_is_a_replay_and_a_fresh_worker_picks_the_highest(
    redis_server: RedisServer, client: redis.Redis, subscribers: Make, signed: bool
) -> None:
    keys: dict[str, Any] = {"signing_key": SIGNING_KEY} if signed else {}
    ids = [
        publish_signed(client, f"rate: {v}", v)
        if signed
        else publish(redis_server, f"rate: {v}", v)
        for v in range(1, 6)
    ]
    rec = Recorder()
    sub = subscribers(KEY, rec, redis_url=redis_server.url, worker_id="running", **keys, **FAST)
    sub.start()
    assert (sub.version, rec.applied) == (5, ["rate: 5"])

    replayed = append_again(client, ids[0])  # genuine v1 (signature and all), appended last
    ack = wait_until(lambda: replay_ack(redis_server, "running", replayed), "the replay reported")
    assert (ack.status, ack.version) == ("rejected", 1)
    assert ack.error.startswith("replay: version 1 is not above version 5")
    time.sleep(0.5)  # a survey of the history runs after a batch of replays
    assert (sub.version, sub.content, sub.status) == (5, b"rate: 5", "applied")
    assert rec.applied == ["rate: 5"]
    state = wait_until(lambda: state_in(redis_server, "running", "applied"), "state")
    assert (state.version, state.seen, state.error) == (5, 5, "")

    fresh_rec = Recorder()  # a worker started now: the last appended entry is v1
    fresh = subscribers(
        KEY, fresh_rec, redis_url=redis_server.url, worker_id="fresh", **keys, **FAST
    )
    fresh.start()
    assert (fresh.version, fresh_rec.applied, fresh.status) == (5, ["rate: 5"], "applied")
    ack = wait_until(lambda: replay_ack(redis_server, "fresh", replayed), "reported by it too")
    assert ack.error.startswith("replay: version 1 is not above version 5")

    publish_signed(client, "rate: 6", 6) if signed else publish(redis_server, "rate: 6", 6)
    wait_until(lambda: sub.version == 6 and fresh.version == 6, "v6 applied by both")
    assert (rec.applied, fresh_rec.applied) == (["rate: 5", "rate: 6"], ["rate: 5", "rate: 6"])


def test_redis_restored_from_an_older_backup_leaves_workers_holding(
    redis_server: RedisServer, client: redis.Redis, subscribers: Make
) -> None:
    for version in (1, 2, 3):
        publish(redis_server, f"rate: {version}", version)
    client.save()  # the backup, taken at v3
    backup = redis_server.directory / "backup.rdb"
    shutil.copy(redis_server.directory / "dump.rdb", backup)
    for version in (4, 5):
        publish(redis_server, f"rate: {version}", version)
    rec = Recorder()
    sub = subscribers(KEY, rec, redis_url=redis_server.url, worker_id="w", **FAST).start()
    assert sub.version == 5

    redis_server.stop()  # no save on shutdown: persistence is off but for SAVE
    shutil.copy(backup, redis_server.directory / "dump.rdb")
    redis_server.start()  # restored: v1..v3
    state = wait_until(lambda: state_in(redis_server, "w", "holding"), "holding", 15)
    assert (state.version, state.seen, state.sha256) == (5, 5, sha256_hex(b"rate: 5"))
    assert state.error == (
        "holding v5: the stream's newest version is 3 (restored, re-created or failed over "
        "behind this worker); waiting for a version above 5"
    )
    assert (sub.status, sub.version, sub.content) == ("holding", 5, b"rate: 5")
    assert rec.applied == ["rate: 5"]  # v3's content never applied
    # the restored :acks is the backup's (empty): the newest restored entry is reported as
    # a replay, the older ones are history
    reported = {(a.version, a.status, a.error[:40]) for a in acks(redis_server.url, KEY)}
    assert reported == {(3, "rejected", "replay: version 3 is not above version 5")}

    publish(redis_server, "rate: 6", 6)  # the daemon publishes above what workers have seen
    wait_until(lambda: sub.version == 6, "v6 applied")
    assert (rec.applied, sub.status) == (["rate: 5", "rate: 6"], "applied")
    state = wait_until(lambda: state_in(redis_server, "w", "applied"), "no longer holding")
    assert (state.version, state.seen, state.error) == (6, 6, "")


def test_a_stream_recreated_empty_behind_the_worker_leaves_it_holding(
    redis_server: RedisServer, client: redis.Redis, subscribers: Make
) -> None:
    publish(redis_server, "rate: 1", 1)
    publish(redis_server, "rate: 2", 2)
    rec = Recorder()
    sub = subscribers(
        KEY, rec, redis_url=redis_server.url, worker_id="w", resync_interval=0.3, **FAST
    ).start()
    client.delete(EVENTS)  # re-created empty
    state = wait_until(lambda: state_in(redis_server, "w", "holding"), "holding")
    assert state.error.startswith("holding v2: the stream is empty")
    assert (sub.status, sub.version) == ("holding", 2)
    stale = publish(redis_server, "rate: stale", 1)  # a publisher that forgot: version 1
    ack = wait_until(lambda: replay_ack(redis_server, "w", stale), "the replay reported")
    assert ack.error.startswith("replay: version 1 is not above version 2")
    wait_until(
        lambda: "version is 1" in getattr(state_in(redis_server, "w", "holding"), "error", ""),
        "holding on the stream's version 1",
    )
    assert (sub.status, sub.content, rec.applied) == ("holding", b"rate: 2", ["rate: 2"])
    publish(redis_server, "rate: 3", 3)
    wait_until(lambda: sub.version == 3, "v3 applied")
    assert (sub.status, rec.applied) == ("applied", ["rate: 2", "rate: 3"])


# -- stopping and idling ----------------------------------------------------------------


def test_stop_is_prompt_even_with_a_long_block_and_records_stopped(
    redis_server: RedisServer, subscribers: Make
) -> None:
    publish(redis_server, "rate: 1", 1)
    sub = subscribers(
        KEY, Recorder(), redis_url=redis_server.url, worker_id="w", block_ms=30_000
    ).start()
    time.sleep(0.2)  # let it settle into its 30 s blocking read
    began = time.perf_counter()
    sub.stop()
    took = time.perf_counter() - began
    print(f"{sub.kind}.stop() with a 30 s block took {took * 1000:.1f} ms")
    assert took < 1.0
    assert sub.background() == []  # the thread or the task is gone
    assert worker_states(redis_server.url, KEY)["w"].status == "stopped"
    sub.stop()  # idempotent
    with pytest.raises(RuntimeError, match="create a new one"):
        sub.start()


def test_stop_is_prompt_while_redis_is_frozen(redis_server: RedisServer, subscribers: Make) -> None:
    publish(redis_server, "rate: 1", 1)
    sub = subscribers(KEY, Recorder(), redis_url=redis_server.url, block_ms=5000).start()
    redis_server.freeze()
    try:
        time.sleep(0.2)
        began = time.perf_counter()
        sub.stop()  # the final state write gives up after FINAL_WRITE_TIMEOUT
        took = time.perf_counter() - began
    finally:
        redis_server.thaw()
    print(f"{sub.kind}.stop() with Redis frozen took {took * 1000:.1f} ms")
    assert took < 1.5


def test_idle_cost_is_one_round_trip_per_block_and_the_heartbeat_stays_fresh(
    redis_server: RedisServer, client: redis.Redis, subscribers: Make
) -> None:
    publish(redis_server, "rate: 1", 1)
    sub = subscribers(
        KEY, Recorder(), redis_url=redis_server.url, worker_id="w", block_ms=250,
        heartbeat_interval=0.25,
    )  # fmt: skip
    sub.start()
    client.config_resetstat()
    first = decode_worker_state(cast("bytes", client.hget(stream_keys(KEY).workers, "w")))
    idle = 2.0
    time.sleep(idle)
    stats = client.info("commandstats")
    reads = stats["cmdstat_xread"]["calls"]
    beats = stats["cmdstat_hset"]["calls"]
    print(f"{sub.kind} idle {idle} s with block 250 ms: {reads} XREAD, {beats} HSET")
    assert idle / 0.25 - 2 <= reads <= idle / 0.25 + 2
    assert beats <= reads + 1
    last = decode_worker_state(cast("bytes", client.hget(stream_keys(KEY).workers, "w")))
    assert last.heartbeat - first.heartbeat >= 1000
    assert last.heartbeat_interval == 0.25


def test_settings_are_checked_at_construction(subscribers: Make) -> None:
    url = "unix:///tmp/x.sock"
    with pytest.raises(ConfigurationError, match="invalid config key"):
        subscribers("bad/key", Recorder(), redis_url=url)
    with pytest.raises(ConfigurationError, match="block_ms"):
        subscribers(KEY, Recorder(), redis_url=url, block_ms=0)
    with pytest.raises(ConfigurationError, match="scheme"):
        subscribers(KEY, Recorder(), redis_url="http://x")
