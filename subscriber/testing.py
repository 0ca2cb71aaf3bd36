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
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from subscriber._redis import connect
from subscriber._testing_process import is_stopped
from subscriber.keys import DEFAULT_PREFIX, stream_keys
from subscriber.protocol import SCHEMA_VERSION, now_ms, sha256_hex

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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


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
        if self.process is not None and self.process.poll() is None:
            return self
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
) -> str:
    """XADD one event as the publisher would (``sha256`` overrides the true hash, to forge).

    Returns the entry id. Unlike the publisher this does no compare-and-publish: tests decide
    the version.
    """
    client = connect(url, socket_timeout=5.0)
    try:
        entry_id = client.xadd(
            stream_keys(key, prefix).events,
            {
                "schema": SCHEMA_VERSION,
                "key": key,
                "version": version,
                "sha256": sha256 if sha256 is not None else sha256_hex(content),
                "content": content,
                "published_at": now_ms(),
                "publisher": publisher,
            },
        )
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    finally:
        client.close()
