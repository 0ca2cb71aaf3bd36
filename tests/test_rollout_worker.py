"""Rollout control, the worker side (issue 19): what a worker does with an audience entry.

Both clients (``Subscriber``, ``AsyncSubscriber``) on a real private redis-server, the entries
written as the publisher writes them (``subscriber.testing.append_event`` with ``audience``):
a canary entry runs only in the workers it names; every other worker neither calls back nor
acks, and a worker starting later (a crashed canary's replacement has a new id) replays the
stable version. Promote (same content, for everyone) and halt (the stable content, for
everyone) then converge everybody without a needless callback. Signed, an audience stripped or
changed in Redis is a forgery. Snapshots and a Redis Cluster behave the same.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from functools import partial
from typing import Any, cast

import pytest

from subscriber import Subscriber
from subscriber._redis import connect
from subscriber.keys import stream_keys
from subscriber.protocol import Ack, WorkerState, encode_snapshot, sha256_hex
from subscriber.testing import RedisCluster, RedisServer, append_event
from tests.helpers import Recorder, wait_until
from tests.subscriber_driver import KINDS, Kind, Make, drivers
from tests.workers.harness import acks, worker_states

KEY = "app.yaml"
FAST: dict[str, Any] = {"block_ms": 300, "heartbeat_interval": 0.3}
SIGNING_KEY = "0123456789abcdef0123456789abcdef"
A, B, C = "pod-a:11", "pod-b:12", "pod-c:13"


@pytest.fixture(params=KINDS)
def subscribers(request: pytest.FixtureRequest) -> Iterator[Make]:
    kind: Kind = request.param
    yield from drivers(kind)


def acks_of(url: str, worker: str, key: str = KEY) -> list[Ack]:
    return [ack for ack in acks(url, key) if ack.worker == worker]


def ack_for(url: str, worker: str, entry_id: str, key: str = KEY) -> Ack | None:
    found = [ack for ack in acks_of(url, worker, key) if ack.entry_id == entry_id]
    return found[0] if found else None


def state(url: str, worker: str, key: str = KEY) -> WorkerState:
    return worker_states(url, key)[worker]


def passed(url: str, worker: str, entry_id: str, key: str = KEY) -> None:
    """Wait until ``worker`` has certainly read past ``entry_id``: a later entry for
    everyone, appended by the caller, was acknowledged by it."""
    wait_until(lambda: ack_for(url, worker, entry_id, key), f"{worker} acked {entry_id}")


def read_past(sub: Any, entry_id: str) -> bool:
    """The subscriber's walk has read up to ``entry_id`` (its cursor is there)."""
    return bool(sub._core.cursor.entry_id == entry_id)


def start(subscribers: Make, url: str, worker: str, rec: Recorder, **extra: Any) -> Any:
    return subscribers(KEY, rec, redis_url=url, worker_id=worker, **FAST, **extra).start()


def test_a_canary_runs_only_in_its_audience_and_a_new_worker_replays_the_stable_version(
    redis_server: RedisServer, subscribers: Make
) -> None:
    url = redis_server.url
    append_event(url, KEY, b"rate: 1", version=1)
    rec_a, rec_b = Recorder(), Recorder()
    sub_a, sub_b = start(subscribers, url, A, rec_a), start(subscribers, url, B, rec_b)
    wait_until(lambda: state(url, B).audience, "B says it honours audiences")
    canary = append_event(url, KEY, b"rate: 2", version=2, audience=[A], rollout="canary")
    wait_until(lambda: ack_for(url, A, canary), "the canary worker's ack")
    assert ack_for(url, A, canary).status == "applied"  # type: ignore[union-attr]
    assert rec_a.applied == ["rate: 1", "rate: 2"]
    assert (sub_a.version, sub_a.status) == (2, "applied")
    # a worker starting now (a replacement: a new id) walks past the canary to the stable one
    rec_c = Recorder()
    sub_c = start(subscribers, url, C, rec_c)
    assert (rec_c.applied, sub_c.version, sub_c.status) == (["rate: 1"], 1, "applied")
    # B read the canary (its position in the stream is past it) and did nothing with it
    wait_until(lambda: read_past(sub_b, canary), "B read the canary")
    a_ack = ack_for(url, A, canary)
    assert a_ack is not None
    wait_until(lambda: state(url, B).heartbeat > a_ack.at, "B beats again")
    b_state = state(url, B)
    assert (b_state.version, b_state.status, b_state.seen, b_state.error) == (1, "applied", 1, "")
    assert (sub_b.version, sub_b.status, rec_b.applied) == (1, "applied", ["rate: 1"])
    assert ack_for(url, B, canary) is None
    assert ack_for(url, C, canary) is None
    assert state(url, C).seen == 1


def test_canary_then_promote_everyone_runs_it_and_the_canary_acks_it_unchanged(
    redis_server: RedisServer, subscribers: Make
) -> None:
    url = redis_server.url
    append_event(url, KEY, b"rate: 1", version=1)
    rec_a, rec_b = Recorder(), Recorder()
    start(subscribers, url, A, rec_a)
    sub_b = start(subscribers, url, B, rec_b)
    canary = append_event(url, KEY, b"rate: 2", version=2, audience=[A], rollout="canary")
    wait_until(lambda: ack_for(url, A, canary), "the canary applied")
    promote = append_event(
        url, KEY, b"rate: 2", version=3, rollout="promote", rollout_of=2,
        rollout_sha256=sha256_hex(b"rate: 2"),
    )  # fmt: skip
    passed(url, A, promote)
    passed(url, B, promote)
    a_ack, b_ack = ack_for(url, A, promote), ack_for(url, B, promote)
    assert a_ack is not None
    assert (a_ack.status, a_ack.unchanged) == ("applied", True)  # no second callback
    assert b_ack is not None
    assert (b_ack.status, b_ack.unchanged) == ("applied", False)
    assert rec_a.applied == ["rate: 1", "rate: 2"]
    assert rec_b.applied == ["rate: 1", "rate: 2"]
    assert ack_for(url, B, canary) is None
    assert (sub_b.version, state(url, A).version, state(url, B).version) == (3, 3, 3)


def test_canary_then_halt_the_canary_reverts_and_the_others_ack_unchanged(
    redis_server: RedisServer, subscribers: Make
) -> None:
    url = redis_server.url
    append_event(url, KEY, b"rate: 1", version=1)
    rec_a, rec_b = Recorder(), Recorder()
    sub_a = start(subscribers, url, A, rec_a)
    start(subscribers, url, B, rec_b)
    canary = append_event(url, KEY, b"rate: 0", version=2, audience=[A], rollout="canary")
    wait_until(lambda: ack_for(url, A, canary), "the canary applied")
    halt = append_event(
        url, KEY, b"rate: 1", version=3, rollout="halt", rollout_of=2,
        rollout_sha256=sha256_hex(b"rate: 0"),
    )  # fmt: skip
    passed(url, A, halt)
    passed(url, B, halt)
    a_ack, b_ack = ack_for(url, A, halt), ack_for(url, B, halt)
    assert a_ack is not None
    assert (a_ack.status, a_ack.unchanged) == ("applied", False)  # the canary reverted
    assert b_ack is not None
    assert (b_ack.status, b_ack.unchanged) == ("applied", True)  # never ran the canary
    assert rec_a.applied == ["rate: 1", "rate: 0", "rate: 1"]
    assert rec_b.applied == ["rate: 1"]
    assert (sub_a.version, sub_a.content) == (3, b"rate: 1")
    # the halted content is never seen by anyone else, even starting later
    rec_c = Recorder()
    start(subscribers, url, C, rec_c)
    assert rec_c.applied == ["rate: 1"]


def test_a_canary_the_audience_rejects_is_reported_by_it_alone(
    redis_server: RedisServer, subscribers: Make
) -> None:
    url = redis_server.url
    append_event(url, KEY, b"rate: 1", version=1)
    rec_a, rec_b = Recorder(), Recorder()
    sub_a = start(subscribers, url, A, rec_a)
    sub_b = start(subscribers, url, B, rec_b)
    canary = append_event(url, KEY, b"REJECT", version=2, audience=[A], rollout="canary")
    wait_until(lambda: ack_for(url, A, canary), "the canary's rejection")
    ack = ack_for(url, A, canary)
    assert ack is not None
    assert (ack.status, ack.error) == ("rejected", "ValueError: rate must be a positive integer")
    assert (sub_a.status, sub_a.version) == ("rejected", 1)
    wait_until(lambda: state(url, A).status == "rejected", "A's state shows it")
    after = append_event(url, KEY, b"rate: 3", version=3)
    passed(url, B, after)
    assert ack_for(url, B, canary) is None
    assert rec_b.applied == ["rate: 1", "rate: 3"]
    assert sub_b.status == "applied"


@pytest.mark.parametrize("tamper", ["changed", "stripped"])
def test_signed_an_audience_changed_or_stripped_in_redis_is_a_forgery(
    redis_server: RedisServer, subscribers: Make, tamper: str
) -> None:
    url = redis_server.url
    signed: dict[str, Any] = {"signing_key_raw": SIGNING_KEY}
    append_event(url, KEY, b"rate: 1", version=1, **signed)
    rec_a, rec_b = Recorder(), Recorder()
    start(subscribers, url, A, rec_a, signing_key=SIGNING_KEY)
    start(subscribers, url, B, rec_b, signing_key=SIGNING_KEY)
    genuine = append_event(url, KEY, b"rate: 2", version=2, audience=[A], rollout="canary",
                           **signed)  # fmt: skip
    wait_until(lambda: ack_for(url, A, genuine), "the signed canary applied")
    assert ack_for(url, A, genuine).status == "applied"  # type: ignore[union-attr]
    # an attacker copies the signed canary and retargets it at B, or strips its audience
    client = connect(url, socket_timeout=5.0)
    try:
        entries = client.xrange(stream_keys(KEY).events, genuine, genuine)
        [(_, fields)] = cast("list[tuple[bytes, dict[bytes, bytes]]]", entries)
        forged = {k.decode(): v for k, v in fields.items()}
        forged["version"] = b"3"  # above what A has seen, so it is not merely a replay
        if tamper == "changed":
            forged["audience"] = b'["pod-b:12"]'
        else:
            del forged["audience"]
            forged["schema"] = b"1"
        forged_id = cast("bytes", client.xadd(stream_keys(KEY).events, forged)).decode()  # type: ignore[arg-type]
    finally:
        client.close()
    for worker in (A, B):
        ack = wait_until(partial(ack_for, url, worker, forged_id), f"{worker} refused it")
        assert ack.status == "rejected"
        assert "forged or altered" in ack.error
    assert rec_b.applied == ["rate: 1"]
    assert rec_a.applied == ["rate: 1", "rate: 2"]


def test_a_snapshot_canary_runs_only_in_its_audience(
    redis_server: RedisServer, subscribers: Make
) -> None:
    url, name = redis_server.url, "app-config"
    stable = encode_snapshot({"a.yaml": b"rate: 1", "b.json": b"{}"})
    canary_content = encode_snapshot({"a.yaml": b"rate: 2", "b.json": b"{}"})
    append_event(url, name, stable, version=1)
    seen: dict[str, list[dict[str, str]]] = {A: [], B: [], C: []}

    def make(worker: str) -> Any:
        return subscribers(name, seen[worker].append, redis_url=url, worker_id=worker,
                           snapshot=True, **FAST).start()  # fmt: skip

    make(A)
    make(B)
    canary = append_event(url, name, canary_content, version=2, audience=[A], rollout="canary")
    wait_until(lambda: ack_for(url, A, canary, name), "the canary applied")
    make(C)
    assert seen[A][-1] == {"a.yaml": "rate: 2", "b.json": "{}"}
    assert seen[C] == [{"a.yaml": "rate: 1", "b.json": "{}"}]
    after = append_event(url, name, stable, version=3, rollout="halt", rollout_of=2)
    passed(url, B, after, name)
    assert seen[B] == [{"a.yaml": "rate: 1", "b.json": "{}"}]
    assert ack_for(url, B, canary, name) is None
    assert ack_for(url, B, after, name).unchanged  # type: ignore[union-attr]
    passed(url, A, after, name)
    assert seen[A][-1] == {"a.yaml": "rate: 1", "b.json": "{}"}


def test_on_a_redis_cluster_a_canary_runs_only_in_its_audience(
    redis_cluster_module: RedisCluster,
) -> None:
    cluster = redis_cluster_module
    owner = cluster.master_for(stream_keys(KEY).events)
    elsewhere = next(node for node in cluster.nodes if node is not owner)
    append_event(owner.url, KEY, b"rate: 1", version=1)
    rec_a, rec_b, rec_c = Recorder(), Recorder(), Recorder()
    with (
        Subscriber(KEY, rec_a, redis_url=elsewhere.url, worker_id=A, **FAST),
        Subscriber(KEY, rec_b, redis_url=owner.url, worker_id=B, **FAST),
    ):
        canary = append_event(owner.url, KEY, b"rate: 2", version=2, audience=[A])
        wait_until(lambda: ack_for(owner.url, A, canary), "the canary applied")
        with Subscriber(KEY, rec_c, redis_url=elsewhere.url, worker_id=C, **FAST) as sub_c:
            assert sub_c.version == 1
        promote = append_event(owner.url, KEY, b"rate: 2", version=3, rollout="promote")
        passed(owner.url, B, promote)
        passed(owner.url, A, promote)
    assert rec_a.applied == ["rate: 1", "rate: 2"]
    assert rec_b.applied == ["rate: 1", "rate: 2"]
    assert rec_c.applied == ["rate: 1"]
    assert ack_for(owner.url, B, canary) is None
    assert ack_for(owner.url, A, promote).unchanged  # type: ignore[union-attr]


def test_canaries_for_others_do_not_count_toward_the_replay_limit(
    redis_server: RedisServer, subscribers: Make
) -> None:
    url = redis_server.url
    append_event(url, KEY, b"rate: 1", version=1)
    for version in (2, 3, 4):  # newest first, three entries for someone else
        append_event(url, KEY, f"rate: {version}".encode(), version=version, audience=[A])
    rec = Recorder()
    sub = start(subscribers, url, B, rec, replay_limit=1)
    assert (rec.applied, sub.version, sub.status) == (["rate: 1"], 1, "applied")


def test_a_history_of_nothing_but_canaries_for_others_is_waited_on_not_spun_on(
    redis_server: RedisServer, client: Any, subscribers: Make
) -> None:
    url = redis_server.url
    append_event(url, KEY, b"rate: 2", version=2, audience=[A])  # e.g. the rest trimmed
    client.config_resetstat()
    rec = Recorder()
    later = threading.Timer(1.0, append_event, (url, KEY, b"rate: 3"), {"version": 3})
    later.start()
    try:
        sub = start(subscribers, url, B, rec, start_timeout=10.0)
    finally:
        later.join()
    assert (rec.applied, sub.version) == (["rate: 3"], 3)
    # it blocked for the next entry rather than re-reading the canary in a loop
    calls = client.info("commandstats").get("cmdstat_xread", {}).get("calls", 0)
    assert calls < 20, calls
