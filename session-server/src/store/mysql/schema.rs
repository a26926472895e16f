//! The schema and its migration at start-up.
//!
//! Applied versions are recorded per session table in one shared table, [`MIGRATIONS_TABLE`]
//! (a `{table}_schema` name could pass MySQL's 64-character limit on names). The shared table
//! of store epochs, [`super::EPOCHS_TABLE`], is created beside it (see `epoch`). Migration runs on
//! one connection under a named lock (`GET_LOCK`), so servers starting together take turns, and
//! each step is itself idempotent (`IF NOT EXISTS`), so a crash between a step and its record
//! only makes the next start run that step again, harmlessly.

use sqlx::AssertSqlSafe;
use sqlx::mysql::{MySql, MySqlConnection};
use sqlx::pool::PoolConnection;

use super::codec::unix_ms;
use super::error::store_error;
use crate::store::{StoreError, StoreResult};

/// The table recording which schema versions each session table has: one row per applied
/// migration step (`table_name`, `version`, `applied_at` in unix ms).
pub const MIGRATIONS_TABLE: &str = "stickless_schema_migrations";

/// The schema version this code writes and expects: the last step of the migrations.
pub const SCHEMA_VERSION: u32 = 1;

/// How long (seconds) a starting server waits for another one's migration of the same table.
/// Creating a table takes milliseconds; this only covers a later step rebuilding a large one.
const LOCK_WAIT_SECS: u32 = 30;

/// The migration steps, in order, with `{table}` standing for the quoted session table.
///
/// Version 1, the sessions: ids and namespaces are ASCII with binary collation (base64url is
/// case-sensitive), user ids are utf8mb4 with binary collation ('A' != 'a'), `attrs` is the
/// blob of `codec::encode_attrs`. `expires_ms` is unix milliseconds of the server's clock;
/// `created_ns` is unix nanoseconds, so that a restored snapshot's creation time comes back
/// exactly. A deleted session stays for one ttl as a tombstone (`deleted`, user and attributes
/// cleared), so that Restore can refuse to bring it back.
const STEPS: [(u32, &str); 1] = [(
    1,
    "CREATE TABLE IF NOT EXISTS {table} (
        namespace VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
        id CHAR(32) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
        user_id VARCHAR(256) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
        attrs LONGBLOB NOT NULL,
        version BIGINT UNSIGNED NOT NULL,
        created_ns BIGINT NOT NULL,
        expires_ms BIGINT NOT NULL,
        ttl_ms BIGINT UNSIGNED NOT NULL,
        deleted BOOLEAN NOT NULL DEFAULT FALSE,
        PRIMARY KEY (namespace, id),
        KEY by_user (namespace, user_id),
        KEY by_expiry (expires_ms)
    ) ENGINE=InnoDB",
)];

/// Brings `table` (unquoted, already validated) to [`SCHEMA_VERSION`] on `conn`, creating it
/// if needed.
pub(super) async fn migrate(mut conn: PoolConnection<MySql>, table: &str) -> StoreResult<()> {
    let lock = lock_name(table);
    let result = migrate_locked(&mut conn, table, &lock).await;
    let released = sqlx::query("SELECT RELEASE_LOCK(?)")
        .bind(&lock)
        .execute(&mut *conn)
        .await;
    if result.is_err() || released.is_err() {
        // Closing the session is what surely frees the named lock.
        conn.close_on_drop();
    }
    result
}

async fn migrate_locked(conn: &mut MySqlConnection, table: &str, lock: &str) -> StoreResult<()> {
    let create_record = format!(
        "CREATE TABLE IF NOT EXISTS `{MIGRATIONS_TABLE}` (
            table_name VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
            version INT UNSIGNED NOT NULL,
            applied_at BIGINT NOT NULL,
            PRIMARY KEY (table_name, version)
        ) ENGINE=InnoDB"
    );
    sqlx::raw_sql(AssertSqlSafe(create_record))
        .execute(&mut *conn)
        .await
        .map_err(store_error)?;
    sqlx::raw_sql(AssertSqlSafe(super::epoch::create_table()))
        .execute(&mut *conn)
        .await
        .map_err(store_error)?;
    let locked: Option<i64> = sqlx::query_scalar("SELECT CAST(GET_LOCK(?, ?) AS SIGNED)")
        .bind(lock)
        .bind(LOCK_WAIT_SECS)
        .fetch_one(&mut *conn)
        .await
        .map_err(store_error)?;
    if locked != Some(1) {
        return Err(StoreError::Unavailable(format!(
            "mysql: another server has been migrating table `{table}` for over {LOCK_WAIT_SECS}s"
        )));
    }
    let applied: Vec<u32> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT version FROM `{MIGRATIONS_TABLE}` WHERE table_name = ?"
    )))
    .bind(table)
    .fetch_all(&mut *conn)
    .await
    .map_err(store_error)?;
    for (version, step) in STEPS {
        if applied.contains(&version) {
            continue;
        }
        let ddl = step.replace("{table}", &format!("`{table}`"));
        sqlx::raw_sql(AssertSqlSafe(ddl))
            .execute(&mut *conn)
            .await
            .map_err(store_error)?;
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO `{MIGRATIONS_TABLE}` (table_name, version, applied_at) VALUES (?, ?, ?)"
        )))
        .bind(table)
        .bind(version)
        .bind(unix_ms(std::time::SystemTime::now()))
        .execute(&mut *conn)
        .await
        .map_err(store_error)?;
        tracing::info!(table, version, "mysql schema migrated");
    }
    if let Some(newer) = applied
        .iter()
        .copied()
        .filter(|v| *v > SCHEMA_VERSION)
        .max()
    {
        tracing::warn!(
            table,
            found = newer,
            expected = SCHEMA_VERSION,
            "mysql table has a newer schema than this server knows; carrying on"
        );
    }
    Ok(())
}

/// The named lock guarding migration of `table`. MySQL caps lock names at 64 characters; a
/// cut-off name shared by two tables only makes their migrations take turns.
fn lock_name(table: &str) -> String {
    let mut name = format!("stickless_migrate:{table}");
    name.truncate(64);
    name
}
