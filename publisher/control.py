"""Operator requests (rollback, promote, halt) carried out by the daemon: ``:control``.

The daemon holds the signing key and follows the rollout, so the CLI does not write events:
``hotreload rollback KEY`` appends a request to ``{prefix}:{KEY}:control`` (``op``, ``to``,
``id`` a uuid4 hex, ``by`` host:pid, ``at`` unix ms) and waits there for a reply
(``reply_to`` = the request's id, ``ok`` 1/0, ``version``, ``message``, ``by``). The operator
ACL user may XADD to that stream and nowhere else.

Every daemon sharing the Redis reads the request (a thread per daemon: one blocking
``XREAD`` over every key's ``:control`` on a standalone Redis -- packed once while idle,
the names walked only when keys are added: 1,000 keys cost ~2 ms every 5 s otherwise -- 10
non-blocking polls a second in a cluster, where a multi-slot ``XREAD`` is refused) and the
loop carries it out through
``publish.lua`` with the request's id in the entry: the first daemon writes it, the others
find it written (same request id) or see a reply already there and stay silent. A request
older than ``REQUEST_MAX_AGE_MS`` (the CLI gave up) or already answered is not carried out:
a daemon that starts reads the last minute of requests, so a request made while every daemon
was restarting is still done, once.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import redis
from redis.exceptions import RedisClusterException

from publisher._admin import connect_any, is_cluster
from publisher._link import CONNECTION_ERRORS
from publisher._results import PublishConflict
from publisher._rolloutwire import (
    CONTROL_MAXLEN,
    OPS,
    REQUEST_MAX_AGE_MS,
    control_key,
)
from publisher._xreads import PackedXRead, _poll
from publisher.inspect._liveness import server_now_ms
from publisher.rollout import OpResult, Rollout
from subscriber._pool import InterruptiblePool, join_interrupting
from subscriber._redis import Backoff, client_name, connect
from subscriber._replybudget import reply_budget
from subscriber._replycap import Oversized
from subscriber.defaults import SOCKET_TIMEOUT_MARGIN
from subscriber.protocol import process_identity

if TYPE_CHECKING:
    from collections.abc import Callable

    from publisher._admin import AnyRedis
    from publisher.publish import Publisher

__all__ = ["Control", "Request", "parse_request"]

logger = logging.getLogger(__name__)

# standalone: how long one XREAD waits (stop() cuts it short: InterruptiblePool; a request
# ends it at once). Each return is a wake-up of an idle daemon's thread (~0.3 ms of CPU here,
# as much as the rest of its work a second): 5 s was 0.2 wake-ups a second, ~0.006 % of a
# core (profile_idle, 32 workers); 30 s is 0.03. What the block bounded, new keys' requests
# followed, does not wait for it: the loop cuts the read short when keys were added
# (``run``). Through Sentinel, whose pool makes its own connections, a short block keeps
# stop() prompt.
_BLOCK_MS, _SENTINEL_BLOCK_MS = 30_000, 500
_POLL_S = 0.1  # cluster: between two non-blocking polls (a multi-slot XREAD is CROSSSLOT)
_REPLIED_LIMIT = 10_000
_ERRORS = (redis.RedisError, RedisClusterException, OSError)
# What one reply of :control keeps (subscriber._replybudget): a request or a reply is a few
# hundred bytes, and anyone with the operator password may XADD 100 of ~1 MiB each (a read's
# COUNT) to every key's stream. Past it, the stream is read again from its first cut entry.
CONTROL_REPLY_BUDGET = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Request:
    key: str
    entry_id: str
    op: str
    request_id: str
    to: int = 0
    by: str = ""
    at: int = 0


def _text(raw: object) -> str:
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)


def parse_request(key: str, entry_id: str, fields: dict[Any, Any]) -> Request | str | None:
    """A request, a reason it is malformed (str), or None when the entry is not a request
    (a reply)."""
    data = {_text(k): _text(v)[:300] for k, v in fields.items()}
    if "op" not in data:
        return None
    request_id = data.get("id", "")
    if not request_id or len(request_id) > 64 or not request_id.isalnum():
        return "an id of 1 to 64 letters or digits is required"
    op, to = data["op"], data.get("to", "")
    if op not in OPS:
        return f"op {op[:40]!r} is not one of {', '.join(OPS)}"
    if to and (not to.isdigit() or len(to) > 16 or int(to) < 1):
        return f"to {to[:40]!r} is not a version"
    at = data.get("at", "")
    return Request(
        key,
        entry_id,
        op,
        request_id,
        int(to or 0),
        data.get("by", "")[:200],
        int(at) if at.isdigit() and len(at) <= 16 else 0,
    )


class Control:
    """The daemon's side of ``:control``: a reader thread, and ``run`` in the loop."""

    def __init__(
        self,
        redis_url: str,
        names: Callable[[], list[str]],
        *,
        prefix: str,
        wake: Callable[[], None],
    ) -> None:
        self.redis_url = redis_url
        self.names = names
        self.prefix = prefix
        self._wake = wake
        self._queue: queue.SimpleQueue[tuple[str, str, dict[Any, Any]]] = queue.SimpleQueue()
        self._replied: OrderedDict[str, None] = OrderedDict()  # request ids answered
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="hotreload-control", daemon=True)
        self._pool: InterruptiblePool | None = None  # the thread's, for stop() to interrupt
        self._block_ms = _BLOCK_MS
        self._followed = 0  # how many names the reader follows (its thread writes it)
        self._renew = False  # the loop cut the reader's read short: keys were added

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Prompt: a blocked read is cut short (its socket shut down), not waited out."""
        self._stop.set()
        join_interrupting(self._thread, lambda: self._pool, self._block_ms / 1000 + 5)

    def _connect(self) -> AnyRedis:
        name = client_name("hotreload-control", process_identity())
        if self.redis_url.startswith("redis+sentinel://"):
            self._block_ms = _SENTINEL_BLOCK_MS
            timeout = self._block_ms / 1000 + SOCKET_TIMEOUT_MARGIN
            return connect_any(self.redis_url, socket_timeout=timeout, client_name=name)
        if is_cluster(self.redis_url):
            return connect_any(self.redis_url, socket_timeout=5.0, client_name=name)
        client = connect(
            self.redis_url,
            socket_timeout=self._block_ms / 1000 + SOCKET_TIMEOUT_MARGIN,
            client_name=name,
            pool_class=InterruptiblePool,
        )
        self._pool = cast(InterruptiblePool, client.connection_pool)
        return client

    # ------------------------------------------------------------------ the reader thread
    def _read(self) -> None:
        backoff = Backoff(base=0.5, cap=3.0)
        client: AnyRedis | None = None
        cursors: dict[str, bytes | str] = {}
        followed = 0  # how many of self.names() have a cursor (keys are only ever added)
        xread = PackedXRead()  # the same command while idle: packed once (1,000 keys: 1.2 ms)
        try:
            while not self._stop.is_set():
                try:
                    if client is None:
                        client = self._connect()
                    names = self.names()
                    if len(names) != followed:  # new keys: their requests of the last minute
                        missing = [
                            stream
                            for stream in (control_key(n, self.prefix) for n in names)
                            if stream not in cursors
                        ]
                        start = f"{max(0, server_now_ms(client) - REQUEST_MAX_AGE_MS)}-0"
                        cursors.update(dict.fromkeys(missing, start))
                        followed = len(names)
                    self._followed, self._renew = followed, False
                    if not cursors:
                        self._stop.wait(0.5)
                        continue
                    with reply_budget(CONTROL_REPLY_BUDGET):
                        if isinstance(client, redis.Redis):
                            reply: Any = xread(client, cursors, 100, self._block_ms)[0]
                        else:
                            reply = _poll(client, cursors)
                    if not reply and not isinstance(client, redis.Redis):
                        self._stop.wait(_POLL_S)
                    got = False
                    for stream, all_entries in cast(list[Any], reply):
                        if isinstance(stream, Oversized) or not all_entries:
                            continue  # past the budget: read again
                        entries = _whole(all_entries)
                        name = _text(stream)
                        cursors[name] = _text(entries[-1][0])
                        key = name.split("{", 1)[1].rsplit("}", 1)[0]
                        for entry_id, fields in entries:
                            self._queue.put((key, _text(entry_id), fields))
                            got = True
                    if got:
                        self._wake()
                    backoff.reset()
                except Exception as exc:  # the reader must never end the daemon
                    if client is not None:
                        client.close()
                    client = None
                    renew, self._renew = self._renew, False
                    if renew and isinstance(exc, _ERRORS):
                        continue  # cut short for new keys: the cursors still hold
                    if not isinstance(exc, _ERRORS):
                        logger.exception("reading :control failed")
                    logger.debug("reading :control failed: %s", exc)
                    # re-read the last minute: answered requests are skipped
                    cursors, followed = {}, 0
                    self._stop.wait(backoff.next_delay())
        finally:
            if client is not None:
                client.close()

    # ------------------------------------------------------------------ the loop's side
    def run(self, client: AnyRedis, publisher: Publisher, rollout: Rollout) -> None:
        """Carry out the requests read since the last call (on the daemon loop's thread)."""
        self._follow_added()
        pending: list[tuple[str, str, dict[Any, Any]]] = []
        while True:
            try:
                pending.append(self._queue.get_nowait())
            except queue.Empty:
                break
        if not pending:
            return
        requests: list[Request] = []
        for _key, _entry_id, fields in pending:  # replies first: a batch may hold both
            reply_to = fields.get(b"reply_to", fields.get("reply_to"))
            if reply_to is not None:
                self._answered(_text(reply_to))
        now = server_now_ms(client)
        for key, entry_id, fields in pending:
            parsed = parse_request(key, entry_id, fields)
            if parsed is None:
                continue
            if isinstance(parsed, str):
                logger.warning("%s: malformed :control request %s: %s", key, entry_id, parsed)
                continue
            if parsed.request_id in self._replied:
                continue
            if now - _id_ms(entry_id) > REQUEST_MAX_AGE_MS:
                continue  # its CLI gave up long ago
            requests.append(parsed)
        names = set(self.names())
        for request in requests:
            # another key's request is for the daemons that publish it: silence here
            if request.key not in names or self._replied_in_stream(client, request):
                continue
            try:
                result = self._carry_out(client, publisher, rollout, request)
            except CONNECTION_ERRORS:
                raise  # the loop reconnects; the CLI asks again or times out
            except (redis.ResponseError, PublishConflict) as exc:  # OOM, no version left, ...
                logger.error("%s: %s failed: %s", request.key, request.op, exc)
                result = OpResult(False, 0, f"{request.op} failed: {exc}")
            self._reply(client, publisher, request, result)

    def _follow_added(self) -> None:
        """Keys were added since the reader's read began: cut the read short (its socket
        shut down; it reconnects at once and follows them too, its cursors kept), so that
        their requests wait for a reconnect, not for the rest of a ``_BLOCK_MS`` block. Keys
        are added rarely (a ConfigMap gains one, a mount is populated at start)."""
        pool = self._pool
        if pool is None or self._renew or self._followed == 0:
            return  # no blocking read (cluster, Sentinel's pool), or none yet
        if len(self.names()) != self._followed:
            self._renew = True
            pool.interrupt()

    def _carry_out(
        self, client: AnyRedis, publisher: Publisher, rollout: Rollout, request: Request
    ) -> OpResult:
        logger.info(
            "%s: %s requested by %s%s",
            request.key,
            request.op,
            request.by or "?",
            f" (to v{request.to})" if request.to else "",
        )
        reason = f"requested by {request.by or '?'}"
        if request.op == "rollback":
            return rollout.rollback(
                client,
                publisher,
                request.key,
                to=request.to,
                by=request.by,
                request=request.request_id,
            )
        operation = rollout.promote if request.op == "promote" else rollout.halt
        return operation(
            client, publisher, request.key, reason=reason, by="", request=request.request_id
        )

    def _reply(
        self, client: AnyRedis, publisher: Publisher, request: Request, result: OpResult
    ) -> None:
        self._answered(request.request_id)
        client.xadd(
            control_key(request.key, self.prefix),
            {
                "reply_to": request.request_id,
                "ok": "1" if result.ok else "0",
                "version": str(result.version),
                "message": result.message[:500],
                "by": publisher.publisher_id,
            },
            maxlen=CONTROL_MAXLEN,
            approximate=True,
        )

    def _replied_in_stream(self, client: AnyRedis, request: Request) -> bool:
        """Whether another daemon answered ``request`` already (its reply follows it)."""
        stream = control_key(request.key, self.prefix)
        with reply_budget(CONTROL_REPLY_BUDGET):  # a reply past it reads as not answered
            after = cast(list[Any], client.xrange(stream, min=request.entry_id, max="+", count=200))
        for _, fields in after:
            if _text(fields.get(b"reply_to", b"")) == request.request_id:
                self._answered(request.request_id)
                return True
        return False

    def _answered(self, request_id: str) -> None:
        self._replied[request_id] = None
        if len(self._replied) > _REPLIED_LIMIT:
            self._replied.popitem(last=False)


def _whole(entries: list[Any]) -> list[Any]:
    """The entries before the first one the reply budget cut (a field dropped, or all of
    them), read again next time; the first entry in any case (one too big for a budget of
    its own is junk, and the reader moves on)."""
    for n, (_, fields) in enumerate(entries):
        if n and (not fields or any(isinstance(v, Oversized) for v in fields.values())):
            return entries[:n]
    return entries


def _id_ms(entry_id: str) -> int:
    head = entry_id.partition("-")[0]
    return int(head) if head.isdigit() and len(head) <= 16 else 0
