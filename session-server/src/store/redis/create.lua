-- Creates a session (also the new id of a regenerate).
-- KEYS[1]: session key.
-- ARGV: channel, ns, id, now_ms, ttl_ms, max_bytes, user, created_ms, version,
--       op (this call's unique id, '' for none), created_ns (nanoseconds past created_ms),
--       then attribute key/value pairs.
-- Before ARGV, optionally: the session cap (see take_cap in common.lua), removed here.
-- Replies {'taken'}, {'toolarge', size}, {'capped'} or the session ({'ok', ttl, format-2
-- string}) followed by how many
-- sessions the cap evicted. A session this very call wrote (same op: a cluster client retried
-- the call after a lost reply) is answered as created.
local cap = take_cap()
if redis.call('EXISTS', KEYS[1]) == 1 then
  local h, packed = load_session(KEYS[1])
  if h and ARGV[10] ~= '' and h['op'] == ARGV[10] then
    return reply_session(KEYS[1], h, packed)
  end
  return {'taken'}
end
local size = 0
for i = 12, #ARGV, 2 do
  if string.byte(ARGV[i], 1) ~= 0 then
    size = size + #ARGV[i] + #ARGV[i + 1]
  end
end
if size > tonumber(ARGV[6]) then
  return {'toolarge', size}
end
local evicted = admit(cap, ARGV[7], ARGV[3], ARGV[1], ARGV[2], ARGV[4])
if not evicted then
  return {'capped'}
end
local h = {user = ARGV[7], ver = ARGV[9], created = ARGV[8], ttl = ARGV[5]}
if ARGV[10] ~= '' then
  h['op'] = ARGV[10]
end
if ARGV[11] ~= '0' then
  h['created_ns'] = ARGV[11]
end
for i = 12, #ARGV, 2 do
  h['a:' .. ARGV[i]] = ARGV[i + 1]
end
local stored = store_session(KEYS[1], h)
publish(ARGV[1], 'created', ARGV[2], ARGV[3], ARGV[7], ARGV[9], ARGV[4])
return {'ok', tonumber(ARGV[5]), stored, evicted}
