//! Looking behind the Redis store: a session record's fields, whichever format it is stored in
//! (see `session-server/src/store/redis/common.lua`), decoded by Redis's own MessagePack so
//! the tests do not trust the store's decoder.

use std::collections::HashMap;

use redis::aio::ConnectionLike;

/// Lua: the record at KEYS[1] as a flat field list of its format-1 hash.
const FIELDS_OF_RECORD: &str = "
local t = redis.call('TYPE', KEYS[1])['ok']
if t == 'hash' then return redis.call('HGETALL', KEYS[1]) end
if t ~= 'string' then return {} end
local raw = redis.call('GET', KEYS[1])
local ok, r = pcall(cmsgpack.unpack, raw)
if not ok or type(r) ~= 'table' or #r < 7 or #r % 2 == 0 then return {'raw', raw} end
for i = 1, #r do r[i] = tostring(r[i]) end
local out = {'fmt', r[1], 'user', r[2], 'ver', r[3], 'created', r[4], 'ttl', r[6]}
if r[5] ~= '0' then out[#out + 1] = 'created_ns' out[#out + 1] = r[5] end
if r[7] ~= '' then out[#out + 1] = 'op' out[#out + 1] = r[7] end
for i = 8, #r, 2 do out[#out + 1] = 'a:' .. r[i] out[#out + 1] = r[i + 1] end
return out
";

/// The record at `key` as the fields of its format-1 hash (`fmt` says which format it is in:
/// `"1"` or `"2"`); a string that is no packed record is `{"raw": value}`, no key is empty.
pub async fn fields(conn: &mut impl ConnectionLike, key: &str) -> HashMap<String, Vec<u8>> {
    redis::Script::new(FIELDS_OF_RECORD)
        .key(key)
        .invoke_async(conn)
        .await
        .expect("record fields")
}

/// One field of the record at `key` (see [`fields`]), e.g. `ver` or `a:cart`.
pub async fn field(conn: &mut impl ConnectionLike, key: &str, name: &str) -> Option<Vec<u8>> {
    fields(conn, key).await.remove(name)
}
