//! The reaper: a background task that deletes expired rows in small batches and sends EXPIRED
//! for each session it deleted (tombstones go silently).
//!
//! A batch is one short transaction: select the ids of at most `reap_batch` expired rows,
//! soonest first, with `FOR UPDATE`, delete exactly those, commit, then send their events. The
//! row locks make the events exact: a row touched by a writer between the select and the delete
//! cannot exist, because the writer waits for the lock and then no longer finds a live row. A
//! turn runs at most [`REAP_BATCHES_PER_TICK`] batches, so a mass expiry is spread over turns
//! and never keeps the table busy for long.

use std::collections::BTreeMap;
use std::sync::Weak;
use std::time::{Duration, SystemTime};

use sqlx::Row as _;
use tokio::task::JoinHandle;

use super::Inner;
use super::codec::unix_ms;
use super::error::{Failure, retrying};
use super::statements::{fixed, one_off};
use crate::store::{EventKind, StoreError, StoreResult};

/// Most batches one reaper turn deletes. With the default batch of 500 that is 5000 rows a
/// turn; more waits for the next turn, so the reaper never competes with live traffic for long.
pub const REAP_BATCHES_PER_TICK: u32 = 10;

/// Starts the reaper of `inner`: a turn every `interval` until the store is gone (or the task
/// is aborted by the store's drop).
pub(super) fn spawn(inner: Weak<Inner>, interval: Duration) -> JoinHandle<()> {
    tokio::spawn(async move {
        // The first turn one interval after start (a bare `interval` would fire at once).
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Logs a failing reaper once, not every turn, and says when it works again.
        let mut failing = false;
        loop {
            tick.tick().await;
            let Some(inner) = inner.upgrade() else { return };
            match inner.reap_turn().await {
                Ok(_) if failing => {
                    tracing::info!(table = %inner.config.table, "mysql reaper works again");
                    failing = false;
                }
                Ok(_) => {}
                Err(error) if !failing => {
                    tracing::warn!(table = %inner.config.table, %error, "mysql reaper failed");
                    failing = true;
                }
                Err(_) => {}
            }
        }
    })
}

/// One expired row picked by a batch.
struct Reaped {
    /// Namespace of the session.
    namespace: String,
    /// Session id.
    id: String,
    /// Owner, for the event.
    user_id: String,
    /// A tombstone: no event.
    tombstone: bool,
}

impl Inner {
    /// One reaper turn: batches until one comes back short, at most [`REAP_BATCHES_PER_TICK`]
    /// of them. Returns how many rows it deleted.
    pub(super) async fn reap_turn(&self) -> StoreResult<u64> {
        let batch = self.config.reap_batch.max(1);
        let mut deleted = 0;
        for _ in 0..REAP_BATCHES_PER_TICK {
            let reaped = tokio::time::timeout(self.config.timeout, retrying(|| self.reap_batch()))
                .await
                .unwrap_or(Err(StoreError::Timeout(self.config.timeout)))?;
            let count = reaped.len() as u64;
            let at = SystemTime::now();
            for row in reaped.iter().filter(|row| !row.tombstone) {
                self.emit(
                    EventKind::Expired,
                    &row.namespace,
                    &row.id,
                    &row.user_id,
                    0,
                    at,
                );
            }
            deleted += count;
            if count < u64::from(batch) {
                break;
            }
        }
        Ok(deleted)
    }

    /// Deletes one batch of expired rows (sessions and tombstones) and returns them.
    async fn reap_batch(&self) -> Result<Vec<Reaped>, Failure> {
        let now_ms = unix_ms(SystemTime::now());
        let mut tx = self.pool.begin().await?;
        let rows = fixed(&self.sql.reap_select)
            .bind(now_ms)
            .bind(self.config.reap_batch.max(1))
            .fetch_all(&mut *tx)
            .await?;
        if rows.is_empty() {
            tx.commit().await?;
            return Ok(Vec::new());
        }
        let mut reaped = Vec::with_capacity(rows.len());
        for row in &rows {
            reaped.push(Reaped {
                namespace: row.try_get("namespace")?,
                id: row.try_get("id")?,
                user_id: row.try_get("user_id")?,
                tombstone: row.try_get("deleted")?,
            });
        }
        let mut by_namespace: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for row in &reaped {
            by_namespace
                .entry(&row.namespace)
                .or_default()
                .push(&row.id);
        }
        for (namespace, ids) in by_namespace {
            let mut delete = one_off(self.sql.delete_ids(ids.len())).bind(namespace);
            for id in ids {
                delete = delete.bind(id);
            }
            delete.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(reaped)
    }
}
