"""Three pods sharing one Redis: three real daemons, each watching its own kubelet mount.

Kubelets on different nodes update their copies of a ConfigMap seconds apart, and a slow one
may never show some versions at all. Every daemon publishes what its mount shows; the stream
must still hold each distinct change once, in order, versions 1..N, and never an older content
over a newer one (a rollback every worker would apply) — also when every daemon reconnects to
Redis and publishes every key again while a mount lags.

``SlowKubelet`` plays a slow node: change i of the ConfigMap becomes visible to it some delay
after it was applied, it syncs every ``period`` seconds, shows the newest change visible then
(skipping older ones it never synced) and never goes back. The fast node's mount is updated
by the test itself, and each change is published before the next one is applied (a change no
daemon ever published cannot be ordered by anyone).
"""

from __future__ import annotations

import os
import random
import re
import signal
import threading
import time
from functools import partial
from pathlib import Path

import pytest
import redis

from subscriber._redis import connect
from subscriber.keys import stream_keys
from subscriber.testing import RedisServer
from tests.conftest import KubeletMount, Processes
from tests.helpers import DaemonProcess, events, start_daemon, wait_until

KEY = "app.yaml"


def rev(label: str) -> bytes:
    return f"rev: {label}\n".encode()


class Node:
    """One pod: its node's copy of the ConfigMap volume and the daemon watching it."""

    def __init__(self, name: str, mount: KubeletMount, processes: Processes, url: str) -> None:
        self.name = name
        self.mount = mount
        self._processes = processes
        self._url = url
        self.daemon = self._start()

    def _start(self) -> DaemonProcess:
        """The pod's daemon on the mount; its publisher id is ``name:pid`` (HOSTNAME is the pod
        name in Kubernetes)."""
        return start_daemon(
            self._processes, self.mount.directory.parent, self._url, self.mount.directory,
            env={"HOSTNAME": self.name}, log_level="INFO",
        )  # fmt: skip

    def restart(self) -> None:
        """A new daemon in the pod (the last one stopped); it logs after the last one's lines."""
        self.daemon = self._start()

    def output(self) -> str:
        return self.daemon.output()

    def reported(self, version: int) -> bool:
        """Whether a publish of the key ended on entry ``version`` (written, or skipped: found
        or superseded; whatever words the skip line uses around the version)."""
        key = re.escape(KEY)
        pattern = rf"published {key} v{version} |skipped {key}: [^\n]*\bv{version}\b"
        return re.search(pattern, self.output()) is not None

    def publishes(self) -> int:
        """How many publishes of the key ended so far (written or skipped)."""
        return len(re.findall(rf"(?:published|skipped) {re.escape(KEY)}\b", self.output()))

    def freeze(self) -> None:
        os.kill(self.daemon.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.daemon.pid, signal.SIGCONT)

    def started(self) -> bool:
        return "initial publish done" in self.output()

    def lost_redis(self) -> bool:
        return "lost Redis" in self.output()

    def reseeded_after_reconnect(self) -> bool:
        """Reconnected at least once, and published the key after the latest connection."""
        parts = self.output().split("connected to Redis at")
        return (
            len(parts) >= 3
            and re.search(rf"(published|skipped) {re.escape(KEY)}\b", parts[-1]) is not None
        )

    def stop(self) -> int:
        return self.daemon.stop()


def start_node(processes: Processes, tmp_path: Path, url: str, name: str, shown: bytes) -> Node:
    """A pod whose mount shows ``shown``; returns before its daemon's initial publish."""
    mount = KubeletMount(tmp_path / name / "config")
    mount.write({KEY: shown})
    return Node(name, mount, processes, url)


def start_nodes(
    processes: Processes, tmp_path: Path, url: str, initial: bytes, count: int = 3
) -> list[Node]:
    nodes = [start_node(processes, tmp_path, url, f"node{i}", initial) for i in range(1, count + 1)]
    for node in nodes:
        wait_until(node.started, f"{node.name} started")
    return nodes


class ConfigMap:
    """The API object: every change applied so far, with the time it was applied."""

    def __init__(self, initial: bytes) -> None:
        self._lock = threading.Lock()
        self._changes: list[tuple[float, bytes]] = [(time.monotonic(), initial)]

    def apply(self, content: bytes) -> None:
        with self._lock:
            self._changes.append((time.monotonic(), content))

    def changes(self) -> list[tuple[float, bytes]]:
        with self._lock:
            return list(self._changes)

    def distinct(self) -> list[bytes]:
        return [content for _, content in self.changes()]


class SlowKubelet:
    """Updates one node's mount as a kubelet on a slow node would (see the module docstring).

    ``delays``: the range a change's visibility delay is drawn from; ``misses``: indexes of
    changes this node never shows (its syncs fell before and after them).
    """

    def __init__(
        self,
        configmap: ConfigMap,
        node: Node,
        *,
        delays: tuple[float, float],
        period: float,
        misses: frozenset[int] = frozenset(),
        seed: int = 0,
    ) -> None:
        self.configmap = configmap
        self.node = node
        self.delays = delays
        self.period = period
        self.misses = misses
        self.shown: list[int] = [0]  # indexes of the changes the mount has shown
        self._rng = random.Random(seed)
        self._visible_at: list[float] = []
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"kubelet-{node.name}")
        self._thread.start()

    def _sync(self) -> None:
        changes = self.configmap.changes()
        for applied, _ in changes[len(self._visible_at) :]:
            self._visible_at.append(applied + self._rng.uniform(*self.delays))
        now = time.monotonic()
        visible = [i for i, at in enumerate(self._visible_at) if at <= now and i not in self.misses]
        newest = max(visible, default=0)
        if newest > self.shown[-1]:  # a kubelet never goes back to an older version
            self.node.mount.set(KEY, changes[newest][1])
            self.shown.append(newest)

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.period):
                self._sync()
        except BaseException as exc:  # reported by stop()
            self._error = exc

    def caught_up(self) -> bool:
        if self._error is not None:
            raise self._error
        return self.shown[-1] == len(self.configmap.changes()) - 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        if self._error is not None:
            raise self._error


def is_newest(client: redis.Redis, content: bytes) -> bool:
    published = events(client, KEY)
    return bool(published) and published[-1].content == content


def roll_out(
    configmap: ConfigMap, fast: Node, client: redis.Redis, contents: list[bytes], pause: float = 0
) -> None:
    """Apply each change; the fast node shows it at once and its daemon publishes it before
    the next change (``pause``: extra time between changes, so slow nodes can see each)."""
    for content in contents:
        configmap.apply(content)
        fast.mount.set(KEY, content)
        wait_until(partial(is_newest, client, content), f"{content!r} published")
        if pause:
            time.sleep(pause)  # pacing the changes, not waiting for a result


def settle(kubelets: list[SlowKubelet], nodes: list[Node], client: redis.Redis) -> None:
    """Every slow mount shows the last change and every daemon has published it (the last
    change is unique in every scenario: its publish reports that entry's version)."""
    for kubelet in kubelets:
        wait_until(kubelet.caught_up, f"{kubelet.node.name} caught up", timeout=20)
    final = events(client, KEY)[-1].version
    try:
        for node in nodes:
            wait_until(partial(node.reported, final), f"{node.name} reported v{final}")
    except AssertionError as exc:  # e.g. a rollback entry written after the last change
        raise AssertionError(f"{exc}; the stream: {who(client, nodes)}") from None


def who(client: redis.Redis, nodes: list[Node]) -> str:
    names = {str(node.daemon.pid): node.name for node in nodes}
    return ", ".join(
        f"v{e.version} {e.content!r} by {names.get(e.publisher.rsplit(':', 1)[-1], e.publisher)}"
        for e in events(client, KEY)
    )


def assert_one_entry_per_change(
    client: redis.Redis, configmap: ConfigMap, nodes: list[Node]
) -> None:
    published = events(client, KEY)
    expected = configmap.distinct()
    assert [e.content for e in published] == expected, who(client, nodes)
    assert [e.version for e in published] == list(range(1, len(expected) + 1))
    assert published[-1].content == expected[-1]


def stop_kubelets(kubelets: list[SlowKubelet]) -> None:
    for kubelet in kubelets:
        kubelet.stop()


def test_slow_nodes_that_skip_versions_of_a_fast_rollout_publish_nothing_extra(
    redis_server: RedisServer, client: redis.Redis, processes: Processes, tmp_path: Path
) -> None:
    """Changes as fast as the fast node's daemon publishes them; node 2 sees them 0.2-1.5 s
    late (and skips those that its syncs straddle), node 3 later still and never shows
    changes 2, 3 and 5."""
    configmap = ConfigMap(rev("0"))
    nodes = start_nodes(processes, tmp_path, redis_server.url, rev("0"))
    kubelets = [
        SlowKubelet(configmap, nodes[1], delays=(0.2, 1.5), period=0.3, seed=1),
        SlowKubelet(
            configmap, nodes[2], delays=(1.0, 2.5), period=0.2, misses=frozenset({2, 3, 5}), seed=2
        ),
    ]
    try:
        roll_out(configmap, nodes[0], client, [rev(str(i)) for i in range(1, 8)])
        roll_out(configmap, nodes[0], client, [rev("final")])
        settle(kubelets, nodes, client)
        assert_one_entry_per_change(client, configmap, nodes)
        assert [node.stop() for node in nodes] == [0, 0, 0]
    finally:
        stop_kubelets(kubelets)


def test_slow_nodes_that_see_every_version_late_including_reverts_publish_nothing_extra(
    redis_server: RedisServer, client: redis.Redis, processes: Processes, tmp_path: Path
) -> None:
    """X -> Y -> X -> Y -> Z -> Y: node 2 shows each change 0.5 s late, node 3 1.5 s late, so
    the slow daemons are handed contents that are in the history, some of them several
    times, while the newest entry is another one."""
    x, y, z = rev("x"), rev("y"), rev("z")
    configmap = ConfigMap(x)
    nodes = start_nodes(processes, tmp_path, redis_server.url, x)
    kubelets = [
        SlowKubelet(configmap, nodes[1], delays=(0.5, 0.5), period=0.05),
        SlowKubelet(configmap, nodes[2], delays=(1.5, 1.5), period=0.05),
    ]
    try:
        roll_out(configmap, nodes[0], client, [y, x, y, z, y, rev("final")], pause=0.3)
        settle(kubelets, nodes, client)
        assert_one_entry_per_change(client, configmap, nodes)
        assert [node.stop() for node in nodes] == [0, 0, 0]
    finally:
        stop_kubelets(kubelets)


def lagging_nodes(configmap: ConfigMap, nodes: list[Node], client: redis.Redis) -> list[bytes]:
    """X -> Y -> Z on the fast node; node 2 stops at Y, node 3 at X (both reported)."""
    x, y, z = configmap.distinct()[0], rev("y"), rev("z")
    roll_out(configmap, nodes[0], client, [y])
    nodes[1].mount.set(KEY, y)
    wait_until(lambda: nodes[1].reported(2), "node2 saw Y")
    roll_out(configmap, nodes[0], client, [z])
    return [x, y, z]


def finish(configmap: ConfigMap, nodes: list[Node], client: redis.Redis) -> None:
    """The lagging mounts catch up, one more change reaches every node; then the stream holds
    one entry per change and every daemon stops cleanly."""
    for node in nodes[1:]:
        node.mount.set(KEY, configmap.distinct()[-1])
    roll_out(configmap, nodes[0], client, [rev("final")])
    for node in nodes[1:]:
        node.mount.set(KEY, rev("final"))
    settle([], nodes, client)
    assert_one_entry_per_change(client, configmap, nodes)
    assert [node.stop() for node in nodes] == [0] * len(nodes)


def test_killed_redis_connections_while_mounts_lag_publish_no_rollback(
    redis_server: RedisServer, processes: Processes, tmp_path: Path
) -> None:
    """CLIENT KILL TYPE normal drops every daemon's connection while node 2 shows Y and node
    3 X, Z being the newest; then node 3's mount moves on to Y.

    redis-py replaces a connection the server closed while it was idle without raising (the
    pool checks it before handing it out), so the daemons carry on over new connections
    without noticing; the restart test below is the one where they all reconnect and publish
    every key again."""
    admin = connect(redis_server.url, socket_timeout=5)  # CLIENT KILL skips its caller
    configmap = ConfigMap(rev("x"))
    nodes = start_nodes(processes, tmp_path, redis_server.url, rev("x"))
    try:
        x, y, z = lagging_nodes(configmap, nodes, admin)
        before = max(int(c["id"]) for c in admin.client_list())
        assert admin.client_kill_filter(_type="normal") >= len(nodes)

        def reconnected() -> bool:
            clients = admin.client_list()
            fresh = [c for c in clients if int(c["id"]) > before]
            return sum(c["name"].startswith("hotreload-pub:") for c in fresh) >= len(nodes)

        wait_until(reconnected, "every daemon on a new connection")
        nodes[2].mount.set(KEY, y)
        wait_until(lambda: nodes[2].reported(2), "node3 saw Y")
        assert [e.content for e in events(admin, KEY)] == [x, y, z], who(admin, nodes)
        finish(configmap, nodes, admin)
    finally:
        admin.close()


def test_redis_restarted_with_its_data_while_mounts_lag_every_daemon_reseeds_without_rollback(
    processes: Processes, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Every daemon loses Redis (restarted with its AOF: the stream stays), then reconnects
    and publishes every key again, node 2 showing Y and node 3 X while Z is the newest, and
    node 3's mount moving on to Y while Redis was away."""
    server = RedisServer(tmp_path_factory.mktemp("aof"), appendonly=True).start()
    client = connect(server.url, socket_timeout=5)
    try:
        configmap = ConfigMap(rev("x"))
        nodes = start_nodes(processes, tmp_path, server.url, rev("x"))
        x, y, z = lagging_nodes(configmap, nodes, client)
        server.stop()
        for node in nodes:
            wait_until(node.lost_redis, f"{node.name} lost Redis")
        nodes[2].mount.set(KEY, y)
        server.start()
        for node in nodes:
            wait_until(node.reseeded_after_reconnect, f"{node.name} re-seeded", timeout=15)
        assert [e.content for e in events(client, KEY)] == [x, y, z], who(client, nodes)
        finish(configmap, nodes, client)
    finally:
        client.close()
        server.stop()


def test_redis_restarted_empty_is_reseeded_once_with_the_newest_content(
    redis_server: RedisServer, processes: Processes, tmp_path: Path
) -> None:
    """Three daemons re-seed the same content into an empty Redis: one entry, numbered on
    from the versions the daemons had seen; the other two find it and write nothing."""
    x, y, z = rev("x"), rev("y"), rev("z")
    configmap = ConfigMap(x)
    nodes = start_nodes(processes, tmp_path, redis_server.url, x)
    client = connect(redis_server.url, socket_timeout=5)
    try:
        for content in (y, z):
            roll_out(configmap, nodes[0], client, [content])
            for node in nodes[1:]:
                node.mount.set(KEY, content)
        wait_until(lambda: all(node.reported(3) for node in nodes), "every node saw Z")
    finally:
        client.close()
    redis_server.kill()
    for node in nodes:  # down until every daemon noticed: all of them reconnect and re-seed
        wait_until(node.lost_redis, f"{node.name} lost Redis")
    redis_server.start()
    client = connect(redis_server.url, socket_timeout=5)
    try:
        for node in nodes:
            wait_until(node.reseeded_after_reconnect, f"{node.name} re-seeded", timeout=20)
        [event] = events(client, KEY)
        assert (event.content, event.version) == (z, 4), who(client, nodes)
        assert client.exists(stream_keys(KEY).events)
    finally:
        client.close()
    assert [node.stop() for node in nodes] == [0, 0, 0]


def published_since(node: Node, count: int) -> bool:
    return node.publishes() > count


def test_redis_restarted_empty_while_mounts_lag_publishes_no_rollback(
    redis_server: RedisServer, processes: Processes, tmp_path: Path
) -> None:
    """Redis restarts EMPTY while node 2 shows Y and node 3 X, Z being the newest, and the
    up-to-date node re-seeds first (nodes 2 and 3 are frozen while Redis comes back, so the
    order is the one that rolled back: their base entries are gone, and compared with the
    newest alone their X and Y differ from Z). They re-seed nothing; their mounts then catch
    up with Z (nothing written) and one more change reaches every node.

    The other order, a lagging daemon re-seeding the empty Redis first, writes its older
    content (an empty stream takes whatever comes) and the up-to-date one restores Z over
    it: see tests/test_publish.py."""
    x = rev("x")
    configmap = ConfigMap(x)
    nodes = start_nodes(processes, tmp_path, redis_server.url, x)
    fast, lagging = nodes[0], nodes[1:]
    client = connect(redis_server.url, socket_timeout=5)
    try:
        _, _, z = lagging_nodes(configmap, nodes, client)
    finally:
        client.close()
    redis_server.kill()
    for node in nodes:  # every daemon noticed: all of them reconnect and re-seed
        wait_until(node.lost_redis, f"{node.name} lost Redis")
    for node in lagging:
        node.freeze()
    try:
        redis_server.start()
        wait_until(fast.reseeded_after_reconnect, "node1 re-seeded", timeout=20)
    finally:
        for node in lagging:
            node.thaw()
    client = connect(redis_server.url, socket_timeout=5)
    try:
        for node in lagging:
            wait_until(node.reseeded_after_reconnect, f"{node.name} re-seeded", timeout=20)
        reseeded = [(e.content, e.version) for e in events(client, KEY)]
        assert reseeded == [(z, 4)], who(client, nodes)
        for node in lagging:  # their kubelets catch up
            done = node.publishes()
            node.mount.set(KEY, z)
            wait_until(partial(published_since, node, done), f"{node.name} published Z")
        assert [(e.content, e.version) for e in events(client, KEY)] == [(z, 4)]
        final = rev("final")
        roll_out(configmap, fast, client, [final])
        for node in lagging:
            node.mount.set(KEY, final)
        settle([], nodes, client)
        published = events(client, KEY)
        assert [(e.content, e.version) for e in published] == [(z, 4), (final, 5)], who(
            client, nodes
        )
        assert published[-1].content == configmap.distinct()[-1]
    finally:
        client.close()
    assert [node.stop() for node in nodes] == [0, 0, 0]


def test_a_daemon_starting_on_a_lagging_mount_publishes_nothing_and_catches_up_silently(
    redis_server: RedisServer, client: redis.Redis, processes: Processes, tmp_path: Path
) -> None:
    """A pod scaled up (or restarted) while its kubelet still shows X, Y and Z having been
    published by the other pods: its daemon's first publish has no base to compare with, and
    must not put X back on top. Its kubelet then catches up through Y to Z: nothing new."""
    x, y, z = rev("x"), rev("y"), rev("z")
    configmap = ConfigMap(x)
    nodes = start_nodes(processes, tmp_path, redis_server.url, x)
    roll_out(configmap, nodes[0], client, [y, z])
    for node in nodes[1:]:
        node.mount.set(KEY, z)
    late = start_node(processes, tmp_path, redis_server.url, "node4", x)
    nodes.append(late)
    wait_until(late.started, "node4 started")
    assert "skipped app.yaml: superseded by v3" in late.output(), late.output()
    assert [e.content for e in events(client, KEY)] == [x, y, z], who(client, nodes)
    for content, version in ((y, 2), (z, 3)):  # its kubelet catches up
        done = late.publishes()
        late.mount.set(KEY, content)
        wait_until(partial(published_since, late, done), f"node4 published {content!r}")
        assert late.reported(version), late.output()
    assert "published app.yaml" not in late.output()
    assert [e.content for e in events(client, KEY)] == [x, y, z], who(client, nodes)
    roll_out(configmap, nodes[0], client, [rev("final")])
    for node in nodes[1:]:
        node.mount.set(KEY, rev("final"))
    settle([], nodes, client)
    assert_one_entry_per_change(client, configmap, nodes)
    assert [node.stop() for node in nodes] == [0] * len(nodes)


def test_a_daemon_restarted_in_its_pod_after_a_revert_publishes_the_revert(
    redis_server: RedisServer, client: redis.Redis, processes: Processes, tmp_path: Path
) -> None:
    """node1's daemon published Y, then restarted while the ConfigMap went back to X: its own
    pod wrote every entry after X's, so X is a revert, not a lagging mount, and is published
    (before the other kubelets show it); the other daemons then find it."""
    x, y = rev("x"), rev("y")
    configmap = ConfigMap(x)
    nodes = start_nodes(processes, tmp_path, redis_server.url, x)
    fast = nodes[0]
    roll_out(configmap, fast, client, [y])
    for node in nodes[1:]:
        node.mount.set(KEY, y)
        wait_until(partial(node.reported, 2), f"{node.name} saw Y")
    assert fast.stop() == 0
    configmap.apply(x)
    fast.mount.set(KEY, x)
    fast.restart()
    wait_until(partial(is_newest, client, x), "the revert published")
    assert [(e.content, e.version) for e in events(client, KEY)] == [(x, 1), (y, 2), (x, 3)]
    for node in nodes[1:]:
        node.mount.set(KEY, x)
    settle([], nodes, client)
    assert_one_entry_per_change(client, configmap, nodes)
    assert [node.stop() for node in nodes] == [0, 0, 0]
