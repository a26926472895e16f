//! The per-user session cap on Redis (see [`crate::store::cap`]), on one server and on a
//! cluster.
//!
//! # One server
//! The write's own script (`create.lua`, `update.lua`, `restore.lua`) counts the user's live
//! sessions through the user's index, and at the cap refuses or deletes the oldest as
//! `delete.lua` does (tombstone, `deleted` event), adds the id to the index and writes: one
//! atomic step (`admit` in `common.lua`). The user never has one session too many, not even
//! for a moment, and two writes never both take the place one eviction made. The script
//! reaches the user's other sessions without naming their keys in `KEYS`, which one server
//! allows.
//!
//! # Redis Cluster
//! A user's index lives in the user's slot and each session in the slot of its id, and a
//! session key cannot move to its user's slot (a Get knows only the id), so no script can
//! count, evict and write at once. A write that makes a session join a user holds the user's
//! *lease* instead: `{prefix}:{ns}:c:{<user>}`, in the slot of the user's index, taken by
//! `lease_take.lua` (`SET NX PX` of a token unique to the call, for the store timeout) and
//! polled for with short growing pauses within the call's own timeout. Holding it, the write
//! checks its own preconditions (the session exists, version, size; for a restore, that the
//! id is free), lists the user's live sessions, deletes the oldest with `delete.lua`
//! (tombstone, DELETED) and only then writes; then it ends the lease if it still holds it
//! (`lease_release.lua`; a call abandoned half-way ends it from a spawned task). The user
//! thus never has one session too many either, with these bounds:
//!
//! - A lease lasts the store timeout (`--store-timeout`), after which its call has failed
//!   anyway; but a write sent just before that deadline can still land after the lease ran
//!   out and another call took it, and a lease acknowledged by a master that dies before
//!   replicating it (replication is asynchronous) is lost in the failover. Each such event can
//!   let one session more join the user; the next session that joins under `evict-oldest`
//!   trims the user back to the cap (it evicts every session over it).
//! - A write whose own script then fails (its session was changed or deleted after the
//!   checks) leaves the sessions it evicted evicted.
//! - Waiting for a user's lease is part of the call: many writes for one user at once run one
//!   after the other, each a few round trips, and those still waiting at the store timeout
//!   fail with DEADLINE_EXCEEDED.
//!
//! # Both
//! Regenerate keeps the user and takes no part: it writes the session's new id before it
//! deletes the old one, and a count made in between sees the session twice, so a session
//! that joins the same user at that moment may evict one session more than needed (never
//! leaving one too many). Sessions written by servers without the cap (or before it was set)
//! are counted all the same: the count reads the user's index and sessions, not a ledger.

use std::future::Future;
use std::time::{Duration, SystemTime};

use ::redis::Value;
use futures::future::join_all;
use serde::Serialize;

use super::codec::{self, Reply};
use super::connection::{Connection, Connections, redis_error};
use super::script::LuaScript;
use super::user_index::INDEX_SLACK;
use super::{DeleteIf, RedisStore, now_ms};
use crate::store::cap::OnCap;
use crate::store::{Patch, StoreError, StoreResult, attrs_size};

/// First pause between two tries at a held lease: a lease is held for a few round trips.
const FIRST_POLL: Duration = Duration::from_millis(2);
/// Longest pause between two tries, so a freed lease is noticed soon.
const LAST_POLL: Duration = Duration::from_millis(50);

/// The session cap as `admit` in `common.lua` reads it (see `take_cap` there).
#[derive(Debug, Serialize)]
struct ScriptCap {
    /// The user's index key.
    ukey: String,
    /// Session keys up to the id.
    sp: String,
    /// Tombstone keys up to the id.
    tp: String,
    /// Most live sessions of the user.
    max: u32,
    /// Refuse rather than evict.
    refuse: bool,
    /// Least life of an eviction's tombstone.
    tomb_ms: u64,
    /// Least life of the user's index once the id is in it.
    index_ms: u64,
}

/// A user's session-cap lease on a cluster, ended by [`Lease::end`] or, if the call is
/// abandoned first, from a task spawned on drop.
struct Lease {
    /// The lease key.
    key: String,
    /// This call's token in it.
    token: String,
    /// Where to end it from a drop; `None` once ended.
    connections: Option<Connections>,
}

impl Lease {
    /// Ends the lease if it is still this call's. `connections` is cleared only once the
    /// release has succeeded: if this call is abandoned mid-release (or the release fails),
    /// the drop that follows releases the lease from a task of its own instead of leaving it
    /// behind until it runs out.
    async fn end(mut self, store: &RedisStore) {
        let ended = async {
            let mut conn = store.conn().await?;
            store
                .scripts
                .lease_release
                .key(&self.key)
                .arg(&self.token)
                .invoke_async::<Value>(&mut conn)
                .await
                .map_err(redis_error)
        };
        match ended.await {
            Ok(_) => self.connections = None,
            Err(error) => {
                tracing::debug!(%error, key = %self.key, "session-cap lease release failed; retried from a task");
            }
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Some(connections) = self.connections.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (key, token) = (
            std::mem::take(&mut self.key),
            std::mem::take(&mut self.token),
        );
        runtime.spawn(async move {
            let script = LuaScript::new(include_str!("lease_release.lua").to_string());
            if let Ok(mut conn) = connections.get().await {
                let _ = script
                    .key(&key)
                    .arg(&token)
                    .invoke_async::<Value>(&mut conn)
                    .await;
            }
        });
    }
}

impl RedisStore {
    /// How long a delete's tombstone lives at least (`delete.lua`, and the cap's evictions).
    pub(super) fn tombstone_ms(&self) -> u64 {
        codec::ttl_ms(self.config.timeout.saturating_mul(2)).max(1_000)
    }

    /// The extra first argument of `create.lua`, `update.lua` and `restore.lua` for a session
    /// of `ttl` joining `user`: the cap for the script to apply on one server; `None` when
    /// there is none for the user, and always on a cluster (see [`Self::capped`]).
    pub(super) fn cap_arg(&self, namespace: &str, user: &str, ttl: Duration) -> Option<String> {
        let cap = self.config.session_cap;
        if self.config.cluster || !cap.applies_to(user) {
            return None;
        }
        let prefix = &self.config.key_prefix;
        let up_to_id = |mut key: String| {
            key.pop(); // the closing brace after the (empty) id
            key
        };
        let arg = ScriptCap {
            ukey: self.user_key(namespace, user),
            sp: up_to_id(codec::session_key(prefix, namespace, "")),
            tp: up_to_id(codec::tombstone_key(prefix, namespace, "")),
            max: cap.max,
            refuse: cap.on_cap == OnCap::Refuse,
            tomb_ms: self.tombstone_ms(),
            index_ms: codec::ttl_ms(ttl.saturating_add(INDEX_SLACK)),
        };
        serde_json::to_string(&arg).ok()
    }

    /// Counts the evictions a script reported in `value` (absent: none).
    pub(super) fn count_evicted(&self, value: Option<&Value>) {
        let evicted = value.and_then(codec::integer).unwrap_or(0);
        self.evicted
            .add(usize::try_from(evicted).unwrap_or(usize::MAX));
    }

    /// Runs `write`, which makes the session `id` join `user`, under the session cap of a
    /// cluster: holding the user's lease, `joins` checks the write's preconditions (an error
    /// is the call's answer; `false`: the session does not join, as when it is the user's
    /// already), then the oldest of the user's other live sessions are evicted or the write is
    /// refused, then `write` runs. On one server, or with no cap for the user, it is `write`
    /// alone (its script admits the session itself).
    pub(super) async fn capped<T>(
        &self,
        namespace: &str,
        user: &str,
        id: &str,
        joins: impl Future<Output = StoreResult<bool>>,
        write: impl Future<Output = StoreResult<T>>,
    ) -> StoreResult<T> {
        if !self.config.cluster || !self.config.session_cap.applies_to(user) {
            return write.await;
        }
        let lease = self.take_lease(namespace, user).await?;
        let result = async {
            if joins.await? {
                let mut conn = self.conn().await?;
                let live = self.live_of(&mut conn, namespace, user, id).await?;
                let victims = self
                    .config
                    .session_cap
                    .victims(live, |(created, id)| (*created, id.as_str()))?;
                self.evict(&mut conn, namespace, user, &victims).await?;
            }
            write.await
        }
        .await;
        lease.end(self).await;
        result
    }

    /// Takes `user`'s lease, waiting while another call holds it (bounded by the call's
    /// timeout).
    async fn take_lease(&self, namespace: &str, user: &str) -> StoreResult<Lease> {
        let key = codec::cap_lease_key(&self.config.key_prefix, namespace, user);
        let token = self.ops.next();
        let ms = codec::ttl_ms(self.config.timeout);
        let mut conn = self.conn().await?;
        let mut pause = FIRST_POLL;
        loop {
            let taken: i64 = self
                .scripts
                .lease_take
                .key(&key)
                .arg(&token)
                .arg(ms)
                .invoke_async(&mut conn)
                .await
                .map_err(redis_error)?;
            if taken == 1 {
                return Ok(Lease {
                    key,
                    token,
                    connections: Some(self.connections.clone()),
                });
            }
            tokio::time::sleep(pause).await;
            pause = pause.saturating_mul(2).min(LAST_POLL);
        }
    }

    /// The live sessions of `user` other than `except`, as (created_at, id): the user's index
    /// read, then every session in it (each in its own slot).
    async fn live_of(
        &self,
        conn: &mut Connection,
        namespace: &str,
        user: &str,
        except: &str,
    ) -> StoreResult<Vec<(SystemTime, String)>> {
        let ids: Vec<String> = ::redis::cmd("SMEMBERS")
            .arg(self.user_key(namespace, user))
            .query_async(conn)
            .await
            .map_err(redis_error)?;
        let now = now_ms();
        let others: Vec<&String> = ids.iter().filter(|id| *id != except).collect();
        let replies = join_all(others.iter().map(|id| {
            let mut conn = conn.share();
            async move { self.read(&mut conn, namespace, id, false).await }
        }))
        .await;
        let mut live = Vec::new();
        for (id, reply) in others.into_iter().zip(replies) {
            if let Reply::Ok(values) = reply?
                && let Ok(record) = self.record(namespace, id, now, &values)
                && record.user_id == user
            {
                live.push((record.created_at, id.clone()));
            }
        }
        Ok(live)
    }

    /// Deletes `victims` (still `user`'s) as Delete does, and their index entries.
    async fn evict(
        &self,
        conn: &mut Connection,
        namespace: &str,
        user: &str,
        victims: &[(SystemTime, String)],
    ) -> StoreResult<()> {
        if victims.is_empty() {
            return Ok(());
        }
        let replies = join_all(victims.iter().map(|(_, id)| {
            let mut conn = conn.share();
            async move {
                let only = DeleteIf {
                    owner: Some(user),
                    ..DeleteIf::default()
                };
                self.remove(&mut conn, namespace, id, only).await
            }
        }))
        .await;
        let (mut evicted, mut gone) = (0, Vec::new());
        for ((_, id), reply) in victims.iter().zip(replies) {
            match reply? {
                Reply::Ok(_) => {
                    evicted += 1;
                    gone.push(id.as_str());
                }
                Reply::Corrupt(reason) => self.warn_corrupt(namespace, id, &reason),
                _ => gone.push(id.as_str()),
            }
        }
        self.evicted.add(evicted);
        self.index_remove(conn, namespace, user, &gone).await
    }

    /// Whether an update with `patch` would make the session `id` join `user` (a cluster's
    /// precondition check, see [`Self::capped`]): the errors its script would answer (not
    /// found, conflict, too large), else whether its owner is someone else.
    pub(super) async fn update_joins(
        &self,
        namespace: &str,
        id: &str,
        user: &str,
        patch: &Patch,
    ) -> StoreResult<bool> {
        let mut conn = self.conn().await?;
        let reply = self.read(&mut conn, namespace, id, false).await?;
        let values = self.expect_ok(reply, namespace, id)?;
        let mut record = self.record(namespace, id, now_ms(), &values)?;
        if record.user_id == user {
            return Ok(false);
        }
        if let Some(expected) = patch.expected_version
            && expected != record.version
        {
            return Err(StoreError::Conflict {
                expected,
                actual: record.version,
            });
        }
        for key in &patch.remove {
            record.attrs.remove(key);
        }
        for (key, value) in &patch.set {
            record.attrs.insert(key.clone(), value.clone());
        }
        let (size, limit) = (attrs_size(&record.attrs), self.config.max_session_bytes);
        if size > limit {
            return Err(StoreError::TooLarge { size, limit });
        }
        Ok(true)
    }

    /// Whether a restore of `id` would write (a cluster's precondition check, see
    /// [`Self::capped`]): not while the id holds a session or a tombstone, where the script
    /// itself answers the conflict or the refusal.
    pub(super) async fn restore_joins(&self, namespace: &str, id: &str) -> StoreResult<bool> {
        let mut conn = self.conn().await?;
        let prefix = &self.config.key_prefix;
        // Both in the slot of the id: one command.
        let taken: u64 = ::redis::cmd("EXISTS")
            .arg(self.session_key(namespace, id))
            .arg(codec::tombstone_key(prefix, namespace, id))
            .query_async(&mut conn)
            .await
            .map_err(redis_error)?;
        Ok(taken == 0)
    }
}
