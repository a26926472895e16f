//! What the Redis store reads and writes: key names, script replies decoded into records, and
//! pub/sub messages decoded into events. Pure functions, no I/O, so they are unit-tested here.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ::redis::Value;
use serde::Deserialize;

use crate::store::{EventKind, SessionEvent, SessionRecord};

/// The version in the `fmt` field of a format-1 session hash (see `common.lua`). A hash with
/// another value (garbage, or a later revision) is treated as absent.
pub(crate) const HASH_FORMAT: &str = "1";

/// The first element of a format-2 (packed) record.
pub(crate) const PACKED_FORMAT: &[u8] = b"2";

/// The record format the store writes (`--redis-record-format`); both are always read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RecordFormat {
    /// Format 1: one hash per session, the first release's format. For a rolling upgrade from
    /// a release that reads only this format: write it until no such server is left.
    Hash,
    /// Format 2: one MessagePack string per session, read with one `GET` (the default).
    #[default]
    Packed,
}

impl RecordFormat {
    /// The value of `WRITE_FORMAT` in the scripts.
    pub(crate) fn lua(self) -> &'static str {
        match self {
            RecordFormat::Hash => "1",
            RecordFormat::Packed => "2",
        }
    }
}

/// Prefix of the hash fields that hold attributes (`a:<key>`), keeping them apart from the
/// record's own fields.
pub(crate) const ATTR_FIELD: &str = "a:";

/// The hash of one session: `{prefix}:{ns}:s:{<id>}`. The braces are a Redis Cluster hash tag.
pub(crate) fn session_key(prefix: &str, namespace: &str, id: &str) -> String {
    format!("{prefix}:{namespace}:s:{{{id}}}")
}

/// The set of session ids of one user: `{prefix}:{ns}:u:{<user>}`.
pub(crate) fn user_key(prefix: &str, namespace: &str, user: &str) -> String {
    format!("{prefix}:{namespace}:u:{{{user}}}")
}

/// The lease of one user's session cap on a cluster: `{prefix}:{ns}:c:{<user>}`, in the slot of
/// the user's index (see `cap.rs`).
pub(crate) fn cap_lease_key(prefix: &str, namespace: &str, user: &str) -> String {
    format!("{prefix}:{namespace}:c:{{{user}}}")
}

/// The tombstone a delete leaves for one ttl: `{prefix}:{ns}:t:{<id>}`, in the slot of the
/// session (see `delete.lua`).
pub(crate) fn tombstone_key(prefix: &str, namespace: &str, id: &str) -> String {
    format!("{prefix}:{namespace}:t:{{{id}}}")
}

/// The store's epoch: `{prefix}:epoch` (see `epoch.rs`).
pub(crate) fn epoch_key(prefix: &str) -> String {
    format!("{prefix}:epoch")
}

/// The pub/sub channel every script publishes its events on.
pub(crate) fn events_channel(prefix: &str) -> String {
    format!("{prefix}:events")
}

/// The namespace and id of a session key of this prefix, or `None` for any other key.
pub(crate) fn parse_session_key(prefix: &str, key: &str) -> Option<(String, String)> {
    let rest = key.strip_prefix(prefix)?.strip_prefix(':')?;
    let (namespace, rest) = rest.split_once(':')?;
    let id = rest.strip_prefix("s:{")?.strip_suffix('}')?;
    let valid_ns = !namespace.is_empty()
        && namespace
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    (valid_ns && !id.is_empty() && !id.contains(['{', '}']))
        .then(|| (namespace.to_string(), id.to_string()))
}

/// Unix milliseconds of a time (0 before the epoch).
pub(crate) fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The nanoseconds of a time past its unix millisecond (what [`unix_ms`] drops).
pub(crate) fn sub_ms_nanos(at: SystemTime) -> u32 {
    at.duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos() % 1_000_000)
        .unwrap_or(0)
}

/// A ttl in whole milliseconds, at least 1 (PEXPIRE 0 would delete the key).
pub(crate) fn ttl_ms(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// What a session script answered, before it becomes a [`crate::store::StoreResult`].
#[derive(Debug)]
pub(crate) enum Reply {
    /// Success; the values after the status marker.
    Ok(Vec<Value>),
    /// No session at the key.
    NotFound,
    /// The stored record cannot be decoded; the reason.
    Corrupt(String),
    /// Create found the key already there.
    Taken,
    /// The stored version differs from the expected one; the stored version.
    Conflict(u64),
    /// The attributes would take this many bytes, over the limit.
    TooLarge(usize),
    /// The session belongs to another user.
    Mismatch,
    /// Restore found the id's tombstone: deleted less than one ttl ago.
    Deleted,
    /// The session would join a user at the session cap, which refuses (`admit` in
    /// `common.lua`); nothing was written.
    Capped,
}

/// Decodes the `{status, ...}` array every session script returns. `Err` is an answer of an
/// unexpected shape: a bug, not a state of the data.
pub(crate) fn parse_reply(value: Value) -> Result<Reply, String> {
    let Value::Array(items) = value else {
        return Err(format!("script reply is not an array: {value:?}"));
    };
    let mut items = items.into_iter();
    let status = items.next().and_then(|v| text(&v));
    let first = items.next();
    let number = |v: &Option<Value>| v.as_ref().and_then(integer);
    Ok(match status.as_deref() {
        Some("ok") => Reply::Ok(first.into_iter().chain(items).collect()),
        Some("notfound") => Reply::NotFound,
        Some("taken") => Reply::Taken,
        Some("mismatch") => Reply::Mismatch,
        Some("deleted") => Reply::Deleted,
        Some("capped") => Reply::Capped,
        Some("corrupt") => Reply::Corrupt(first.as_ref().and_then(text).unwrap_or_default()),
        Some("conflict") => Reply::Conflict(number(&first).ok_or("conflict without version")?),
        Some("toolarge") => {
            let size = number(&first).ok_or("toolarge without size")?;
            Reply::TooLarge(usize::try_from(size).unwrap_or(usize::MAX))
        }
        other => return Err(format!("unknown script status {other:?}")),
    })
}

/// A reply value as text (bulk or simple string), if it is one and valid UTF-8.
pub(crate) fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// A reply value as an unsigned integer (an integer, or a string of digits).
pub(crate) fn integer(value: &Value) -> Option<u64> {
    match value {
        Value::Int(n) => u64::try_from(*n).ok(),
        other => text(other)?.parse().ok(),
    }
}

/// Decodes `[pttl, record, ...]` (the `Ok` values of a session reply, or of a plain read)
/// into a record: the record is a format-2 string (every script reply, and a plain `GET`) or a
/// format-1 flat `HGETALL`. `Err` carries why the stored data is not a record this code
/// understands.
pub(crate) fn decode_record(
    namespace: &str,
    id: &str,
    now_ms: u64,
    values: &[Value],
) -> Result<SessionRecord, String> {
    let pttl = match values.first() {
        Some(Value::Int(n)) if *n >= 0 => *n as u64,
        Some(Value::Int(_)) => return Err("no expiry".into()),
        other => return Err(format!("bad PTTL {other:?}")),
    };
    let fields = match values.get(1) {
        Some(Value::BulkString(packed)) => unpack_record(packed)?,
        Some(Value::Array(flat)) => hash_record(flat)?,
        _ => return Err("no record".into()),
    };
    Ok(SessionRecord {
        id: id.to_string(),
        namespace: namespace.to_string(),
        user_id: fields.user,
        attrs: fields.attrs,
        version: fields.version,
        created_at: UNIX_EPOCH
            + Duration::from_millis(fields.created_ms)
            + Duration::from_nanos(fields.created_ns),
        expires_at: UNIX_EPOCH + Duration::from_millis(now_ms.saturating_add(pttl)),
        ttl: Duration::from_millis(fields.ttl_ms),
    })
}

/// The stored fields of a record, either format.
struct Fields {
    user: String,
    version: u64,
    created_ms: u64,
    created_ns: u64,
    ttl_ms: u64,
    attrs: HashMap<String, Vec<u8>>,
}

/// Decodes a format-2 record: a MessagePack array of strings `[fmt, user, ver, created,
/// created_ns, ttl, op, key, value, ...]` (see `common.lua`).
fn unpack_record(packed: &[u8]) -> Result<Fields, String> {
    let mut input = packed;
    let len = msgpack::array_len(&mut input)?;
    if len < 7 || len.is_multiple_of(2) {
        return Err(format!("packed record of {len} elements"));
    }
    let remaining = input.len();
    let mut next = || msgpack::string(&mut input);
    if next()? != PACKED_FORMAT {
        return Err("unknown packed format".into());
    }
    let user = String::from_utf8(next()?.to_vec()).map_err(|_| "user not UTF-8")?;
    let version = digits(next()?).ok_or("bad ver")?;
    let created_ms = digits(next()?).ok_or("bad created")?;
    let created_ns = digits(next()?)
        .filter(|n| *n < 1_000_000)
        .ok_or("bad created_ns")?;
    let ttl_ms = digits(next()?).filter(|t| *t > 0).ok_or("bad ttl")?;
    next()?; // op: only the scripts read it
    // Each element takes at least one byte: a length beyond the input is a lie, not a size.
    let mut attrs = HashMap::with_capacity(((len - 7) / 2).min(remaining / 2).min(1024));
    for _ in 0..(len - 7) / 2 {
        let key = String::from_utf8(next()?.to_vec()).map_err(|_| "key not UTF-8")?;
        attrs.insert(key, next()?.to_vec());
    }
    if !input.is_empty() {
        return Err("bytes after the packed record".into());
    }
    Ok(Fields {
        user,
        version,
        created_ms,
        created_ns,
        ttl_ms,
        attrs,
    })
}

/// Decodes a format-1 record: the flat `HGETALL` of its hash.
fn hash_record(flat: &[Value]) -> Result<Fields, String> {
    let (mut fmt, mut user, mut version, mut created, mut ttl) = (None, None, None, None, None);
    let mut created_ns = 0;
    let mut attrs = HashMap::new();
    for pair in flat.chunks(2) {
        let [Value::BulkString(field), Value::BulkString(value)] = pair else {
            return Err("odd field list".into());
        };
        match field.as_slice() {
            b"fmt" => fmt = Some(value.as_slice()),
            b"user" => user = Some(String::from_utf8(value.clone()).map_err(|_| "user not UTF-8")?),
            b"ver" => version = Some(digits(value).ok_or("bad ver")?),
            b"created" => created = Some(digits(value).ok_or("bad created")?),
            b"created_ns" => {
                created_ns = digits(value)
                    .filter(|n| *n < 1_000_000)
                    .ok_or("bad created_ns")?;
            }
            b"ttl" => ttl = Some(digits(value).filter(|t| *t > 0).ok_or("bad ttl")?),
            name => {
                if let Some(key) = name.strip_prefix(ATTR_FIELD.as_bytes()) {
                    let key = String::from_utf8(key.to_vec()).map_err(|_| "key not UTF-8")?;
                    attrs.insert(key, value.clone());
                }
                // Any other field belongs to a later minor revision of the format: ignored.
            }
        }
    }
    if fmt != Some(HASH_FORMAT.as_bytes()) {
        return Err(format!(
            "unknown format {:?}",
            fmt.map(String::from_utf8_lossy)
        ));
    }
    Ok(Fields {
        user: user.ok_or("no user")?,
        version: version.ok_or("no ver")?,
        created_ms: created.ok_or("no created")?,
        created_ns,
        ttl_ms: ttl.ok_or("no ttl")?,
        attrs,
    })
}

/// The few MessagePack types a packed record uses: one array of strings. Redis's `cmsgpack`
/// writes Lua strings as `str` (fixstr, str 8/16/32); `bin` is read too.
mod msgpack {
    /// Reads an array header; the number of elements.
    pub(super) fn array_len(input: &mut &[u8]) -> Result<usize, String> {
        let marker = take(input, 1)?[0];
        match marker {
            0x90..=0x9f => Ok(usize::from(marker & 0x0f)),
            0xdc => Ok(usize::from(u16::from_be_bytes(take_array(input)?))),
            0xdd => Ok(u32::from_be_bytes(take_array(input)?) as usize),
            other => Err(format!("packed record is not an array (marker {other:#x})")),
        }
    }

    /// Reads one string (or binary) element.
    pub(super) fn string<'a>(input: &mut &'a [u8]) -> Result<&'a [u8], String> {
        let marker = take(input, 1)?[0];
        let len = match marker {
            0xa0..=0xbf => usize::from(marker & 0x1f),
            0xd9 | 0xc4 => usize::from(take(input, 1)?[0]),
            0xda | 0xc5 => usize::from(u16::from_be_bytes(take_array(input)?)),
            0xdb | 0xc6 => u32::from_be_bytes(take_array(input)?) as usize,
            other => {
                return Err(format!(
                    "packed element is not a string (marker {other:#x})"
                ));
            }
        };
        take(input, len)
    }

    fn take<'a>(input: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
        if input.len() < n {
            return Err("truncated packed record".into());
        }
        let (head, rest) = input.split_at(n);
        *input = rest;
        Ok(head)
    }

    fn take_array<const N: usize>(input: &mut &[u8]) -> Result<[u8; N], String> {
        Ok(take(input, N)?.try_into().expect("take returns N bytes"))
    }
}

/// A field of ASCII digits as a number (nothing else: no sign, as the scripts' `^%d+$`).
fn digits(value: &[u8]) -> Option<u64> {
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// An event as the scripts publish it (`cjson.encode`).
#[derive(Deserialize)]
struct WireEvent {
    kind: String,
    ns: String,
    id: String,
    #[serde(default)]
    user: String,
    ver: serde_json::Value,
    at: serde_json::Value,
}

/// Decodes an event published by a script; `Err` says why the payload is malformed.
pub(crate) fn decode_event(payload: &[u8]) -> Result<SessionEvent, String> {
    let wire: WireEvent = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
    let kind = match wire.kind.as_str() {
        "created" => EventKind::Created,
        "updated" => EventKind::Updated,
        "deleted" => EventKind::Deleted,
        other => return Err(format!("unknown kind {other:?}")),
    };
    let number = |v: &serde_json::Value| v.as_u64().or_else(|| v.as_str()?.parse().ok());
    Ok(SessionEvent {
        kind,
        namespace: wire.ns,
        id: wire.id,
        user_id: wire.user,
        version: number(&wire.ver).ok_or("bad ver")?,
        at: UNIX_EPOCH + Duration::from_millis(number(&wire.at).ok_or("bad at")?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn stored(fields: &[(&str, &str)]) -> Vec<Value> {
        let flat = fields
            .iter()
            .flat_map(|(f, v)| [bulk(f), bulk(v)])
            .collect();
        vec![Value::Int(5_000), Value::Array(flat)]
    }

    const GOOD: &[(&str, &str)] = &[
        ("fmt", "1"),
        ("user", "u1"),
        ("ver", "3"),
        ("created", "1000"),
        ("created_ns", "500"),
        ("ttl", "60000"),
        ("a:cart", "x"),
    ];

    #[test]
    fn session_keys_carry_prefix_namespace_and_hash_tag() {
        let key = session_key("sl", "shop", "abc");
        assert_eq!(key, "sl:shop:s:{abc}");
        assert_eq!(user_key("sl", "shop", "bob"), "sl:shop:u:{bob}");
        assert_eq!(
            parse_session_key("sl", &key),
            Some(("shop".into(), "abc".into()))
        );
        assert_eq!(parse_session_key("other", &key), None);
        assert_eq!(parse_session_key("sl", "sl:shop:u:{bob}"), None);
        assert_eq!(parse_session_key("sl", "slx:shop:s:{abc}"), None);
    }

    #[test]
    fn a_stored_record_decodes() {
        let record = decode_record("ns", "id", 10_000, &stored(GOOD)).expect("decodes");
        assert_eq!(record.user_id, "u1");
        assert_eq!(record.version, 3);
        assert_eq!(record.ttl, Duration::from_secs(60));
        assert_eq!(
            record.created_at,
            UNIX_EPOCH + Duration::from_millis(1000) + Duration::from_nanos(500)
        );
        assert_eq!(
            record.expires_at,
            UNIX_EPOCH + Duration::from_millis(15_000)
        );
        assert_eq!(record.attrs.get("cart"), Some(&b"x".to_vec()));
    }

    #[test]
    fn unknown_format_or_bad_numbers_do_not_decode() {
        for (field, bad) in [
            ("fmt", "9"),
            ("ver", "x"),
            ("ttl", "0"),
            ("created", "-1"),
            ("created_ns", "1000000"),
        ] {
            let fields: Vec<_> = GOOD
                .iter()
                .map(|&(f, v)| if f == field { (f, bad) } else { (f, v) })
                .collect();
            assert!(
                decode_record("ns", "id", 0, &stored(&fields)).is_err(),
                "{field}={bad}"
            );
        }
    }

    /// A format-2 record as `cmsgpack` writes it: an array of `str` elements.
    fn packed(elements: &[&[u8]]) -> Vec<u8> {
        let mut out = vec![0xdc];
        out.extend_from_slice(&(elements.len() as u16).to_be_bytes());
        for e in elements {
            match e.len() {
                0..=31 => out.push(0xa0 | e.len() as u8),
                32..=255 => out.extend_from_slice(&[0xd9, e.len() as u8]),
                _ => {
                    out.push(0xda);
                    out.extend_from_slice(&(e.len() as u16).to_be_bytes());
                }
            }
            out.extend_from_slice(e);
        }
        out
    }

    const PACKED: &[&[u8]] = &[
        b"2", b"u1", b"3", b"1000", b"500", b"60000", b"", b"cart", b"x",
    ];

    #[test]
    fn a_packed_record_decodes_like_its_hash() {
        let long = vec![b'v'; 300];
        let mut elements = PACKED.to_vec();
        elements.extend_from_slice(&[b"long", &long]);
        let values = vec![Value::Int(5_000), Value::BulkString(packed(&elements))];
        let record = decode_record("ns", "id", 10_000, &values).expect("decodes");
        let from_hash = decode_record("ns", "id", 10_000, &stored(GOOD)).expect("decodes");
        assert_eq!(record.user_id, from_hash.user_id);
        assert_eq!(record.version, from_hash.version);
        assert_eq!(record.ttl, from_hash.ttl);
        assert_eq!(record.created_at, from_hash.created_at);
        assert_eq!(record.expires_at, from_hash.expires_at);
        assert_eq!(record.attrs.get("cart"), Some(&b"x".to_vec()));
        assert_eq!(record.attrs.get("long"), Some(&long));
    }

    #[test]
    fn bad_packed_records_do_not_decode() {
        let decode = |bytes: Vec<u8>| {
            decode_record("ns", "id", 0, &[Value::Int(1), Value::BulkString(bytes)])
        };
        let good = packed(PACKED);
        // Every truncation, and trailing bytes.
        for cut in 0..good.len() {
            assert!(decode(good[..cut].to_vec()).is_err(), "cut at {cut}");
        }
        let mut longer = good.clone();
        longer.push(0xa0);
        assert!(decode(longer).is_err());
        for (i, bad) in [
            (0, &b"1"[..]),
            (2, b"x"),
            (4, b"1000000"),
            (5, b"0"),
            (3, b"-1"),
        ] {
            let mut elements = PACKED.to_vec();
            elements[i] = bad;
            assert!(decode(packed(&elements)).is_err(), "element {i}");
        }
        // An even count (a key without its value), too few elements, a lying array length.
        assert!(decode(packed(&PACKED[..8])).is_err());
        assert!(decode(packed(&PACKED[..6])).is_err());
        assert!(decode(vec![0xdd, 0xff, 0xff, 0xff, 0xff, 0xa1, b'2']).is_err());
        assert!(decode(vec![0x01]).is_err());
    }

    #[test]
    fn replies_map_to_outcomes() {
        let reply = |items: Vec<Value>| parse_reply(Value::Array(items));
        assert!(matches!(
            reply(vec![bulk("conflict"), bulk("7")]),
            Ok(Reply::Conflict(7))
        ));
        assert!(matches!(
            reply(vec![bulk("toolarge"), Value::Int(9)]),
            Ok(Reply::TooLarge(9))
        ));
        assert!(matches!(reply(vec![bulk("taken")]), Ok(Reply::Taken)));
        assert!(reply(vec![bulk("what")]).is_err());
        assert!(parse_reply(Value::Nil).is_err());
    }

    #[test]
    fn events_decode_from_script_json() {
        let event = decode_event(
            br#"{"kind":"updated","ns":"n","id":"i","user":"u","ver":"4","at":"1500"}"#,
        )
        .expect("decodes");
        assert_eq!(event.kind, EventKind::Updated);
        assert_eq!(event.version, 4);
        assert_eq!(event.at, UNIX_EPOCH + Duration::from_millis(1500));
        assert!(decode_event(b"not json").is_err());
        assert!(decode_event(br#"{"kind":"x","ns":"n","id":"i","ver":1,"at":1}"#).is_err());
    }
}
