//! How long a session and its id cookie live: [`Expiry`], per layer and per session, and the
//! record the layer keeps in the session (under [`EXPIRY_ATTRIBUTE`]) to remember a session's
//! own choice and when its id cookie runs out, so that a persistent cookie is re-sent only when
//! needed (after half its life), not on every response.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::cookie::unix_ms;

/// The attribute under which the layer keeps a session's own [`Expiry`] and its id cookie's
/// schedule (JSON). Reserved: [`Session::clear`](super::Session::clear) keeps it. Present only
/// on sessions with a persistent cookie or an expiry of their own.
pub const EXPIRY_ATTRIBUTE: &str = "stickless.expiry";

/// How long a session and its id cookie live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Expiry {
    /// The id cookie has no `Max-Age`: the browser drops it when it closes. The store keeps the
    /// session for the layer's ttl ([`SessionConfig::ttl`](super::SessionConfig::ttl), else the
    /// server's default), sliding with each request.
    #[default]
    BrowserSession,
    /// The session lives this long after its last request ("remember me"): its ttl in the store
    /// is this, and the id cookie gets `Max-Age` in step with the store's expiry (re-sent when
    /// the session changes or half the cookie's life has passed).
    OnInactivity(Duration),
    /// The session ends at this time whatever its activity: the store's absolute lifetime
    /// (`max_lifetime`) ends it then, its ttl is capped to the time left, and the id cookie gets
    /// `Expires` at it.
    AtDateTime(SystemTime),
}

impl Expiry {
    /// Whether the id cookie outlives the browser.
    pub fn is_persistent(&self) -> bool {
        !matches!(self, Expiry::BrowserSession)
    }
}

/// How an [`Expiry`] is written into [`ExpiryRecord`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum StoredExpiry {
    Browser,
    Inactivity { ms: u64 },
    At { unix_ms: u64 },
}

impl From<Expiry> for StoredExpiry {
    fn from(expiry: Expiry) -> Self {
        match expiry {
            Expiry::BrowserSession => StoredExpiry::Browser,
            Expiry::OnInactivity(d) => StoredExpiry::Inactivity {
                ms: u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
            },
            Expiry::AtDateTime(t) => StoredExpiry::At {
                unix_ms: unix_ms(t),
            },
        }
    }
}

impl From<StoredExpiry> for Expiry {
    fn from(stored: StoredExpiry) -> Self {
        match stored {
            StoredExpiry::Browser => Expiry::BrowserSession,
            StoredExpiry::Inactivity { ms } => Expiry::OnInactivity(Duration::from_millis(ms)),
            StoredExpiry::At { unix_ms } => {
                Expiry::AtDateTime(SystemTime::UNIX_EPOCH + Duration::from_millis(unix_ms))
            }
        }
    }
}

/// What the layer keeps under [`EXPIRY_ATTRIBUTE`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct ExpiryRecord {
    /// The session's own expiry (`None`: the layer's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    own: Option<StoredExpiry>,
    /// When the persistent id cookie was last sent (Unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cookie_sent_ms: Option<u64>,
    /// When that cookie runs out in the browser (Unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cookie_until_ms: Option<u64>,
}

impl ExpiryRecord {
    /// The record in `attrs`; the default when there is none or it does not parse.
    pub(super) fn read(attrs: &std::collections::HashMap<String, Vec<u8>>) -> Self {
        attrs
            .get(EXPIRY_ATTRIBUTE)
            .and_then(|bytes| serde_json::from_slice(bytes).ok())
            .unwrap_or_default()
    }

    /// As JSON, for the attribute.
    pub(super) fn to_bytes(self) -> Vec<u8> {
        serde_json::to_vec(&self).unwrap_or_default()
    }

    /// Whether nothing is recorded (the attribute can go).
    pub(super) fn is_empty(&self) -> bool {
        *self == ExpiryRecord::default()
    }

    /// The session's own expiry.
    pub(super) fn own(&self) -> Option<Expiry> {
        self.own.map(Expiry::from)
    }

    pub(super) fn set_own(&mut self, expiry: Option<Expiry>) {
        self.own = expiry.map(StoredExpiry::from);
    }

    /// Records a cookie sent at `now` that runs out at `until`.
    pub(super) fn cookie_sent(&mut self, now: SystemTime, until: SystemTime) {
        self.cookie_sent_ms = Some(unix_ms(now));
        self.cookie_until_ms = Some(unix_ms(until));
    }

    /// Whether a persistent cookie's schedule is recorded.
    pub(super) fn has_cookie_schedule(&self) -> bool {
        self.cookie_until_ms.is_some()
    }

    /// Forgets the cookie's schedule (it is not persistent any more).
    pub(super) fn forget_cookie(&mut self) {
        self.cookie_sent_ms = None;
        self.cookie_until_ms = None;
    }

    /// Whether the persistent cookie must be sent again: never recorded, or half its life
    /// gone by `now`. Its life is the one recorded, or `ttl` (the store's, which the cookie's
    /// `Max-Age` followed) if shorter: a server that clamped the ttl asked for clamped the
    /// cookie too.
    pub(super) fn cookie_due(&self, now: SystemTime, ttl: Duration) -> bool {
        match (self.cookie_sent_ms, self.cookie_until_ms) {
            (Some(sent), Some(until)) => {
                let mut life = until.saturating_sub(sent);
                if !ttl.is_zero() {
                    life = life.min(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
                }
                unix_ms(now) >= sent + life / 2
            }
            _ => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_and_is_due_after_half_its_life() {
        let now = SystemTime::now();
        let mut record = ExpiryRecord::default();
        assert!(record.is_empty() && record.cookie_due(now, Duration::ZERO));
        record.set_own(Some(Expiry::OnInactivity(Duration::from_secs(60))));
        record.cookie_sent(now, now + Duration::from_secs(60));
        let attrs = std::collections::HashMap::from([(EXPIRY_ATTRIBUTE.into(), record.to_bytes())]);
        let read = ExpiryRecord::read(&attrs);
        assert_eq!(read, record);
        assert_eq!(
            read.own(),
            Some(Expiry::OnInactivity(Duration::from_secs(60)))
        );
        let (ttl, short) = (Duration::from_secs(60), Duration::from_secs(20));
        assert!(!read.cookie_due(now + Duration::from_secs(29), ttl));
        assert!(read.cookie_due(now + Duration::from_secs(31), ttl));
        // The store clamped the ttl (and so the cookie) to 20 s: due after 10 s.
        assert!(!read.cookie_due(now + Duration::from_secs(9), short));
        assert!(read.cookie_due(now + Duration::from_secs(11), short));
    }
}
