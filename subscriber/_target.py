"""The Redis URL, parsed and checked once into a frozen :class:`Target`.

A URL names what to connect to; several parts of hotreload need its parts: the transport
(where to connect, what to say when it fails), ``_cluster`` (the seed's host, the credentials
and TLS options a cluster node's URL must carry), ``_sentinel`` (the sentinels, the service,
the master's database and credentials) and the publisher's admin client. Parsing it in each
place meant as many partial parsers, each with its own idea of a default port or of where the
password is; a :class:`Target` is made once by :func:`resolve` (or :func:`parse`), refuses
what cannot work with an error saying what to change, and is passed on as it is.

Four schemes::

    redis://[USER:PASSWORD@]HOST[:PORT][/DB][?OPTIONS]
    rediss://...                        the same over TLS (options: see ``_redis``)
    unix://[USER:PASSWORD@]/PATH[?db=DB]
    redis+sentinel://[USER:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]/SERVICE[/DB][?OPTIONS]

The connection itself is still made by redis-py from :attr:`Target.url` (its own URL reading
applies the options exactly as documented); the fields here are what hotreload itself needs.
``redis+sentinel://``: ``HOST:PORT`` are the sentinels (port default 26379), ``SERVICE`` the
master's name in their configuration, ``USER:PASSWORD`` the master's credentials and
``sentinel_username`` / ``sentinel_password`` those of the sentinels (see ``_sentinel``).

Passwords from files: ``?password_file=/PATH`` (any scheme), ``--redis-password-file`` or
``$HOTRELOAD_REDIS_PASSWORD_FILE`` name a file (a key of a mounted Kubernetes Secret, a
docker secret) whose content is the user's password, never an environment variable (see
``_secrets``). :func:`parse` reads it at once, so that a missing file is an error at start;
:attr:`Target.password_file` keeps the path, for the clients to read it again on every new
connection, and :attr:`Target.spec` is the URL to hand on (the file named, no password).
:func:`redacted` keeps the password out of logs and errors either way.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from urllib.parse import SplitResult, parse_qs, parse_qsl, quote, unquote, urlsplit

from subscriber._secrets import ENV_PASSWORD_FILE, PASSWORD_FILE_OPTION, read_password_file
from subscriber.defaults import ENV_URL
from subscriber.errors import ConfigurationError

__all__ = [
    "ENV_PASSWORD_FILE",
    "PASSWORD_FILE_OPTION",
    "SENTINEL_SCHEME",
    "Target",
    "is_sentinel",
    "parse",
    "redacted",
    "resolve",
    "resolve_url",
]

SENTINEL_SCHEME = "redis+sentinel"
DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379
_SCHEMES = {"redis", "rediss", "unix"}
# redis-py's URL query options that hotreload passes on (TLS ones only with rediss://) ...
TLS_OPTIONS = frozenset(
    {
        "ssl_ca_certs",
        "ssl_ca_path",
        "ssl_certfile",
        "ssl_keyfile",
        "ssl_password",
        "ssl_cert_reqs",
        "ssl_check_hostname",
        "ssl_min_version",
        "ssl_ciphers",
    }
)
_PASSED_OPTIONS = TLS_OPTIONS | {"db", "protocol", "socket_keepalive"}
# ... and the ones it sets itself: a URL value would override them (see ``_redis``)
_MANAGED_OPTIONS = frozenset(
    {
        "socket_timeout",
        "socket_connect_timeout",
        "timeout",
        "retry_on_timeout",
        "retry_on_error",
        "health_check_interval",
        "client_name",
        "decode_responses",
        "max_connections",
    }
)
_CERT_REQS = {"none", "optional", "required"}
_SENTINEL_OPTIONS = frozenset({"sentinel_username", "sentinel_password"})
_SECRET_OPTIONS = ("ssl_password", "sentinel_password")


@dataclass(frozen=True, slots=True)
class Target:
    """One Redis to connect to, as a URL named it; made by :func:`parse`, never changed.

    ``url`` is what redis-py reads to connect (for a sentinel target: what the sentinels are
    asked with; the master's own target comes from :meth:`master`). ``host``/``port`` are
    the node's (``redis``, ``rediss``), ``path`` the socket's (``unix``); ``sentinels`` and
    ``service`` are set for ``redis+sentinel`` only. ``query`` is the URL's query as written
    (TLS options among it), ``options`` the same parsed (last value of each name).
    ``password_file``: the file ``password`` was read from (``?password_file=``), read anew
    for every new connection (``_redis.password_file_credentials``: a rotated Secret).
    """

    url: str
    scheme: str
    host: str = ""
    port: int = DEFAULT_PORT
    path: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = None
    query: str = ""
    sentinels: tuple[tuple[str, int], ...] = ()
    service: str = ""
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    password_file: str | None = None

    @property
    def tls(self) -> bool:
        return self.scheme == "rediss"

    @property
    def unix(self) -> bool:
        """A unix socket: a pod's own Redis (a cluster redirects to TCP addresses anyway)."""
        return self.scheme == "unix"

    @property
    def sentinel(self) -> bool:
        """A ``redis+sentinel://`` target: its master is asked of the sentinels."""
        return self.scheme == SENTINEL_SCHEME

    @property
    def options(self) -> dict[str, str]:
        """The query options, each name's last value."""
        return {name: values[-1] for name, values in parse_qs(self.query).items()}

    def redacted(self) -> str:
        """The URL without its passwords, for logs and errors."""
        return redacted(self.url)

    @property
    def spec(self) -> str:
        """The URL to hand on (to a component that parses it again): ``url``, but a password
        read from a file is named by its ``password_file=`` again, so that it is never copied
        and the next parse reads the file anew."""
        if self.password_file is None:
            return self.url
        return _with_option(self.anonymous_url(user=True), PASSWORD_FILE_OPTION, self.password_file)

    def anonymous_url(self, *, user: bool = False) -> str:
        """``url`` without its credentials (with ``user``: the username kept), for a client
        whose credentials come from a provider (redis-py refuses both at once)."""
        parts = urlsplit(self.url)
        address = parts.netloc.rpartition("@")[2]
        name = f"{quote(self.username, safe='')}@" if user and self.username else ""
        return _unsplit(parts._replace(netloc=name + address))

    def same_node(self, host: str, port: int) -> bool:
        """Whether ``host:port`` is the node this target names (never for a socket)."""
        return not self.unix and not self.sentinel and (self.host, self.port) == (host, port)

    def node(self, host: str, port: int) -> Target:
        """Cluster node ``host:port`` with this target's credentials and TLS options, and no
        database (a cluster node refuses ``SELECT``)."""
        scheme = "rediss" if self.tls else "redis"
        # a unix target's credentials are its own Redis's, never a cluster node's
        username, password = (None, None) if self.unix else (self.username, self.password)
        password_file = None if self.unix else self.password_file
        query = "&".join(
            option for option in self.query.split("&") if option and not option.startswith("db=")
        )
        url = f"{scheme}://{_userinfo(username, password)}{_address(host)}:{port}"
        return Target(
            url=f"{url}?{query}" if query else url,
            scheme=scheme,
            host=host,
            port=port,
            username=username,
            password=password,
            query=query,
            password_file=password_file,
        )

    def master(self, host: str, port: int) -> Target:
        """The master at ``host:port`` the sentinels named: a plain ``redis://`` target with
        the master's credentials and database."""
        return Target(
            url=(
                f"redis://{_userinfo(self.username, self.password)}"
                f"{_address(host)}:{port}/{self.db}"
            ),
            scheme="redis",
            host=host,
            port=port,
            db=self.db,
            username=self.username,
            password=self.password,
            password_file=self.password_file,
        )

    def sentinel_kwargs(self, timeout: float) -> dict[str, object]:
        """What redis-py's ``Sentinel`` connects to the sentinels with."""
        return {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "username": self.sentinel_username,
            "password": self.sentinel_password,
        }


def _userinfo(username: str | None, password: str | None) -> str:
    if not (username or password):
        return ""
    return f"{quote(username or '', safe='')}:{quote(password or '', safe='')}@"


def _address(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _unsplit(parts: SplitResult) -> str:
    """``urlunsplit``, but always with ``//`` (it drops it from ``unix:///PATH``, whose
    netloc is empty)."""
    query = f"?{parts.query}" if parts.query else ""
    fragment = f"#{parts.fragment}" if parts.fragment else ""
    return f"{parts.scheme}://{parts.netloc}{parts.path}{query}{fragment}"


def is_sentinel(url: str) -> bool:
    return url.startswith(SENTINEL_SCHEME + "://")


def resolve(url: str | None, password_file: str | None = None) -> Target:
    """The target of ``url``, else of ``$HOTRELOAD_REDIS_URL``; ``ConfigurationError``
    naming what is wrong.

    ``password_file`` (``--redis-password-file``): the password is that file's content; a URL
    with a password of its own is then an error. Without it, ``$HOTRELOAD_REDIS_PASSWORD_FILE``
    is the fallback for a URL that carries no password (nor ``password_file=``) itself.
    """
    chosen = url if url is not None else os.environ.get(ENV_URL, "")
    if not chosen:
        raise ConfigurationError(
            f"no Redis URL: pass --redis / redis_url= or set {ENV_URL} "
            "(e.g. unix:///var/run/hotreload/redis.sock or redis://localhost:6379/0)"
        )
    if password_file:
        if _has_password(chosen):
            raise ConfigurationError(
                f"the Redis URL {redacted(chosen)!r} has a password (or password_file=) and "
                "--redis-password-file names another: keep one of them"
            )
        chosen = _with_option(chosen, PASSWORD_FILE_OPTION, password_file)
    else:
        fallback = os.environ.get(ENV_PASSWORD_FILE, "")
        if fallback and not _has_password(chosen):
            chosen = _with_option(chosen, PASSWORD_FILE_OPTION, fallback)
    return parse(chosen)


def resolve_url(url: str | None, password_file: str | None = None) -> str:
    """The Redis URL to use (``url``, else ``$HOTRELOAD_REDIS_URL``), checked (a password
    file named is read once here); the password file, if any, as ``password_file=`` in it
    (:attr:`Target.spec`)."""
    return resolve(url, password_file).spec


def _has_password(url: str) -> bool:
    try:
        parts = urlsplit(url)
    except ValueError:
        return False  # parse() says what is wrong with it
    password = parts.netloc.rpartition("@")[0].partition(":")[2]
    options = parse_qs(parts.query, keep_blank_values=True)
    return bool(password) or PASSWORD_FILE_OPTION in options


def _with_option(url: str, name: str, value: str) -> str:
    parts = urlsplit(url)
    option = f"{name}={quote(value, safe='/')}"
    return _unsplit(parts._replace(query=f"{parts.query}&{option}" if parts.query else option))


def _inline_password_file(url: str) -> tuple[str, str | None]:
    """``url`` with the password its ``password_file=`` names read into it (and the option
    removed: redis-py would pass an unknown option on to the connection), and that file;
    ``url`` as it is and ``None`` without one."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url, None  # parse() says what is wrong with it
    options = parse_qsl(parts.query, keep_blank_values=True)
    paths = [value for name, value in options if name == PASSWORD_FILE_OPTION]
    if not paths:
        return url, None

    def bad(problem: str) -> ConfigurationError:
        return ConfigurationError(f"Redis URL {redacted(url)!r}: {problem}")

    if len(paths) > 1:
        raise bad("password_file= is given more than once")
    userinfo, _, address = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    if password:
        raise bad("it has both a password and password_file=: keep one of them")
    password = read_password_file(paths[0])
    # the other options as written (re-encoding them could change what redis-py reads)
    query = "&".join(
        item
        for item in parts.query.split("&")
        if item and unquote(item.partition("=")[0]) != PASSWORD_FILE_OPTION
    )
    netloc = _userinfo(unquote(username) or None, password) + address
    return _unsplit(parts._replace(netloc=netloc, query=query)), paths[0]


def parse(url: str) -> Target:
    """The :class:`Target` of ``url``, or ``ConfigurationError`` naming what is wrong.

    A ``password_file=`` option is read here: the target's URL carries the password instead.
    """
    url, password_file = _inline_password_file(url)
    if is_sentinel(url):
        return replace(_parse_sentinel(url), password_file=password_file)

    def bad(problem: str, shown: str | None = None) -> ConfigurationError:
        return ConfigurationError(f"malformed Redis URL {shown or redacted(url)!r}: {problem}")

    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError for a non-numeric port
    except ValueError as exc:
        raise bad(str(exc)) from None
    if parts.scheme not in _SCHEMES:
        raise bad("the scheme must be one of redis://, rediss://, unix:// or redis+sentinel://")
    if parts.scheme == "unix" and not parts.path:
        raise bad("unix:// needs a socket path", url)
    if parts.scheme != "unix" and not parts.hostname:
        raise bad("no host")
    options = parse_qs(parts.query, keep_blank_values=True)
    for name, values in options.items():
        problem = _option_problem(name, values[-1], parts.scheme)
        if problem:
            raise bad(problem)
    db = _database(options, parts.path if parts.scheme != "unix" else "")
    if db is None:
        raise bad("the database (?db=) is not a number")
    return Target(
        url=url,
        scheme=parts.scheme,
        host=unquote(parts.hostname or "") if parts.scheme != "unix" else "",
        port=port or DEFAULT_PORT,
        path=unquote(parts.path) if parts.scheme == "unix" else "",
        db=db,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        query=parts.query,
        password_file=password_file,
    )


def _option_problem(name: str, value: str, scheme: str) -> str:
    """Why a URL query option would be ignored, misapplied or override our settings."""
    if name in _MANAGED_OPTIONS:
        return (
            f"{name} is set by hotreload itself (blocking reads need their own timeouts "
            "and no hidden retries); remove it"
        )
    if name not in _PASSED_OPTIONS:
        return f"unknown option {name!r}; TLS options (with rediss://): " + ", ".join(
            sorted(TLS_OPTIONS)
        )
    if name in TLS_OPTIONS and scheme != "rediss":
        return f"{name} is a TLS option: use a rediss:// URL (this one is {scheme}://)"
    if name == "ssl_cert_reqs" and value not in _CERT_REQS:
        return f"ssl_cert_reqs must be one of {', '.join(sorted(_CERT_REQS))}"
    return ""


def _database(options: dict[str, list[str]], path: str) -> int | None:
    """The database as redis-py reads it: ``?db=``, else a numeric path, else 0; ``None``
    for a ``?db=`` that is not a number (redis-py would refuse it when connecting)."""
    value = next((value for value in options.get("db", []) if value), None)
    if value is not None:
        try:
            return int(value)
        except ValueError:
            return None
    number = unquote(path).replace("/", "")
    return int(number) if number.isdecimal() else 0


def _parse_sentinel(url: str) -> Target:
    def bad(problem: str) -> ConfigurationError:
        return ConfigurationError(f"malformed Sentinel URL {redacted(url)!r}: {problem}")

    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    sentinels: list[tuple[str, int]] = []
    for item in (part.strip() for part in hosts.split(",")):
        if item.startswith("["):  # [IPv6]:PORT
            host, _, rest = item[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else rest
        else:
            host, _, port = item.partition(":")
        if not host:
            raise bad("no sentinel host (HOST:PORT[,HOST:PORT...])")
        try:
            number = int(port) if port else DEFAULT_SENTINEL_PORT
        except ValueError:
            raise bad(f"the port of sentinel {item!r} is not a number") from None
        if not 0 < number < 65536:
            raise bad(f"the port of sentinel {item!r} is out of range")
        sentinels.append((host, number))
    path = [unquote(p) for p in parts.path.split("/") if p]
    if not path:
        raise bad("no service name: redis+sentinel://HOSTS/SERVICE[/DB]")
    if len(path) > 2:
        raise bad("the path is /SERVICE[/DB]")
    db = 0
    if len(path) == 2:
        if not path[1].isdigit():
            raise bad(f"the database {path[1]!r} is not a number")
        db = int(path[1])
    options = parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(options) - _SENTINEL_OPTIONS)
    if unknown:
        raise bad(f"unknown option {unknown[0]!r}; options: {', '.join(sorted(_SENTINEL_OPTIONS))}")
    return Target(
        url=url,
        scheme=SENTINEL_SCHEME,
        db=db,
        username=unquote(username) or None,
        password=unquote(password) or None,
        query=parts.query,
        sentinels=tuple(sentinels),
        service=path[0],
        sentinel_username=options.get("sentinel_username", [None])[-1],
        sentinel_password=options.get("sentinel_password", [None])[-1],
    )


def redacted(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for logs and errors)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    secret_option = any(name in parts.query for name in _SECRET_OPTIONS)
    if parts.password is None and not secret_option:
        return url
    if parts.password is not None:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        parts = parts._replace(netloc=netloc)
    if secret_option:  # e.g. ssl_password=: the passphrase of the client key
        options = "|".join(_SECRET_OPTIONS)
        parts = parts._replace(query=re.sub(rf"(?<![^&])({options})=[^&]*", r"\1=***", parts.query))
    return parts.geturl()
