"""The subscriber thread's own connection to a plain Redis: a socket, a handshake, the parser.

Why (issue 21): under gunicorn's ``preload_app`` a worker shares the master's pages until it
writes to them, and CPython 3.11 writes to every function, code object and constant a call
touches (reference counts; the adaptive interpreter's quickening and inline caches live in
the code objects). redis-py's client, pool and connection run ~130 functions of its own per
worker, most of them once (``Redis.from_url``, the pool, a ``Connection``'s constructor and
handshake with its retry, maintenance-notification, observability and credential layers),
and each copies pages the worker would otherwise share. Measured
(``tests/benchmarks/profile_pages.py``, one worker of the example app, page by page against
the master): redis-py's objects were 0.97 MiB of the 4.2 MiB a running subscriber made
private; one redis-py client and connection alone add 1.42 MiB USS per worker
(``bench_gunicorn --memory-only``). With this module a running Subscriber adds 2.56-2.60 MiB
USS per worker of the example app, not 3.51-3.56 (metrics off: 1.83-1.96, not 2.80-2.83; 4
and 2 runs, 2 rounds x 4 workers), and redis-py's share in the profile is 0.37 MiB (its
parser, read with below, and its exception classes).

What the subscriber's thread needs of a connection is small: it sends packed batches
(``_wire``) on one connection it keeps, reads one reply per command, and another thread may
cut a blocked read short (``_pool.InterruptiblePool.interrupt``). So for a ``redis://`` or
``unix://`` target this module does that itself and reads with the very parser every client
here uses (``_redis.reply_parser``: redis-py's RESP3 parser with the reply cap), so replies,
errors (``ResponseError``, ``AuthenticationError``...) and caps are redis-py's. The
handshake is redis-py 8's, in the same order and with the same failures: ``HELLO 3 AUTH``
(or ``AUTH`` with ``?protocol=2``), then ``CLIENT SETNAME``, ``CLIENT SETINFO`` (lib-name,
lib-ver: a ``CLIENT LIST`` shows the same), ``SELECT`` in one round trip. The socket's
options, timeouts and the errors a failed connect, write or read raise (their classes and
messages: logs and ``_redis.describe_failure`` read them) are redis-py's too.

Anything else keeps redis-py's client (``_redis.connect`` with an ``InterruptiblePool``): TLS
(``rediss://``: its SSL context handling), ``socket_keepalive``, the sentinels and the
cluster's own links; a server without ``HELLO`` (before Redis 6, not supported) is refused
with redis-py's error.
"""

from __future__ import annotations

import contextlib
import functools
import socket
from typing import TYPE_CHECKING, Any, cast

from redis._parsers import Encoder
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from subscriber import _redis
from subscriber._pool import InterruptiblePool
from subscriber._secrets import password_file_credentials
from subscriber._target import Target, parse
from subscriber._wire import pack

if TYPE_CHECKING:
    import redis

__all__ = ["LightClient", "connect"]

# the options this module handles itself (``db`` and ``protocol``); any other: redis-py
_OWN_OPTIONS = frozenset({"db", "protocol"})
_READ_SIZE = 65536  # redis-py's socket_read_size
_ENCODER = Encoder("utf-8", "strict", False)  # type: ignore[no-untyped-call]  # bytes stay
_LIB_NAME = "redis-py"


def connect(
    target: Target | str, *, socket_timeout: float, connect_timeout: float, client_name: str
) -> redis.Redis:
    """A client for ``_pool.execute`` on ``target``: a :class:`LightClient` for a plain
    ``redis://`` or ``unix://`` target, else redis-py's with an ``InterruptiblePool``. No I/O
    until the first batch."""
    node = parse(target) if isinstance(target, str) else target
    # (``options`` parses the query: not for an URL without one)
    if node.scheme in ("redis", "unix") and (not node.query or set(node.options) <= _OWN_OPTIONS):
        light = LightClient(node, socket_timeout, connect_timeout, client_name)
        return cast("redis.Redis", light)
    return _redis.connect(
        node,
        socket_timeout=socket_timeout,
        connect_timeout=connect_timeout,
        client_name=client_name,
        pool_class=InterruptiblePool,
    )


class LightClient:
    """What the subscriber uses of a redis-py client with an ``InterruptiblePool``: its
    ``connection_pool`` (itself: ``held()``, ``interrupt()``) and ``close()``."""

    def __init__(
        self, target: Target, socket_timeout: float, connect_timeout: float, client_name: str
    ) -> None:
        self.connection_pool = self
        self._target = target
        self._timeouts = (socket_timeout, connect_timeout)
        self._name = client_name
        self.latest: Connection | None = None
        self._held: Connection | None = None

    def held(self) -> Connection:
        """The connection, connected on first use (again after a failed connect)."""
        if self._held is None:
            connection = Connection(self._target, *self._timeouts, self._name)
            self.latest = connection  # before any I/O: interrupt() may cut the handshake
            connection.connect()
            self._held = connection
        return self._held

    def interrupt(self) -> None:
        """Make the pending read return end-of-file (another thread: ``stop()``)."""
        latest = self.latest
        sock = latest._sock if latest is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        latest, self._held = self.latest, None
        if latest is not None:
            latest.disconnect()


class Connection:
    """One socket, redis-py ``Connection``'s subset: ``send_packed_command``,
    ``read_response``, ``disconnect`` (the same errors)."""

    def __init__(
        self, target: Target, socket_timeout: float, connect_timeout: float, client_name: str
    ) -> None:
        self._target = target
        self.socket_timeout = socket_timeout
        self._connect_timeout = connect_timeout
        self._name = client_name
        self._sock: socket.socket | None = None
        self.encoder = _ENCODER
        self._parser = _redis.reply_parser()(socket_read_size=_READ_SIZE)
        protocol = target.options.get("protocol") if target.query else None
        self.protocol = 3 if protocol is None else int(protocol)
        self._explicit = protocol is not None
        self._host_error = target.path if target.unix else f"{target.host}:{target.port}"

    # -- connecting --------------------------------------------------------------------

    def connect(self) -> None:
        try:
            sock = self._connect()
        except TimeoutError:
            raise RedisTimeoutError("Timeout connecting to server") from None
        except OSError as exc:
            raise RedisConnectionError(_connect_error(self._host_error, exc)) from exc
        self._sock = sock
        try:
            self._handshake()
        except BaseException:
            self.disconnect()
            raise

    def _connect(self) -> socket.socket:
        target = self._target
        if target.unix:
            return _opened(
                socket.AF_UNIX, socket.SOCK_STREAM, 0, target.path, self._timeouts(), tcp=False
            )
        err: OSError | None = None
        for family, kind, proto, _name, address in socket.getaddrinfo(
            target.host, target.port, 0, socket.SOCK_STREAM
        ):
            try:
                return _opened(family, kind, proto, address, self._timeouts(), tcp=True)
            except OSError as exc:
                err = exc
        if err is not None:
            raise err
        raise OSError("socket.getaddrinfo returned an empty list")

    def _timeouts(self) -> tuple[float, float]:
        return self._connect_timeout, self.socket_timeout

    def _handshake(self) -> None:
        """redis-py 8's ``on_connect``: HELLO (or AUTH), then the tail in one round trip."""
        self._parser.on_connect(self)
        target = self._target
        auth: tuple[str, ...] | None = None
        if target.password_file is not None:
            provider = password_file_credentials(
                target.username, target.password_file, target.password
            )
            auth = tuple(provider.get_credentials())
        elif target.username or target.password:
            auth = (target.username, target.password or "") if target.username else (
                target.password or "",
            )  # fmt: skip
        if self.protocol == 3:
            hello: tuple[str, ...] = ()
            if auth:
                hello = ("AUTH", *auth) if len(auth) == 2 else ("AUTH", "default", auth[0])
            try:
                metadata = self._call(("HELLO", 3, *hello))
            except ResponseError as exc:
                _refuse_fallback(exc)
                raise
            if metadata.get(b"proto") != 3 and metadata.get("proto") != 3:
                raise RedisConnectionError("Invalid RESP version")
        elif auth:
            self._auth(auth)
        tail: list[tuple[Any, ...]] = []
        if self._name:
            tail.append(("CLIENT", "SETNAME", self._name))
        tail.append(("CLIENT", "SETINFO", "LIB-NAME", _LIB_NAME))
        tail.append(("CLIENT", "SETINFO", "LIB-VER", lib_version()))
        if target.db:
            tail.append(("SELECT", target.db))
        self.send_packed_command(pack(tail))
        if self._name and _text(self.read_response()) != "OK":
            raise RedisConnectionError("Error setting client name")
        for _setinfo in range(2):
            with contextlib.suppress(ResponseError):  # older servers: no CLIENT SETINFO
                self.read_response()
        if target.db and _text(self.read_response()) != "OK":
            raise RedisConnectionError("Invalid Database")

    def _auth(self, auth: tuple[str, ...]) -> None:
        from redis.exceptions import AuthenticationError, AuthenticationWrongNumberOfArgsError

        try:
            reply = self._call(("AUTH", *auth))
        except AuthenticationWrongNumberOfArgsError:
            reply = self._call(("AUTH", auth[-1]))  # a server before 6: the password only
        if _text(reply) != "OK":
            raise AuthenticationError("Invalid Username or Password")

    def _call(self, command: tuple[Any, ...]) -> Any:
        self.send_packed_command(pack([command]))
        return self.read_response()

    # -- I/O ---------------------------------------------------------------------------

    def send_packed_command(self, command: list[bytes | memoryview]) -> None:
        if self._sock is None:  # lost before: connect again, as redis-py does
            self.connect()
        sock = self._sock
        assert sock is not None
        try:
            for item in command:
                sock.sendall(item)
        except TimeoutError as exc:
            self.disconnect()
            if exc.errno is not None:  # an OS-level timeout (ETIMEDOUT), as redis-py says
                raise RedisConnectionError(
                    f"Error {exc.errno} while writing to socket. {exc.strerror}."
                ) from exc
            raise RedisTimeoutError("Timeout writing to socket") from None
        except OSError as exc:
            self.disconnect()
            errno, message = ("UNKNOWN", exc.args[0]) if len(exc.args) == 1 else exc.args[:2]
            raise RedisConnectionError(
                f"Error {errno} while writing to socket. {message}."
            ) from exc
        except BaseException:
            self.disconnect()
            raise

    def read_response(self) -> Any:
        try:
            if self.protocol == 3:
                response = self._parser.read_response(disable_decoding=False, push_request=False)
            else:
                response = self._parser.read_response(disable_decoding=False)
        except (TimeoutError, RedisTimeoutError):  # the socket's, or the parser's own
            self.disconnect()
            raise RedisTimeoutError(f"Timeout reading from {self._host_error}") from None
        except OSError as exc:
            self.disconnect()
            raise RedisConnectionError(
                f"Error while reading from {self._host_error} : {exc.args}"
            ) from exc
        except BaseException:
            self.disconnect()
            raise
        if isinstance(response, ResponseError):
            try:
                raise response
            finally:
                del response
        return response

    def disconnect(self) -> None:
        self._parser.on_disconnect()
        sock, self._sock = self._sock, None
        if sock is None:
            return
        with contextlib.suppress(OSError, TypeError):
            sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            sock.close()


@functools.cache
def lib_version() -> str:
    """redis-py's version as its handshake sends it (``CLIENT SETINFO LIB-VER``), read once
    per process: redis-py 8.0 reads its package metadata at every call (8.2 caches it), which
    cost a worker 1.0 MiB USS of metadata parsing at its first connection under redis-py
    8.0.1 (test_gunicorn's bound, ``make test-oldest``). ``pre_fork`` reads it in the master."""
    from redis.utils import get_lib_version

    return str(get_lib_version())  # type: ignore[no-untyped-call, unused-ignore]


def _opened(
    family: int, kind: int, proto: int, address: Any, timeouts: tuple[float, float], *, tcp: bool
) -> socket.socket:
    sock = socket.socket(family, kind, proto)
    try:
        if tcp:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(timeouts[0])
        sock.connect(address)
        sock.settimeout(timeouts[1])
    except OSError:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        raise
    return sock


def _connect_error(host_error: str, exc: BaseException) -> str:
    """redis-py's ``format_error_message``."""
    if not exc.args:
        return f"Error connecting to {host_error}."
    if len(exc.args) == 1:
        return f"Error {exc.args[0]} connecting to {host_error}."
    return f"Error {exc.args[0]} connecting to {host_error}. {exc.args[1]}."


def _refuse_fallback(exc: ResponseError) -> None:
    """A server refusing HELLO: redis-py 8 falls back to RESP2 when the command is unknown
    (Redis before 6), which hotreload does not support; say so instead."""
    message = str(exc).lower().removeprefix("err ")
    if message.startswith(("unknown command", "noproto")):
        raise RedisConnectionError(
            f"the server refused HELLO ({exc}): hotreload needs Redis 6 or newer"
        ) from exc


def _text(reply: Any) -> Any:
    return reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply
