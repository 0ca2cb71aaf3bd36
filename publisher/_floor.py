"""What a key's workers have seen: the floor every new version is numbered above.

Versions only go up, and workers hold that line: a worker never replaces its config with an
entry numbered at or below the highest version it has seen (``WorkerState.seen``, applied or
rejected). A Redis restored from an older backup, failed over to a lagging replica or
restarted empty holds a stream whose newest version is below what the workers have seen; and
a daemon that restarted at the same time remembers nothing. So the publisher learns the floor
from the workers themselves: the ``:workers`` hash, where every worker reports
max(``version``, ``rejected_version``, ``seen``). Publishing above it is what gets the
workers moving again; publishing at or below it would be rejected as a replay.

The hash is written by anyone who can write Redis, so it is read with bounds: at most
``MAX_WORKERS`` fields, values over ``MAX_STATE_BYTES`` skipped, and a version that is not
an integer in 0..``MAX_VERSION`` makes that entry malformed: skipped, so a junk entry never
blocks the next version (2^53 is where Lua's numbers, which ``publish.lua`` computes with,
stop being exact). The values are decoded loosely (only the fields read here, unknown fields
and statuses allowed): a worker newer or older than this publisher is still read.

``LUA_FLOOR`` is the same reading done inside Redis, for the daemon's sweep
(``publisher.upkeep``): the sweep read 32 workers' states every 4 s only to learn two things
(the floor, and whether one holds), and parsing the ``HSCAN`` reply (each state ~300 bytes)
and decoding each state in Python was ~0.02 % of a core, the largest part of an idle
daemon's sweep with 32 workers (``profile_idle --workers 32``, yappi). The script reads a
hash's first ``HSCAN`` page with the same bounds and rules and returns the floor, whether
a worker holds and whether there is more than a page (then the caller reads the hash here,
as ``first_page_seen`` does): Redis's ``cjson`` decodes each state. Given the key's
``:floor`` too, it also says whether that sorted set covers the hash (every row's worker
writes it, its score there at least the row's floor, or the row is ``stopped``): then the
publish script's read of ``:floor`` is the floor, and the daemon reads no ``:workers`` for
a publish (``publisher._earlyfloor``). One difference
with the rules above, for junk only: ``cjson`` does not tell ``5.0`` from ``5``, so a
version written as an integral float counts where ``msgspec`` skips it (still within
0..``MAX_VERSION``, so it never blocks a version).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import msgspec

if TYPE_CHECKING:
    from publisher._admin import AnyRedis

__all__ = [
    "LUA_FLOOR",
    "MAX_STATE_BYTES",
    "MAX_VERSION",
    "MAX_WORKERS",
    "WorkersSeen",
    "bounded",
    "first_page_seen",
    "parse_version",
    "read_workers",
    "read_workers_seen",
    "scan_first_page",
]

MAX_VERSION = 2**53 - 1  # the highest version Lua (doubles) and JSON readers keep exact
MAX_WORKERS = 10_000  # :workers fields read per key, at most
MAX_STATE_BYTES = 16 * 1024  # a WorkerState is a few hundred bytes; its error is one line
_SCAN_COUNT = 500

# Lua: ``floor_of(key[, zkey])`` -> ``floor, holding (0/1), more (0/1: the hash has more than
# a page), covered (0/1)``, from the first HSCAN page of a :workers hash, with the rules of
# ``_seen`` (see the module docstring). A field is skipped when its value is over
# MAX_STATE_BYTES, is not a JSON object or has a field read here of another type (null
# included), or a version outside 0..MAX. ``covered`` (only with ``zkey``, the key's :floor):
# every row read is a worker that writes :floor with a score there at least its floor, or
# one stopped, and the hash has no more than a page: :floor's highest score is then the
# workers' floor (``publisher._earlyfloor``); a refused ZSCORE (an older ACL) is not covered.
LUA_FLOOR = f"""
local function version_of(v)
  if v == nil then return 0 end
  if type(v) ~= 'number' or v ~= math.floor(v) or v < 0 or v > {MAX_VERSION} then
    return nil
  end
  return v
end
local function text(v)
  return v == nil or type(v) == 'string'
end
-- 1 when this row's floor is in zkey (the key's :floor) and will stay there: its worker
-- writes :floor (state.floor) and its score is at least what the row says it saw; or it
-- stopped (it reads nothing more, whatever it saw)
local function in_zset(zkey, worker, state, v, r, s)
  if state.floor ~= true then
    return state.status == 'stopped' and 1 or 0
  end
  local top = math.max(v, r, s)
  if top == 0 then return 1 end
  local score = redis.pcall('ZSCORE', zkey, worker)
  return type(score) == 'string' and (tonumber(score) or -1) >= top and 1 or 0
end
local function floor_of(key, zkey)
  local floor, holding, covered = 0, 0, zkey and 1 or 0
  local page = redis.call('HSCAN', key, '0', 'COUNT', {_SCAN_COUNT})
  local items = page[2]
  for i = 2, math.min(#items, {2 * MAX_WORKERS}), 2 do
    local value = items[i]
    if #value <= {MAX_STATE_BYTES} then
      local ok, state = pcall(cjson.decode, value)
      if ok and type(state) == 'table' and text(state.status) and text(state.error) then
        local v = version_of(state.version)
        local r = version_of(state.rejected_version)
        local s = version_of(state.seen)
        if v and r and s then
          floor = math.max(floor, v, r, s)
          if state.status == 'holding' then holding = 1 end
          if zkey and covered == 1 then covered = in_zset(zkey, items[i - 1], state, v, r, s) end
        end
      end
    end
  end
  if page[1] ~= '0' then covered = 0 end
  return floor, holding, page[1] == '0' and 0 or 1, covered
end
"""


class _Reported(msgspec.Struct, kw_only=True):
    """The fields of a ``WorkerState`` the floor needs, decoded loosely (see the docstring)."""

    status: str = ""
    version: int = 0
    rejected_version: int = 0
    seen: int = 0
    error: str = ""


_decoder = msgspec.json.Decoder(_Reported)


def parse_version(value: object) -> int | None:
    """A version as a bounded integer (0..``MAX_VERSION``), or ``None`` if it is not one:
    an ``int`` (not a bool), or decimal digits as ``str`` / ``bytes`` (at most 16)."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if isinstance(value, str):
        if not (0 < len(value) <= 16 and value.isascii() and value.isdigit()):
            return None
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if 0 <= value <= MAX_VERSION else None


@dataclass(frozen=True, slots=True)
class WorkersSeen:
    """The highest version any worker of a key reports having seen, and who holds.

    ``holding`` maps a worker whose status is ``"holding"`` (the stream is behind it) to its
    reason; ``skipped`` counts the entries that were malformed or oversized, ``rows`` all.
    """

    floor: int = 0
    holding: tuple[tuple[str, str], ...] = ()
    skipped: int = 0
    rows: int = 0  # fields read (skipped included): what the floor cost to read


def read_workers(client: AnyRedis, workers_key: str) -> Iterator[tuple[bytes, bytes | None]]:
    """The fields of a ``:workers`` hash and their values, read with bounds: at most
    ``MAX_WORKERS`` fields (``HSCAN``, a page at a time, never the whole hash at once), a
    value over ``MAX_STATE_BYTES`` (or not bytes) as ``None``. Every reader of the hash uses
    this: the daemon's floor and upkeep, ``status`` and ``wait``."""
    yield from bounded(client.hscan_iter(workers_key, count=_SCAN_COUNT))


def read_workers_seen(client: AnyRedis, workers_key: str) -> WorkersSeen:
    """Read ``workers_key`` (a ``:workers`` hash) with bounds; see the module docstring."""
    return _seen(read_workers(client, workers_key))


def scan_first_page(pipe: Any, key: str) -> None:
    """Queue the first ``HSCAN`` page of ``:workers`` hash ``key`` on ``pipe``."""
    pipe.hscan(key, 0, count=_SCAN_COUNT)


def first_page_seen(client: AnyRedis, key: str, reply: Any) -> WorkersSeen:
    """:func:`read_workers_seen` of ``key`` from its first page's ``reply``: the rest of a
    hash larger than a page is read now, with the same bounds."""
    cursor, page = reply
    if int(cursor):
        return read_workers_seen(client, key)
    return _seen(bounded(page.items()))


def bounded(pairs: Iterable[tuple[object, object]]) -> Iterator[tuple[bytes, bytes | None]]:
    """Fields and values of a ``:workers`` hash as read (``HSCAN`` pages), with the bounds
    of :func:`read_workers`."""
    for read, (raw_field, raw_value) in enumerate(pairs, 1):
        if read > MAX_WORKERS:
            return
        field = raw_field if isinstance(raw_field, bytes) else str(raw_field).encode()
        fits = isinstance(raw_value, bytes) and len(raw_value) <= MAX_STATE_BYTES
        yield field, cast("bytes", raw_value) if fits else None


def _seen(pairs: Iterable[tuple[bytes, bytes | None]]) -> WorkersSeen:
    floor, skipped, rows = 0, 0, 0
    holding: list[tuple[str, str]] = []
    for rows, (raw_field, raw_value) in enumerate(pairs, 1):  # noqa: B007 - counted
        if raw_value is None:
            skipped += 1
            continue
        try:
            state = _decoder.decode(raw_value)
        except (msgspec.DecodeError, msgspec.ValidationError):
            skipped += 1
            continue
        versions = [parse_version(v) for v in (state.version, state.rejected_version, state.seen)]
        if any(v is None for v in versions):
            skipped += 1
            continue
        floor = max(floor, *(v for v in versions if v is not None))
        if state.status == "holding":
            worker = raw_field.decode("utf-8", "replace")
            holding.append((worker, state.error[:200]))
    return WorkersSeen(floor, tuple(sorted(holding)), skipped, rows)
