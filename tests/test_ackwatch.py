"""The daemon's ack follower (``publisher.ackwatch``) with many keys, on a real redis-server:
a status pass classifies the keys that had acks, the ones never classified and a rolling
slice of the rest -- not every key every pass (4 % of a core at 1,000 keys, 31 % at 10,000).

Which keys a pass classified is recorded by wrapping the real ``inspect.status`` (it still
runs against Redis), the metric it sets is read from the real registry."""

from __future__ import annotations

import math
import time
from typing import Any

import pytest
import redis

from publisher import inspect
from publisher.ackwatch import IDLE_PASSES, STATUS_SLICE, AckFollower
from publisher.metrics import DaemonMetrics
from subscriber.keys import stream_keys
from subscriber.protocol import Ack, WorkerState, encode_ack, encode_worker_state, now_ms
from subscriber.testing import RedisServer, append_event
from tests.helpers import wait_until


def _record_classified(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every key a status pass classifies from now on, in order (the real ``inspect.status``,
    which ackwatch calls, still runs)."""
    classified: list[str] = []
    real_status = inspect.status

    def recording(client: Any, key: str, **kwargs: Any) -> Any:
        classified.append(key)
        return real_status(client, key, **kwargs)

    monkeypatch.setattr(inspect, "status", recording)
    return classified


def _passes(
    monkeypatch: pytest.MonkeyPatch, follower: AckFollower, classified: list[str]
) -> list[int]:
    """After each of ``follower``'s passes over the keys: how many classifications so far."""
    passes: list[int] = []
    original = follower._update_workers

    def counted(client: Any, slices: int = 1) -> None:
        original(client, slices)
        passes.append(len(classified))

    monkeypatch.setattr(follower, "_update_workers", counted)
    return passes


def test_a_status_pass_classifies_active_keys_and_a_slice(
    redis_server: RedisServer, client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = [f"k{i:03d}.yaml" for i in range(4 * STATUS_SLICE)]
    for name in names:
        append_event(redis_server.url, name, b"a: 1\n", version=1)
        _add_worker(client, name)
    passes: list[list[str]] = [[]]
    real_status = inspect.status

    def recording(client: Any, key: str, **kwargs: Any) -> Any:
        if key not in passes[-1]:
            passes[-1].append(key)
        return real_status(client, key, **kwargs)

    monkeypatch.setattr(inspect, "status", recording)  # what ackwatch calls
    metrics = DaemonMetrics()
    follower = AckFollower(
        redis_server.url,
        lambda: names,
        metrics,
        prefix="hotreload",
        status_interval=0.05,
        block_ms=50,
    )
    original, looked_at = follower._update_workers, follower._looked_at

    def looking(client: Any, key: str, now: int) -> Any:  # unchanged: not classified again
        passes[-1].append(key)
        return looked_at(client, key, now)

    monkeypatch.setattr(follower, "_looked_at", looking)

    def one_pass(client: Any, slices: int = 1) -> None:
        original(client, slices)
        passes.append([])

    monkeypatch.setattr(follower, "_update_workers", one_pass)
    follower.start()
    try:
        wait_until(lambda: len(passes) > 3, "three status passes", 10)
        assert sorted(passes[0]) == names  # the first: every key, never classified before
        # then a slice each (idle passes: IDLE_PASSES slices, as many intervals apart)
        assert all(len(keys) == IDLE_PASSES * STATUS_SLICE for keys in passes[1:3])
        # an ack on a key the slice is far from: classified at the next pass
        target = passes[2][0]  # just classified: the slice comes back to it after others
        ack = Ack(worker="w1", version=1, sha256="", status="rejected", error="bad",
                  at=now_ms(), published_at=now_ms())  # fmt: skip
        mark = len(passes)
        client.xadd(stream_keys(target).acks, encode_ack(ack))  # type: ignore[arg-type]
        wait_until(lambda: any(target in p for p in passes[mark:-1]), "the acked key", 10)
        first = next(i for i in range(mark, len(passes)) if target in passes[i])
        assert first - mark <= 2  # its pass, or the one after (the ack came mid-pass)
        assert (
            metrics.registry.get_sample_value("hotreload_worker_rejections_total", {"key": target})
            == 1.0
        )
        # and every key is classified again within a sweep of slices
        sweep = math.ceil(len(names) / STATUS_SLICE)
        wait_until(lambda: len(passes) > first + sweep + 1, "a sweep", 10)
        assert {k for p in passes[first + 1 : first + 1 + sweep] for k in p} == set(names)
    finally:
        follower.stop()


def _add_worker(client: redis.Redis, key: str, worker: str = "w0") -> None:
    state = WorkerState(worker=worker, status="applied", version=1, heartbeat=now_ms(),
                        heartbeat_interval=5.0)  # fmt: skip
    client.hset(stream_keys(key).workers, worker, encode_worker_state(state))


def test_a_key_without_workers_is_left_out_of_the_slice_until_it_has_one(
    redis_server: RedisServer, client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # counts of a key that had no worker stay 0 until a worker shows up in :workers (or
    # acks): its rolling pass is one HLEN, not a classification
    names = [f"k{i:03d}.yaml" for i in range(2 * STATUS_SLICE)]
    for name in names:
        append_event(redis_server.url, name, b"a: 1\n", version=1)
    classified = _record_classified(monkeypatch)
    metrics = DaemonMetrics()
    follower = AckFollower(
        redis_server.url, lambda: names, metrics, prefix="hotreload", status_interval=0.05
    )
    follower.start()
    try:
        wait_until(lambda: len(classified) >= len(names), "the first pass", 10)
        assert sorted(classified) == names  # every key once
        late = names[5]
        _add_worker(client, late)  # no ack: a worker that started before anything it acks
        wait_until(lambda: late in classified[len(names) :], "its slice", 10)
        assert set(classified[len(names) :]) == {late}
        sample = {"key": late, "state": "converged"}
        wait_until(lambda: metrics.registry.get_sample_value("hotreload_workers", sample) == 1)
    finally:
        follower.stop()


def test_idle_passes_are_further_apart_and_an_ack_brings_the_next_one_in(
    redis_server: RedisServer, client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without acks a pass waits ``IDLE_PASSES`` intervals (each classifying every key of a
    one-key daemon: an idle publisher's ack follower did that every 10 s for nothing); an
    ack, or a worker that appears in ``:workers``, makes the next pass come within one
    interval, as before, so the gauges follow a publish or a new worker as soon."""
    append_event(redis_server.url, "k.yaml", b"a: 1\n", version=1)
    _add_worker(client, "k.yaml")
    passes: list[float] = []
    follower = AckFollower(
        redis_server.url, lambda: ["k.yaml"], DaemonMetrics(), prefix="hotreload",
        status_interval=1.0,
    )  # fmt: skip
    original = follower._update_workers

    def timed(client: Any, slices: int = 1) -> None:
        original(client, slices)
        passes.append(time.monotonic())

    monkeypatch.setattr(follower, "_update_workers", timed)
    follower.start()
    try:
        wait_until(lambda: len(passes) >= 2, "two idle passes", 15)
        assert passes[1] - passes[0] >= IDLE_PASSES * 0.9  # idle: IDLE_PASSES intervals apart
        mark = len(passes)
        ack = Ack(worker="w0", version=1, sha256="", status="applied", at=now_ms(),
                  published_at=now_ms())  # fmt: skip
        sent = time.monotonic()
        client.xadd(stream_keys("k.yaml").acks, encode_ack(ack))  # type: ignore[arg-type]
        wait_until(lambda: len(passes) > mark, "the pass after the ack", 10)
        # within about one interval of the ack (the idle wait: IDLE_PASSES intervals)
        assert passes[mark] - sent < IDLE_PASSES * 0.9
        # so does a worker that starts (in :workers before it acks anything)
        wait_until(lambda: len(passes) > mark + 1, "an idle pass", 10)
        mark, sent = len(passes), time.monotonic()
        _add_worker(client, "k.yaml", "w9")
        wait_until(lambda: len(passes) > mark, "the pass after the new worker", 10)
        assert passes[mark] - sent < IDLE_PASSES * 0.9
    finally:
        follower.stop()


def _state(worker: str, status: str) -> bytes:
    now = now_ms()
    if status == "rejected":
        state = WorkerState(worker=worker, status="rejected", version=1, rejected_version=2,
                            error="bad", heartbeat=now, heartbeat_interval=60)  # fmt: skip
    else:
        state = WorkerState(worker=worker, status="applied", version=2, heartbeat=now,
                            heartbeat_interval=60)  # fmt: skip
    return encode_worker_state(state)


@pytest.mark.parametrize("after", ["the first pass", "a pass brought in by an ack"])
def test_workers_written_right_after_a_pass_read_them_are_classified_at_the_next_tick(
    redis_server: RedisServer, client: redis.Redis, monkeypatch: pytest.MonkeyPatch, after: str
) -> None:
    """A tick compares each key's ``HLEN`` with what its last classification read, so a
    worker written right after a pass read ``:workers`` brings the next pass in at the next
    tick. Compared with a tick's ``HLEN`` instead, it waited for the idle pass
    (``IDLE_PASSES`` ticks: the daemon's gauges took up to 30 s, tests/test_endpoints.py):
    after the first pass, the next tick took the key's first ``HLEN``, which already
    counted it ("no change"); after a pass brought in by an ack, which reads no ``HLEN``,
    the count was from the tick before, with a worker since forgotten (the pass read 1
    field, the tick before 2, and 2 again after the new worker)."""
    workers = stream_keys("k.yaml").workers
    append_event(redis_server.url, "k.yaml", b"a: 1\n", version=1)
    append_event(redis_server.url, "k.yaml", b"a: 2\n", version=2)
    if after != "the first pass":
        client.hset(workers, mapping={"w1": _state("w1", "applied"), "w2": _state("w2", "applied")})
    metrics = DaemonMetrics()
    follower = AckFollower(
        redis_server.url, lambda: ["k.yaml"], metrics, prefix="hotreload",
        status_interval=0.3, block_ms=300,
    )  # fmt: skip
    original_pass, original_tick = follower._update_workers, follower._tick
    passes: list[int] = []  # the tick each pass ran at
    ticks: list[float | None] = []  # the rejected gauge after each tick
    target = 1 if after == "the first pass" else 2  # the pass the worker is written after

    def one_pass(redis_client: Any, slices: int = 1) -> None:
        original_pass(redis_client, slices)
        passes.append(len(ticks))
        if len(passes) == target:  # right after this pass read :workers
            client.hset(workers, "w2", _state("w2", "rejected"))

    def tick(redis_client: Any) -> None:
        original_tick(redis_client)
        sample = {"key": "k.yaml", "state": "rejected"}
        ticks.append(metrics.registry.get_sample_value("hotreload_workers", sample))
        if target == 2 and len(passes) == 1 and len(ticks) == passes[0] + 2:
            # an idle tick (its HLEN: 2): w2 is forgotten and w1 acks, read before the next
            client.hdel(workers, "w2")
            ack = Ack(worker="w1", version=2, sha256="", status="applied", at=now_ms(),
                      published_at=now_ms())  # fmt: skip
            client.xadd(stream_keys("k.yaml").acks, encode_ack(ack))  # type: ignore[arg-type]

    monkeypatch.setattr(follower, "_update_workers", one_pass)
    monkeypatch.setattr(follower, "_tick", tick)
    follower.start()
    try:
        wait_until(lambda: len(passes) > target, "the pass after the new worker", 15)
    finally:
        follower.stop()
    written = passes[target - 1]
    assert ticks[written] == 0.0  # that pass: no rejecting worker yet
    assert passes[target] == written + 1  # the next tick saw 2 fields where the pass read 1
    assert ticks[written + 1] == 1.0


def test_an_idle_pass_classifies_a_key_again_only_when_its_workers_or_newest_entry_changed(
    redis_server: RedisServer, client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Idle passes of a key without acks: classified once, then looked at (its newest
    entry's id and worker rows) and classified again only when that changed -- a worker gone
    stale (no ack, as many fields), a new entry no worker acked -- and the gauge follows."""
    append_event(redis_server.url, "k.yaml", b"a: 1\n", version=1)
    _add_worker(client, "k.yaml")
    classified = _record_classified(monkeypatch)
    metrics = DaemonMetrics()
    follower = AckFollower(
        redis_server.url, lambda: ["k.yaml"], metrics, prefix="hotreload",
        status_interval=0.05, block_ms=50,
    )  # fmt: skip
    passes = _passes(monkeypatch, follower, classified)

    def gauge(state: str) -> float | None:
        return metrics.registry.get_sample_value(
            "hotreload_workers", {"key": "k.yaml", "state": state}
        )

    follower.start()
    try:
        wait_until(lambda: len(passes) >= 5, "five passes", 10)
        assert passes[:5] == [1] * 5  # the first pass only: nothing changed since
        assert gauge("converged") == 1.0
        stale = WorkerState(worker="w0", status="applied", version=1, heartbeat=1,
                            heartbeat_interval=5.0)  # fmt: skip
        client.hset(stream_keys("k.yaml").workers, "w0", encode_worker_state(stale))
        wait_until(lambda: gauge("converged") == 0.0, "the stale worker left out", 10)
        _add_worker(client, "k.yaml")  # live again, at v1
        wait_until(lambda: gauge("converged") == 1.0, "the worker back", 10)
        append_event(redis_server.url, "k.yaml", b"a: 2\n", version=2)  # nobody acks it
        wait_until(lambda: gauge("behind") == 1.0, "the worker behind v2", 10)
        mark = len(passes)
        wait_until(lambda: len(passes) >= mark + 3, "more idle passes", 10)
        assert passes[-1] == passes[mark - 1]  # and nothing classified again since
    finally:
        follower.stop()


def test_an_idle_pass_after_a_pass_for_acks_does_not_classify_the_key_again(
    redis_server: RedisServer, client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass classifying a key for its acks records what the classification depended on
    besides them, so the idle passes after it find nothing changed: one classification per
    ack, not a second one at the next idle pass (15-30 ms of CPU for 32 workers)."""
    append_event(redis_server.url, "k.yaml", b"a: 1\n", version=1)
    _add_worker(client, "k.yaml")
    classified = _record_classified(monkeypatch)
    follower = AckFollower(
        redis_server.url, lambda: ["k.yaml"], DaemonMetrics(), prefix="hotreload",
        status_interval=0.05, block_ms=50,
    )  # fmt: skip
    passes = _passes(monkeypatch, follower, classified)
    follower.start()
    try:
        wait_until(lambda: len(passes) >= 2, "two passes", 10)
        assert classified == ["k.yaml"]  # the first pass
        ack = Ack(worker="w0", version=1, sha256="0" * 64, status="applied", at=now_ms())
        client.xadd(stream_keys("k.yaml").acks, encode_ack(ack))  # type: ignore[arg-type]
        wait_until(lambda: len(classified) == 2, "the pass for the ack", 10)
        mark = len(passes)
        wait_until(lambda: len(passes) >= mark + 3, "idle passes after it", 10)
        assert len(classified) == 2  # nothing classified again: same entry, same rows
    finally:
        follower.stop()


def _reads(client: redis.Redis) -> int:
    """How many times Redis read a client's socket (a packet of commands, about)."""
    return int(client.info("stats")["total_reads_processed"])


def test_an_idle_tick_sends_its_hlens_with_the_read(
    redis_server: RedisServer, client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tick's ``HLEN``s ride behind the ``XREAD`` whose block ends at the tick, so Redis
    reads one packet a tick and the follower one reply: a pipeline of their own after it
    was a second round trip each tick (redis-py's pipeline, ~1 ms of CPU on an idle
    daemon's cold process, yappi)."""
    append_event(redis_server.url, "k.yaml", b"a: 1\n", version=1)
    _add_worker(client, "k.yaml")
    monkeypatch.setattr("publisher.ackwatch.IDLE_PASSES", 1_000)  # ticks only, no passes
    follower = AckFollower(
        redis_server.url, lambda: ["k.yaml"], DaemonMetrics(), prefix="hotreload",
        status_interval=1.0,
    )  # fmt: skip
    ticks: list[float] = []
    original = follower._tick

    def counted(client: Any) -> None:
        original(client)
        ticks.append(time.monotonic())

    monkeypatch.setattr(follower, "_tick", counted)
    follower.start()
    try:
        wait_until(lambda: len(ticks) >= 2, "the first pass and a tick", 10)
        mark, before = len(ticks), _reads(client)
        time.sleep(5.5)
        reads, count = _reads(client) - before, len(ticks) - mark
        assert count >= 4
        assert reads <= count + 2, f"Redis read {reads} packets for {count} ticks"
        assert follower._sizes == {"k.yaml": 1}  # what the ticks' HLENs read
    finally:
        follower.stop()


def test_hlens_ride_only_behind_a_read_whose_block_reaches_the_tick(
    redis_server: RedisServer, client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blocks shorter than a status interval (Sentinel's are 1 s at most) carry no ``HLEN``:
    behind every one of them they would be asked every block instead of every tick."""
    append_event(redis_server.url, "k.yaml", b"a: 1\n", version=1)
    _add_worker(client, "k.yaml")
    follower = AckFollower(
        redis_server.url, lambda: ["k.yaml"], DaemonMetrics(), prefix="hotreload",
        status_interval=30.0, block_ms=200,
    )  # fmt: skip
    passes: list[int] = []
    original = follower._update_workers

    def counted(client: Any, slices: int = 1) -> None:
        original(client, slices)
        passes.append(1)

    monkeypatch.setattr(follower, "_update_workers", counted)
    follower.start()
    try:
        wait_until(lambda: passes, "the first pass", 10)
        client.config_resetstat()
        time.sleep(2.0)  # ~10 blocks of 0.2 s, no tick due
        stats = client.info("commandstats")
        assert "cmdstat_hlen" not in stats, stats.get("cmdstat_hlen")
        assert stats["cmdstat_xread"]["calls"] >= 5
    finally:
        follower.stop()
