-- Helpers prepended to every session script of the Redis store (see ../redis.rs), after one
-- line the store writes itself: `local WRITE_FORMAT = '1'` or `'2'` (--redis-record-format).
--
-- A session is one record at its key, in one of two formats, both read by every script:
-- - format 2 (packed): a string, the MessagePack array of strings {'2', user, ver, created (unix
--   ms), created_ns (nanoseconds past that millisecond, '0' but for a restored snapshot's exact
--   time), ttl (ms), op (unique id of the last write call, cluster only, else ''), then one
--   key, value pair per attribute}. A read is one GET of one small value.
-- - format 1 (the first release's): a hash with fields fmt ('1'), user, ver, created, optional
--   created_ns, ttl, optional op, and one "a:<key>" field per attribute.
-- Every write stores the record in WRITE_FORMAT (so a record of format 1 moves to format 2 on
-- its next write). Scripts work on the decoded fields `h`, as format 1 names them. Every
-- script touches only its one session key (KEYS[1]), but for the session cap's admission on
-- one server (`admit` below).

-- Reads the session at `key`. Returns (fields, packed) for a record this code understands
-- (packed: its stored format-2 string, nil for a format-1 hash), (nil, nil) when there is
-- none, and (nil, reason) when it cannot be decoded (unknown format, bad numbers, wrong
-- type): such a record is never read or overwritten.
local function load_session(key)
  local raw = redis.pcall('GET', key)
  local h = {}
  local packed = nil
  if type(raw) == 'string' then
    local ok, r = pcall(cmsgpack.unpack, raw)
    if not ok or type(r) ~= 'table' or r[1] ~= '2' or #r < 7 or #r % 2 ~= 1 then
      return nil, 'unknown packed format'
    end
    h['user'], h['ver'], h['created'], h['created_ns'], h['ttl'] = r[2], r[3], r[4], r[5], r[6]
    if r[7] ~= '' then
      h['op'] = r[7]
    end
    for i = 8, #r, 2 do
      if type(r[i]) ~= 'string' or type(r[i + 1]) ~= 'string' then
        return nil, 'bad attribute'
      end
      h['a:' .. r[i]] = r[i + 1]
    end
    packed = raw
  elseif raw == false then
    return nil, nil
  else
    -- Not a string: a format-1 hash answers WRONGTYPE to GET.
    local flat = redis.pcall('HGETALL', key)
    if type(flat) ~= 'table' or flat['err'] then
      return nil, 'neither a packed record nor a hash'
    end
    if #flat == 0 then
      return nil, nil
    end
    for i = 1, #flat, 2 do
      h[flat[i]] = flat[i + 1]
    end
    if h['fmt'] ~= '1' then
      return nil, 'unknown format ' .. tostring(h['fmt'])
    end
    h['fmt'] = nil
  end
  if type(h['user']) ~= 'string' then
    return nil, 'no user field'
  end
  if not (type(h['ver']) == 'string' and string.match(h['ver'], '^%d+$')) then
    return nil, 'bad ver'
  end
  if not (type(h['created']) == 'string' and string.match(h['created'], '^%d+$')) then
    return nil, 'bad created'
  end
  if h['created_ns'] and not (type(h['created_ns']) == 'string'
      and string.match(h['created_ns'], '^%d+$')) then
    return nil, 'bad created_ns'
  end
  -- a ttl of 0 would make PEXPIRE delete the session
  if not (type(h['ttl']) == 'string' and string.match(h['ttl'], '^[1-9]%d*$')) then
    return nil, 'bad ttl'
  end
  return h, packed
end

-- The format-2 string of the fields `h`.
local function pack_session(h)
  local r = {'2', h['user'], h['ver'], h['created'], h['created_ns'] or '0', h['ttl'],
    h['op'] or ''}
  for f, v in pairs(h) do
    if string.sub(f, 1, 2) == 'a:' then
      r[#r + 1] = string.sub(f, 3)
      r[#r + 1] = v
    end
  end
  return cmsgpack.pack(r)
end

-- Runs `command` on `key` with the items of `list` as arguments, in chunks, because unpack()
-- has a stack limit. `chunk` must be even for field/value lists.
local function call_chunked(command, key, list, chunk)
  for i = 1, #list, chunk do
    redis.call(command, key, unpack(list, i, math.min(i + chunk - 1, #list)))
  end
end

-- Stores the fields `h` at `key` in WRITE_FORMAT, replacing whatever is there, expiring one
-- ttl from now. Returns the record's format-2 string (the scripts' replies always carry it).
local function store_session(key, h)
  local packed = pack_session(h)
  if WRITE_FORMAT == '2' then
    redis.call('SET', key, packed, 'PX', h['ttl'])
    return packed
  end
  local fields = {'fmt', '1'}
  for f, v in pairs(h) do
    fields[#fields + 1] = f
    fields[#fields + 1] = v
  end
  redis.call('DEL', key)
  call_chunked('HSET', key, fields, 200)
  redis.call('PEXPIRE', key, h['ttl'])
  return packed
end

-- Slides the expiry of the session at `key` (fields `h`, `packed` as load_session gave them)
-- by its ttl, moving a record of another format to WRITE_FORMAT. Returns its format-2 string.
local function slide_session(key, h, packed)
  if packed and WRITE_FORMAT == '2' then
    redis.call('PEXPIRE', key, h['ttl'])
    return packed
  end
  if not packed and WRITE_FORMAT == '1' then
    redis.call('PEXPIRE', key, h['ttl'])
    return pack_session(h)
  end
  return store_session(key, h)
end

-- The reply for a session that cannot be read: absent or undecodable.
local function missing(reason)
  if reason then
    return {'corrupt', reason}
  end
  return {'notfound'}
end

-- Publishes one event on `channel`, inside the script that made the write, so events come out
-- in the order of the writes. Numbers travel as strings (cjson would round big ones).
local function publish(channel, kind, ns, id, user, ver, at)
  redis.call('PUBLISH', channel, cjson.encode({
    kind = kind, ns = ns, id = id, user = user, ver = tostring(ver), at = at,
  }))
end

-- The reply for the live session at `key`, as stored now (fields `h`, format-2 string
-- `packed` or nil): {'ok', PTTL, format-2 string}.
local function reply_session(key, h, packed)
  return {'ok', redis.call('PTTL', key), packed or pack_session(h)}
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
