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
//! - Either way, a version conflict is looked at once more: when the stored version's write id
//!   ([`WRITE_ID_ATTR`](super::WRITE_ID_ATTR)) is the request's or one of its `own_write_ids`,
//!   that version is the holder's own write whose answer was lost (the server or the store went
//!   away after applying it), and the offline changes are applied on top of it, compare-and-set
//!   at that version (a rebase). Only the last write's id counts, so a change another writer
//!   made after it still wins.
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
    MAX_OWN_WRITE_IDS, SessionService, check_id, check_user, check_write_id, stamp, write_id_of,
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
        let (outcome, result) = if !req.epoch.is_empty() && *req.epoch == *epoch {
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
            (RestoreOutcome::Recreated, self.store.restore(record).await)
        };
        let (outcome, result) = match result {
            Err(StoreError::Conflict { expected, actual }) => self
                .rebase(&namespace, &session.id, offline, &req.own_write_ids)
                .await
                .unwrap_or((outcome, Err(StoreError::Conflict { expected, actual }))),
            other => (outcome, other),
        };
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

    /// A Restore that found the store moved past its base: when the stored version was made by
    /// one of the holder's own writes (its write id is the request's or one of
    /// `own_write_ids`: a write applied whose answer was lost), the offline changes go on top
    /// of it, at that version; `None` when it was made by another writer (the store wins).
    async fn rebase(
        &self,
        namespace: &str,
        id: &str,
        offline: Offline,
        own_write_ids: &[String],
    ) -> Option<(RestoreOutcome, StoreResult<SessionRecord>)> {
        let stored = self.store.get(namespace, id, false).await.ok()?;
        let made_by = write_id_of(&stored);
        let own = !made_by.is_empty()
            && (made_by == offline.write_id || own_write_ids.iter().any(|w| w == made_by));
        if !own {
            return None;
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
