//! The Redis store's epoch (see [`crate::store`]): a string key `{prefix}:epoch` with no
//! expiry, read by `epoch.lua` (`GET`, then `SET` of a fresh random epoch only if missing, one
//! atomic script), so the first store to reach a Redis makes it and every other store on that
//! Redis and prefix reads the same one. A Redis that is flushed, replaced by an empty one, or loses the key any other way
//! gets a new epoch from the next read.
//!
//! The store remembers the last epoch it read ([`Epoch::cached`]) for the sessions it returns.
//! It reads it before its first call answers, on every [`SessionStore::current_epoch`]
//! (Restore and NOT_FOUND answers), and every [`REFRESH_EVERY`] in a background task, so
//! sessions written after a flush carry the new epoch within seconds. Until then a session
//! written into the flushed Redis is returned with the old epoch; a snapshot of it that later
//! asks for a restore names that old epoch, which the store no longer has, so it is treated as
//! a store that lost its data (recreated if absent and not a tombstone). That window is the
//! one way a stale epoch can mislead, and it is bounded by the refresh interval.
//!
//! On a cluster the key lives in its own slot, usually on another master than a session, so
//! Restore reads it in a call of its own before the session's script (see [`crate::store`] for
//! why that order only errs toward refusing). A Redis evicting keys under `allkeys-*`
//! `maxmemory-policy` may evict the epoch key like any session: the store then has a new epoch,
//! as it should, having lost sessions too.
//!
//! [`SessionStore::current_epoch`]: crate::store::SessionStore::current_epoch

use std::sync::{Arc, Weak};
use std::time::Duration;

use ::redis::Value;
use tokio::task::JoinHandle;

use super::codec;
use super::connection::{Connections, redis_error};
use super::script::LuaScript;
use crate::store::{EpochCell, StoreError, StoreResult, fresh_epoch};

/// How often the background task reads the epoch again: a new epoch (a flushed Redis) shows in
/// returned sessions within this long.
pub(super) const REFRESH_EVERY: Duration = Duration::from_secs(3);

/// The epoch of one Redis store: where it lives and the last one read.
pub(super) struct Epoch {
    /// `{prefix}:epoch`.
    key: String,
    /// `epoch.lua`.
    script: LuaScript,
    /// The last epoch read (empty before the first read).
    cell: EpochCell,
    /// The store's kind, for the log line of an epoch change.
    kind: &'static str,
    /// Bound on the background task's reads (the store's timeout).
    timeout: Duration,
}

impl Epoch {
    /// The epoch of a store with key prefix `prefix`, not read yet.
    pub(super) fn new(prefix: &str, kind: &'static str, timeout: Duration) -> Self {
        Epoch {
            key: codec::epoch_key(prefix),
            script: LuaScript::new(include_str!("epoch.lua").to_string()),
            cell: EpochCell::default(),
            kind,
            timeout,
        }
    }

    /// The last epoch read; empty before the first.
    pub(super) fn cached(&self) -> Arc<str> {
        self.cell.get()
    }

    /// Reads the epoch from Redis, making it first if it is missing, and remembers it.
    pub(super) async fn read(&self, connections: &Connections) -> StoreResult<Arc<str>> {
        let candidate = fresh_epoch()?;
        let mut conn = connections.get().await?;
        let reply: Value = self
            .script
            .key(&self.key)
            .arg(&*candidate)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_error)?;
        let epoch: Arc<str> = codec::text(&reply)
            .filter(|e| !e.is_empty())
            .ok_or_else(|| {
                StoreError::Internal(format!("unexpected epoch {reply:?} at key {}", self.key))
            })?
            .into();
        self.cell.set(self.kind, &epoch);
        Ok(epoch)
    }

    /// The cached epoch, read first if there is none yet: what every call that answers with a
    /// session makes sure of, so no session is ever returned without an epoch.
    pub(super) async fn known(&self, connections: &Connections) -> StoreResult<Arc<str>> {
        let cached = self.cached();
        if cached.is_empty() {
            return self.read(connections).await;
        }
        Ok(cached)
    }

    /// Starts the task that reads the epoch at once and then every [`REFRESH_EVERY`]. It holds
    /// only a weak reference, so it ends when the store is gone (the store also aborts it).
    pub(super) fn spawn_refresh(
        epoch: &Arc<Epoch>,
        connections: Connections,
        runtime: &tokio::runtime::Handle,
    ) -> JoinHandle<()> {
        let weak: Weak<Epoch> = Arc::downgrade(epoch);
        runtime.spawn(async move {
            let mut tick = tokio::time::interval(REFRESH_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(epoch) = weak.upgrade() else { return };
                let read = tokio::time::timeout(epoch.timeout, epoch.read(&connections)).await;
                match read {
                    Ok(Ok(_)) => {}
                    Ok(Err(error)) => tracing::debug!(%error, "reading the redis epoch failed"),
                    Err(_) => tracing::debug!("reading the redis epoch timed out"),
                }
            }
        })
    }
}
