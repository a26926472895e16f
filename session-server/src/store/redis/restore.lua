-- Makes the store hold a client's snapshot of a session (the cookie fallback's resync):
-- refused while the id's tombstone lives (deleted less than one ttl ago); the stored session
-- kept when it has the same or a newer version; otherwise the snapshot replaces or creates it,
-- at its own version and created time, expiring one ttl from now. An undecodable record is
-- never overwritten. Retrying it is harmless: a second run finds its own version stored.
-- KEYS[1]: session key; KEYS[2]: its tombstone key (same hash slot).
-- ARGV: channel, ns, id, now_ms, max_bytes, user, version, created_ms, ttl_ms,
--       created_ns (nanoseconds past created_ms), then attribute key/value pairs.
-- Replies {'deleted'}, {'corrupt', reason}, {'toolarge', size}, or the session followed by its
-- previous owner (the stored owner when it was kept; '' when there was none).
if redis.call('EXISTS', KEYS[2]) == 1 then
  return {'deleted'}
end
local h, reason = load_session(KEYS[1])
if not h and reason then
  return {'corrupt', reason}
end
if h and tonumber(h['ver']) >= tonumber(ARGV[7]) then
  local kept = reply_session(KEYS[1])
  kept[4] = h['user']
  return kept
end
local size = 0
for i = 11, #ARGV, 2 do
  size = size + #ARGV[i] + #ARGV[i + 1]
end
if size > tonumber(ARGV[5]) then
  return {'toolarge', size}
end
local fields = {'fmt', '1', 'user', ARGV[6], 'ver', ARGV[7], 'created', ARGV[8], 'ttl', ARGV[9]}
if ARGV[10] ~= '0' then
  fields[#fields + 1] = 'created_ns'
  fields[#fields + 1] = ARGV[10]
end
for i = 11, #ARGV, 2 do
  fields[#fields + 1] = 'a:' .. ARGV[i]
  fields[#fields + 1] = ARGV[i + 1]
end
redis.call('DEL', KEYS[1])
call_chunked('HSET', KEYS[1], fields, 200)
redis.call('PEXPIRE', KEYS[1], ARGV[9])
local kind, previous = 'created', ''
if h then
  kind, previous = 'updated', h['user']
end
publish(ARGV[1], kind, ARGV[2], ARGV[3], ARGV[6], ARGV[7], ARGV[4])
local reply = reply_session(KEYS[1])
reply[4] = previous
return reply
