-- Compare-and-publish, atomically on the server (one step, so racing publishers cannot both
-- append: done client-side, 4 racing publishers wrote 981 entries for 300 contents).
--
-- KEYS[1]  the events stream, e.g. hotreload:{app.yaml}:events
-- ARGV     sha256, content, published_at, publisher, key, schema, maxlen, floor
--
-- If the newest entry carries the same sha256, nothing is written. Otherwise the next version
-- is max(newest version, floor) + 1: the floor is the highest version the calling publisher has
-- seen, so numbering continues after Redis lost its data while a publisher stayed alive.
-- Returns {written (0/1), version, entry id}.
local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local last_version = 0
if #newest > 0 then
  local fields = newest[1][2]
  local sha, version
  for i = 1, #fields, 2 do
    if fields[i] == 'sha256' then
      sha = fields[i + 1]
    elseif fields[i] == 'version' then
      version = fields[i + 1]
    end
  end
  -- a malformed newest entry (no usable version) counts as version 0: the floor decides
  last_version = math.floor(tonumber(version) or 0)
  if sha == ARGV[1] then
    return {0, last_version, newest[1][1]}
  end
end
local next_version = math.max(last_version, math.floor(tonumber(ARGV[8]) or 0)) + 1
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[7], '*',
  'schema', ARGV[6], 'key', ARGV[5], 'version', string.format('%d', next_version),
  'sha256', ARGV[1], 'content', ARGV[2], 'published_at', ARGV[3], 'publisher', ARGV[4])
return {1, next_version, id}
