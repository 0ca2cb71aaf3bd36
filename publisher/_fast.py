"""Large contents around Lua: the decision in ``publish.lua``, the content in a plain ``XADD``;
and every other publish's ``EVALSHA`` packed here (``FastPath.evalsha``, a single Redis).

Every argument of a script becomes a Lua string, and the Lua bundled with Redis hashes every
byte of every string it makes (``luaS_newlstr``, about 1.4 ns a byte here): a 1 MiB content
passed to ``publish.lua`` cost ~1.5 ms server-side, against 0.29 ms for the ``XADD`` itself
(``Publisher.publish`` 2.4 ms p50 against a plain ``XADD`` 0.45 ms, redis-server 7.0.15).
So from ``FAST_FROM`` bytes on, a publish is ONE round trip of one transaction::

    MULTI
    SCRIPT LOAD <aside>, SCRIPT LOAD <back>     (never missing when the EVALSHAs run)
    EVALSHA <aside>  KEYS stream, aside         move the stream to {KEY}:aside (if it exists)
    EVALSHA publish.lua KEYS stream, head, aside  ARGV: today's, content '', then the proposal
    XADD stream NOMKSTREAM MAXLEN <n> <id> <fields, content among them>
    EVALSHA <back>   KEYS stream, head, aside   move it back if still aside; announce if written
    EXEC

The script decides exactly as always (reading the stream where it was moved); it consents to
the append only if the queued ``XADD`` is exactly the entry it would write (see PROPOSAL in
``publish.lua``): then it writes the head and moves the stream back, and the ``XADD`` appends.
Anything else -- the content found, superseded, pinned, another version, a refused id, the
script missing (``NOSCRIPT``) or failing -- leaves the stream key missing, so the ``XADD``
(``NOMKSTREAM``) does nothing, and the last step moves the stream back. Every move is
``REPL_NONE`` and inside one ``EXEC``: replicas and the AOF get the ``XADD`` alone (one
propagated command is not wrapped in ``MULTI``/``EXEC``, which Redis 7.0 loading an AOF runs
as the default user: see ``publisher._head``), and blocked readers are served after the
``EXEC``, when the stream is back. A refused proposal is answered with the version and id the
script wants: the client proposes once more, then publishes through Lua.

1 MiB: x1.06-1.18 a plain ``XADD`` (5 runs of 100; through Lua x3.5-4.4 in the same minutes).
Not used (publishes go through Lua as before): contents under ``FAST_FROM`` (where it pays: p50
through Lua / around it, 32 KiB 0.22-0.25 / 0.26 ms, 64 KiB 0.28-0.32 / 0.28-0.31, 96 KiB
0.33-0.38 / 0.28-0.29), a Redis Cluster
client (redis-py 8.2's ``ClusterPipeline`` can send a same-slot ``MULTI``, but this sends its
transaction raw on a single Redis' pooled connection; redirections in a slot migration are
untested: not built), a Redis
before 7.0 (no ``redis.acl_check_cmd``; and 7.0 is where one propagated command stopped being
wrapped), a user whose ACL predates this (``RENAME`` or ``:aside`` refused: one
warning), or one whose ACL lets only part of the transaction run (asked once per stream with
``redis.acl_check_cmd``, since the ACL checks a command inside a script, and ``MULTI``, only
when it runs: ``MULTI`` refused, each command ran alone and every large publish failed with
"EXEC without MULTI"; ``EXISTS`` or ``RENAME`` refused in the first step, the stream stayed
in place and the ``XADD`` appended undecided; ``RENAME`` allowed to ``:aside`` but not back
-- a destination needs only write -- the stream stayed aside; see
``tests/test_publish_fast_faults.py``), a user without the head, and the first entry of a
stream (nothing to move aside: the script answers "through Lua"). A ``WATCH`` on the stream
is broken by every such publish, even one that writes nothing.
Verified on redis-server 7.0.15 (``tests/test_publish_fast.py``; faults -- partial ACLs, junk
at ``:aside``, a head for a refused ``XADD``, a Sentinel failover -- in
``tests/test_publish_fast_faults.py``).
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import TYPE_CHECKING, Any, cast

from redis.exceptions import (
    ConnectionError,
    ExecAbortError,
    NoPermissionError,
    NoScriptError,
    ResponseError,
    TimeoutError,
)

from publisher._unanswered import may_have_run
from subscriber._wire import pack

if TYPE_CHECKING:
    import redis

__all__ = ["FAST_FROM", "FastPath", "aside_key"]

logger = logging.getLogger(__name__)

FAST_FROM: int | None = 64 * 1024  # bytes of content from which a publish goes around Lua
WRITTEN, REFUSED, THROUGH_LUA = 1, 8, 9  # publish.lua's decide-mode answers

# The guard: the stream steps aside, so that only the script's consent lets the XADD append.
# Both moves move a stream only: a key of another type someone wrote at :events (or at :aside)
# stays where it is, as through Lua (WRONGTYPE; the XADD fails on it).
_ASIDE = """redis.set_repl(redis.REPL_NONE)
if redis.call('EXISTS', KEYS[1]) == 1 then
  local kind = redis.pcall('XLEN', KEYS[1])
  if type(kind) == 'table' and string.find(kind.err or '', 'WRONGTYPE', 1, true) then
    return 0
  end
  redis.call('RENAME', KEYS[1], KEYS[2])
end
return 1"""
# The last step: back if still aside (refused, failed); announced if the XADD appended; if Redis
# refused the consented id, the head's id is cleared: the length it records is not XLEN now, but
# could become it (XTRIM, XDEL) with no entry appended after, and the head would then vouch.
_BACK = """if redis.call('EXISTS', KEYS[3]) == 1 then
  if redis.call('EXISTS', KEYS[1]) == 0 then
    local kind = redis.pcall('XLEN', KEYS[3])
    if type(kind) == 'table' and string.find(kind.err or '', 'WRONGTYPE', 1, true) then
      return 3 -- not a stream: someone else's key, never moved here (a first entry)
    end
    redis.set_repl(redis.REPL_NONE)
    redis.call('RENAME', KEYS[3], KEYS[1])
  end
  return 0
end
local raw, head = redis.pcall('HGETALL', KEYS[2]), {}
if raw.err ~= nil then return 2 end
for i = 1, #raw, 2 do head[raw[i]] = raw[i + 1] end
if head.id ~= ARGV[1] then return 2 end
redis.set_repl(redis.REPL_NONE)
if head.len == tostring(redis.call('XLEN', KEYS[1])) then
  redis.pcall('SPUBLISH', string.sub(KEYS[1], 1, -7) .. 'notify', head.version)
  return 1
end
redis.pcall('HSET', KEYS[2], 'id', '') -- the XADD was refused: a head of no entry, ever
return 2"""

# What the ACL checks only when it runs (not when queued): MULTI/EXEC refused, each command
# would run on its own; EXISTS or RENAME refused in step 1, the XADD would append undecided;
# RENAME back refused (its source needs read, a destination only write), the stream stays aside.
_PROBE = """local allowed = redis.acl_check_cmd
return (allowed('MULTI') and allowed('EXEC') and allowed('EXISTS', KEYS[1])
  and allowed('EXISTS', KEYS[2]) and allowed('RENAME', KEYS[1], KEYS[2])
  and allowed('RENAME', KEYS[2], KEYS[1])) and 1 or 0"""
_ASIDE_SHA, _BACK_SHA = (
    hashlib.sha1(body.encode(), usedforsecurity=False).hexdigest() for body in (_ASIDE, _BACK)
)
_Arg = bytes | str | int | float
_EXTRAS = ("audience", "rollout", "rollout_of", "rollout_sha256", "request")


def aside_key(events: str) -> str:
    """``{prefix}:{KEY}:aside``: where the stream waits for the script's consent."""
    return events[: -len("events")] + "aside"


def _fields(args: list[_Arg], version: int) -> list[tuple[str, _Arg]]:
    """The entry ``publish.lua`` appends for ``args`` at ``version``, in its order."""
    fields: list[tuple[str, _Arg]] = [
        ("schema", args[5]), ("key", args[4]), ("version", version), ("sha256", args[0]),
        ("content", args[1]), ("published_at", args[2]), ("publisher", args[3]),
    ]  # fmt: skip
    extended = len(args) > 12  # 12: the plain arguments and seen
    if extended and args[12] != "":
        fields += [("sig", args[12]), ("kid", args[13])]
    if extended and args[14] == "1":
        fields.append(("sensitive", "1"))
    for offset, name in enumerate(_EXTRAS):
        index = 16 + offset
        if len(args) > index and args[index] != "":
            fields.append((name, args[index]))
    if len(args) > 22 and args[22] != "":
        fields.append(("reason", args[22]))
    return fields


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return (int(ms), int(seq)) if ms.isdigit() and seq.isdigit() else (0, 0)


class FastPath:
    """One ``Publisher``'s transactions around Lua (see the module docstring)."""

    def __init__(self, client: redis.Redis, sha: str, history: int) -> None:
        self.client = client
        self.sha = sha  # publish.lua's
        self.history = history
        self.off = False  # the ACL refuses it: through Lua from then on
        self._offset = 0  # Redis' clock minus ours, ms, learned from refused ids
        self._lengths: dict[str, int] = {}  # stream -> its length after our last append
        self._last: dict[str, tuple[int, int]] = {}  # stream -> the id we last appended
        self._checked: set[str] = set()  # streams the ACL lets us move aside
        self._probe = client.register_script(_PROBE)
        self.lost: list[_Arg] | None = None  # the arguments of the last evalsha answer lost

    def publish(self, keys: list[str], args: list[_Arg], known: str) -> list[Any] | None:
        """The script's answer to ``args`` with the content appended by a plain ``XADD``, or
        ``None``: publish through Lua (nothing was written). ``known``: the id of the newest
        entry the caller knows of (its base), which the proposed id must be above."""
        events, content = keys[0], args[1]
        small = FAST_FROM is None or not isinstance(content, bytes) or len(content) < FAST_FROM
        if small or not self.allowed(events):
            self._lengths.pop(events, None)  # through Lua: its length after is not known
            return None
        extended = len(args) > 12  # 12: the plain arguments and seen
        expected = args[11] if extended else ""
        version = int(expected) if expected != "" else max(int(args[7]), int(args[10])) + 1
        proposal: tuple[int, str, int] | None = None
        for _attempt in range(2):
            if proposal is None:
                proposal = (version, self._next_id(events, known), self._maxlen(events))
            reply = self._transaction(keys, args, *proposal)
            if reply is None:
                self._lengths.pop(events, None)
                return None
            code = int(reply[0])
            if code == WRITTEN:
                self._lengths[events] = int(reply[3])
                self._last[events] = _id(_text(reply[2]))
                return reply[:3]
            if code == THROUGH_LUA:
                self._lengths.pop(events, None)
                return None
            if code != REFUSED:
                return reply  # decided as ever: found, superseded, pinned, conflict...
            wanted, length = _text(reply[2]), int(reply[3])
            self._offset = _id(wanted)[0] - int(time.time() * 1000)
            proposal = (int(reply[1]), wanted, self.history + (length == self.history))
        self._lengths.pop(events, None)  # refused twice (others appending): through Lua
        return None

    def evalsha(self, keys: list[str], args: list[_Arg]) -> list[Any] | None:
        """``publish.lua``'s answer on ``keys``, the ``EVALSHA`` packed here (``pack``) and
        sent on one of the client's connections: redis-py's ``Script`` call spent ~47 us
        packing 11 arguments of which 1 KiB of content, and ~50 more in its command
        machinery (one call every 2 ms: 188 against 81 us for a no-op script's round trip).
        ``None``: not loaded (``NOSCRIPT``) or the connection failed: redis-py's ``Script`` then
        (it loads it; it retries as the client says).
        Other errors as the client raises them."""
        pool = self.client.connection_pool
        connection: Any = pool.get_connection()
        try:
            connection.send_packed_command(pack([("EVALSHA", self.sha, len(keys), *keys, *args)]))
            return cast("list[Any]", connection.read_response())
        except NoScriptError:
            return None
        except ResponseError:
            raise  # refused or failed by Redis: the connection is fine
        except (ConnectionError, TimeoutError) as exc:
            connection.disconnect()  # redis-py's Script then, with the client's retry policy
            self.lost = args if may_have_run(exc) else self.lost  # publisher._unanswered
            return None
        except BaseException:
            connection.disconnect()  # a reply may be left half read
            raise
        finally:
            pool.release(connection)

    def _next_id(self, events: str, known: str) -> str:
        ms = int(time.time() * 1000) + self._offset
        last = max(self._last.get(events, (0, 0)), _id(known))
        if ms <= last[0]:
            return f"{last[0]}-{last[1] + 1}"
        return f"{ms}-0"

    def _maxlen(self, events: str) -> int:
        """An exact MAXLEN that is not the stream's length (see PROPOSAL in publish.lua):
        history, or history + 1 when the stream holds history entries (or is not known)."""
        length = self._lengths.get(events)
        return self.history + (length is None or length == self.history)

    def allowed(self, events: str) -> bool:
        """Whether the user may move ``events`` aside and back in a transaction; asked once
        per stream. The keys of the steps are checked when they are queued; ``MULTI`` and the
        commands inside a script only when they run (see ``_PROBE``)."""
        if self.off:
            return False
        if events not in self._checked:
            try:
                allowed = self._probe(keys=[events, aside_key(events)])
            except NoPermissionError as error:  # the keys, or scripts at all
                self._refused(events, error)
                return False
            except ResponseError as error:  # before Redis 7.0: no redis.acl_check_cmd
                self.off = True
                logger.info("large contents are published through Lua (%s)", error)
                return False
            if not allowed:
                refusal = "MULTI, EXEC, EXISTS or RENAME (either way) is not allowed"
                self._refused(events, NoPermissionError(refusal))
                return False
            self._checked.add(events)
        return True

    def _transaction(
        self, keys: list[str], args: list[_Arg], version: int, entry_id: str, maxlen: int
    ) -> list[Any] | None:
        events, head = keys
        aside = aside_key(events)
        fields = _fields(args, version)
        proposal: list[_Arg] = [entry_id, maxlen]
        for name, value in fields:
            if name != "content":
                proposal += [name, value]
        decide_args = [args[0], "", *args[2:], *proposal, len(args)]
        flat = [item for pair in fields for item in pair]
        packed = pack([
            ("MULTI",),
            ("SCRIPT", "LOAD", _ASIDE),  # SCRIPT LOAD, not EVAL: the shipped ACL has no EVAL
            ("SCRIPT", "LOAD", _BACK),
            ("EVALSHA", _ASIDE_SHA, 2, events, aside),
            ("EVALSHA", self.sha, 3, events, head, aside, *decide_args),
            ("XADD", events, "NOMKSTREAM", "MAXLEN", maxlen, entry_id, *flat),
            ("EVALSHA", _BACK_SHA, 3, events, head, aside, entry_id),
            ("EXEC",),
        ])  # fmt: skip
        try:
            answers = self._send(packed)
        except NoPermissionError as refusal:  # queued commands refused: nothing ran
            self._refused(events, refusal)
            return None
        if answers is None:
            return None
        _, _, moved, reply, added, back = answers
        if isinstance(moved, Exception):  # the ACL changed since the probe: say so loudly
            self._refused(events, moved)
            logger.error(
                "%s: the stream could not be moved aside (%s): the XADD queued after it may "
                "have appended without the publish script's decision; check %s's newest entries",
                events,
                moved,
                events,
            )
            return None
        if isinstance(back, Exception):  # the stream may be left at :aside: say how to undo
            logger.error(
                "%s: moving the stream back failed (%s); if %s exists and %s does not, "
                "RENAME %s %s",
                events,
                back,
                aside,
                events,
                aside,
                events,
            )
            raise back
        if isinstance(reply, Exception):
            return None  # NOSCRIPT (flushed, restarted) or an error: through Lua, which says
        if isinstance(added, Exception) or (int(reply[0]) == WRITTEN and added is None):
            # the script consented but Redis refused the id (above a deleted newest entry):
            # nothing written; the head it wrote does not match the stream's length
            return None
        return list(reply)

    def _send(self, packed: list[bytes | memoryview]) -> list[Any] | None:
        """The ``EXEC``'s answers (errors as exceptions), on one of the client's connections,
        packed once (a redis-py pipeline cost ~0.1 ms more here); ``None`` when the connection
        failed (the reply lost: through Lua, which finds what this may have written)."""
        pool = self.client.connection_pool
        connection: Any = pool.get_connection()
        queued: list[ResponseError] = []
        try:
            connection.send_packed_command(packed)
            for _ in range(7):  # MULTI's OK, then QUEUED or the refusal of each command
                try:
                    connection.read_response()
                except ResponseError as error:
                    queued.append(error)
            try:
                answers = connection.read_response()
            except ExecAbortError:
                answers = None
            except ResponseError:  # EXEC without MULTI: MULTI refused (queued), each ran alone
                if not queued:
                    raise
                answers = None
        except (ConnectionError, TimeoutError):
            connection.disconnect()
            return None
        except BaseException:
            connection.disconnect()
            raise
        finally:
            pool.release(connection)
        if queued:  # refused while queued (an ACL, maxmemory, loading): nothing ran
            raise queued[0]
        if not isinstance(answers, list):  # EXECABORT without a reason, or a WATCH broken
            return None
        return answers

    def _refused(self, events: str, error: Exception) -> None:
        if not self.off:
            logger.warning(
                "the Redis user may not move %s aside (%s): large contents are published "
                "through Lua, about 5x slower at 1 MiB (regenerate the ACL with "
                "deploy/redis/gen-users-acl.sh)",
                events,
                error,
            )
        self.off = True
