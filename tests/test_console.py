"""``hotreload console`` without a browser: its JSON, its pages and headers, its flags.

Redis is the one deploy/ ships (deploy/redis/redis.conf, the ACL file gen-users-acl.sh
writes): the publisher publishes as ``publisher``, a hostile writer (the tests' admin) adds
worker states and acks, and the console reads as ``operator`` -- after which Redis' ACL LOG
must hold no refusal, i.e. the console never tried anything beyond the read-only user's
commands. The page itself is tested in Chromium (test_console_browser.py).
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis

from publisher.cli import main
from publisher.console import Console, Model
from publisher.console.server import STATIC_FILES
from publisher.publish import Publisher
from subscriber._redis import connect
from subscriber.keys import stream_keys
from subscriber.protocol import Ack, WorkerState, encode_ack, encode_worker_state
from subscriber.testing import RedisCluster, RedisServer, free_port
from tests.conftest import REPO, Processes
from tests.deploy.render import POD_USERS, TEST_ADMIN
from tests.deploy.servers import DeployedRedis, write_acl

HOSTILE_WORKER = "<script>window.pwned=1</script>"
HOSTILE_ERROR = '<img src=x onerror="window.pwned=2"> rate must be positive'


@pytest.fixture
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeployedRedis]:
    server = DeployedRedis(tmp_path_factory.mktemp("acl"))
    write_acl(server.acl_path, POD_USERS)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def now_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def add_worker(
    admin: redis.Redis, key: str, worker: str, *, status: str, version: int, **fields: Any
) -> None:
    """A worker's state as a subscriber writes it (or as anyone who can write Redis could)."""
    state = WorkerState(
        worker=worker,
        status=status,  # type: ignore[arg-type]
        version=version,
        heartbeat=now_ms(admin),
        heartbeat_interval=3600.0,  # live for the whole test
        **fields,
    )
    admin.hset(stream_keys(key, "hotreload").workers, worker, encode_worker_state(state))


def add_ack(admin: redis.Redis, key: str, ack: Ack) -> None:
    admin.xadd(stream_keys(key, "hotreload").acks, encode_ack(ack))  # type: ignore[arg-type]


@pytest.fixture
def scene(deployed: DeployedRedis) -> Iterator[tuple[DeployedRedis, redis.Redis]]:
    """app.yaml v1..v2, one worker on v2 and one rejecting it with a hostile id and error; a
    sensitive key db.env."""
    publisher = connect(deployed.url_for("publisher"), socket_timeout=5)
    admin = connect(deployed.url_for(TEST_ADMIN[0]), socket_timeout=5)
    try:
        p = Publisher(publisher, publisher_id="pod-a:1")
        v1 = p.publish("app.yaml", b"rate: 1\n")
        v2 = p.publish("app.yaml", b"rate: 2\n")
        p.publish("db.env", b"PASSWORD=hunter2\n", sensitive=True)
        p.publish("db.env", b"PASSWORD=hunter3\n", sensitive=True)
        add_worker(admin, "app.yaml", "web-1:11", status="applied", version=2, sha256=v2.sha256)
        add_worker(
            admin, "app.yaml", HOSTILE_WORKER, status="rejected", version=1, sha256=v1.sha256,
            error=HOSTILE_ERROR, rejected_version=2,
        )  # fmt: skip
        at = now_ms(admin)
        add_ack(admin, "app.yaml", Ack(worker="web-1:11", version=2, sha256=v2.sha256,
                                       status="applied", at=at, published_at=at - 120))  # fmt: skip
        add_ack(admin, "app.yaml", Ack(worker=HOSTILE_WORKER, version=2, sha256=v2.sha256,
                                       status="rejected", error=HOSTILE_ERROR, at=at))  # fmt: skip
        admin.acl_log_reset()
        yield deployed, admin
    finally:
        publisher.close()
        admin.close()


def refusals(admin: redis.Redis) -> list[Any]:
    """What Redis refused since the scene was set (``ACL LOG``): an operator's write would
    be there."""
    return cast(list[Any], admin.acl_log())


class Running:
    """A Console serving in a thread, shut down afterwards."""

    def __init__(self, url: str, **options: Any) -> None:
        self.client = connect(url, socket_timeout=5)
        self.console = Console(Model(self.client, prefix="hotreload", **options), port=0,
                               interval=0.1)  # fmt: skip
        self.thread = threading.Thread(target=self.console.serve_forever)
        self.thread.start()

    def get(
        self, path: str, *, method: str = "GET", host: str | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.console.port, timeout=10)
        try:
            headers = {"Host": host} if host else {}
            connection.request(method, path, headers=headers)
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    def json(self, path: str) -> tuple[int, Any]:
        status, _, body = self.get(path)
        return status, json.loads(body)

    def close(self) -> None:
        self.console.shutdown()
        self.thread.join(10)
        self.client.close()


@pytest.fixture
def running(scene: tuple[DeployedRedis, redis.Redis]) -> Iterator[Running]:
    deployed, _ = scene
    server = Running(deployed.url_for("operator"))
    try:
        yield server
    finally:
        server.close()


def test_state_shows_keys_workers_rejections_and_timeline(
    running: Running, scene: tuple[DeployedRedis, redis.Redis]
) -> None:
    status, state = running.json("/api/state")
    assert status == 200
    assert state["connected"] is True
    summaries = {s["key"]: s for s in state["summary"]}
    assert set(summaries) == {"app.yaml", "db.env"}
    app = summaries["app.yaml"]
    assert app["state"] == "rejected"
    assert app["newest_version"] == 2
    assert app["rejected"] == [{"worker": HOSTILE_WORKER, "version": 2, "error": HOSTILE_ERROR}]
    workers = {w["worker"]: w for w in state["workers"] if w["key"] == "app.yaml"}
    assert workers["web-1:11"]["version"] == 2
    assert workers["web-1:11"]["liveness"] == "live"
    assert workers[HOSTILE_WORKER]["error"] == HOSTILE_ERROR  # as it is: the page escapes
    pages = state["keys"]["app.yaml"]
    assert [row["version"] for row in pages["history"]] == [2, 1]
    assert pages["history"][0]["applied"] == 1
    assert pages["history"][0]["rejected"] == 1
    acks = {a["worker"]: a for a in pages["timeline"][0]["acks"]}
    assert acks["web-1:11"]["status"] == "applied"
    assert acks["web-1:11"]["after_s"] == 0.12
    assert acks[HOSTILE_WORKER]["error"] == HOSTILE_ERROR
    # the operator user read all of it, and was refused nothing
    deployed, admin = scene
    assert refusals(admin) == []
    # (a write would have been refused, and logged)
    operator = connect(deployed.url_for("operator"), socket_timeout=5)
    try:
        with pytest.raises(redis.exceptions.NoPermissionError):
            operator.hset(stream_keys("app.yaml", "hotreload").workers, "x", b"{}")
    finally:
        operator.close()
    assert refusals(admin) != []


def test_state_follows_a_new_version_and_new_acks(
    running: Running, scene: tuple[DeployedRedis, redis.Redis]
) -> None:
    running.json("/api/state")
    deployed, admin = scene
    publisher = connect(deployed.url_for("publisher"), socket_timeout=5)
    try:
        v3 = Publisher(publisher, publisher_id="pod-b:2").publish("app.yaml", b"rate: 3\n")
    finally:
        publisher.close()
    for worker in ("web-1:11", HOSTILE_WORKER):
        add_worker(admin, "app.yaml", worker, status="applied", version=3, sha256=v3.sha256)
        add_ack(admin, "app.yaml", Ack(worker=worker, version=3, sha256=v3.sha256,
                                       status="applied", at=now_ms(admin)))  # fmt: skip

    def converged() -> Any:
        state = running.json("/api/state")[1]
        app = next(s for s in state["summary"] if s["key"] == "app.yaml")
        return state if app["state"] == "converged" and app["newest_version"] == 3 else None

    from tests.helpers import wait_until

    state = wait_until(converged, "the console shows v3 converged")
    timeline = state["keys"]["app.yaml"]["timeline"]
    assert timeline[0]["version"] == 3
    assert timeline[0]["publisher"] == "pod-b:2"
    assert {a["worker"] for a in timeline[0]["acks"]} == {"web-1:11", HOSTILE_WORKER}
    assert refusals(admin) == []


def test_diff_and_sensitive_keys(
    running: Running, scene: tuple[DeployedRedis, redis.Redis]
) -> None:
    status, diff = running.json("/api/diff?key=app.yaml&old=1&new=2")
    assert status == 200
    assert diff["lines"][2:] == ["@@ -1 +1 @@", "-rate: 1", "+rate: 2"]
    assert running.json("/api/diff?key=app.yaml&old=1")[1]["new"] == 2  # default: the newest
    status, refused = running.json("/api/diff?key=db.env&old=1&new=2")
    assert status == 403
    assert refused["sensitive"] is True
    assert "hunter" not in json.dumps(refused)
    assert "--reveal" in refused["error"]
    assert running.json("/api/diff?key=app.yaml&old=9")[0] == 404
    assert running.json("/api/diff?key=app.yaml&old=x")[0] == 400
    assert running.json("/api/diff?key=../x&old=1")[0] in {400, 404}
    deployed, admin = scene
    revealing = Running(deployed.url_for("operator"), reveal=True)
    try:
        status, diff = revealing.json("/api/diff?key=db.env&old=1&new=2")
        assert status == 200
        assert "+PASSWORD=hunter3" in diff["lines"]
    finally:
        revealing.close()
    assert refusals(admin) == []


def test_pages_headers_and_refusals(running: Running) -> None:
    for path, (name, content_type) in STATIC_FILES.items():
        status, headers, body = running.get(path)
        assert status == 200
        assert headers["Content-Type"] == content_type
        assert body == (REPO / "publisher/console/static" / name).read_bytes()
        assert "script-src 'self'" in headers["Content-Security-Policy"]
        assert headers["X-Content-Type-Options"] == "nosniff"
    page = running.get("/")[2].decode()
    assert not re.search(r"(src|href)=\"(https?:)?//", page), (
        "the page loads nothing from elsewhere"
    )
    assert running.get("/static/app.js", method="HEAD")[2] == b""
    assert running.get("/nothing")[0] == 404
    assert running.get("/api/state", method="POST")[0] == 501  # read-only: GET and HEAD
    assert running.get("/api/state", method="DELETE")[0] == 501
    # DNS rebinding: another name for 127.0.0.1 is refused
    assert running.get("/api/state", host="evil.example:80")[0] == 403
    assert running.get("/api/state", host=f"localhost:{running.console.port}")[0] == 200


def test_redis_going_away_is_shown_and_recovered(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "r") as server:
        client = connect(server.url, socket_timeout=5)
        Publisher(client).publish("app.yaml", b"a: 1\n")
        client.close()
        console = Running(server.url)
        try:
            assert console.json("/api/state")[1]["connected"] is True
            server.stop()
            from tests.helpers import wait_until

            state = wait_until(
                lambda: (s := console.json("/api/state")[1])["connected"] is False and s
            )
            assert state["error"]
            assert state["summary"][0]["key"] == "app.yaml"
            server.start()
            wait_until(lambda: console.json("/api/state")[1]["connected"], "connected again")
        finally:
            console.close()


# ---------------------------------------------------------------------------- the command


def test_command_serves_until_sigterm(
    scene: tuple[DeployedRedis, redis.Redis], processes: Processes
) -> None:
    deployed, admin = scene
    port = free_port()
    proc = processes.python(
        "-m", "publisher", "console", "--redis", deployed.url_for("operator"), "--port", str(port),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    assert line.startswith(f"hotreload console: http://127.0.0.1:{port}/"), line
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("GET", "/api/state")
    state = json.loads(connection.getresponse().read())
    connection.close()
    assert {s["key"] for s in state["summary"]} == {"app.yaml", "db.env"}
    for _ in range(3):  # clients that leave before the answer: nothing on stderr
        with socket.create_connection(("127.0.0.1", port), timeout=5) as rude:
            rude.sendall(f"GET /api/state HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    proc.terminate()
    _, err = proc.communicate(timeout=10)  # closes the pipes
    assert proc.returncode == 0, err
    assert err == b""
    assert refusals(admin) == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "70000"], "70000 is not a port number"),
        (["--port", "x"], "'x' is not a port number"),
        (["--host", "a b"], "is not a host name"),
        (["--interval", "0"], "must be from 0.1"),
    ],
)
def test_bad_flags_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["console", *argv])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("hotreload: error:")
    assert message in err
    assert "Traceback" not in err


def test_unusable_address_url_or_redis(
    redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    url = redis_server.url
    # an address this machine does not have (TEST-NET-3)
    assert main(["console", "--redis", url, "--host", "203.0.113.7", "--port", "0"]) == 2
    assert "cannot listen on 203.0.113.7" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["console", "--redis", url, "--port", str(port)]) == 2
        assert f"cannot listen on 127.0.0.1 port {port}" in capsys.readouterr().err
    assert main(["console", "--redis", "http://example.com"]) == 2
    assert "hotreload: error:" in capsys.readouterr().err
    assert main(["console", "--redis", f"redis://127.0.0.1:{free_port()}", "--port", "0"]) == 3
    err = capsys.readouterr().err
    assert err.startswith("hotreload: error: cannot reach Redis")
    assert "Traceback" not in err


def test_the_installed_wheel_serves_the_page(tmp_path: Path) -> None:
    """The three files are package data: a wheel built from this tree, installed on its own
    (not this checkout), serves them."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path), str(REPO)],
        check=True, timeout=120, capture_output=True,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name, _ in STATIC_FILES.values():
        assert f"publisher/console/static/{name}" in names
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
         "--target", str(target), str(wheel)],
        check=True, timeout=120, capture_output=True,
    )  # fmt: skip
    probe = (
        f"import sys; sys.path.insert(0, {str(target)!r})\n"
        "import publisher; from publisher.console.server import STATIC_FILES, _static\n"
        f"assert publisher.__file__.startswith({str(target)!r}), publisher.__file__\n"
        "print(sum(len(_static(name)) for name, _ in STATIC_FILES.values()))"
    )
    shipped = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
        timeout=60, check=True,
    )  # fmt: skip
    expected = sum(
        (REPO / "publisher/console/static" / name).stat().st_size
        for name, _ in STATIC_FILES.values()
    )
    assert int(shipped.stdout) == expected


def test_console_works_without_the_publisher_extra(
    redis_server: RedisServer, processes: Processes
) -> None:
    """Like the query commands, the console needs redis and msgspec only."""
    from tests.test_cli_install import WITHOUT_EXTRA

    client = connect(redis_server.url, socket_timeout=5)
    try:
        Publisher(client).publish("app.yaml", b"a: 1\n")
    finally:
        client.close()
    proc = processes.python(
        "-c", WITHOUT_EXTRA, "console", "--redis", redis_server.url, "--port", "0",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
    assert match, line
    connection = http.client.HTTPConnection("127.0.0.1", int(match[1]), timeout=10)
    connection.request("GET", "/api/state")
    state = json.loads(connection.getresponse().read())
    connection.close()
    assert [s["newest_version"] for s in state["summary"]] == [1]
    proc.terminate()
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err


def test_a_redis_cluster_shared_by_pods(redis_cluster_module: RedisCluster) -> None:
    """One console over a Redis Cluster shows the keys of every master (keys of several
    pods, in different slots), their workers, and diffs read from each key's node."""
    from publisher._admin import connect_any

    client = connect_any(redis_cluster_module.url, socket_timeout=5)
    try:
        keys = [f"pod{n}.yaml" for n in range(6)]
        masters = {redis_cluster_module.master_for(key).port for key in keys}
        assert len(masters) > 1, "the keys should live on several masters"
        for n, key in enumerate(keys):
            publisher = Publisher(client, publisher_id=f"pod-{n}:1")  # type: ignore[arg-type]
            publisher.publish(key, b"v: 1\n")
            v2 = publisher.publish(key, b"v: 2\n")
            state = WorkerState(
                worker=f"pod-{n}:w1", status="applied", version=2, sha256=v2.sha256,
                heartbeat=int(time.time() * 1000), heartbeat_interval=3600.0,
            )  # fmt: skip
            client.hset(stream_keys(key, "hotreload").workers, state.worker,
                        encode_worker_state(state))  # fmt: skip
        console = Console(Model(client, prefix="hotreload"), port=0, interval=0.1)
        thread = threading.Thread(target=console.serve_forever)
        thread.start()
        try:
            connection = http.client.HTTPConnection("127.0.0.1", console.port, timeout=10)
            connection.request("GET", "/api/state")
            state_doc = json.loads(connection.getresponse().read())
            connection.request("GET", "/api/diff?key=pod3.yaml&old=1")
            diff = json.loads(connection.getresponse().read())
            connection.close()
        finally:
            console.shutdown()
            thread.join(10)
    finally:
        client.close()
    summaries = {s["key"]: s for s in state_doc["summary"]}
    assert set(summaries) == set(keys)
    assert {s["state"] for s in summaries.values()} == {"converged"}
    assert [h["version"] for h in state_doc["keys"]["pod3.yaml"]["history"]] == [2, 1]
    assert diff["lines"][-2:] == ["-v: 1", "+v: 2"]
