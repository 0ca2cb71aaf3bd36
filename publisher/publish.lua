-- Compare-and-publish, atomically on the server (one step, so racing publishers cannot both
-- append: done client-side, 4 racing publishers wrote 981 entries for 300 contents).
--
-- KEYS[1]  the events stream, e.g. hotreload:{app.yaml}:events
-- KEYS[2]  (optional) its HEAD, hotreload:{app.yaml}:head: a hash of the newest entry's id, the
--          stream's length after it was appended (len) and every field but the content,
--          written with every entry appended here. The newest entry's version, hash and marks
--          are read from it instead of from the entry (XREVRANGE COUNT 1 copies the content
--          into Lua: at 1 MiB that cost more than the XADD) only while it matches the stream:
--          XLEN = len and no entry newer than its id (an exclusive XREVRANGE copies nothing
--          when there is none). Otherwise, or when it is missing, damaged or refused (an ACL
--          from before the head: errors are caught), the newest entry is read as before: the
--          stream is the source of truth (entries appended without the head by older
--          publishers or anyone with XADD, a trimmed, deleted or re-created stream, a deleted
--          newest entry). publisher/_head.py says what it cannot tell.
-- ARGV     sha256, content, published_at, publisher, key, schema, maxlen, floor, base, held,
--          above and, only for a signed or sensitive publish (extended mode: more than 12):
--          expected version ('' = any), sig, kid, sensitive ('1' or ''), force ('' or an id);
--          seen (BEHIND below): ARGV[12] of a plain call, ARGV[24] in extended mode (after
--          the rollout ones, '' when none); optional (docs/design.md "Arguments" lists all).
--
-- Several publishers (one per pod) may share the stream, and kubelets on different nodes
-- update their mounts seconds apart, so a publisher can be handed a content that faster ones
-- published, and replaced, already. base is where the caller is in the stream: the id of the
-- entry its previous call returned ('' = unknown: its first call since it started); held is
-- the sha256 of the content it passed on that call ('' = unknown; extended mode: also '' when
-- its kid or sensitive flag changed since), so sha256 = held means it has nothing new: the
-- content is the same as when it was at base. floor is the highest version of the entries
-- the caller wrote or found carrying its contents (a superseded answer, below, leaves it):
-- an entry numbered above it was written by someone who had seen further. An empty or
-- missing stream is written to.
-- Otherwise nothing is written when the content is found, looking at:
--   - base = the newest entry's id, or base newer than it (Redis lost data: the content is
--     restored): the newest entry only, read first in every case, so the common case reads
--     one entry;
--   - base older than the newest entry: the entries with an id >= base (base itself may have
--     been trimmed, or lost with a Redis that restarted empty: then every retained entry),
--     newest first in pages of 16, at most maxlen + 100 of them: the caller is only catching
--     up with what faster publishers wrote. The earliest such entry is the one found, so a
--     caller that sees X -> Y -> X -> Y late follows the stream step by step instead of
--     jumping to the newest Y and then publishing the older X over it;
--   - base unknown (or not an id): the newest entry; when it does not carry the content, the
--     older ones, newest first in pages of 16 (only those after force, in extended mode), at
--     most maxlen + 100 entries in all, for the newest entry carrying the content: see below.
-- A revert (X -> Y -> X) is still written: the first publisher to see it has base = Y's entry.
-- The first call of a publisher (no base: it just started, e.g. a pod scaled up, restarted
-- or crashed) may come from a mount that lags: kubelet caches a ConfigMap up to a minute,
-- so a pod can start on an older content than other pods published already. The content is
-- then in the retained history, not as the newest entry, and what decides is who wrote the
-- entries newer than the newest one carrying it (entries carry publisher = "host:pid"; the
-- host, everything before the last ':', is the pod's name; an entry without it counts as
-- another host's):
--   - not found (a new content, or one older than the retained history): written;
--   - found as the newest entry: nothing is written, as above;
--   - found, and every newer entry written by a publisher on the caller's host: written.
--     This pod's own previous publisher wrote the newer contents and its mount has gone back
--     since: a revert seen by a publisher that restarted meanwhile (one publisher per pod);
--   - found, and some newer entry written by another host: superseded (below), nothing is
--     written: another pod has seen a newer ConfigMap, this mount lags. The caller's base
--     becomes the entry found (the reply names it), so when its kubelet catches up, through
--     any contents in between, its next calls find them at or after base, as above.
-- Not told apart: a revert (X -> Y -> X) seen only by publishers that start on it, every pod
-- replaced meanwhile: nobody publishes it until the next change (docs/design.md says more).
-- BEHIND: seen is the id of the newest entry the caller knew of BEFORE it read the content
-- ('' or not an id: unknown). With a base, a content not found after base, while the newest
-- entry is newer than both base and seen, is not written: {10, version, id} (extended: like
-- superseded), the newest entry; the caller keeps its base. Someone appended a content the
-- caller had not seen when it read its own (X -> Y -> Z: it read Y, a faster publisher
-- coalesced to Z and appended it first), so it may be older. docs/design.md "Behind": where
-- the daemon gets seen, liveness, what stays a corner.
-- A newest entry OLDER than base (Redis came back with older data: an old AOF or RDB, a
-- replica promoted before it had the last writes) is compared with alone, as said: each
-- caller restores its content if it is not the newest (docs/design.md "After a failover").
-- Exclusive ranges ('(' ids) need Redis >= 6.2.
--
-- above is the highest version the key's workers report having seen (their :workers
-- entries, read by the caller with bounds; '' or 0 = none). A newest entry numbered below it
-- means the stream is BEHIND the workers (restored from an older backup, failed over to a
-- lagging replica, re-created, or an old entry replayed at its end): workers hold their config
-- and reject anything numbered at or below what they saw, so nothing found counts then and
-- the content is written above it, whatever the rules above say. A stream that is not behind
-- never has a newest version below above, so above changes nothing else.
-- above is also read here, from the key's :floor (KEYS[1] with 'floor' for 'events', same
-- hash slot): a sorted set where every current worker (subscriber/_floorwrite.py) keeps the
-- highest version it has seen as its score (ZADD GT with each of its reports; the daemon's
-- upkeep ZREMs a worker it forgets from :workers). Its highest score within 0..MAX_VERSION
-- is max'ed into above: one O(log N) read, where the caller's read of :workers decoded every
-- worker's state (128 workers: ~2 ms of the daemon's CPU per publish). The caller passes the
-- :workers floor as above only while a :workers row is from a worker that does not write
-- :floor (publisher/_earlyfloor.py). Refused (an ACL from before :floor), not a sorted set,
-- or junk: above is the argument alone.
--
-- Otherwise the next version is max(newest version, floor, above) + 1 (the floor also keeps
-- the numbering going after Redis lost its data while the publisher stayed alive) and the
-- entry is appended, trimmed to about maxlen entries.
-- Versions are read as bounded integers: decimal digits, below 2^53 (where Lua's numbers stop
-- being exact); anything else (junk, or a version too large to count past) is a malformed
-- entry, version 0, so it never blocks the next version; a malformed newest entry is looked
-- past (at most maxlen + 100 entries) for the version to number the next one above.
-- The next version is never above 2^53 - 1 (MAX_VERSION): when it would be (only a junk entry
-- numbered MAX_VERSION, or a floor or above taken from one, gets there) nothing is written and
-- the answer is {7, that version, the id of the entry carrying it ('' when it came from the
-- floor or above), 'stream' | 'floor' | 'workers'}: the caller names it (VersionsExhausted).
-- Returns {code, version, entry id}: code 1, the appended entry; 0, the entry found carrying
-- the content; 3, superseded: the newest entry, which does not carry it; 10, behind (above).
-- The caller passes the id as base next time, except after behind (its base stays) and after
-- a first call superseded: {3, version, id, base}, base the id of the newest entry carrying
-- the content, its base from then on.
--
-- Extended mode: the signature covers the version, so the publisher signs before it calls and
-- passes the version it signed for. An entry carries the content only when its sha256, kid and
-- sensitive flag all match (a new signing key or a newly sensitive key is published again, as
-- the next version); if the next version is not the expected one, nothing is written and
-- {2, next version, ''} tells the publisher what to sign for on its retry. A skip returns the
-- entry's sig and published_at too ({0, version, id, sig, published_at}; superseded, also its
-- sha256 and kid: {3, version, id, sig, published_at, sha256, kid[, base]}): the publisher
-- checks that signature, and if someone appended a forged copy of the content (which would
-- otherwise hold the real one back) or a forged newest entry, calls again with force = that
-- entry's id: it and every older entry are then disregarded (with several forged entries,
-- each call moves past one). The entry a first call superseded finds (base) is not checked:
-- a forged copy there was written before another host's newer entry, so it can hold back
-- only a content someone knew already then; looking past it could roll back to it instead.
--
-- Rollout control (publisher/rollout.py; the design's "Rollout control") appends, extended
-- mode only: ARGV[17] audience (the JSON array of worker ids, '' = for everyone; with it the
-- caller passes schema 2), [18] rollout ('', canary, promote, halt, rollback), [19]
-- rollout_of (decimal, '' = none), [20] rollout_sha256, [21] request (the :control request
-- id carried out), [22] expect, [23] reason (one line, shown by status/history). Each non-
-- empty one is written as the entry's field of the same name (expect is not written).
--   - PINS, decided for every call without expect (a mount's content, canary or not, signed
--     or not, old argument list or new): when the newest entry is a rollback or a halt whose
--     rollout_sha256 is this content, nothing is written and the answer is {4, version, id}
--     (rollback: pinned) or {5, version, id} (halt: the halted canary content goes no
--     further). So a restarted, reconnecting, lagging or other pod's publisher whose mount
--     still shows the content rolled back from cannot put it back; a new content (another
--     sha256) is decided as ever, and ends the pin by being the newest entry.
--   - OPERATIONS (expect given: promote, halt, rollback, or a pin restored after Redis lost
--     it): expect is the version the newest entry must have ('0': an empty stream). If the
--     newest entry already is this operation (same request id, or same rollout, rollout_of,
--     rollout_sha256 and sha256): found, {0, version, id, sig, published_at}. Else if the
--     newest entry's version is not expect: {6, version, id} (moved: someone wrote since the
--     caller looked; nothing written, the caller looks again). Else the entry is written at
--     the next version, without the search above: racing daemons carrying out the same
--     decision write exactly one entry.
--   - A canary (audience, no expect) is a mount's content: found / superseded as above on
--     the content alone, whatever audience the entry found has, so racing daemons that chose
--     different audiences write one canary.
-- Decide mode (publisher/_fast.py: a content too large to pass through Lua cheaply): KEYS[3]
-- is the stream's aside key, where the transaction's first step moved the stream; ARGV holds
-- the arguments above (content '') followed by the proposal: the entry id, the exact MAXLEN
-- and the fields (all but the content, in the order below) the client's queued XADD carries,
-- then how many arguments came before the proposal. See PROPOSAL at the end.
local fast = KEYS[3] ~= nil
local nargs = fast and tonumber(ARGV[#ARGV]) or #ARGV
local function arg(i)
  if i <= nargs then
    return ARGV[i]
  end
  return nil
end
local extended = nargs > 12 -- 12 arguments: the plain ones and seen
local stream, digest, base, held = KEYS[1], ARGV[1], ARGV[9], ARGV[10]
local seen = arg(extended and 24 or 12) or '' -- BEHIND (see the header)
seen = string.match(seen, '^%d+%-%d+$') ~= nil and seen or '' -- else unknown
if fast then
  stream = KEYS[3] -- read where the stream was moved to; moved back only to write
end
local audience, rollout, rollout_of = arg(17) or '', arg(18) or '', arg(19) or ''
local rollout_sha, request, expect = arg(20) or '', arg(21) or '', arg(22) or ''
local reason = arg(23) or ''

local MAX_VERSION = 9007199254740991 -- 2^53 - 1: Lua's numbers are exact up to there

-- a version as a bounded integer: decimal digits below 2^53, else 0 (malformed)
local function bounded(text)
  if type(text) ~= 'string' or #text > 16 or string.match(text, '^%d+$') == nil then
    return 0
  end
  local number = tonumber(text)
  if number > MAX_VERSION then
    return 0
  end
  return number
end

local floor = bounded(ARGV[8])
local above = bounded(ARGV[11])
do -- and what the workers wrote to :floor (see the header on above)
  local top = redis.pcall('ZRANGE', string.sub(KEYS[1], 1, -7) .. 'floor',
    '9007199254740991', '0', 'BYSCORE', 'REV', 'LIMIT', '0', '1', 'WITHSCORES')
  local score = type(top) == 'table' and top.err == nil and tonumber(top[2])
  if score and score >= 0 and score <= MAX_VERSION then
    above = math.max(above, math.floor(score))
  end
end
local limit = math.floor(tonumber(ARGV[7]) or 0) + 100 -- entries looked at, at most
local kid, sensitive, force = '', '', ''
if extended then
  kid, sensitive, force = ARGV[14], ARGV[15], ARGV[16]
end
local forced = extended and string.match(force, '^%d+%-%d+$') ~= nil

-- the host of a publisher id ("host:pid"): everything before the last ':' (all of it if none)
local function host_of(publisher)
  return string.match(publisher, '^(.*):') or publisher
end
local own_host = host_of(ARGV[4])

-- -1, 0, 1: stream ids compared as two numbers of any length (no floating point rounding)
local function compare_ids(a, b)
  local a1, a2 = string.match(a, '^0*(%d+)%-0*(%d+)$')
  local b1, b2 = string.match(b, '^0*(%d+)%-0*(%d+)$')
  if a1 == b1 then
    a1, b1 = a2, b2
  end
  if a1 == b1 then
    return 0
  elseif #a1 ~= #b1 then
    return #a1 < #b1 and -1 or 1
  end
  return a1 < b1 and -1 or 1
end

-- an entry's version (a malformed entry counts as version 0: the floor decides), whether it
-- carries the content, (extended mode) its sig, published_at, sha256 and kid, and whether a
-- publisher on another host than the caller's wrote it (no publisher field: another)
local function read(fields)
  local sha, version, ekid, esensitive, sig, published_at = nil, nil, '', '', '', ''
  local publisher = ''
  for i = 1, #fields, 2 do
    local name = fields[i]
    if name == 'sha256' then
      sha = fields[i + 1]
    elseif name == 'version' then
      version = fields[i + 1]
    elseif name == 'publisher' then
      publisher = fields[i + 1]
    elseif extended then
      if name == 'kid' then
        ekid = fields[i + 1]
      elseif name == 'sensitive' then
        esensitive = fields[i + 1]
      elseif name == 'sig' then
        sig = fields[i + 1]
      elseif name == 'published_at' then
        published_at = fields[i + 1]
      end
    end
  end
  local carries = sha == digest and (not extended or (ekid == kid and esensitive == sensitive))
  local foreign = host_of(publisher) ~= own_host
  return bounded(version), carries, sig, published_at, sha or '', ekid, foreign
end

-- The newest entry, without its content when the head says which it is: copying a 1 MiB
-- content into Lua only to read its version and hash cost more than the XADD (see HEAD below).
local head = KEYS[2]
local HEAD_FIELDS = {'version', 'sha256', 'published_at', 'publisher', 'sig', 'kid', 'sensitive',
  'rollout', 'rollout_of', 'rollout_sha256', 'request'}
local function newest_entry()
  if head ~= nil then
    local raw = redis.pcall('HGETALL', head) -- an error (WRONGTYPE, an old ACL): no head
    if type(raw) == 'table' and raw.err == nil and #raw > 0 then
      local h = {}
      for i = 1, #raw, 2 do
        h[raw[i]] = raw[i + 1]
      end
      if h.id ~= nil and string.match(h.id, '^%d+%-%d+$') ~= nil
          and h.len == tostring(redis.call('XLEN', stream)) then
        local later = redis.call('XREVRANGE', stream, '+', '(' .. h.id, 'COUNT', 1)
        if #later > 0 then
          return later -- appended to by someone who does not write the head
        end
        local fields = {}
        for _, name in ipairs(HEAD_FIELDS) do
          if h[name] ~= nil and h[name] ~= '' then
            table.insert(fields, name)
            table.insert(fields, h[name])
          end
        end
        return {{h.id, fields}}
      end
    end
  end
  return redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
end
local newest = newest_entry()

-- the head for the entry id, the stream's length after it and the fields written: every field,
-- '' for those the entry lacks, so none of the previous entry's stays; an error (an ACL from
-- before the head) only costs the next call the full read. Neither replicated nor in the AOF: a
-- script that propagates two writes is wrapped in MULTI/EXEC, and Redis 7.0 loading its AOF
-- runs EXEC as the default user, which the shipped ACL turns off: the transaction, entry
-- included, was dropped at every restart. A replica, a failover or an AOF reload thus has an
-- older head, or none: told apart from the stream as above.
local function record_head(id, length, written)
  local record = {'HSET', head, 'id', id, 'len', tostring(length)}
  for _, name in ipairs(HEAD_FIELDS) do
    table.insert(record, name)
    table.insert(record, written[name] or '')
  end
  redis.set_repl(redis.REPL_NONE)
  local reply = redis.pcall(unpack(record))
  redis.set_repl(redis.REPL_ALL)
  return type(reply) ~= 'table' or reply.err == nil
end

-- PROPOSAL (decide mode, publisher/_fast.py). The client queued, in one MULTI: a step moving
-- the stream to KEYS[3] (so that anything but this function's consent leaves the stream key
-- missing), this script, `XADD stream NOMKSTREAM MAXLEN <n> <id> <fields>` (a no-op on a
-- missing key) and a step moving the stream back if it is still aside. The script decided to
-- write `entry`: it consents only if the queued XADD is exactly what it would append itself
-- (the same fields and values, content aside, whose sha256 it checked like any) with an id
-- above the newest entry's, within a second of Redis's clock (ids stay Redis' time, as '*'
-- makes them), and an exact MAXLEN of maxlen or maxlen + 1 that is NOT the stream's length:
-- the head it writes (len = min(length + 1, n)) then differs from XLEN whenever the XADD fails
-- after all (an id not above a deleted newest entry's), so a head never vouches for an entry
-- that is not there. Consent: write the head and move the stream back; the XADD appends and
-- is the transaction's only propagated command. Else {8, version, id wanted, length}: nothing
-- moves, the XADD is a no-op, and the client proposes again.
local function propose(entry, written, version, newest_id)
  local side = KEYS[3]
  if redis.call('EXISTS', side) == 0 then
    return {9, version, ''} -- no stream to append to (a first entry): through Lua
  end
  local id, maxlen = ARGV[nargs + 1], tonumber(ARGV[nargs + 2])
  local length = redis.call('XLEN', side)
  local time = redis.call('TIME')
  local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
  local wanted = string.format('%d-0', now) -- what '*' would make
  local newest_ms, newest_seq = string.match(newest_id, '^(%d+)%-(%d+)$')
  if newest_ms ~= nil and compare_ids(wanted, newest_id) <= 0 then
    wanted = newest_ms .. '-' .. string.format('%d', tonumber(newest_seq) + 1)
  end
  local n = math.floor(tonumber(ARGV[7]) or 0)
  local fits = (maxlen == n or maxlen == n + 1) and maxlen ~= length
    and #ARGV - nargs - 3 == #entry - 8 and string.match(id, '^%d+%-%d+$') ~= nil
    and (newest_ms == nil or compare_ids(id, newest_id) > 0)
    and math.abs(tonumber(string.match(id, '^%d+')) - tonumber(string.match(wanted, '^%d+')))
      <= 1000
  local j = nargs + 3
  for i = 7, #entry, 2 do
    if not fits then
      break
    end
    if entry[i] ~= 'content' then
      fits = ARGV[j] == entry[i] and ARGV[j + 1] == entry[i + 1]
      j = j + 2
    end
  end
  if not fits then
    return {8, version, wanted, length}
  end
  local after = math.min(length + 1, maxlen)
  if not record_head(id, after, written) then
    return {9, version, ''} -- the head is refused or not a hash: through Lua
  end
  redis.set_repl(redis.REPL_NONE)
  redis.call('RENAME', side, KEYS[1])
  redis.set_repl(redis.REPL_ALL)
  return {1, version, id, after}
end

-- the newest entry's rollout marks: pins and operations (see the header)
local mark = {version = 0, id = '', sha = '', rollout = '', of = '', of_sha = '', request = '',
  sig = '', published_at = ''}
if #newest > 0 then
  mark.id = newest[1][1]
  local fields = newest[1][2]
  for i = 1, #fields, 2 do
    local name, value = fields[i], fields[i + 1]
    if name == 'version' then
      mark.version = bounded(value)
    elseif name == 'sha256' then
      mark.sha = value
    elseif name == 'rollout' then
      mark.rollout = value
    elseif name == 'rollout_of' then
      mark.of = value
    elseif name == 'rollout_sha256' then
      mark.of_sha = value
    elseif name == 'request' then
      mark.request = value
    elseif name == 'sig' then
      mark.sig = value
    elseif name == 'published_at' then
      mark.published_at = value
    end
  end
end
if expect == '' then
  if (mark.rollout == 'rollback' or mark.rollout == 'halt') and mark.of_sha == digest then
    return {mark.rollout == 'rollback' and 4 or 5, mark.version, mark.id}
  end
else
  if #newest > 0 and ((request ~= '' and mark.request == request) or (mark.rollout == rollout
      and mark.of == rollout_of and mark.of_sha == rollout_sha and mark.sha == digest)) then
    return {0, mark.version, mark.id, mark.sig, mark.published_at}
  end
  if string.format('%d', mark.version) ~= expect then
    return {6, mark.version, mark.id}
  end
  newest = {} -- written at the next version, nothing searched
end
local last_version, last_id = 0, ''
local code, found_id, found_version, found_sig, found_at = 0, nil, 0, '', ''
local found_sha, found_kid = '', ''
local origin = nil -- no base, superseded: the id of the newest entry carrying the content
if #newest > 0 then
  local newest_id = newest[1][1]
  local version, carries, sig, published_at, sha, ekid, foreign = read(newest[1][2])
  last_version, last_id = version, newest_id
  if version == 0 then
    -- a malformed newest entry (junk, a version too large to count past) is skipped like
    -- any malformed one: the numbering goes on from the newest well-formed entry before it
    local upper, seen = '(' .. newest_id, 1
    while last_version == 0 and seen < limit do
      local count = math.min(16, limit - seen)
      local page = redis.call('XREVRANGE', stream, upper, '-', 'COUNT', count)
      for i = 1, #page do
        local entry_version = read(page[i][2])
        if entry_version > 0 then
          last_version, last_id = entry_version, page[i][1]
          break
        end
      end
      seen = seen + #page
      if #page < count then
        break
      end
      upper = '(' .. page[#page][1]
    end
  end
  local known = string.match(base, '^%d+%-%d+$') ~= nil
  local after = known and compare_ids(newest_id, base) or 0 -- the newest vs base
  local window = false -- whether entries at or after base (or after force) were looked at
  local disregarded = forced and compare_ids(newest_id, force) <= 0
  if known and (after > 0 or forced) then
    local lower = base
    if forced and compare_ids(force, base) >= 0 then
      lower = '(' .. force
    end
    local upper, seen, count = '+', 0, 16
    repeat
      count = math.min(count, limit - seen)
      local page = redis.call('XREVRANGE', stream, upper, lower, 'COUNT', count)
      for i = 1, #page do
        local entry_version, entry_carries, entry_sig, entry_published_at = read(page[i][2])
        if entry_carries then -- newest first: the earliest wins
          found_id, found_version = page[i][1], entry_version
          found_sig, found_at = entry_sig, entry_published_at
        end
      end
      window = window or #page > 0
      seen = seen + #page
      if #page > 0 then
        upper = '(' .. page[#page][1]
      end
    until #page < count or seen >= limit
  elseif not known and not carries and not disregarded then
    -- no base: the newest entry carrying the content, looking newest first (after force),
    -- and whether a publisher on another host wrote any entry newer than it
    local lower = forced and '(' .. force or '-'
    local upper, seen, count = '(' .. newest_id, 1, 16
    while origin == nil and seen < limit do
      count = math.min(count, limit - seen)
      local page = redis.call('XREVRANGE', stream, upper, lower, 'COUNT', count)
      for i = 1, #page do
        local _, entry_carries, _, _, _, _, entry_foreign = read(page[i][2])
        if entry_carries then
          origin = page[i][1]
          break
        end
        foreign = foreign or entry_foreign
      end
      seen = seen + #page
      if #page < count then
        break
      end
      upper = '(' .. page[#page][1]
    end
    if origin ~= nil and not foreign then
      origin = nil -- this host's own previous publisher wrote every newer entry: a revert
    end
  end
  -- else, or when the window was empty (base newer than the newest entry, nothing newer
  -- than a forged entry): the newest entry alone
  if not window and carries and not disregarded then
    found_id, found_version, found_sig, found_at = newest_id, version, sig, published_at
  end
  -- not found: superseded (see the header) when nothing changed since base and the newest
  -- entry was written by someone who had seen further, or, without a base, when another host
  -- wrote after the newest entry carrying the content
  -- BEHIND (see the header): an entry after base the caller had not seen when it read
  local behind = known and after > 0 and seen ~= '' and compare_ids(newest_id, seen) > 0
  if found_id == nil and not disregarded and (origin ~= nil or behind
      or (known and digest == held and after >= 0 and version > floor)) then
    found_id, found_version, found_sig, found_at = newest_id, version, sig, published_at
    code, found_sha, found_kid = behind and 10 or 3, sha, ekid
  end
end
if last_version < above then
  found_id, code = nil, 0 -- the stream is behind the workers: write above them (see the header)
end
if found_id ~= nil then
  if code == 3 and origin ~= nil then -- the caller's base becomes the content's entry
    if not extended then
      return {code, found_version, found_id, origin}
    end
    return {code, found_version, found_id, found_sig, found_at, found_sha, found_kid, origin}
  elseif not extended then
    return {code, found_version, found_id}
  elseif code == 3 or code == 10 then
    return {code, found_version, found_id, found_sig, found_at, found_sha, found_kid}
  end
  return {code, found_version, found_id, found_sig, found_at}
end

if expect ~= '' then
  last_version, last_id = mark.version, mark.id -- an operation: after the newest it expected
end
local next_version = math.max(last_version, floor, above) + 1
if next_version > MAX_VERSION then
  -- no version is left above: writing 2^53 would be read as malformed by everyone (see the
  -- header); the caller refuses, naming where the highest version came from
  local source = 'stream'
  if floor > last_version and floor >= above then
    source, last_id = 'floor', ''
  elseif above > last_version then
    source, last_id = 'workers', ''
  end
  return {7, math.max(last_version, floor, above), last_id, source}
end
if extended and arg(12) ~= '' and tonumber(arg(12)) ~= next_version then
  return {2, next_version, ''}
end
local entry = {'XADD', stream, 'MAXLEN', '~', ARGV[7], '*',
  'schema', ARGV[6], 'key', ARGV[5], 'version', string.format('%d', next_version),
  'sha256', digest, 'content', ARGV[2], 'published_at', ARGV[3], 'publisher', ARGV[4]}
local written = {version = string.format('%d', next_version), sha256 = digest,
  published_at = ARGV[3], publisher = ARGV[4]}
if extended and arg(13) ~= '' then
  table.insert(entry, 'sig')
  table.insert(entry, arg(13))
  table.insert(entry, 'kid')
  table.insert(entry, kid)
  written.sig, written.kid = arg(13), kid
end
if sensitive == '1' then
  table.insert(entry, 'sensitive')
  table.insert(entry, '1')
  written.sensitive = '1'
end
for i, name in ipairs({'audience', 'rollout', 'rollout_of', 'rollout_sha256', 'request'}) do
  if arg(16 + i) ~= nil and arg(16 + i) ~= '' then
    table.insert(entry, name)
    table.insert(entry, arg(16 + i))
    written[name] = arg(16 + i)
  end
end
if reason ~= '' then
  table.insert(entry, 'reason')
  table.insert(entry, reason)
end
if fast then
  return propose(entry, written, next_version, mark.id)
end
local id = redis.call(unpack(entry))
if head ~= nil then
  record_head(id, redis.call('XLEN', stream), written)
end
-- tell a Redis Cluster's subscribers (SSUBSCRIBEd per master, subscriber/_clusterhub.py); pcall:
-- a refused SPUBLISH (an older ACL) never fails a publish whose XADD happened. Not propagated
-- as a command either (REPL_NONE; a cluster forwards it over its bus): a second propagated
-- command would wrap the XADD in MULTI/EXEC, dropped at an AOF load (see HEAD above).
redis.set_repl(redis.REPL_NONE)
redis.pcall('SPUBLISH', string.sub(stream, 1, -7) .. 'notify', string.format('%d', next_version))
redis.set_repl(redis.REPL_ALL)
return {1, next_version, id}
