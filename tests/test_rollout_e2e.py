"""Rollout control end to end: the real daemon (``hotreload watch --canary``) deciding, real
workers honouring audiences -- gunicorn (4 workers, preload_app, sync and asyncio), plain
subscriber processes (signed, asyncio), snapshots and a Redis Cluster -- and the operator's
``rollback`` through ``:control``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

import pytest

from subscriber._redis import connect
from subscriber.keys import stream_keys
from subscriber.testing import RedisCluster, RedisServer
from tests.conftest import REPO, KubeletMount, Processes
from tests.helpers import DaemonProcess, settles, start_daemon, wait_until
from tests.test_rollout_gunicorn import Pod, start_pod
from tests.workers.harness import Worker, spawn_workers, worker_states

KEY = "app.yaml"


def entries(url: str, key: str = KEY) -> list[dict[str, str]]:
    client = connect(url, socket_timeout=5)
    try:
        raw = cast(list[Any], client.xrange(stream_keys(key).events))
    finally:
        client.close()
    return [
        {k.decode(): v.decode("utf-8", "replace") for k, v in fields.items()} for _, fields in raw
    ]


def has(url: str, count: int, key: str = KEY) -> Any:
    return lambda: (found := entries(url, key)) and len(found) >= count and found


def cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "publisher", *args, "--redis", url],
        capture_output=True, text=True, timeout=60, cwd=REPO, check=False,
    )  # fmt: skip


def watch(
    processes: Processes, mount: KubeletMount, url: str, *args: str | Path, name: str = "daemon"
) -> DaemonProcess:
    return start_daemon(
        processes, mount.directory.parent, url, mount.directory, *args, name=name,
        log_level="INFO",
    )  # fmt: skip


def serving(pod: Pod) -> dict[int, str]:
    return {pid: body["text"] for pid, body in pod.served().items()}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("worker_class", ["sync", "uvicorn.workers.UvicornWorker"])
def test_gunicorn_canary_promotion_rejection_crash_and_rollback(
    worker_class: str, tmp_path: Path, redis_server: RedisServer, processes: Processes,
    kubelet_mount: KubeletMount,
) -> None:  # fmt: skip
    url = redis_server.url
    kubelet_mount.write({KEY: b"rate: 1"})
    daemon = watch(processes, kubelet_mount, url, "--canary", "1", "--canary-hold", "2")
    wait_until(has(url, 1), "v1")
    pod = start_pod(tmp_path, redis_server, processes, worker_class)

    # a good change: one worker first, then everyone
    kubelet_mount.write({KEY: b"rate: 2"})
    canary = wait_until(has(url, 2), "the canary")[1]
    (chosen,) = json.loads(canary["audience"])

    def one_on_the_canary() -> dict[int, str]:
        texts = serving(pod)
        return texts if sorted(texts.values()).count("rate: 2") == 1 else {}

    texts = wait_until(one_on_the_canary, "one worker on the canary")
    assert sorted(texts.values()) == ["rate: 1", "rate: 1", "rate: 1", "rate: 2"]
    chosen_pid = int(chosen.rsplit(":", 1)[1])
    assert texts[chosen_pid] == "rate: 2"
    promoted = wait_until(has(url, 3), "the promotion", timeout=20)[2]
    assert promoted["rollout"] == "promote"
    wait_until(lambda: set(serving(pod).values()) == {"rate: 2"}, "everyone on it")

    # a change the canary worker rejects: halted, nobody else ever runs it
    kubelet_mount.write({KEY: b"rate: REJECT"})
    wait_until(has(url, 4), "the second canary")
    halted = wait_until(has(url, 5), "the halt", timeout=20)[4]
    assert halted["rollout"] == "halt"
    assert "rejected" in halted["reason"]
    assert set(serving(pod).values()) == {"rate: 2"}

    # a change that crashes the worker running it right after it applied it
    (tmp_path / "crash").write_text("1")
    before = set(pod.live())
    kubelet_mount.write({KEY: b"rate: CRASH"})
    wait_until(has(url, 6), "the crashing canary")
    halted = wait_until(has(url, 7), "the crash halted", timeout=30)[6]
    assert halted["rollout"] == "halt"
    assert "stale" in halted["reason"] or "gone" in halted["reason"]
    assert halted["content"] == "rate: 2"
    wait_until(lambda: len(pod.live()) == 4 and set(pod.live()) != before, "replaced")
    wait_until(lambda: set(serving(pod).values()) == {"rate: 2"}, "the replacement is stable")
    assert pod.gunicorn.poll() is None

    # rollback: every worker runs the content before, pinned while the mount shows CRASH
    done = cli(url, "rollback", KEY)
    assert done.returncode == 0, done.stderr
    rolled = entries(url)[7]
    assert rolled["rollout"] == "rollback"
    assert rolled["content"] == "rate: 1"
    wait_until(lambda: set(serving(pod).values()) == {"rate: 1"}, "everyone rolled back")
    status = json.loads(cli(url, "status", KEY, "--json").stdout)["summary"][0]
    assert status["rollout"]["state"] == "rolled-back"
    assert status["state"] == "converged"
    history = cli(url, "history", KEY)
    assert "rollback" in history.stdout
    assert "halt" in history.stdout
    assert "canary" in history.stdout
    # a fixed ConfigMap ends the pin: a canary again
    (tmp_path / "crash").unlink()
    kubelet_mount.write({KEY: b"rate: 3"})
    assert wait_until(has(url, 9), "the fix")[8]["rollout"] == "canary"
    wait_until(lambda: set(serving(pod).values()) == {"rate: 3"}, "the fix promoted", timeout=30)
    assert "promoted" in daemon.output()


def test_signed_asyncio_workers_follow_canary_promotion_and_rollback(
    tmp_path: Path, redis_server: RedisServer, processes: Processes,
    kubelet_mount: KubeletMount,
) -> None:  # fmt: skip
    url = redis_server.url
    key_file = tmp_path / "signing.key"
    key_file.write_text("0123456789abcdef0123456789abcdef\n")
    kubelet_mount.write({KEY: b"v: one"})
    watch(processes, kubelet_mount, url, "--canary", "1", "--canary-hold", "1",
          "--signing-key-file", key_file)  # fmt: skip
    wait_until(has(url, 1), "v1")
    workers = spawn_workers(
        processes, url, KEY, tmp_path, 3, "--async", "--heartbeat", "0.3",
        "--signing-key-file", str(key_file),
    )  # fmt: skip
    for worker in workers:
        worker.wait_started()
    kubelet_mount.write({KEY: b"v: two"})
    canary = wait_until(has(url, 2), "the canary")[1]
    assert canary["sig"]
    assert canary["schema"] == "2"
    wait_until(has(url, 3), "the promotion", timeout=20)
    wait_until(lambda: all(w.last_applied() == "v: two" for w in workers), "all on two")
    assert cli(url, "rollback", KEY).returncode == 0
    wait_until(lambda: all(w.last_applied() == "v: one" for w in workers), "all back")

    # a worker reports on a round trip after its callback returned (held ~30 ms after a
    # follow-loop decision): poll what they wrote, not read it at once
    def reported() -> list[tuple[str, int]]:
        return sorted((s.status, s.version) for s in worker_states(url, KEY).values())

    assert settles(reported, [("applied", 4)] * 3) == [("applied", 4)] * 3
    assert not any(w.lines("rejected") for w in workers)


def running(workers: list[Worker], text: str) -> bool:
    return all(w.last_applied() == text for w in workers)


@pytest.mark.timeout(180)
def test_canary_and_rollback_on_a_redis_cluster(
    tmp_path: Path, redis_cluster: RedisCluster, processes: Processes, kubelet_mount: KubeletMount
) -> None:
    url = redis_cluster.url
    kubelet_mount.write({KEY: b"n: 1"})
    watch(processes, kubelet_mount, url, "--canary", "1", "--canary-hold", "1")
    node = connect(redis_cluster.master_for(stream_keys(KEY).events).url, socket_timeout=5)
    wait_until(lambda: node.xlen(stream_keys(KEY).events) == 1, "v1")
    workers = spawn_workers(processes, url, KEY, tmp_path, 2, "--heartbeat", "0.3")
    for worker in workers:
        worker.wait_started()
    kubelet_mount.write({KEY: b"n: 2"})
    wait_until(lambda: node.xlen(stream_keys(KEY).events) == 3, "canary + promotion", timeout=30)
    wait_until(lambda: running(workers, "n: 2"), "promoted everywhere")
    done = cli(url, "rollback", KEY)
    assert done.returncode == 0, done.stderr
    wait_until(lambda: running(workers, "n: 1"), "rolled back everywhere")
    kinds = [
        fields.get(b"rollout", b"").decode()
        for _, fields in cast(list[Any], node.xrange(stream_keys(KEY).events))
    ]
    assert kinds == ["", "canary", "promote", "rollback"]
    node.close()


def snapshot_workers(processes: Processes, url: str, directory: Path, count: int) -> list[Worker]:
    workers = []
    for index in range(count):
        out = directory / f"snapshot-{index}.jsonl"
        argv = ["-m", "tests.workers.snapshot_worker", "--url", url, "--key", "cfg"]
        workers.append(Worker(processes.python(*argv, "--out", str(out)), out))
    return workers


def test_a_snapshot_key_is_canaried_halted_and_rolled_back_as_a_whole(
    tmp_path: Path, redis_server: RedisServer, processes: Processes,
    kubelet_mount: KubeletMount,
) -> None:  # fmt: skip
    url = redis_server.url
    kubelet_mount.write({"a": b"1", "b": b"1"})
    watch(processes, kubelet_mount, url, "--snapshot", "cfg", "--canary", "1",
          "--canary-hold", "1")  # fmt: skip
    wait_until(has(url, 1, "cfg"), "v1")
    workers = snapshot_workers(processes, url, tmp_path, 2)
    for worker in workers:
        worker.wait_started()

    def maps() -> list[dict[str, str]]:
        return [w.lines("applied")[-1]["files"] for w in workers]

    kubelet_mount.write({"a": b"2", "b": b"1"})
    wait_until(has(url, 3, "cfg"), "canary and promotion", timeout=30)
    wait_until(lambda: maps() == [{"a": "2", "b": "1"}] * 2, "both on the new map")
    kubelet_mount.write({"a": b"2", "b": b"REJECT"})
    halted = wait_until(has(url, 5, "cfg"), "the halt", timeout=30)[4]
    assert halted["rollout"] == "halt"
    assert maps() == [{"a": "2", "b": "1"}] * 2
    assert cli(url, "rollback", "cfg").returncode == 0
    wait_until(lambda: maps() == [{"a": "1", "b": "1"}] * 2, "both rolled back")


@pytest.mark.timeout(180)
def test_three_daemons_and_real_workers_write_one_entry_per_decision(
    tmp_path: Path, redis_server: RedisServer, processes: Processes
) -> None:
    url = redis_server.url
    mounts = [KubeletMount(tmp_path / f"pod-{i}" / "config") for i in range(3)]
    for mount in mounts:
        mount.write({KEY: b"n: 1"})
    for i, mount in enumerate(mounts):
        start_daemon(
            processes, mount.directory.parent, url, mount.directory, "--canary", "2",
            "--canary-hold", "1", env={"HOSTNAME": f"pod-{i}"}, log_level="INFO",
        )  # fmt: skip
    wait_until(has(url, 1), "v1")
    workers = spawn_workers(processes, url, KEY, tmp_path, 4, "--heartbeat", "0.3")
    for worker in workers:
        worker.wait_started()
    for content, decided in ((b"n: 2", 3), (b"n: REJECT", 5)):
        for mount in mounts:
            mount.write({KEY: content})
        wait_until(has(url, decided), f"{content!r} decided", timeout=30)
    wait_until(lambda: running(workers, "n: 2"), "everyone on n: 2 after the halt")
    done = cli(url, "rollback", KEY)
    assert done.returncode == 0, done.stderr
    wait_until(lambda: running(workers, "n: 1"), "everyone rolled back")
    time.sleep(2)  # every daemon has had its chance to write a second entry
    kinds = [e.get("rollout", "") for e in entries(url)]
    assert kinds == ["", "canary", "promote", "canary", "halt", "rollback"], kinds
