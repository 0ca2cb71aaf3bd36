"""The daemon's HTTP endpoints: ``/metrics``, ``/healthz`` and ``/readyz``.

- ``/healthz`` is 200 while the watchers and their resync are alive. It deliberately ignores
  Redis: a Redis outage must not get the watcher restarted (it keeps the newest content and
  publishes it when Redis returns).
- ``/readyz`` is 200 once the initial publish is done and Redis is reachable, else 503.
- ``/metrics`` is the Prometheus text format of the daemon's own registry.

The bodies are one line of plain text saying why, so ``curl`` and kubelet events explain a
failing probe.
"""

from __future__ import annotations

import logging
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
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="hotreload-http", daemon=True
        )
        self._thread.start()
        logger.info("serving /metrics, /healthz, /readyz on port %d", self.port)

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
