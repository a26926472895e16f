//! How the Redis store reaches Redis: a pool of multiplexed connections to one server, or one
//! cluster connection; and how Redis errors become [`StoreError`]s.
//!
//! A cluster does not go through `deadpool_redis::cluster`: its manager cannot set timeouts or
//! retry waits, its recycle check PINGs every master (so one dead master fails every checkout
//! and rebuilds a whole cluster connection, exactly during a failover), and each pooled object
//! would be a full cluster connection of its own. One `ClusterConnection` is already a pool: a
//! multiplexed connection per node, slot routing, MOVED/ASK redirects, slot-map refreshes and
//! reconnects, all behind a cheap-to-clone handle.

use ::redis::aio::{ConnectionLike, MultiplexedConnection};
use ::redis::cluster::{ClusterClientBuilder, ClusterConfig};
use ::redis::cluster_async::ClusterConnection;
use ::redis::{
    AsyncConnectionConfig, Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, ServerErrorKind,
    Value,
};
use deadpool_redis::{Manager, Pool, PoolError, Runtime};

use super::config::{RedisConfig, seed_urls};
use crate::store::{StoreError, StoreResult};

/// Shortest wait before the cluster client retries a command (after a refused connection,
/// TRYAGAIN, CLUSTERDOWN): short, so a finished failover is noticed quickly.
const MIN_RETRY_WAIT_MS: u64 = 10;
/// Longest wait between two retries of one command, so a call keeps trying through a
/// failover (a few seconds) without outliving its timeout by much.
const MAX_RETRY_WAIT_MS: u64 = 200;
/// Most retries of one command; also keeps the client's `2^retry` backoff from overflowing.
const MAX_RETRIES: u32 = 50;

/// Where the store's commands go.
pub(super) enum Connections {
    /// One server: a pool of multiplexed connections, PINGed when recycled.
    Standalone(Pool),
    /// A cluster: one handle over a connection per node, routing every command by its key.
    /// Built pending: it connects on first use and reconnects by itself.
    Cluster(ClusterConnection),
}

impl Connections {
    /// Builds the pool or the cluster connection without connecting. Errors are malformed URLs.
    pub(super) fn new(config: &RedisConfig) -> Result<Self, RedisError> {
        if config.cluster {
            return Ok(Connections::Cluster(cluster(config)?));
        }
        let connection = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(config.timeout))
            .set_response_timeout(Some(config.timeout));
        let manager = Manager::new_with_config(config.url.as_str(), connection)?;
        Pool::builder(manager)
            .max_size(config.pool_size.max(1))
            .wait_timeout(Some(config.timeout))
            .create_timeout(Some(config.timeout))
            .recycle_timeout(Some(config.timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map(Connections::Standalone)
            .map_err(|e| {
                RedisError::from((
                    ErrorKind::InvalidClientConfig,
                    "cannot build redis pool",
                    e.to_string(),
                ))
            })
    }

    /// A connection for one store call; pool failures are Unavailable.
    pub(super) async fn get(&self) -> StoreResult<Connection> {
        match self {
            Connections::Standalone(pool) => {
                pool.get()
                    .await
                    .map(Connection::Pooled)
                    .map_err(|e| match e {
                        PoolError::Backend(e) => redis_error(e),
                        other => StoreError::Unavailable(format!("redis pool: {other}")),
                    })
            }
            Connections::Cluster(cluster) => Ok(Connection::Cluster(cluster.clone())),
        }
    }
}

impl std::fmt::Debug for Connections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Connections::Standalone(pool) => {
                f.debug_tuple("Standalone").field(&pool.status()).finish()
            }
            Connections::Cluster(_) => f.write_str("Cluster"),
        }
    }
}

/// The cluster connection: per-node timeouts of `config.timeout`, no overall timeout of its
/// own (the store bounds every call), and quick retries while the call lasts.
fn cluster(config: &RedisConfig) -> Result<ClusterConnection, RedisError> {
    let seeds = seed_urls(&config.url);
    let retries = u32::try_from(config.timeout.as_millis() / 100)
        .unwrap_or(MAX_RETRIES)
        .saturating_add(4)
        .min(MAX_RETRIES);
    let client = ClusterClientBuilder::new(seeds.iter().map(String::as_str))
        .connection_timeout(config.timeout)
        .response_timeout(config.timeout)
        .overall_response_timeout(None)
        .retries(retries)
        .min_retry_wait(MIN_RETRY_WAIT_MS)
        .max_retry_wait(MAX_RETRY_WAIT_MS)
        .build()?;
    let per_node = ClusterConfig::new()
        .set_connection_timeout(config.timeout)
        .set_response_timeout(config.timeout);
    Ok(client.get_pending_async_connection_with_config(per_node))
}

/// One call's connection; any of them runs commands and scripts.
pub(super) enum Connection {
    /// Checked out of the standalone pool; back in the pool when dropped.
    Pooled(deadpool_redis::Connection),
    /// A clone of a pooled connection, for concurrent commands of one call (multiplexed).
    Shared(MultiplexedConnection),
    /// A handle on the cluster connection.
    Cluster(ClusterConnection),
}

impl Connection {
    /// Another handle on the same connection, so one call can run commands concurrently
    /// (they are pipelined on a node's connection; on a cluster each goes to its key's node).
    pub(super) fn share(&self) -> Connection {
        match self {
            Connection::Pooled(conn) => Connection::Shared((**conn).clone()),
            Connection::Shared(conn) => Connection::Shared(conn.clone()),
            Connection::Cluster(conn) => Connection::Cluster(conn.clone()),
        }
    }
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Pooled(conn) => conn.req_packed_command(cmd),
            Connection::Shared(conn) => conn.req_packed_command(cmd),
            Connection::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Pooled(conn) => conn.req_packed_commands(pipeline, offset, count),
            Connection::Shared(conn) => conn.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Pooled(conn) => conn.get_db(),
            Connection::Shared(conn) => conn.get_db(),
            Connection::Cluster(conn) => conn.get_db(),
        }
    }
}

/// Sorts a Redis error: the server unreachable or not serving (a cluster without a master for
/// the slot, redirects or retries exhausted during a failover, no node reachable) is
/// Unavailable; anything else (a script error, an unexpected reply) is Internal.
pub(super) fn redis_error(error: RedisError) -> StoreError {
    let unreachable = error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_timeout()
        || error.is_unrecoverable_error()
        || matches!(
            error.kind(),
            ErrorKind::ClusterConnectionNotFound
                | ErrorKind::Server(
                    ServerErrorKind::BusyLoading
                        | ServerErrorKind::TryAgain
                        | ServerErrorKind::ClusterDown
                        | ServerErrorKind::MasterDown
                        | ServerErrorKind::ReadOnly
                        | ServerErrorKind::Moved
                        | ServerErrorKind::Ask
                )
        );
    if unreachable {
        StoreError::Unavailable(error.to_string())
    } else {
        StoreError::Internal(error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_and_outage_errors_are_unavailable() {
        let kinds = [
            ErrorKind::ClusterConnectionNotFound,
            ErrorKind::Io,
            ErrorKind::Server(ServerErrorKind::ClusterDown),
            ErrorKind::Server(ServerErrorKind::TryAgain),
            ErrorKind::Server(ServerErrorKind::Moved),
            ErrorKind::Server(ServerErrorKind::Ask),
            ErrorKind::Server(ServerErrorKind::MasterDown),
        ];
        for kind in kinds {
            let error = RedisError::from((kind, "test"));
            assert!(
                matches!(redis_error(error), StoreError::Unavailable(_)),
                "{kind:?}"
            );
        }
        let script = RedisError::from((ErrorKind::Server(ServerErrorKind::ResponseError), "x"));
        assert!(matches!(redis_error(script), StoreError::Internal(_)));
        let refused = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(matches!(redis_error(refused), StoreError::Unavailable(_)));
    }

    #[tokio::test]
    async fn malformed_cluster_seeds_are_errors_and_dead_ones_are_not() {
        let mut config = RedisConfig::new("redis://127.0.0.1:1,127.0.0.1:2", 1024);
        config.cluster = true;
        assert!(Connections::new(&config).is_ok());
        config.url = "redis://no such host:1,x".into();
        assert!(Connections::new(&config).is_err());
        config.url = " , ".into();
        assert!(Connections::new(&config).is_err());
    }
}
