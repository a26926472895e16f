//! How a session is laid out in its row: the attribute blob, the millisecond clock, and the
//! conversion of a fetched row into a [`SessionRecord`].

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::Row as _;
use sqlx::mysql::MySqlRow;

use crate::store::SessionRecord;

/// First byte of every attribute blob this code writes. A blob that starts with anything else
/// (say, a later version's format during a rolling upgrade) is treated as absent, never
/// rewritten.
pub(super) const ATTRS_FORMAT: u8 = 1;

/// The columns [`StoredRow::from_row`] reads, in the order it reads them.
pub(super) const ROW_COLUMNS: &str = "user_id, attrs, version, created_ns, expires_ms, ttl_ms";

/// Encodes attributes: the format byte, the entry count, then each key and each value preceded
/// by its length (all lengths u32 big-endian). Keys are sorted, so equal maps give equal blobs.
pub(super) fn encode_attrs(attrs: &HashMap<String, Vec<u8>>) -> Result<Vec<u8>, String> {
    let mut entries: Vec<_> = attrs.iter().collect();
    entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
    let payload: usize = entries.iter().map(|(k, v)| 8 + k.len() + v.len()).sum();
    let mut out = Vec::with_capacity(5 + payload);
    out.push(ATTRS_FORMAT);
    put_len(&mut out, entries.len())?;
    for (key, value) in entries {
        put_len(&mut out, key.len())?;
        out.extend_from_slice(key.as_bytes());
        put_len(&mut out, value.len())?;
        out.extend_from_slice(value);
    }
    Ok(out)
}

fn put_len(out: &mut Vec<u8>, len: usize) -> Result<(), String> {
    let len = u32::try_from(len).map_err(|_| format!("{len} is too long to encode"))?;
    out.extend_from_slice(&len.to_be_bytes());
    Ok(())
}

/// Decodes what [`encode_attrs`] wrote; any other input is an error saying what is wrong.
pub(super) fn decode_attrs(blob: &[u8]) -> Result<HashMap<String, Vec<u8>>, String> {
    let Some((&format, mut rest)) = blob.split_first() else {
        return Err("empty attribute blob".into());
    };
    if format != ATTRS_FORMAT {
        return Err(format!("unknown attribute format {format}"));
    }
    let count = take_len(&mut rest)?;
    // Every entry takes at least 8 bytes, which bounds what a corrupt count can reserve.
    let mut attrs = HashMap::with_capacity(count.min(rest.len() / 8));
    for _ in 0..count {
        let key = take_bytes(&mut rest)?;
        let key = std::str::from_utf8(key).map_err(|_| "attribute key is not UTF-8")?;
        let value = take_bytes(&mut rest)?;
        attrs.insert(key.to_owned(), value.to_vec());
    }
    if !rest.is_empty() {
        return Err(format!("{} bytes after the last attribute", rest.len()));
    }
    Ok(attrs)
}

fn take_len(rest: &mut &[u8]) -> Result<usize, String> {
    let slice: &[u8] = rest;
    let Some((head, tail)) = slice.split_first_chunk::<4>() else {
        return Err("attribute blob cut short".into());
    };
    *rest = tail;
    usize::try_from(u32::from_be_bytes(*head)).map_err(|_| "length does not fit".into())
}

fn take_bytes<'a>(rest: &mut &'a [u8]) -> Result<&'a [u8], String> {
    let len = take_len(rest)?;
    let slice: &'a [u8] = rest;
    let Some((bytes, tail)) = slice.split_at_checked(len) else {
        return Err("attribute blob cut short".into());
    };
    *rest = tail;
    Ok(bytes)
}

/// Unix milliseconds of `at`, as `expires_ms` keeps time (saturating).
pub(super) fn unix_ms(at: SystemTime) -> i64 {
    since_epoch(at, |d| d.as_millis())
}

/// Unix nanoseconds of `at`, as `created_ns` keeps time (saturating, so about 1677 to 2262).
pub(super) fn unix_ns(at: SystemTime) -> i64 {
    since_epoch(at, |d| d.as_nanos())
}

fn since_epoch(at: SystemTime, unit: impl Fn(Duration) -> u128) -> i64 {
    match at.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(unit(after)).unwrap_or(i64::MAX),
        Err(before) => -i64::try_from(unit(before.duration())).unwrap_or(i64::MAX),
    }
}

/// The time `ms` unix milliseconds stand for.
pub(super) fn from_unix_ms(ms: i64) -> SystemTime {
    from_epoch(ms, Duration::from_millis)
}

/// The time `ns` unix nanoseconds stand for.
pub(super) fn from_unix_ns(ns: i64) -> SystemTime {
    from_epoch(ns, Duration::from_nanos)
}

fn from_epoch(count: i64, unit: impl Fn(u64) -> Duration) -> SystemTime {
    let offset = unit(count.unsigned_abs());
    let at = if count >= 0 {
        UNIX_EPOCH.checked_add(offset)
    } else {
        UNIX_EPOCH.checked_sub(offset)
    };
    at.unwrap_or(UNIX_EPOCH)
}

/// A ttl in whole milliseconds, rounded up so that a positive ttl never becomes zero.
pub(super) fn ttl_ms(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

/// The expiry of a session written at `now_ms` with a ttl of `ttl_ms`.
pub(super) fn expiry_ms(now_ms: i64, ttl_ms: u64) -> i64 {
    now_ms.saturating_add(i64::try_from(ttl_ms).unwrap_or(i64::MAX))
}

/// One session row as fetched ([`ROW_COLUMNS`]), attributes still encoded.
#[derive(Debug)]
pub(super) struct StoredRow {
    /// Owner, or empty.
    pub(super) user_id: String,
    /// The encoded attributes, kept as they are so a move (regenerate) copies them unchanged.
    pub(super) attrs: Vec<u8>,
    /// Bumped by every write.
    pub(super) version: u64,
    /// Creation time, unix ns.
    pub(super) created_ns: i64,
    /// Expiry, unix ms.
    pub(super) expires_ms: i64,
    /// Sliding ttl in ms.
    pub(super) ttl_ms: u64,
}

impl StoredRow {
    /// Reads the [`ROW_COLUMNS`] of a fetched row.
    pub(super) fn from_row(row: &MySqlRow) -> Result<Self, sqlx::Error> {
        Ok(StoredRow {
            user_id: row.try_get("user_id")?,
            attrs: row.try_get("attrs")?,
            version: row.try_get("version")?,
            created_ns: row.try_get("created_ns")?,
            expires_ms: row.try_get("expires_ms")?,
            ttl_ms: row.try_get("ttl_ms")?,
        })
    }

    /// The session this row holds, or `None` (logged) when its attributes cannot be decoded:
    /// such a row is treated as absent.
    pub(super) fn record(&self, namespace: &str, id: &str) -> Option<SessionRecord> {
        match decode_attrs(&self.attrs) {
            Ok(attrs) => Some(SessionRecord {
                id: id.to_owned(),
                namespace: namespace.to_owned(),
                user_id: self.user_id.clone(),
                attrs,
                version: self.version,
                created_at: from_unix_ns(self.created_ns),
                expires_at: from_unix_ms(self.expires_ms),
                ttl: Duration::from_millis(self.ttl_ms),
            }),
            Err(reason) => {
                tracing::warn!(
                    namespace,
                    id,
                    %reason,
                    "mysql session row has undecodable attributes; treated as absent"
                );
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_round_trip() {
        let attrs = HashMap::from([
            ("cart".to_owned(), b"[1,2]".to_vec()),
            ("empty".to_owned(), Vec::new()),
            ("bin".to_owned(), vec![0, 255, 7]),
        ]);
        let blob = encode_attrs(&attrs).unwrap();
        assert_eq!(blob[0], ATTRS_FORMAT);
        assert_eq!(decode_attrs(&blob).unwrap(), attrs);
        assert_eq!(
            decode_attrs(&encode_attrs(&HashMap::new()).unwrap())
                .unwrap()
                .len(),
            0
        );
    }

    #[test]
    fn damaged_blobs_are_errors_not_panics() {
        let blob = encode_attrs(&HashMap::from([("k".to_owned(), b"v".to_vec())])).unwrap();
        for cut in 0..blob.len() {
            assert!(decode_attrs(&blob[..cut]).is_err(), "cut at {cut}");
        }
        let mut other_format = blob.clone();
        other_format[0] = 2;
        assert!(decode_attrs(&other_format).is_err());
        let mut trailing = blob.clone();
        trailing.push(0);
        assert!(decode_attrs(&trailing).is_err());
        assert!(
            decode_attrs(&[1, 255, 255, 255, 255]).is_err(),
            "huge count"
        );
    }

    #[test]
    fn clock_and_ttl_conversions() {
        let at = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        assert_eq!(from_unix_ms(unix_ms(at)), at);
        let exact = UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789);
        assert_eq!(from_unix_ns(unix_ns(exact)), exact);
        assert_eq!(ttl_ms(Duration::from_micros(1)), 1, "never rounds to zero");
        assert_eq!(ttl_ms(Duration::from_millis(300)), 300);
        assert_eq!(expiry_ms(i64::MAX - 1, 10), i64::MAX);
    }
}
