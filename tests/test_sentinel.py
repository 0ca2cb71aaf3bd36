"""``redis+sentinel://`` URLs against a real master, replica and three sentinels on loopback.

The master is SIGKILLed; once the sentinels promoted the replica, subscribers (threaded and
asyncio) apply the next change with no operator action.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import pytest
import redis

from publisher.cli import main as cli
from subscriber import AsyncSubscriber, Subscriber
from subscriber._redis import connect
from subscriber._sentinel import master
from subscriber._target import parse
from subscriber._testing_nodes import stream_problem
from subscriber.errors import ConfigurationError
from subscriber.keys import stream_keys
from subscriber.testing import RedisServer, append_event, free_port
from tests.conftest import KubeletMount, Processes
from tests.helpers import start_daemon, wait_until

KEY = "app.yaml"
SERVICE = "hotreload"


class SentinelSetup:
    """A master and a replica (TCP, loopback) watched by three sentinels, all stopped by PID."""

    def __init__(self, root: Path, processes: Processes) -> None:
        self.master = RedisServer(root / "master", unix=False).start()
        self.replica = RedisServer(
            root / "replica", unix=False,
            extra_args=("--replicaof", "127.0.0.1", str(self.master.port)),
        ).start()  # fmt: skip
        # the replica's link up is not enough: after a diskless sync Redis 7.0 streams writes
        # only from the replica's first ACK, up to a second later (subscriber._testing_nodes
        # stream_problem); a failover before that loses what was written meanwhile
        wait_until(self._streaming, "the master streams its writes to the replica", 20)
        self.ports: list[int] = []
        for index in range(3):
            port = free_port()
            conf = root / f"sentinel-{index}.conf"  # sentinels rewrite their config file
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {root}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                f"sentinel failover-timeout {SERVICE} 5000\n"
            )
            processes.spawn(
                ["redis-server", str(conf), "--sentinel"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            self.ports.append(port)
        wait_until(self._sentinels_see_the_replica, "sentinels see master and replica", 20)

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.ports)
        return f"redis+sentinel://{hosts}/{SERVICE}"

    def current_master(self) -> str | None:
        """The master's URL as the sentinels tell it now (``None`` while none is up)."""
        try:
            return master(parse(self.url), timeout=1).url
        except redis.ConnectionError:  # MasterNotFoundError: down, not yet failed over
            return None

    def _streaming(self) -> bool:
        client = connect(self.master.url, socket_timeout=2)
        try:
            return stream_problem(client, self.master.url, 1) is None
        finally:
            client.close()

    def _sentinels_see_the_replica(self) -> bool:
        for port in self.ports:
            client = redis.Redis(port=port, socket_timeout=1)
            try:
                replicas = client.sentinel_slaves(SERVICE)
                if not replicas or "s_down" in replicas[0].get("flags", ""):
                    return False
            except redis.RedisError:
                return False
            finally:
                client.close()
        return True

    def stop(self) -> None:
        self.replica.stop()
        self.master.stop()


@pytest.fixture
def sentinel(tmp_path: Path, processes: Processes) -> Iterator[SentinelSetup]:
    setup = SentinelSetup(tmp_path, processes)
    try:
        yield setup
    finally:
        setup.stop()  # the sentinels are stopped by the processes fixture


def test_sentinel_urls_are_parsed_or_refused_in_one_line() -> None:
    target = parse("redis+sentinel://app:p%40ss@s1:26380,s2,[::1]:5000/mymaster/2"
                   "?sentinel_password=x")  # fmt: skip
    assert target.sentinels == (("s1", 26380), ("s2", 26379), ("::1", 5000))
    assert (target.service, target.db, target.password) == ("mymaster", 2, "p@ss")
    assert target.master("10.0.0.7", 6379).url == "redis://app:p%40ss@10.0.0.7:6379/2"
    for bad, says in [
        ("redis+sentinel://s1:abc/m", "not a number"),
        ("redis+sentinel://s1", "no service name"),
        ("redis+sentinel:///m", "no sentinel host"),
        ("redis+sentinel://s1/m/x", "database 'x'"),
        ("redis+sentinel://s1/m?ssl_ca_certs=/x", "unknown option"),
    ]:
        with pytest.raises(ConfigurationError, match=says):
            parse(bad)
    with pytest.raises(ConfigurationError) as refused:
        parse("redis+sentinel://app:topsecret@s1/m/x?sentinel_password=hidden")
    assert "topsecret" not in str(refused.value)
    assert "hidden" not in str(refused.value)


def follow_a_failover(
    sentinel: SentinelSetup, fail: Callable[[], None], *, block_ms: int, timeout: float
) -> list[str]:
    """A threaded and an asyncio subscriber on the sentinels' master; ``fail`` it once both
    run v1, wait until the replica is promoted, publish v2 there. Returns what the threaded
    one applied, once both run v2."""
    append_event(sentinel.master.url, KEY, b"n: 1\n", version=1)
    seen: list[str] = []
    threaded = Subscriber(KEY, seen.append, redis_url=sentinel.url, block_ms=block_ms)
    threaded.start()

    async def scenario() -> int:
        async with AsyncSubscriber(
            KEY, lambda _c: None, redis_url=sentinel.url, block_ms=block_ms
        ) as sub:
            assert sub.version == 1
            await asyncio.sleep(0.3)  # both blocked in XREAD on the master by now
            fail()
            promoted = f"redis://127.0.0.1:{sentinel.replica.port}/0"
            await asyncio.to_thread(
                wait_until, lambda: sentinel.current_master() == promoted,
                "the sentinels promoted the replica", 30,
            )  # fmt: skip
            await asyncio.to_thread(append_event, promoted, KEY, b"n: 2\n", version=2)
            await asyncio.to_thread(wait_until, lambda: sub.version == 2, "async on v2", timeout)
            return sub.version

    try:
        assert asyncio.run(scenario()) == 2
        wait_until(lambda: threaded.version == 2, "threaded subscriber on v2", timeout)
    finally:
        threaded.stop()
    return seen


@pytest.mark.slow
def test_subscribers_follow_the_master_the_sentinels_promote(sentinel: SentinelSetup) -> None:
    assert (
        master(parse(sentinel.url), timeout=1).url == f"redis://127.0.0.1:{sentinel.master.port}/0"
    )
    seen = follow_a_failover(sentinel, sentinel.master.kill, block_ms=500, timeout=20)
    assert seen == ["n: 1\n", "n: 2\n"]


@pytest.mark.slow
def test_the_daemon_and_the_cli_follow_the_promoted_master(
    sentinel: SentinelSetup, kubelet_mount: KubeletMount, processes: Processes, tmp_path: Path
) -> None:
    kubelet_mount.write({KEY: b"rev: 1\n"})
    # metrics on (a free port), so the ack follower runs through the sentinels too
    daemon = start_daemon(
        processes, tmp_path, sentinel.url, kubelet_mount.directory, metrics_port=free_port()
    )
    old = sentinel.master.url
    wait_until(lambda: newest(old) == b"rev: 1\n", "rev: 1 published through the sentinels")
    assert cli(["history", KEY, "--redis", sentinel.url]) == 0

    sentinel.master.kill()
    promoted = f"redis://127.0.0.1:{sentinel.replica.port}/0"
    wait_until(lambda: sentinel.current_master() == promoted, "replica promoted", 30)
    kubelet_mount.set(KEY, b"rev: 2\n")
    wait_until(lambda: newest(promoted) == b"rev: 2\n", "rev: 2 on the promoted master", 30)
    assert cli(["wait", KEY, "--redis", sentinel.url, "--timeout", "0.5"]) == 2  # no workers
    assert "Traceback" not in daemon.output()


def newest(url: str) -> bytes | None:
    client = connect(url, socket_timeout=2)
    try:
        entries = cast(
            "list[tuple[bytes, dict[bytes, bytes]]]",
            client.xrevrange(stream_keys(KEY).events, count=1),
        )
    except redis.RedisError:
        return None
    finally:
        client.close()
    return entries[0][1][b"content"] if entries else None


@pytest.mark.slow
def test_subscribers_follow_a_sentinel_failover_whose_old_master_stays_up(
    sentinel: SentinelSetup,
) -> None:
    """SENTINEL FAILOVER: the old master is demoted, not killed; blocked reads are answered
    UNBLOCKED (or the next write READONLY) and the subscribers ask the sentinels again."""

    def sentinel_failover() -> None:
        asker = redis.Redis(port=sentinel.ports[0], socket_timeout=5)
        asker.execute_command("SENTINEL", "FAILOVER", SERVICE)  # type: ignore[no-untyped-call]
        asker.close()

    follow_a_failover(sentinel, sentinel_failover, block_ms=30_000, timeout=15)
