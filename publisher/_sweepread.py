"""The sweep's reads in one script call (``publisher.upkeep``): the newest version of a slice
of streams and the workers' floor of a slice of ``:workers`` hashes, computed in Redis.

Reading 32 idle workers' states (~300 bytes each) into Python every sweep, then the versions
of the keys they were above in a second call, was half of the loop's CPU in an idle daemon
with 32 workers (yappi, ``profile_idle --workers 32``); the script returns a few bytes a key.
A module of its own: ``publisher.upkeep`` decides when and what, this says how it is read
and which keys it shows behind their workers (``behind_workers``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

import redis

from publisher._floor import LUA_FLOOR, parse_version, read_workers_seen
from subscriber.keys import StreamKeys

__all__ = ["NEWEST_VERSIONS", "behind_workers", "per_key", "versions"]

# The sweep's reads, in one call: ARGV[1] streams (KEYS[1..n]) whose newest entry's version is
# wanted -- '-' when the stream does not exist, else its newest entry's version field ('' when
# it has none, or the stream is empty), not the entry's content (up to 1 MiB) -- then triples
# of (events stream, :workers hash, :floor sorted set): {floor, holding, more, newest,
# covered} each, the workers' floor read in Redis (``LUA_FLOOR``), the stream's newest version
# as above, read only when a worker reports a version or holds (else ''), and whether
# :floor's highest score is the workers' floor (``floor_of``'s covered).
NEWEST_VERSIONS = (
    LUA_FLOOR
    + """
local cache = {}
local function newest(key)
  if cache[key] == nil then
    local found = '-'
    if redis.call('EXISTS', key) == 1 then
      found = ''
      local entries = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
      if #entries > 0 then
        local fields = entries[1][2]
        for j = 1, #fields, 2 do
          if fields[j] == 'version' then found = fields[j + 1] break end
        end
      end
    end
    cache[key] = found
  end
  return cache[key]
end
local streams = tonumber(ARGV[1])
local out = {}
for i = 1, streams do out[i] = newest(KEYS[i]) end
for i = streams + 1, #KEYS, 3 do
  local floor, holding, more, covered = floor_of(KEYS[i + 1], KEYS[i + 2])
  local version = ''
  if floor > 0 or holding == 1 or more == 1 then version = newest(KEYS[i]) end
  out[#out + 1] = {floor, holding, more, version, covered}
end
return out
"""
)


def versions(names: list[str], replies: list[Any]) -> dict[str, int | None]:
    """``NEWEST_VERSIONS``' replies by key: ``None`` for a missing stream, else its newest
    version (0: none, or junk)."""
    return {
        name: None if reply in (b"-", "-") else (parse_version(reply) or 0)
        for name, reply in zip(names, replies, strict=True)
    }


def per_key(client: Any, sha: str, calls: list[tuple[list[str], int]]) -> list[Any]:
    """Cluster: the script once per key (its keys, and how many are streams alone),
    pipelined (one round trip per master); loaded into every master first when one does
    not know it (a restarted or new node)."""
    for attempt in (1, 2):
        pipe = client.pipeline(transaction=False)
        for keys, streams in calls:
            # queued as a plain command: redis-py 8.0's ClusterPipeline refuses its evalsha()
            # method ("blocked when running redis in cluster mode"), 8.2 takes it
            pipe.execute_command("EVALSHA", sha, len(keys), *keys, streams)
        try:
            return [reply[0] for reply in pipe.execute()]
        except redis.exceptions.NoScriptError:
            if attempt == 2:
                raise
            client.script_load(NEWEST_VERSIONS)
    raise AssertionError("unreachable")


def behind_workers(
    client: Any,
    floors: Mapping[str, list[Any]],
    keys_of: Callable[[str], StreamKeys],
    renumbered: MutableMapping[str, int],
) -> list[tuple[str, int, int]]:
    """Of the keys of ``floors`` (``NEWEST_VERSIONS``' triples), those whose newest entry is
    numbered below what a worker has seen, or that have a worker holding: (key, newest
    version, floor) each. A hash of more than a page is read here, with the same bounds.

    A worker holding while the workers' floor IS the stream's newest version: its version
    there is another content than the one it applied as that version (Redis lost that entry
    and numbered another the same, ``subscriber._walk``). The content found at the head would
    be found again, and nothing written: ``renumbered[key]`` is set to the newest version + 1,
    the ``above`` the key's next publish takes (the daemon pops it), so the script writes one
    version further (one number skipped). Only then: once written, the newest is above the
    floor, and a holding row not yet rewritten is published as before (the content found).
    """
    behind = []
    for name, (first_page, holds, more, version, *_) in floors.items():
        floor, holding = int(first_page), bool(holds)
        if more:
            seen = read_workers_seen(client, keys_of(name).workers)
            floor, holding = seen.floor, bool(seen.holding)
        if not (floor or holding):
            continue
        newest = versions([name], [version])[name] or 0
        if newest < floor or holding:
            behind.append((name, newest, floor))
        if holding and newest == floor:
            renumbered[name] = newest + 1
    return behind
