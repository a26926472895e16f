-- Takes a user's session-cap lease (cluster only, see ../cap.rs) for `ms` milliseconds, unless
-- another call holds it. A call retried by the cluster client after a lost reply finds its
-- own token and has it.
-- KEYS[1]: the lease key. ARGV: token, ms. Replies 1 (taken) or 0 (held by another).
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 1
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return 1
end
return 0
