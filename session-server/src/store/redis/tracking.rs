//! The near cache's tracking connection: a RESP3 connection of its own to the server the lanes
//! use, in `CLIENT TRACKING ON BCAST PREFIX <key_prefix>:` mode, whose invalidation pushes
//! remove cached sessions (see `near_cache`).
//!
//! Broadcast mode, not the default mode: the default mode tracks the keys each *reading*
//! connection read, so every lane would need tracking on (with `REDIRECT` to this connection,
//! and a lane that reconnects loses what it tracked), and Redis would keep a table of every key
//! every server read. Broadcast needs no state per read: Redis sends every write of a key under
//! the prefix (sessions, and also indexes and tombstones, which are ignored) to every tracking
//! server, so the traffic grows with writes times servers; reads are free.
//!
//! Every push is handled on the connection's own task as it is parsed: the keys it names are
//! invalidated, a null (FLUSHALL, FLUSHDB) empties the cache. A lost connection (the library's
//! disconnection push, or a PING every [`PING_EVERY`] unanswered within the store timeout)
//! marks tracking down, which empties the cache and makes every read bypass it, and the task
//! reconnects with capped backoff; tracking is marked up again only once `CLIENT TRACKING`
//! answered OK on the new connection. With Sentinel, each connect asks the sentinels for the
//! primary as the lanes and the event subscriber do (`sentinel`), and a `+switch-master`
//! announcement drops the connection to reconnect to the new primary.
//!
//! The connection also serves as a barrier ([`Tracking::barrier`]): Redis sends a write's
//! invalidations before it reads a command that arrives after the write's reply, so once a PING
//! sent after a write's reply is answered, that write's invalidations have been handled.

use std::sync::Arc;
use std::time::Duration;

use ::redis::aio::MultiplexedConnection;
use ::redis::{
    AsyncConnectionConfig, Client, ConnectionInfo, ProtocolVersion, PushInfo, PushKind, RedisError,
    Value,
};
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::config::RedisConfig;
use super::near_cache::NearCache;
use super::sentinel::Sentinels;

/// How often the tracking connection is pinged: a connection that died silently loses
/// invalidations until this and the store timeout have passed, so it is short.
pub(super) const PING_EVERY: Duration = Duration::from_secs(1);
/// First wait before reconnecting.
const MIN_BACKOFF: Duration = Duration::from_millis(50);
/// Longest wait between reconnect attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Where the tracking connection connects.
enum Source {
    /// One server at the URL's address.
    Server(Box<ConnectionInfo>),
    /// The primary the sentinels name at each connect.
    Sentinel(Box<Sentinels>),
}

/// The tracking connection's task and what it shares with the store.
pub(crate) struct Tracking {
    /// The cache it keeps exact.
    cache: Arc<NearCache>,
    /// Where to connect.
    source: Source,
    /// `CLIENT TRACKING`'s prefix: the store's key prefix and `:`.
    prefix: String,
    /// Bound on connecting and on each command.
    timeout: Duration,
    /// The live tracking connection (for [`Self::barrier`]); `None` while tracking is down.
    current: Mutex<Option<MultiplexedConnection>>,
}

impl Tracking {
    /// The tracking of a store with `config` for `cache`. Errors are malformed URLs, and a
    /// cluster (whose writes would have to be tracked on every master; refused instead).
    pub(crate) fn new(config: &RedisConfig, cache: Arc<NearCache>) -> Result<Self, RedisError> {
        if config.cluster {
            return Err(RedisError::from((
                ::redis::ErrorKind::InvalidClientConfig,
                "the near cache (cache-capacity) is not available on a redis cluster",
            )));
        }
        let source = match &config.sentinel_master {
            Some(master) => Source::Sentinel(Box::new(Sentinels::new(config, master)?)),
            None => Source::Server(Box::new(
                config
                    .client(config.url.as_str())?
                    .get_connection_info()
                    .clone(),
            )),
        };
        Ok(Tracking {
            cache,
            source,
            prefix: format!("{}:", config.key_prefix),
            timeout: config.timeout,
            current: Mutex::new(None),
        })
    }

    /// Starts the task; it runs until aborted.
    pub(crate) fn spawn(self: &Arc<Self>, runtime: &tokio::runtime::Handle) -> JoinHandle<()> {
        let tracking = self.clone();
        runtime.spawn(async move { tracking.run().await })
    }

    /// Waits until every invalidation Redis sent before now has been handled: a PING on the
    /// tracking connection. When it fails (tracking down or lost meanwhile) the cache is empty
    /// or being emptied by the loss, except in the moment before the loss is noticed: so it is
    /// emptied here too.
    pub(crate) async fn barrier(&self) {
        let conn = self.current.lock().clone();
        let answered = match conn {
            Some(mut conn) => matches!(
                tokio::time::timeout(
                    self.timeout,
                    ::redis::cmd("PING").query_async::<Value>(&mut conn)
                )
                .await,
                Ok(Ok(_))
            ),
            None => false,
        };
        if !answered {
            self.cache.clear();
        }
    }

    async fn run(&self) {
        let switched = Notify::new();
        let watch_switches = async {
            match &self.source {
                Source::Sentinel(sentinels) => {
                    sentinels
                        .watch_switches(|| {
                            switched.notify_one();
                            true
                        })
                        .await;
                }
                Source::Server(_) => std::future::pending().await,
            }
        };
        tokio::select! {
            () = watch_switches => {}
            () = self.track_forever(&switched) => {}
        }
    }

    /// Connects, turns tracking on and listens, again whenever the connection is lost.
    async fn track_forever(&self, switched: &Notify) {
        let mut backoff = MIN_BACKOFF;
        let mut was_up = true;
        loop {
            let lost = Arc::new(Notify::new());
            match self.connect(lost.clone()).await {
                Ok(conn) => {
                    *self.current.lock() = Some(conn.clone());
                    self.cache.mark_up();
                    tracing::info!(prefix = %self.prefix, "redis near cache tracking on");
                    backoff = MIN_BACKOFF;
                    was_up = true;
                    self.listen(conn, &lost, switched).await;
                    self.cache.mark_down();
                    *self.current.lock() = None;
                    tracing::warn!(
                        "redis near cache tracking lost: cache emptied and bypassed until it is back"
                    );
                }
                Err(error) if was_up => {
                    was_up = false;
                    tracing::warn!(%error, "cannot turn redis near cache tracking on; retrying");
                }
                Err(error) => tracing::debug!(%error, "cannot turn redis near cache tracking on"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// A new RESP3 connection whose pushes go to the cache, with tracking confirmed on it.
    async fn connect(&self, lost: Arc<Notify>) -> Result<MultiplexedConnection, String> {
        let info = match &self.source {
            Source::Server(info) => info.as_ref().clone(),
            Source::Sentinel(sentinels) => {
                let within = self.timeout.saturating_mul(sentinels.count() as u32 + 1);
                tokio::time::timeout(within, sentinels.primary())
                    .await
                    .map_err(|_| format!("no primary found within {within:?}"))?
                    .map_err(|e| e.to_string())?
                    .0
            }
        };
        let resp3 = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        let client = Client::open(info.set_redis_settings(resp3)).map_err(|e| e.to_string())?;
        let cache = self.cache.clone();
        let settings = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_push_sender(move |push: PushInfo| {
                handle_push(&cache, &lost, push);
                Ok::<(), std::convert::Infallible>(())
            });
        let connect = async {
            let mut conn = client
                .get_multiplexed_async_connection_with_config(&settings)
                .await?;
            ::redis::cmd("CLIENT")
                .arg("TRACKING")
                .arg("ON")
                .arg("BCAST")
                .arg("PREFIX")
                .arg(&self.prefix)
                .query_async::<()>(&mut conn)
                .await?;
            Ok::<_, RedisError>(conn)
        };
        match tokio::time::timeout(self.timeout, connect).await {
            Ok(result) => result.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer within {:?}", self.timeout)),
        }
    }

    /// Returns when the connection is lost, stops answering pings, or the sentinels announce
    /// a new primary.
    async fn listen(&self, mut conn: MultiplexedConnection, lost: &Notify, switched: &Notify) {
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.reset();
        loop {
            tokio::select! {
                () = lost.notified() => return,
                () = switched.notified() => return,
                _ = ping.tick() => {
                    let answer = tokio::time::timeout(
                        self.timeout,
                        ::redis::cmd("PING").query_async::<Value>(&mut conn),
                    )
                    .await;
                    if !matches!(answer, Ok(Ok(_))) {
                        return;
                    }
                }
            }
        }
    }
}

/// One push of the tracking connection: invalidated keys leave the cache, a null (a flush)
/// empties it, the library's disconnection wakes the task.
fn handle_push(cache: &NearCache, lost: &Notify, push: PushInfo) {
    match push.kind {
        PushKind::Invalidate => match push.data.first() {
            Some(Value::Array(keys)) => {
                for key in keys {
                    match key {
                        Value::BulkString(key) => cache.invalidate(key),
                        Value::SimpleString(key) => cache.invalidate(key.as_bytes()),
                        _ => {}
                    }
                }
            }
            Some(Value::Nil) => cache.clear(),
            other => {
                // Not a form Redis sends: be safe.
                tracing::warn!(
                    ?other,
                    "unexpected invalidation push; emptying the near cache"
                );
                cache.clear();
            }
        },
        PushKind::Disconnection => lost.notify_one(),
        _ => {}
    }
}

impl std::fmt::Debug for Tracking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracking")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}
