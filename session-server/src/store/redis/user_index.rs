//! The per-user index of the Redis store: a set of session ids per user, kept beside the
//! sessions (see the key layout in [`super`]). It is updated by separate commands around the
//! session scripts, so it may hold ids of sessions that expired, were deleted or changed owner:
//! readers check every id against its session and remove the stale ones. On a cluster the set
//! lives in the user's slot and each session in its own, so they are never touched by one
//! command: a listing reads the set, then every session with its own script call.

use ::redis::Value;
use futures::future::join_all;
use std::time::Duration;

use super::codec::{self, Reply};
use super::connection::{Connection, redis_error};
use super::{DeleteIf, RedisStore, now_ms};
use crate::store::{SessionRecord, StoreResult};

/// Extra life given to an index over its sessions: the index is written just before or after
/// the session, and must never expire before it.
pub(super) const INDEX_SLACK: Duration = Duration::from_secs(60);

impl RedisStore {
    /// Adds `id` to the user's index (no-op for anonymous sessions) and keeps the index alive
    /// for at least `ttl` (plus [`INDEX_SLACK`]).
    pub(super) async fn index_add(
        &self,
        conn: &mut Connection,
        namespace: &str,
        user: &str,
        id: &str,
        ttl: Duration,
    ) -> StoreResult<()> {
        if user.is_empty() {
            return Ok(());
        }
        self.scripts
            .index_add
            .key(self.user_key(namespace, user))
            .arg(id)
            .arg(codec::ttl_ms(ttl.saturating_add(INDEX_SLACK)))
            .invoke_async::<Value>(conn)
            .await
            .map(drop)
            .map_err(redis_error)
    }

    /// Removes ids from the user's index (no-op for anonymous sessions).
    pub(super) async fn index_remove(
        &self,
        conn: &mut Connection,
        namespace: &str,
        user: &str,
        ids: &[&str],
    ) -> StoreResult<()> {
        if user.is_empty() || ids.is_empty() {
            return Ok(());
        }
        ::redis::cmd("SREM")
            .arg(self.user_key(namespace, user))
            .arg(ids)
            .query_async::<Value>(conn)
            .await
            .map(drop)
            .map_err(redis_error)
    }

    /// The ids in a user's index (possibly stale).
    async fn index_members(
        &self,
        conn: &mut Connection,
        namespace: &str,
        user: &str,
    ) -> StoreResult<Vec<String>> {
        ::redis::cmd("SMEMBERS")
            .arg(self.user_key(namespace, user))
            .query_async(conn)
            .await
            .map_err(redis_error)
    }

    /// The live sessions of one user, oldest first; removes stale ids from the index.
    pub(super) async fn user_sessions(
        &self,
        namespace: &str,
        user_id: &str,
    ) -> StoreResult<Vec<SessionRecord>> {
        let mut conn = self.conn().await?;
        let ids = self.index_members(&mut conn, namespace, user_id).await?;
        let now = now_ms();
        // One script call per session, concurrently: pipelined on a multiplexed connection, and
        // on a cluster each sent to its own session's node (no cross-slot pipeline exists).
        let replies = join_all(ids.iter().map(|id| {
            let mut conn = conn.share();
            async move { self.read(&mut conn, namespace, id, false).await }
        }))
        .await;
        let (mut sessions, mut stale) = (Vec::new(), Vec::new());
        for (id, reply) in ids.iter().zip(replies) {
            match reply? {
                Reply::Ok(values) => match self.record(namespace, id, now, &values) {
                    Ok(record) if record.user_id == user_id => sessions.push(record),
                    Ok(_) => stale.push(id.as_str()),
                    Err(_) => {} // logged; left alone, it may be a newer format's
                },
                Reply::Corrupt(reason) => self.warn_corrupt(namespace, id, &reason),
                _ => stale.push(id.as_str()),
            }
        }
        self.index_remove(&mut conn, namespace, user_id, &stale)
            .await?;
        sessions.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        Ok(sessions)
    }

    /// Deletes every session of one user and the index entries it went through.
    pub(super) async fn delete_user_sessions(
        &self,
        namespace: &str,
        user_id: &str,
    ) -> StoreResult<u64> {
        let mut conn = self.conn().await?;
        let ids = self.index_members(&mut conn, namespace, user_id).await?;
        let replies = join_all(ids.iter().map(|id| {
            let mut conn = conn.share();
            async move {
                let only = DeleteIf {
                    owner: Some(user_id),
                    ..DeleteIf::default()
                };
                self.remove(&mut conn, namespace, id, only).await
            }
        }))
        .await;
        let (mut deleted, mut done) = (0, Vec::new());
        for (id, reply) in ids.iter().zip(replies) {
            match reply? {
                Reply::Ok(_) => {
                    deleted += 1;
                    done.push(id.as_str());
                }
                Reply::Corrupt(reason) => self.warn_corrupt(namespace, id, &reason),
                _ => done.push(id.as_str()),
            }
        }
        self.index_remove(&mut conn, namespace, user_id, &done)
            .await?;
        Ok(deleted)
    }
}
