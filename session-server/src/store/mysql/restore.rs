//! Restore: bringing back a session a backend kept in its snapshot cookie, unless it was
//! deleted.
//!
//! Delete, DeleteByUser and the old id of Regenerate do not remove the row: they turn it into a
//! tombstone (`deleted = 1`, user and attributes cleared, version kept) that expires one ttl
//! later and is then reaped silently. Restore locks whatever row holds the id and decides:
//! a live tombstone refuses, a live session at the same or a newer version is returned as it
//! is, and anything else (no row, an older version, an expired row) is overwritten by the
//! snapshot.

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

/// What a restore did.
enum Restored {
    /// The store already had this version or a newer one: returned unchanged, no event.
    Kept(SessionRecord),
    /// The snapshot was written: the event to send and the session as stored.
    Written(EventKind, SessionRecord),
}

impl Inner {
    pub(super) async fn restore(&self, snapshot: SessionRecord) -> StoreResult<SessionRecord> {
        self.check_size(attrs_size(&snapshot.attrs))?;
        let blob = encode_attrs(&snapshot.attrs).map_err(StoreError::Internal)?;
        let (namespace, id) = (snapshot.namespace.as_str(), snapshot.id.as_str());
        let _order = self.locks.lock(namespace, &[id]).await;
        let restored = retrying(|| async {
            let mut tx = self.pool.begin().await?;
            let restored = self.restore_locked(&mut tx, &snapshot, &blob).await;
            finish(tx, restored).await
        })
        .await?;
        match restored {
            Restored::Kept(stored) => Ok(stored),
            Restored::Written(kind, stored) => {
                let at = SystemTime::now();
                self.emit(kind, namespace, id, &stored.user_id, stored.version, at);
                Ok(stored)
            }
        }
    }

    /// One attempt of a restore in transaction `tx`.
    async fn restore_locked(
        &self,
        tx: &mut MySqlConnection,
        snapshot: &SessionRecord,
        blob: &[u8],
    ) -> Result<Restored, Failure> {
        let (namespace, id) = (snapshot.namespace.as_str(), snapshot.id.as_str());
        let now = now_ms();
        let row = fixed(&self.sql.any_for_update)
            .bind(namespace)
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        // Whether a live session with an older version is being replaced.
        let mut replacing_live = false;
        let row_exists = row.is_some();
        if let Some(row) = row {
            let deleted: bool = row.try_get("deleted")?;
            let stored = StoredRow::from_row(&row)?;
            if stored.expires_ms > now {
                if deleted {
                    return Err(StoreError::Deleted.into());
                }
                if stored.version >= snapshot.version {
                    // A newer session this code cannot decode is not overwritten either.
                    let kept = stored.record(namespace, id).ok_or(StoreError::NotFound)?;
                    return Ok(Restored::Kept(kept));
                }
                replacing_live = true;
            }
        }
        let ttl = ttl_ms(snapshot.ttl);
        let row = NewRow {
            namespace,
            id,
            user_id: &snapshot.user_id,
            attrs: blob,
            version: snapshot.version,
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
            version: snapshot.version,
            created_at: from_unix_ns(row.created_ns),
            expires_at: from_unix_ms(row.expires_ms),
            ttl: Duration::from_millis(ttl),
        };
        let kind = if replacing_live {
            EventKind::Updated
        } else {
            EventKind::Created
        };
        Ok(Restored::Written(kind, stored))
    }
}
