//! Restore on the Redis store: a client's snapshot of a session (the cookie fallback's resync)
//! written back by `restore.lua`, unless the id's tombstone says it was deleted less than one
//! ttl ago or the store holds the same or a newer version.

use super::codec::{self, Reply};
use super::{RedisStore, now_ms};
use crate::store::{SessionRecord, StoreError, StoreResult};

impl RedisStore {
    /// Runs `restore.lua` and keeps the user indexes in step with what it did.
    pub(super) async fn restore_in(&self, record: SessionRecord) -> StoreResult<SessionRecord> {
        let mut conn = self.conn().await?;
        let (namespace, id) = (record.namespace.as_str(), record.id.as_str());
        let now = now_ms();
        // Index first, as for create: a crash after it leaves a stale entry (skipped by
        // readers), never a session its user cannot list.
        self.index_add(&mut conn, namespace, &record.user_id, id, record.ttl)
            .await?;
        let prefix = &self.config.key_prefix;
        let mut call = self.scripts.restore.key(self.session_key(namespace, id));
        call.key(codec::tombstone_key(prefix, namespace, id))
            .arg(self.channel())
            .arg(namespace)
            .arg(id)
            .arg(now)
            .arg(self.config.max_session_bytes)
            .arg(&record.user_id)
            .arg(record.version)
            .arg(codec::unix_ms(record.created_at))
            .arg(codec::ttl_ms(record.ttl))
            .arg(codec::sub_ms_nanos(record.created_at));
        for (key, value) in &record.attrs {
            call.arg(key).arg(value.as_slice());
        }
        let values = match self.parse(call.invoke_async(&mut conn).await)? {
            Reply::Deleted => {
                self.index_remove(&mut conn, namespace, &record.user_id, &[id])
                    .await?;
                return Err(StoreError::Deleted);
            }
            reply => self.expect_ok(reply, namespace, id)?,
        };
        let stored = self.record(namespace, id, now, &values)?;
        // A newer stored session was kept: its owner, not the snapshot's, is indexed.
        if stored.user_id != record.user_id {
            self.index_remove(&mut conn, namespace, &record.user_id, &[id])
                .await?;
        }
        self.index_add(&mut conn, namespace, &stored.user_id, id, stored.ttl)
            .await?;
        let previous = values.get(2).and_then(codec::text).unwrap_or_default();
        if previous != stored.user_id {
            self.index_remove(&mut conn, namespace, &previous, &[id])
                .await?;
        }
        Ok(stored)
    }
}
