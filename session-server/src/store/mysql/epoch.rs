//! The MySQL store's epoch (see [`crate::store`]): one row per session table in the shared
//! table [`EPOCHS_TABLE`] (`table_name`, `epoch`, `created_ms`), created with the schema. A
//! starting store inserts a fresh random epoch unless the row exists (`INSERT IGNORE`), then
//! reads it, so every server on one table shares it. A row that is gone (deleted by hand, the
//! database recreated) is made again with a new epoch on the next read.
//!
//! The store remembers the last epoch read for the sessions it returns, reads it fresh on
//! [`SessionStore::current_epoch`] (Restore and NOT_FOUND answers), and again every
//! [`REFRESH_EVERY`] in a background task. The epoch row is not the session table: emptying
//! the sessions by hand (`TRUNCATE`) keeps the epoch, so snapshots then find their sessions
//! absent in the same epoch and are refused (their users log in again); delete the epoch row
//! too to have them recreated.
//!
//! [`SessionStore::current_epoch`]: crate::store::SessionStore::current_epoch

use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use sqlx::AssertSqlSafe;
use tokio::task::JoinHandle;

use super::Inner;
use super::codec::unix_ms;
use super::error::store_error;
use crate::store::{StoreResult, fresh_epoch};

/// The table holding the epoch of every session table: one row per session table.
pub const EPOCHS_TABLE: &str = "stickless_epochs";

/// How often the background task reads the epoch again.
const REFRESH_EVERY: Duration = Duration::from_secs(3);

/// The statement creating [`EPOCHS_TABLE`] (idempotent).
pub(super) fn create_table() -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS `{EPOCHS_TABLE}` (
            table_name VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
            epoch VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
            created_ms BIGINT NOT NULL,
            PRIMARY KEY (table_name)
        ) ENGINE=InnoDB"
    )
}

impl Inner {
    /// Reads the session table's epoch, making it first if its row is missing, and remembers
    /// it.
    pub(super) async fn read_epoch(&self) -> StoreResult<Arc<str>> {
        let table = self.config.table.as_str();
        let select = format!("SELECT epoch FROM `{EPOCHS_TABLE}` WHERE table_name = ?");
        let found: Option<String> = sqlx::query_scalar(AssertSqlSafe(select.clone()))
            .bind(table)
            .fetch_optional(&self.pool)
            .await
            .map_err(store_error)?;
        let epoch = match found {
            Some(epoch) => epoch,
            None => {
                // Another server may insert at the same moment: the row that won is read back.
                let insert = format!(
                    "INSERT IGNORE INTO `{EPOCHS_TABLE}` (table_name, epoch, created_ms) \
                     VALUES (?, ?, ?)"
                );
                sqlx::query(AssertSqlSafe(insert))
                    .bind(table)
                    .bind(&*fresh_epoch()?)
                    .bind(unix_ms(SystemTime::now()))
                    .execute(&self.pool)
                    .await
                    .map_err(store_error)?;
                sqlx::query_scalar(AssertSqlSafe(select))
                    .bind(table)
                    .fetch_one(&self.pool)
                    .await
                    .map_err(store_error)?
            }
        };
        let epoch: Arc<str> = epoch.into();
        self.epoch.set("mysql", &epoch);
        Ok(epoch)
    }
}

/// Starts the task that reads the epoch every [`REFRESH_EVERY`] until the store is gone (or the
/// task is aborted by the store's drop).
pub(super) fn spawn_refresh(inner: Weak<Inner>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let start = tokio::time::Instant::now() + REFRESH_EVERY;
        let mut tick = tokio::time::interval_at(start, REFRESH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(inner) = inner.upgrade() else { return };
            let timeout = inner.config.timeout;
            match tokio::time::timeout(timeout, inner.read_epoch()).await {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => tracing::debug!(%error, "reading the mysql epoch failed"),
                Err(_) => tracing::debug!("reading the mysql epoch timed out"),
            }
        }
    })
}
