//! The reverse proxy: hyper 1 serving HTTP/1.1 and HTTP/2 clients, HTTP/1.1 to backends over a
//! keep-alive pool per backend, bodies streamed both ways.
//!
//! A request goes through pingora-style steps: the request filters ([`crate::filter`]:
//! per-client limits, header hygiene, forwarding headers, the session-lookup plugin, in that
//! order by default, the first and last when configured; a filter may answer the request
//! itself with a [`Reject`]), the balancer's `pick` among usable backends, the upstream
//! exchange with retries, then the balancer's `on_response` (sticky cookie) and the response
//! filters the request filters asked for (the lookup plugin's snapshot cookie) on the
//! response head. The proxy owns the ordered list of filter factories
//! ([`Proxy::with_filters`]) and builds the filters for each configuration it runs.
//!
//! ```no_run
//! # async fn run(config: proxy_plugin::config::ProxyConfig) -> Result<(), Box<dyn std::error::Error>> {
//! use proxy_plugin::proxy::Proxy;
//!
//! let proxy = Proxy::new(config)?; // backends, balancer, health checks, lookup client
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! let shutdown = async {
//!     let _ = tokio::signal::ctrl_c().await;
//! };
//! proxy.serve(listener, shutdown).await?; // returns once requests in flight are done
//! # Ok(())
//! # }
//! ```
//!
//! # Decisions
//! - **Host**: the client's `Host` is kept (nginx `proxy_set_header Host $host`), so backends
//!   see the name the client used (an HTTP/1.1 request without one, with two, or with one
//!   disagreeing with its target is a 400: [`crate::filter::hygiene`]); `X-Forwarded-For`,
//!   `X-Real-IP`, `X-Forwarded-Proto`, `X-Forwarded-Host` and an RFC 7239 `Forwarded` element
//!   are rebuilt from the trusted chain by [`crate::filter::forwarding`]; hop-by-hop headers
//!   (`Connection` and the headers it names, `Keep-Alive`, `Proxy-*`, `TE`, `Trailer`,
//!   `Transfer-Encoding`, `Upgrade`) are removed both ways before the filters run, but for the
//!   `Connection: upgrade` and `Upgrade` of an HTTP/1.1 upgrade request (WebSocket), and of the
//!   backend's 101 to it: see `proxy/tunnel.rs` (bytes copied both ways, on a backend
//!   connection of its own, until a side closes or `idle_timeout` passes without a byte).
//!   HTTP/2 extended CONNECT (RFC 8441) is not supported.
//! - **Retries** (nginx `proxy_next_upstream error timeout`, at most `max_tries` backends): a
//!   connect failure moves on whatever the method, since nothing reached the backend; a reset
//!   or a response timeout moves on only for idempotent methods (GET, HEAD, OPTIONS, PUT,
//!   DELETE, TRACE); a POST or PATCH that may have reached a backend is never replayed (502,
//!   or 504 for a timeout). A backend's own 5xx answer is relayed, not retried.
//! - **Request bodies**: empty ones, and those whose `Content-Length` is at most
//!   `retry_buffer_bytes`, are read into memory so any try can resend them; larger or chunked
//!   ones are streamed, and can go to another backend only if no try has started sending
//!   them (a connect failure). Either way a body is timed on the client's time only:
//!   `body_read_timeout` between two pieces, `min_upload_rate` on average (see
//!   `proxy/body.rs`).
//! - **Timeouts and statuses**: request head not complete within `header_read_timeout` →
//!   408 when part of it arrived, silent close for an idle keep-alive connection; head over
//!   `max_header_bytes` → 431; `Content-Length` over `max_body_bytes` → 413 before any backend
//!   is contacted, a streamed body crossing it is cut (413 if no response started); a client
//!   body idle for `body_read_timeout` or slower than `min_upload_rate` → 408 (the backend
//!   request ended if its response started), never counted as a backend failure; connect
//!   failure with no try left → 502; no response head within `response_timeout` of the
//!   backend's time (from sending the request, or from the last piece of a streamed body:
//!   time spent waiting on the client does not count) → 504; a backend body idle for
//!   `response_timeout` is cut; a client taking none of its response for `send_timeout` is
//!   cut, its backend connection closed (an HTTP/2 stream whose window stays shut: its
//!   backend connection); more than `max_connections` client connections → 503 for the extra
//!   ones (a counter checked at accept rather than a semaphore, so a reload can change the
//!   limit); no usable backend → 503. An HTTP/1 keep-alive connection is closed
//!   `idle_timeout` after its last response (`header_read_timeout` once a next head begins),
//!   an HTTP/2 one `idle_timeout` after its last stream (GOAWAY). Passive health counts only
//!   connect failures, resets and response timeouts, never a slow client (nor a reset while
//!   the proxy waits for the client's body: the backend's own body timeout, most likely).
//! - **TLS**: [`Proxy::serve_tls`] serves HTTPS (ALPN `h2` and `http/1.1`, see [`crate::tls`]);
//!   the cookies the proxy sets itself (the sticky cookie, the lookup plugin's snapshot cookie)
//!   are then `Secure`, as the proxy's own `X-Forwarded-Proto` tells them. `https://` backends are dialled over
//!   TLS only, their certificates verified (`backend_ca`, else the system's roots).
//! - **Reload**: each request takes the current `Generation` (backends, balancer, limits,
//!   lookup, upstream pool) when it starts and keeps it to its end; a reload swaps the
//!   generation for new requests and restarts the health checks. `listen`/`admin_listen`
//!   changes, and turning HTTPS on or off, need a restart.

mod body;
mod conn;
mod forward;
mod headers;
mod serve;
mod tunnel;
mod upstream;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use http::Response;
use http::uri::Authority;
use parking_lot::{Mutex, RwLock};

use crate::backend::Backend;
use crate::balance::{self, Balancer};
use crate::config::{HealthCheckKind, ProxyConfig};
use crate::filter::{self, FilterFactory, FilterSetup, Reject, RequestFilter};
use crate::health::{self, HealthChecks};
use crate::lookup::{LookupError, SessionLookup};
use crate::metrics::{BackendMetrics, ProxyMetrics};
use crate::tls::{self, BackendTls, ListenerTls, TlsError};

pub(crate) use crate::filter::forwarding::forwarded_https;

/// A configuration the proxy cannot run with.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The backend list is empty.
    #[error("no backends configured")]
    NoBackends,
    /// A backend address that is not `host:port`.
    #[error("backend {name:?}: {authority:?} is not host:port: {source}")]
    BadBackend {
        /// The backend's name.
        name: String,
        /// What was configured.
        authority: String,
        /// Why it does not parse.
        #[source]
        source: http::uri::InvalidUri,
    },
    /// An HTTP health-check path that is not an absolute path.
    #[error("health check path {0:?} is not an absolute path")]
    HealthPath(String),
    /// The session-lookup plugin's settings are unusable (endpoint, attribute names, cookie).
    #[error("session lookup: {0}")]
    Lookup(#[from] LookupError),
    /// The TLS settings of `https://` backends are unusable (CA bundle, host name).
    #[error("https backends: {0}")]
    BackendTls(#[from] TlsError),
    /// The metrics could not be registered.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// One configuration in force: what a request needs from start to end.
#[derive(Debug)]
pub(crate) struct Generation {
    /// Counts reloads, for logs.
    number: u64,
    /// The configuration.
    config: ProxyConfig,
    /// The backends, in config order (`Backend::index` is the position).
    backends: Vec<Arc<Backend>>,
    /// Each backend's keep-alive connections (and parsed `host:port`), by index.
    pools: Vec<Arc<upstream::Pool>>,
    /// Each backend's request metrics, by index.
    backend_metrics: Vec<BackendMetrics>,
    /// The balancer over `backends`.
    balancer: Box<dyn Balancer>,
    /// The session-lookup plugin, kept apart to reuse its client across reloads.
    lookup: Arc<SessionLookup>,
    /// The request filters, in order.
    filters: Vec<Arc<dyn RequestFilter>>,
}

impl Generation {
    /// Must be called in a tokio runtime (it starts the idle-connection sweeper).
    fn build(
        number: u64,
        config: ProxyConfig,
        lookup: Arc<SessionLookup>,
        factories: &[FilterFactory],
        metrics: &ProxyMetrics,
    ) -> Result<Self, ProxyError> {
        if config.backends.is_empty() {
            return Err(ProxyError::NoBackends);
        }
        if let HealthCheckKind::Http(path) = &config.health.kind
            && !health::valid_check_path(path)
        {
            return Err(ProxyError::HealthPath(path.clone()));
        }
        let mut backends = Vec::with_capacity(config.backends.len());
        let mut pools = Vec::with_capacity(config.backends.len());
        // Read (CA bundle or system roots) only when some backend needs it, once for all.
        let tls_config = if config.backends.iter().any(|b| b.tls) {
            Some(tls::backend_client_config(config.backend_ca.as_deref())?)
        } else {
            None
        };
        for (index, b) in config.backends.iter().enumerate() {
            let authority =
                b.authority
                    .parse::<Authority>()
                    .map_err(|source| ProxyError::BadBackend {
                        name: b.name.clone(),
                        authority: b.authority.clone(),
                        source,
                    })?;
            let tls = match &tls_config {
                Some(client) if b.tls => Some(BackendTls::new(client.clone(), authority.host())?),
                _ => None,
            };
            pools.push(upstream::Pool::new(
                authority,
                tls.clone(),
                config.limits.connect_timeout,
            ));
            let backend = Backend::new(index, &b.name, &b.authority, b.weight);
            backends.push(Arc::new(match tls {
                Some(tls) => backend.with_tls(tls),
                None => backend,
            }));
        }
        let balancer = balance::build(&config.balance, &backends);
        upstream::sweep_idle(&pools);
        let backend_metrics = backends.iter().map(|b| metrics.backend(&b.name)).collect();
        let filters = filter::build(
            factories,
            &FilterSetup {
                config: &config,
                lookup: &lookup,
            },
        )?;
        Ok(Generation {
            number,
            config,
            backends,
            pools,
            backend_metrics,
            balancer,
            lookup,
            filters,
        })
    }
}

/// The proxy: the current configuration generation, its health checks and the metrics.
#[derive(Debug)]
pub struct Proxy {
    /// The generation new requests get.
    current: RwLock<Arc<Generation>>,
    /// The health checks of the current generation; replacing them stops the old ones. Also
    /// serializes reloads.
    health: Mutex<HealthChecks>,
    /// The metrics, shared by every generation.
    metrics: ProxyMetrics,
    /// Number of the next generation.
    next_generation: AtomicU64,
    /// Build the request filters of each generation, in order.
    filters: Vec<FilterFactory>,
}

impl Proxy {
    /// Builds backends, the balancer, health-check tasks, the lookup client and the
    /// [default request filters](filter::default_filters). Must be called in a tokio runtime.
    pub fn new(config: ProxyConfig) -> Result<Arc<Proxy>, ProxyError> {
        Proxy::with_filters(config, filter::default_filters())
    }

    /// [`Proxy::new`] with the request filters `filters` build, in this order, for each
    /// configuration (at start and on every reload), instead of the default ones.
    pub fn with_filters(
        config: ProxyConfig,
        filters: Vec<FilterFactory>,
    ) -> Result<Arc<Proxy>, ProxyError> {
        let metrics = ProxyMetrics::new()?;
        let lookup = Arc::new(SessionLookup::new(config.lookup.as_ref(), metrics.clone())?);
        let generation = Generation::build(0, config, lookup, &filters, &metrics)?;
        let health = HealthChecks::start(&generation.backends, &generation.config.health);
        Ok(Arc::new(Proxy {
            current: RwLock::new(Arc::new(generation)),
            health: Mutex::new(health),
            metrics,
            next_generation: AtomicU64::new(1),
            filters,
        }))
    }

    /// Swaps in a new config (backends, balancer, limits, health, lookup) without dropping
    /// connections in flight: requests already running keep the old snapshot; new ones get
    /// the new one. What only a restart changes ([`ProxyConfig::keep_restart_settings`]:
    /// `listen`, `admin_listen`, HTTPS on or off) keeps its running value, with a warning, so
    /// [`Proxy::config`] tells what is in force.
    pub fn reload(&self, mut config: ProxyConfig) -> Result<(), ProxyError> {
        let mut health = self.health.lock();
        let old = self.current();
        let kept = old.config.keep_restart_settings(&mut config);
        if !kept.is_empty() {
            tracing::warn!(settings = ?kept,
                "these settings take effect only after a restart; keeping their running values");
        }
        let lookup = if old.lookup.config() == config.lookup.as_ref() {
            old.lookup.clone()
        } else {
            Arc::new(SessionLookup::new(
                config.lookup.as_ref(),
                self.metrics.clone(),
            )?)
        };
        let number = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let generation = Arc::new(Generation::build(
            number,
            config,
            lookup,
            &self.filters,
            &self.metrics,
        )?);
        let checks = HealthChecks::start(&generation.backends, &generation.config.health);
        let names: Vec<&str> = generation
            .backends
            .iter()
            .map(|b| b.name.as_str())
            .collect();
        tracing::info!(generation = generation.number, backends = ?names,
            balance = generation.config.balance.name(), "configuration reloaded");
        *self.current.write() = generation;
        *health = checks;
        Ok(())
    }

    /// The current backends (admin API).
    pub fn backends(&self) -> Vec<Arc<Backend>> {
        self.current().backends.clone()
    }

    /// The configuration in force.
    pub fn config(&self) -> ProxyConfig {
        self.current().config.clone()
    }

    /// The metrics (counters readable by tests and the admin API).
    pub fn metrics(&self) -> &ProxyMetrics {
        &self.metrics
    }

    /// Prometheus text exposition of the proxy's metrics: requests by backend and status,
    /// upstream latency, retries, rejects by status and reason, clients cut for being slow or
    /// idle, active connections, backend health and load.
    pub fn render_metrics(&self) -> String {
        self.metrics.render(&self.current().backends)
    }

    /// Serves clients on `listener` in plaintext until `shutdown` completes, then stops
    /// accepting and lets in-flight requests finish.
    ///
    /// A configuration with [`ProxyConfig::tls`] set is refused at once (an
    /// [`InvalidInput`](std::io::ErrorKind::InvalidInput) error): its listener must serve
    /// HTTPS, with [`Proxy::serve_tls`] and a [`ListenerTls`] loaded from those files, never
    /// cleartext by mistake.
    pub async fn serve(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        if self.current().config.tls.is_some() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the configuration has TLS certificate files: serve it with Proxy::serve_tls",
            ));
        }
        serve::run(self, listener, None, shutdown).await
    }

    /// [`Proxy::serve`] over TLS: every connection starts with a handshake under `tls`'s
    /// current certificate (see [`crate::tls`]); the requests it carries go to backends with
    /// `X-Forwarded-Proto: https`. Reloading `tls` (a clone of it) changes the certificate for
    /// the connections that come next.
    pub async fn serve_tls(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        tls: ListenerTls,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        serve::run(self, listener, Some(tls), shutdown).await
    }

    /// The generation new requests get.
    pub(crate) fn current(&self) -> Arc<Generation> {
        self.current.read().clone()
    }

    /// The response for `reject` (a filter's, or the proxy's own), logged and counted.
    pub(crate) fn refuse(
        &self,
        reject: Reject,
        parts: &http::request::Parts,
        detail: &str,
    ) -> Response<body::ResponseBody> {
        let Reject {
            status,
            reason,
            close_connection,
            headers,
        } = reject;
        // The proxy's own failures (502, 503, 504) are warnings; the client's doing (400, 408,
        // 413, 429, ...) is counted in the metrics and logged at debug only, so that a flood
        // the limits answer is not a flood of log lines.
        if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), reason = %reason, method = %parts.method,
                path = parts.uri.path(), detail, "request answered by the proxy");
        } else {
            tracing::debug!(status = status.as_u16(), reason = %reason, method = %parts.method,
                path = parts.uri.path(), detail, "request answered by the proxy");
        }
        self.metrics.reject_with(status, &reason);
        let mut response = forward::local_response(status, close_connection);
        for (name, value) in headers {
            response.headers_mut().append(name, value);
        }
        response
    }
}
