"""The per-pod sidecar for real: a redis-server runs deploy/redis/redis.conf with the users
``gen-users-acl.sh`` writes; the real publisher daemon, subscribers, CLI and the example app
under gunicorn work under their users with no ACL denial, while the subscriber user cannot
write the events stream or destroy anything, and the probes need the right password.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
import redis

from publisher._earlyfloor import EarlyFloor
from publisher.ackwatch import AckFollower
from publisher.cli import main as hotreload
from publisher.daemon import Daemon
from publisher.metrics import DaemonMetrics
from publisher.upkeep import Upkeep
from subscriber import AsyncSubscriber, Subscriber
from subscriber._redis import connect
from subscriber.keys import stream_keys
from subscriber.testing import free_port
from tests.conftest import KubeletMount, Processes
from tests.deploy.render import (
    EXAMPLE,
    K8S,
    MIB,
    PASSWORDS,
    REDIS_FILES,
    SECRET,
    Pod,
    conf_directives,
    container_env,
    moved,
    probe_port,
    render,
    write_secret_files,
)
from tests.deploy.servers import (
    DeployedRedis,
    http_get,
    http_status,
)
from tests.helpers import wait_until


def assert_no_acl_denials(admin: redis.Redis) -> None:
    denials = [(e["username"], e["reason"], e["object"]) for e in cast(list[Any], admin.acl_log())]
    assert denials == []


def test_redis_runs_with_the_deployed_settings(
    deployed_redis: DeployedRedis, admin: redis.Redis
) -> None:
    def config(name: str) -> str:
        value = cast(dict[str, str], admin.config_get(name))[name]
        return value.decode() if isinstance(value, bytes) else str(value)

    assert config("port") == "0"
    assert config("maxmemory-policy") == "noeviction"
    assert config("appendonly") == "yes"
    assert config("appendfsync") == "everysec"
    assert config("unixsocketperm") == "660"
    assert config("zset-max-listpack-entries") == "16"  # :floor, a skiplist past 16 workers
    # sized for the history: 100 versions of up to 1 MiB (a whole ConfigMap) at 1.25 MiB each
    assert int(config("maxmemory")) >= 100 * MIB * 1.25
    # noeviction keeps the config: at the limit writes are refused, nothing is evicted
    publisher = connect(deployed_redis.url_for("publisher"), socket_timeout=5)
    try:
        from publisher.publish import Publisher

        Publisher(publisher).publish("app.yaml", b"a: 1\n")
        admin.config_set("maxmemory", "1")
        with pytest.raises(redis.ResponseError, match="maxmemory"):
            Publisher(publisher).publish("app.yaml", b"a: 2\n" * 1000)
        assert admin.xlen(stream_keys("app.yaml").events) == 1
    finally:
        publisher.close()


@pytest.mark.parametrize(
    "attempt",
    ["no credentials", "default user", "password only", "wrong password", "another user's"],
)
def test_the_default_user_and_wrong_passwords_are_refused(
    deployed_redis: DeployedRedis, attempt: str
) -> None:
    socket_path = deployed_redis.socket_path
    url = {
        "no credentials": f"unix://{socket_path}",
        "default user": f"unix://default:anything-0123456789@{socket_path}",
        "password only": f"unix://:{PASSWORDS['publisher']}@{socket_path}",
        "wrong password": deployed_redis.url_for("subscriber", "not-the-password-0123"),
        "another user's": deployed_redis.url_for("subscriber", PASSWORDS["publisher"]),
    }[attempt]
    client = connect(url, socket_timeout=5)
    try:
        with pytest.raises(redis.AuthenticationError):
            client.ping()
    finally:
        client.close()


def test_credentials_in_a_unix_url_reach_redis(deployed_redis: DeployedRedis) -> None:
    client = connect(deployed_redis.url_for("operator"), socket_timeout=5)
    try:
        options = client.connection_pool.connection_kwargs
        assert (options["username"], options["password"]) == ("operator", PASSWORDS["operator"])
        assert options["path"] == deployed_redis.socket_path
        assert client.ping() is True
    finally:
        client.close()


def test_the_publisher_and_subscribers_work_under_their_users(
    deployed_redis: DeployedRedis,
    admin: redis.Redis,
    kubelet_mount: KubeletMount,
    capsys: pytest.CaptureFixture[str],
) -> None:
    kubelet_mount.write({"rate_limits.yaml": b"limit: 1\n", "flags.json": b'{"a": true}'})
    metrics_port = free_port()
    daemon = Daemon(
        [kubelet_mount.directory],
        redis_url=deployed_redis.url_for("publisher"),
        metrics_port=metrics_port,  # also runs the ack follower
        check_interval=0.2,
    )
    thread = threading.Thread(target=daemon.run, name="test-daemon", daemon=True)
    thread.start()
    try:
        wait_until(lambda: daemon.ready()[0])
        # its ack follower follows :acks from "now" on: let it block in XREAD first
        wait_until(
            lambda: any(
                c["user"] == "publisher" and c["cmd"] == "xread" and "b" in c["flags"]
                for c in admin.client_list()
            )
        )
        applied: list[str] = []
        with Subscriber(
            "rate_limits.yaml",
            applied.append,
            redis_url=deployed_redis.url_for("subscriber"),
            heartbeat_interval=0.5,
            metrics=False,
        ) as sub:
            assert applied == ["limit: 1\n"]
            assert sub.version == 1
            # a second key joins the process's shared read: CLIENT UNBLOCK wakes it (the
            # hub asked CLIENT ID when it connected), both under the subscriber user
            flags: list[str] = []
            with Subscriber(
                "flags.json",
                flags.append,
                redis_url=deployed_redis.url_for("subscriber"),
                heartbeat_interval=0.5,
                metrics=False,
            ) as second:
                assert second._hub is not None
                assert sub._hub is not None
                assert second._hub[0] is sub._hub[0]
                assert flags == ['{"a": true}']
            admin.script_flush()  # the next publish has to SCRIPT LOAD again
            kubelet_mount.set("rate_limits.yaml", b"limit: 2\n")
            wait_until(lambda: sub.version == 2)
            assert applied == ["limit: 1\n", "limit: 2\n"]
            for user, argv in (
                ("operator", ["wait", "rate_limits.yaml", "--version", "2", "--timeout", "10"]),
                ("publisher", ["wait", "rate_limits.yaml", "--timeout", "10"]),
                ("publisher", ["status"]),  # every key: SCAN
                ("operator", ["status", "--json"]),
                ("operator", ["history", "rate_limits.yaml"]),
                ("operator", ["diff", "rate_limits.yaml", "1"]),
            ):
                assert hotreload([*argv, "--redis", deployed_redis.url_for(user)]) == 0, argv
            # a request on :control, carried out (refused: no canary) by the publisher user
            promote = ["promote", "rate_limits.yaml", "--timeout", "10"]
            assert hotreload([*promote, "--redis", deployed_redis.url_for("operator")]) == 1
            # the daemon's ack follower (XREAD on :acks from "now" on) counted the v2 ack
            # the daemon's ack follower read both acks (XREAD on :acks) under its user
            wait_until(lambda: _propagation_count(metrics_port, "rate_limits.yaml") == 2)
        # the publish script wrote the head (HSET through the publisher's selector)
        head = stream_keys("rate_limits.yaml").events.replace(":events", ":head")
        assert admin.hget(head, "version") == b"2"
        worker = cast(dict[bytes, bytes], admin.hgetall(stream_keys("rate_limits.yaml").workers))
        (state,) = worker.values()
        assert b'"stopped"' in state  # recorded by stop(), under the subscriber user
        # with its ZADD GT on :floor, which the daemon's sweep (ZSCORE) found covers the row
        assert admin.zrange(stream_keys("rate_limits.yaml").floor, 0, -1, withscores=True) == [
            (next(iter(worker)), 2.0)
        ]
        wait_until(lambda: daemon._upkeep.covered.get("rate_limits.yaml"))
        # the asyncio transport issues the same commands
        assert asyncio.run(_async_subscriber_version(deployed_redis.url_for("subscriber"))) == 2
        acks = cast(list[Any], admin.xrange(stream_keys("rate_limits.yaml").acks))
        reported = {(fields[b"version"], fields[b"status"]) for _, fields in acks}
        assert reported >= {(b"1", b"applied"), (b"2", b"applied")}, acks
    finally:
        daemon.request_stop()
        thread.join(10)
    capsys.readouterr()
    assert not thread.is_alive()
    assert_no_acl_denials(admin)


def test_the_idle_check_goes_ahead_under_the_publisher_user(
    deployed_redis: DeployedRedis, admin: redis.Redis
) -> None:
    """The daemon's check sent ahead behind an ``XREAD BLOCK`` on a key's ``:control``
    (``publisher._ahead``) is allowed to the publisher user: no denial, and the checks read
    the replies sent ahead (a refused read would check as before, twice the wake-ups)."""
    client = connect(deployed_redis.url_for("publisher"), socket_timeout=5)
    names = ["rate_limits.yaml"]
    admin.xadd(stream_keys(names[0]).events, {"version": 1, "content": "limit: 1\n"})
    upkeep = Upkeep(prefix="hotreload", check_interval=0.5, forget_workers_after=0)
    taken = []
    take = upkeep._ahead.take

    def counted() -> list[Any] | None:
        replies = take()
        taken.append(replies is not None)
        return replies

    upkeep._ahead.take = counted  # type: ignore[method-assign]
    try:
        upkeep.connected(client, names)
        for _ in range(3):
            threading.Event().wait(max(0.0, upkeep.next_check - time.monotonic()))
            assert upkeep.due(client, names, {names[0]: 1}) == []
    finally:
        upkeep._ahead.drop()
        client.close()
    assert taken == [True, True, True]
    assert_no_acl_denials(admin)


def test_the_ack_followers_idle_ticks_work_under_the_publisher_user(
    deployed_redis: DeployedRedis, admin: redis.Redis
) -> None:
    """The ack follower's idle ticks ask ``HLEN`` of ``:workers`` (did a worker come or
    go?): the publisher user may. Denied (the ACL before session 8), each such tick failed:
    a denial logged, a reconnect, the acks in between not counted."""
    key = "rate_limits.yaml"
    admin.xadd(stream_keys(key).events, {"version": 1, "content": "limit: 1\n"})
    passes: list[int] = []
    follower = AckFollower(
        deployed_redis.url_for("publisher"),
        lambda: [key],
        DaemonMetrics(),
        prefix="hotreload",
        status_interval=0.2,
    )
    original = follower._update_workers

    def counted(client: Any, slices: int = 1) -> None:
        passes.append(slices)
        original(client, slices)

    follower._update_workers = counted  # type: ignore[method-assign]
    follower.start()
    try:
        wait_until(lambda: len(passes) >= 2, "a second (idle) pass, after HLEN ticks", 10)
    finally:
        follower.stop()
    assert_no_acl_denials(admin)


async def _async_subscriber_version(url: str) -> int:
    applied: list[str] = []
    async with AsyncSubscriber(
        "rate_limits.yaml", applied.append, redis_url=url, worker_id="async:1", metrics=False
    ) as sub:
        assert applied == ["limit: 2\n"]
        return sub.version


def test_the_subscriber_user_cannot_write_events_or_destroy_anything(
    deployed_redis: DeployedRedis, admin: redis.Redis
) -> None:
    keys = stream_keys("rate_limits.yaml")
    entry = cast(bytes, admin.xadd(keys.events, {"version": "1"})).decode()
    admin.xadd(keys.acks, {"status": "applied"})
    admin.hset(keys.workers, "w", "{}")
    sha = admin.script_load("return 1")
    forbidden: dict[str, list[tuple[str, ...]]] = {
        "subscriber": [
            ("XADD", keys.events, "*", "version", "99"),
            ("XADD", keys.events, "MAXLEN", "0", "*", "version", "99"),
            ("XTRIM", keys.events, "MAXLEN", "0"),
            ("XTRIM", keys.acks, "MAXLEN", "0"),
            ("XDEL", keys.events, entry),
            ("XDEL", keys.acks, entry),
            ("XSETID", keys.events, "9999999999999-0"),
            ("XGROUP", "CREATE", keys.events, "g", "$"),
            ("DEL", keys.events),
            ("DEL", keys.acks),
            ("DEL", keys.workers),
            ("UNLINK", keys.events),
            ("HDEL", keys.workers, "w"),
            ("ZREM", keys.floor, "w"),
            ("ZRANGE", keys.floor, "0", "-1"),
            ("DEL", keys.floor),
            ("ZADD", keys.events, "1", "w"),
            ("EXPIRE", keys.events, "1"),
            ("RENAME", keys.events, "elsewhere"),
            ("RESTORE", keys.events, "0", "x", "REPLACE"),
            ("HSET", keys.events, "f", "v"),
            ("SET", "other", "v"),
            ("EVAL", "return 1", "0"),
            ("EVALSHA", sha, "0"),
            ("SCRIPT", "LOAD", "return 1"),
            ("FUNCTION", "FLUSH"),
            ("FLUSHALL",),
            ("FLUSHDB",),
            ("CONFIG", "SET", "maxmemory-policy", "allkeys-lru"),
            ("ACL", "SETUSER", "subscriber", "+@all"),
            ("KEYS", "*"),
            ("SHUTDOWN", "NOSAVE"),
            ("PUBLISH", "channel", "x"),
        ],
        "operator": [
            ("XADD", keys.events, "*", "version", "99"),
            ("XADD", keys.workers.replace(":workers", ":controls"), "*", "op", "x"),
            ("XTRIM", keys.events.replace(":events", ":control"), "MAXLEN", "0"),
            ("DEL", keys.events.replace(":events", ":control")),
            ("XADD", keys.acks, "*", "status", "x"),
            ("HSET", keys.workers, "w", "x"),
            ("DEL", keys.events),
            ("FLUSHALL",),
            ("EVALSHA", sha, "1", keys.events),
        ],
        "publisher": [
            ("XADD", keys.acks, "*", "status", "x"),
            ("HSET", keys.workers, "w", "x"),
            ("ZADD", keys.floor, "GT", "99", "w"),  # only the workers say what they saw
            ("DEL", keys.floor),
            ("HSET", keys.events.replace(":events", ":heads"), "f", "x"),  # :head only
            ("DEL", keys.events.replace(":events", ":head")),
            # XTRIM is allowed: at maxmemory the history gives way (publisher.publish)
            ("XDEL", keys.events, entry),
            ("DEL", keys.events),
            ("EVAL", "return 1", "0"),
            ("FLUSHALL",),
            ("CONFIG", "SET", "maxmemory-policy", "allkeys-lru"),
        ],
    }
    allowed = []
    for user, commands in forbidden.items():
        client = connect(deployed_redis.url_for(user), socket_timeout=5)
        try:
            for command in commands:
                execute: Callable[..., Any] = client.execute_command
                try:
                    execute(*command)
                except redis.exceptions.NoPermissionError:
                    continue
                allowed.append((user, command))
        finally:
            client.close()
    assert allowed == []
    # nothing changed; and what the subscriber may do, it can
    assert admin.xlen(keys.events) == 1
    assert admin.xlen(keys.acks) == 1
    assert admin.hgetall(keys.workers) == {b"w": b"{}"}
    assert admin.dbsize() == 3
    subscriber = connect(deployed_redis.url_for("subscriber"), socket_timeout=5)
    try:
        assert len(cast(list[Any], subscriber.xrevrange(keys.events, count=1))) == 1
        subscriber.xadd(keys.acks, {"status": "applied"}, maxlen=1000, approximate=True)
        subscriber.hset(keys.workers, "w2", "{}")
        subscriber.zadd(keys.floor, {"w2": 3}, gt=True)
    finally:
        subscriber.close()
    publisher = connect(deployed_redis.url_for("publisher"), socket_timeout=5)
    try:  # the publish script's read of :floor, the sweep's, the forgetting's ZREM
        assert publisher.zrange(keys.floor, "9007199254740991", 0, desc=True, byscore=True,
                                offset=0, num=1, withscores=True) == [(b"w2", 3.0)]  # fmt: skip
        assert publisher.zscore(keys.floor, "w2") == 3
        assert publisher.zrem(keys.floor, "w2") == 1
    finally:
        publisher.close()
    # the operator's one write: a request on :control (hotreload rollback|promote|halt)
    control = keys.events.replace(":events", ":control")
    operator = connect(deployed_redis.url_for("operator"), socket_timeout=5)
    try:
        operator.xadd(control, {"op": "halt", "id": "ab12"}, maxlen=1000, approximate=True)
        assert len(cast(list[Any], operator.xread({control: "0-0"}))) == 1
        with pytest.raises(redis.exceptions.NoPermissionError):
            operator.xadd(keys.acks, {"status": "applied"})
    finally:
        operator.close()


def test_the_redis_probe_says_pong_only_with_the_right_password(
    deployed_redis: DeployedRedis, tmp_path: Path
) -> None:
    if shutil.which("redis-cli") is None:
        pytest.skip("redis-cli is not installed")
    pod = Pod(render(K8S / "example"))
    redis_c = pod.container("redis")
    socket_path = conf_directives(REDIS_FILES / "redis.conf")["unixsocket"]
    for probe in ("startupProbe", "livenessProbe"):
        for n, (secret, code) in enumerate(
            ((SECRET, 0), ({**SECRET, "publisher-password": "x" * 20}, 1))
        ):
            # the password from the Secret's file (redis-cli --askpass), never the environment
            files = write_secret_files(pod.spec, redis_c, secret, tmp_path / f"{probe}{n}")
            command = [
                moved(part.replace(socket_path, deployed_redis.socket_path), files)
                for part in redis_c[probe]["exec"]["command"]
            ]
            env = {"PATH": os.environ["PATH"], **container_env(redis_c, secret, files)}
            probe_run = subprocess.run(
                command, env=env, capture_output=True, timeout=10, check=False
            )
            assert probe_run.returncode == code, (probe, secret, probe_run)


def test_the_example_pod_under_gunicorn_with_the_manifest_environment(
    deployed_redis: DeployedRedis,
    admin: redis.Redis,
    kubelet_mount: KubeletMount,
    processes: Processes,
    tmp_path: Path,
) -> None:
    """The publisher and the app as the Deployment runs them (their env, users, probes) with
    the example app under gunicorn: both workers follow a kubelet-style ConfigMap update."""
    pod = Pod(render(K8S / "example"))
    socket_path = conf_directives(REDIS_FILES / "redis.conf")["unixsocket"]
    config = pod.configmap("hotreload-config")["data"]
    kubelet_mount.write({key: value.encode() for key, value in config.items()})

    def env_of(name: str) -> dict[str, str]:
        # the container's Secret files (its password only), where its env says
        files = write_secret_files(pod.spec, pod.container(name), SECRET, tmp_path)
        env = container_env(pod.container(name), SECRET, files)
        assert not set(PASSWORDS.values()) & set(env.values())
        env["HOTRELOAD_REDIS_URL"] = env["HOTRELOAD_REDIS_URL"].replace(
            socket_path, deployed_redis.socket_path
        )
        return env

    publisher = pod.container("publisher")
    command = list(publisher["command"])
    command[command.index("--metrics-port") + 1] = str(metrics_port := free_port())
    command[2] = str(kubelet_mount.directory)
    with (tmp_path / "publisher.log").open("wb") as log:
        processes.python("-m", "publisher", *command[1:], env=env_of("publisher"), stdout=log)
    path, _ = probe_port(publisher, "startupProbe")
    wait_until(lambda: http_status(f"http://127.0.0.1:{metrics_port}{path}") == 200)

    app_env = env_of("app")
    app_env["HOTRELOAD_CONFIG_DIR"] = str(kubelet_mount.directory)
    app_env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / "prometheus")
    (tmp_path / "prometheus").mkdir()
    app_port = free_port()
    with (tmp_path / "app.log").open("wb") as app_log:
        processes.python(
            "-m", "gunicorn", "-c", str(EXAMPLE / "gunicorn.conf.py"), "--chdir", str(EXAMPLE),
            "--bind", f"127.0.0.1:{app_port}", "--workers", "2", "app:app",
            env=app_env, cwd=str(EXAMPLE), stdout=app_log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    app = pod.container("app")
    ready, _ = probe_port(app, "readinessProbe")
    live, _ = probe_port(app, "livenessProbe")
    wait_until(lambda: http_status(f"http://127.0.0.1:{app_port}{ready}") == 200, timeout=30)
    assert http_get(f"http://127.0.0.1:{app_port}{live}")[0] == 200
    workers_key = stream_keys("rate_limits.yaml").workers
    wait_until(lambda: admin.hlen(workers_key) == 2, timeout=30)  # both workers booted

    new_limits = config["rate_limits.yaml"].replace("burst: 100", "burst: 150")
    assert new_limits != config["rate_limits.yaml"]
    kubelet_mount.set("rate_limits.yaml", new_limits.encode())
    operator = deployed_redis.url_for("operator")
    wait_until(lambda: hotreload(["history", "rate_limits.yaml", "--redis", operator]) == 0)
    waited = hotreload(
        ["wait", "rate_limits.yaml", "--version", "2", "--timeout", "20", "--redis", operator]
    )
    assert waited == 0, (tmp_path / "app.log").read_text()
    body = json.loads(http_get(f"http://127.0.0.1:{app_port}/")[1])
    assert body["versions"]["rate_limits.yaml"] == 2
    assert body["rate_limits"]["default"]["burst"] == 150
    processes.stop_all()
    assert_no_acl_denials(admin)


def _propagation_count(port: int, key: str) -> float:
    metrics = http_get(f"http://127.0.0.1:{port}/metrics")[1]
    found = re.search(rf'^hotreload_propagation_seconds_count{{key="{re.escape(key)}"}} (\S+)$',
                      metrics, re.MULTILINE)  # fmt: skip
    return float(found[1]) if found else 0.0


def test_the_early_floor_request_is_answered_under_the_publisher_user(
    deployed_redis: DeployedRedis, admin: redis.Redis
) -> None:
    """The workers' floor asked for while kubelet writes (``publisher._earlyfloor``) is
    answered under the publisher user: its script is loaded once (``SCRIPT LOAD``) and asked
    by ``EVALSHA``. It was sent as ``EVAL``, which the shipped ACL does not grant: every
    request was denied and the floor read again at publish (a round trip more per swap)."""
    name = "rate_limits.yaml"
    state = {"worker_id": "w:1", "status": "applied", "version": 6, "seen": 6}
    admin.hset(stream_keys(name).workers, "w:1", json.dumps(state))
    client = connect(deployed_redis.url_for("publisher"), socket_timeout=5)
    early = EarlyFloor("hotreload")
    try:
        early.ready(client)
        assert early.send([name])  # the loop is not woken for it
        assert early.take(name) == 6  # answered, not refused
    finally:
        early.close()
        client.close()
    assert_no_acl_denials(admin)
