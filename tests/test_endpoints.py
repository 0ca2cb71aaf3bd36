"""The daemon's /healthz, /readyz and /metrics, with Redis up, down and back."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from subscriber._redis import connect
from subscriber.keys import stream_keys
from subscriber.protocol import Ack, WorkerState, encode_ack, encode_worker_state, now_ms
from subscriber.testing import RedisServer, free_port
from tests.conftest import KubeletMount, Processes
from tests.helpers import start_daemon, wait_until


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        body = exc.read().decode()
        exc.close()
        return exc.code, body
    except OSError:
        return 0, ""


def metrics_containing(port: int, text: str) -> Callable[[], str]:
    """A ``wait_until`` predicate: the /metrics body once it contains ``text``."""

    def probe() -> str:
        status, body = get(port, "/metrics")
        return body if status == 200 and text in body else ""

    return probe


def test_health_readiness_and_metrics_follow_redis(
    kubelet_mount: KubeletMount, redis_server: RedisServer, processes: Processes, tmp_path: Path
) -> None:
    kubelet_mount.write({"app.yaml": b"rev: 0\n", "flags.json": b"{}"})
    port = free_port()
    daemon = start_daemon(
        processes, tmp_path, redis_server.url, kubelet_mount.directory,
        metrics_port=port, log_level="INFO",
    )  # fmt: skip
    wait_until(lambda: get(port, "/readyz") == (200, "ok\n"))
    assert get(port, "/healthz") == (200, "ok\n")
    kubelet_mount.set("app.yaml", b"rev: 1\n")
    metrics = wait_until(
        metrics_containing(port, 'hotreload_published_version{key="app.yaml"} 2.0')
    )
    assert 'hotreload_publishes_total{key="app.yaml"} 2.0' in metrics
    assert 'hotreload_published_version{key="flags.json"} 1.0' in metrics
    assert "hotreload_redis_connected 1.0" in metrics
    assert "rev: 1" not in metrics

    # what workers report back: one converged, one rejecting; a rejection and an applied ack
    client = connect(redis_server.url, socket_timeout=5)
    keys = stream_keys("app.yaml")
    now = now_ms()
    states = [
        WorkerState(worker="w1", status="applied", version=2, heartbeat=now, heartbeat_interval=5),
        WorkerState(
            worker="w2", status="rejected", version=1, rejected_version=2, error="bad",
            heartbeat=now, heartbeat_interval=5,
        ),
    ]  # fmt: skip
    for state in states:
        worker = state.worker
        client.hset(keys.workers, worker, encode_worker_state(state))
    # the worker gauges follow :workers every 10 s (publisher.ackwatch): wait up to two passes
    wait_until(
        metrics_containing(port, 'hotreload_workers{key="app.yaml",state="rejected"} 1.0'),
        timeout=25,
    )
    acks = [
        Ack(worker="w1", version=2, sha256="", status="applied", at=now, published_at=now - 20),
        Ack(worker="w2", version=2, sha256="", status="rejected", error="bad", at=now),
    ]
    # the second copy of w2's rejection is a re-sent ack: counted once
    for ack in [*acks, acks[1]]:
        client.xadd(keys.acks, encode_ack(ack))  # type: ignore[arg-type]
    # a later ack, so that once it is counted every ack before it was read too
    late = Ack(worker="w3", version=2, sha256="", status="applied", at=now, published_at=now - 1)
    client.xadd(keys.acks, encode_ack(late))  # type: ignore[arg-type]
    client.close()
    metrics = wait_until(
        metrics_containing(port, 'hotreload_propagation_seconds_count{key="app.yaml"} 2.0')
    )
    assert 'hotreload_worker_rejections_total{key="app.yaml"} 1.0' in metrics
    assert 'hotreload_workers{key="app.yaml",state="converged"} 1.0' in metrics
    assert 'hotreload_propagation_seconds_bucket{key="app.yaml",le="0.025"} 2.0' in metrics
    assert 'hotreload_propagation_seconds_bucket{key="app.yaml",le="0.01"} 1.0' in metrics

    redis_server.kill()
    wait_until(lambda: get(port, "/readyz") == (503, "Redis is not reachable\n"), timeout=10)
    assert get(port, "/healthz") == (200, "ok\n")  # a Redis outage must not restart the watcher
    assert "hotreload_redis_connected 0.0" in get(port, "/metrics")[1]
    assert get(port, "/nope")[0] == 404

    redis_server.start()
    wait_until(lambda: get(port, "/readyz") == (200, "ok\n"), timeout=15)
    assert "hotreload_redis_reconnects_total 1.0" in get(port, "/metrics")[1]
    assert daemon.stop() == 0
    assert get(port, "/healthz")[0] == 0  # the port is closed after exit
