"""``hotreload watch`` as a real process against a real redis-server and kubelet-style mounts."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import redis

from publisher.cli import main
from subscriber._redis import connect
from subscriber.keys import stream_keys
from subscriber.protocol import (
    MAX_CONTENT_BYTES,
    WorkerState,
    decode_snapshot,
    encode_worker_state,
    sha256_hex,
)
from subscriber.testing import RedisServer
from tests._vendor.k8s_atomic_writer import atomic_write
from tests.conftest import KubeletMount, Processes
from tests.helpers import events, has_events, start_daemon, wait_until


def test_one_entry_per_distinct_state_and_none_for_other_keys(
    kubelet_mount: KubeletMount, redis_server: RedisServer, client: redis.Redis,
    processes: Processes, tmp_path: Path,
) -> None:  # fmt: skip
    kubelet_mount.write({"app.yaml": b"rev: 0\n", "flags.json": b'{"a": 0}'})
    daemon = start_daemon(processes, tmp_path, redis_server.url, kubelet_mount.directory)
    wait_until(lambda: len(events(client, "app.yaml")) == 1 and events(client, "flags.json"))
    written = [b"rev: 0\n"]
    for i in range(1, 16):
        content = f"rev: {i}\n".encode()
        kubelet_mount.set("app.yaml", content)
        written.append(content)
        wait_until(has_events(client, "app.yaml", len(written)))
        # a swap that changes only the other key must not add an app.yaml entry
        kubelet_mount.set("flags.json", f'{{"a": {i}}}'.encode())
        wait_until(has_events(client, "flags.json", i + 1))
    published = events(client, "app.yaml")
    assert [e.content for e in published] == written
    assert [e.version for e in published] == list(range(1, 17))
    assert all(e.sha256 == sha256_hex(e.content) for e in published)
    assert daemon.stop() == 0
    assert "published app.yaml v16" in daemon.output()
    assert "rev: 15" not in daemon.output()  # content is never logged


def test_a_file_path_publishes_that_key_and_new_keys_of_a_directory_appear(
    kubelet_mount: KubeletMount, redis_server: RedisServer, client: redis.Redis,
    processes: Processes, tmp_path: Path,
) -> None:  # fmt: skip
    kubelet_mount.write({"app.yaml": b"a: 1\n"})
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "single.json").write_bytes(b"{}")
    (plain / "ignored.json").write_bytes(b"{}")
    daemon = start_daemon(
        processes, tmp_path, redis_server.url, kubelet_mount.directory, plain / "single.json"
    )
    wait_until(lambda: events(client, "app.yaml") and events(client, "single.json"))
    kubelet_mount.set("added.yaml", b"new: key\n")
    wait_until(lambda: events(client, "added.yaml"))
    (plain / "single.json").write_bytes(b'{"x": 1}')
    wait_until(lambda: len(events(client, "single.json")) == 2)
    assert not events(client, "ignored.json")
    assert daemon.stop() == 0


def test_two_daemons_on_one_mount_never_duplicate(
    kubelet_mount: KubeletMount, redis_server: RedisServer, client: redis.Redis,
    processes: Processes, tmp_path: Path,
) -> None:  # fmt: skip
    kubelet_mount.write({"app.yaml": b"rev: 0\n"})
    first = start_daemon(processes, tmp_path, redis_server.url, kubelet_mount.directory, name="a")
    second = start_daemon(processes, tmp_path, redis_server.url, kubelet_mount.directory, name="b")
    wait_until(lambda: "initial publish done" in first.output() + second.output())
    wait_until(lambda: first.output().count("initial publish done") == 1
               and second.output().count("initial publish done") == 1)  # fmt: skip
    for i in range(1, 21):
        kubelet_mount.set("app.yaml", f"rev: {i}\n".encode())
        wait_until(has_events(client, "app.yaml", i + 1))
    wait_until(lambda: first.output().count("v21") + second.output().count("v21") >= 1)
    published = events(client, "app.yaml")
    assert [e.content for e in published] == [f"rev: {i}\n".encode() for i in range(21)]
    assert {e.publisher for e in published} <= {f"{p.split(':')[0]}:{d.process.pid}"
                                                 for p in [published[0].publisher]
                                                 for d in (first, second)}  # fmt: skip
    assert first.stop() == 0
    assert second.stop() == 0


def test_redis_restarted_empty_is_reseeded_with_the_newest_content_and_a_higher_version(
    kubelet_mount: KubeletMount, redis_server: RedisServer, processes: Processes, tmp_path: Path,
) -> None:  # fmt: skip
    kubelet_mount.write({"app.yaml": b"rev: 0\n"})
    daemon = start_daemon(processes, tmp_path, redis_server.url, kubelet_mount.directory)
    client = connect(redis_server.url, socket_timeout=5)
    try:
        for i in range(1, 3):
            wait_until(has_events(client, "app.yaml", i))
            kubelet_mount.set("app.yaml", f"rev: {i}\n".encode())
        wait_until(lambda: len(events(client, "app.yaml")) == 3)
    finally:
        client.close()
    # killed only once the daemon knows v3 is written: the test's read of the entry can beat
    # the daemon's answer (Redis answers the client it served last first, and the test's
    # SIGKILL may come in between), and a lost answer leaves the daemon's floor at v2 (its
    # workers' rows would number the re-seed above what they saw; this test runs none)
    wait_until(lambda: "published app.yaml v3 " in daemon.output())
    redis_server.kill()
    for i in range(3, 8):  # several changes while Redis is away: only the newest matters
        kubelet_mount.set("app.yaml", f"rev: {i}\n".encode())
    redis_server.start()
    client = connect(redis_server.url, socket_timeout=5)
    try:
        [event] = wait_until(lambda: events(client, "app.yaml"), timeout=15)
        assert event.content == b"rev: 7\n"
        assert event.version == 4  # the daemon's floor: numbering continues
    finally:
        client.close()
    assert daemon.process.poll() is None
    assert daemon.stop() == 0


def test_deleted_stream_and_flushed_scripts_are_repaired(
    kubelet_mount: KubeletMount, redis_server: RedisServer, client: redis.Redis,
    processes: Processes, tmp_path: Path,
) -> None:  # fmt: skip
    kubelet_mount.write({"app.yaml": b"rev: 0\n"})
    daemon = start_daemon(processes, tmp_path, redis_server.url, kubelet_mount.directory)
    wait_until(lambda: events(client, "app.yaml"))
    client.delete(stream_keys("app.yaml").events)
    [event] = wait_until(lambda: events(client, "app.yaml"), timeout=10)
    assert (event.version, event.content) == (2, b"rev: 0\n")
    client.script_flush()
    kubelet_mount.set("app.yaml", b"rev: 1\n")
    wait_until(lambda: len(events(client, "app.yaml")) == 2)
    assert daemon.stop() == 0


def test_restart_with_unchanged_files_publishes_nothing(
    kubelet_mount: KubeletMount, redis_server: RedisServer, client: redis.Redis,
    processes: Processes, tmp_path: Path,
) -> None:  # fmt: skip
    kubelet_mount.write({"app.yaml": b"a: 1\n", "b.json": b"{}"})
    first = start_daemon(processes, tmp_path, redis_server.url, kubelet_mount.directory, name="1")
    wait_until(lambda: "initial publish done" in first.output())
    assert first.stop() == 0
    second = start_daemon(processes, tmp_path, redis_server.url, kubelet_mount.directory, name="2")
    wait_until(lambda: "initial publish done" in second.output())
    assert len(events(client, "app.yaml")) == 1
    assert len(events(client, "b.json")) == 1
    assert "skipped app.yaml: already published as v1" in second.output()
    assert second.stop(signal.SIGINT) == 0


def test_oversized_content_is_refused_and_other_keys_keep_flowing(
    kubelet_mount: KubeletMount, redis_server: RedisServer, client: redis.Redis,
    processes: Processes, tmp_path: Path,
) -> None:  # fmt: skip
    kubelet_mount.write({"big.txt": b"small", "other.yaml": b"o: 0\n"})
    daemon = start_daemon(processes, tmp_path, redis_server.url, kubelet_mount.directory)
    wait_until(lambda: events(client, "big.txt") and events(client, "other.yaml"))
    too_big = MAX_CONTENT_BYTES + 1
    kubelet_mount.set("big.txt", b"x" * too_big)
    error_line = wait_until(
        lambda: [line for line in daemon.output().splitlines() if "over the" in line]
    )
    assert len(error_line) == 1
    assert "big.txt" in error_line[0]
    assert str(too_big) in error_line[0]
    kubelet_mount.set("other.yaml", b"o: 1\n")
    wait_until(lambda: len(events(client, "other.yaml")) == 2)
    kubelet_mount.set("big.txt", b"y" * MAX_CONTENT_BYTES)  # exactly the limit is fine
    wait_until(lambda: len(events(client, "big.txt")) == 2)
    assert [e.content[:1] for e in events(client, "big.txt")] == [b"s", b"y"]
    assert daemon.stop() == 0


def test_cli_bad_input_is_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HOTRELOAD_REDIS_URL", raising=False)
    (tmp_path / "a.yaml").write_text("a: 1\n")
    cases = [
        (["watch", str(tmp_path / "missing"), "--redis", "unix:///x.sock"], "no such file"),
        (["watch", str(tmp_path / "a.yaml"), "--redis", "http://h"], "scheme must be"),
        (["watch", str(tmp_path / "a.yaml")], "no Redis URL"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        assert message in err[0]
        assert "Traceback" not in err[0]
    with pytest.raises(SystemExit) as exit_info:
        main(["watch", str(tmp_path), "--history", "0"])
    assert exit_info.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err


def test_content_the_mount_already_replaced_is_never_published(
    kubelet_mount: KubeletMount, redis_server: RedisServer, client: redis.Redis
) -> None:
    """A daemon whose watcher lags a kubelet swap publishes what the mount holds now.

    Two daemons on one mount (or pods sharing a Redis) race: the one that read rev 1 just
    before the swap to rev 2 must not publish rev 1 over the rev 2 the other one published.
    """
    from publisher._mount import read_mount
    from publisher.daemon import Daemon
    from publisher.watcher import MountContent

    kubelet_mount.write({"app.yaml": b"rev: 1\n", "env": b"a"})
    directory = str(kubelet_mount.directory)
    before = read_mount(directory, None, ())
    files = before.files
    lagging = MountContent(directory, before.target, files, frozenset(files), frozenset())
    kubelet_mount.write({"app.yaml": b"rev: 2\n", "env": b"b"})
    daemon = Daemon([directory], redis_url=redis_server.url, snapshots={"all": directory})
    try:
        daemon._intake.accept(directory, lagging)  # what a lagging watcher would report
        assert daemon._publish_pending(*daemon._link.get())
    finally:
        daemon._link.close()
    assert [e.content for e in events(client, "app.yaml")] == [b"rev: 2\n"]
    [snapshot] = events(client, "all")
    assert decode_snapshot(snapshot.content) == {"app.yaml": b"rev: 2\n", "env": b"b"}


def test_workers_not_heard_of_for_long_are_forgotten(
    kubelet_mount: KubeletMount, redis_server: RedisServer, client: redis.Redis,
    processes: Processes, tmp_path: Path,
) -> None:  # fmt: skip
    """Every worker restart (gunicorn max_requests, a rollout's new pods) adds an entry to
    :workers; the daemon removes those silent for --forget-workers-after, by Redis's clock,
    and leaves live ones and entries it cannot read alone."""
    kubelet_mount.write({"app.yaml": b"a: 1\n"})
    seconds, micros = client.time()
    now_ms = seconds * 1000 + micros // 1000
    workers = stream_keys("app.yaml").workers
    for worker, age_s in (("old-pod:1", 120), ("old-pod:2", 31), ("live-pod:1", 0)):
        state = WorkerState(worker=worker, status="applied", heartbeat=now_ms - age_s * 1000,
                            heartbeat_interval=5.0)  # fmt: skip
        client.hset(workers, worker, encode_worker_state(state))
    client.hset(workers, "junk", b"not a worker state")
    daemon = start_daemon(processes, tmp_path, redis_server.url, kubelet_mount.directory,
                          "--forget-workers-after", "30")  # fmt: skip

    wait_until(lambda: "forgot 2 worker(s) of app.yaml" in daemon.output())
    assert sorted(client.hkeys(workers)) == [b"junk", b"live-pod:1"]
    assert daemon.stop() == 0


def test_a_swap_is_published_above_what_the_workers_saw_read_while_kubelet_wrote_it(
    kubelet_mount: KubeletMount, redis_server: RedisServer, client: redis.Redis
) -> None:
    """The workers' floor of a key is asked for while kubelet writes its new version (a round
    trip less after the swap); it must still number the swap's entry above what they saw. The
    stream holds v1, a worker reports v7 (Redis lost entries): the swap is written as v8, by
    the publish itself (upkeep's checks, which would repair it later, are an hour apart). The
    request is sent from watchdog's thread and its answer read by the publish: the loop is not
    woken for it (it was, and then raced the swap for the daemon's lock: issue 21)."""
    import threading
    import time
    from collections.abc import Sequence

    from publisher.daemon import Daemon

    kubelet_mount.write({"app.yaml": b"rev: 0\n"})
    daemon = Daemon([kubelet_mount.directory], redis_url=redis_server.url, check_interval=3600)
    asked: list[list[str]] = []
    taken: list[int | None] = []
    wakes: list[float] = []
    send, take, wait = daemon._early.send, daemon._early.take, daemon._intake.wait

    def sent(names: Sequence[str]) -> bool:
        asked.append(list(names))
        return send(names)

    def took(name: str) -> int | None:
        taken.append(take(name))
        return taken[-1]

    def waited(timeout: float) -> None:
        wait(timeout)
        wakes.append(time.monotonic())

    daemon._early.send = sent  # type: ignore[method-assign]
    daemon._early.take = took  # type: ignore[method-assign]
    daemon._intake.wait = waited  # type: ignore[method-assign]
    runner = threading.Thread(target=daemon.run)
    runner.start()
    try:
        wait_until(lambda: [e.version for e in events(client, "app.yaml")] == [1])
        state = WorkerState(worker="w:1", status="applied", version=7, seen=7)
        client.hset(stream_keys("app.yaml").workers, "w:1", encode_worker_state(state))
        wait_until(lambda: daemon._idle is not None)  # the loop waits, all published
        taken.clear()
        before = len(wakes)
        # kubelet's rename waits for the floor's request (sent on watchdog's thread)
        atomic_write(str(kubelet_mount.directory), {"app.yaml": b"rev: 1\n"},
                     pre_swap_hook=lambda: wait_until(lambda: asked))  # fmt: skip
        wait_until(lambda: len(events(client, "app.yaml")) == 2)
        newest = events(client, "app.yaml")[-1]
        assert (newest.version, newest.content) == (8, b"rev: 1\n")
        assert asked == [["app.yaml"]]
        assert taken == [7]  # asked for before the swap, and that is the floor used
        assert len(wakes) == before  # published on the watcher's thread, the loop asleep
    finally:
        daemon.request_stop()
        runner.join(10)
    assert not runner.is_alive()


# -- the daemon's parts, each on its own ----------------------------------------------------------


def test_the_intake_keeps_a_key_pending_while_a_newer_content_arrived_during_its_publish(
    kubelet_mount: KubeletMount,
) -> None:
    from publisher._mount import read_mount
    from publisher.intake import Intake
    from publisher.plan import Plan
    from publisher.watcher import MountContent

    def report(files: dict[str, bytes]) -> MountContent:
        kubelet_mount.write(files)
        read = read_mount(directory, None, ())
        return MountContent(directory, read.target, read.files, frozenset(files), frozenset())

    directory = str(kubelet_mount.directory)
    kubelet_mount.write({"app.yaml": b"rev: 1\n"})
    intake = Intake(Plan.make([directory]))
    intake.accept(directory, report({"app.yaml": b"rev: 1\n"}))
    assert intake.pending() == ["app.yaml"]
    taken = intake.newest("app.yaml")
    assert taken is not None
    assert taken.content == b"rev: 1\n"
    intake.accept(directory, report({"app.yaml": b"rev: 2\n"}))  # while rev 1 is published
    intake.done("app.yaml", taken.sha256)
    assert intake.pending() == ["app.yaml"]  # rev 2 still to publish
    newer = intake.newest("app.yaml")
    assert newer is not None
    assert newer.content == b"rev: 2\n"
    intake.refused("app.yaml", newer.sha256)  # too large: not offered again ...
    assert intake.pending() == []
    intake.mark()  # ... even when every key is published again
    assert intake.newest("app.yaml") is None
    assert intake.pending() == []


def test_upkeep_reports_a_deleted_stream_once_due(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    from publisher.publish import Publisher
    from publisher.upkeep import Upkeep

    Publisher(client).publish("app.yaml", b"a: 1\n")
    upkeep = Upkeep(prefix="hotreload", check_interval=3600.0, forget_workers_after=0)
    upkeep.connected(client, ["app.yaml"])
    client.delete(stream_keys("app.yaml").events)
    assert upkeep.due(client, ["app.yaml"]) == []  # not due for an hour
    upkeep = Upkeep(prefix="hotreload", check_interval=0.0, forget_workers_after=0)
    assert upkeep.due(client, ["app.yaml"]) == ["app.yaml"]


def test_a_signing_key_file_that_would_be_published_is_refused(
    kubelet_mount: KubeletMount, tmp_path: Path
) -> None:
    from publisher.daemon import Daemon
    from subscriber.errors import ConfigurationError

    kubelet_mount.write({"app.yaml": b"a: 1\n", "key": b"k" * 32})
    key = kubelet_mount.path("key")
    with pytest.raises(ConfigurationError, match=r"inside the watched .*; mount the key Secret"):
        Daemon([kubelet_mount.directory], redis_url="redis://unused", signing_key_file=key)
    with pytest.raises(ConfigurationError, match="published as a snapshot"):
        Daemon([], redis_url="redis://unused", signing_key_file=key,
               snapshots={"all": kubelet_mount.directory})  # fmt: skip
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "key").write_bytes(b"k" * 32)
    daemon = Daemon([kubelet_mount.directory], redis_url="redis://unused",
                    signing_key_file=tmp_path / "secret" / "key")  # fmt: skip
    assert daemon.ready() == (False, "Redis is not reachable")
