//! The snapshot a cookie carries, and the one policy every reader and writer of snapshot cookies
//! follows (the layer, `demo-app --sessions proxy`, the proxy's lookup plugin): how a session
//! becomes a snapshot and back, which session a snapshot stands for, when it is due for
//! re-issue, and how its expiry slides while it is the only copy.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{CookieCodec, MAX_COOKIE_BYTES};
use crate::client::SessionData;

/// A session as the cookie carries it.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct Snapshot {
    /// Session id.
    #[prost(string, tag = "1")]
    pub id: String,
    /// Namespace of the session.
    #[prost(string, tag = "2")]
    pub namespace: String,
    /// Owner, or empty.
    #[prost(string, tag = "3")]
    pub user_id: String,
    /// Attributes.
    #[prost(btree_map = "string, bytes", tag = "4")]
    pub attrs: BTreeMap<String, Vec<u8>>,
    /// Session version this snapshot reflects.
    #[prost(uint64, tag = "5")]
    pub version: u64,
    /// When the session was created (unix ms).
    #[prost(uint64, tag = "6")]
    pub created_at_ms: u64,
    /// When this snapshot was made (unix ms).
    #[prost(uint64, tag = "7")]
    pub issued_at_ms: u64,
    /// When this snapshot stops being valid (unix ms).
    #[prost(uint64, tag = "8")]
    pub expires_at_ms: u64,
    /// The session's sliding ttl (ms).
    #[prost(uint64, tag = "9")]
    pub ttl_ms: u64,
}

/// Milliseconds since the Unix epoch (0 before it).
pub fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Milliseconds of `ttl`, saturating.
fn ms(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)
}

impl Snapshot {
    /// The snapshot of `session` as the store returned it, issued at `issued_at`, valid until
    /// the session's own expiry.
    ///
    /// `namespace` is written into the snapshot, and a reader requires its own there
    /// ([`Snapshot::is_for`]): pass the namespace the reader will check (a client's configured
    /// one), not necessarily `session.namespace`, which the server normalizes (`""` becomes
    /// `default`).
    pub fn from_session(session: &SessionData, namespace: &str, issued_at: SystemTime) -> Self {
        Snapshot {
            id: session.id.clone(),
            namespace: namespace.to_owned(),
            user_id: session.user_id.clone(),
            attrs: session
                .attrs
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            version: session.version,
            created_at_ms: unix_ms(session.created_at),
            issued_at_ms: unix_ms(issued_at),
            expires_at_ms: unix_ms(session.expires_at),
            ttl_ms: ms(session.ttl),
        }
    }

    /// The session this snapshot holds, as [`SessionClient::restore`] takes it (its namespace is
    /// the snapshot's).
    ///
    /// [`SessionClient::restore`]: crate::SessionClient::restore
    pub fn into_session(self) -> SessionData {
        let at = |ms: u64| UNIX_EPOCH + Duration::from_millis(ms);
        SessionData {
            id: self.id,
            namespace: self.namespace,
            user_id: self.user_id,
            attrs: self.attrs.into_iter().collect(),
            version: self.version,
            created_at: at(self.created_at_ms),
            expires_at: at(self.expires_at_ms),
            ttl: Duration::from_millis(self.ttl_ms),
        }
    }

    /// Whether this is a snapshot of session `id` in `namespace`: a verified snapshot of any
    /// other session (another user's, replayed beside this session's id cookie) must not stand
    /// in for this one.
    pub fn is_for(&self, id: &str, namespace: &str) -> bool {
        self.id == id && self.namespace == namespace
    }

    /// The session's sliding ttl.
    pub fn ttl(&self) -> Duration {
        Duration::from_millis(self.ttl_ms)
    }

    /// Whether more than half of `ttl` is left before this snapshot expires, as of `now`. A
    /// snapshot past half its life is re-issued, so that a user active about twice a ttl never
    /// holds an expired one, without a new cookie on every response.
    pub fn is_fresh(&self, ttl: Duration, now: SystemTime) -> bool {
        self.expires_at_ms.saturating_sub(unix_ms(now)) > ms(ttl) / 2
    }

    /// Whether this snapshot, as a request sent it, can stay in the browser for session `id` now
    /// at `version` with sliding `ttl`: the same session, the same version, and fresh
    /// ([`Snapshot::is_fresh`]). Otherwise it is due for re-issue. Whether it is written with the
    /// current key and format is the codec's to say ([`CookieCodec::is_current`]).
    pub fn is_up_to_date(&self, id: &str, version: u64, ttl: Duration, now: SystemTime) -> bool {
        self.id == id && self.version == version && self.is_fresh(ttl, now)
    }

    /// Slides the expiry to `now` plus the session's ttl, as a store's touch would: for a
    /// snapshot that stands in for an unreachable store.
    pub fn slide(&mut self, now: SystemTime) {
        self.expires_at_ms = unix_ms(now).saturating_add(self.ttl_ms);
    }
}

impl CookieCodec {
    /// The snapshot in cookie `value` when it verifies, has not expired, and is of session `id`
    /// in `namespace` ([`Snapshot::is_for`]); `None` otherwise (logged at debug level: a bad
    /// cookie is the client's problem, not the server's).
    pub fn decode_for(&self, value: &str, id: &str, namespace: &str) -> Option<Snapshot> {
        match self.decode(value) {
            Ok(snapshot) if snapshot.is_for(id, namespace) => Some(snapshot),
            Ok(_) => {
                tracing::debug!("ignoring a snapshot cookie of another session");
                None
            }
            Err(error) => {
                tracing::debug!(%error, "ignoring the session snapshot cookie");
                None
            }
        }
    }
}

/// Whether cookie `name` with `value` fits what browsers keep ([`MAX_COOKIE_BYTES`] for the
/// name, `=` and the value); a larger one is dropped silently, so none is set.
pub fn fits_in_cookie(name: &str, value: &str) -> bool {
    name.len() + 1 + value.len() <= MAX_COOKIE_BYTES
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::super::{CookieKey, Encryption, KeyRing};
    use super::*;

    /// 2023-11-14T22:13:20Z, a fixed now.
    const NOW_MS: u64 = 1_700_000_000_000;

    fn at(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(ms)
    }

    fn session() -> SessionData {
        SessionData {
            id: "A".repeat(32),
            namespace: "default".into(),
            user_id: "ann".into(),
            attrs: HashMap::from([("cart".into(), b"[1]".to_vec()), ("k".into(), vec![])]),
            version: 4,
            created_at: at(NOW_MS - 5_000),
            expires_at: at(NOW_MS + 1_800_000),
            ttl: Duration::from_secs(1800),
        }
    }

    #[test]
    fn a_session_round_trips_through_its_snapshot() {
        let session = session();
        let snapshot = Snapshot::from_session(&session, "default", at(NOW_MS));
        assert_eq!(
            (
                snapshot.issued_at_ms,
                snapshot.expires_at_ms,
                snapshot.ttl_ms
            ),
            (NOW_MS, NOW_MS + 1_800_000, 1_800_000)
        );
        assert_eq!(snapshot.ttl(), session.ttl);
        assert_eq!(snapshot.into_session(), session);
    }

    #[test]
    fn the_snapshot_takes_the_readers_namespace() {
        // A client configured with "" reads sessions the server calls "default".
        let snapshot = Snapshot::from_session(&session(), "", at(NOW_MS));
        assert!(snapshot.is_for(&session().id, ""));
        assert!(!snapshot.is_for(&session().id, "default"));
        assert_eq!(snapshot.into_session().namespace, "");
    }

    #[test]
    fn a_snapshot_is_only_for_its_own_id_and_namespace() {
        let snapshot = Snapshot::from_session(&session(), "shop", at(NOW_MS));
        assert!(snapshot.is_for(&"A".repeat(32), "shop"));
        assert!(!snapshot.is_for(&"B".repeat(32), "shop"));
        assert!(!snapshot.is_for(&"A".repeat(32), "blog"));
    }

    #[test]
    fn fresh_means_more_than_half_the_ttl_left() {
        let ttl = Duration::from_secs(1800);
        let snapshot = Snapshot::from_session(&session(), "default", at(NOW_MS));
        // Expires at NOW + 30 min: fresh until 15 min are left, not at exactly 15.
        assert!(snapshot.is_fresh(ttl, at(NOW_MS)));
        assert!(snapshot.is_fresh(ttl, at(NOW_MS + 900_000 - 1)));
        assert!(!snapshot.is_fresh(ttl, at(NOW_MS + 900_000)));
        assert!(!snapshot.is_fresh(ttl, at(NOW_MS + 3_600_000)), "expired");
    }

    #[test]
    fn up_to_date_needs_the_same_session_and_version_and_freshness() {
        let ttl = Duration::from_secs(1800);
        let snapshot = Snapshot::from_session(&session(), "default", at(NOW_MS));
        let id = "A".repeat(32);
        assert!(snapshot.is_up_to_date(&id, 4, ttl, at(NOW_MS)));
        assert!(!snapshot.is_up_to_date(&id, 5, ttl, at(NOW_MS)), "newer");
        assert!(!snapshot.is_up_to_date(&"B".repeat(32), 4, ttl, at(NOW_MS)));
        assert!(!snapshot.is_up_to_date(&id, 4, ttl, at(NOW_MS + 1_000_000)));
    }

    #[test]
    fn sliding_moves_the_expiry_one_ttl_past_now() {
        let mut snapshot = Snapshot::from_session(&session(), "default", at(NOW_MS));
        snapshot.slide(at(NOW_MS + 1_000_000));
        assert_eq!(snapshot.expires_at_ms, NOW_MS + 1_000_000 + 1_800_000);
        snapshot.ttl_ms = u64::MAX;
        snapshot.slide(at(NOW_MS));
        assert_eq!(snapshot.expires_at_ms, u64::MAX, "saturates");
    }

    #[test]
    fn decode_for_takes_only_a_valid_snapshot_of_the_named_session() {
        let codec = CookieCodec::new(
            KeyRing::new(vec![CookieKey::new(&[3; 32]).unwrap()]).unwrap(),
            Encryption::Aes256Gcm,
        );
        let now = SystemTime::now();
        let mut live = session();
        live.expires_at = now + Duration::from_secs(60);
        let value = codec
            .encode(&Snapshot::from_session(&live, "shop", now))
            .unwrap();
        let id = "A".repeat(32);
        assert_eq!(
            codec.decode_for(&value, &id, "shop").map(|s| s.version),
            Some(4)
        );
        assert_eq!(codec.decode_for(&value, &"B".repeat(32), "shop"), None);
        assert_eq!(codec.decode_for(&value, &id, "blog"), None);
        assert_eq!(codec.decode_for("v2.garbage", &id, "shop"), None);
    }

    #[test]
    fn a_cookie_fits_up_to_4096_bytes_with_its_name() {
        assert!(fits_in_cookie(
            "sid_snap",
            &"a".repeat(MAX_COOKIE_BYTES - 9)
        ));
        assert!(!fits_in_cookie(
            "sid_snap",
            &"a".repeat(MAX_COOKIE_BYTES - 8)
        ));
    }
}
