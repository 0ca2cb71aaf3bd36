"""Connection settings shared by the publisher and subscribers, and what a failure means.

redis-py 8's defaults break blocking reads: a 5 s socket timeout makes ``XREAD BLOCK`` time out
and 10 hidden retries reconnect silently for about a minute before raising, while no timeout at
all hangs forever on a frozen (SIGSTOPped) Redis. So every connection here gets a socket timeout
a few seconds above the longest block, and no library retry: the callers run their own loops
with capped, jittered backoff and resync after every reconnect.

TLS is a ``rediss://`` URL; its options are redis-py's own, as URL query parameters, so they
work everywhere a URL goes (``--redis``, ``$HOTRELOAD_REDIS_URL``, ``redis_url=``)::

    rediss://redis:6380/0?ssl_ca_certs=/etc/tls/ca.crt&ssl_certfile=/etc/tls/tls.crt&ssl_keyfile=/etc/tls/tls.key

``ssl_ca_certs`` (PEM file of the CA that signed the server's certificate; default: the
system's CAs), ``ssl_ca_path`` (a directory of them), ``ssl_certfile`` + ``ssl_keyfile`` (the
client certificate, for a server with ``tls-auth-clients yes``), ``ssl_cert_reqs``
(``required``, the default: the server's certificate must verify; ``optional``; ``none``
turns verification off), ``ssl_check_hostname`` (default true: the certificate must name the
URL's host), ``ssl_min_version``, ``ssl_ciphers``, ``ssl_password`` (of an encrypted key;
never shown in logs). ``_target.resolve`` refuses unknown options, TLS options on a
``redis://`` or ``unix://`` URL, and the options hotreload sets itself (timeouts, retries),
so a typo never silently turns verification off; :func:`describe_failure` explains a failed
TLS handshake in one line.

Every client also reads with the reply cap (``reply_parser``, ``subscriber._replycap``): a
bulk string over ``protocol.MAX_ENTRY_BYTES`` -- one a hostile writer put in ``:events`` or
``:workers`` -- is dropped as it arrives instead of held whole (a 100 MB entry cost a worker
with 4 subscribers 607 MiB peak RSS before, nothing now).

The publisher's cluster and sentinel admin client (``connect_any``) is in
``publisher._admin``; subscribers find their slot's master themselves (``_cluster``).
"""

from __future__ import annotations

import os
import random
import re
import ssl
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from subscriber._secrets import PASSWORD_FILE_OPTION, password_file_credentials
from subscriber._target import Target, parse, redacted
from subscriber.defaults import BACKOFF_CAP, CONNECT_TIMEOUT
from subscriber.errors import ConfigurationError

if TYPE_CHECKING:
    import redis
    import redis.asyncio

__all__ = [
    "Backoff",
    "client_name",
    "connect",
    "connect_async",
    "connection_options",
    "credentials",
    "describe_failure",
    "moved_hint",
    "reply_parser",
]


def describe_failure(exc: BaseException | str, target: Target | str) -> str:
    """One line saying why a connection to ``target`` failed, with what to check for TLS.

    redis-py reports a failed handshake as a ``ConnectionError`` whose cause is an
    ``ssl.SSLError`` (also when the server refused our missing client certificate, which
    only shows on the first read) or an ``OSError`` for an unreadable certificate file.
    """
    if isinstance(exc, str):
        return exc
    from redis.exceptions import MovedError

    # a MOVED reply, as such or as the reply behind the subscriber's TopologyChanged
    moved = exc if isinstance(exc, MovedError) else getattr(exc, "reply", None)
    if isinstance(moved, MovedError):
        return moved_hint(moved)
    chain: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    text = str(exc)
    if any(isinstance(e, ssl.SSLCertVerificationError) for e in chain) or (
        "CERTIFICATE_VERIFY_FAILED" in text
    ):
        verify = next((e for e in chain if isinstance(e, ssl.SSLCertVerificationError)), None)
        reason = getattr(verify, "verify_message", "") or text
        return (
            f"TLS verification of the server's certificate failed ({reason}); check that "
            "ssl_ca_certs= in the Redis URL names the CA that signed the server's certificate "
            "and that the certificate names the URL's host"
        )
    if isinstance(target, str):
        try:
            target = parse(target)
        except ConfigurationError:
            return text
    options = parse_qs(target.query)
    if "CERTIFICATE_REQUIRED" in text or "alert certificate required" in text.lower():
        return (
            f"the server requires a TLS client certificate ({text}); set ssl_certfile= and "
            "ssl_keyfile= in the Redis URL"
        )
    tls = target.tls
    dropped = any(isinstance(e, ssl.SSLError | ConnectionResetError) for e in chain) or (
        "closed by server" in text.lower()
    )
    if tls and dropped and "ssl_certfile" not in options:
        # A server that wants a client certificate sends an alert, or just drops the
        # connection: an EOF, a reset or the alert, whichever this side notices first.
        return (
            f"the TLS connection failed ({text}); if the server requires a client certificate "
            "(tls-auth-clients), set ssl_certfile= and ssl_keyfile= in the Redis URL"
        )
    if any(isinstance(e, ssl.SSLError) for e in chain):
        return f"TLS handshake failed: {text}"
    if tls:
        for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_ca_path"):
            for path in options.get(name, []):
                if not os.path.exists(path):
                    return f"{name}={path} in the Redis URL does not exist ({text})"
    return text


def moved_hint(exc: BaseException) -> str:
    """A MOVED reply where none was expected: the URL names a Redis Cluster node, but asking
    it ``CLUSTER SLOTS`` (how hotreload detects a cluster) was refused."""
    return (
        f"the server answered MOVED {exc}: it is a Redis Cluster node and the key lives on "
        "another one; hotreload detects a cluster with CLUSTER SLOTS, which this user may "
        "not run: grant it +cluster|slots (see deploy/README.md)"
    )


# Compiled at import, not by re's cache on the first call: under gunicorn preload_app that is
# once in the master, instead of the regex compiler running (and copying pages) in each worker.
_UNPRINTABLE = re.compile(r"[^!-~]")


def client_name(role: str, identity: str) -> str:
    """``role:identity`` as a CLIENT SETNAME value, so ``CLIENT LIST`` tells who is who.

    CLIENT SETNAME refuses spaces and control characters, and a refused name would make every
    connection fail: anything else becomes ``_``.
    """
    return f"{role}:" + _UNPRINTABLE.sub("_", identity)[:200]


def connection_options(
    socket_timeout: float, connect_timeout: float, client_name: str | None
) -> dict[str, object]:
    """The keywords every client gets (see the module docstring); no retry: that is the
    caller's ``retry=``."""
    return {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
        "client_name": client_name,
        "decode_responses": False,  # content is raw bytes
        "health_check_interval": 0,
    }


def credentials(target: Target | str, options: dict[str, object]) -> str:
    """The URL for redis-py to read; a password from a file becomes ``options``'
    ``credential_provider`` instead, read anew for every connection (a rotated Secret), and
    the URL carries no credentials (redis-py refuses both)."""
    if isinstance(target, str):
        if f"{PASSWORD_FILE_OPTION}=" not in target:
            return target  # as redis-py reads it
        target = parse(target)
    if target.password_file is None:
        return target.url
    options["credential_provider"] = password_file_credentials(
        target.username, target.password_file, target.password
    )
    return target.anonymous_url()


def reply_parser(*, aio: bool = False) -> type[Any]:
    """The parser every client here reads with: redis-py's, but a bulk string over the reply
    cap is dropped as it arrives (``subscriber._replycap``)."""
    if aio:
        from subscriber._aioreplycap import AsyncCappedParser

        return AsyncCappedParser
    from subscriber._replycap import parser_class

    return parser_class()


def connect(
    target: Target | str,
    *,
    socket_timeout: float,
    connect_timeout: float = CONNECT_TIMEOUT,
    client_name: str | None = None,
    pool_class: type[redis.ConnectionPool] | None = None,
) -> redis.Redis:
    """A client with our timeouts, no hidden retries and the reply cap (no I/O until the
    first command).

    ``target``: a :class:`~subscriber._target.Target`, or a URL redis-py reads as it is
    (not checked: ``_target.resolve`` checks a URL given by a user). ``pool_class``: a
    ``redis.ConnectionPool`` subclass to build the client's pool with.
    """
    import redis as redis_mod
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    options = connection_options(socket_timeout, connect_timeout, client_name)
    url = credentials(target, options)
    options["parser_class"] = reply_parser()
    try:
        if pool_class is None:
            return redis_mod.Redis.from_url(url, retry=Retry(NoBackoff(), 0), **options)
        pool = pool_class.from_url(url, retry=Retry(NoBackoff(), 0), **options)
    except ValueError as exc:
        raise ConfigurationError(f"malformed Redis URL {redacted(url)!r}: {exc}") from None
    return redis_mod.Redis.from_pool(pool)


def connect_async(
    target: Target | str,
    *,
    socket_timeout: float,
    connect_timeout: float = CONNECT_TIMEOUT,
    client_name: str | None = None,
    pool_class: type[redis.asyncio.ConnectionPool] | None = None,
) -> redis.asyncio.Redis:
    """``connect`` for ``redis.asyncio``; ``pool_class`` likewise builds the client's pool."""
    import redis.asyncio as aredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    options = connection_options(socket_timeout, connect_timeout, client_name)
    url = credentials(target, options)
    options["parser_class"] = reply_parser(aio=True)
    try:
        if pool_class is None:
            return aredis.Redis.from_url(url, retry=Retry(NoBackoff(), 0), **options)  # type: ignore[arg-type]
        pool = pool_class.from_url(url, retry=Retry(NoBackoff(), 0), **options)
    except ValueError as exc:
        raise ConfigurationError(f"malformed Redis URL {redacted(url)!r}: {exc}") from None
    return aredis.Redis.from_pool(pool)


class Backoff:
    """Capped exponential backoff with full jitter; ``reset()`` after a success."""

    def __init__(self, *, base: float = 0.1, cap: float = BACKOFF_CAP) -> None:
        self.base = base
        self.cap = cap
        self.attempt = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.base * (2**self.attempt))
        self.attempt = min(self.attempt + 1, 30)
        # never below base/2: a zero delay would let a dead Redis make the loop spin
        return max(self.base / 2, random.uniform(0, ceiling))

    def reset(self) -> None:
        self.attempt = 0
