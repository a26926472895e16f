//! Putting the server together: the store chosen by the settings, the SessionStore service
//! behind its bearer-token check, the standard health service and server reflection, served
//! in plaintext or, with the settings' TLS files, over TLS (all of it on the one port).
//!
//! [`run`] takes its listener and its shutdown signal as arguments, so tests bind
//! `127.0.0.1:0`, spawn it and know the address before any call.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use session_proto::v1::session_store_server::SessionStoreServer;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tonic::service::Routes;

use crate::auth::BearerAuth;
use crate::config::{ConfigError, Settings, StoreKind};
use crate::connections::{ConnectionLimit, ConnectionPermit, Limited};
use crate::deadline::CallDeadline;
use crate::dispatch::ApiFirst;
use crate::health::StoreChecker;
use crate::metrics::Metrics;
use crate::service::{Limits, SessionService, TouchGranularity};
use crate::store::SessionStore;
use crate::store::cap::SessionCap;
use crate::store::memory::MemoryStore;
#[cfg(feature = "mysql-store")]
use crate::store::mysql::{MysqlConfig, MysqlStore};
#[cfg(feature = "redis-store")]
use crate::store::redis::{RedisConfig, RedisStore};
use crate::tls::{ServerTls, TlsError};

/// Headroom over `--max-session-bytes` for the rest of a request (ids, field tags, map keys'
/// framing), so that the size check, not the transport, refuses an oversized session with a
/// clear INVALID_ARGUMENT.
const MESSAGE_OVERHEAD: usize = 64 * 1024;
/// Wait after a failed accept (out of file descriptors, say) before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// HTTP/2 keepalive: a peer that stops answering pings is dropped instead of holding a
/// connection (and its Watch streams) forever.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a keepalive ping may go unanswered.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// What serves every call: the API first, then health and reflection, with the deadline of
/// unary API calls around it all.
type TopService = CallDeadline<ApiFirst>;

/// The accepted connections of `listener`, with Nagle's algorithm off. tonic sends a unary
/// response as two writes (headers and data, then trailers); with Nagle on, the trailers wait
/// for the client's delayed ACK, and every call took ~40 ms. (tonic's own `tcp_nodelay` setting
/// applies only to listeners it binds itself.)
fn no_delay(
    listener: TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use futures::StreamExt as _;
    TcpListenerStream::new(listener).map(|accepted| accepted.inspect(nagle_off))
}

/// Turns Nagle's algorithm off on an accepted connection (see [`no_delay`]). A connection where
/// that fails is still served, only slower: not a reason to drop it.
fn nagle_off(stream: &tokio::net::TcpStream) {
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%error, "cannot turn off Nagle on an accepted connection");
    }
}

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The store could not be set up (for example a malformed Redis URL).
    #[error("cannot set up the session store: {0}")]
    Store(#[from] crate::store::StoreError),
    /// The settings cannot make a store: a file they name cannot be read, or the store they
    /// ask for was left out of this build (its cargo feature is off).
    #[error("cannot set up the session store: {0}")]
    Config(#[from] ConfigError),
    /// The random source needed for auth failed.
    #[error("cannot set up authentication: the system random source failed")]
    Random,
    /// The embedded descriptor set could not be served by reflection (a build defect).
    #[error("cannot set up gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The gRPC transport failed.
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// A serving thread or its runtime could not be started.
    #[error("cannot start a gRPC serving thread: {0}")]
    Thread(std::io::Error),
    /// The TLS certificate, key or client CA could not be read or used.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The listener is not on a loopback address and nothing authenticates callers (no token,
    /// no client CA) while `allow_unauthenticated` is off.
    #[error(
        "refusing to serve on {0} without authentication (not a loopback address): set \
         auth tokens or a TLS client CA, or allow_unauthenticated"
    )]
    Unauthenticated(std::net::SocketAddr),
}

/// The store the settings ask for, its configuration built by `RedisConfig::from_settings` or
/// `MysqlConfig::from_settings` (the memory store's: the size limit and the session cap). Redis is not contacted here: a server whose Redis is down
/// starts, answers UNAVAILABLE, and recovers when Redis comes back. MySQL is: its schema is
/// created or migrated before the server serves, so a MySQL that cannot be reached at start-up
/// (or not over TLS, when its URL's `ssl-mode` asks for it) is an error. A store whose cargo
/// feature is off in this build is [`ServeError::Config`].
pub async fn build_store(settings: &Settings) -> Result<Arc<dyn SessionStore>, ServeError> {
    Ok(match settings.store {
        StoreKind::Memory => Arc::new(
            MemoryStore::new(settings.max_session_bytes)
                .with_session_cap(SessionCap::from_settings(settings)),
        ),
        #[cfg(feature = "redis-store")]
        StoreKind::Redis | StoreKind::RedisCluster | StoreKind::RedisSentinel => {
            Arc::new(RedisStore::new(RedisConfig::from_settings(settings)?)?)
        }
        #[cfg(feature = "mysql-store")]
        StoreKind::Mysql => {
            Arc::new(MysqlStore::connect(MysqlConfig::from_settings(settings)?).await?)
        }
        #[cfg(not(all(feature = "redis-store", feature = "mysql-store")))]
        left_out => return Err(ConfigError::StoreNotBuilt(left_out).into()),
    })
}

/// Serves gRPC on `listener` until `shutdown` completes, then stops accepting, ends Watch
/// streams, lets in-flight calls finish and returns. Connections are served on the caller's
/// runtime; see [`run_sharded`] for threads of their own. With `tls_cert` and `tls_key` in
/// the settings, every connection is TLS (see [`run_with_tls`] to reload the certificate).
pub async fn run(
    listener: TcpListener,
    settings: &Settings,
    store: Arc<dyn SessionStore>,
    metrics: Metrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    run_sharded(listener, settings, store, metrics, shutdown, 1).await
}

/// Like [`run`], with the connections served on `threads` threads of their own, each a
/// single-threaded runtime: the accept loop (on the caller's runtime) hands each new connection
/// to the next thread, round robin, and that thread serves all of its calls.
///
/// What it changes: on tokio's work-stealing runtime an HTTP/2 connection task and the
/// per-call tasks it spawns move between worker threads, waking and parking each other, and
/// each response is written as soon as it is ready. On a thread of its own, a connection's
/// calls never change thread, and the responses of one round leave in one write: server CPU
/// per `Get` 17.0 → 14.2 µs, p99 at peak ~4.4 → ~0.6 ms, and 1.25× the calls per second
/// against a load generator that runs an event loop per thread (`BENCHMARKS.md`). The store is
/// shared by all threads as before; `threads` of 1 or less is [`run`]. With TLS, each thread
/// also does the handshakes of the connections it is handed.
pub async fn run_sharded(
    listener: TcpListener,
    settings: &Settings,
    store: Arc<dyn SessionStore>,
    metrics: Metrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
    threads: usize,
) -> Result<(), ServeError> {
    let tls = ServerTls::from_settings(settings)?;
    run_with_tls(listener, settings, store, metrics, shutdown, threads, tls).await
}

/// Like [`run_sharded`], with the TLS configuration given by the caller instead of read from
/// the settings' files: the caller keeps a clone and calls [`ServerTls::reload`] (the binary
/// does on SIGHUP); new handshakes use the reloaded certificate, established connections stay.
/// `None` serves plaintext.
pub async fn run_with_tls(
    listener: TcpListener,
    settings: &Settings,
    store: Arc<dyn SessionStore>,
    metrics: Metrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
    threads: usize,
    tls: Option<ServerTls>,
) -> Result<(), ServeError> {
    let limit = ConnectionLimit::new(
        settings.max_connections,
        settings.handshake_timeout,
        metrics.clone(),
    );
    let max_streams = settings.max_concurrent_streams;
    let (service, signal) =
        prepare(&listener, settings, store, metrics, shutdown, tls.as_ref()).await?;
    if threads <= 1 {
        let connections = limit.admitted(no_delay(listener));
        let server = builder(max_streams);
        match tls {
            None => {
                server
                    .serve_with_incoming_shutdown(service, connections, signal)
                    .await?
            }
            Some(tls) => {
                server
                    .serve_with_incoming_shutdown(service, tls.incoming(connections), signal)
                    .await?
            }
        }
        tracing::info!("gRPC server stopped");
        return Ok(());
    }
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let mut shards = Vec::with_capacity(threads);
    for shard in 0..threads {
        let (connections, accepted) = mpsc::unbounded_channel();
        shards.push(connections);
        let (service, done, tls) = (service.clone(), done_tx.clone(), tls.clone());
        std::thread::Builder::new()
            .name(format!("grpc-{shard}"))
            .spawn(move || {
                let _ = done.send(serve_shard(service, accepted, tls, max_streams));
            })
            .map_err(ServeError::Thread)?;
    }
    drop(done_tx);
    tokio::select! {
        () = signal => {}
        () = accept_into(&listener, &shards, &limit) => {}
    }
    // Stop accepting; each thread then drains its connections gracefully and ends.
    drop(listener);
    drop(shards);
    let mut result = Ok(());
    while let Some(shard) = done_rx.recv().await {
        if let Err(error) = shard {
            tracing::error!(%error, "a gRPC serving thread failed");
            result = Err(error);
        }
    }
    tracing::info!("gRPC server stopped");
    result
}

/// A connection handed to a serving thread, with its place under the connection limit.
type Accepted = (std::net::TcpStream, ConnectionPermit);

/// Accepts connections for ever, handing each that `limit` admits to the next of `shards` (the
/// others are closed at once).
async fn accept_into(
    listener: &TcpListener,
    shards: &[mpsc::UnboundedSender<Accepted>],
    limit: &ConnectionLimit,
) {
    let mut next = 0usize;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors and the like: wait a little instead of spinning.
                tracing::warn!(%error, "cannot accept a connection");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Some(permit) = limit.admit(Some(peer)) else {
            continue;
        };
        nagle_off(&stream);
        // Leaves this runtime's reactor, to join the serving thread's.
        match stream.into_std() {
            Ok(stream) => {
                let _ = shards[next % shards.len()].send((stream, permit));
                next = next.wrapping_add(1);
            }
            Err(error) => tracing::debug!(%error, "cannot hand over an accepted connection"),
        }
    }
}

/// One serving thread: a single-threaded runtime serving the connections it is handed (doing
/// their TLS handshakes first, with `tls`) until their sender is dropped, then letting their
/// calls finish. Each connection keeps its permit until it ends.
fn serve_shard(
    service: TopService,
    accepted: mpsc::UnboundedReceiver<Accepted>,
    tls: Option<ServerTls>,
    max_streams: u32,
) -> Result<(), ServeError> {
    use futures::StreamExt as _;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ServeError::Thread)?;
    runtime.block_on(async move {
        let incoming = UnboundedReceiverStream::new(accepted).map(|(stream, permit)| {
            tokio::net::TcpStream::from_std(stream).map(|stream| Limited::new(stream, permit))
        });
        // The end of `incoming` stops the server; a shutdown signal is still needed (one that
        // never comes) for tonic to drain the connections instead of dropping them.
        let never = std::future::pending();
        match tls {
            None => {
                builder(max_streams)
                    .serve_with_incoming_shutdown(service, incoming, never)
                    .await
            }
            Some(tls) => {
                builder(max_streams)
                    .serve_with_incoming_shutdown(service, tls.incoming(incoming), never)
                    .await
            }
        }
    })?;
    Ok(())
}

/// The HTTP/2 settings of every server: keepalive, and at most `max_streams` streams open at
/// once on one connection (`--max-concurrent-streams`, sent in SETTINGS_MAX_CONCURRENT_STREAMS:
/// a client's further calls wait for a free stream, and hyper refuses the streams of a client
/// that does not wait with REFUSED_STREAM).
fn builder(max_streams: u32) -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .max_concurrent_streams(Some(max_streams))
}

/// The top-level service, and the future that completes when `shutdown` has and the server
/// has said so (health NOT_SERVING, Watch streams ended).
async fn prepare(
    listener: &TcpListener,
    settings: &Settings,
    store: Arc<dyn SessionStore>,
    metrics: Metrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
    tls: Option<&ServerTls>,
) -> Result<(TopService, impl Future<Output = ()> + Send + 'static), ServeError> {
    // The same rule as config validation, on the address really bound, for callers that
    // build `Settings` by hand. A client CA counts only when TLS really is on.
    if settings.tls_client_ca.is_some() && tls.is_none() {
        return Err(
            TlsError::Incomplete("tls-client-ca is set but the server serves plaintext").into(),
        );
    }
    if let Ok(bound) = listener.local_addr()
        && settings.refuses_unauthenticated(bound)
    {
        return Err(ServeError::Unauthenticated(bound));
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let limits = Limits {
        default_ttl: settings.default_ttl,
        max_ttl: settings.max_ttl,
        max_session_bytes: settings.max_session_bytes,
    };
    let service = SessionService::new(store.clone(), limits, metrics.clone(), stop_rx)
        .with_max_watchers(settings.max_watchers_per_namespace, settings.max_watchers)
        .with_lifetimes(
            settings.max_lifetime,
            TouchGranularity::from_setting(settings.touch_granularity),
        );
    let max_message = settings
        .max_session_bytes
        .saturating_mul(2)
        .saturating_add(MESSAGE_OVERHEAD);
    let api = SessionStoreServer::new(service)
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(usize::MAX);
    let auth = BearerAuth::from_settings(settings).map_err(|_| ServeError::Random)?;

    // SERVING while the store answers, NOT_SERVING while it does not (checked in the
    // background, see `health.rs`), NOT_SERVING for good from shutdown on.
    let (health, checker) = StoreChecker::start(
        store.clone(),
        metrics.clone(),
        settings.health_interval,
        settings.store_timeout,
    );
    let health_service = health.service();

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(session_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(session_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let address = listener.local_addr().ok();
    tracing::info!(
        ?address,
        store = store.kind(),
        auth_tokens = auth.token_count(),
        tls = tls.is_some(),
        client_certificates = tls.is_some_and(|tls| tls.files().client_ca.is_some()),
        "serving gRPC"
    );
    let signal = async move {
        shutdown.await;
        tracing::info!("shutdown requested: refusing new calls, finishing in-flight ones");
        // Both names a probe may ask about, the server as a whole and the API service, are
        // NOT_SERVING from here on (no later store check changes that), and health Watch
        // streams end, as the API's Watch streams do.
        health.stop();
        drop(checker);
        let _ = stop_tx.send(true);
    };
    let rest = Routes::new(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    let top = CallDeadline::new(
        ApiFirst::new(api, auth, rest),
        settings.call_timeout,
        metrics,
    );
    Ok((top, signal))
}
