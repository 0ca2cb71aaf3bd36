"""Shared fixtures: private redis-server processes and clusters, a client of the private
server, kubelet mounts, subprocesses stopped by PID. Plain helpers are in tests/helpers.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from subscriber._redis import connect
from subscriber.testing import RedisCluster, RedisServer
from tests._vendor.k8s_atomic_writer import atomic_write

REPO = Path(__file__).resolve().parents[1]


class KubeletMount:
    """A ConfigMap volume directory updated exactly the way kubelet's AtomicWriter does."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.payload: dict[str, bytes] = {}

    def write(self, payload: dict[str, bytes]) -> dict[str, object]:
        """Replace the whole key set (keys missing from ``payload`` are removed)."""
        self.payload = dict(payload)
        summary: dict[str, object] = atomic_write(str(self.directory), self.payload)
        return summary

    def update(self, **changes: bytes) -> dict[str, object]:
        """Change some keys, keep the others (keys use '_' for '.' is not done: pass a dict)."""
        return self.write({**self.payload, **changes})

    def set(self, key: str, content: bytes) -> dict[str, object]:
        return self.write({**self.payload, key: content})

    def path(self, key: str) -> Path:
        return self.directory / key


@pytest.fixture
def kubelet_mount(tmp_path: Path) -> KubeletMount:
    return KubeletMount(tmp_path / "config")


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private redis-server on a unix socket in a temp dir, stopped by PID afterwards."""
    # unix socket paths are limited to 107 bytes: keep the directory short
    directory = Path(tmp_path_factory.mktemp("redis", numbered=True))
    server = RedisServer(directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A connection to ``redis_server`` (5 s socket timeout), closed afterwards."""
    c = connect(redis_server.url, socket_timeout=5)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def redis_tcp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private redis-server on a free loopback port (never 6379)."""
    server = RedisServer(tmp_path_factory.mktemp("redis-tcp"), unix=False)
    assert server.port != 6379
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A real 3-master + 3-replica Redis Cluster on loopback (about 3 s to start), for tests
    that kill, freeze or restart nodes; every process is stopped by PID afterwards."""
    cluster = RedisCluster(tmp_path_factory.mktemp("cluster"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def redis_cluster_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """One cluster shared by a module's tests: only for tests that leave it healthy."""
    cluster = RedisCluster(tmp_path_factory.mktemp("cluster-module"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


class Processes:
    """Starts subprocesses and guarantees each is stopped by PID when the test ends."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []

    def python(self, *args: str, **kwargs: object) -> subprocess.Popen[bytes]:
        return self.spawn([sys.executable, *args], **kwargs)

    def spawn(self, argv: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        env = {**os.environ, "PYTHONPATH": str(REPO), **kwargs.pop("env", {})}  # type: ignore[dict-item]
        process = subprocess.Popen(argv, env=env, **kwargs)  # type: ignore[call-overload]
        self.started.append(process)
        return process  # type: ignore[no-any-return]

    def stop_all(self) -> None:
        for process in self.started:
            if process.poll() is None:
                try:
                    os.kill(process.pid, signal.SIGCONT)
                    process.terminate()
                    process.wait(5)
                except (subprocess.TimeoutExpired, ProcessLookupError):
                    process.kill()
                    process.wait(5)


@pytest.fixture
def processes() -> Iterator[Processes]:
    procs = Processes()
    try:
        yield procs
    finally:
        procs.stop_all()
