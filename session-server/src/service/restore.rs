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
//! The epoch read and the write are two store calls; [`crate::store`] says why that only ever
//! errs toward refusing.
//!
//! [`SessionStore::update`]: crate::store::SessionStore::update
//! [`SessionStore::restore`]: crate::store::SessionStore::restore

use std::time::SystemTime;

use session_proto::v1;
use tonic::{Code, Response, Status};

use super::{SessionService, check_id, check_user};
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
        let (outcome, result) = if !req.epoch.is_empty() && *req.epoch == *epoch {
            let patch = Patch {
                set: req.set,
                remove: req.remove,
                expected_version: Some(req.base_version),
                user_id: req.user_id,
                ttl: None,
            };
            self.restore_in_epoch(&namespace, &session.id, req.base_version, patch)
                .await
        } else {
            let now = SystemTime::now();
            let created_at = session
                .created_at
                .and_then(|t| SystemTime::try_from(t).ok())
                .filter(|t| *t <= now)
                .unwrap_or(now);
            let record = SessionRecord {
                id: session.id,
                namespace,
                user_id: session.user_id,
                attrs: session.attrs,
                version: 1,
                created_at,
                expires_at: now + ttl,
                ttl,
            };
            (RestoreOutcome::Recreated, self.store.restore(record).await)
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
        patch: Patch,
    ) -> (RestoreOutcome, StoreResult<SessionRecord>) {
        let unchanged = patch.set.is_empty() && patch.remove.is_empty() && patch.user_id.is_none();
        if !unchanged {
            return (
                RestoreOutcome::Applied,
                self.store.update(namespace, id, patch).await,
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
}
