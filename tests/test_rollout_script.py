"""Rollout control in ``publish.lua`` and the read model, without a daemon: a real Redis, the
``Publisher`` called directly (racing publishers as threads), and the pure rules of
``publisher.inspect.rollout``.
"""

from __future__ import annotations

import json
import threading
from typing import Any, cast

import redis

from publisher._marks import RolloutMark
from publisher.inspect.events import verified
from publisher.inspect.rollout import Marks, canary_progress, read_marks, view_of
from publisher.publish import Publisher
from publisher.rollout import Rollout
from subscriber._redis import connect
from subscriber.keys import stream_keys
from subscriber.protocol import Ack, decode_event, sha256_hex
from subscriber.testing import RedisServer

KEY = "app.yaml"
A, B, C = b"a: 1\n", b"a: 2\n", b"a: 3\n"
OLD_FIELDS = {"schema", "key", "version", "sha256", "content", "published_at", "publisher"}


def fields(client: redis.Redis) -> list[dict[str, str]]:
    raw = cast(list[Any], client.xrange(stream_keys(KEY).events))
    return [{k.decode(): v.decode() for k, v in f.items()} for _, f in raw]


def test_without_rollout_fields_the_entry_is_what_it_always_was(client: redis.Redis) -> None:
    publisher = Publisher(client)
    publisher.publish(KEY, A)
    publisher.publish(KEY, B, mark=RolloutMark())  # the extended path, no rollout field set
    first, second = fields(client)
    assert set(first) == OLD_FIELDS
    assert set(second) == OLD_FIELDS
    assert first["schema"] == second["schema"] == "1"


def test_a_rollback_pins_its_content_for_old_and_new_argument_lists(client: redis.Redis) -> None:
    publisher = Publisher(client)
    publisher.publish(KEY, A)
    publisher.publish(KEY, B)
    back = RolloutMark(
        rollout="rollback", rollout_of=2, rollout_sha256=sha256_hex(B), request="r1", expect=2
    )
    rolled = publisher.publish(KEY, A, mark=back)
    assert rolled.written
    assert rolled.version == 3
    # every kind of publisher offering B: refused, nothing written
    for other in (Publisher(client), Publisher(client, signing_key=b"k" * 16), publisher):
        result = other.publish(KEY, B)
        assert (result.written, result.refused, result.version) == (False, "pinned", 3)
    refused = Publisher(client).publish(KEY, B, sensitive=True)
    assert refused.refused == "pinned"
    canary = Publisher(client).publish(KEY, B, mark=RolloutMark(rollout="canary", audience=("w",)))
    assert canary.refused == "pinned"
    # the same rollback again (another daemon, the same request): found, not written twice
    again = Publisher(client).publish(KEY, A, mark=back)
    assert (again.written, again.version, again.refused) == (False, 3, "")
    # a new content ends the pin
    assert Publisher(client).publish(KEY, C).written
    assert [f.get("rollout", "") for f in fields(client)] == ["", "", "rollback", ""]
    assert fields(client)[2]["request"] == "r1"


def test_an_operation_on_a_stale_view_writes_nothing(client: redis.Redis) -> None:
    publisher = Publisher(client)
    publisher.publish(KEY, A)
    publisher.publish(KEY, B)
    publisher.publish(KEY, C)
    late = RolloutMark(rollout="rollback", rollout_of=2, rollout_sha256=sha256_hex(B), expect=2)
    result = publisher.publish(KEY, A, mark=late)
    assert (result.written, result.refused, result.version) == (False, "moved", 3)
    assert len(fields(client)) == 3


def test_racing_daemons_write_one_canary_and_one_decision(redis_server: RedisServer) -> None:
    seed = connect(redis_server.url, socket_timeout=5)
    Publisher(seed).publish(KEY, A)
    barrier = threading.Barrier(4)
    results: list[Any] = []

    def race(audience: tuple[str, ...], mark: RolloutMark | None, content: bytes) -> None:
        client = connect(redis_server.url, socket_timeout=5)
        try:
            barrier.wait()
            canary = RolloutMark(rollout="canary", audience=audience)
            results.append(Publisher(client).publish(KEY, content, mark=mark or canary))
        finally:
            client.close()

    threads = [threading.Thread(target=race, args=((f"w{i}",), None, B)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sum(r.written for r in results) == 1
    promote = RolloutMark(rollout="promote", rollout_of=2, rollout_sha256=sha256_hex(B), expect=2)
    halt = RolloutMark(rollout="halt", rollout_of=2, rollout_sha256=sha256_hex(B), expect=2)
    barrier.reset()
    results.clear()
    threads = [
        threading.Thread(target=race, args=((), promote if i % 2 else halt, B if i % 2 else A))
        for i in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sum(r.written for r in results) == 1  # a promotion or a halt, never both
    kinds = [f.get("rollout", "") for f in fields(seed)]
    assert kinds[:2] == ["", "canary"]
    assert kinds[2] in ("promote", "halt")
    assert len(kinds) == 3
    canary_entry = fields(seed)[1]
    assert canary_entry["schema"] == "2"
    assert len(json.loads(canary_entry["audience"])) == 1
    seed.close()


def test_a_signed_canary_verifies_with_the_v2_message_and_its_halt_with_v1(
    client: redis.Redis,
) -> None:
    secret = b"0123456789abcdef0123"
    publisher = Publisher(client, signing_key=secret)
    publisher.publish(KEY, A)
    publisher.publish(KEY, B, mark=RolloutMark(rollout="canary", audience=("pod:1", "pod:2")))
    halt = RolloutMark(rollout="halt", rollout_of=2, rollout_sha256=sha256_hex(B), expect=2)
    assert publisher.publish(KEY, A, mark=halt).written
    raw = cast(list[Any], client.xrange(stream_keys(KEY).events))
    events = [decode_event(i, f) for i, f in raw]
    assert [e.audience for e in events] == [None, ("pod:1", "pod:2"), None]
    assert all(verified(event, secret) for event in events)


def marks(version: int, audience: tuple[str, ...] | None = None, **more: Any) -> Marks:
    return Marks(f"{version}-0", version, f"{version:064x}", audience, published_at=1000, **more)


def state(version: int, heartbeat: int, status: str = "applied") -> bytes:
    return json.dumps({
        "status": status, "version": version, "sha256": f"{version:064x}",
        "heartbeat": heartbeat, "heartbeat_interval": 1.0, "audience": True,
    }).encode()  # fmt: skip


def applied(worker: str, version: int, at: int) -> Ack:
    return Ack(worker=worker, version=version, sha256=f"{version:064x}", status="applied", at=at)


def test_the_canary_rule() -> None:
    canary = marks(2, ("w1", "w2"))
    hold = 5000
    acks = [applied("w1", 2, 2000), applied("w2", 2, 2100)]
    # applied, not yet proven
    now = 3000
    waiting = canary_progress(canary, {"w1": state(2, 2900), "w2": state(2, 2900)}, acks,
                              now_ms=now, hold_ms=hold)  # fmt: skip
    assert waiting.decision == "wait"
    # both proven: heartbeats >= apply + hold
    proven = canary_progress(canary, {"w1": state(2, 7000), "w2": state(2, 7100)}, acks,
                             now_ms=7200, hold_ms=hold)  # fmt: skip
    assert proven.decision == "promote"
    # one proven then SIGKILLed (stale now): still proven; the other stale before: halt
    stale = canary_progress(canary, {"w1": state(2, 7000), "w2": state(2, 2200)}, acks,
                            now_ms=9000, hold_ms=hold)  # fmt: skip
    assert stale.decision == "halt"
    assert "w2 went stale" in stale.reason
    # a rejection halts at once
    rejected = Ack(worker="w2", version=2, sha256="", status="rejected", error="no")
    halted = canary_progress(canary, {"w1": state(2, 2900), "w2": state(1, 2900)},
                             [*acks[:1], rejected], now_ms=3000, hold_ms=hold)  # fmt: skip
    assert halted.decision == "halt"
    assert "rejected" in halted.reason
    # gone (stopped) before proof, or its entry missing
    gone = canary_progress(canary, {"w1": state(2, 2900), "w2": state(2, 2900, "stopped")},
                           acks, now_ms=3000, hold_ms=hold)  # fmt: skip
    assert gone.decision == "halt"
    missing = canary_progress(canary, {"w1": state(2, 2900)}, acks, now_ms=3000, hold_ms=hold)
    assert missing.decision == "halt"
    # an ack trimmed away: the hold counts from when the daemon first saw it run the canary
    first_seen = {"w1": 1500, "w2": 3000}
    later = canary_progress(canary, {"w1": state(2, 7000), "w2": state(2, 7100)}, [],
                            now_ms=7200, hold_ms=hold, first_seen=first_seen)  # fmt: skip
    assert later.decision == "wait"


def test_the_rollout_state_read_from_the_newest_entries(client: redis.Redis) -> None:
    publisher = Publisher(client)
    publisher.publish(KEY, A)
    assert view_of(read_marks(client, stream_keys(KEY).events)).state == "none"
    publisher.publish(KEY, B, mark=RolloutMark(rollout="canary", audience=("w1",)))
    view = view_of(read_marks(client, stream_keys(KEY).events))
    assert (view.state, view.version, view.canary) == ("canary", 2, ("w1",))
    assert view.stable is not None
    assert view.stable.version == 1
    halt = RolloutMark(rollout="halt", rollout_of=2, rollout_sha256=sha256_hex(B), expect=2,
                       reason="canary worker w1 rejected it: no")  # fmt: skip
    publisher.publish(KEY, A, mark=halt)
    view = view_of(read_marks(client, stream_keys(KEY).events))
    assert view.as_json() == {
        "state": "halted", "version": 3, "canary": ["w1"],
        "reason": "canary worker w1 rejected it: no", "of": 2,
    }  # fmt: skip
    assert view_of([marks(5, None, rollout="rollback", rollout_of=4)]).state == "rolled-back"
    assert view_of([marks(5, None, rollout="something-new")]).state == "none"


def test_a_request_carried_out_by_another_daemon_is_answered_done(client: redis.Redis) -> None:
    publisher = Publisher(client)
    publisher.publish(KEY, A)
    publisher.publish(KEY, B)
    first = Rollout(prefix="hotreload", policy=None)
    done = first.rollback(client, publisher, KEY, to=1, by="cli:1", request="abc")
    assert (done.ok, done.written, done.version) == (True, True, 3)
    # a second daemon, later: v1's content is the one running now, yet the request is done
    again = Rollout(prefix="hotreload", policy=None).rollback(
        client, Publisher(client), KEY, to=1, by="cli:1", request="abc"
    )
    assert (again.ok, again.written, again.version) == (True, False, 3)
    assert len(fields(client)) == 3
    refused = Rollout(prefix="hotreload", policy=None).rollback(
        client, Publisher(client), KEY, to=1, by="cli:2", request="def"
    )
    assert not refused.ok
    assert "running now" in refused.message
