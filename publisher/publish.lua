-- Compare-and-publish, atomically on the server (one step, so racing publishers cannot both
-- append: done client-side, 4 racing publishers wrote 981 entries for 300 contents).
--
-- KEYS[1]  the events stream, e.g. hotreload:{app.yaml}:events
-- ARGV     sha256, content, published_at, publisher, key, schema, maxlen, floor
--          and, only for a signed or sensitive publish (extended mode):
--          expected version ('' = any), sig, kid, sensitive ('1' or ''), force ('1' or '')
--
-- If the newest entry carries the same sha256, nothing is written. Otherwise the next version
-- is max(newest version, floor) + 1: the floor is the highest version the calling publisher has
-- seen, so numbering continues after Redis lost its data while a publisher stayed alive.
-- Returns {written (0/1), version, entry id}.
--
-- Extended mode: the signature covers the version, so the publisher signs before it calls and
-- passes the version it signed for. The newest entry is "the same" only when its sha256, kid
-- and sensitive flag all match (a new signing key or a newly sensitive key is published again,
-- as the next version); if the next version is not the expected one, nothing is written and
-- {2, next version, ''} tells the publisher what to sign for on its retry. A skip returns
-- the newest entry's sig and published_at too ({0, version, id, sig, published_at}): the
-- publisher checks that signature, and if someone appended a forged copy of the content
-- (which would otherwise hold the real one back), publishes again with force = '1', which
-- skips the comparison.
local extended = #ARGV > 8
local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local last_version = 0
if #newest > 0 then
  local fields = newest[1][2]
  local sha, version
  local kid, sensitive, sig, published_at = '', '', '', ''
  for i = 1, #fields, 2 do
    if fields[i] == 'sha256' then
      sha = fields[i + 1]
    elseif fields[i] == 'version' then
      version = fields[i + 1]
    elseif fields[i] == 'kid' then
      kid = fields[i + 1]
    elseif fields[i] == 'sensitive' then
      sensitive = fields[i + 1]
    elseif fields[i] == 'sig' then
      sig = fields[i + 1]
    elseif fields[i] == 'published_at' then
      published_at = fields[i + 1]
    end
  end
  -- a malformed newest entry (no usable version) counts as version 0: the floor decides
  last_version = math.floor(tonumber(version) or 0)
  if not extended then
    if sha == ARGV[1] then
      return {0, last_version, newest[1][1]}
    end
  elseif sha == ARGV[1] and kid == ARGV[11] and sensitive == ARGV[12] and ARGV[13] ~= '1' then
    return {0, last_version, newest[1][1], sig, published_at}
  end
end
local next_version = math.max(last_version, math.floor(tonumber(ARGV[8]) or 0)) + 1
if not extended then
  local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[7], '*',
    'schema', ARGV[6], 'key', ARGV[5], 'version', string.format('%d', next_version),
    'sha256', ARGV[1], 'content', ARGV[2], 'published_at', ARGV[3], 'publisher', ARGV[4])
  return {1, next_version, id}
end
if ARGV[9] ~= '' and tonumber(ARGV[9]) ~= next_version then
  return {2, next_version, ''}
end
local entry = {'XADD', KEYS[1], 'MAXLEN', '~', ARGV[7], '*',
  'schema', ARGV[6], 'key', ARGV[5], 'version', string.format('%d', next_version),
  'sha256', ARGV[1], 'content', ARGV[2], 'published_at', ARGV[3], 'publisher', ARGV[4]}
if ARGV[10] ~= '' then
  table.insert(entry, 'sig')
  table.insert(entry, ARGV[10])
  table.insert(entry, 'kid')
  table.insert(entry, ARGV[11])
end
if ARGV[12] == '1' then
  table.insert(entry, 'sensitive')
  table.insert(entry, '1')
end
local id = redis.call(unpack(entry))
return {1, next_version, id}
