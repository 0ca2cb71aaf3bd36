"""Shared fixtures: private redis-server processes and clusters, a client of the private
server, kubelet mounts, subprocesses stopped by PID. Plain helpers are in tests/helpers.py.

Also how ``make test`` runs the suite in parallel (pytest-xdist, ``--dist loadgroup``): the
tests of a module sharing a module-scoped fixture stay on one worker, and the ``quiet``
tests (``QUIET``) run after the others, alone. See docs/testing.md."""

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

# Tests whose bound load on the machine could break: a wall-clock bound of about a second or
# less, a process's CPU time, or CPU-bound work within a timeout. `make test` runs them
# (`-m quiet`) after the parallel part, alone; a plain `pytest` runs them with the others.
# Keys: file::function (every parameter).
QUIET = {
    "tests/test_aio.py::test_stop_during_start_records_stopped_and_does_not_follow":
        "stop() within 0.1 s",
    "tests/test_hardening_files.py::test_read_file_never_reads_more_than_the_limit":
        "a 1 GiB file refused within 0.5 s",
    "tests/test_hardening_files.py::test_a_growing_file_over_the_limit_is_not_read_on_every_close":
        "the daemon's CPU seconds over 2 s of appends",
    "tests/test_hub.py::test_stopping_one_key_leaves_the_others_following_and_the_last_ends_the_hub":
        "the other keys' change within 1 s",
    "tests/test_subscribers.py::test_stop_is_prompt_even_with_a_long_block_and_records_stopped":
        "stop() within 1 s",
    "tests/test_subscribers.py::test_stop_is_prompt_while_redis_is_frozen": "stop() within 1.5 s",
    "tests/test_subscriber_processes.py::test_fan_out_reaches_every_worker_process":
        "each worker's stop within 1 s",
    "tests/test_subscriber_processes.py::"
    "test_workers_survive_redis_killed_and_restarted_empty_with_near_zero_cpu":
        "the workers' CPU share while Redis is down",
    "tests/test_subscriber_processes.py::"
    "test_workers_detect_a_frozen_redis_and_converge_after_it_thaws":
        "the workers' CPU share while Redis is frozen",
    # 4 subscribers refuse a hostile entry on the connections they read it with: no read may
    # time out, i.e. go its 3.3 s read timeout without a byte. Reading the entry past may take
    # longer (a sync socket's timeout is per recv; an asyncio read, hub or not, counts each
    # piece read or read past, stamped by _aioreplycap), but Redis receives the entry and builds
    # all 4 replies before it sends the first byte of any: 1.8-2.6 s at load 50-60 (measured,
    # either entry). At load 50-80 the 64 MiB test failed 4 times in 17 (threaded 3 of 10,
    # asyncio 1 of 7), each time all 4 readers timing out at once
    "tests/test_reply_cap.py::test_a_huge_entry_costs_a_worker_nothing_and_the_next_one_applies":
        "Redis's 4 replies of 64 MiB begun within the readers' read timeout",
    "tests/test_reply_count.py::"
    "test_an_entry_of_very_many_fields_costs_a_worker_nothing_and_the_next_one_applies":
        "Redis's 4 replies of 600,000 members begun within the readers' read timeout",
    # a 6-node cluster starved of CPU by the parallel part failed over later than the 20 s
    # the test gives every key (once in a fresh-clone run; passes alone)
    "tests/test_cluster_hub.py::test_a_frozen_master_every_key_follows_on_after_the_failover":
        "a frozen master's failover and every key following within 20 s",
    # gunicorn, the daemon and Redis through eight timed steps; under the parallel part the
    # replacement worker's line of step 7 was missing once (not reproduced in 3 concurrent
    # runs alone; seen once on main by a helper too): kept apart while it is looked into
    "tests/test_demo.py::test_demo_walks_through_every_step_and_stops_what_it_started":
        "the demo's steps, each waited for within seconds",
    # the daemon appended the same content twice in a row (sessions 5-7, under load): its
    # first publish numbered from the restored :workers rows -- fixed in session 8 (the first
    # publish waits for rows newer than the server's start, publisher/_restored.py); kept
    # here for its CPU bound over the 1 s outage, which load broke once in 26 runs alone
    "tests/fault/test_faults.py::test_redis_restored_from_an_older_rdb_while_workers_run_newer":
        "a restored Redis, the daemon's republish and 3 workers, checked entry by entry",
    # a swap is published on the watcher's thread only when it finds the loop idle: under
    # the parallel part the loop is busy (reading floors as kubelet writes) more often
    "tests/test_daemon_hop.py::test_an_idle_daemon_publishes_a_swap_on_the_thread_that_found_it":
        "at least 5 of 20 swaps finding the daemon's loop idle",
}  # fmt: skip

_SHARED_SCOPES = frozenset({"class", "module", "package"})


@pytest.hookimpl(tryfirst=True)  # before -m selects and xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the ``QUIET`` tests ``quiet``; when the run is distributed, put the tests of a
    module that use a class-, module- or package-scoped fixture (a cluster, a scan, a TLS
    server, counts reported at the module's end) in one xdist group, so that fixture is made
    once, on one worker."""
    distributed = getattr(config.option, "dist", "no") != "no"
    for item in items:
        path, _, name = item.nodeid.partition("::")
        if QUIET.get(f"{path}::{name.split('[', 1)[0]}"):
            item.add_marker(pytest.mark.quiet)
        if (
            distributed
            and isinstance(item, pytest.Function)
            and any(
                defs and defs[-1].scope in _SHARED_SCOPES
                for defs in item._fixtureinfo.name2fixturedefs.values()
            )
        ):
            item.add_marker(pytest.mark.xdist_group(path))


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
