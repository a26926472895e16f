//! What the Redis store reads and writes: key names, script replies decoded into records, and
//! pub/sub messages decoded into events. Pure functions, no I/O, so they are unit-tested here.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ::redis::Value;
use serde::Deserialize;

use crate::store::{EventKind, SessionEvent, SessionRecord};

/// The format version this code writes in the `fmt` field of every session hash. A record with
/// another value (a newer server during a rolling upgrade, or garbage) is treated as absent.
pub(crate) const FORMAT: &str = "1";

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

/// Decodes `[pttl, flat HGETALL, ...]` (the `Ok` values of a session reply) into a record.
/// `Err` carries why the stored data is not a record this code understands.
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
    let Some(Value::Array(flat)) = values.get(1) else {
        return Err("no fields".into());
    };
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
    if fmt != Some(FORMAT.as_bytes()) {
        return Err(format!(
            "unknown format {:?}",
            fmt.map(String::from_utf8_lossy)
        ));
    }
    Ok(SessionRecord {
        id: id.to_string(),
        namespace: namespace.to_string(),
        user_id: user.ok_or("no user")?,
        attrs,
        version: version.ok_or("no ver")?,
        created_at: UNIX_EPOCH
            + Duration::from_millis(created.ok_or("no created")?)
            + Duration::from_nanos(created_ns),
        expires_at: UNIX_EPOCH + Duration::from_millis(now_ms.saturating_add(pttl)),
        ttl: Duration::from_millis(ttl.ok_or("no ttl")?),
    })
}

/// A field of ASCII digits as a number.
fn digits(value: &[u8]) -> Option<u64> {
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
