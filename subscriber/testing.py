"""Helpers for testing code that uses hotreload against a real Redis.

``RedisServer`` starts a private ``redis-server`` (unix socket in a temp dir, or a free TCP
port on loopback), and stops it by PID. ``append_event`` writes a valid event directly, so an
app's callbacks can be tested without running the publisher daemon::

    with RedisServer(tmp_path) as server:
        append_event(server.url, "app.yaml", b"limit: 5\\n", version=1)
        sub = Subscriber("app.yaml", apply, redis_url=server.url)

``RedisCluster`` builds a real Redis Cluster on loopback (3 masters with 1 replica each by
default, made by ``redis-cli --cluster create``) and can kill, freeze, thaw and restart its
nodes and wait for a failover::

    with RedisCluster(tmp_path) as cluster:
        master = cluster.master_for("hotreload:{app.yaml}:events")
        cluster.kill(master)
        new_master = cluster.wait_failover(master, "hotreload:{app.yaml}:events")
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from subscriber._redis import connect
from subscriber._testing_ports import free_port
from subscriber._testing_process import is_stopped
from subscriber.keys import DEFAULT_PREFIX, stream_keys
from subscriber.protocol import (
    AUDIENCE_SCHEMA,
    SCHEMA_VERSION,
    encode_audience,
    key_id,
    now_ms,
    sha256_hex,
    sign,
    signing_key,
)

if TYPE_CHECKING:
    from subscriber._testing_cluster import ClusterNode, RedisCluster

__all__ = ["ClusterNode", "RedisCluster", "RedisServer", "append_event", "free_port"]

# The cluster helper (about 700 lines) loads only when a test asks for it by name: a test
# (or an app's test suite) that uses RedisServer pays for RedisServer only.
_LAZY = {"ClusterNode", "RedisCluster"}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        from subscriber import _testing_cluster

        value: object = getattr(_testing_cluster, name)
        globals()[name] = value  # once loaded, an ordinary module attribute
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY)


class RedisServer:
    """A private ``redis-server`` process; never touches a Redis it did not start.

    ``unix=True`` (default) serves only a unix socket in ``directory``; otherwise a free
    loopback port. Persistence is off unless ``appendonly=True`` (AOF ``everysec`` in
    ``directory``, which survives ``kill()`` + ``start()``).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        unix: bool = True,
        appendonly: bool = False,
        extra_args: tuple[str, ...] = (),
        executable: str = "redis-server",
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.unix = unix
        self.appendonly = appendonly
        self.extra_args = extra_args
        self.executable = shutil.which(executable) or executable
        self.port = 0 if unix else free_port()
        self.socket_path = str(self.directory / "redis.sock")
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.directory / "redis.log"
        self._started = False  # once started, restarts keep the port

    @property
    def url(self) -> str:
        if self.unix:
            return f"unix://{self.socket_path}"
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("redis-server is not running")
        return self.process.pid

    def _args(self) -> list[str]:
        args = [
            self.executable,
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "everysec",
            "--logfile", str(self.log_path),
            "--daemonize", "no",
        ]  # fmt: skip
        if self.unix:
            args += ["--port", "0", "--unixsocket", self.socket_path, "--unixsocketperm", "700"]
        else:
            args += ["--port", str(self.port), "--bind", "127.0.0.1"]
        return args + list(self.extra_args)

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start it and wait until it answers PING. A TCP server whose port was taken between
        ``free_port()`` and its bind starts again on another port, on its first start only
        (a restart keeps its port: clients reconnect to the same URL)."""
        if self.process is not None and self.process.poll() is None:
            return self
        for _attempt in range(3 if not self.unix and not self._started else 0):
            try:
                return self._start(timeout)
            except RuntimeError as exc:
                if "Address already in use" not in str(exc):
                    raise
                self.port = free_port()
        return self._start(timeout)

    def _start(self, timeout: float) -> RedisServer:
        if self.unix and os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        self.process = subprocess.Popen(
            self._args(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.kill()
            raise
        self._started = True
        return self

    def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        client = connect(self.url, socket_timeout=1.0, connect_timeout=0.5)
        try:
            while True:
                if self.process is not None and self.process.poll() is not None:
                    log = self.log_path.read_text() if self.log_path.exists() else ""
                    raise RuntimeError(f"redis-server exited with {self.process.returncode}: {log}")
                try:
                    if client.ping():
                        return
                except Exception as exc:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"redis-server at {self.url} not ready: {exc}") from exc
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s; always waits for the PID."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        if is_stopped(process.pid):
            os.kill(process.pid, signal.SIGCONT)
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)

    def kill(self) -> None:
        """SIGKILL (no shutdown save); ``start()`` brings it back, empty unless AOF is on."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(5)

    def freeze(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def restart(self) -> RedisServer:
        self.stop()
        return self.start()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def append_event(
    url: str,
    key: str,
    content: bytes,
    *,
    version: int,
    prefix: str = DEFAULT_PREFIX,
    sha256: str | None = None,
    publisher: str = "testing:0",
    sensitive: bool = False,
    audience: Iterable[str] | None = None,
    rollout: str = "",
    rollout_of: int = 0,
    rollout_sha256: str = "",
    request: str = "",
    signing_key_raw: bytes | str | None = None,
    published_at: int | None = None,
) -> str:
    """XADD one event as the publisher would (``sha256`` overrides the true hash, to forge).

    Returns the entry id. Unlike the publisher this does no compare-and-publish: tests decide
    the version. ``sensitive`` marks the content a secret (``watch --sensitive``).

    Rollout control: ``audience`` (worker ids) makes a canary entry (schema 2) only those
    workers see; ``rollout``, ``rollout_of``, ``rollout_sha256`` and ``request`` label it as
    the publisher does. ``signing_key_raw`` signs it as the publisher would with that key (the
    v2 message when there is an audience)::

        append_event(url, "app.yaml", b"limit: 9\\n", version=2, audience=["pod-a:12"],
                     rollout="canary")
    """
    digest = sha256 if sha256 is not None else sha256_hex(content)
    at = now_ms() if published_at is None else published_at
    audience_json = encode_audience(audience) if audience is not None else None
    fields: dict[str, str | int | bytes] = {
        "schema": SCHEMA_VERSION if audience_json is None else AUDIENCE_SCHEMA,
        "key": key,
        "version": version,
        "sha256": digest,
        "content": content,
        "published_at": at,
        "publisher": publisher,
    }
    if sensitive:
        fields["sensitive"] = 1
    if audience_json is not None:
        fields["audience"] = audience_json
    labels: dict[str, str | int] = {
        "rollout": rollout,
        "rollout_of": rollout_of,
        "rollout_sha256": rollout_sha256,
        "request": request,
    }
    fields.update({name: value for name, value in labels.items() if value})
    if signing_key_raw is not None:
        secret = signing_key(signing_key_raw)
        fields["sig"] = sign(
            secret, key, version, digest, at, audience_json=audience_json, rollout=rollout
        )
        fields["kid"] = key_id(secret)
    client = connect(url, socket_timeout=5.0)
    try:
        entry_id = client.xadd(stream_keys(key, prefix).events, fields)  # type: ignore[arg-type]
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    finally:
        client.close()
