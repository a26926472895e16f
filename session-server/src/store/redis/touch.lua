-- Slides a session's expiry; a given ttl becomes its stored ttl. Version unchanged.
-- KEYS[1]: session key. ARGV: ttl_ms ('' keeps the stored one).
-- Replies {'notfound'}, {'corrupt', reason} or the session.
local h, reason = load_session(KEYS[1])
if not h then
  return missing(reason)
end
local ttl = h['ttl']
if ARGV[1] ~= '' then
  ttl = ARGV[1]
  redis.call('HSET', KEYS[1], 'ttl', ttl)
end
redis.call('PEXPIRE', KEYS[1], ttl)
return reply_session(KEYS[1])
