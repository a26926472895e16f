-- Ends a user's session-cap lease (cluster only, see ../cap.rs) if it still holds this
-- caller's token: a lease that ran out and was taken by another call is left to it.
-- KEYS[1]: the lease key. ARGV: token.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
