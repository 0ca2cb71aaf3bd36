"""The daemon's HTTP endpoints: ``/metrics``, ``/healthz`` and ``/readyz``.

- ``/healthz`` and ``/readyz`` are 200 or 503 as their ``Check`` says (the daemon's are in
  ``publisher.health``: watchers alive, Redis ignored; initial publish done and Redis
  reachable).
- ``/metrics`` is the Prometheus text format of the daemon's own registry.

Only serving here: what the answers mean is decided where the state is known.

The bodies are one line of plain text saying why, so ``curl`` and kubelet events explain a
failing probe.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

__all__ = ["Check", "EndpointServer"]

logger = logging.getLogger(__name__)

Check = Callable[[], tuple[bool, str]]  # -> (ok, one-line reason)


class EndpointServer:
    """A small threaded HTTP server on ``host:port``; ``start()`` binds, ``stop()`` closes."""

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
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the endpoint server is not started")
        return int(self._server.server_address[1])

    def start(self) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._reply(200, generate_latest(owner.registry), CONTENT_TYPE_PLAIN_0_0_4)
                elif path in owner.checks:
                    ok, reason = owner.checks[path]()
                    self._reply(200 if ok else 503, f"{reason}\n".encode(), "text/plain")
                else:
                    self._reply(
                        404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain"
                    )

            def _reply(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                logger.debug("http: " + format, *args)

        self._server = ThreadingHTTPServer(self.requested, Handler)
        self._server.daemon_threads = True
        self._server.timeout = None  # handle_request() waits for a request: no polling
        self._stopping.clear()
        self._thread = threading.Thread(
            target=self._serve, args=(self._server,), name="hotreload-http", daemon=True
        )
        self._thread.start()
        logger.info("serving /metrics, /healthz, /readyz on port %d", self.port)

    def _serve(self, server: ThreadingHTTPServer) -> None:
        # serve_forever() wakes every 0.5 s to look for shutdown(): those two wake-ups a
        # second were over half of an idle daemon's CPU. This sleeps until a request comes;
        # stop() sends one.
        while not self._stopping.is_set():
            server.handle_request()

    def stop(self) -> None:
        server, self._server = self._server, None
        self._stopping.set()
        if server is not None and self._thread is not None:
            host, port = server.server_address[:2]
            if host in ("", "0.0.0.0"):  # noqa: S104 -- reached through loopback
                host = "127.0.0.1"
            with contextlib.suppress(OSError):
                socket.create_connection((str(host), int(port)), timeout=1).close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        if server is not None:
            server.server_close()
