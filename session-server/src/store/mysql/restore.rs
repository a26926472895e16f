//! Restore: recreating a session from a backend's snapshot cookie for a store of another epoch
//! (see [`crate::store`]), unless it is live or was deleted.
//!
//! Delete, DeleteByUser and the old id of Regenerate do not remove the row: they turn it into a
//! tombstone (`deleted = 1`, user and attributes cleared, version kept) that expires one ttl
//! later and is then reaped silently. Restore locks whatever row holds the id and decides:
//! a live tombstone refuses, a live session (decodable or not) conflicts, and otherwise (no
//! row, an expired one) the snapshot is written at version 1.

use std::time::{Duration, SystemTime};

use sqlx::Row as _;
use sqlx::mysql::MySqlConnection;

use super::Inner;
use super::cap::{CapCheck, Capped, begin_locking, settle};
use super::codec::{
    StoredRow, encode_attrs, expiry_ms, from_unix_ms, from_unix_ns, ttl_ms, unix_ns,
};
use super::error::{Failure, retrying};
use super::sessions::{NewRow, finish, now_ms};
use super::statements::fixed;
use crate::store::{EventKind, SessionRecord, StoreError, StoreResult, attrs_size};

/// What a restore replaced.
enum Replaced {
    /// No row, or a tombstone past its ttl.
    Nothing,
    /// An expired session not reaped yet, of this owner (it gets the EXPIRED the reaper would
    /// have sent).
    Expired(String),
}

impl Inner {
    pub(super) async fn restore(&self, snapshot: SessionRecord) -> StoreResult<SessionRecord> {
        self.check_size(attrs_size(&snapshot.attrs))?;
        let blob = encode_attrs(&snapshot.attrs).map_err(StoreError::Internal)?;
        let (namespace, id) = (snapshot.namespace.as_str(), snapshot.id.as_str());
        let user = snapshot.user_id.as_str();
        if self.config.session_cap.applies_to(user) {
            let admitted = self
                .under_cap(namespace, user, id, |stripes, force| {
                    self.restore_capped(&snapshot, &blob, stripes, force)
                })
                .await?;
            let at = SystemTime::now();
            self.emit_evicted(namespace, user, &admitted, at);
            let (replaced, stored) = admitted.value;
            self.emit_restored(namespace, id, replaced, &stored, at);
            return Ok(stored);
        }
        let _order = self.locks.lock(namespace, &[id]).await;
        let restored = retrying(|| async {
            let mut tx = self.pool.begin().await?;
            let restored = self.restore_locked(&mut tx, &snapshot, &blob, None).await;
            finish(tx, restored).await
        })
        .await?;
        let Capped::Done((replaced, stored), _) = restored else {
            return Err(StoreError::Internal(
                "mysql: uncapped restore relocked".into(),
            ));
        };
        let at = SystemTime::now();
        self.emit_restored(namespace, id, replaced, &stored, at);
        Ok(stored)
    }

    /// A restore under the session cap: [`Self::restore_locked`] with the admission, in a
    /// REPEATABLE READ transaction.
    async fn restore_capped(
        &self,
        snapshot: &SessionRecord,
        blob: &[u8],
        stripes: Vec<String>,
        force: bool,
    ) -> StoreResult<Capped<(Replaced, SessionRecord)>> {
        retrying(|| async {
            let mut conn = self.pool.acquire().await?;
            let mut tx = begin_locking(&mut conn).await?;
            let check = CapCheck {
                user: &snapshot.user_id,
                id: &snapshot.id,
                stripes: &stripes,
                force,
            };
            let restored = self
                .restore_locked(&mut tx, snapshot, blob, Some(&check))
                .await;
            settle(tx, restored).await
        })
        .await
    }

    /// The events of a restore: EXPIRED for an expired session it replaced, then CREATED.
    fn emit_restored(
        &self,
        namespace: &str,
        id: &str,
        replaced: Replaced,
        stored: &SessionRecord,
        at: SystemTime,
    ) {
        if let Replaced::Expired(owner) = replaced {
            self.emit(EventKind::Expired, namespace, id, &owner, 0, at);
        }
        self.emit(EventKind::Created, namespace, id, &stored.user_id, 1, at);
    }

    /// One attempt of a restore in transaction `tx`; under `cap`, the session is admitted to
    /// its user (see `cap`) once the id is known to be free.
    async fn restore_locked(
        &self,
        tx: &mut MySqlConnection,
        snapshot: &SessionRecord,
        blob: &[u8],
        cap: Option<&CapCheck<'_>>,
    ) -> Result<Capped<(Replaced, SessionRecord)>, Failure> {
        let (namespace, id) = (snapshot.namespace.as_str(), snapshot.id.as_str());
        let now = now_ms();
        let row = fixed(&self.sql.any_for_update)
            .bind(namespace)
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        let mut replaced = Replaced::Nothing;
        let row_exists = row.is_some();
        if let Some(row) = row {
            let deleted: bool = row.try_get("deleted")?;
            let stored = StoredRow::from_row(&row)?;
            if stored.expires_ms > now {
                if deleted {
                    return Err(StoreError::Deleted.into());
                }
                // Restored already (or any live session, even one this code cannot decode).
                return Err(StoreError::Conflict {
                    expected: 0,
                    actual: stored.version,
                }
                .into());
            }
            if !deleted {
                replaced = Replaced::Expired(stored.user_id);
            }
        }
        let victims = match cap {
            Some(check) => match self.admit_locked(tx, namespace, check, now).await? {
                Err(unheld) => return Ok(Capped::Relock(unheld)),
                Ok(victims) => victims,
            },
            None => Vec::new(),
        };
        let ttl = ttl_ms(snapshot.ttl);
        let row = NewRow {
            namespace,
            id,
            user_id: &snapshot.user_id,
            attrs: blob,
            version: 1,
            created_ns: unix_ns(snapshot.created_at),
            expires_ms: expiry_ms(now, ttl),
            ttl_ms: ttl,
        };
        if row_exists {
            fixed(&self.sql.replace)
                .bind(row.user_id)
                .bind(row.attrs)
                .bind(row.version)
                .bind(row.created_ns)
                .bind(row.expires_ms)
                .bind(row.ttl_ms)
                .bind(namespace)
                .bind(id)
                .execute(&mut *tx)
                .await?;
        } else {
            self.insert_row(tx, &row, now).await?;
        }
        let stored = SessionRecord {
            id: id.to_owned(),
            namespace: namespace.to_owned(),
            user_id: snapshot.user_id.clone(),
            attrs: snapshot.attrs.clone(),
            version: 1,
            created_at: from_unix_ns(row.created_ns),
            expires_at: from_unix_ms(row.expires_ms),
            ttl: Duration::from_millis(ttl),
        };
        Ok(Capped::Done((replaced, stored), victims))
    }
}
