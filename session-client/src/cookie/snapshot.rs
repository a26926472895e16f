//! The snapshot a cookie carries (`session.v1.Snapshot`, defined in `session.proto` so that
//! backends in any language share it; docs/snapshot-cookie.md specifies the cookie around it),
//! and the one policy every reader and writer of snapshot cookies follows (the layer,
//! `demo-app --sessions proxy`, the proxy's lookup plugin): how a store's answer becomes a
//! snapshot, how changes made while the store is unreachable are recorded (the base version the
//! store confirmed and the keys changed since), which session a snapshot stands for, when it is
//! due for re-issue, how far its expiry may slide while it is the only copy, and what `Restore`
//! it becomes.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use session_proto::v1::Snapshot;

use super::{CookieCodec, MAX_COOKIE_BYTES};
use crate::client::{RestoreRequest, SessionData, new_write_id};

/// How long past the store's last confirmation a snapshot may stand in, unless configured
/// otherwise (`--snapshot-max-age`): an outage shorter than this logs out nobody who was active
/// when it began, and a snapshot cookie copied before a logout can bring the session back (into
/// a store that lost its data) for at most this long after the store last confirmed it.
pub const DEFAULT_SNAPSHOT_MAX_AGE: Duration = Duration::from_secs(60 * 60);

/// Milliseconds since the Unix epoch (0 before it).
pub fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Milliseconds of `d`, saturating.
/// A namespace as the server names it: `""` is the `default` namespace (session.proto), every
/// other name is itself. Snapshots are written and compared in this form.
pub fn canonical_namespace(namespace: &str) -> &str {
    if namespace.is_empty() {
        "default"
    } else {
        namespace
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The snapshot policy, as methods of [`Snapshot`] (import this trait to call them).
pub trait SnapshotPolicy: Sized {
    /// The snapshot of `session` as the store just returned it, at `now`: the store's epoch,
    /// its version as the base, no offline changes, valid until the session's own expiry but at
    /// most `max_age` past now.
    ///
    /// `namespace` is written into the snapshot as the server names it ([`canonical_namespace`]:
    /// `""` is `default`), and a reader requires its own there ([`SnapshotPolicy::is_for`]), so a
    /// layer configured with `""` and a proxy configured with `default` read each other's
    /// snapshots.
    fn confirmed(
        session: &SessionData,
        namespace: &str,
        now: SystemTime,
        max_age: Duration,
    ) -> Self;

    /// The snapshot of a session made while the store was unreachable: no epoch, base version
    /// 0, every attribute (and the user, when set) an offline change, version 1; valid for its
    /// ttl but at most `max_age` past now.
    fn made_offline(
        session: &SessionData,
        namespace: &str,
        now: SystemTime,
        max_age: Duration,
    ) -> Self;

    /// Whether this is a snapshot of session `id` in `namespace`: a verified snapshot of any
    /// other session (another user's, replayed beside this session's id cookie) must not stand
    /// in for this one.
    fn is_for(&self, id: &str, namespace: &str) -> bool;

    /// The session's sliding ttl.
    fn ttl(&self) -> Duration;

    /// Whether more than half of its life (`ttl`, or the shorter life the snapshot max age gave
    /// it) is left before this snapshot expires, as of `now`. A snapshot past half its life is
    /// re-issued, so that a user active about twice a ttl never
    /// holds an expired one, without a new cookie on every response.
    fn is_fresh(&self, ttl: Duration, now: SystemTime) -> bool;

    /// Whether this snapshot, as a request sent it, can stay in the browser for `session` as
    /// the store now holds it: the same session, confirmed by the same store epoch at that
    /// version with no offline changes, and fresh ([`SnapshotPolicy::is_fresh`] with the
    /// session's ttl). Otherwise it is due for re-issue (a session recreated at version 1 in a
    /// new epoch never keeps a snapshot of the old one). Whether it is written with the current
    /// key and format is the codec's to say ([`CookieCodec::is_current`]).
    fn is_up_to_date(&self, session: &SessionData, now: SystemTime) -> bool;

    /// Whether it holds changes the store has not seen.
    fn has_offline_changes(&self) -> bool;

    /// Records one request's changes made while the store is unreachable: attributes set and
    /// removed, the user when it changed. The version goes up by one; the base stays. The
    /// first offline change gives the snapshot the write id its `Restore` carries.
    fn record_offline(
        &mut self,
        set: &HashMap<String, Vec<u8>>,
        remove: &[String],
        user_id: Option<&str>,
    );

    /// Records that a write with id `write_id` ([`crate::client::Patch::write_id`]) was sent
    /// against the base version while the store went away, and its answer never came: it may
    /// have made `base_version + 1`, which the snapshot's `Restore` then takes for its own base
    /// (`own_write_ids`) rather than for another writer's change that wins. Call it with the
    /// write's changes recorded ([`SnapshotPolicy::record_offline`]), and only for a write sent
    /// at the snapshot's base version with its values: the offline changes are then a superset
    /// of it. The first such write is kept (later ones are never sent against the base).
    fn record_unsure_write(&mut self, write_id: &str);

    /// Slides the expiry to `now` plus the ttl, as a store's touch would, for a snapshot that
    /// stands in for an unreachable store; never past `max_age` after the store last confirmed
    /// it (the absolute limit in degraded mode).
    fn slide_offline(&mut self, now: SystemTime, max_age: Duration);

    /// The session it holds (offline changes included), in the snapshot's namespace and
    /// epoch, at its local version.
    fn to_session(&self) -> SessionData;

    /// The `Restore` that brings a store in step with it.
    fn to_restore(&self) -> RestoreRequest;
}

impl SnapshotPolicy for Snapshot {
    fn confirmed(
        session: &SessionData,
        namespace: &str,
        now: SystemTime,
        max_age: Duration,
    ) -> Self {
        let now_ms = unix_ms(now);
        Snapshot {
            id: session.id.clone(),
            namespace: canonical_namespace(namespace).to_owned(),
            user_id: session.user_id.clone(),
            attrs: session
                .attrs
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            version: session.version,
            created_at_ms: unix_ms(session.created_at),
            issued_at_ms: now_ms,
            expires_at_ms: unix_ms(session.expires_at).min(now_ms.saturating_add(ms(max_age))),
            ttl_ms: ms(session.ttl),
            epoch: session.epoch.clone(),
            base_version: session.version,
            offline_set: Vec::new(),
            offline_removed: Vec::new(),
            offline_user: false,
            confirmed_at_ms: now_ms,
            write_id: String::new(),
            unsure_write_id: String::new(),
        }
    }

    fn made_offline(
        session: &SessionData,
        namespace: &str,
        now: SystemTime,
        max_age: Duration,
    ) -> Self {
        let now_ms = unix_ms(now);
        let mut snapshot = Snapshot::confirmed(session, namespace, now, max_age);
        snapshot.epoch.clear();
        snapshot.base_version = 0;
        snapshot.version = 1;
        snapshot.offline_set = snapshot.attrs.keys().cloned().collect();
        snapshot.offline_user = !snapshot.user_id.is_empty();
        snapshot.write_id = new_write_id();
        snapshot.expires_at_ms = now_ms
            .saturating_add(snapshot.ttl_ms)
            .min(now_ms.saturating_add(ms(max_age)));
        snapshot
    }

    fn is_for(&self, id: &str, namespace: &str) -> bool {
        self.id == id && canonical_namespace(&self.namespace) == canonical_namespace(namespace)
    }

    fn ttl(&self) -> Duration {
        Duration::from_millis(self.ttl_ms)
    }

    fn is_fresh(&self, ttl: Duration, now: SystemTime) -> bool {
        // The life it was issued with: the ttl, or less when the max age capped it (a 4 h ttl
        // under a 1 h max age must not make every response re-issue it).
        let life = ms(ttl).min(self.expires_at_ms.saturating_sub(self.issued_at_ms));
        self.expires_at_ms.saturating_sub(unix_ms(now)) > life / 2
    }

    fn is_up_to_date(&self, session: &SessionData, now: SystemTime) -> bool {
        let (id, version, ttl) = (&session.id, session.version, session.ttl);
        self.id == *id
            && self.epoch == session.epoch
            && self.version == version
            && self.base_version == version
            && !self.has_offline_changes()
            && self.is_fresh(ttl, now)
    }

    fn has_offline_changes(&self) -> bool {
        !self.offline_set.is_empty() || !self.offline_removed.is_empty() || self.offline_user
    }

    fn record_offline(
        &mut self,
        set: &HashMap<String, Vec<u8>>,
        remove: &[String],
        user_id: Option<&str>,
    ) {
        let mut offline_set: BTreeSet<String> = self.offline_set.drain(..).collect();
        let mut offline_removed: BTreeSet<String> = self.offline_removed.drain(..).collect();
        for key in remove {
            self.attrs.remove(key);
            offline_set.remove(key);
            offline_removed.insert(key.clone());
        }
        for (key, value) in set {
            self.attrs.insert(key.clone(), value.clone());
            offline_removed.remove(key);
            offline_set.insert(key.clone());
        }
        self.offline_set = offline_set.into_iter().collect();
        self.offline_removed = offline_removed.into_iter().collect();
        if let Some(user_id) = user_id {
            user_id.clone_into(&mut self.user_id);
            self.offline_user = true;
        }
        if self.write_id.is_empty() {
            self.write_id = new_write_id();
        }
        self.version = self.version.saturating_add(1);
    }

    fn record_unsure_write(&mut self, write_id: &str) {
        if self.unsure_write_id.is_empty() {
            write_id.clone_into(&mut self.unsure_write_id);
        }
    }

    fn slide_offline(&mut self, now: SystemTime, max_age: Duration) {
        let limit = self.confirmed_at_ms.saturating_add(ms(max_age));
        self.expires_at_ms = unix_ms(now).saturating_add(self.ttl_ms).min(limit);
    }

    fn to_session(&self) -> SessionData {
        let at = |ms: u64| UNIX_EPOCH + Duration::from_millis(ms);
        SessionData {
            id: self.id.clone(),
            namespace: self.namespace.clone(),
            user_id: self.user_id.clone(),
            attrs: self
                .attrs
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            version: self.version,
            created_at: at(self.created_at_ms),
            expires_at: at(self.expires_at_ms),
            ttl: Duration::from_millis(self.ttl_ms),
            epoch: self.epoch.clone(),
            write_id: String::new(),
            ends_at: Default::default(),
        }
    }

    fn to_restore(&self) -> RestoreRequest {
        RestoreRequest {
            session: self.to_session(),
            epoch: self.epoch.clone(),
            base_version: self.base_version,
            set: self
                .offline_set
                .iter()
                .filter_map(|k| self.attrs.get(k).map(|v| (k.clone(), v.clone())))
                .collect(),
            remove: self.offline_removed.clone(),
            user_id: self.offline_user.then(|| self.user_id.clone()),
            // The lineage and the local version: a store holding a later snapshot of this
            // lineage is not rolled back by an earlier one.
            write_id: if self.write_id.is_empty() {
                String::new()
            } else {
                format!("{}.{}", self.write_id, self.version)
            },
            own_write_ids: Some(self.unsure_write_id.clone())
                .filter(|id| !id.is_empty())
                .into_iter()
                .collect(),
        }
    }
}

impl CookieCodec {
    /// The snapshot in cookie `value` when it verifies, has not expired, is of session `id` in
    /// `namespace` ([`SnapshotPolicy::is_for`]), was made by a release with store epochs (it
    /// has a confirmation time) and is within `max_age` of it; `None` otherwise (logged at
    /// debug level: a bad cookie is the client's problem, not the server's). The reader's own
    /// `max_age` counts, so shortening `--snapshot-max-age` takes effect on cookies already
    /// issued.
    pub fn decode_for(
        &self,
        value: &str,
        id: &str,
        namespace: &str,
        max_age: Duration,
        now: SystemTime,
    ) -> Option<Snapshot> {
        match self.decode_at(value, now) {
            Ok(snapshot) if !snapshot.is_for(id, namespace) => {
                tracing::debug!("ignoring a snapshot cookie of another session");
                None
            }
            Ok(snapshot) if snapshot.confirmed_at_ms == 0 => {
                tracing::debug!("ignoring a snapshot cookie from before store epochs");
                None
            }
            Ok(snapshot)
                if unix_ms(now) >= snapshot.confirmed_at_ms.saturating_add(ms(max_age)) =>
            {
                tracing::debug!("ignoring a snapshot cookie past the snapshot max age");
                None
            }
            Ok(snapshot) => Some(snapshot),
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
    use std::collections::{BTreeMap, HashMap};

    use super::super::{CookieKey, Encryption, KeyRing};
    use super::*;

    /// 2023-11-14T22:13:20Z, a fixed now.
    const NOW_MS: u64 = 1_700_000_000_000;
    /// Half an hour, the sessions' ttl here.
    const TTL_MS: u64 = 1_800_000;
    /// A max age that does not cap a fresh session's expiry.
    const LONG: Duration = Duration::from_secs(3600);

    fn at(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(ms)
    }

    /// A session the store returned at `NOW_MS`, at version 4 of epoch `e1`, expiring in a ttl.
    fn session() -> SessionData {
        SessionData {
            id: "A".repeat(32),
            namespace: "default".into(),
            user_id: "ann".into(),
            attrs: HashMap::from([("cart".into(), b"[1]".to_vec()), ("k".into(), vec![])]),
            version: 4,
            created_at: at(NOW_MS - 5_000),
            expires_at: at(NOW_MS + TTL_MS),
            ttl: Duration::from_millis(TTL_MS),
            epoch: "e1".into(),
            write_id: Default::default(),
            ends_at: Default::default(),
        }
    }

    fn confirmed() -> Snapshot {
        Snapshot::confirmed(&session(), "default", at(NOW_MS), LONG)
    }

    fn set(pairs: &[(&str, &[u8])]) -> HashMap<String, Vec<u8>> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.to_vec()))
            .collect()
    }

    fn keys(keys: &[&str]) -> Vec<String> {
        keys.iter().map(|k| (*k).to_owned()).collect()
    }

    #[test]
    fn confirmed_is_the_store_answer_with_no_offline_changes() {
        let snapshot = confirmed();
        assert_eq!(
            snapshot,
            Snapshot {
                id: "A".repeat(32),
                namespace: "default".into(),
                user_id: "ann".into(),
                attrs: BTreeMap::from([("cart".into(), b"[1]".to_vec()), ("k".into(), vec![])]),
                version: 4,
                created_at_ms: NOW_MS - 5_000,
                issued_at_ms: NOW_MS,
                expires_at_ms: NOW_MS + TTL_MS,
                ttl_ms: TTL_MS,
                epoch: "e1".into(),
                base_version: 4,
                offline_set: vec![],
                offline_removed: vec![],
                offline_user: false,
                confirmed_at_ms: NOW_MS,
                unsure_write_id: Default::default(),
                write_id: Default::default(),
            }
        );
        assert!(!snapshot.has_offline_changes());
        assert_eq!(snapshot.ttl(), session().ttl);
    }

    #[test]
    fn confirmed_expires_at_most_max_age_past_now() {
        let ten_minutes = Duration::from_secs(600);
        let snapshot = Snapshot::confirmed(&session(), "default", at(NOW_MS), ten_minutes);
        assert_eq!(snapshot.expires_at_ms, NOW_MS + 600_000);
        assert_eq!(snapshot.confirmed_at_ms, NOW_MS);
    }

    #[test]
    fn an_empty_namespace_is_the_default_one() {
        // A layer configured with "" and a proxy configured with "default" share snapshots.
        let snapshot = Snapshot::confirmed(&session(), "", at(NOW_MS), LONG);
        assert_eq!(snapshot.namespace, "default");
        assert!(snapshot.is_for(&session().id, ""));
        assert!(snapshot.is_for(&session().id, "default"));
        assert!(!snapshot.is_for(&session().id, "shop"));
        assert_eq!(snapshot.to_session().namespace, "default");
        let shop = Snapshot::confirmed(&session(), "shop", at(NOW_MS), LONG);
        assert!(!shop.is_for(&session().id, ""));
    }

    #[test]
    fn made_offline_is_all_offline_changes_against_no_store() {
        let snapshot = Snapshot::made_offline(&session(), "default", at(NOW_MS), LONG);
        assert_eq!(snapshot.epoch, "");
        assert_eq!((snapshot.base_version, snapshot.version), (0, 1));
        assert_eq!(snapshot.offline_set, keys(&["cart", "k"]), "sorted");
        assert!(snapshot.offline_removed.is_empty());
        assert!(snapshot.offline_user);
        assert!(snapshot.has_offline_changes());
        assert_eq!(
            (snapshot.issued_at_ms, snapshot.confirmed_at_ms),
            (NOW_MS, NOW_MS),
            "its max age counts from its making"
        );
        assert_eq!(snapshot.expires_at_ms, NOW_MS + TTL_MS);
        let capped =
            Snapshot::made_offline(&session(), "default", at(NOW_MS), Duration::from_secs(60));
        assert_eq!(capped.expires_at_ms, NOW_MS + 60_000);
        let anonymous = SessionData {
            user_id: String::new(),
            ..session()
        };
        let snapshot = Snapshot::made_offline(&anonymous, "default", at(NOW_MS), LONG);
        assert!(!snapshot.offline_user, "no user set");
    }

    #[test]
    fn a_snapshot_is_only_for_its_own_id_and_namespace() {
        let snapshot = Snapshot::confirmed(&session(), "shop", at(NOW_MS), LONG);
        assert!(snapshot.is_for(&"A".repeat(32), "shop"));
        assert!(!snapshot.is_for(&"B".repeat(32), "shop"));
        assert!(!snapshot.is_for(&"A".repeat(32), "blog"));
    }

    #[test]
    fn fresh_means_more_than_half_the_ttl_left() {
        let ttl = Duration::from_millis(TTL_MS);
        let snapshot = confirmed();
        // Expires at NOW + 30 min: fresh until 15 min are left, not at exactly 15.
        assert!(snapshot.is_fresh(ttl, at(NOW_MS)));
        assert!(snapshot.is_fresh(ttl, at(NOW_MS + 900_000 - 1)));
        assert!(!snapshot.is_fresh(ttl, at(NOW_MS + 900_000)));
        assert!(!snapshot.is_fresh(ttl, at(NOW_MS + 3_600_000)), "expired");
    }

    #[test]
    fn up_to_date_needs_the_same_session_epoch_confirmed_version_and_freshness() {
        let snapshot = confirmed();
        let stored = session();
        let at_version = |version: u64| SessionData {
            version,
            ..session()
        };
        assert!(snapshot.is_up_to_date(&stored, at(NOW_MS)));
        assert!(!snapshot.is_up_to_date(&at_version(5), at(NOW_MS)), "newer");
        let other = SessionData {
            id: "B".repeat(32),
            ..session()
        };
        assert!(!snapshot.is_up_to_date(&other, at(NOW_MS)));
        assert!(
            !snapshot.is_up_to_date(&stored, at(NOW_MS + 1_000_000)),
            "stale"
        );
        // Recreated in a store that lost its data: same id and version number, another epoch.
        let recreated = SessionData {
            epoch: "e2".into(),
            ..session()
        };
        assert!(!snapshot.is_up_to_date(&recreated, at(NOW_MS)), "epoch");

        // Offline changes the store has now taken (at version 5) are due for re-issue.
        let mut changed = snapshot.clone();
        changed.record_offline(&set(&[("cart", b"[2]")]), &[], None);
        assert_eq!(changed.version, 5);
        assert!(!changed.is_up_to_date(&at_version(5), at(NOW_MS)));
        assert!(!changed.is_up_to_date(&stored, at(NOW_MS)));
        // Any offline change counts, even one that left the versions equal.
        let user_only = Snapshot {
            offline_user: true,
            ..snapshot.clone()
        };
        assert!(!user_only.is_up_to_date(&stored, at(NOW_MS)));
        let base_behind = Snapshot {
            base_version: 3,
            ..snapshot
        };
        assert!(!base_behind.is_up_to_date(&stored, at(NOW_MS)));
    }

    #[test]
    fn record_offline_applies_and_records_one_requests_changes() {
        let mut snapshot = confirmed();
        snapshot.record_offline(
            &set(&[("b", b"2"), ("a", b"1")]),
            &keys(&["k"]),
            Some("bob"),
        );
        assert_eq!(
            snapshot.attrs,
            BTreeMap::from([
                ("a".into(), b"1".to_vec()),
                ("b".into(), b"2".to_vec()),
                ("cart".into(), b"[1]".to_vec()),
            ])
        );
        assert_eq!(snapshot.offline_set, keys(&["a", "b"]), "sorted");
        assert_eq!(snapshot.offline_removed, keys(&["k"]));
        assert_eq!(
            (snapshot.user_id.as_str(), snapshot.offline_user),
            ("bob", true)
        );
        assert_eq!((snapshot.version, snapshot.base_version), (5, 4));
        assert!(snapshot.has_offline_changes());

        // A request that changes no user keeps the earlier user change.
        snapshot.record_offline(&set(&[("a", b"3")]), &[], None);
        assert_eq!(
            (snapshot.user_id.as_str(), snapshot.offline_user),
            ("bob", true)
        );
        assert_eq!(snapshot.offline_set, keys(&["a", "b"]), "no duplicate");
        assert_eq!((snapshot.version, snapshot.base_version), (6, 4));
    }

    #[test]
    fn a_key_set_then_removed_offline_is_only_removed() {
        let mut snapshot = confirmed();
        snapshot.record_offline(&set(&[("x", b"1")]), &[], None);
        snapshot.record_offline(&HashMap::new(), &keys(&["x"]), None);
        assert!(!snapshot.attrs.contains_key("x"));
        assert!(snapshot.offline_set.is_empty());
        assert_eq!(snapshot.offline_removed, keys(&["x"]));
        let restore = snapshot.to_restore();
        assert!(restore.set.is_empty());
        assert_eq!(restore.remove, keys(&["x"]));
        assert_eq!(snapshot.version, 6);
    }

    #[test]
    fn a_key_removed_then_set_offline_is_only_set() {
        let mut snapshot = confirmed();
        snapshot.record_offline(&HashMap::new(), &keys(&["cart"]), None);
        assert!(!snapshot.attrs.contains_key("cart"));
        snapshot.record_offline(&set(&[("cart", b"[9]")]), &[], None);
        assert_eq!(snapshot.attrs["cart"], b"[9]");
        assert_eq!(snapshot.offline_set, keys(&["cart"]));
        assert!(snapshot.offline_removed.is_empty());
        let restore = snapshot.to_restore();
        assert_eq!(restore.set, set(&[("cart", b"[9]")]));
        assert!(
            restore.remove.is_empty(),
            "never a key both set and removed"
        );
    }

    #[test]
    fn sliding_offline_moves_the_expiry_one_ttl_past_now_up_to_the_max_age() {
        let mut snapshot = confirmed();
        snapshot.slide_offline(at(NOW_MS + 1_000_000), LONG);
        assert_eq!(snapshot.expires_at_ms, NOW_MS + 1_000_000 + TTL_MS);
        // Never past the store's last confirmation plus the max age.
        snapshot.slide_offline(at(NOW_MS + 3_000_000), LONG);
        assert_eq!(snapshot.expires_at_ms, NOW_MS + 3_600_000);
        snapshot.slide_offline(at(NOW_MS + 5_000_000), LONG);
        assert_eq!(snapshot.expires_at_ms, NOW_MS + 3_600_000);
        // Saturates rather than wrapping.
        snapshot.ttl_ms = u64::MAX;
        snapshot.slide_offline(at(NOW_MS), Duration::MAX);
        assert_eq!(snapshot.expires_at_ms, u64::MAX);
    }

    #[test]
    fn a_session_round_trips_through_its_confirmed_snapshot() {
        assert_eq!(confirmed().to_session(), session());
    }

    #[test]
    fn to_session_holds_the_offline_changes_at_the_local_version() {
        let mut snapshot = confirmed();
        snapshot.record_offline(&set(&[("cart", b"[2]")]), &keys(&["k"]), Some("bob"));
        let expected = SessionData {
            user_id: "bob".into(),
            attrs: HashMap::from([("cart".into(), b"[2]".to_vec())]),
            version: 5,
            ..session()
        };
        assert_eq!(snapshot.to_session(), expected);
    }

    #[test]
    fn to_restore_carries_the_base_and_only_the_offline_changes() {
        let restore = confirmed().to_restore();
        assert!(!restore.has_changes());
        assert_eq!((restore.epoch.as_str(), restore.base_version), ("e1", 4));
        assert_eq!(restore.session, session());

        let mut snapshot = confirmed();
        snapshot.record_offline(&set(&[("new", b"n")]), &keys(&["k"]), Some("bob"));
        let restore = snapshot.to_restore();
        assert_eq!(
            restore,
            RestoreRequest {
                session: snapshot.to_session(),
                epoch: "e1".into(),
                base_version: 4,
                set: set(&[("new", b"n")]),
                remove: keys(&["k"]),
                user_id: Some("bob".into()),
                write_id: format!("{}.5", snapshot.write_id),
                own_write_ids: Vec::new(),
            }
        );

        let made = Snapshot::made_offline(&session(), "default", at(NOW_MS), LONG);
        let restore = made.to_restore();
        assert_eq!((restore.epoch.as_str(), restore.base_version), ("", 0));
        assert_eq!(restore.set, session().attrs, "every attribute");
        assert_eq!(restore.user_id.as_deref(), Some("ann"));
        assert_eq!(
            restore.write_id,
            format!("{}.1", made.write_id),
            "a recreation has its write id"
        );
        assert_eq!(made.write_id.len(), 22, "128 random bits, base64url");
    }

    #[test]
    fn the_restore_write_id_is_made_once_per_outage_and_kept_in_the_cookie() {
        let confirmed = confirmed();
        assert!(confirmed.write_id.is_empty() && confirmed.unsure_write_id.is_empty());
        assert!(confirmed.to_restore().write_id.is_empty());

        let mut snapshot = confirmed.clone();
        snapshot.record_offline(&set(&[("a", b"1")]), &[], None);
        let first = snapshot.write_id.clone();
        assert_eq!(first.len(), 22, "128 random bits, base64url");
        snapshot.record_offline(&set(&[("b", b"2")]), &[], None);
        assert_eq!(snapshot.write_id, first, "one id for the whole outage");
        let sent = snapshot.to_restore().write_id;
        assert_eq!(
            sent,
            format!("{first}.{}", snapshot.version),
            "lineage and local version"
        );
        assert_eq!(
            snapshot.to_restore().write_id,
            sent,
            "every try sends the same"
        );

        let mut other = confirmed.clone();
        other.record_offline(&set(&[("a", b"1")]), &[], None);
        assert_ne!(
            other.write_id, first,
            "another outage (another tab): another id"
        );

        // Through the cookie and back.
        let codec = CookieCodec::new(
            KeyRing::new(vec![CookieKey::new(&[3; 32]).unwrap()]).unwrap(),
            Encryption::Aes256Gcm,
        );
        let decoded = codec
            .decode_at(&codec.encode(&snapshot).unwrap(), at(NOW_MS))
            .unwrap();
        assert_eq!(decoded.write_id, first);
    }

    #[test]
    fn an_unsure_write_is_an_own_write_of_the_restore() {
        let mut snapshot = confirmed();
        snapshot.record_offline(&set(&[("cart", b"[a]")]), &[], None);
        snapshot.record_unsure_write("w-1");
        snapshot.record_unsure_write("w-2");
        assert_eq!(
            snapshot.unsure_write_id, "w-1",
            "the write sent at the base"
        );
        let restore = snapshot.to_restore();
        assert_eq!(restore.own_write_ids, vec!["w-1".to_owned()]);
        assert_eq!(restore.base_version, 4, "the base stays");
        assert_eq!(
            restore.set,
            set(&[("cart", b"[a]")]),
            "its change is an offline one"
        );
    }

    /// A snapshot cookie of a live session confirmed now with a 1 h max age, and the codec.
    fn live_cookie(edit: impl FnOnce(&mut Snapshot)) -> (CookieCodec, String, SystemTime) {
        let codec = CookieCodec::new(
            KeyRing::new(vec![CookieKey::new(&[3; 32]).unwrap()]).unwrap(),
            Encryption::Aes256Gcm,
        );
        let now = SystemTime::now();
        let live = SessionData {
            expires_at: now + Duration::from_millis(TTL_MS),
            ..session()
        };
        let mut snapshot = Snapshot::confirmed(&live, "shop", now, LONG);
        edit(&mut snapshot);
        let value = codec.encode(&snapshot).unwrap();
        (codec, value, now)
    }

    #[test]
    fn decode_for_takes_a_valid_snapshot_of_the_named_session_only() {
        let (codec, value, now) = live_cookie(|_| {});
        let id = "A".repeat(32);
        let decoded = codec.decode_for(&value, &id, "shop", LONG, now);
        assert_eq!(
            decoded.map(|s| (s.version, s.epoch)),
            Some((4, "e1".into()))
        );
        assert_eq!(
            codec.decode_for(&value, &"B".repeat(32), "shop", LONG, now),
            None
        );
        assert_eq!(codec.decode_for(&value, &id, "blog", LONG, now), None);
        assert_eq!(codec.decode_for("v2.garbage", &id, "shop", LONG, now), None);
    }

    #[test]
    fn decode_for_refuses_a_snapshot_without_a_confirmation_time() {
        let (codec, value, now) = live_cookie(|s| s.confirmed_at_ms = 0);
        assert!(codec.decode(&value).is_ok(), "authentic and unexpired");
        assert_eq!(
            codec.decode_for(&value, &"A".repeat(32), "shop", LONG, now),
            None
        );
    }

    #[test]
    fn decode_for_refuses_a_snapshot_past_the_readers_max_age() {
        let (codec, value, now) = live_cookie(|_| {});
        let id = "A".repeat(32);
        // Issued with 1 h, read with 10 min: the reader's max age counts.
        let ten_minutes = Duration::from_secs(600);
        let confirmed_at = at(unix_ms(now));
        let just_before = confirmed_at + ten_minutes - Duration::from_millis(1);
        assert!(
            codec
                .decode_for(&value, &id, "shop", ten_minutes, just_before)
                .is_some()
        );
        let limit = confirmed_at + ten_minutes;
        assert_eq!(
            codec.decode_for(&value, &id, "shop", ten_minutes, limit),
            None
        );
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

    #[test]
    fn decode_for_checks_expiry_at_the_given_now() {
        let codec = CookieCodec::new(
            KeyRing::new(vec![CookieKey::new(&[3; 32]).unwrap()]).unwrap(),
            Encryption::None,
        );
        let value = codec.encode(&confirmed()).unwrap();
        let id = "A".repeat(32);
        assert!(
            codec
                .decode_for(&value, &id, "default", LONG, at(NOW_MS))
                .is_some()
        );
        assert_eq!(
            codec.decode_for(&value, &id, "default", LONG, at(NOW_MS + TTL_MS)),
            None
        );
    }

    #[test]
    fn a_ttl_longer_than_the_max_age_does_not_reissue_on_every_response() {
        // A 4 h ttl under a 1 h max age: the snapshot lives 1 h, fresh for its first half.
        let mut long = session();
        long.ttl = Duration::from_secs(4 * 3600);
        long.expires_at = at(NOW_MS + 4 * 3_600_000);
        let snapshot = Snapshot::confirmed(&long, "default", at(NOW_MS), LONG);
        assert_eq!(snapshot.expires_at_ms, NOW_MS + 3_600_000);
        assert!(snapshot.is_fresh(long.ttl, at(NOW_MS + 1_000)));
        assert!(snapshot.is_fresh(long.ttl, at(NOW_MS + 1_800_000 - 1)));
        assert!(!snapshot.is_fresh(long.ttl, at(NOW_MS + 1_800_000)));
    }
}
