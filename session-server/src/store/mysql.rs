//! The MySQL/MariaDB store: one InnoDB row per session, durable across restarts of both the
//! session server and the database, shared safely by any number of session servers.
//!
//! Built on sqlx (`mysql`, `runtime-tokio`): its pool has an acquire timeout and tests a
//! connection before handing it out (so connections broken by a database restart are replaced,
//! not returned), queries are checked at run time (building needs no database), it is actively
//! maintained, and it is pure Rust (no libmysqlclient to install).
//!
//! Built only with the `mysql-store` feature of this crate (on by default).
//!
//! # TLS
//! [`MysqlConfig::url`] takes MySQL's TLS parameters, as the `mysql` client names them:
//! `mysql://user:pw@host:3306/db?ssl-mode=verify_ca&ssl-ca=/etc/stickless/mysql-ca.pem`.
//! `ssl-mode` is `disabled`, `preferred` (the default: TLS when the server offers it, its
//! certificate not verified), `required` (TLS or no connection, certificate not verified),
//! `verify_ca` (TLS, certificate signed by `ssl-ca` or a system root) or `verify_identity`
//! (`verify_ca`, and the certificate names the URL's host). sqlx trusts `ssl-ca` in addition
//! to the system's roots, never instead of them, so with `verify_ca` any certificate from a
//! public CA passes (the host is not checked): `verify_identity` is the mode that pins the
//! server, and `verify_ca` is logged as a warning at start-up. `ssl-cert` and `ssl-key` present a
//! client certificate. With `required`, `verify_ca` or `verify_identity` a server that does not
//! offer TLS is refused, never talked to in cleartext. TLS is rustls (ring); the CA file is read
//! at every new connection, so a replaced one applies without a restart. Any other parameter,
//! one given twice, an `ssl-ca` with a mode that does not verify, or an unreadable file is an
//! error (see [`check_url`]), never ignored.
//!
//! # Schema
//! One table, named by [`MysqlConfig::table`], created or migrated by [`MysqlStore::connect`]
//! (steps recorded in [`MIGRATIONS_TABLE`], see `schema`):
//!
//! | column | type | |
//! |---|---|---|
//! | `namespace` | `VARCHAR(64)` ascii, binary collation | primary key with `id` |
//! | `id` | `CHAR(32)` ascii, binary collation | base64url is case-sensitive |
//! | `user_id` | `VARCHAR(256)` utf8mb4, binary collation | index `(namespace, user_id)` |
//! | `attrs` | `LONGBLOB` | format byte `1`, then length-prefixed keys and values |
//! | `version` | `BIGINT UNSIGNED` | bumped by every write |
//! | `created_ns` | `BIGINT` | unix ns (exact, so a restored creation time comes back as given) |
//! | `expires_ms` | `BIGINT` | unix ms of this server's clock; index on it for the reaper |
//! | `ttl_ms` | `BIGINT UNSIGNED` | the sliding ttl |
//! | `deleted` | `BOOLEAN` | a tombstone: the session was deleted (see `restore`) |
//!
//! The store's epoch (see [`crate::store`]) is a row of the shared table [`EPOCHS_TABLE`],
//! keyed by the session table's name, made by the first server that starts on the table (see
//! `epoch`).
//!
//! # Guarantees
//! - **Durability**: a call returns after its transaction committed; what InnoDB keeps across a
//!   crash depends on `innodb_flush_log_at_trx_commit` (1, the default, keeps everything).
//! - **Atomicity**: Update, Regenerate, Delete and Restore lock the session's row (`SELECT … FOR
//!   UPDATE`), decide in Rust (compare-and-set, merge of the patch, size limit), write, and
//!   commit; the write itself is conditional on the version read. Writers of one session in
//!   other servers wait for the lock, so concurrent patches of different keys all survive.
//!   Deadlocks and lock wait timeouts (MySQL errors 1213, 1205) are retried inside the store.
//!   Touch is one `UPDATE` of the expiry (never of the attributes) followed by a read.
//! - **Expiry precision**: milliseconds. Every statement compares `expires_ms` with the clock
//!   of the server making the call, so an expired session is never returned, touched or
//!   written, even before the reaper deletes its row (servers sharing a table should keep their
//!   clocks in sync; a skew shifts expiry by as much). A create whose id is held by an expired
//!   row replaces it. The reaper deletes expired rows every [`MysqlConfig::reap_interval`] in
//!   batches of [`MysqlConfig::reap_batch`], at most [`REAP_BATCHES_PER_TICK`] per turn.
//! - **Session cap**: a write that makes a session join a user (see [`crate::store::cap`])
//!   counts the user's live rows, evicts the oldest as tombstones and writes in one REPEATABLE
//!   READ transaction that holds the user's rows and the gap after them locked (see `cap`), so
//!   concurrent logins of one user, on any number of servers, never leave one session too many.
//! - **Tombstones**: a deleted session (Delete, DeleteByUser, the old id of Regenerate) keeps
//!   its row for one ttl, flagged `deleted` with user and attributes cleared, so that Restore
//!   refuses to bring it back; nothing else sees it, and the reaper removes it silently.
//! - **Restore**: the epoch row is read in a statement of its own, then the session's row is
//!   locked and written (an `UPDATE` at the base version for the same epoch, `restore` for
//!   another): not one transaction, which only ever errs toward refusing (see
//!   [`crate::store`]).
//! - **Events**: a broadcast of [`EVENT_BUFFER`] events inside this process, sent after each
//!   commit. A write holds a per-session stripe lock until its event is sent, so one session's
//!   events come in commit order. The stream sees only what this store instance does: writes
//!   through other servers sharing the table, or by hand, are not seen, and EXPIRED comes from
//!   whoever deleted the expired row (the reaper of any one of the servers, or a create taking
//!   its id), with version 0. A call that runs out of time between its commit and the send
//!   loses its event.
//! - **Undecodable rows** (say, written by a later version in another format) are logged and
//!   treated as absent by reads, touches and patches, and never overwritten by a Restore (it
//!   answers a conflict); Delete, DeleteByUser and the reaper still delete them, so a logout
//!   works during a rolling upgrade.
//! - **Errors**: every call is bounded by [`MysqlConfig::timeout`] ([`StoreError::Timeout`]);
//!   a database that cannot be reached or drops the connection is [`StoreError::Unavailable`],
//!   and the store recovers by itself when it is back.
//!
//! # Layout
//! - this file: [`MysqlConfig`], [`MysqlStore`] and its [`SessionStore`] methods;
//! - `url`: the URL's parameters checked, TLS mode, connect options;
//! - `sessions`: the statements each call runs; `restore`: Restore and tombstones; `epoch`:
//!   the epoch row, read and refreshed; `cap`: the per-user session cap, counted and kept in
//!   the write's transaction with the user's rows locked;
//! - `reaper`: the background deletes;
//! - `schema`: migration at start-up; `statements`: SQL text; `codec`: row encoding;
//! - `error`: error mapping and retries; `locks`: per-session write order inside the process.

mod cap;
mod codec;
mod epoch;
mod error;
mod locks;
mod reaper;
mod restore;
mod schema;
mod sessions;
mod statements;
mod url;

pub use self::epoch::EPOCHS_TABLE;
pub use self::reaper::REAP_BATCHES_PER_TICK;
pub use self::schema::{MIGRATIONS_TABLE, SCHEMA_VERSION};
pub use self::url::{PARAMETERS, check_url};

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sqlx::AssertSqlSafe;
use sqlx::mysql::{MySqlPool, MySqlPoolOptions};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use self::locks::WriteLocks;
use self::statements::Statements;
use self::url::MysqlUrl;
use super::cap::{Evictions, SessionCap};
use super::{
    EVENT_BUFFER, EpochCell, EventKind, NewSession, Patch, SessionEvent, SessionRecord,
    SessionStore, StoreError, StoreResult,
};
use crate::config::{ConfigError, Settings};

/// How long an unused pooled connection is kept. Short enough that a pool sized for a burst
/// shrinks back soon after it, long enough that steady traffic never reconnects.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Bound on [`MysqlStore::connect`]'s schema migration, which may wait for another server's.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(60);

/// Settings of the MySQL store.
#[derive(Clone)]
pub struct MysqlConfig {
    /// `mysql://user[:password]@host:port/database`, with TLS parameters when wanted
    /// (`?ssl-mode=verify_ca&ssl-ca=/path/ca.pem`, see the module docs and [`PARAMETERS`]).
    pub url: String,
    /// Table of the sessions.
    pub table: String,
    /// Most pooled connections.
    pub pool_size: u32,
    /// Bound on every store call, pool wait included.
    pub timeout: Duration,
    /// How often the reaper deletes expired rows.
    pub reap_interval: Duration,
    /// Most rows the reaper deletes per statement.
    pub reap_batch: u32,
    /// Limit on the total attribute size of a session.
    pub max_session_bytes: usize,
    /// The per-user session cap (see `cap`: kept in the write's transaction, the user's rows
    /// locked).
    pub session_cap: SessionCap,
}

impl std::fmt::Debug for MysqlConfig {
    /// Like a derived Debug, with any password in the URL hidden.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MysqlConfig")
            .field("url", &super::redact_one_url(&self.url))
            .field("table", &self.table)
            .field("pool_size", &self.pool_size)
            .field("timeout", &self.timeout)
            .field("reap_interval", &self.reap_interval)
            .field("reap_batch", &self.reap_batch)
            .field("max_session_bytes", &self.max_session_bytes)
            .field("session_cap", &self.session_cap)
            .finish()
    }
}

impl MysqlConfig {
    /// Settings with defaults (those of [`Settings::default`]).
    pub fn new(url: impl Into<String>, max_session_bytes: usize) -> Self {
        MysqlConfig {
            url: url.into(),
            table: "stickless_sessions".into(),
            pool_size: 16,
            timeout: Duration::from_secs(2),
            reap_interval: Duration::from_secs(1),
            reap_batch: 500,
            max_session_bytes,
            session_cap: SessionCap::UNLIMITED,
        }
    }

    /// The settings of the MySQL store that `settings` describe: URL, table, pool size, reaper,
    /// store timeout, session size limit and session cap. The one place they are read, for the
    /// server and for every test harness (which then changes what it needs, such as the
    /// table). The URL is checked as by [`check_url`] (its `ssl-ca` file read).
    pub fn from_settings(settings: &Settings) -> Result<MysqlConfig, ConfigError> {
        check_url(&settings.mysql_url).map_err(ConfigError::Invalid)?;
        Ok(MysqlConfig {
            url: settings.mysql_url.clone(),
            table: settings.mysql_table.clone(),
            pool_size: settings.mysql_pool_size,
            timeout: settings.store_timeout,
            reap_interval: settings.mysql_reap_interval,
            reap_batch: settings.mysql_reap_batch,
            max_session_bytes: settings.max_session_bytes,
            session_cap: SessionCap::from_settings(settings),
        })
    }
}

/// A [`SessionStore`] on MySQL or MariaDB. Dropping it stops its reaper.
pub struct MysqlStore {
    /// State shared with the reaper task.
    inner: Arc<Inner>,
    /// The reaper, aborted on drop.
    reaper: JoinHandle<()>,
    /// The task that reads the epoch again every few seconds, aborted on drop.
    epoch_refresh: JoinHandle<()>,
}

/// State shared by the store handle and its reaper. (No `Debug`: the config's URL may hold a
/// password.)
struct Inner {
    /// Pooled connections; each is pinged before use, so dead ones are replaced.
    pool: MySqlPool,
    /// The settings it was built with.
    config: MysqlConfig,
    /// The statements of the session table.
    sql: Statements,
    /// Events to watchers, sent after each commit.
    events: broadcast::Sender<SessionEvent>,
    /// Per-session write order inside this process (see `locks`).
    locks: WriteLocks,
    /// Per-user turns of the writes the session cap admits, inside this process (see `cap`).
    user_locks: WriteLocks,
    /// Sessions evicted for the session cap so far.
    evicted: Evictions,
    /// The epoch last read from [`EPOCHS_TABLE`].
    epoch: EpochCell,
}

impl std::fmt::Debug for MysqlStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the URL: it may hold a password.
        f.debug_struct("MysqlStore")
            .field("table", &self.inner.config.table)
            .field("pool_size", &self.inner.config.pool_size)
            .finish_non_exhaustive()
    }
}

/// How much longer than a call may take the pool waits for a connection (see `connect`).
const POOL_WAIT_PAST_CALL: Duration = Duration::from_millis(250);

impl MysqlStore {
    /// Connects, migrates the schema, reads (or makes) the store's epoch, starts the reaper. A database that cannot be reached
    /// within [`MysqlConfig::timeout`], or with which TLS as the URL's `ssl-mode` asks fails,
    /// is [`StoreError::Unavailable`]; a malformed URL (see [`check_url`]) or table name is
    /// [`StoreError::Internal`]. Must be called inside a tokio runtime.
    pub async fn connect(config: MysqlConfig) -> StoreResult<Self> {
        tokio::runtime::Handle::try_current().map_err(|e| {
            StoreError::Internal(format!("the mysql store needs a tokio runtime: {e}"))
        })?;
        let table = &config.table;
        let valid = (1..=64).contains(&table.len())
            && table
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_');
        let reserved = [MIGRATIONS_TABLE, EPOCHS_TABLE];
        if !valid || reserved.iter().any(|r| table.eq_ignore_ascii_case(r)) {
            return Err(StoreError::Internal(format!(
                "invalid mysql table name {table:?}: need 1 to 64 of [A-Za-z0-9_], \
                 other than {MIGRATIONS_TABLE} and {EPOCHS_TABLE}"
            )));
        }
        let url = MysqlUrl::parse(&config.url).map_err(StoreError::Internal)?;
        tracing::debug!(
            url = %super::redact_one_url(&config.url),
            requires_tls = url.requires_tls(),
            "connecting to mysql"
        );
        if matches!(url.ssl_mode, sqlx::mysql::MySqlSslMode::VerifyCa) {
            tracing::warn!(
                "mysql ssl-mode=verify_ca accepts a certificate from ssl-ca or any of the \
                 system's root CAs, whatever host it names: use ssl-mode=verify_identity to \
                 check the host too"
            );
        }
        // A lock wait past the call's own timeout is of no use to the caller, and a cancelled
        // call's connection stays busy until its statement ends: keep lock waits short.
        let lock_wait: Arc<str> = format!(
            "SET SESSION innodb_lock_wait_timeout = {}",
            u64::try_from(config.timeout.as_millis().div_ceil(1000))
                .unwrap_or(50)
                .clamp(1, 50)
        )
        .into();
        let pool = MySqlPoolOptions::new()
            .max_connections(config.pool_size.max(1))
            .min_connections(0)
            // Just past the call timeout, so that waiting for a connection (all busy: a slow
            // store) ends as the call's Timeout (DEADLINE_EXCEEDED), never as the pool's own
            // PoolTimedOut, which reads as an unreachable store (UNAVAILABLE). At start-up,
            // where nothing else bounds it, it is the connect's bound.
            .acquire_timeout(config.timeout.saturating_add(POOL_WAIT_PAST_CALL))
            .idle_timeout(IDLE_TIMEOUT)
            .test_before_acquire(true)
            .after_connect(move |conn, _| {
                let sql = Arc::clone(&lock_wait);
                Box::pin(async move {
                    sqlx::raw_sql(AssertSqlSafe(sql)).execute(conn).await?;
                    Ok(())
                })
            })
            .connect_lazy_with(url.options.clone());
        let migrated = async {
            // The first connection: its error says whether TLS is what failed.
            let conn = pool.acquire().await.map_err(|e| url.connect_error(e))?;
            schema::migrate(conn, table).await
        };
        tokio::time::timeout(MIGRATION_TIMEOUT, migrated)
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::Unavailable(format!(
                    "mysql schema migration did not finish within {MIGRATION_TIMEOUT:?}"
                )))
            })?;
        let inner = Arc::new(Inner {
            pool,
            sql: Statements::new(table),
            events: broadcast::channel(EVENT_BUFFER).0,
            locks: WriteLocks::new(),
            user_locks: WriteLocks::new(),
            evicted: Evictions::default(),
            epoch: EpochCell::default(),
            config,
        });
        let timeout = inner.config.timeout;
        tokio::time::timeout(timeout, inner.read_epoch())
            .await
            .unwrap_or(Err(StoreError::Timeout(timeout)))?;
        let reaper = reaper::spawn(Arc::downgrade(&inner), inner.config.reap_interval);
        let epoch_refresh = epoch::spawn_refresh(Arc::downgrade(&inner));
        Ok(MysqlStore {
            inner,
            reaper,
            epoch_refresh,
        })
    }

    /// Runs one reaper turn now, as the background task does every
    /// [`MysqlConfig::reap_interval`]: at most [`REAP_BATCHES_PER_TICK`] batches of
    /// [`MysqlConfig::reap_batch`] expired rows, each sent as EXPIRED. Returns how many rows
    /// it deleted.
    pub async fn reap_now(&self) -> StoreResult<u64> {
        self.inner.reap_turn().await
    }

    /// Runs one store call within the configured timeout.
    async fn bounded<T>(&self, call: impl Future<Output = StoreResult<T>>) -> StoreResult<T> {
        let timeout = self.inner.config.timeout;
        tokio::time::timeout(timeout, call)
            .await
            .unwrap_or(Err(StoreError::Timeout(timeout)))
    }
}

impl Drop for MysqlStore {
    fn drop(&mut self) {
        self.reaper.abort();
        self.epoch_refresh.abort();
    }
}

impl Inner {
    /// Sends an event; an error only means nobody is watching.
    fn emit(
        &self,
        kind: EventKind,
        namespace: &str,
        id: &str,
        user_id: &str,
        version: u64,
        at: SystemTime,
    ) {
        let _ = self.events.send(SessionEvent {
            kind,
            namespace: namespace.to_owned(),
            id: id.to_owned(),
            user_id: user_id.to_owned(),
            version,
            at,
        });
    }

    /// [`StoreError::TooLarge`] when `size` is over the limit.
    fn check_size(&self, size: usize) -> StoreResult<()> {
        let limit = self.config.max_session_bytes;
        if size > limit {
            return Err(StoreError::TooLarge { size, limit });
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl SessionStore for MysqlStore {
    fn kind(&self) -> &'static str {
        "mysql"
    }

    fn epoch(&self) -> Arc<str> {
        self.inner.epoch.get()
    }

    async fn current_epoch(&self) -> StoreResult<Arc<str>> {
        self.bounded(self.inner.read_epoch()).await
    }

    async fn create(&self, new: NewSession) -> StoreResult<SessionRecord> {
        self.bounded(self.inner.create(new)).await
    }

    async fn get(&self, namespace: &str, id: &str, touch: bool) -> StoreResult<SessionRecord> {
        if touch {
            self.bounded(self.inner.touch(namespace, id, None)).await
        } else {
            self.bounded(self.inner.get(namespace, id)).await
        }
    }

    async fn update(&self, namespace: &str, id: &str, patch: Patch) -> StoreResult<SessionRecord> {
        self.bounded(self.inner.update(namespace, id, &patch)).await
    }

    async fn touch(
        &self,
        namespace: &str,
        id: &str,
        ttl: Option<Duration>,
    ) -> StoreResult<SessionRecord> {
        self.bounded(self.inner.touch(namespace, id, ttl)).await
    }

    async fn regenerate(
        &self,
        namespace: &str,
        old_id: &str,
        new_id: &str,
    ) -> StoreResult<SessionRecord> {
        self.bounded(self.inner.regenerate(namespace, old_id, new_id))
            .await
    }

    async fn delete(&self, namespace: &str, id: &str) -> StoreResult<bool> {
        self.bounded(self.inner.delete(namespace, id)).await
    }

    async fn list_by_user(
        &self,
        namespace: &str,
        user_id: &str,
    ) -> StoreResult<Vec<SessionRecord>> {
        self.bounded(self.inner.list_by_user(namespace, user_id))
            .await
    }

    async fn delete_by_user(&self, namespace: &str, user_id: &str) -> StoreResult<u64> {
        self.bounded(self.inner.delete_by_user(namespace, user_id))
            .await
    }

    async fn restore(&self, record: SessionRecord) -> StoreResult<SessionRecord> {
        self.bounded(self.inner.restore(record)).await
    }

    fn subscribe(&self) -> broadcast::Receiver<SessionEvent> {
        self.inner.events.subscribe()
    }

    fn session_cap_evictions(&self) -> u64 {
        self.inner.evicted.get()
    }
}
