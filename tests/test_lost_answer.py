"""A publish whose answer is lost, then a Redis that restarts empty: no version is numbered
twice (docs/operations.md "Failure behaviour").

The corner: the publish script ran (v3 = C2 appended, a worker connected directly applied
it), and Redis was killed before the publisher read the answer. Redis comes back empty, the
mount meanwhile says C3, and the re-seed numbered it from what the publisher knew (v2): v3
again, which the worker refused as a replay of its v3, and it ran C2 until the next change.
Two parts end it: the publisher counts a lost answer as written at the version it would have
had (``publisher._unanswered``), and a worker whose version is another content in the stream
holds, which the daemon's sweep publishes above (``subscriber._walk``,
``publisher._sweepread.behind_workers``).

Real redis-server processes and clients throughout; the answer is dropped by a relay in front
of Redis (``tests.helpers.lost_answer_link``), after Redis ran the command.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import redis

from publisher._unanswered import Arg, may_have_run, unanswered, with_seen
from publisher.publish import Publisher
from subscriber import AsyncSubscriber, Subscriber
from subscriber._reasons import renumbered
from subscriber._redis import connect
from subscriber.keys import stream_keys
from subscriber.protocol import WorkerState, sha256_hex
from subscriber.testing import RedisServer, append_event
from tests.helpers import LostAnswer, events, eventually, lost_answer_link, start_daemon, wait_until
from tests.workers.harness import Worker, acks, spawn_workers, state_of, worker_states

if TYPE_CHECKING:
    from tests.conftest import KubeletMount, Processes

KEY = "app.yaml"
KEYS = stream_keys(KEY)


def rev(n: int) -> bytes:
    return f"rev: {n}\n".encode()


def contents(client: redis.Redis) -> dict[int, str]:
    """version -> sha256 of every entry of the stream."""
    return {event.version: event.sha256 for event in events(client, KEY)}


def test_the_floor_guesses_the_version_a_lost_call_would_have_written(tmp_path: Path) -> None:
    """The script's argument list (as ``Publisher`` builds it) decides the guess; redis-py's
    own errors whether the command may have reached Redis at all."""

    def args(digest: str, floor: int, above: int, held: str = "", expected: int = 0) -> list[Arg]:
        plain: list[Arg] = [digest, b"c", 1, "h:1", KEY, 1, 100, floor, "", held, above]
        if expected:  # extended: the version signed for, sig, kid, sensitive, force
            return with_seen(*plain, expected, "", "", "", "", seen="1-0")
        return with_seen(*plain, seen="1-0")

    lost = redis.ConnectionError("Connection closed by server.")  # redis-py's, reading
    highest: dict[str, int] = {}
    unanswered(highest, KEY, args("b", 2, 0, held="a"), lost)
    assert highest == {KEY: 3}
    unanswered(highest, KEY, args("c", 3, 5), redis.TimeoutError("Timeout reading from x"))
    assert highest == {KEY: 6}  # above the workers: it would have been written above them
    unanswered(highest, KEY, args("d", 6, 0, expected=9), lost)  # signed for v9
    assert highest == {KEY: 9}
    # the content its base carries (a re-seed of an unchanged key): the floor stays, so the
    # superseded rule still sees another publisher's entry numbered just above it
    unanswered(highest, KEY, args("a", 9, 0, held="a"), lost)
    assert highest == {KEY: 9}
    # never sent: connecting failed (as this redis-py words it)
    nowhere = connect(f"unix://{tmp_path}/none.sock", socket_timeout=1)
    with pytest.raises(redis.ConnectionError) as refused:
        nowhere.ping()
    assert not may_have_run(refused.value)
    unanswered(highest, KEY, args("e", 9, 0), refused.value)
    assert highest == {KEY: 9}
    # ... unless the fast path's EVALSHA of the same call had lost its answer before
    unanswered(highest, KEY, args("e", 9, 0), refused.value, lost_before=True)
    assert highest == {KEY: 10}


def test_a_publish_whose_answer_is_lost_raises_the_floor(redis_server: RedisServer) -> None:
    direct = connect(redis_server.url, socket_timeout=5)
    try:
        release = threading.Event()
        with lost_answer_link(redis_server, rev(3), release) as link:
            publisher = Publisher(connect(link.url, socket_timeout=1))
            assert [publisher.publish(KEY, rev(n)).version for n in (1, 2)] == [1, 2]
            # Redis ran it, then froze: the answer and the publisher's retry are lost
            _then(link, redis_server.freeze, release)
            with pytest.raises((redis.ConnectionError, redis.TimeoutError)):
                publisher.publish(KEY, rev(3))
            assert link.answered.is_set()
            assert publisher.highest_version[KEY] == 3
            redis_server.thaw()
            # Redis kept it: found where the floor guessed, nothing written
            again = publisher.publish(KEY, rev(3))
            assert (again.written, again.version) == (False, 3)
            assert sorted(contents(direct)) == [1, 2, 3]
            # lost again, with Redis killed this time, which comes back empty
            release.clear()
            link.marker = rev(4)
            link.answered.clear()

            def gone() -> None:  # as if the publisher reached Redis directly
                redis_server.kill()
                link.reachable(False)

            _then(link, gone, release)
            with pytest.raises(redis.ConnectionError):
                publisher.publish(KEY, rev(4))  # written as v4, lost with Redis
            assert publisher.highest_version[KEY] == 4
            link.reachable(True)
            redis_server.start()
            assert publisher.publish(KEY, rev(5)).version == 5  # not a second v4
    finally:
        direct.close()


@pytest.mark.slow
def test_a_worker_runs_the_mount_s_content_after_an_answer_lost_with_redis(
    redis_server: RedisServer, kubelet_mount: KubeletMount, processes: Processes, tmp_path: Path
) -> None:
    """The exact corner, end to end: the daemon through the relay, the worker direct."""
    kubelet_mount.set(KEY, rev(1))
    release = threading.Event()
    with lost_answer_link(redis_server, rev(3), release) as link:
        daemon = start_daemon(processes, tmp_path, link.url, kubelet_mount.directory)
        [worker] = spawn_workers(
            processes, redis_server.url, KEY, tmp_path, 1, "--heartbeat", "0.5"
        )
        worker.wait_started(30)
        for n in (1, 2, 3):
            kubelet_mount.set(KEY, rev(n))
            wait_until(partial(_runs, worker, rev(n)), f"the worker on rev {n}", 15)
        assert link.answered.is_set()  # v3 ran, the daemon waits for its answer
        direct = connect(redis_server.url, socket_timeout=5)
        before = contents(direct)
        direct.close()
        assert before == {n: sha256_hex(rev(n)) for n in (1, 2, 3)}
        # stopped, the worker does not report what it saw to the new Redis before the
        # re-seed (its row would number that above it): the corner as it comes
        os.kill(worker.pid, signal.SIGSTOP)
        try:
            redis_server.kill()
            link.reachable(False)  # the daemon's retry fails connecting, as to a dead Redis
            kubelet_mount.set(KEY, rev(4))
            release.set()  # the answer is dropped: the daemon's publish raises
            time.sleep(0.5)  # (the retry, and a reconnect or two, meet a dead Redis)
            link.reachable(True)
            redis_server.start()
            started = time.monotonic()
            direct = connect(redis_server.url, socket_timeout=5)
            try:
                [reseeded] = wait_until(lambda: events(direct, KEY), "the re-seed", 15)
            finally:
                direct.close()
        finally:
            os.kill(worker.pid, signal.SIGCONT)
        assert (reseeded.version, reseeded.content) == (4, rev(4))  # above the lost v3
        wait_until(partial(_runs, worker, rev(4)), "the worker on rev 4", 10)
        print(f"\nthe worker on the mount's content {time.monotonic() - started:.2f} s after Redis")
        assert worker.applied() == [rev(n).decode() for n in (1, 2, 3, 4)]
        state = wait_until(lambda: state_of(worker, redis_server.url, KEY), "its row", 10)
        assert (state.version, state.sha256, state.status) == (4, sha256_hex(rev(4)), "applied")
        direct = connect(redis_server.url, socket_timeout=5)
        try:
            after = contents(direct)
        finally:
            direct.close()
        # never two contents at one version, across the restart
        assert all(before[v] == sha for v, sha in after.items() if v in before), (before, after)
        assert daemon.process.poll() is None
        assert daemon.stop() == 0


def _three_versions(url: str) -> None:
    for n in (1, 2, 3):
        append_event(url, KEY, rev(n), version=n)


def _on_v3(url: str) -> tuple[Subscriber, list[str]]:
    """Versions 1-3 in the stream and a started ``Subscriber`` on v3; what it applied."""
    _three_versions(url)
    applied: list[str] = []
    subscriber = Subscriber(KEY, applied.append, redis_url=url, heartbeat_interval=0.5)
    return subscriber.start(), applied


@pytest.mark.slow
def test_a_worker_whose_version_is_another_content_holds_and_the_sweep_writes_above(
    redis_server: RedisServer, kubelet_mount: KubeletMount, processes: Processes, tmp_path: Path
) -> None:
    """Part B alone (another daemon's lost publish, a guess too low): the stream re-created
    by hand with another content as the version the worker runs."""
    url = redis_server.url
    subscriber, applied = _on_v3(url)
    direct = connect(url, socket_timeout=5)
    try:
        assert (subscriber.version, applied) == (3, [rev(3).decode()])
        direct.delete(KEYS.events)
        append_event(url, KEY, rev(4), version=3)  # Redis lost v3 = rev 3; rev 4 numbered v3
        reason = renumbered(3, sha256_hex(rev(3)))
        wait_until(lambda: subscriber.status == "holding", "holding", 10)
        row = wait_until(lambda: _row(url, subscriber, "holding"), "its row holding", 10)
        assert (row.error, row.version, row.seen) == (reason, 3, 3)
        # a daemon whose mount has rev 4: found as v3 at first, then published above v3
        kubelet_mount.set(KEY, rev(4))
        daemon = start_daemon(processes, tmp_path, url, kubelet_mount.directory)
        wait_until(lambda: subscriber.version == 5, "rev 4 written above v3 (v5)", 15)
        assert applied == [rev(3).decode(), rev(4).decode()]
        assert subscriber.status == "applied"
        assert [(e.version, e.content) for e in events(direct, KEY)] == [(3, rev(4)), (5, rev(4))]
        assert daemon.stop() == 0
    finally:
        subscriber.stop()
        direct.close()


def test_the_same_content_at_the_version_the_worker_runs_does_not_hold(
    redis_server: RedisServer,
) -> None:
    url = redis_server.url
    subscriber, applied = _on_v3(url)
    direct = connect(url, socket_timeout=5)
    try:
        direct.delete(KEYS.events)
        replayed = append_event(url, KEY, rev(3), version=3)  # re-seeded identical content
        wait_until(
            lambda: any(ack.entry_id == replayed for ack in acks(url, KEY)),
            "the re-seeded v3 reported (a replay)",
            10,
        )
        row = wait_until(lambda: _row(url, subscriber), "its row", 10)
        assert (subscriber.status, row.status, row.error) == ("applied", "applied", "")
        assert applied == [rev(3).decode()]
    finally:
        subscriber.stop()
        direct.close()


def _row(
    url: str, subscriber: Subscriber | AsyncSubscriber, status: str = ""
) -> WorkerState | None:
    """The subscriber's :workers row (None until it has one, or one with ``status``)."""
    row = worker_states(url, KEY).get(subscriber.worker_id)
    return row if row is not None and status in ("", row.status) else None


def _then(link: LostAnswer, fault: Callable[[], None], release: threading.Event) -> None:
    """Once Redis answered the marked request: ``fault`` (freeze or kill it), then let the
    relay drop the answer; on a thread, while the publish waits for that answer."""

    def run() -> None:
        if link.answered.wait(15):
            fault()
        release.set()

    threading.Thread(target=run, daemon=True).start()


def _runs(worker: Worker, content: bytes) -> bool:
    return worker.last_applied() == content.decode()


def test_the_asyncio_subscriber_holds_the_same_way(redis_server: RedisServer) -> None:
    """``AsyncSubscriber`` shares the decision (``_walk``): holds, then takes a version above."""
    url = redis_server.url
    _three_versions(url)
    applied: list[str] = []

    async def scenario() -> tuple[str, str]:
        async with AsyncSubscriber(
            KEY, applied.append, redis_url=url, block_ms=300, heartbeat_interval=0.3
        ) as sub:
            direct = connect(url, socket_timeout=5)
            try:
                direct.delete(KEYS.events)
            finally:
                direct.close()
            append_event(url, KEY, rev(4), version=3)
            await eventually(lambda: sub.status == "holding", "holding")
            row = await eventually(lambda: _row(url, sub, "holding"), "its row holding")
            append_event(url, KEY, rev(4), version=5)  # a version above: taken
            await eventually(lambda: sub.status == "applied", "applied")
            return row.error, sub.status

    error, status = asyncio.run(scenario())
    assert status == "applied"
    assert error == renumbered(3, sha256_hex(rev(3)))
    assert applied == [rev(3).decode(), rev(4).decode()]
