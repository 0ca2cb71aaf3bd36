-- Compare-and-publish, atomically on the server (one step, so racing publishers cannot both
-- append: done client-side, 4 racing publishers wrote 981 entries for 300 contents).
--
-- KEYS[1]  the events stream, e.g. hotreload:{app.yaml}:events
-- ARGV     sha256, content, published_at, publisher, key, schema, maxlen, floor, base
--          and, only for a signed or sensitive publish (extended mode):
--          expected version ('' = any), sig, kid, sensitive ('1' or ''), force ('' or an id)
--
-- Several publishers (one per pod) may share the stream, and kubelets on different nodes
-- update their mounts seconds apart, so a publisher can be handed a content that faster ones
-- published, and replaced, already. base is where the caller is in the stream: the id of the
-- entry it wrote or found carrying its content on its previous call ('' = unknown: its first
-- call since it started). An empty or missing stream is written to. Otherwise nothing is
-- written when the content is found, looking at:
--   - base unknown (or not an id), base = the newest entry's id, or base newer than it (Redis
--     lost data: the content is restored): the newest entry only, read first in every case,
--     so the common case reads one entry;
--   - else the entries with an id >= base (base itself may have been trimmed: then the whole
--     retained history), newest first in pages of 16, at most maxlen + 100 of them: the
--     caller is only catching up with what faster publishers wrote. The earliest such entry
--     is the one found, so a caller that sees X -> Y -> X -> Y late follows the stream step
--     by step instead of jumping to the newest Y and then publishing the older X over it.
-- A revert (X -> Y -> X) is still written: the first publisher to see it has base = Y's entry.
-- Exclusive ranges ('(' ids) need Redis >= 6.2.
--
-- Otherwise the next version is max(newest version, floor) + 1 (the floor is the highest
-- version the caller has seen, so numbering continues after Redis lost its data while the
-- publisher stayed alive) and the entry is appended, trimmed to about maxlen entries.
-- Returns {written (0/1), version, entry id}: the appended entry, or the one found (the caller
-- passes that id as base next time).
--
-- Extended mode: the signature covers the version, so the publisher signs before it calls and
-- passes the version it signed for. An entry carries the content only when its sha256, kid and
-- sensitive flag all match (a new signing key or a newly sensitive key is published again, as
-- the next version); if the next version is not the expected one, nothing is written and
-- {2, next version, ''} tells the publisher what to sign for on its retry. A skip returns the
-- found entry's sig and published_at too ({0, version, id, sig, published_at}): the publisher
-- checks that signature, and if someone appended a forged copy of the content (which would
-- otherwise hold the real one back), calls again with force = that entry's id: it and every
-- older entry are then disregarded (with several forged copies, each call moves past one).
local extended = #ARGV > 9
local stream, digest, base = KEYS[1], ARGV[1], ARGV[9]
local kid, sensitive, force = '', '', ''
if extended then
  kid, sensitive, force = ARGV[12], ARGV[13], ARGV[14]
end
local forced = extended and string.match(force, '^%d+%-%d+$') ~= nil

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
-- carries the content, its sig and its published_at
local function read(fields)
  local sha, version, ekid, esensitive, sig, published_at = nil, nil, '', '', '', ''
  for i = 1, #fields, 2 do
    local name = fields[i]
    if name == 'sha256' then
      sha = fields[i + 1]
    elseif name == 'version' then
      version = fields[i + 1]
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
  return math.floor(tonumber(version) or 0), carries, sig, published_at
end

local newest = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
local last_version = 0
local found_id, found_version, found_sig, found_at = nil, 0, '', ''
if #newest > 0 then
  local newest_id = newest[1][1]
  local version, carries, sig, published_at = read(newest[1][2])
  last_version = version
  local window = false -- whether entries at or after base (or after force) were looked at
  if string.match(base, '^%d+%-%d+$') and (newest_id ~= base or forced) then
    local lower = base
    if forced and compare_ids(force, base) >= 0 then
      lower = '(' .. force
    end
    local limit = math.floor(tonumber(ARGV[7]) or 0) + 100
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
  end
  -- else, or when the window was empty (base newer than the newest entry, nothing newer
  -- than a forged entry): the newest entry alone
  if not window and carries and not (forced and compare_ids(newest_id, force) <= 0) then
    found_id, found_version, found_sig, found_at = newest_id, version, sig, published_at
  end
end
if found_id ~= nil then
  if extended then
    return {0, found_version, found_id, found_sig, found_at}
  end
  return {0, found_version, found_id}
end

local next_version = math.max(last_version, math.floor(tonumber(ARGV[8]) or 0)) + 1
if not extended then
  local id = redis.call('XADD', stream, 'MAXLEN', '~', ARGV[7], '*',
    'schema', ARGV[6], 'key', ARGV[5], 'version', string.format('%d', next_version),
    'sha256', digest, 'content', ARGV[2], 'published_at', ARGV[3], 'publisher', ARGV[4])
  return {1, next_version, id}
end
if ARGV[10] ~= '' and tonumber(ARGV[10]) ~= next_version then
  return {2, next_version, ''}
end
local entry = {'XADD', stream, 'MAXLEN', '~', ARGV[7], '*',
  'schema', ARGV[6], 'key', ARGV[5], 'version', string.format('%d', next_version),
  'sha256', digest, 'content', ARGV[2], 'published_at', ARGV[3], 'publisher', ARGV[4]}
if ARGV[11] ~= '' then
  table.insert(entry, 'sig')
  table.insert(entry, ARGV[11])
  table.insert(entry, 'kid')
  table.insert(entry, kid)
end
if sensitive == '1' then
  table.insert(entry, 'sensitive')
  table.insert(entry, '1')
end
local id = redis.call(unpack(entry))
return {1, next_version, id}
