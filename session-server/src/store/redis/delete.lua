-- Deletes a session, optionally only if it still has a given version or owner, and leaves a
-- tombstone {op, user, ver} for one ttl of the session (at least tombstone_ms): restore.lua
-- refuses to bring a deleted id back, and the same call retried by a cluster client after a
-- lost reply (same op) is answered as the delete it made, not as "not found".
-- KEYS[1]: session key; KEYS[2]: its tombstone key (same hash slot).
-- ARGV: channel, ns, id, now_ms, expected_version ('' for any), check_user ('1' or '0'), user,
--       event_version ('' for the stored one; regenerate reports the new id's version),
--       op (this call's unique id, '' for none), tombstone_ms.
-- Replies {'notfound'}, {'corrupt', reason}, {'mismatch'} (other owner),
-- {'conflict', stored_version} or {'ok', user, version}.
local h, reason = load_session(KEYS[1])
if not h then
  if not reason and ARGV[9] ~= '' then
    local t = redis.call('HMGET', KEYS[2], 'op', 'user', 'ver')
    if t[1] == ARGV[9] then
      return {'ok', t[2], t[3]}
    end
  end
  return missing(reason)
end
if ARGV[6] == '1' and h['user'] ~= ARGV[7] then
  return {'mismatch'}
end
if ARGV[5] ~= '' and tonumber(ARGV[5]) ~= tonumber(h['ver']) then
  return {'conflict', h['ver']}
end
redis.call('DEL', KEYS[1])
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], 'op', ARGV[9], 'user', h['user'], 'ver', h['ver'])
redis.call('PEXPIRE', KEYS[2], math.max(tonumber(h['ttl']), tonumber(ARGV[10])))
local event_version = h['ver']
if ARGV[8] ~= '' then
  event_version = ARGV[8]
end
publish(ARGV[1], 'deleted', ARGV[2], ARGV[3], h['user'], event_version, ARGV[4])
return {'ok', h['user'], h['ver']}
