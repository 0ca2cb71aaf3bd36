"""Never backwards: versions only go up, and workers hold that line (issue 18).

Real processes throughout: redis-server, ``hotreload watch``, worker processes. Every content
is ``rev: N`` with N the order in which the mount had it, so a worker's journal (what its
callback applied, in order) shows at once whether it ever went back to an older content.

Each scenario ends with every live worker on the mount's content, and measures how long that
took after Redis (and the daemon) came back; the times are printed (``pytest -s``).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import msgspec
import pytest
import redis

from publisher._floor import MAX_STATE_BYTES, MAX_VERSION, parse_version, read_workers_seen
from publisher.inspect.events import highest
from publisher.publish import Publisher
from subscriber._redis import connect
from subscriber.keys import stream_keys
from subscriber.protocol import Event, now_ms, sha256_hex
from subscriber.testing import RedisServer
from tests.helpers import DaemonProcess, events, start_daemon, wait_until
from tests.workers.harness import Worker, spawn_workers

if TYPE_CHECKING:
    from tests.conftest import KubeletMount, Processes

KEY = "app.yaml"
KEYS = stream_keys(KEY)
SIGNING_KEY = b"a3f1c0de9b7e4f2a8c6d5e4f3a2b1c0d"


def rev(n: int) -> bytes:
    return f"rev: {n}\n".encode()


REVS = {sha256_hex(rev(n)): n for n in range(1, 50)}


def state(**fields: Any) -> bytes:
    # heartbeating now: a worker silent since 1970 is one the daemon forgets
    base: dict[str, Any] = {"worker": "w", "status": "applied", "heartbeat": now_ms()}
    return msgspec.json.encode({**base, **fields})


# ---------------------------------------------------------------- the floor, read with bounds


def test_versions_are_bounded_integers() -> None:
    assert parse_version(b"42") == 42
    assert parse_version("0") == 0
    assert parse_version(MAX_VERSION) == MAX_VERSION
    for junk in (b"9007199254740992", 2**53, -1, True, 1.5, b"1e3", b"", b" 7", "x", None):
        assert parse_version(junk) is None, junk


def test_the_workers_floor_skips_malformed_and_oversized_entries(client: redis.Redis) -> None:
    client.hset(
        KEYS.workers,
        mapping={
            "a": state(version=3, seen=5),
            "b": state(version=2, rejected_version=4, status="holding", error="holding v4"),
            "junk-version": state(version=2**53),
            "huge-seen": state(seen=10**30),
            "string-version": state(version="99"),
            "not-json": b"{",
            "oversized": state(seen=77, error="x" * MAX_STATE_BYTES),
        },
    )
    seen = read_workers_seen(client, KEYS.workers)
    assert seen.floor == 5
    assert seen.holding == (("b", "holding v4"),)
    assert seen.skipped == 5


def test_a_stream_behind_the_workers_is_written_above_them(client: redis.Redis) -> None:
    """The content is found as the newest entry, but the workers saw v5: written as v6."""
    publisher = Publisher(client)
    assert publisher.publish(KEY, rev(1)).version == 1
    result = publisher.publish(KEY, rev(1), above=5)
    assert (result.written, result.version) == (True, 6)
    # not behind any more: found as before
    again = publisher.publish(KEY, rev(1), above=6)
    assert (again.written, again.version) == (False, 6)
    # a new content is numbered above the floor even by a fresh publisher on an empty stream
    client.delete(KEYS.events)
    assert Publisher(client).publish(KEY, rev(2), above=9).version == 10


def test_signed_a_replayed_old_entry_is_published_over(client: redis.Redis) -> None:
    publisher = Publisher(client, signing_key=SIGNING_KEY)
    for n in (1, 2, 3):
        publisher.publish(KEY, rev(n))
    raw = cast("list[tuple[bytes, dict[bytes, bytes]]]", client.xrange(KEYS.events, count=1))
    client.xadd(KEYS.events, raw[0][1])  # type: ignore[arg-type]
    result = Publisher(client, signing_key=SIGNING_KEY).publish(KEY, rev(3), above=3)
    assert (result.written, result.version) == (True, 4)
    assert events(client, KEY)[-1].sig  # signed for v4


def test_a_junk_version_never_blocks_the_next_one(client: redis.Redis) -> None:
    """A version too large for Lua to count past (or not a number) is a malformed entry: the
    next version is numbered from the publisher's floor, not from the junk."""
    publisher = Publisher(client)
    publisher.publish(KEY, rev(1))
    for n, junk in enumerate(("9007199254740993", "99999999999999999999999", "1e300", "-5"), 2):
        client.xadd(KEYS.events, {"version": junk, "sha256": "0" * 64})
        result = publisher.publish(KEY, rev(n))
        assert (result.written, result.version) == (True, n), junk


def test_a_lagging_publisher_never_publishes_a_content_the_others_skipped(
    client: redis.Redis,
) -> None:
    """Two publishers on one stream (two pods' daemons; the fault soak's two daemons on one
    mount). The mount goes 1 -> 2 -> 3; ``fast`` reads it only after the second swap (it
    coalesced: it never sees 2) and publishes 3; ``slow`` read 2 before that swap, knowing
    the stream up to v1 (its ``seen``), and publishes it only now, after 3 was published;
    then it reads 3. Without ``seen`` versions go up (v2 = 3, v3 = 2, v4 = 3) but the newest
    entry goes back to the older content 2 until ``slow`` catches up: every worker would
    apply 1, 3, 2, 3. With it, 2 is answered behind (docs/design.md "Behind")."""
    fast = Publisher(client, publisher_id="pod-a:1")
    slow = Publisher(client, publisher_id="pod-b:1")
    assert fast.publish(KEY, rev(1)).written
    v1 = slow.publish(KEY, rev(1))
    assert not v1.written  # found: both on v1
    assert fast.publish(KEY, rev(3)).version == 2
    late = slow.publish(KEY, rev(2), seen=v1.entry_id)  # read before the swap to 3
    assert (late.behind, late.version) == (True, 2)  # the newest entry: v2, fast's 3
    slow.publish(KEY, rev(3))
    contents = [REVS[e.sha256] for e in events(client, KEY)]
    assert contents == sorted(contents), f"the stream's contents went back: {contents}"
    assert not late.written


def test_the_daemon_republishes_above_a_holding_worker(
    processes: Processes, redis_server: RedisServer, kubelet_mount: KubeletMount, tmp_path: Path
) -> None:
    """No worker process needed: a worker's report that it saw v7 (the stream restored to v1
    under it) makes the daemon publish the mount's content as v8 within a check or two."""
    client = connect(redis_server.url, socket_timeout=5.0)
    kubelet_mount.set(KEY, rev(1))
    daemon = start_daemon(processes, tmp_path, redis_server.url, kubelet_mount.directory)
    wait_until(lambda: client.exists(KEYS.events), "v1 published", 15)
    client.hset(KEYS.workers, "w", state(version=7, seen=7, status="holding", error="holding"))
    wait_until(lambda: events(client, KEY)[-1].version == 8, "v8 above the worker", 10)
    assert events(client, KEY)[-1].content == rev(1)
    daemon.stop()


# ---------------------------------------------------------------- with worker processes


class Pod:
    """A kubelet mount, a daemon and worker processes on one Redis URL."""

    def __init__(
        self,
        processes: Processes,
        mount: KubeletMount,
        url: str,
        logs: Path,
        *,
        signed: bool = False,
    ) -> None:
        self.processes, self.mount, self.url, self.logs = processes, mount, url, logs
        self.key_file: Path | None = None
        if signed:
            self.key_file = logs / "signing.key"
            self.key_file.write_bytes(SIGNING_KEY)
        self.daemon: DaemonProcess | None = None
        self.workers: list[Worker] = []
        self.rev = 0

    def start_daemon(self) -> None:
        extra = ("--signing-key-file", str(self.key_file)) if self.key_file else ()
        self.daemon = start_daemon(
            self.processes, self.logs, self.url, self.mount.directory, *extra
        )

    def stop_daemon(self) -> None:
        assert self.daemon is not None
        self.daemon.stop()
        self.daemon = None

    def start_workers(self, count: int = 3) -> None:
        if self.key_file is None:
            self.workers = spawn_workers(
                self.processes, self.url, KEY, self.logs, count, "--heartbeat", "0.5"
            )
        else:
            for index in range(count):
                out = self.logs / f"secure-{index}.jsonl"
                argv = ["-m", "tests.workers.secure_worker", "--url", self.url, "--key", KEY]
                process = self.processes.python(
                    *argv, "--out", str(out), "--signing-key-file", str(self.key_file)
                )
                self.workers.append(Worker(process, out))
        for worker in self.workers:
            worker.wait_started(30)

    def revs(self, worker: Worker) -> list[int]:
        """The revs a worker applied, in order (its journal)."""
        return [REVS[row["sha256"]] for row in worker.lines("applied")]

    def advance(self, to: int) -> None:
        while self.rev < to:
            self.rev += 1
            self.mount.set(KEY, rev(self.rev))
            self.wait_on(self.rev)

    def wait_on(self, n: int, timeout: float = 20.0) -> float:
        """Seconds until every worker's last applied content is rev ``n``."""
        started = time.monotonic()
        wait_until(
            lambda: all(self.revs(w)[-1:] == [n] for w in self.workers),
            f"every worker on rev {n}",
            timeout,
        )
        return time.monotonic() - started

    def assert_never_backwards(self) -> None:
        for worker in self.workers:
            applied = self.revs(worker)
            assert applied == sorted(applied), f"worker {worker.pid} went back: {applied}"
            assert worker.process.poll() is None, worker.log()


@pytest.fixture
def pod(processes: Processes, kubelet_mount: KubeletMount, tmp_path: Path) -> Pod:
    return Pod(processes, kubelet_mount, "", tmp_path)


def converged(pod: Pod) -> bool:
    """The stream's highest (verified) version carries the mount's content, and every worker
    reports in :workers that it runs that version, applied (not holding)."""
    try:
        client = connect(pod.url, socket_timeout=2.0)
        try:
            top = highest(client, KEYS.events, SIGNING_KEY if pod.key_file else None)
            raw = cast("dict[bytes, bytes]", client.hgetall(KEYS.workers))
        finally:
            client.close()
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False
    if top is None or top.content != rev(pod.rev):
        return False
    states = [msgspec.json.decode(value) for value in raw.values()]
    by_pid = {s.get("pid"): s for s in states if isinstance(s, dict)}
    wanted = (top.version, top.sha256, "applied")
    return all(
        (by_pid.get(w.pid) or {}).keys() >= {"version"}
        and (by_pid[w.pid]["version"], by_pid[w.pid]["sha256"], by_pid[w.pid]["status"]) == wanted
        for w in pod.workers
    )


def converge_after(pod: Pod, started: float, scenario: str) -> float:
    wait_until(lambda: converged(pod), f"every worker on rev {pod.rev} (the mount's)", 30)
    took = time.monotonic() - started
    pod.assert_never_backwards()
    print(f"\n{scenario}: every worker on the mount's content {took:.2f} s after the fault")
    return took


@pytest.mark.parametrize("daemon_restarts", [False, True], ids=["daemon-alive", "daemon-restarted"])
def test_redis_restored_from_an_older_backup(
    pod: Pod, redis_server: RedisServer, daemon_restarts: bool
) -> None:
    pod.url = redis_server.url
    pod.mount.set(KEY, rev(1))
    pod.rev = 1
    pod.start_daemon()
    pod.start_workers()
    pod.advance(3)
    connect(redis_server.url, socket_timeout=5.0).save()  # the backup, at v3
    pod.advance(5)
    if daemon_restarts:
        pod.stop_daemon()
    redis_server.kill()
    redis_server.start()  # loads the v3 dump
    started = time.monotonic()
    if daemon_restarts:
        pod.start_daemon()
    converge_after(
        pod, started, f"restored older, daemon {'restarted' if daemon_restarts else 'alive'}"
    )


@pytest.mark.parametrize("daemon_restarts", [False, True], ids=["daemon-alive", "daemon-restarted"])
def test_redis_restarted_empty(pod: Pod, redis_server: RedisServer, daemon_restarts: bool) -> None:
    pod.url = redis_server.url
    pod.mount.set(KEY, rev(1))
    pod.rev = 1
    pod.start_daemon()
    pod.start_workers()
    pod.advance(4)
    if daemon_restarts:
        pod.stop_daemon()
    redis_server.kill()
    redis_server.start()
    started = time.monotonic()
    if daemon_restarts:
        pod.start_daemon()
    converge_after(
        pod, started, f"restarted empty, daemon {'restarted' if daemon_restarts else 'alive'}"
    )


def test_failover_to_a_lagging_replica(pod: Pod, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Master and replica serve TCP (replication) and a unix socket each; the pod reaches
    Redis through a symlink, the service address, which the failover points at the replica."""
    base = Path(tmp_path_factory.mktemp("fo", numbered=True))
    servers = []
    for name in ("master", "replica"):
        directory = base / name
        sock = directory / "r.sock"
        extra = ("--unixsocket", str(sock), "--unixsocketperm", "700")
        servers.append(RedisServer(directory, unix=False, extra_args=extra).start())
    master, replica = servers
    service = base / "service.sock"
    os.symlink(master.directory / "r.sock", service)
    try:
        replica_client = connect(replica.url, socket_timeout=5.0)
        replica_client.replicaof("127.0.0.1", master.port)
        # the first sync starts after the master's repl-diskless-sync-delay (5 s): linked
        # before the writes, so that WAIT below waits for them alone
        wait_until(
            lambda: replica_client.info("replication").get("master_link_status") == "up",
            "the replica's first sync",
            timeout=30,
        )
        pod.url = f"unix://{service}"
        pod.mount.set(KEY, rev(1))
        pod.rev = 1
        pod.start_daemon()
        pod.start_workers()
        pod.advance(3)
        master_client = connect(master.url, socket_timeout=5.0)
        assert master_client.wait(1, 5000) == 1  # the replica has v3
        replica_client.replicaof("NO", "ONE")  # replication cut: it lags from here on
        pod.advance(5)
        master.kill()
        link = base / "service.new"
        os.symlink(replica.directory / "r.sock", link)
        os.replace(link, service)  # the service now leads to the promoted replica
        started = time.monotonic()
        converge_after(pod, started, "failover to a lagging replica")
    finally:
        for server in servers:
            server.stop()


def test_signed_replay_of_an_old_entry(pod: Pod, redis_server: RedisServer) -> None:
    pod.url = redis_server.url
    pod.mount.set(KEY, rev(1))
    pod.rev = 1
    pod = Pod(pod.processes, pod.mount, redis_server.url, pod.logs, signed=True)
    pod.rev = 1
    pod.start_daemon()
    pod.start_workers()
    pod.advance(3)
    client = connect(redis_server.url, socket_timeout=5.0)
    raw = cast("list[tuple[bytes, dict[bytes, bytes]]]", client.xrange(KEYS.events, count=1))
    assert re.match(rb"rev: 1", raw[0][1][b"content"])
    started = time.monotonic()
    client.xadd(KEYS.events, raw[0][1])  # type: ignore[arg-type]  # v1, genuinely signed
    converge_after(pod, started, "signed replay of v1")
    for worker in pod.workers:  # no worker applied v1 again, and each reported the replay
        assert pod.revs(worker)[-1] == 3
    # the daemon publishes the content again above the replayed entry, and all run it
    wait_until(lambda: events(client, KEY)[-1].content == rev(3), "rev 3 above the replay", 10)
    converge_after(pod, started, "signed replay of v1, re-published above it")


@pytest.mark.parametrize("daemon_restarts", [False, True], ids=["daemon-alive", "daemon-restarted"])
def test_a_restored_backup_holding_the_mount_s_content_under_an_older_version(
    pod: Pod, redis_server: RedisServer, daemon_restarts: bool
) -> None:
    """v3 and v5 carry the same bytes (A, B, A): the backup restored at v3 ends on the very
    content the mount has, so nothing looks changed: the workers run it, and a daemon that
    restarted with Redis finds it as the stream's newest entry and remembers no floor. The
    workers hold (status "holding": the stream is behind them), and upkeep re-publishes A
    above what they saw: every worker ends applied at a version above 5 with content A,
    its callback having run nothing since v5 (A is adopted, not applied again)."""
    a, b = b"content: A\n", b"content: B\n"
    client = connect(redis_server.url, socket_timeout=5.0)

    def top() -> Event:
        event = highest(client, KEYS.events, None)
        assert event is not None
        return event

    pod.url = redis_server.url
    pod.mount.set(KEY, rev(1))
    pod.start_daemon()
    pod.start_workers()
    for n, data in ((2, rev(2)), (3, a)):
        pod.mount.set(KEY, data)
        wait_until(lambda n=n: top().version == n, f"v{n}", 15)  # type: ignore[misc]
    client.save()  # the backup: v3 = A
    digest_a = sha256_hex(a)

    def on(version: int, digest: str = digest_a) -> bool:
        states = [msgspec.json.decode(v) for v in client.hvals(KEYS.workers)]
        mine = {s.get("pid"): s for s in states}
        return all(
            (mine.get(w.pid) or {}).get("version", 0) >= version
            and mine[w.pid]["sha256"] == digest
            and mine[w.pid]["status"] == "applied"
            for w in pod.workers
        )

    # each applied before the next is written: entries appended within a worker's report
    # hold (30 ms) are read together, and only the newest of them runs
    for n, data in ((4, b), (5, a)):
        pod.mount.set(KEY, data)
        wait_until(lambda n=n, d=data: on(n, sha256_hex(d)), f"every worker applied v{n}", 20)  # type: ignore[misc]
    journals = {w.pid: [row["sha256"] for row in w.lines("applied")] for w in pod.workers}
    for journal in journals.values():
        assert journal[-2:] == [sha256_hex(b), digest_a], journal
    if daemon_restarts:
        pod.stop_daemon()
    redis_server.kill()
    redis_server.start()  # loads the v3 dump: its newest entry is A, as the mount
    client = connect(redis_server.url, socket_timeout=5.0)
    assert (top().version, top().content) == (3, a)
    started = time.monotonic()
    if daemon_restarts:  # the workers alone know how far versions went: they say so first

        def holding() -> bool:
            states = [msgspec.json.decode(v) for v in client.hvals(KEYS.workers)]
            mine = {s.get("pid"): s for s in states}
            return all(
                (mine.get(w.pid) or {}).get("status") == "holding"
                and "waiting for a version above 5" in mine[w.pid]["error"]
                for w in pod.workers
            )

        wait_until(holding, "every worker holding v5", 15)
        pod.start_daemon()
    wait_until(lambda: on(6), "every worker applied a version above 5 with content A", 30)
    took = time.monotonic() - started
    assert top().version > 5
    assert top().content == a
    for worker in pod.workers:  # adopted without a callback: nothing applied since v5
        assert [row["sha256"] for row in worker.lines("applied")] == journals[worker.pid]
        assert worker.process.poll() is None, worker.log()
    print(
        f"\nsame content restored under v3, daemon "
        f"{'restarted' if daemon_restarts else 'alive'}: every worker above v5 in {took:.2f} s"
    )
