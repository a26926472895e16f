-- Helpers prepended to every session script of the Redis store (see ../redis.rs).
-- A session is one hash: fmt ("1"), user, ver, created (unix ms), optional created_ns
-- (nanoseconds past that millisecond, for a restored snapshot's exact time), ttl (ms), optional
-- op (unique id of the last write call, cluster only), and one
-- "a:<key>" field per attribute. Every script touches only its one session key (KEYS[1]).

-- Reads the session hash at `key`. Returns (fields, flat HGETALL) for a record this code
-- understands, (nil, nil) when there is none, and (nil, reason) when it cannot be decoded
-- (unknown format, bad numbers, wrong type): such a record is never read or overwritten.
local function load_session(key)
  local flat = redis.pcall('HGETALL', key)
  if type(flat) ~= 'table' or flat['err'] then
    return nil, 'not a hash'
  end
  if #flat == 0 then
    return nil, nil
  end
  local h = {}
  for i = 1, #flat, 2 do
    h[flat[i]] = flat[i + 1]
  end
  if h['fmt'] ~= '1' then
    return nil, 'unknown format ' .. tostring(h['fmt'])
  end
  if not h['user'] then
    return nil, 'no user field'
  end
  if not (h['ver'] and string.match(h['ver'], '^%d+$')) then
    return nil, 'bad ver'
  end
  if not (h['created'] and string.match(h['created'], '^%d+$')) then
    return nil, 'bad created'
  end
  -- a ttl of 0 would make PEXPIRE delete the session
  if not (h['ttl'] and string.match(h['ttl'], '^[1-9]%d*$')) then
    return nil, 'bad ttl'
  end
  return h, flat
end

-- The reply for a session that cannot be read: absent or undecodable.
local function missing(reason)
  if reason then
    return {'corrupt', reason}
  end
  return {'notfound'}
end

-- Runs `command` on `key` with the items of `list` as arguments, in chunks, because unpack()
-- has a stack limit. `chunk` must be even for field/value lists.
local function call_chunked(command, key, list, chunk)
  for i = 1, #list, chunk do
    redis.call(command, key, unpack(list, i, math.min(i + chunk - 1, #list)))
  end
end

-- Publishes one event on `channel`, inside the script that made the write, so events come out
-- in the order of the writes. Numbers travel as strings (cjson would round big ones).
local function publish(channel, kind, ns, id, user, ver, at)
  redis.call('PUBLISH', channel, cjson.encode({
    kind = kind, ns = ns, id = id, user = user, ver = tostring(ver), at = at,
  }))
end

-- The reply for a live session: {'ok', PTTL, flat HGETALL}.
local function reply_session(key)
  return {'ok', redis.call('PTTL', key), redis.call('HGETALL', key)}
end
