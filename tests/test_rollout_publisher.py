"""Rollout control, the publisher's decisions: real daemons and a real Redis; the workers are
written into ``:workers`` / ``:acks`` as a worker of this release writes them (heartbeats on a
thread), so what the daemon decides is read from the stream. Real worker processes honouring
audiences are in test_rollout_workers.py.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis

from subscriber._redis import connect
from subscriber.keys import stream_keys
from subscriber.protocol import sha256_hex
from subscriber.testing import RedisServer, free_port
from tests.conftest import REPO, KubeletMount, Processes
from tests.helpers import DaemonProcess, start_daemon, wait_until

KEY = "app.yaml"
A, B, C = b"rate: 1\n", b"rate: 2\n", b"rate: 3\n"


def entries(client: redis.Redis, key: str = KEY) -> list[dict[str, str]]:
    """Every entry's fields (content left out), oldest first."""
    raw = cast(list[Any], client.xrange(stream_keys(key).events))
    return [
        {k.decode(): v.decode() for k, v in fields.items() if k != b"content"}
        | {"content": fields[b"content"].decode()}
        for _, fields in raw
    ]


def now_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


class Workers:
    """Worker states as this release's workers write them, heartbeating every 0.2 s."""

    def __init__(self, client: redis.Redis, key: str = KEY) -> None:
        self.client = client
        self.keys = stream_keys(key)
        self.states: dict[str, dict[str, Any]] = {}
        self.silent: set[str] = set()  # no more heartbeats (SIGKILLed)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._lock = threading.Lock()

    def add(self, worker: str, version: int, content: bytes, *, audience: bool = True) -> None:
        with self._lock:
            self.states[worker] = {
                "worker": worker,
                "status": "applied",
                "version": version,
                "sha256": sha256_hex(content),
                "heartbeat": now_ms(self.client),
                "heartbeat_interval": 0.2,
                "audience": audience,
            }
        self._write(worker)

    def apply(self, worker: str, version: int, content: bytes) -> None:
        at = now_ms(self.client)
        with self._lock:
            self.states[worker].update(version=version, sha256=sha256_hex(content), heartbeat=at)
        self._write(worker)
        self.client.xadd(
            self.keys.acks,
            {"worker": worker, "version": version, "sha256": sha256_hex(content),
             "status": "applied", "at": at},
        )  # fmt: skip

    def reject(self, worker: str, version: int, content: bytes, error: str) -> None:
        at = now_ms(self.client)
        with self._lock:
            self.states[worker].update(status="rejected", rejected_version=version, error=error)
        self._write(worker)
        self.client.xadd(
            self.keys.acks,
            {"worker": worker, "version": version, "sha256": sha256_hex(content),
             "status": "rejected", "error": error, "at": at},
        )  # fmt: skip

    def _write(self, worker: str) -> None:
        with self._lock:
            state = dict(self.states[worker])
        self.client.hset(self.keys.workers, worker, json.dumps(state))

    def _beat(self) -> None:
        while not self._stop.wait(0.2):
            try:
                for worker in list(self.states):
                    if worker in self.silent:
                        continue
                    with self._lock:
                        self.states[worker]["heartbeat"] = now_ms(self.client)
                    self._write(worker)
            except redis.RedisError:  # Redis restarting: as a worker, beat again later
                continue

    def __enter__(self) -> Workers:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture
def workers(client: redis.Redis) -> Iterator[Workers]:
    with Workers(client) as fleet:
        yield fleet


def daemon(
    processes: Processes,
    mount: KubeletMount,
    redis_server: RedisServer,
    *args: str,
    name: str = "daemon",
    host: str = "pod-a",
    metrics_port: int = 0,
) -> DaemonProcess:
    return start_daemon(
        processes, mount.directory.parent, redis_server.url, mount.directory, *args,
        name=name, env={"HOSTNAME": host}, log_level="INFO", metrics_port=metrics_port,
    )  # fmt: skip


def cli(
    redis_server: RedisServer, *args: str, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "publisher", *args, "--redis", redis_server.url],
        capture_output=True, text=True, timeout=timeout, cwd=REPO, check=False,
    )  # fmt: skip


def has(client: redis.Redis, count: int) -> Any:
    return lambda: (found := entries(client)) and len(found) >= count and found


def test_a_canary_goes_to_one_worker_and_is_promoted_once_it_survived_the_hold(
    processes: Processes, kubelet_mount: KubeletMount, redis_server: RedisServer,
    client: redis.Redis, workers: Workers,
) -> None:  # fmt: skip
    kubelet_mount.write({KEY: A})
    port = free_port()
    run = daemon(processes, kubelet_mount, redis_server, "--canary", "1", "--canary-hold", "1",
                 metrics_port=port)  # fmt: skip
    first = wait_until(has(client, 1), "v1")[0]
    assert "audience" not in first
    assert first["schema"] == "1"
    for worker in ("pod-a:1", "pod-a:2", "pod-a:3"):
        workers.add(worker, 1, A)
    kubelet_mount.write({KEY: B})
    canary = wait_until(has(client, 2), "the canary")[1]
    audience = json.loads(canary["audience"])
    assert canary["schema"] == "2"
    assert canary["rollout"] == "canary"
    assert len(audience) == 1
    assert canary["content"] == B.decode()
    workers.apply(audience[0], 2, B)
    promoted = wait_until(has(client, 3), "the promotion", timeout=15)[2]
    assert promoted["rollout"] == "promote"
    assert promoted["rollout_of"] == "2"
    assert "audience" not in promoted
    assert promoted["schema"] == "1"
    assert promoted["content"] == B.decode()
    assert promoted["version"] == "3"
    status = cli(redis_server, "status", KEY, "--json")
    assert status.returncode == 0, status.stderr
    rollout = json.loads(status.stdout)["summary"][0]["rollout"]
    assert rollout["state"] == "promoted"
    assert rollout["version"] == 3
    assert rollout["canary"] == audience
    assert "promoted" in run.output()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        metrics = response.read().decode()
    for event in ("canary", "promoted"):
        assert f'hotreload_rollout_events_total{{event="{event}",key="app.yaml"}} 1.0' in metrics


def test_a_rejected_canary_is_halted_and_published_no_further(
    processes: Processes, kubelet_mount: KubeletMount, redis_server: RedisServer,
    client: redis.Redis, workers: Workers,
) -> None:  # fmt: skip
    kubelet_mount.write({KEY: A})
    run = daemon(processes, kubelet_mount, redis_server, "--canary", "50%", "--canary-hold", "1")
    wait_until(has(client, 1), "v1")
    for worker in ("pod-a:1", "pod-a:2", "pod-a:3", "pod-a:4"):
        workers.add(worker, 1, A)
    workers.add("pod-a:5", 1, A, audience=False)  # an older worker is never a canary
    kubelet_mount.write({KEY: B})
    canary = wait_until(has(client, 2), "the canary")[1]
    audience = json.loads(canary["audience"])
    assert len(audience) == 3
    assert "pod-a:5" not in audience
    workers.apply(audience[0], 2, B)
    workers.reject(audience[1], 2, B, "rate: must be below 2")
    halted = wait_until(has(client, 3), "the halt")[2]
    assert halted["rollout"] == "halt"
    assert halted["rollout_of"] == "2"
    assert halted["rollout_sha256"] == sha256_hex(B)
    assert halted["content"] == A.decode()
    assert "rejected" in halted["reason"]
    assert "audience" not in halted
    # the daemon restarted, its mount still showing the halted content: nothing written
    assert run.stop() == 0
    run = daemon(processes, kubelet_mount, redis_server, "--canary", "50%", name="again")
    wait_until(lambda: "halted" in run.output(), "the restarted daemon honours the halt")
    assert len(entries(client)) == 3
    # a fixed ConfigMap is a new canary
    kubelet_mount.write({KEY: C})
    fixed = wait_until(has(client, 4), "the fixed content")[3]
    assert fixed["rollout"] == "canary"
    assert fixed["content"] == C.decode()


def test_a_canary_worker_that_dies_before_the_hold_ends_halts_the_canary(
    processes: Processes, kubelet_mount: KubeletMount, redis_server: RedisServer,
    client: redis.Redis, workers: Workers,
) -> None:  # fmt: skip
    kubelet_mount.write({KEY: A})
    daemon(processes, kubelet_mount, redis_server, "--canary", "1", "--canary-hold", "30")
    wait_until(has(client, 1), "v1")
    workers.add("pod-a:1", 1, A)
    workers.add("pod-a:2", 1, A)
    kubelet_mount.write({KEY: B})
    canary = wait_until(has(client, 2), "the canary")[1]
    (chosen,) = json.loads(canary["audience"])
    workers.apply(chosen, 2, B)
    workers.silent.add(chosen)  # SIGKILLed right after applying: no more heartbeats
    halted = wait_until(has(client, 3), "the halt", timeout=15)[2]
    assert halted["rollout"] == "halt"
    assert "stale" in halted["reason"]
    assert halted["content"] == A.decode()


@pytest.fixture
def aof_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A Redis that keeps its data across a restart (AOF)."""
    server = RedisServer(tmp_path_factory.mktemp("aof"), appendonly=True).start()
    try:
        yield server
    finally:
        server.stop()


def test_rollback_runs_the_previous_content_and_pins_it_across_restarts_until_a_new_content(
    processes: Processes, kubelet_mount: KubeletMount, aof_server: RedisServer,
) -> None:  # fmt: skip
    client = connect(aof_server.url, socket_timeout=5)
    try:
        kubelet_mount.write({KEY: A})
        run = daemon(processes, kubelet_mount, aof_server)
        wait_until(has(client, 1), "v1")
        kubelet_mount.write({KEY: B})
        wait_until(has(client, 2), "v2")
        done = cli(aof_server, "rollback", KEY)
        assert done.returncode == 0, done.stderr
        rolled = entries(client)[2]
        assert rolled["rollout"] == "rollback"
        assert rolled["content"] == A.decode()
        assert rolled["rollout_of"] == "2"
        assert rolled["rollout_sha256"] == sha256_hex(B)
        assert rolled["request"]
        assert "v3" in done.stdout
        # restarted (re-seeds every key): the mount still shows B, pinned
        assert run.stop() == 0
        run = daemon(processes, kubelet_mount, aof_server, name="again")
        wait_until(lambda: "pinned" in run.output(), "the pin honoured")
        # Redis restarted with its data: reconnected, every key re-seeded, still pinned
        aof_server.stop()
        wait_until(lambda: "lost Redis" in run.output(), "the daemon lost Redis")
        aof_server.start()
        wait_until(lambda: run.output().count("pinned") >= 2, "the pin honoured after it")
        assert len(entries(client)) == 3
        status = json.loads(cli(aof_server, "status", KEY, "--json").stdout)
        assert status["summary"][0]["rollout"]["state"] == "rolled-back"
        # --to the version whose content runs now is refused
        unknown = cli(aof_server, "rollback", KEY, "--to", "9")
        assert unknown.returncode == 2, unknown.stderr
        assert "no version 9" in unknown.stderr
        refused = cli(aof_server, "rollback", KEY, "--to", "1")
        assert refused.returncode == 1, refused.stderr
        assert "running now" in refused.stderr
        kubelet_mount.write({KEY: C})
        fixed = wait_until(has(client, 4), "the new content")[3]
        assert fixed["content"] == C.decode()
        assert "rollout" not in fixed
    finally:
        client.close()


def test_promote_and_halt_without_a_canary_are_refused_and_without_a_daemon_time_out(
    processes: Processes, kubelet_mount: KubeletMount, redis_server: RedisServer,
    client: redis.Redis,
) -> None:  # fmt: skip
    kubelet_mount.write({KEY: A})
    run = daemon(processes, kubelet_mount, redis_server)
    wait_until(has(client, 1), "v1")
    for op in ("promote", "halt"):
        refused = cli(redis_server, op, KEY)
        assert refused.returncode == 1, refused.stderr
        assert "no canary" in refused.stderr
    assert run.stop() == 0
    late = cli(redis_server, "halt", KEY, "--timeout", "0.5")
    assert late.returncode == 2
    assert "no daemon answered" in late.stderr
    unknown = cli(redis_server, "rollback", "nope.yaml")
    assert unknown.returncode == 2
    assert "unknown key" in unknown.stderr


def test_three_daemons_write_one_canary_one_promotion_one_halt_and_one_rollback(
    processes: Processes, tmp_path: Path, redis_server: RedisServer, client: redis.Redis,
    workers: Workers,
) -> None:  # fmt: skip
    mounts = [KubeletMount(tmp_path / f"pod-{i}" / "config") for i in range(3)]
    for mount in mounts:
        mount.write({KEY: A})
    for i, mount in enumerate(mounts):
        daemon(processes, mount, redis_server, "--canary", "2", "--canary-hold", "1",
               host=f"pod-{i}")  # fmt: skip
    wait_until(has(client, 1), "v1")
    for i in range(6):
        workers.add(f"pod-{i % 3}:{100 + i}", 1, A)
    for mount in mounts:
        mount.write({KEY: B})
    canary = wait_until(has(client, 2), "the canary")[1]
    for worker in json.loads(canary["audience"]):
        workers.apply(worker, 2, B)
    wait_until(has(client, 3), "the promotion", timeout=15)
    for mount in mounts:
        mount.write({KEY: C})
    canary = wait_until(has(client, 4), "the second canary")[3]
    workers.reject(json.loads(canary["audience"])[0], 4, C, "rate: no")
    wait_until(has(client, 5), "the halt")
    done = cli(redis_server, "rollback", KEY)
    assert done.returncode == 0, done.stderr
    wait_until(has(client, 6), "the rollback")
    time.sleep(2)  # every daemon has had its chance to write a second one
    kinds = [e.get("rollout", "") for e in entries(client)]
    assert kinds == ["", "canary", "promote", "canary", "halt", "rollback"], kinds


def test_a_daemon_killed_during_the_hold_with_redis_restarted_resumes_it_or_halts(
    processes: Processes, kubelet_mount: KubeletMount, aof_server: RedisServer,
) -> None:  # fmt: skip
    """Never promoted without proof, never stuck: the next daemon reads the canary from the
    stream and resumes its hold (then promotes), or halts it, and says which."""
    client = connect(aof_server.url, socket_timeout=5)
    try:
        with Workers(client) as fleet:
            kubelet_mount.write({KEY: A})
            # the hold counts from the canary's applied ack: with 2 s it had run out before
            # the second daemon's first look in a loaded run (kill, AOF restart, daemon start),
            # which then promoted at once, rightly, without resuming (1 run in ~10 fresh clones)
            args = ("--canary", "1", "--canary-hold", "6")
            first = daemon(processes, kubelet_mount, aof_server, *args)
            wait_until(has(client, 1), "v1")
            fleet.add("pod-a:1", 1, A)
            fleet.add("pod-a:2", 1, A)
            kubelet_mount.write({KEY: B})
            (chosen,) = json.loads(wait_until(has(client, 2), "the canary")[1]["audience"])
            fleet.apply(chosen, 2, B)
            first.stop(signal.SIGKILL)
            aof_server.stop()
            aof_server.start()
            second = daemon(processes, kubelet_mount, aof_server, *args, name="second")
            wait_until(lambda: "resuming its hold" in second.output(), "resumed", timeout=15)
            promoted = wait_until(has(client, 3), "the promotion", timeout=15)[2]
            assert promoted["rollout"] == "promote"
            # the next canary: its worker dies while no daemon runs: halted, and said why
            kubelet_mount.write({KEY: C})
            (chosen,) = json.loads(wait_until(has(client, 4), "canary 2")[3]["audience"])
            fleet.apply(chosen, 4, C)
            second.stop(signal.SIGKILL)
            fleet.silent.add(chosen)
            time.sleep(1.5)  # stale: 3 heartbeats of 0.2 s (1 s at least) missed
            third = daemon(processes, kubelet_mount, aof_server, *args, name="third")
            halted = wait_until(has(client, 5), "the halt", timeout=15)[4]
            assert halted["rollout"] == "halt"
            assert halted["content"] == B.decode()
            wait_until(lambda: "halted v4" in third.output(), "the halt said")
    finally:
        client.close()


def test_redis_restarted_empty_gets_the_pin_or_the_halt_back_from_the_daemon(
    processes: Processes, kubelet_mount: KubeletMount, redis_server: RedisServer,
    client: redis.Redis, workers: Workers,
) -> None:  # fmt: skip
    kubelet_mount.write({KEY: A})
    run = daemon(processes, kubelet_mount, redis_server, "--canary", "1", "--canary-hold", "30")
    wait_until(has(client, 1), "v1")
    kubelet_mount.write({KEY: B})
    wait_until(has(client, 2), "v2 (no worker: to everyone)")
    assert cli(redis_server, "rollback", KEY).returncode == 0
    wait_until(has(client, 3), "the rollback")
    client.flushall()  # as a Redis restarted without persistence
    restored = wait_until(has(client, 1), "the pin written again", timeout=15)[0]
    assert restored["rollout"] == "rollback"
    assert restored["content"] == A.decode()
    assert restored["rollout_sha256"] == sha256_hex(B)
    assert int(restored["version"]) > 3
    assert "written again" in run.output()
    # a canary lost by Redis before it was proven: halted, never promoted
    workers.add("pod-a:1", 4, A)
    kubelet_mount.write({KEY: C})
    canary = wait_until(has(client, 2), "the canary")[1]
    assert canary["rollout"] == "canary"
    client.flushall()
    workers.add("pod-a:1", int(canary["version"]), C)
    halted = wait_until(has(client, 1), "the halt written", timeout=15)[0]
    assert halted["rollout"] == "halt"
    assert halted["content"] == A.decode()
    assert "lost canary" in halted["reason"]


def test_wait_for_a_content_waits_through_its_canary_and_fails_when_it_is_halted(
    processes: Processes, kubelet_mount: KubeletMount, redis_server: RedisServer,
    client: redis.Redis, workers: Workers,
) -> None:  # fmt: skip
    tmp_path = kubelet_mount.directory.parent
    kubelet_mount.write({KEY: A})
    daemon(processes, kubelet_mount, redis_server, "--canary", "1", "--canary-hold", "1")
    wait_until(has(client, 1), "v1")
    fleet = ("pod-a:1", "pod-a:2", "pod-a:3")
    for worker in fleet:
        workers.add(worker, 1, A)
    (tmp_path / "b").write_bytes(B)
    argv = [sys.executable, "-m", "publisher", "wait", KEY, "--file", str(tmp_path / "b"),
            "--timeout", "60", "--redis", redis_server.url]  # fmt: skip
    waiting = processes.spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO)
    kubelet_mount.write({KEY: B})
    (chosen,) = json.loads(wait_until(has(client, 2), "the canary")[1]["audience"])
    workers.apply(chosen, 2, B)
    # the canary's own version: only its audience is expected
    assert cli(redis_server, "wait", KEY, "--version", "2", "--timeout", "10").returncode == 0
    assert waiting.poll() is None  # waiting for the content goes on until it is promoted
    wait_until(has(client, 3), "the promotion", timeout=15)
    for worker in fleet:
        workers.apply(worker, 3, B)
    output = waiting.communicate(timeout=30)[0].decode()
    assert waiting.returncode == 0, output
    assert "v3" in output
    # a content whose canary is rejected (then halted): wait says so, exit 1
    (tmp_path / "c").write_bytes(C)
    argv[argv.index(str(tmp_path / "b"))] = str(tmp_path / "c")
    waiting = processes.spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO)
    kubelet_mount.write({KEY: C})
    (chosen,) = json.loads(wait_until(has(client, 4), "the canary")[3]["audience"])
    workers.reject(chosen, 4, C, "rate: no")
    output = waiting.communicate(timeout=30)[0].decode()
    assert waiting.returncode == 1, output
    assert "rate: no" in output


def test_a_lagging_mount_restarted_during_a_canary_neither_halts_nor_reverts_it(
    processes: Processes, tmp_path: Path, redis_server: RedisServer, client: redis.Redis,
    workers: Workers,
) -> None:  # fmt: skip
    fast, slow = (KubeletMount(tmp_path / name / "config") for name in ("fast", "slow"))
    for mount in (fast, slow):
        mount.write({KEY: A})
    args = ("--canary", "1", "--canary-hold", "30")
    daemon(processes, fast, redis_server, *args, host="pod-a")
    lagging = daemon(processes, slow, redis_server, *args, name="slow", host="pod-b")
    wait_until(has(client, 1), "v1")
    workers.add("pod-a:1", 1, A)
    workers.add("pod-b:1", 1, A)
    fast.write({KEY: B})
    wait_until(has(client, 2), "the canary")
    wait_until(lambda: "initial publish done" in lagging.output(), "pod-b's daemon up")
    assert lagging.stop() == 0  # pod-b's daemon restarts while its kubelet still shows A
    lagging = daemon(processes, slow, redis_server, *args, name="slow-again", host="pod-b")
    wait_until(lambda: "superseded" in lagging.output(), "the lagging mount told")
    time.sleep(1.5)  # a check interval: no halt, nothing written
    assert [e.get("rollout", "") for e in entries(client)] == ["", "canary"]


def test_a_rollback_the_publish_script_refuses_is_answered_and_the_daemon_goes_on(
    processes: Processes, kubelet_mount: KubeletMount, redis_server: RedisServer,
    client: redis.Redis,
) -> None:  # fmt: skip
    """A request whose publish fails (here: a junk entry at the highest version leaves no
    version to number it with) gets a failure answer naming why; the daemon keeps
    publishing (it used to raise into its loop, which only expects connection errors)."""
    kubelet_mount.write({KEY: A})
    run = daemon(processes, kubelet_mount, redis_server)
    wait_until(has(client, 1), "v1")
    kubelet_mount.write({KEY: B})
    wait_until(has(client, 2), "v2")
    junk = {"schema": "1", "key": KEY, "version": str(2**53 - 1), "sha256": sha256_hex(C),
            "content": C, "published_at": "1", "publisher": "someone:1"}  # fmt: skip
    junk_id = cast(bytes, client.xadd(stream_keys(KEY).events, junk)).decode()  # type: ignore[arg-type]
    refused = cli(redis_server, "rollback", KEY, "--timeout", "10")
    assert refused.returncode == 1, (refused.stdout, refused.stderr)
    assert f"XDEL {stream_keys(KEY).events} {junk_id}" in refused.stderr
    client.xdel(stream_keys(KEY).events, junk_id)  # what the answer says to do
    kubelet_mount.write({KEY: C})
    assert wait_until(has(client, 3), "the daemon still publishes")[2]["content"] == C.decode()
    assert run.stop() == 0
