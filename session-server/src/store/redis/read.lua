-- Reads a session in one atomic step, whichever format it is stored in, writing nothing: the
-- fallback of a plain read whose first try met the other format (see `read` in ../redis.rs).
-- KEYS[1]: session key. No ARGV.
-- Replies {'notfound'}, {'corrupt', reason} or {'ok', PTTL, format-2 string}.
local h, packed = load_session(KEYS[1])
if not h then
  return missing(packed)
end
return reply_session(KEYS[1], h, packed)
