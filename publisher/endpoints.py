"""The daemon's HTTP endpoints: ``/metrics``, ``/healthz`` and ``/readyz``.

- ``/healthz`` and ``/readyz`` are 200 or 503 as their ``Check`` says (the daemon's are in
  ``publisher.health``: watchers alive, Redis ignored; initial publish done and Redis
  reachable).
- ``/metrics`` is the Prometheus text format of the daemon's own registry.

Only serving here: what the answers mean is decided where the state is known. The bodies are
one line of plain text saying why, so ``curl`` and kubelet events explain a failing probe.

Why one asyncio loop and not a thread per connection (issue 23): every client used to cost a
thread for as long as it stayed connected, with no timeout, so 800 connections that never
sent a byte held 800 threads forever, and 200 scrapers rendering ``/metrics`` at once kept
the daemon at 98 % of a core and a liveness probe waiting seconds -- kubelet's timeout, after
which a healthy publisher is restarted. Now, whatever clients do, the server costs two
threads (the loop and one that renders ``/metrics``) and bounded memory:

- the probes are answered on the loop itself (their checks read a few attributes), never
  behind a rendering; ``/metrics`` is rendered on the other thread, at most once per
  ``METRICS_MAX_AGE`` however many scrape, every scraper meanwhile sent the same body;
- a client has ``REQUEST_TIMEOUT`` for its whole request (slowloris dribbling a byte at a
  time included) and ``WRITE_TIMEOUT`` to take its answer; then it is cut off;
- at most ``MAX_QUIET`` connections may be still sending their request: a new one past that
  gets in by closing the one that has been at it the longest (over ``QUIET_GRACE``, else the
  new one is answered 503), so clients that say nothing never lock a probe out for long;
- at most ``MAX_SCRAPES`` ``/metrics`` answers are under way: a scrape past that is answered
  503 at once (a probe never waits for a slot);
- the listen backlog is ``BACKLOG``, for a burst of probes and scrapes (socketserver's 5
  dropped connections).

Idle, the loop sleeps in the kernel without a timer: no wake-ups while nobody connects.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

__all__ = ["Check", "EndpointServer", "RenderedMetrics"]

logger = logging.getLogger(__name__)

Check = Callable[[], tuple[bool, str]]  # -> (ok, one-line reason)

BACKLOG = 128
MAX_QUIET = 256  # connections still sending their request
QUIET_GRACE = 1.0  # how long the oldest of them may take before a new one pushes it out
MAX_SCRAPES = 64  # /metrics answers under way
REQUEST_TIMEOUT = 5.0  # the request line and every header, in all
WRITE_TIMEOUT = 10.0  # the answer (and waiting for /metrics to render), in all
METRICS_MAX_AGE = 1.0  # a /metrics body is sent again for this long
MAX_REQUEST_BYTES = 8192


def _render(registry: CollectorRegistry) -> tuple[bytes, bytes]:
    """The exposition text and its gzip (level 1): with many keys the text grows by ~400 B a
    key (4 MiB at 10,000 keys), and Prometheus asks for gzip; level 1 takes it to under a
    tenth for a few ms, done once per rendering however many scrapers share it."""
    body = generate_latest(registry)
    return body, gzip.compress(body, compresslevel=1, mtime=0)


class RenderedMetrics:
    """The registry rendered on ``executor``, reused for ``max_age`` seconds: scrapers that
    come while it is fresh or being rendered share that one rendering (plain and gzipped).
    Used on one loop."""

    def __init__(
        self, registry: CollectorRegistry, executor: ThreadPoolExecutor, max_age: float
    ) -> None:
        self.registry = registry
        self.executor = executor
        self.max_age = max_age
        self._body = (b"", b"")
        self._rendered_at = float("-inf")
        self._pending: asyncio.Future[tuple[bytes, bytes]] | None = None

    def body(self) -> Awaitable[tuple[bytes, bytes]]:
        """(plain, gzipped) exposition text."""
        if time.monotonic() - self._rendered_at < self.max_age:
            done: asyncio.Future[tuple[bytes, bytes]] = asyncio.get_running_loop().create_future()
            done.set_result(self._body)
            return done
        if self._pending is None:
            started = time.monotonic()
            pending = asyncio.get_running_loop().run_in_executor(
                self.executor, _render, self.registry
            )
            pending.add_done_callback(lambda f: self._rendered(f, started))
            self._pending = pending
        # shielded: a scraper cut off while waiting must not cancel the others' rendering
        return asyncio.shield(self._pending)

    def _rendered(self, future: asyncio.Future[tuple[bytes, bytes]], started: float) -> None:
        self._pending = None
        if not future.cancelled() and future.exception() is None:
            self._body, self._rendered_at = future.result(), started


class EndpointServer:
    """The HTTP server on ``host:port``: ``start()`` binds (raising if it cannot) and serves
    on a thread, ``stop()`` closes every connection and the port."""

    def __init__(
        self,
        port: int,
        *,
        registry: CollectorRegistry,
        healthy: Check,
        ready: Check,
        host: str = "0.0.0.0",  # noqa: S104 -- probes and Prometheus reach the pod IP
    ) -> None:
        self.requested = (host, port)
        self.registry = registry
        self.checks = {"/healthz": healthy, "/readyz": ready}
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing: asyncio.Event | None = None
        self._serving = threading.Event()
        self._renderer = ThreadPoolExecutor(1, thread_name_prefix="hotreload-metrics")
        self._metrics = RenderedMetrics(registry, self._renderer, METRICS_MAX_AGE)
        self._connections: set[asyncio.Task[None]] = set()
        self._quiet: dict[asyncio.Task[None], float] = {}  # still sending: since, oldest first
        self._scraping = 0

    @property
    def port(self) -> int:
        if self._socket is None:
            raise RuntimeError("the endpoint server is not started")
        return int(self._socket.getsockname()[1])

    def start(self) -> None:
        self._socket = socket.create_server(self.requested, backlog=BACKLOG)
        self._serving.clear()
        self._thread = threading.Thread(
            target=asyncio.run, args=(self._serve(self._socket),), name="hotreload-http",
            daemon=True,
        )  # fmt: skip
        self._thread.start()
        self._serving.wait(10)
        logger.info("serving /metrics, /healthz, /readyz on port %d", self.port)

    def stop(self) -> None:
        loop, closing = self._loop, self._closing
        if loop is not None and closing is not None:
            with contextlib.suppress(RuntimeError):  # the loop has ended already
                loop.call_soon_threadsafe(closing.set)
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        self._renderer.shutdown(wait=False, cancel_futures=True)
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    async def _serve(self, sock: socket.socket) -> None:
        self._loop, self._closing = asyncio.get_running_loop(), asyncio.Event()
        try:
            server = await asyncio.start_server(
                self._connected, sock=sock, backlog=BACKLOG, limit=MAX_REQUEST_BYTES
            )
        finally:
            self._serving.set()
        await self._closing.wait()
        server.close()
        for task in list(self._connections):
            task.cancel()

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None  # asyncio runs each connection as a task
        if len(self._quiet) >= MAX_QUIET and not self._evict_quietest():
            _send(writer, 503, b"too many connections at once: try again\n", "text/plain")
            writer.transport.abort()
            return
        self._connections.add(task)
        self._quiet[task] = time.monotonic()
        writer.transport.set_write_buffer_limits(high=0)  # drain() means sent
        try:
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    method, path, gzip_ok = await _read_request(reader)
            finally:
                self._quiet.pop(task, None)
        except TimeoutError:
            _send(writer, 408, b"the request took too long\n", "text/plain")
        except (ValueError, asyncio.LimitOverrunError):  # not a request this server reads
            _send(writer, 400, b"bad request: try GET /metrics\n", "text/plain")
        except (OSError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the client went away, or was let go for a newer one, or we are stopping
        else:
            # the answer has WRITE_TIMEOUT in all; past it the client is let go unanswered
            with contextlib.suppress(TimeoutError, OSError, asyncio.CancelledError):
                async with asyncio.timeout(WRITE_TIMEOUT):
                    await self._answer(writer, method, path, gzip_ok=gzip_ok)
                    await writer.drain()
        finally:
            self._connections.discard(task)
            writer.transport.abort()  # anything unsent: the client had its time

    def _evict_quietest(self) -> bool:
        """Let go of the connection that has been sending its request the longest, if that
        is over ``QUIET_GRACE`` (a burst of honest clients is not cut off before its requests
        are read); False if none has been at it that long."""
        for task, since in self._quiet.items():
            if time.monotonic() - since < QUIET_GRACE:
                return False
            del self._quiet[task]
            task.cancel()
            return True
        return False

    async def _answer(
        self, writer: asyncio.StreamWriter, method: str, path: str, *, gzip_ok: bool = False
    ) -> None:
        if method not in ("GET", "HEAD"):
            _send(writer, 501, b"only GET: try GET /metrics\n", "text/plain")
            return
        if path in self.checks:
            try:
                ok, reason = self.checks[path]()
            except Exception as exc:
                logger.warning("the %s check failed: %s", path, exc, exc_info=True)
                ok, reason = False, f"{path} check failed: {exc}"
            code = 200 if ok else 503
            _send(writer, code, f"{reason}\n".encode(), "text/plain", head_only=method == "HEAD")
        elif path == "/metrics":
            if self._scraping >= MAX_SCRAPES:
                _send(writer, 503, b"too many scrapes at once: try again\n", "text/plain")
                return
            self._scraping += 1
            try:
                plain, gzipped = await self._metrics.body()
                _send(
                    writer, 200, gzipped if gzip_ok else plain, CONTENT_TYPE_PLAIN_0_0_4,
                    head_only=method == "HEAD", encoding="gzip" if gzip_ok else "",
                )  # fmt: skip
                await writer.drain()
            except Exception as exc:
                logger.warning("rendering /metrics failed: %s", exc, exc_info=True)
                _send(writer, 500, f"rendering failed: {exc}\n".encode(), "text/plain")
            finally:
                self._scraping -= 1
        else:
            _send(writer, 404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain")


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, bool]:
    """The method and path of one request, and whether it accepts gzip (its other headers
    are read to the blank line and dropped); ValueError for a request line that is not
    ``METHOD TARGET HTTP/x``, or too long."""
    line = await reader.readuntil(b"\n")
    parts = line.decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise ValueError(f"not an HTTP request line: {line[:80]!r}")
    total, gzip_ok = len(line), False
    while (header := await reader.readuntil(b"\n")) not in (b"\r\n", b"\n"):
        total += len(header)
        if total > MAX_REQUEST_BYTES:
            raise ValueError("request headers over the limit")
        name, _, value = header.decode("latin-1").partition(":")
        if name.strip().lower() == "accept-encoding":
            gzip_ok = gzip_ok or _accepts_gzip(value)
    return parts[0], parts[1].split("?", 1)[0], gzip_ok


def _accepts_gzip(value: str) -> bool:
    """``Accept-Encoding`` names gzip without ``q=0`` (RFC 9110 12.5.3)."""
    for item in value.split(","):
        coding, _, params = item.partition(";")
        if coding.strip().lower() == "gzip":
            params = params.strip().lower()
            return not (params.startswith("q=") and _zero(params[2:]))
    return False


def _zero(q: str) -> bool:
    try:
        return float(q) == 0
    except ValueError:
        return False


def _send(
    writer: asyncio.StreamWriter, code: int, body: bytes, content_type: str, *,
    head_only: bool = False, encoding: str = "",
) -> None:  # fmt: skip
    coded = f"Content-Encoding: {encoding}\r\nVary: Accept-Encoding\r\n" if encoding else ""
    head = (
        f"HTTP/1.0 {code} {HTTPStatus(code).phrase}\r\nContent-Type: {content_type}\r\n"
        f"{coded}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    writer.write(head.encode() if head_only else head.encode() + body)
