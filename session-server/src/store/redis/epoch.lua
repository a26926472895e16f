-- The store's epoch (see epoch.rs): read, and made only if missing, in one step.
-- KEYS[1]: the epoch key ({prefix}:epoch). ARGV[1]: a fresh random epoch, used if none exists.
-- Replies the epoch stored. No expiry: it lives as long as the data of this Redis. Read first,
-- so the common case (every NOT_FOUND and Restore reads it) runs no write command.
local epoch = redis.call('GET', KEYS[1])
if epoch then
  return epoch
end
redis.call('SET', KEYS[1], ARGV[1])
return ARGV[1]
