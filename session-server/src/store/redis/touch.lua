-- Slides a session's expiry; a given ttl becomes its stored ttl. Version unchanged.
-- KEYS[1]: session key. ARGV: ttl_ms ('' keeps the stored one).
-- Replies {'notfound'}, {'corrupt', reason} or {'ok', ttl, format-2 string}.
local h, packed = load_session(KEYS[1])
if not h then
  return missing(packed)
end
if ARGV[1] ~= '' and ARGV[1] ~= h['ttl'] then
  h['ttl'] = ARGV[1]
  return {'ok', tonumber(h['ttl']), store_session(KEYS[1], h)}
end
return {'ok', tonumber(h['ttl']), slide_session(KEYS[1], h, packed)}
