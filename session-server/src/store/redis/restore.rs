//! Restore on the Redis store: a session recreated from a client's snapshot for a store of
//! another epoch (see [`crate::store`]) by `restore.lua`, at version 1, unless the id holds a
//! session (a conflict: restored already) or its tombstone says it was deleted less than one
//! ttl ago.

use super::codec::{self, Reply};
use super::{RedisStore, now_ms};
use crate::store::{SessionRecord, StoreError, StoreResult};

impl RedisStore {
    /// Runs `restore.lua` under the session cap (see `cap`) and keeps the user indexes in step
    /// with what it did.
    pub(super) async fn restore_in(&self, record: SessionRecord) -> StoreResult<SessionRecord> {
        let (namespace, id) = (record.namespace.as_str(), record.id.as_str());
        let joins = self.restore_joins(namespace, id);
        self.capped(
            namespace,
            &record.user_id,
            id,
            joins,
            self.recreate(&record),
        )
        .await
    }

    /// One run of `restore.lua` for `record`, with its index entries.
    async fn recreate(&self, record: &SessionRecord) -> StoreResult<SessionRecord> {
        let mut conn = self.conn().await?;
        let (namespace, id) = (record.namespace.as_str(), record.id.as_str());
        let now = now_ms();
        // Index first, as for create: a crash after it leaves a stale entry (skipped by
        // readers), never a session its user cannot list.
        self.index_add(&mut conn, namespace, &record.user_id, id, record.ttl)
            .await?;
        let prefix = &self.config.key_prefix;
        let mut call = self.scripts.restore.key(self.session_key(namespace, id));
        call.key(codec::tombstone_key(prefix, namespace, id));
        if let Some(cap) = self.cap_arg(namespace, &record.user_id, record.ttl) {
            call.arg(cap);
        }
        call.arg(self.channel())
            .arg(namespace)
            .arg(id)
            .arg(now)
            .arg(self.config.max_session_bytes)
            .arg(&record.user_id)
            .arg(codec::unix_ms(record.created_at))
            .arg(codec::ttl_ms(record.ttl))
            .arg(codec::sub_ms_nanos(record.created_at))
            .arg(self.ops.next());
        for (key, value) in &record.attrs {
            call.arg(key).arg(value.as_slice());
        }
        let values = match self.parse(call.invoke_async(&mut conn).await)? {
            Reply::Deleted => {
                // No session holds the id: the entry just added is the only one.
                self.index_remove(&mut conn, namespace, &record.user_id, &[id])
                    .await?;
                return Err(StoreError::Deleted);
            }
            // The stored session is indexed under its own owner; if that is another user,
            // the entry just added is stale, and readers skip and remove it.
            Reply::Conflict(actual) => {
                return Err(StoreError::Conflict {
                    expected: 0,
                    actual,
                });
            }
            reply => self.expect_ok(reply, namespace, id)?,
        };
        self.count_evicted(values.get(2));
        self.record(namespace, id, now, &values)
    }
}
