//! Absolute lifetime (`--max-lifetime`, `CreateRequest.max_lifetime`,
//! `UpdateRequest.max_lifetime`, `Session.ends_at`) and touch granularity
//! (`--touch-granularity`).
//!
//! # Where `ends_at` is kept
//! As the write id is ([`super::WRITE_ID_ATTR`]), in a reserved attribute, [`ENDS_AT_ATTR`]
//! (unix milliseconds, decimal ASCII): every store writes it atomically with the record (a
//! create's attributes, an update's patch), regenerate and update carry it with the data, and no
//! store format or schema changed. It never leaves the server as an attribute ([`super::to_proto`]
//! turns it into `Session.ends_at`), and it does not count toward `--max-session-bytes`
//! ([`crate::store::attrs_size`]).
//!
//! # Enforcement
//! The service enforces the lifetime on every answer: a session whose `ends_at` has passed is
//! NOT_FOUND for every call (Get, Touch, Update, Regenerate, ListByUser leaves it out), and the
//! `expires_at` it reports is never past `ends_at`. A touch never writes a session's stored
//! expiry past the point where the target `min(now + ttl, ends_at)` is more than one
//! granularity ahead of it, so once `now + ttl` passes `ends_at` touches stop being written and
//! the record leaves the store on its own at its last stored expiry (at most one ttl past
//! `ends_at`), with the store's EXPIRED event then. What the stores do not (yet) do is clamp
//! their own stored expiry to `ends_at` inside their atomic step: the record may outlive
//! `ends_at` in the store, unreadable through the service.
//!
//! # Touch granularity
//! A touch (Touch without a new ttl, or Get with touch) first reads the session without a
//! slide; when the slide would move its expiry by less than the granularity
//! ([`TouchGranularity::for_ttl`]), nothing is written and the session is answered as read
//! (`stickless_touches_total{outcome="skipped"}`); otherwise the touch is made
//! (`outcome="written"`). An expiry is so at most one granularity earlier than `now + ttl`.
//! The read and the slide are two store calls: a write in between is slid as well (harmless:
//! a slide only moves the expiry), a delete makes the slide NOT_FOUND.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::store::{SessionRecord, StoreError, StoreResult};

/// The attribute a session's absolute end is kept in (unix ms); see the module docs.
pub const ENDS_AT_ATTR: &str = "\0ends_at";

/// Least granularity of the automatic setting.
pub const AUTO_GRANULARITY_FLOOR: Duration = Duration::from_secs(1);

/// How far a touch must move an expiry to be written (`--touch-granularity`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TouchGranularity(Option<Duration>);

impl TouchGranularity {
    /// The default: the larger of 1 s and 1% of the session's ttl.
    pub const AUTO: TouchGranularity = TouchGranularity(None);

    /// From the flag: absent is [`Self::AUTO`], `0` writes every touch.
    pub fn from_setting(setting: Option<Duration>) -> Self {
        TouchGranularity(setting)
    }

    /// The granularity for a session of `ttl`.
    pub fn for_ttl(self, ttl: Duration) -> Duration {
        self.0
            .unwrap_or_else(|| AUTO_GRANULARITY_FLOOR.max(ttl / 100))
    }
}

/// The `ends_at` kept in a record, if any (an unreadable one counts as none).
pub fn ends_at_of(record: &SessionRecord) -> Option<SystemTime> {
    let raw = record.attrs.get(ENDS_AT_ATTR)?;
    let ms: u64 = std::str::from_utf8(raw).ok()?.parse().ok()?;
    Some(UNIX_EPOCH + Duration::from_millis(ms))
}

/// The attribute value for `ends_at` (unix ms, rounded up so it is never earlier than asked).
pub fn encode_ends_at(ends_at: SystemTime) -> Vec<u8> {
    let since = ends_at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let ms = since.as_millis() + u128::from(!since.subsec_nanos().is_multiple_of(1_000_000));
    ms.to_string().into_bytes()
}

/// The record, or NOT_FOUND when its absolute lifetime is over at `now`.
pub fn alive_at(record: SessionRecord, now: SystemTime) -> StoreResult<SessionRecord> {
    match ends_at_of(&record) {
        Some(ends_at) if ends_at <= now => Err(StoreError::NotFound),
        _ => Ok(record),
    }
}

/// [`alive_at`] now.
pub fn alive(record: SessionRecord) -> StoreResult<SessionRecord> {
    alive_at(record, SystemTime::now())
}

/// The expiry a touch at `now` aims for: `now + ttl`, never past `ends_at`.
pub fn touch_target(record: &SessionRecord, ttl: Duration, now: SystemTime) -> SystemTime {
    let target = now + ttl;
    match ends_at_of(record) {
        Some(ends_at) => target.min(ends_at),
        None => target,
    }
}

/// Whether a touch at `now` (with the session's own ttl) would move the stored expiry by less
/// than `granularity`, so need not be written.
pub fn touch_is_skippable(
    record: &SessionRecord,
    granularity: TouchGranularity,
    now: SystemTime,
) -> bool {
    let step = granularity.for_ttl(record.ttl);
    let target = touch_target(record, record.ttl, now);
    match target.duration_since(record.expires_at) {
        Ok(moved) => moved < step,
        // The target is not later than the stored expiry (ends_at reached it): nothing to move.
        Err(_) => true,
    }
}

/// The absolute lifetime a request gives, capped by the server's `max`: absent when neither
/// sets one. INVALID_ARGUMENT for a negative or zero one.
pub fn resolve(
    requested: Option<prost_types::Duration>,
    max: Option<Duration>,
) -> Result<Option<Duration>, tonic::Status> {
    let requested = match requested {
        None => None,
        Some(requested) => {
            let lifetime = Duration::try_from(requested).map_err(|_| {
                tonic::Status::invalid_argument("max_lifetime must be a positive duration")
            })?;
            if lifetime.is_zero() {
                return Err(tonic::Status::invalid_argument(
                    "max_lifetime must be above zero",
                ));
            }
            Some(lifetime)
        }
    };
    Ok(match (requested, max) {
        (Some(requested), Some(max)) => Some(requested.min(max)),
        (requested, max) => requested.or(max),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn record(ttl: Duration, expires_at: SystemTime, ends_at: Option<SystemTime>) -> SessionRecord {
        let mut attrs = HashMap::new();
        if let Some(ends_at) = ends_at {
            attrs.insert(ENDS_AT_ATTR.to_owned(), encode_ends_at(ends_at));
        }
        SessionRecord {
            id: "x".into(),
            namespace: "default".into(),
            user_id: String::new(),
            attrs,
            version: 1,
            created_at: UNIX_EPOCH,
            expires_at,
            ttl,
        }
    }

    #[test]
    fn auto_granularity_is_one_second_or_one_percent() {
        let auto = TouchGranularity::AUTO;
        assert_eq!(
            auto.for_ttl(Duration::from_secs(10)),
            Duration::from_secs(1)
        );
        assert_eq!(
            auto.for_ttl(Duration::from_secs(3600)),
            Duration::from_secs(36)
        );
        let zero = TouchGranularity::from_setting(Some(Duration::ZERO));
        assert_eq!(zero.for_ttl(Duration::from_secs(3600)), Duration::ZERO);
    }

    #[test]
    fn touches_inside_the_granularity_are_skipped() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let ttl = Duration::from_secs(60);
        let fresh = record(ttl, now + ttl - Duration::from_millis(200), None);
        assert!(touch_is_skippable(&fresh, TouchGranularity::AUTO, now));
        let zero = TouchGranularity::from_setting(Some(Duration::ZERO));
        assert!(!touch_is_skippable(&fresh, zero, now));
        let old = record(ttl, now + ttl - Duration::from_secs(2), None);
        assert!(!touch_is_skippable(&old, TouchGranularity::AUTO, now));
        // Past ends_at's reach: nothing to move.
        let ending = record(
            ttl,
            now + ttl - Duration::from_secs(2),
            Some(now + Duration::from_secs(5)),
        );
        assert!(touch_is_skippable(&ending, zero, now));
    }

    #[test]
    fn lifetimes_are_capped_and_ended() {
        let hour = Duration::from_secs(3600);
        let asked = prost_types::Duration {
            seconds: 7200,
            nanos: 0,
        };
        assert_eq!(resolve(Some(asked), Some(hour)).unwrap(), Some(hour));
        assert_eq!(resolve(None, Some(hour)).unwrap(), Some(hour));
        assert_eq!(resolve(None, None).unwrap(), None);
        assert!(resolve(Some(prost_types::Duration::default()), None).is_err());
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let ended = record(hour, now + hour, Some(now));
        assert!(matches!(
            alive_at(ended.clone(), now),
            Err(StoreError::NotFound)
        ));
        assert!(alive_at(ended, now - Duration::from_millis(1)).is_ok());
    }
}
