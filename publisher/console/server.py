"""The console's HTTP server: the page, its two files, and three read-only JSON endpoints.

Standard library only (``http.server.ThreadingHTTPServer``): the console runs where the query
commands run (redis and msgspec installed, nothing else), and the page is three files shipped
in the package (``static/``), no CDN: it works on a laptop without internet, through
``kubectl port-forward``.

- ``GET /`` the page; ``GET /static/app.js``, ``/static/style.css``;
- ``GET /api/state``: everything the page shows (``Model.state``), refreshed at most once per
  ``interval`` for all tabs together; when Redis cannot be reached it is the last state seen
  with ``connected: false`` and the reason, and the page says so until Redis is back;
- ``GET /api/diff?key=K&old=N[&new=M]``: a unified diff; a sensitive key's is refused (403)
  unless the console was started with ``--reveal``.

The page polls ``/api/state`` every ``interval``: that is how it follows new versions and
workers live, without a reload. Only GET and HEAD exist (anything else is 501), and nothing
the server does writes to Redis.

The page renders every value from Redis as text (``textContent``, never ``innerHTML``) and
the Content-Security-Policy allows scripts from the console itself only, so a worker id or an
error holding ``<script>`` is shown, never run. Bound to loopback (the default), requests must
name a loopback host (``Host:`` header): a web page elsewhere cannot rebind a DNS name to
127.0.0.1 and read the console from the operator's browser.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from publisher.console.model import Model
from subscriber.errors import HotReloadError

__all__ = ["STATIC_FILES", "Console", "is_loopback"]

logger = logging.getLogger(__name__)

STATIC_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def is_loopback(host: str) -> bool:
    return host in {"localhost", "::1"} or host.startswith("127.")


def _static(name: str) -> bytes:
    return resources.files("publisher.console").joinpath("static", name).read_bytes()


def _failure(exc: BaseException) -> str:
    from subscriber._redis import describe_failure

    return describe_failure(exc, "") if not isinstance(exc, HotReloadError) else str(exc)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    console: Console

    def handle_error(self, request: object, client_address: object) -> None:
        # a tab closed mid-answer (BrokenPipeError) and the like: not worth a traceback
        logger.debug("console: request from %s failed", client_address, exc_info=True)


class _Server6(_Server):
    address_family = socket.AF_INET6


class Console:
    """The server around one :class:`Model`; ``serve_forever`` in the caller's thread."""

    def __init__(
        self, model: Model, *, host: str = "127.0.0.1", port: int = 8765, interval: float = 1.0
    ) -> None:
        self.model = model
        self.interval = interval
        self._state: dict[str, object] | None = None
        self._state_at = 0.0
        self._lock = threading.Lock()
        server_class = _Server6 if ":" in host else _Server
        self.server = server_class((host, port), _Handler)  # OSError: cannot listen there
        self.server.console = self
        self.host = host
        self.port: int = self.server.server_address[1]
        self.allowed_hosts = (
            {f"{name}:{self.port}" for name in ("127.0.0.1", "localhost", "[::1]")}
            if is_loopback(host)
            else None
        )

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def serve_forever(self) -> None:
        self.server.serve_forever(poll_interval=0.2)

    def shutdown(self) -> None:
        """Stop ``serve_forever`` (from another thread) and close the socket."""
        self.server.shutdown()
        self.server.server_close()

    def close(self) -> None:
        self.server.server_close()

    def state(self) -> dict[str, object]:
        """The newest state, at most ``interval`` old; the last one, marked disconnected,
        when Redis fails."""
        with self._lock:
            if self._state is not None and time.monotonic() - self._state_at < self.interval:
                return self._state
            try:
                state = self.model.state()
            except Exception as exc:
                logger.debug("console: state failed", exc_info=True)
                last = self._state or {"summary": [], "workers": [], "keys": {}}
                state = {**last, "connected": False, "error": _failure(exc)}
            state["interval_s"] = self.interval
            self._state, self._state_at = state, time.monotonic()
            return state


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "hotreload-console"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("console: " + format, *args)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in _HEADERS.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, document: object) -> None:
        self._send(status, json.dumps(document).encode(), "application/json")

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        console = self.server.console
        allowed = console.allowed_hosts
        if allowed is not None and self.headers.get("Host", "") not in allowed:
            self._json(HTTPStatus.FORBIDDEN, {"error": "unexpected Host header"})
            return
        url = urlsplit(self.path)
        if url.path in STATIC_FILES:
            name, content_type = STATIC_FILES[url.path]
            self._send(HTTPStatus.OK, _static(name), content_type)
        elif url.path == "/api/state":
            self._json(HTTPStatus.OK, console.state())
        elif url.path == "/api/diff":
            self._diff(console.model, parse_qs(url.query))
        elif url.path == "/favicon.ico":  # browsers ask; a 404 would be a console error
            self.send_response(HTTPStatus.NO_CONTENT)
            self.end_headers()
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {url.path}"})

    def _diff(self, model: Model, query: dict[str, list[str]]) -> None:
        from publisher.inspect import NotFound, SensitiveContent

        try:
            key = query["key"][0]
            old = int(query["old"][0])
            new = int(query["new"][0]) if query.get("new") else None
        except (KeyError, IndexError, ValueError):
            self._json(HTTPStatus.BAD_REQUEST, {"error": "give key=KEY&old=N[&new=M]"})
            return
        try:
            self._json(HTTPStatus.OK, model.diff(key, old, new))
        except SensitiveContent as exc:
            self._json(HTTPStatus.FORBIDDEN, {"error": str(exc), "sensitive": True})
        except NotFound as exc:
            self._json(HTTPStatus.NOT_FOUND, {"error": str(exc)})
        except HotReloadError as exc:  # a key name hotreload could never have written
            self._json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
        except Exception as exc:  # noqa: BLE001 -- a bad key name, Redis down: said, not raised
            self._json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": _failure(exc)})
