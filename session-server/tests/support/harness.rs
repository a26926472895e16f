//! Starting a real session server in-process for a test: a store of the chosen backend, the
//! server on `127.0.0.1:0`, and gRPC clients connected to it. Shared by every test file.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use session_proto::v1::session_store_client::SessionStoreClient;
use session_server::config::Settings;
use session_server::metrics::Metrics;
use session_server::server::{self, ServeError};
use session_server::store::SessionStore;
use session_server::store::cap::SessionCap;
use session_server::store::memory::MemoryStore;
#[cfg(feature = "redis-store")]
use session_server::store::redis::{RedisConfig, RedisStore};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use super::services;

/// Which store a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The in-process store.
    Memory,
    /// The shared Redis on 127.0.0.1:6379, under a key prefix of the test's own.
    Redis,
    /// As [`Backend::Redis`], with a near cache (`--cache-capacity`) whose tracking is up.
    RedisNearCache,
    /// A 3-master Redis Cluster the test starts itself on free loopback ports.
    RedisCluster,
    /// The shared MariaDB on 127.0.0.1:3306, in a table of the test's own.
    Mysql,
}

/// Whatever must live as long as a test's store (a cluster's processes, a table to drop).
pub type Guard = Box<dyn std::any::Any + Send>;

/// Makes a test's store lose every session and its epoch behind the store's back, as a flushed
/// Redis or an emptied database would. The memory store has none: it loses its data only by
/// being made again.
pub type Wipe = Box<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// A test's store, what must outlive it, and how to make it lose its data.
pub type StoreUnderTest = (Arc<dyn SessionStore>, Guard, Option<Wipe>);

/// The store of `backend` for `test`, or `None` when its service is missing (skipped by the
/// skip rule, which prints why or fails under `STICKLESS_REQUIRE_SERVICES=1`), or its cargo
/// feature is off in this build (skipped the same way).
pub async fn store_for(
    backend: Backend,
    test: &str,
    settings: &Settings,
) -> Option<StoreUnderTest> {
    match backend {
        Backend::Memory => {
            let store = MemoryStore::with_reap_interval(
                settings.max_session_bytes,
                Duration::from_millis(20),
            )
            .with_session_cap(SessionCap::from_settings(settings));
            Some((Arc::new(store), Box::new(()), None))
        }
        #[cfg(feature = "redis-store")]
        Backend::Redis => {
            let url = services::redis_url(test)?;
            let config = redis_config(&url, test, settings);
            let wipe = redis_wipe(url, config.key_prefix.clone());
            let store = RedisStore::new(config).expect("valid Redis URL");
            // Its events come from a subscription made in the background: wait for it, so a
            // watcher misses nothing.
            super::wait::events_ready(&store).await;
            Some((Arc::new(store), Box::new(()), Some(wipe)))
        }
        #[cfg(feature = "redis-store")]
        Backend::RedisNearCache => {
            let url = services::redis_url(test)?;
            let mut config = redis_config(&url, test, settings);
            config.cache_capacity = NEAR_CACHE_CAPACITY;
            let wipe = redis_wipe(url, config.key_prefix.clone());
            let store = RedisStore::new(config).expect("valid Redis URL");
            super::wait::events_ready(&store).await;
            near_cache_up(&store).await;
            Some((Arc::new(store), Box::new(()), Some(wipe)))
        }
        #[cfg(feature = "redis-store")]
        Backend::RedisCluster => super::cluster::store(test, settings).await,
        #[cfg(feature = "mysql-store")]
        Backend::Mysql => super::mysql::store(test, settings).await,
        #[cfg(not(all(feature = "redis-store", feature = "mysql-store")))]
        left_out => services::skip_or_fail(
            test,
            &format!("session-server was built without the store of {left_out:?}"),
        ),
    }
}

/// The near cache capacity of [`Backend::RedisNearCache`] stores.
pub const NEAR_CACHE_CAPACITY: usize = 10_000;

/// Waits (at most 10 s) until the store's near cache has its tracking on, so that reads use it.
pub async fn near_cache_up(store: &dyn SessionStore) {
    super::wait::eventually(
        "near cache tracking on",
        Duration::from_secs(10),
        || async {
            store
                .near_cache_stats()
                .filter(|stats| stats.up)
                .map(|_| ())
        },
    )
    .await;
}

/// Deletes every key of `prefix` (sessions, tombstones, indexes and the epoch) from the Redis at
/// `url`, as a `FLUSHALL` would for a Redis of one deployment.
#[cfg(feature = "redis-store")]
pub fn redis_wipe(url: String, prefix: String) -> Wipe {
    Box::new(move || {
        let (url, prefix) = (url.clone(), prefix.clone());
        Box::pin(async move {
            let client = redis::Client::open(url).expect("valid Redis URL");
            let mut conn = client
                .get_multiplexed_async_connection()
                .await
                .expect("connect to redis");
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{prefix}:*"))
                .query_async(&mut conn)
                .await
                .expect("KEYS");
            if !keys.is_empty() {
                redis::cmd("DEL")
                    .arg(&keys)
                    .query_async::<()>(&mut conn)
                    .await
                    .expect("DEL");
            }
        })
    })
}

/// A Redis store at `url` with a key prefix unique to this test.
#[cfg(feature = "redis-store")]
pub fn redis_store(url: &str, test: &str, settings: &Settings) -> RedisStore {
    RedisStore::new(redis_config(url, test, settings)).expect("valid Redis URL")
}

/// The settings of a Redis store at `url`: those `settings` make (`RedisConfig::from_settings`:
/// limits, timeout, pool), with `url` and a key prefix unique to this call. Stores made from
/// clones of it share their keys and events, as servers on one Redis do.
#[cfg(feature = "redis-store")]
pub fn redis_config(url: &str, test: &str, settings: &Settings) -> RedisConfig {
    let mut config = RedisConfig::from_settings(settings).expect("the test's store settings");
    config.url = url.to_owned();
    config.key_prefix = services::unique_prefix(test);
    config
}

/// A running server and what a test needs to talk to it.
pub struct TestServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its metrics, to check what it counted.
    pub metrics: Metrics,
    /// Fires the shutdown signal.
    stop: Option<oneshot::Sender<()>>,
    /// The server task; yields `run`'s result.
    task: Option<JoinHandle<Result<(), ServeError>>>,
    /// What the store needs kept alive until the server is gone.
    guard: Option<Guard>,
    /// How to make the store lose its data (network stores started by [`TestServer::on`]).
    wipe: Option<Wipe>,
}

impl TestServer {
    /// Starts a server over `store` with `settings` (its `listen` is ignored: it binds
    /// `127.0.0.1:0`), on `settings.serve_threads` threads when set, else on the test's
    /// runtime (the store may be a network one whatever `settings.store` says).
    pub async fn start(settings: Settings, store: Arc<dyn SessionStore>) -> TestServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local address");
        let metrics = Metrics::new();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn({
            let metrics = metrics.clone();
            async move {
                let stop = async {
                    let _ = stopped.await;
                };
                let threads = settings.serve_threads.unwrap_or(1);
                server::run_sharded(listener, &settings, store, metrics, stop, threads).await
            }
        });
        TestServer {
            addr,
            metrics,
            stop: Some(stop),
            task: Some(task),
            guard: None,
            wipe: None,
        }
    }

    /// Starts a server on the store of `backend`; `None` when that store is skipped.
    pub async fn on(backend: Backend, test: &str, settings: Settings) -> Option<TestServer> {
        let (store, guard, wipe) = store_for(backend, test, &settings).await?;
        let mut server = TestServer::start(settings, store).await;
        server.guard = Some(guard);
        server.wipe = wipe;
        Some(server)
    }

    /// Makes the store lose every session and its epoch behind the server's back (a flushed
    /// Redis, an emptied database). Panics for a server without a network store of
    /// [`TestServer::on`]: a memory store loses its data only with its server.
    pub async fn lose_data(&self) {
        let wipe = self
            .wipe
            .as_ref()
            .expect("a network store started by TestServer::on");
        wipe().await;
    }

    /// A new client on its own connection.
    pub async fn client(&self) -> SessionStoreClient<Channel> {
        SessionStoreClient::new(self.channel().await)
    }

    /// A new connection to the server.
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .expect("valid URI")
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(20))
            .connect()
            .await
            .expect("connect to the test server")
    }

    /// Signals shutdown and waits (at most `within`) for the server to finish.
    pub async fn shutdown(mut self, within: Duration) -> Result<(), ServeError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let task = self.task.take().expect("server task");
        tokio::time::timeout(within, task)
            .await
            .expect("server stopped within the deadline")
            .expect("server task did not panic")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
        // The guard (cluster processes, a test table) goes after the server that used it.
        drop(self.guard.take());
    }
}
