-- The store's epoch (see epoch.rs): made if missing, then read, in one step.
-- KEYS[1]: the epoch key ({prefix}:epoch). ARGV[1]: a fresh random epoch, used if none exists.
-- Replies the epoch stored. No expiry: it lives as long as the data of this Redis.
redis.call('SET', KEYS[1], ARGV[1], 'NX')
return redis.call('GET', KEYS[1])
