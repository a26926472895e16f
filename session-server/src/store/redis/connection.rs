//! How the Redis store reaches Redis: a few shared multiplexed connections ("lanes") to one
//! server, or one cluster connection; and how Redis errors become [`StoreError`]s.
//!
//! A standalone store does not check a connection out of a pool per call. A multiplexed
//! connection already carries any number of concurrent calls, pipelining them on one socket, so
//! every call takes a clone of one of [`RedisConfig::pool_size`] lanes, round robin. A lane
//! connects on first use (callers of a lane that is connecting wait for that one attempt) and
//! is dropped when a call on it sees the connection break, so the next call reconnects. This
//! replaced `deadpool_redis`, whose recycle check PINGs the connection on every checkout: one
//! extra round trip per call, and no pipelining across calls since each call held its
//! connection alone (`BENCHMARKS.md` has the before and after).
//!
//! A cluster does not go through `deadpool_redis::cluster` either: its manager cannot set
//! timeouts or retry waits, its recycle check PINGs every master (so one dead master fails every
//! checkout and rebuilds a whole cluster connection, exactly during a failover), and each pooled
//! object would be a full cluster connection of its own. One `ClusterConnection` is already a
//! pool: a multiplexed connection per node, slot routing, MOVED/ASK redirects, slot-map
//! refreshes and reconnects, all behind a cheap-to-clone handle.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use ::redis::aio::{ConnectionLike, MultiplexedConnection};
use ::redis::cluster::{ClusterClientBuilder, ClusterConfig};
use ::redis::cluster_async::ClusterConnection;
use ::redis::{
    AsyncConnectionConfig, Client, Cmd, ErrorKind, Pipeline, RedisError, RedisFuture,
    ServerErrorKind, Value,
};

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

/// Where the store's commands go. Clones share the same connections.
#[derive(Clone)]
pub(super) enum Connections {
    /// One server: a few multiplexed connections shared by all calls.
    Standalone(Arc<Lanes>),
    /// A cluster: one handle over a connection per node, routing every command by its key.
    /// Built pending: it connects on first use and reconnects by itself.
    Cluster(ClusterConnection),
}

impl Connections {
    /// Builds the lanes or the cluster connection without connecting. Errors are malformed
    /// URLs.
    pub(super) fn new(config: &RedisConfig) -> Result<Self, RedisError> {
        if config.cluster {
            return Ok(Connections::Cluster(cluster(config)?));
        }
        let client = config.client(config.url.as_str())?;
        let settings = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(config.timeout))
            .set_response_timeout(Some(config.timeout));
        let lanes = (0..config.pool_size.max(1))
            .map(|_| tokio::sync::Mutex::new(None))
            .collect();
        Ok(Connections::Standalone(Arc::new(Lanes {
            client,
            settings,
            runtime: tokio::runtime::Handle::try_current().ok(),
            lanes,
            next: AtomicUsize::new(0),
            generation: AtomicU64::new(0),
        })))
    }

    /// A connection for one store call; failing to connect is Unavailable.
    pub(super) async fn get(&self) -> StoreResult<Connection> {
        match self {
            Connections::Standalone(lanes) => lanes.get().await,
            Connections::Cluster(cluster) => Ok(Connection::Cluster(cluster.clone())),
        }
    }
}

impl std::fmt::Debug for Connections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Connections::Standalone(lanes) => f
                .debug_struct("Standalone")
                .field("lanes", &lanes.lanes.len())
                .finish(),
            Connections::Cluster(_) => f.write_str("Cluster"),
        }
    }
}

/// A lane's connection and the number that tells it from the lane's earlier connections.
type Lane = Option<(u64, MultiplexedConnection)>;

/// The shared connections of a standalone store.
pub(super) struct Lanes {
    /// Where to connect.
    client: Client,
    /// Connect and response timeouts of every connection.
    settings: AsyncConnectionConfig,
    /// The runtime the store was built on, where connections are made, so that each one's
    /// driver task lives there and not on whichever serving thread (`--serve-threads`) first
    /// needed it, whose runtime may end first. `None` outside a runtime: made by the caller.
    runtime: Option<tokio::runtime::Handle>,
    /// The lanes; `None` until connected and after a break.
    lanes: Box<[tokio::sync::Mutex<Lane>]>,
    /// Round-robin cursor.
    next: AtomicUsize,
    /// Source of connection numbers.
    generation: AtomicU64,
}

impl Lanes {
    /// A clone of the next lane's connection, connecting it first if needed.
    async fn get(self: &Arc<Self>) -> StoreResult<Connection> {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.lanes.len();
        let mut lane = self.lanes[index].lock().await;
        if let Some((generation, conn)) = lane.as_ref() {
            return Ok(self.lane_connection(index, *generation, conn.clone()));
        }
        let connect = {
            let (client, settings) = (self.client.clone(), self.settings.clone());
            async move {
                client
                    .get_multiplexed_async_connection_with_config(&settings)
                    .await
            }
        };
        let conn = match &self.runtime {
            Some(runtime) => runtime.spawn(connect).await.map_err(|error| {
                StoreError::Unavailable(format!("connecting to Redis was cut short: {error}"))
            })?,
            None => connect.await,
        }
        .map_err(redis_error)?;
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        *lane = Some((generation, conn.clone()));
        drop(lane);
        tracing::debug!(lane = index, "redis connection established");
        Ok(self.lane_connection(index, generation, conn))
    }

    fn lane_connection(
        self: &Arc<Self>,
        index: usize,
        generation: u64,
        conn: MultiplexedConnection,
    ) -> Connection {
        Connection::Lane(LaneConnection {
            conn,
            lanes: self.clone(),
            index,
            generation,
        })
    }

    /// Forgets lane `index`'s connection if it is still number `generation`, so the lane's
    /// next call reconnects.
    async fn discard(&self, index: usize, generation: u64) {
        let mut lane = self.lanes[index].lock().await;
        if lane.as_ref().is_some_and(|(g, _)| *g == generation) {
            *lane = None;
            tracing::warn!(
                lane = index,
                "redis connection broken; reconnecting on next use"
            );
        }
    }
}

/// A call's handle on a lane's connection, which reports a broken connection to its lane.
pub(super) struct LaneConnection {
    /// The multiplexed connection (a clone: every handle shares its socket).
    conn: MultiplexedConnection,
    /// Whose connection it is.
    lanes: Arc<Lanes>,
    /// Which lane.
    index: usize,
    /// Which of the lane's connections.
    generation: u64,
}

impl LaneConnection {
    /// Drops the lane's connection when `result` shows it broken (not on a timeout: a slow
    /// reply leaves the connection usable).
    async fn check<T>(&self, result: &Result<T, RedisError>) {
        if let Err(error) = result
            && (error.is_io_error()
                || error.is_connection_dropped()
                || error.is_unrecoverable_error())
            && !error.is_timeout()
        {
            self.lanes.discard(self.index, self.generation).await;
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
    let mut builder = ClusterClientBuilder::new(seeds.iter().map(String::as_str));
    if let Some(pem) = &config.tls_ca {
        builder = builder.certs(config.tls_certificates(pem));
    }
    let client = builder
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
    /// A standalone server's shared connection.
    Lane(LaneConnection),
    /// A handle on the cluster connection.
    Cluster(ClusterConnection),
}

impl Connection {
    /// Another handle on the same connection, so one call can run commands concurrently
    /// (they are pipelined on a node's connection; on a cluster each goes to its key's node).
    pub(super) fn share(&self) -> Connection {
        match self {
            Connection::Lane(lane) => Connection::Lane(LaneConnection {
                conn: lane.conn.clone(),
                lanes: lane.lanes.clone(),
                index: lane.index,
                generation: lane.generation,
            }),
            Connection::Cluster(conn) => Connection::Cluster(conn.clone()),
        }
    }
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Lane(lane) => Box::pin(async move {
                let result = lane.conn.req_packed_command(cmd).await;
                lane.check(&result).await;
                result
            }),
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
            Connection::Lane(lane) => Box::pin(async move {
                let result = lane.conn.req_packed_commands(pipeline, offset, count).await;
                lane.check(&result).await;
                result
            }),
            Connection::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Lane(lane) => lane.conn.get_db(),
            Connection::Cluster(conn) => conn.get_db(),
        }
    }
}

/// Sorts a Redis error: no answer within the connection's timeout (the store's) is a
/// [`StoreError::Timeout`] (its duration filled in by the store's bound on the call); the
/// server unreachable or not serving (a refused or broken connection, a cluster without a
/// master for the slot, redirects or retries exhausted during a failover, no node reachable)
/// is Unavailable; anything else (a script error, an unexpected reply) is Internal.
pub(super) fn redis_error(error: RedisError) -> StoreError {
    if error.is_timeout() {
        return StoreError::Timeout(std::time::Duration::ZERO);
    }
    let unreachable = error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
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
        let silent = RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut));
        assert!(matches!(redis_error(silent), StoreError::Timeout(_)));
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
