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
        let _order = self.locks.lock(namespace, &[id]).await;
        let (replaced, stored) = retrying(|| async {
            let mut tx = self.pool.begin().await?;
            let restored = self.restore_locked(&mut tx, &snapshot, &blob).await;
            finish(tx, restored).await
        })
        .await?;
        let at = SystemTime::now();
        if let Replaced::Expired(owner) = replaced {
            self.emit(EventKind::Expired, namespace, id, &owner, 0, at);
        }
        self.emit(EventKind::Created, namespace, id, &stored.user_id, 1, at);
        Ok(stored)
    }

    /// One attempt of a restore in transaction `tx`.
    async fn restore_locked(
        &self,
        tx: &mut MySqlConnection,
        snapshot: &SessionRecord,
        blob: &[u8],
    ) -> Result<(Replaced, SessionRecord), Failure> {
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
        Ok((replaced, stored))
    }
}
