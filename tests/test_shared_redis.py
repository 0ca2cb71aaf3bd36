"""Two pods on one shared Redis (TCP), each with its own daemon, ConfigMap mount and workers.

The user story of a shared Redis: kubelets on the two nodes update their mounts at different
times, yet the stream gets one entry per change, every worker of both pods applies it from
Redis as soon as the first pod publishes it, and one ``hotreload status`` / ``wait`` sees
every worker of every pod (worker ids are ``$HOSTNAME:pid``) -- including a rejection.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from publisher.cli import main as cli
from subscriber._redis import connect
from subscriber.protocol import sha256_hex
from subscriber.testing import RedisServer
from tests.conftest import KubeletMount, Processes
from tests.helpers import events, start_daemon, wait_until
from tests.workers.harness import Worker

KEY = "app.yaml"
PODS = ("pod-a", "pod-b")


def start_pod(
    processes: Processes, root: Path, pod: str, url: str, mount: KubeletMount
) -> list[Worker]:
    """The pod's daemon (on its own mount) and two workers (threaded, asyncio)."""
    env = {"HOSTNAME": pod}
    start_daemon(
        processes, root, url, mount.directory, name=f"{pod}-daemon", env=env, log_level="INFO"
    )
    workers = []
    for index, kind in enumerate(([], ["--async"])):
        out = root / f"{pod}-{index}.jsonl"
        argv = ["-m", "tests.workers.subscriber_worker", "--url", url, "--key", KEY,
                "--out", str(out), "--block-ms", "1000", "--heartbeat", "1.0", *kind]  # fmt: skip
        with Path(f"{out}.log").open("wb") as log:
            process = processes.python(*argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        workers.append(Worker(process, out))
    return workers


def status(capsys: pytest.CaptureFixture[str], url: str) -> dict[str, Any]:
    capsys.readouterr()
    assert cli(["status", KEY, "--redis", url, "--json"]) in (0, 1)
    data: dict[str, Any] = json.loads(capsys.readouterr().out)
    return data


def wait(url: str, content: bytes, timeout: float = 20) -> int:
    """``hotreload wait --sha256``: the version carrying ``content``, waited for if not
    published yet (the change was just made; a daemon publishes it within moments)."""
    digest = sha256_hex(content)
    return cli(["wait", KEY, "--redis", url, "--sha256", digest, "--timeout", str(timeout)])


@pytest.mark.slow
def test_two_pods_one_redis_one_entry_per_change_and_one_view_of_every_worker(
    redis_tcp: RedisServer, processes: Processes, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    url = redis_tcp.url
    mounts = {pod: KubeletMount(tmp_path / pod / "config") for pod in PODS}
    for mount in mounts.values():
        mount.write({KEY: b"limit: 1\n"})
    workers = {pod: start_pod(processes, tmp_path, pod, url, mounts[pod]) for pod in PODS}
    everyone = [worker for pod in PODS for worker in workers[pod]]
    for worker in everyone:
        assert worker.wait_started()["event"] == "started", worker.log()
    client = connect(url, socket_timeout=5)
    try:
        assert wait(url, b"limit: 1\n") == 0
        # pod-a's kubelet syncs first: every worker of both pods applies v2 from Redis while
        # pod-b's mount still shows v1
        mounts["pod-a"].set(KEY, b"limit: 2\n")
        assert wait(url, b"limit: 2\n") == 0
        assert all(worker.last_applied() == "limit: 2\n" for worker in everyone)
        assert mounts["pod-b"].path(KEY).read_bytes() == b"limit: 1\n"
        mounts["pod-b"].set(KEY, b"limit: 2\n")  # pod-b catches up: nothing new to publish
        pod_b_log = tmp_path / "pod-b-daemon.log"
        wait_until(lambda: "skipped app.yaml: already published as v2" in pod_b_log.read_text(),
                   "pod-b's daemon caught up")  # fmt: skip

        # a rejected change is reported by every worker of every pod; wait exits 1
        mounts["pod-b"].set(KEY, b"REJECT\n")
        assert wait(url, b"REJECT\n") == 1
        data = status(capsys, url)
        rows = [row for row in data["workers"] if row["live"]]
        assert {row["worker"].split(":")[0] for row in rows} == set(PODS)
        assert len(rows) == len(everyone)
        wait_until(lambda: all(row["status"] == "rejected" for row in
                               status(capsys, url)["workers"] if row["live"]),
                   "every worker reports the rejection")  # fmt: skip
        assert all(worker.last_applied() == "limit: 2\n" for worker in everyone)

        mounts["pod-a"].set(KEY, b"REJECT\n")  # the other kubelet shows it too: no new entry
        pod_a_log = tmp_path / "pod-a-daemon.log"
        wait_until(lambda: "skipped app.yaml: already published as v3" in pod_a_log.read_text(),
                   "pod-a's daemon caught up")  # fmt: skip
        # the fix, gated by its file the way a pipeline would after `kubectl apply`
        fixed = tmp_path / "fixed.yaml"
        fixed.write_bytes(b"limit: 4\n")
        mounts["pod-a"].set(KEY, b"limit: 4\n")
        mounts["pod-b"].set(KEY, b"limit: 4\n")
        assert cli(["wait", KEY, "--redis", url, "--file", str(fixed), "--timeout", "20"]) == 0
        [summary] = status(capsys, url)["summary"]
        assert summary["converged"], summary
        published = events(client, KEY)
        assert [e.content for e in published] == [b"limit: 1\n", b"limit: 2\n", b"REJECT\n",
                                                  b"limit: 4\n"]  # fmt: skip
        assert [e.version for e in published] == [1, 2, 3, 4]
    finally:
        client.close()
