//! Regenerate on the Redis store: the session copied to its new id before the old id is deleted
//! (only at the version copied), so a crash in between never loses it (see the module docs of
//! [`super`]).

use super::codec::Reply;
use super::{DeleteIf, RedisStore, now_ms};
use crate::store::{SessionRecord, StoreError, StoreResult};

impl RedisStore {
    /// Regenerate in three scripts, new written before old deleted (see the module docs).
    pub(super) async fn regenerate_in(
        &self,
        namespace: &str,
        old_id: &str,
        new_id: &str,
    ) -> StoreResult<SessionRecord> {
        let mut conn = self.conn().await?;
        let now = now_ms();
        let reply = self.read(&mut conn, namespace, old_id, false).await?;
        let values = self.expect_ok(reply, namespace, old_id)?;
        let mut moving = self.record(namespace, old_id, now, &values)?;
        let read_version = moving.version;
        moving.version += 1;
        self.index_add(&mut conn, namespace, &moving.user_id, new_id, moving.ttl)
            .await?;
        // Data is unchanged, so a limit lowered since it was written does not apply.
        let new = self
            .insert(
                &mut conn,
                namespace,
                new_id,
                &moving,
                usize::MAX,
                now,
                false,
            )
            .await?;
        let only = DeleteIf {
            version: Some(read_version),
            // Like the CREATED event of the new id: the version the session moved on with.
            event_version: Some(new.version),
            ..DeleteIf::default()
        };
        let outcome = match self.remove(&mut conn, namespace, old_id, only).await? {
            Reply::Ok(_) => Ok(()),
            // Written or deleted since it was read: undo the copy rather than lose that write
            // or bring a logged-out session back.
            Reply::Conflict(actual) => Err(StoreError::Conflict {
                expected: read_version,
                actual,
            }),
            Reply::Corrupt(reason) => Err(self.corrupt(namespace, old_id, &reason)),
            _ => Err(StoreError::NotFound),
        };
        if let Err(error) = outcome {
            let only = DeleteIf {
                version: Some(new.version),
                ..DeleteIf::default()
            };
            self.remove(&mut conn, namespace, new_id, only).await?;
            self.index_remove(&mut conn, namespace, &new.user_id, &[new_id])
                .await?;
            return Err(error);
        }
        self.index_remove(&mut conn, namespace, &new.user_id, &[old_id])
            .await?;
        Ok(new)
    }
}
