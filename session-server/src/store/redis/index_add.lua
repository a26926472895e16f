-- Adds a session id to a user's index set and keeps the set alive at least as long as the
-- session (sessions slide their expiry, so every write and touch of an owned session calls it).
-- KEYS[1]: user index key. ARGV: id, ttl_ms.
redis.call('SADD', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 1
