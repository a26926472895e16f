//! The proxy's Prometheus metrics, in a registry of their own (one per [`crate::proxy::Proxy`],
//! so tests and several proxies in one process never share counters).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::StatusCode;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::backend::Backend;

/// Upstream latency buckets in seconds: from a fast local backend to the longest sane timeout.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Statuses whose request counters a [`BackendMetrics`] keeps at hand; others are looked up by
/// label on each response.
const CACHED_STATUSES: [u16; 12] = [200, 201, 204, 206, 301, 302, 304, 400, 401, 403, 404, 500];

/// The session lookup outcomes the plugin counts, whose counters are kept at hand.
const LOOKUP_OUTCOMES: [&str; 11] = [
    "found",
    "no_cookie",
    "malformed",
    "missing",
    "restored",
    "conflict",
    "snapshot",
    "failed_open",
    "failed_closed",
    "timeout_open",
    "timeout_closed",
];

/// The session lookup cache's events (`--session-cache`), whose counters are kept at hand.
const SESSION_CACHE_EVENTS: [&str; 7] = [
    "hit",
    "miss",
    "bypassed",
    "invalidated",
    "forgotten",
    "evicted",
    "cleared",
];

/// Why the proxy itself (its limits, timeouts and backends) answered a request instead of a
/// backend. Request filters answer with a [`Reject`](crate::filter::Reject) of their own,
/// counted under its own `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// 408: the client did not send its request head (or small body) in time.
    ClientTimeout,
    /// 413: the request body is larger than `max_body_bytes`.
    BodyTooLarge,
    /// 431: the request head is larger than `max_header_bytes`.
    HeaderTooLarge,
    /// 502: no backend could be reached or the backend failed (no retry left or allowed).
    BadGateway,
    /// 503: no usable backend.
    NoBackend,
    /// 503: more than `max_connections` client connections.
    TooManyConnections,
    /// 504: the backend did not send its response head within `response_timeout`.
    GatewayTimeout,
    /// 400: the client broke off while sending its body.
    ClientAborted,
}

impl RejectReason {
    /// The status code sent for it.
    pub fn status(self) -> http::StatusCode {
        use http::StatusCode as S;
        match self {
            RejectReason::ClientTimeout => S::REQUEST_TIMEOUT,
            RejectReason::BodyTooLarge => S::PAYLOAD_TOO_LARGE,
            RejectReason::HeaderTooLarge => S::REQUEST_HEADER_FIELDS_TOO_LARGE,
            RejectReason::BadGateway => S::BAD_GATEWAY,
            RejectReason::NoBackend | RejectReason::TooManyConnections => S::SERVICE_UNAVAILABLE,
            RejectReason::GatewayTimeout => S::GATEWAY_TIMEOUT,
            RejectReason::ClientAborted => S::BAD_REQUEST,
        }
    }

    /// The `reason` label value.
    pub fn label(self) -> &'static str {
        match self {
            RejectReason::ClientTimeout => "client_timeout",
            RejectReason::BodyTooLarge => "body_too_large",
            RejectReason::HeaderTooLarge => "header_too_large",
            RejectReason::BadGateway => "bad_gateway",
            RejectReason::NoBackend => "no_backend",
            RejectReason::TooManyConnections => "max_connections",
            RejectReason::GatewayTimeout => "gateway_timeout",
            RejectReason::ClientAborted => "client_aborted",
        }
    }
}

/// Every metric the proxy exports.
#[derive(Debug, Clone)]
pub struct ProxyMetrics {
    /// The registry all of them are in.
    registry: Registry,
    /// Responses relayed from backends, by backend and status.
    requests: IntCounterVec,
    /// Time from sending a request to a backend to its response head.
    upstream_latency: HistogramVec,
    /// Requests sent again to another backend, by the backend that failed.
    retries: IntCounterVec,
    /// Requests the proxy answered itself, by status and reason.
    rejects: IntCounterVec,
    /// Client connections open now.
    active_connections: IntGauge,
    /// Session lookups by outcome ([`LOOKUP_OUTCOMES`]).
    lookups: IntCounterVec,
    /// `lookups` of each of [`LOOKUP_OUTCOMES`], resolved on first use (shared by clones).
    lookup_outcomes: Arc<[OnceLock<IntCounter>; LOOKUP_OUTCOMES.len()]>,
    /// Lookup cache events by kind ([`SESSION_CACHE_EVENTS`]).
    session_cache: IntCounterVec,
    /// `session_cache` of each of [`SESSION_CACHE_EVENTS`], resolved on first use.
    session_cache_events: Arc<[OnceLock<IntCounter>; SESSION_CACHE_EVENTS.len()]>,
    /// Sessions in the lookup cache now.
    session_cache_entries: IntGauge,
    /// Whether the lookup cache's Watch stream is up (1: the cache is used) or not (0).
    session_cache_up: IntGauge,
    /// Whether each current backend is up (1) or down (0), refreshed at render time.
    backend_up: IntGaugeVec,
    /// Requests in flight per current backend, refreshed at render time.
    backend_active: IntGaugeVec,
    /// Clients cut for being too slow or idle, by kind (see [`ClientTimeouts`]).
    client_timeouts: ClientTimeouts,
    /// Upgrade requests and the tunnels they open (see [`TunnelMetrics`]).
    tunnels: TunnelMetrics,
}

impl ProxyMetrics {
    /// Registers every metric in a new registry.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("proxy_requests_total", "Responses relayed from backends."),
            &["backend", "status"],
        )?;
        let upstream_latency = HistogramVec::new(
            HistogramOpts::new(
                "proxy_upstream_latency_seconds",
                "Time from sending a request to a backend to its response head.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["backend"],
        )?;
        let retries = IntCounterVec::new(
            Opts::new(
                "proxy_retries_total",
                "Requests sent again to another backend, by the backend that failed.",
            ),
            &["backend"],
        )?;
        let rejects = IntCounterVec::new(
            Opts::new("proxy_rejects_total", "Requests the proxy answered itself."),
            &["status", "reason"],
        )?;
        let active_connections =
            IntGauge::new("proxy_active_connections", "Client connections open now.")?;
        let lookups = IntCounterVec::new(
            Opts::new("proxy_session_lookups_total", "Session lookups by outcome."),
            &["outcome"],
        )?;
        let session_cache = IntCounterVec::new(
            Opts::new(
                "proxy_session_cache_total",
                "Session lookup cache events: hit, miss, bypassed (stream down, offline \
                 changes), invalidated (an entry removed by an event), forgotten (a response ended or replaced \
                 its session, or answered an unsafe method), evicted, cleared \
                 (stream lost or events missed).",
            ),
            &["event"],
        )?;
        let session_cache_entries = IntGauge::new(
            "proxy_session_cache_entries",
            "Sessions in the lookup cache.",
        )?;
        let session_cache_up = IntGauge::new(
            "proxy_session_cache_up",
            "Whether the lookup cache's Watch stream is up (1) and the cache used.",
        )?;
        let backend_up = IntGaugeVec::new(
            Opts::new(
                "proxy_backend_up",
                "Whether the backend is up (1) or down (0).",
            ),
            &["backend"],
        )?;
        let backend_active = IntGaugeVec::new(
            Opts::new(
                "proxy_backend_active_requests",
                "Requests in flight to the backend.",
            ),
            &["backend"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(upstream_latency.clone()))?;
        registry.register(Box::new(retries.clone()))?;
        registry.register(Box::new(rejects.clone()))?;
        registry.register(Box::new(active_connections.clone()))?;
        registry.register(Box::new(lookups.clone()))?;
        registry.register(Box::new(session_cache.clone()))?;
        registry.register(Box::new(session_cache_entries.clone()))?;
        registry.register(Box::new(session_cache_up.clone()))?;
        registry.register(Box::new(backend_up.clone()))?;
        registry.register(Box::new(backend_active.clone()))?;
        let client_timeouts = ClientTimeouts::register(&registry)?;
        let tunnels = TunnelMetrics::register(&registry)?;
        Ok(ProxyMetrics {
            registry,
            requests,
            upstream_latency,
            retries,
            rejects,
            active_connections,
            lookups,
            lookup_outcomes: Arc::default(),
            session_cache,
            session_cache_events: Arc::default(),
            session_cache_entries,
            session_cache_up,
            backend_up,
            backend_active,
            client_timeouts,
            tunnels,
        })
    }

    /// Counts a response relayed from `backend` and its latency to the head.
    pub fn observe_response(&self, backend: &str, status: u16, latency: Duration) {
        self.requests
            .with_label_values(&[backend, &status.to_string()])
            .inc();
        self.upstream_latency
            .with_label_values(&[backend])
            .observe(latency.as_secs_f64());
    }

    /// The metric handles of `backend`, for [`BackendMetrics::observe_response`].
    pub(crate) fn backend(&self, backend: &str) -> BackendMetrics {
        BackendMetrics {
            name: backend.to_owned(),
            requests: self.requests.clone(),
            upstream_latency: self.upstream_latency.clone(),
            by_status: Default::default(),
            latency: OnceLock::new(),
        }
    }

    /// Counts a retry away from `backend`.
    pub fn retry(&self, backend: &str) {
        self.retries.with_label_values(&[backend]).inc();
    }

    /// Counts a request the proxy answered itself for one of its own reasons.
    pub fn reject(&self, reason: RejectReason) {
        self.reject_with(reason.status(), reason.label());
    }

    /// Counts a request answered with `status` by the proxy or a request filter, under the
    /// `reason` label (a [`Reject`](crate::filter::Reject)'s).
    pub fn reject_with(&self, status: StatusCode, reason: &str) {
        self.rejects
            .with_label_values(&[status.as_str(), reason])
            .inc();
    }

    /// How many rejects of `reason` were counted (tests, admin).
    pub fn rejects(&self, reason: RejectReason) -> u64 {
        self.rejects_with(reason.status(), reason.label())
    }

    /// How many requests were answered with `status` under the `reason` label (tests, admin).
    pub fn rejects_with(&self, status: StatusCode, reason: &str) -> u64 {
        self.rejects
            .with_label_values(&[status.as_str(), reason])
            .get()
    }

    /// Counts a session lookup outcome.
    pub fn lookup(&self, outcome: &str) {
        match LOOKUP_OUTCOMES.iter().position(|o| *o == outcome) {
            Some(i) => self.lookup_outcomes[i]
                .get_or_init(|| self.lookups.with_label_values(&[outcome]))
                .inc(),
            None => self.lookups.with_label_values(&[outcome]).inc(),
        }
    }

    /// Counts a session lookup cache event.
    pub fn session_cache(&self, event: &str) {
        match SESSION_CACHE_EVENTS.iter().position(|e| *e == event) {
            Some(i) => self.session_cache_events[i]
                .get_or_init(|| self.session_cache.with_label_values(&[event]))
                .inc(),
            None => self.session_cache.with_label_values(&[event]).inc(),
        }
    }

    /// Adds `delta` to the number of sessions in the lookup cache.
    pub fn session_cache_entries(&self, delta: i64) {
        self.session_cache_entries.add(delta);
    }

    /// Notes whether the lookup cache's Watch stream is up.
    pub fn session_cache_up(&self, up: bool) {
        self.session_cache_up.set(i64::from(up));
    }

    /// A client connection opened.
    pub fn connection_opened(&self) {
        self.active_connections.inc();
    }

    /// A client connection closed.
    pub fn connection_closed(&self) {
        self.active_connections.dec();
    }

    /// The text exposition format, with the per-backend gauges set from `backends`.
    pub fn render(&self, backends: &[std::sync::Arc<Backend>]) -> String {
        self.backend_up.reset();
        self.backend_active.reset();
        for backend in backends {
            self.backend_up
                .with_label_values(&[&backend.name])
                .set(i64::from(backend.is_up()));
            self.backend_active
                .with_label_values(&[&backend.name])
                .set(i64::try_from(backend.active()).unwrap_or(i64::MAX));
        }
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// One backend's request metrics, resolved once instead of on every response: a label lookup
/// formats the status, hashes the label values and takes the metric family's lock. Each
/// series is still created on first use, so the exposition lists the same series as before.
#[derive(Debug)]
pub(crate) struct BackendMetrics {
    /// The `backend` label.
    name: String,
    /// `proxy_requests_total`, for statuses not in [`CACHED_STATUSES`].
    requests: IntCounterVec,
    /// `proxy_upstream_latency_seconds`, to create this backend's series.
    upstream_latency: HistogramVec,
    /// `proxy_requests_total` of this backend for each of [`CACHED_STATUSES`].
    by_status: [OnceLock<IntCounter>; CACHED_STATUSES.len()],
    /// This backend's `proxy_upstream_latency_seconds`.
    latency: OnceLock<Histogram>,
}

impl BackendMetrics {
    /// Counts a response relayed from the backend and its latency to the head.
    pub(crate) fn observe_response(&self, status: StatusCode, latency: Duration) {
        let counter = |status: StatusCode| {
            self.requests
                .with_label_values(&[self.name.as_str(), status.as_str()])
        };
        match CACHED_STATUSES.iter().position(|s| *s == status.as_u16()) {
            Some(i) => self.by_status[i].get_or_init(|| counter(status)).inc(),
            None => counter(status).inc(),
        }
        self.latency
            .get_or_init(|| {
                self.upstream_latency
                    .with_label_values(&[self.name.as_str()])
            })
            .observe(latency.as_secs_f64());
    }
}

// ---- Client timeouts: slow or idle clients the proxy cut (`proxy_client_timeouts_total`). ----

/// Why the proxy cut a client that was too slow or idle: the `kind` label of
/// `proxy_client_timeouts_total`. None of them is ever held against a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientTimeoutKind {
    /// No request body data for `body_read_timeout` (nginx `client_body_timeout`).
    BodyRead,
    /// The request body averaged less than `min_upload_rate`.
    SlowUpload,
    /// The client took none of the response for `send_timeout` (nginx `send_timeout`).
    Send,
    /// An HTTP/1 keep-alive connection between requests, or an HTTP/2 connection without an
    /// open stream, idle for `idle_timeout` (nginx `keepalive_timeout`).
    Idle,
}

impl ClientTimeoutKind {
    /// Every kind, in label order.
    const ALL: [ClientTimeoutKind; 4] = [
        ClientTimeoutKind::BodyRead,
        ClientTimeoutKind::SlowUpload,
        ClientTimeoutKind::Send,
        ClientTimeoutKind::Idle,
    ];

    /// The `kind` label value.
    pub fn label(self) -> &'static str {
        match self {
            ClientTimeoutKind::BodyRead => "body_read",
            ClientTimeoutKind::SlowUpload => "slow_upload",
            ClientTimeoutKind::Send => "send",
            ClientTimeoutKind::Idle => "idle",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// `proxy_client_timeouts_total`, each kind's counter resolved once (and exported from the
/// start, at 0). Cheap to clone: request bodies carry one to count their own timeouts.
#[derive(Debug, Clone)]
pub(crate) struct ClientTimeouts {
    /// The counter of each [`ClientTimeoutKind`], by [`ClientTimeoutKind::index`].
    by_kind: Arc<[IntCounter; ClientTimeoutKind::ALL.len()]>,
}

impl ClientTimeouts {
    fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let family = IntCounterVec::new(
            Opts::new(
                "proxy_client_timeouts_total",
                "Clients cut for being too slow or idle, by kind.",
            ),
            &["kind"],
        )?;
        registry.register(Box::new(family.clone()))?;
        let by_kind = ClientTimeoutKind::ALL.map(|kind| family.with_label_values(&[kind.label()]));
        Ok(ClientTimeouts {
            by_kind: Arc::new(by_kind),
        })
    }

    /// Counts one client cut for `kind`.
    pub(crate) fn count(&self, kind: ClientTimeoutKind) {
        self.by_kind[kind.index()].inc();
    }
}

impl ProxyMetrics {
    /// Counts one client cut for `kind`.
    pub fn client_timeout(&self, kind: ClientTimeoutKind) {
        self.client_timeouts.count(kind);
    }

    /// How many clients were cut for `kind` (tests, admin).
    pub fn client_timeouts(&self, kind: ClientTimeoutKind) -> u64 {
        self.client_timeouts.by_kind[kind.index()].get()
    }

    /// The client-timeout counters, for the request bodies that count their own.
    pub(crate) fn client_timeout_counters(&self) -> ClientTimeouts {
        self.client_timeouts.clone()
    }
}

// ---- Upgrades: WebSocket and other tunnels (`proxy_upgrades_total`, `proxy_tunnels_open`,
// `proxy_tunnels_ended_total`). ----

/// What came of an upgrade request a backend answered: the `outcome` label of
/// `proxy_upgrades_total`. Upgrade requests the proxy answered itself (no backend, a filter's
/// refusal) are counted in `proxy_rejects_total` instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpgradeOutcome {
    /// The backend switched protocols and both connections became a tunnel.
    Tunnel,
    /// The backend answered something else than 101, relayed as a normal response.
    Refused,
    /// The backend switched protocols, but the tunnel could not take over both connections
    /// (the client left before its 101, or the backend closed at once).
    Failed,
}

impl UpgradeOutcome {
    /// Every outcome, in label order.
    const ALL: [UpgradeOutcome; 3] = [
        UpgradeOutcome::Tunnel,
        UpgradeOutcome::Refused,
        UpgradeOutcome::Failed,
    ];

    /// The `outcome` label value.
    pub fn label(self) -> &'static str {
        match self {
            UpgradeOutcome::Tunnel => "tunnel",
            UpgradeOutcome::Refused => "refused",
            UpgradeOutcome::Failed => "failed",
        }
    }
}

/// How a tunnel ended: the `reason` label of `proxy_tunnels_ended_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelEnd {
    /// Both sides closed their half (or one closed and the other followed).
    Closed,
    /// No byte in either direction for `idle_timeout`: both sides closed by the proxy.
    Idle,
    /// A read or write failed (a reset, or a client taking nothing for `send_timeout`).
    Error,
}

impl TunnelEnd {
    /// Every reason, in label order.
    const ALL: [TunnelEnd; 3] = [TunnelEnd::Closed, TunnelEnd::Idle, TunnelEnd::Error];

    /// The `reason` label value.
    pub fn label(self) -> &'static str {
        match self {
            TunnelEnd::Closed => "closed",
            TunnelEnd::Idle => "idle",
            TunnelEnd::Error => "error",
        }
    }
}

/// The tunnel metrics, every series resolved once (and exported from the start, at 0).
#[derive(Debug, Clone)]
pub(crate) struct TunnelMetrics {
    /// `proxy_upgrades_total` by [`UpgradeOutcome`], in [`UpgradeOutcome::ALL`] order.
    upgrades: Arc<[IntCounter; UpgradeOutcome::ALL.len()]>,
    /// `proxy_tunnels_open`: tunnels relaying now.
    open: IntGauge,
    /// `proxy_tunnels_ended_total` by [`TunnelEnd`], in [`TunnelEnd::ALL`] order.
    ended: Arc<[IntCounter; TunnelEnd::ALL.len()]>,
}

impl TunnelMetrics {
    fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let upgrades = IntCounterVec::new(
            Opts::new(
                "proxy_upgrades_total",
                "Upgrade requests (WebSocket) a backend answered, by outcome.",
            ),
            &["outcome"],
        )?;
        let open = IntGauge::new("proxy_tunnels_open", "Upgraded connections relaying now.")?;
        let ended = IntCounterVec::new(
            Opts::new(
                "proxy_tunnels_ended_total",
                "Upgraded connections ended, by reason.",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(upgrades.clone()))?;
        registry.register(Box::new(open.clone()))?;
        registry.register(Box::new(ended.clone()))?;
        Ok(TunnelMetrics {
            upgrades: Arc::new(
                UpgradeOutcome::ALL.map(|o| upgrades.with_label_values(&[o.label()])),
            ),
            open,
            ended: Arc::new(TunnelEnd::ALL.map(|e| ended.with_label_values(&[e.label()]))),
        })
    }

    /// Counts an upgrade request's outcome.
    pub(crate) fn upgrade(&self, outcome: UpgradeOutcome) {
        self.upgrades[outcome as usize].inc();
    }

    /// A tunnel starts relaying.
    pub(crate) fn opened(&self) {
        self.open.inc();
    }

    /// A tunnel ended for `end`.
    pub(crate) fn ended(&self, end: TunnelEnd) {
        self.open.dec();
        self.ended[end as usize].inc();
    }
}

impl ProxyMetrics {
    /// The tunnel metrics, for the upgrade path.
    pub(crate) fn tunnels(&self) -> &TunnelMetrics {
        &self.tunnels
    }

    /// How many upgrade requests had `outcome` (tests, admin).
    pub fn upgrades(&self, outcome: UpgradeOutcome) -> u64 {
        self.tunnels.upgrades[outcome as usize].get()
    }

    /// Tunnels relaying now (tests, admin).
    pub fn tunnels_open(&self) -> i64 {
        self.tunnels.open.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_handles_count_in_the_shared_families() {
        let metrics = ProxyMetrics::new().unwrap();
        let b1 = metrics.backend("b1");
        b1.observe_response(StatusCode::OK, Duration::from_millis(2));
        b1.observe_response(StatusCode::OK, Duration::from_millis(2));
        b1.observe_response(StatusCode::IM_A_TEAPOT, Duration::from_millis(2));
        metrics.observe_response("b1", 200, Duration::from_millis(2));
        let text = metrics.render(&[]);
        assert!(
            text.contains(r#"proxy_requests_total{backend="b1",status="200"} 3"#),
            "{text}"
        );
        assert!(
            text.contains(r#"proxy_requests_total{backend="b1",status="418"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"proxy_upstream_latency_seconds_count{backend="b1"} 4"#),
            "{text}"
        );
        assert!(!text.contains("b2"), "no series before a response: {text}");
    }

    #[test]
    fn lookup_outcomes_are_counted_through_clones() {
        let metrics = ProxyMetrics::new().unwrap();
        let clone = metrics.clone();
        metrics.lookup("found");
        clone.lookup("found");
        clone.lookup("something_new");
        let text = metrics.render(&[]);
        assert!(
            text.contains(r#"proxy_session_lookups_total{outcome="found"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"proxy_session_lookups_total{outcome="something_new"} 1"#),
            "{text}"
        );
        assert!(!text.contains("missing"), "{text}");
    }
}
