-- Reads a session; with touch, first slides its expiry by its stored ttl (no other write).
-- KEYS[1]: session key. ARGV: touch ('1' or '0').
-- Replies {'notfound'}, {'corrupt', reason} or the session.
local h, reason = load_session(KEYS[1])
if not h then
  return missing(reason)
end
if ARGV[1] == '1' then
  redis.call('PEXPIRE', KEYS[1], h['ttl'])
end
return reply_session(KEYS[1])
