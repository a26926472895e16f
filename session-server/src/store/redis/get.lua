-- Reads a session and slides its expiry by its stored ttl (no other write; a record of the
-- other format is rewritten in WRITE_FORMAT). A read without a slide needs no script: the
-- store pipelines PTTL and GET.
-- KEYS[1]: session key. No ARGV.
-- Replies {'notfound'}, {'corrupt', reason} or {'ok', ttl, format-2 string}: the ttl just set
-- is the PTTL.
local h, packed = load_session(KEYS[1])
if not h then
  return missing(packed)
end
return {'ok', tonumber(h['ttl']), slide_session(KEYS[1], h, packed)}
