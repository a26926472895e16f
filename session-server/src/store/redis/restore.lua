-- Recreates a session from a client's snapshot, for a store that lost it (another epoch, see
-- ../redis.rs): at version 1, with the snapshot's owner, attributes and created time, expiring
-- one ttl from now. Refused while the id's tombstone lives (deleted less than one ttl ago), and
-- when the id holds a session (restored already: the store wins). An undecodable record is
-- never overwritten. A retry of this very call (same op: a cluster client resent it after a
-- lost reply) finds its own session and is answered as created.
-- KEYS[1]: session key; KEYS[2]: its tombstone key (same hash slot).
-- ARGV: channel, ns, id, now_ms, max_bytes, user, created_ms, ttl_ms,
--       created_ns (nanoseconds past created_ms), op ('' for none), then attribute key/value
--       pairs.
-- Before ARGV, optionally: the session cap (see take_cap in common.lua), removed here.
-- Replies {'deleted'}, {'corrupt', reason}, {'conflict', stored_version}, {'toolarge', size},
-- {'capped'} or the session followed by how many sessions the cap evicted.
local cap = take_cap()
if redis.call('EXISTS', KEYS[2]) == 1 then
  return {'deleted'}
end
local h, packed = load_session(KEYS[1])
if not h and packed then
  return {'corrupt', packed}
end
if h then
  if ARGV[10] ~= '' and h['op'] == ARGV[10] then
    return reply_session(KEYS[1], h, packed)
  end
  return {'conflict', h['ver']}
end
local size = 0
for i = 11, #ARGV, 2 do
  if string.byte(ARGV[i], 1) ~= 0 then
    size = size + #ARGV[i] + #ARGV[i + 1]
  end
end
if size > tonumber(ARGV[5]) then
  return {'toolarge', size}
end
local evicted = admit(cap, ARGV[6], ARGV[3], ARGV[1], ARGV[2], ARGV[4])
if not evicted then
  return {'capped'}
end
h = {user = ARGV[6], ver = '1', created = ARGV[7], ttl = ARGV[8]}
if ARGV[9] ~= '0' then
  h['created_ns'] = ARGV[9]
end
if ARGV[10] ~= '' then
  h['op'] = ARGV[10]
end
for i = 11, #ARGV, 2 do
  h['a:' .. ARGV[i]] = ARGV[i + 1]
end
local stored = store_session(KEYS[1], h)
publish(ARGV[1], 'created', ARGV[2], ARGV[3], ARGV[6], 1, ARGV[4])
return {'ok', tonumber(ARGV[8]), stored, evicted}
