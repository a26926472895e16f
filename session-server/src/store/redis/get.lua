-- Reads a session and slides its expiry by its stored ttl (no other write). A read without a
-- slide needs no script: the store pipelines PTTL and HGETALL.
-- KEYS[1]: session key. No ARGV.
-- Replies {'notfound'}, {'corrupt', reason} or {'ok', ttl, flat HGETALL}: the ttl just set is
-- the PTTL, and the fields are those load_session read (nothing else ran in between).
local h, flat = load_session(KEYS[1])
if not h then
  return missing(flat)
end
redis.call('PEXPIRE', KEYS[1], h['ttl'])
return {'ok', tonumber(h['ttl']), flat}
