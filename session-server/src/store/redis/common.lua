-- Helpers prepended to every session script of the Redis store (see ../redis.rs).
-- A session is one hash: fmt ("1"), user, ver, created (unix ms), optional created_ns
-- (nanoseconds past that millisecond, for a restored snapshot's exact time), ttl (ms), optional
-- op (unique id of the last write call, cluster only), and one
-- "a:<key>" field per attribute. Every script touches only its one session key (KEYS[1]),
-- but for the session cap's admission on one server (`admit` below).

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

-- The per-user session cap (see ../cap.rs). Create, update and restore may take it as an
-- extra first ARGV, a JSON object (told from their usual first argument, the events channel,
-- by its '{': a key prefix has no braces), which take_cap() removes so that the others keep
-- their places. None (no cap, an anonymous session, or a cluster, where the cap is kept
-- outside the script) means no admission. The object: {ukey = the user's index key, sp / tp =
-- session / tombstone key up to the id (the key is sp .. id .. '}'), max, refuse (boolean),
-- tomb_ms = least tombstone life, index_ms = least index life}. The keys of the user's other
-- sessions are not in KEYS: on one server a script may reach them, and the count, the
-- evictions and the write are then one step.
local function take_cap()
  if string.sub(ARGV[1] or '', 1, 1) ~= '{' then
    return nil
  end
  return cjson.decode(table.remove(ARGV, 1))
end

-- Admits session `id` joining `user` under `cap`: counts the user's other live sessions
-- through the index and, at the cap, either refuses (returns nil) or deletes the oldest (by
-- created, created_ns, id) as delete.lua does, tombstone and 'deleted' event included, until
-- one more fits; then adds `id` to the index. Returns how many it deleted. Call it after every
-- other check of the write, just before the write itself.
local function admit(cap, user, id, channel, ns, now)
  if not cap or user == '' then
    return 0
  end
  local live = {}
  for _, other in ipairs(redis.call('SMEMBERS', cap.ukey)) do
    if other ~= id then
      local h = load_session(cap.sp .. other .. '}')
      if h and h['user'] == user then
        live[#live + 1] = {
          id = other, h = h, ms = tonumber(h['created']), ns = tonumber(h['created_ns'] or '0'),
        }
      end
    end
  end
  local evict = #live - cap.max + 1
  if evict > 0 then
    if cap.refuse then
      -- Nothing written; the entry a create or restore added before it goes again.
      redis.call('SREM', cap.ukey, id)
      return nil
    end
    table.sort(live, function(a, b)
      if a.ms ~= b.ms then
        return a.ms < b.ms
      end
      if a.ns ~= b.ns then
        return a.ns < b.ns
      end
      return a.id < b.id
    end)
    for i = 1, evict do
      local v = live[i]
      local tomb = cap.tp .. v.id .. '}'
      redis.call('DEL', cap.sp .. v.id .. '}')
      redis.call('DEL', tomb)
      redis.call('HSET', tomb, 'op', '', 'user', v.h['user'], 'ver', v.h['ver'])
      redis.call('PEXPIRE', tomb, math.max(tonumber(v.h['ttl']), cap.tomb_ms))
      redis.call('SREM', cap.ukey, v.id)
      publish(channel, 'deleted', ns, v.id, v.h['user'], v.h['ver'], now)
    end
  else
    evict = 0
  end
  redis.call('SADD', cap.ukey, id)
  if redis.call('PTTL', cap.ukey) < cap.index_ms then
    redis.call('PEXPIRE', cap.ukey, cap.index_ms)
  end
  return evict
end
