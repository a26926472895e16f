//! Restore: the rules of `session.proto`, applied with the store's epoch read fresh.
//!
//! - The request's epoch is the store's (and not empty): the offline changes are one
//!   [`SessionStore::update`] at `expected_version = base_version`, so an absent session or a
//!   tombstone (NOT_FOUND from the store) is FAILED_PRECONDITION and another stored version is
//!   ABORTED with nothing applied. Without offline changes the stored session is read and
//!   returned if it is at the base version (ABORTED otherwise).
//! - Another epoch, or none: [`SessionStore::restore`] recreates the session at version 1 from
//!   the request's `session`, unless the id is live (ABORTED) or a tombstone
//!   (FAILED_PRECONDITION).
//!
//! - Either way, a version conflict is looked at once more (`rebase`): when the stored version's
//!   write id ([`WRITE_ID_ATTR`](super::WRITE_ID_ATTR)) says it is the holder's own write whose
//!   answer was lost (the server or the store went away after applying it), the offline
//!   changes are applied on top of it, compare-and-set at that version. Only the last write's
//!   id counts, so a change another writer made after it still wins; an older snapshot of the
//!   same holder never rolls back a newer one (write ids of a snapshot's restores carry its
//!   local version as a sequence number).
//!
//! The epoch read and the write are two store calls; [`crate::store`] says why that only ever
//! errs toward refusing.
//!
//! [`SessionStore::update`]: crate::store::SessionStore::update
//! [`SessionStore::restore`]: crate::store::SessionStore::restore

use std::collections::HashMap;
use std::time::SystemTime;

use session_proto::v1;
use tonic::{Code, Response, Status};

use super::{
    ENDS_AT_ATTR, MAX_OWN_WRITE_IDS, SessionService, check_id, check_user, check_write_id,
    lifetime, stamp, write_id_of,
};
use crate::store::{Patch, SessionRecord, StoreError, StoreResult};

/// What a Restore did, as counted in the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RestoreOutcome {
    /// Same epoch, base version stored: the offline changes applied.
    Applied,
    /// Same epoch, base version stored, no offline changes: returned as stored.
    Unchanged,
    /// Another or no epoch, id absent: recreated at version 1.
    Recreated,
    /// The stored version was the holder's own write (its answer lost): the offline changes
    /// applied on top of it.
    Rebased,
}

impl RestoreOutcome {
    /// The outcome's metric label (see [`crate::metrics::RESTORE_OUTCOMES`]); a refusal is
    /// labelled by its code, and other failures not at all.
    fn label(self, result: &Result<Response<v1::Session>, Status>) -> Option<&'static str> {
        match result {
            Ok(_) => Some(match self {
                RestoreOutcome::Applied => "applied",
                RestoreOutcome::Unchanged => "unchanged",
                RestoreOutcome::Recreated => "recreated",
                RestoreOutcome::Rebased => "rebased",
            }),
            Err(status) => match status.code() {
                Code::FailedPrecondition => Some("refused"),
                Code::Aborted => Some("conflict"),
                _ => None,
            },
        }
    }
}

/// The status of a Restore the store refused: a deleted (or, in the same epoch, absent) session
/// is FAILED_PRECONDITION, a live one the request may not write ABORTED; any other error is
/// given back.
fn refusal(error: StoreError) -> Result<Status, StoreError> {
    match error {
        StoreError::NotFound | StoreError::Deleted => Ok(Status::failed_precondition(
            "the session was deleted or expired in this store's epoch: it is not restored",
        )),
        StoreError::Conflict { actual, .. } => Ok(Status::aborted(format!(
            "the store holds the session at version {actual}, and the store wins: read it again"
        ))),
        other => Err(other),
    }
}

impl SessionService {
    /// Restore, once the call is admitted to `namespace`.
    pub(super) async fn restore_call(
        &self,
        req: v1::RestoreRequest,
        namespace: String,
    ) -> Result<Response<v1::Session>, Status> {
        let session = req
            .session
            .ok_or_else(|| Status::invalid_argument("session is required"))?;
        check_id(&session.id)?;
        check_user(&session.user_id)?;
        self.check_size(&session.attrs)?;
        self.check_patch(&req.set, &req.remove, req.user_id.as_deref())?;
        check_write_id(&req.write_id)?;
        if req.own_write_ids.len() > MAX_OWN_WRITE_IDS {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_OWN_WRITE_IDS} own_write_ids"
            )));
        }
        for write_id in &req.own_write_ids {
            check_write_id(write_id)?;
        }
        let ttl = self
            .ttl(session.ttl)?
            .unwrap_or(self.limits.default_ttl.min(self.limits.max_ttl));
        // Fresh, not the cached one: a store that lost its data a moment ago must not be taken
        // for the one the snapshot agreed with.
        let epoch = self
            .store
            .current_epoch()
            .await
            .map_err(|e| self.status(e))?;
        let offline = Offline {
            set: req.set,
            remove: req.remove,
            user_id: req.user_id,
            write_id: req.write_id,
        };
        let same_epoch = !req.epoch.is_empty() && *req.epoch == *epoch;
        let (outcome, result) = if same_epoch {
            self.restore_in_epoch(&namespace, &session.id, req.base_version, offline.clone())
                .await
        } else {
            let now = SystemTime::now();
            let created_at = session
                .created_at
                .and_then(|t| SystemTime::try_from(t).ok())
                .filter(|t| *t <= now)
                .unwrap_or(now);
            let mut attrs = session.attrs;
            let mut no_removal = Vec::new();
            stamp(&mut attrs, &mut no_removal, &offline.write_id);
            // The absolute end is kept: the snapshot's, capped by --max-lifetime counted from
            // the kept created_at.
            let snapshot_end = session.ends_at.and_then(|t| SystemTime::try_from(t).ok());
            let ends_at = match (snapshot_end, self.max_lifetime.map(|l| created_at + l)) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            if let Some(ends_at) = ends_at {
                attrs.insert(ENDS_AT_ATTR.to_owned(), lifetime::encode_ends_at(ends_at));
            }
            let record = SessionRecord {
                id: session.id.clone(),
                namespace: namespace.clone(),
                user_id: session.user_id,
                attrs,
                version: 1,
                created_at,
                expires_at: now + ttl,
                ttl,
            };
            if ends_at.is_some_and(|ends_at| ends_at <= now) {
                // Past its absolute lifetime: it ended, as an expired session, and stays so.
                (RestoreOutcome::Recreated, Err(StoreError::Deleted))
            } else {
                (RestoreOutcome::Recreated, self.store.restore(record).await)
            }
        };
        let (outcome, result) = match result {
            Err(StoreError::Conflict { expected, actual }) => {
                let unsure = same_epoch.then_some((req.base_version, &req.own_write_ids[..]));
                self.rebase(&namespace, &session.id, offline, unsure)
                    .await
                    .unwrap_or((outcome, Err(StoreError::Conflict { expected, actual })))
            }
            other => (outcome, other),
        };
        // A session past its absolute lifetime is expired here as everywhere (NOT_FOUND from
        // the store's side: FAILED_PRECONDITION, never its data).
        let result = result.and_then(lifetime::alive);
        let answer = match result {
            Ok(record) => Ok(Response::new(self.session(record))),
            Err(error) => Err(refusal(error).unwrap_or_else(|e| self.status(e))),
        };
        if let Some(label) = outcome.label(&answer) {
            self.metrics.restore(label);
        }
        answer
    }

    /// Restore in the store's own epoch: the offline changes applied at `base_version` as one
    /// patch, or the stored session as it is when there are none.
    async fn restore_in_epoch(
        &self,
        namespace: &str,
        id: &str,
        base_version: u64,
        offline: Offline,
    ) -> (RestoreOutcome, StoreResult<SessionRecord>) {
        if !offline.is_empty() {
            return (
                RestoreOutcome::Applied,
                self.store
                    .update(namespace, id, offline.patch(base_version))
                    .await,
            );
        }
        let stored = match self.store.get(namespace, id, false).await {
            Ok(stored) if stored.version != base_version => Err(StoreError::Conflict {
                expected: base_version,
                actual: stored.version,
            }),
            other => other,
        };
        (RestoreOutcome::Unchanged, stored)
    }

    /// A Restore that found the store moved past its base: `None` when the stored version is
    /// another writer's (the store wins), else what the holder's own version makes of it. The
    /// stored version is the holder's own when its write id is
    /// - of the request's lineage ([`lineage`]: the same outage of the same snapshot) at a
    ///   sequence number no later than the request's: this restore, or an older snapshot of
    ///   the same holder, was applied and its answer lost. The offline changes go on top of it
    ///   (a later snapshot holds every change of an earlier one), or, at the same sequence,
    ///   nothing is written when they are all there already (the same restore sent again); a
    ///   later sequence in the store means a newer snapshot of the holder won already.
    /// - in the same epoch (`unsure`: the base version and `own_write_ids`), one of the
    ///   holder's unsure writes, at exactly `base_version + 1`: that write was applied at the
    ///   base, with no other writer before it, and its answer lost.
    async fn rebase(
        &self,
        namespace: &str,
        id: &str,
        offline: Offline,
        unsure: Option<(u64, &[String])>,
    ) -> Option<(RestoreOutcome, StoreResult<SessionRecord>)> {
        let stored = match self.store.get(namespace, id, false).await {
            Ok(stored) => stored,
            // The store went away (or the session did) meanwhile: its error, not a conflict
            // that would make the holder drop its changes.
            Err(error) => return Some((RestoreOutcome::Rebased, Err(error))),
        };
        let made_by = write_id_of(&stored);
        if made_by.is_empty() {
            return None;
        }
        let (stored_lineage, stored_seq) = lineage(made_by);
        let (own_lineage, own_seq) = lineage(&offline.write_id);
        if !offline.write_id.is_empty() && stored_lineage == own_lineage {
            if stored_seq > own_seq {
                return None;
            }
            if stored_seq == own_seq {
                return offline
                    .is_in(&stored)
                    .then_some((RestoreOutcome::Unchanged, Ok(stored)));
            }
        } else {
            let unsure_write = unsure.is_some_and(|(base, own)| {
                stored.version == base.saturating_add(1) && own.iter().any(|w| w == made_by)
            });
            if !unsure_write {
                return None;
            }
        }
        tracing::debug!(
            version = stored.version,
            "restore: the stored version is the holder's own write, offline changes rebased onto it"
        );
        if offline.is_empty() {
            return Some((RestoreOutcome::Unchanged, Ok(stored)));
        }
        let patch = offline.patch(stored.version);
        Some((
            RestoreOutcome::Rebased,
            self.store.update(namespace, id, patch).await,
        ))
    }
}

/// A write id's lineage and sequence number: `<lineage>.<n>` with `n` decimal (a snapshot's
/// restores, `n` its local version), else the whole id at 0.
fn lineage(write_id: &str) -> (&str, u64) {
    write_id
        .rsplit_once('.')
        .and_then(|(lineage, n)| Some((lineage, n.parse().ok()?)))
        .unwrap_or((write_id, 0))
}

/// A Restore's offline changes and the write id they are written under.
#[derive(Debug, Clone)]
struct Offline {
    set: HashMap<String, Vec<u8>>,
    remove: Vec<String>,
    user_id: Option<String>,
    write_id: String,
}

impl Offline {
    fn is_empty(&self) -> bool {
        self.set.is_empty() && self.remove.is_empty() && self.user_id.is_none()
    }

    /// Whether `stored` already holds every change (values set, keys removed, the user).
    fn is_in(&self, stored: &SessionRecord) -> bool {
        self.set.iter().all(|(k, v)| stored.attrs.get(k) == Some(v))
            && self.remove.iter().all(|k| !stored.attrs.contains_key(k))
            && self.user_id.as_ref().is_none_or(|u| *u == stored.user_id)
    }

    /// The changes as one compare-and-set patch at `version`, stamped with the write id.
    fn patch(self, version: u64) -> Patch {
        let (mut set, mut remove) = (self.set, self.remove);
        stamp(&mut set, &mut remove, &self.write_id);
        Patch {
            set,
            remove,
            expected_version: Some(version),
            user_id: self.user_id,
            ttl: None,
        }
    }
}
