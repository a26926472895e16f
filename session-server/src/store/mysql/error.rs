//! What a failed statement means for the caller: which MySQL errors are an outage
//! (UNAVAILABLE), which are lock contention worth retrying inside the store, and which are bugs.

use std::future::Future;
use std::time::Duration;

use sqlx::mysql::MySqlDatabaseError;

use crate::store::{StoreError, StoreResult};

/// How many times one store call runs its transaction when MySQL aborts it for a deadlock or a
/// lock wait timeout. Contention on one session is already serialized inside this process, so
/// only writers in other servers (or the reaper) can collide; a handful of tries is plenty.
const ATTEMPTS: u32 = 5;

/// `ER_DUP_ENTRY`: a row with that primary key exists.
const DUPLICATE_KEY: u16 = 1062;
/// `ER_LOCK_WAIT_TIMEOUT` and `ER_LOCK_DEADLOCK`: the transaction was rolled back, try again.
const RETRYABLE: [u16; 2] = [1205, 1213];
/// The server is going away or the connection is gone: `ER_SERVER_SHUTDOWN`, `ER_CON_COUNT_ERROR`
/// (too many connections), `ER_CONNECTION_KILLED` (MariaDB), MySQL 8's
/// `ER_CLIENT_INTERACTION_TIMEOUT`, and the client-side codes (`CR_CONNECTION_ERROR`,
/// `CR_CONN_HOST_ERROR`, `CR_SERVER_GONE_ERROR`, `CR_SERVER_LOST`, `CR_SERVER_LOST_EXTENDED`)
/// in case a proxy in between relays them.
const CONNECTION_LOST: [u16; 9] = [1053, 1040, 1927, 2002, 2003, 2006, 2013, 2055, 4031];

/// Why one attempt of a store call failed: a statement error (maybe retryable) or a verdict.
#[derive(Debug)]
pub(super) enum Failure {
    /// A statement failed; [`retrying`] decides whether to run the attempt again.
    Db(sqlx::Error),
    /// The answer to give the caller (not found, conflict, too large, ...).
    Store(StoreError),
}

impl From<sqlx::Error> for Failure {
    fn from(e: sqlx::Error) -> Self {
        Failure::Db(e)
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Failure::Store(e)
    }
}

/// The MySQL error number of a server error.
fn mysql_number(e: &sqlx::Error) -> Option<u16> {
    e.as_database_error()
        .and_then(|db| db.try_downcast_ref::<MySqlDatabaseError>())
        .map(MySqlDatabaseError::number)
}

/// Whether `e` says the primary key is taken.
pub(super) fn is_duplicate_key(e: &sqlx::Error) -> bool {
    mysql_number(e) == Some(DUPLICATE_KEY)
}

fn is_retryable(e: &sqlx::Error) -> bool {
    mysql_number(e).is_some_and(|n| RETRYABLE.contains(&n))
}

/// The [`StoreError`] for a statement error: outages and exhausted lock retries are
/// `Unavailable` (the client may retry), everything else is `Internal`.
pub(super) fn store_error(e: sqlx::Error) -> StoreError {
    let outage = match &e {
        // A TLS negotiation that fails (a server restarted without TLS, a certificate that no
        // longer verifies) is an outage too: the store recovers once it is fixed.
        // PoolTimedOut only reaches here from start-up (calls are bounded before the pool's
        // wait ends, see `MysqlStore::connect`): no connection could be made at all.
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(_) => {
            mysql_number(&e).is_some_and(|n| CONNECTION_LOST.contains(&n) || RETRYABLE.contains(&n))
        }
        _ => false,
    };
    if outage {
        StoreError::Unavailable(format!("mysql: {e}"))
    } else {
        StoreError::Internal(format!("mysql: {e}"))
    }
}

/// Runs `attempt` until it succeeds, gives a verdict, or fails with an error that is not a
/// deadlock or lock wait timeout; those are retried up to [`ATTEMPTS`] times with a short,
/// growing pause. Each attempt must be a whole transaction (or a single statement).
pub(super) async fn retrying<T, F, Fut>(mut attempt: F) -> StoreResult<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Failure>>,
{
    let mut tries = 1;
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(Failure::Db(e)) if tries < ATTEMPTS && is_retryable(&e) => {
                tracing::debug!(error = %e, tries, "mysql transaction rolled back; retrying");
                tokio::time::sleep(Duration::from_millis(5 * u64::from(tries))).await;
                tries += 1;
            }
            Err(Failure::Db(e)) => return Err(store_error(e)),
            Err(Failure::Store(e)) => return Err(e),
        }
    }
}
