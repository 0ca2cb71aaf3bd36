"""A kubelet swap found by an idle daemon is published on the watcher's thread (``_delivered``).

In process (the thread that publishes is what is tested), a real redis-server and a mount
written the way kubelet writes it.
"""

from __future__ import annotations

import threading
import time

import redis

from publisher.daemon import Daemon
from publisher.publish import PublishResult
from subscriber.testing import RedisServer
from tests.conftest import KubeletMount
from tests.helpers import LOOP, events, running, wait_until


def test_an_idle_daemon_publishes_a_swap_on_the_thread_that_found_it(
    kubelet_mount: KubeletMount, redis_server: RedisServer, client: redis.Redis
) -> None:
    kubelet_mount.write({"app.yaml": b"rev: 0\n"})
    threads: list[tuple[int, str]] = []

    def on_publish(result: PublishResult) -> None:
        threads.append((result.version, threading.current_thread().name))

    daemon = Daemon([kubelet_mount.directory], redis_url=redis_server.url, on_publish=on_publish)
    with running(daemon):
        wait_until(lambda: daemon.ready()[0])
        for i in range(1, 21):
            kubelet_mount.set("app.yaml", f"rev: {i}\n".encode())
            wait_until(lambda i=i: len(events(client, "app.yaml")) == i + 1)  # type: ignore[misc]
    published = events(client, "app.yaml")
    assert [e.content for e in published] == [f"rev: {i}\n".encode() for i in range(21)]
    assert [e.version for e in published] == list(range(1, 22))
    # the first publish is the loop's; a swap the loop was busy for (a check) is too: most are
    # not (session 7: 7-10 of 10 here, the loop then read the floors as kubelet wrote; before
    # that: none; the floor's request is now sent on watchdog's thread: publisher._earlyfloor)
    assert threads[0] == (1, LOOP)
    assert sum(name != LOOP for _, name in threads[1:]) >= 5, threads


def _recording(kubelet_mount: KubeletMount, redis_server: RedisServer) -> tuple[Daemon, list[str]]:
    """A daemon of one key (rev 0) and the names of the threads its publishes ran on."""
    kubelet_mount.write({"app.yaml": b"rev: 0\n"})
    threads: list[str] = []
    daemon = Daemon(
        [kubelet_mount.directory],
        redis_url=redis_server.url,
        on_publish=lambda _result: threads.append(threading.current_thread().name),
    )
    return daemon, threads


def test_a_swap_is_published_on_the_thread_that_saw_the_rename(
    kubelet_mount: KubeletMount, redis_server: RedisServer, client: redis.Redis
) -> None:
    """Not the watcher's worker either (``MountWatcher(swaps_on_event=True)``): no wake-up
    of another thread between kubelet's rename and the ``EVALSHA``."""
    daemon, threads = _recording(kubelet_mount, redis_server)
    with running(daemon):
        wait_until(lambda: daemon._idle is not None)
        for i in range(1, 21):
            kubelet_mount.set("app.yaml", f"rev: {i}\n".encode())
            wait_until(lambda i=i: len(events(client, "app.yaml")) == i + 1)  # type: ignore[misc]
            # the pre-read's look ends before the next swap (0.02 s: the module failed 2 of 4
            # runs on a quiet machine, 4 of 20 swaps left to the watcher's worker)
            time.sleep(0.1)
    assert [e.content for e in events(client, "app.yaml")][-1] == b"rev: 20\n"
    elsewhere = [n for n in threads[1:] if n != LOOP and not n.startswith("hotreload-")]
    assert len(elsewhere) >= 10, threads  # 19-20 of 20 here; before: none


def test_a_redis_error_on_the_watchers_thread_leaves_the_swap_to_the_loop(
    kubelet_mount: KubeletMount, redis_server: RedisServer, client: redis.Redis
) -> None:
    daemon, threads = _recording(kubelet_mount, redis_server)
    with running(daemon):
        wait_until(lambda: daemon.ready()[0])
        wait_until(lambda: daemon._idle is not None)
        client.config_set("maxmemory", 1)  # every write refused: OOM
        try:
            kubelet_mount.set("app.yaml", b"rev: 1\n")
            wait_until(lambda: daemon.metrics.errors.labels("app.yaml", "redis")._value.get() >= 2)
            assert len(events(client, "app.yaml")) == 1
            kubelet_mount.set("app.yaml", b"rev: 2\n")  # while the loop backs off
            wait_until(lambda: daemon.metrics.errors.labels("app.yaml", "redis")._value.get() >= 3)
        finally:
            client.config_set("maxmemory", 0)
        wait_until(lambda: len(events(client, "app.yaml")) == 2)
        wait_until(lambda: daemon.keys["app.yaml"].version == 2)
    assert [e.content for e in events(client, "app.yaml")] == [b"rev: 0\n", b"rev: 2\n"]
    assert threads == [LOOP, LOOP]  # the retry is the loop's, after its backoff


def test_stop_ends_publishing_on_the_watchers_thread(
    kubelet_mount: KubeletMount, redis_server: RedisServer
) -> None:
    kubelet_mount.write({"app.yaml": b"rev: 0\n"})
    daemon = Daemon([kubelet_mount.directory], redis_url=redis_server.url)
    with running(daemon):
        wait_until(lambda: daemon._idle is not None)
    assert daemon._idle is None  # the loop returned: nothing is published outside it


def test_a_swap_met_by_a_restarted_redis_is_published_and_every_key_put_back(
    kubelet_mount: KubeletMount, redis_server: RedisServer, client: redis.Redis
) -> None:
    kubelet_mount.write({"app.yaml": b"rev: 0\n", "other.yaml": b"o: 0\n"})
    daemon = Daemon([kubelet_mount.directory], redis_url=redis_server.url)
    with running(daemon):
        wait_until(lambda: daemon._idle is not None and daemon.ready()[0])
        redis_server.kill()  # no save: back empty, the daemon's connection dead
        redis_server.start()
        kubelet_mount.set("app.yaml", b"rev: 1\n")  # met on the watcher's thread, or the loop's
        wait_until(lambda: [e.content for e in events(client, "app.yaml")] == [b"rev: 1\n"])
        wait_until(lambda: [e.content for e in events(client, "other.yaml")] == [b"o: 0\n"])
