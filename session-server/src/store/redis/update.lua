-- Applies an attribute-level patch: removals first, then sets; bumps the version, slides the
-- expiry. The size limit applies to the merged attributes; over it nothing is written.
-- KEYS[1]: session key.
-- ARGV: channel, ns, id, now_ms, max_bytes, expected_version ('' for none),
--       set_user ('1' or '0'), user, ttl_ms ('' keeps the stored one), n (number of set pairs),
--       op (this call's unique id, '' for none), then n key/value pairs to set, then the keys
--       to remove.
-- Before ARGV, optionally: the session cap (see take_cap in common.lua), removed here; it
-- applies when the patch gives the session another user.
-- Replies {'notfound'}, {'corrupt', reason}, {'conflict', stored_version},
-- {'toolarge', size}, {'capped'} or the session ({'ok', ttl, format-2 string}) followed by
-- the previous user and how many sessions the cap evicted. If the last write was this
-- very call (same op: a cluster client retried it after a lost reply), nothing is written again
-- and the session is the reply, as if just written.
local cap = take_cap()
local h, packed = load_session(KEYS[1])
if not h then
  return missing(packed)
end
if ARGV[11] ~= '' and h['op'] == ARGV[11] then
  local reply = reply_session(KEYS[1], h, packed)
  reply[4] = h['user']
  return reply
end
if ARGV[6] ~= '' and tonumber(ARGV[6]) ~= tonumber(h['ver']) then
  return {'conflict', h['ver']}
end
local n = tonumber(ARGV[10])
local merged = {}
for f, v in pairs(h) do
  if string.sub(f, 1, 2) == 'a:' then
    merged[f] = v
  end
end
local dels = {}
for i = 12 + 2 * n, #ARGV do
  local f = 'a:' .. ARGV[i]
  if merged[f] then
    merged[f] = nil
    dels[#dels + 1] = f
  end
end
local sets = {}
for i = 12, 11 + 2 * n, 2 do
  local f = 'a:' .. ARGV[i]
  merged[f] = ARGV[i + 1]
  sets[#sets + 1] = f
  sets[#sets + 1] = ARGV[i + 1]
end
-- The server's own attributes (a name starting with NUL) are not counted (see attrs_size).
local size = 0
for f, v in pairs(merged) do
  if string.byte(f, 3) ~= 0 then
    size = size + #f - 2 + #v
  end
end
if size > tonumber(ARGV[5]) then
  return {'toolarge', size}
end
local evicted = 0
if ARGV[7] == '1' and ARGV[8] ~= h['user'] then
  evicted = admit(cap, ARGV[8], ARGV[3], ARGV[1], ARGV[2], ARGV[4])
  if not evicted then
    return {'capped'}
  end
end
local old_user = h['user']
for _, f in ipairs(dels) do
  h[f] = nil
end
for i = 1, #sets, 2 do
  h[sets[i]] = sets[i + 1]
end
if ARGV[7] == '1' then
  h['user'] = ARGV[8]
end
if ARGV[9] ~= '' then
  h['ttl'] = ARGV[9]
end
if ARGV[11] ~= '' then
  h['op'] = ARGV[11]
end
h['ver'] = string.format('%.0f', tonumber(h['ver']) + 1)
local stored = store_session(KEYS[1], h)
publish(ARGV[1], 'updated', ARGV[2], ARGV[3], h['user'], h['ver'], ARGV[4])
return {'ok', tonumber(h['ttl']), stored, old_user, evicted}
