//! How the Redis store reaches Redis: a few shared multiplexed connections ("lanes") to one
//! server (at a fixed URL, or the primary the sentinels name), or one cluster connection; and
//! how Redis errors become [`StoreError`]s.
//!
//! A standalone store does not check a connection out of a pool per call. A multiplexed
//! connection already carries any number of concurrent calls, pipelining them on one socket, so
//! every call takes a clone of one of [`RedisConfig::pool_size`] lanes, round robin. A lane
//! connects on first use (callers of a lane that is connecting wait for that one attempt) and
//! is dropped when a call on it sees the connection break or answers `READONLY`/`MASTERDOWN`
//! (the server is a replica now), so the next call reconnects: with Sentinel, to whichever
//! server the sentinels name then (see `sentinel`). The other lanes' connections of that moment
//! are retired with it (they reach the same server, so they are broken or on a replica too),
//! so each reconnects on its next use instead of failing a call first. This replaced `deadpool_redis`, whose recycle check PINGs the connection on every checkout: one
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
use super::sentinel::Sentinels;
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
    /// URLs, and Sentinel with a cluster.
    pub(super) fn new(config: &RedisConfig) -> Result<Self, RedisError> {
        if config.cluster {
            if config.sentinel_master.is_some() {
                return Err(RedisError::from((
                    ErrorKind::InvalidClientConfig,
                    "a redis cluster is not found through sentinels",
                )));
            }
            return Ok(Connections::Cluster(cluster(config)?));
        }
        let target = match &config.sentinel_master {
            Some(master) => Target::Sentinel(Arc::new(Sentinels::new(config, master)?)),
            None => Target::Server(Box::new(config.client(config.url.as_str())?)),
        };
        let settings = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(config.timeout))
            .set_response_timeout(Some(config.timeout));
        let lanes = (0..config.pool_size.max(1))
            .map(|_| tokio::sync::Mutex::new(None))
            .collect();
        let runtime = tokio::runtime::Handle::try_current().ok();
        Ok(Connections::Standalone(Arc::new_cyclic(|this| {
            let switches = match (&target, &runtime) {
                (Target::Sentinel(sentinels), Some(runtime)) => Some(Lanes::follow_switches(
                    this.clone(),
                    sentinels.clone(),
                    runtime,
                )),
                _ => None,
            };
            Lanes {
                target,
                settings,
                runtime,
                lanes,
                next: AtomicUsize::new(0),
                generation: AtomicU64::new(0),
                retired_before: AtomicU64::new(0),
                switches,
            }
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

/// Where a standalone store's lanes connect.
enum Target {
    /// One server at a fixed address.
    Server(Box<Client>),
    /// Whichever server the sentinels name as the primary at the time of the connect.
    Sentinel(Arc<Sentinels>),
}

impl Target {
    /// A new connection to the server.
    async fn connect(self, settings: AsyncConnectionConfig) -> StoreResult<MultiplexedConnection> {
        match self {
            Target::Server(client) => client
                .get_multiplexed_async_connection_with_config(&settings)
                .await
                .map_err(redis_error),
            Target::Sentinel(sentinels) => Ok(sentinels.primary().await?.1),
        }
    }
}

impl Clone for Target {
    fn clone(&self) -> Self {
        match self {
            Target::Server(client) => Target::Server(client.clone()),
            Target::Sentinel(sentinels) => Target::Sentinel(sentinels.clone()),
        }
    }
}

/// The shared connections of a standalone store.
pub(super) struct Lanes {
    /// Where to connect.
    target: Target,
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
    /// Connections numbered below this are retired: each lane reconnects on its next use. Set
    /// when a lane's connection ends (see [`ends_lane`]): a server that closed one connection
    /// (it died, restarted, or was demoted and had the sentinels disconnect its clients) has
    /// closed the others too, and a server that answers `READONLY` on one is a replica on all,
    /// so every lane finds the server (the primary) again on its next call instead of each
    /// failing one call first.
    retired_before: AtomicU64,
    /// With Sentinel, the task that retires every connection when a sentinel announces that
    /// the master moved (see [`Sentinels::watch_switches`]); aborted on drop.
    switches: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Lanes {
    fn drop(&mut self) {
        if let Some(task) = &self.switches {
            task.abort();
        }
    }
}

impl Lanes {
    /// A clone of the next lane's connection, connecting it first if needed.
    async fn get(self: &Arc<Self>) -> StoreResult<Connection> {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.lanes.len();
        let mut lane = self.lanes[index].lock().await;
        if let Some((generation, conn)) = lane.as_ref()
            && *generation >= self.retired_before.load(Ordering::Relaxed)
        {
            return Ok(self.lane_connection(index, *generation, conn.clone()));
        }
        *lane = None;
        // Numbered before it connects, so a retirement announced while it connects (a
        // sentinel's switch: the address it asked for may be the old primary) retires it too.
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        let connect = self.target.clone().connect(self.settings.clone());
        let conn = match &self.runtime {
            Some(runtime) => runtime.spawn(connect).await.map_err(|error| {
                StoreError::Unavailable(format!("connecting to Redis was cut short: {error}"))
            })?,
            None => connect.await,
        }?;
        *lane = Some((generation, conn.clone()));
        drop(lane);
        tracing::debug!(lane = index, "redis connection established");
        Ok(self.lane_connection(index, generation, conn))
    }

    /// Retires every connection made so far: each lane reconnects on its next use.
    fn retire_all(&self) {
        let newest = self.generation.load(Ordering::Relaxed);
        self.retired_before.fetch_max(newest, Ordering::Relaxed);
    }

    /// Starts the task that retires every connection when the sentinels announce a new
    /// primary, so no lane keeps writing to the old one (still a master until the sentinels
    /// reconfigure it, when it was not dead: a switchover) after the switch. Ends with the
    /// lanes.
    fn follow_switches(
        lanes: std::sync::Weak<Lanes>,
        sentinels: Arc<Sentinels>,
        runtime: &tokio::runtime::Handle,
    ) -> tokio::task::JoinHandle<()> {
        runtime.spawn(async move {
            sentinels
                .watch_switches(|| match lanes.upgrade() {
                    Some(lanes) => {
                        lanes.retire_all();
                        true
                    }
                    None => false,
                })
                .await;
        })
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

    /// Forgets lane `index`'s connection if it is still number `generation`, and retires every
    /// connection made up to it, so each lane's next call reconnects; a late error on an old
    /// connection retires nothing made after it.
    async fn discard(&self, index: usize, generation: u64) {
        self.retired_before
            .fetch_max(generation.saturating_add(1), Ordering::Relaxed);
        let mut lane = self.lanes[index].lock().await;
        if lane.as_ref().is_some_and(|(g, _)| *g == generation) {
            *lane = None;
            tracing::warn!(
                lane = index,
                "redis connection broken or no longer to the primary; reconnecting on next use"
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
    /// Drops the lane's connection when `result` shows it should go (see [`ends_lane`]).
    async fn check<T>(&self, result: &Result<T, RedisError>) {
        if let Err(error) = result
            && ends_lane(error)
        {
            self.lanes.discard(self.index, self.generation).await;
        }
    }
}

/// Whether `error` means a lane's connection is done with: broken (not on a timeout: a slow
/// reply leaves the connection usable), or to a server that is no longer the primary
/// (`READONLY`, `MASTERDOWN`: a demoted primary, or a URL that now leads to a replica), so the
/// next connect finds the primary again.
fn ends_lane(error: &RedisError) -> bool {
    ((error.is_io_error() || error.is_connection_dropped() || error.is_unrecoverable_error())
        && !error.is_timeout())
        || matches!(
            error.kind(),
            ErrorKind::Server(ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown)
        )
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

    #[test]
    fn a_replica_or_a_broken_connection_ends_a_lane_and_a_slow_or_script_error_does_not() {
        let ends = |kind: ErrorKind| ends_lane(&RedisError::from((kind, "test")));
        assert!(ends(ErrorKind::Server(ServerErrorKind::ReadOnly)));
        assert!(ends(ErrorKind::Server(ServerErrorKind::MasterDown)));
        assert!(ends(ErrorKind::Io));
        assert!(!ends(ErrorKind::Server(ServerErrorKind::ResponseError)));
        assert!(!ends(ErrorKind::Server(ServerErrorKind::BusyLoading)));
        let silent = RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut));
        assert!(!ends_lane(&silent));
        let readonly = RedisError::from((
            ErrorKind::Server(ServerErrorKind::ReadOnly),
            "You can't write against a read only replica.",
        ));
        assert!(matches!(redis_error(readonly), StoreError::Unavailable(_)));
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
        config.url = "redis://127.0.0.1:1".into();
        config.sentinel_master = Some("main".into());
        assert!(Connections::new(&config).is_err(), "sentinel and cluster");
        config.cluster = false;
        assert!(Connections::new(&config).is_ok(), "sentinel");
    }
}
