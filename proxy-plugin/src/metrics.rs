//! The proxy's Prometheus metrics, in a registry of their own (one per [`crate::proxy::Proxy`],
//! so tests and several proxies in one process never share counters).

use std::time::Duration;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::backend::Backend;

/// Upstream latency buckets in seconds: from a fast local backend to the longest sane timeout.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Why the proxy answered a request itself instead of a backend.
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
    /// 503: the session store was unreachable and the lookup plugin fails closed.
    LookupFailed,
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
            RejectReason::NoBackend
            | RejectReason::TooManyConnections
            | RejectReason::LookupFailed => S::SERVICE_UNAVAILABLE,
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
            RejectReason::LookupFailed => "lookup_failed",
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
    /// Session lookups by outcome (found, missing, failed_open, failed_closed).
    lookups: IntCounterVec,
    /// Whether each current backend is up (1) or down (0), refreshed at render time.
    backend_up: IntGaugeVec,
    /// Requests in flight per current backend, refreshed at render time.
    backend_active: IntGaugeVec,
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
        registry.register(Box::new(backend_up.clone()))?;
        registry.register(Box::new(backend_active.clone()))?;
        Ok(ProxyMetrics {
            registry,
            requests,
            upstream_latency,
            retries,
            rejects,
            active_connections,
            lookups,
            backend_up,
            backend_active,
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

    /// Counts a retry away from `backend`.
    pub fn retry(&self, backend: &str) {
        self.retries.with_label_values(&[backend]).inc();
    }

    /// Counts a request the proxy answered itself.
    pub fn reject(&self, reason: RejectReason) {
        self.rejects
            .with_label_values(&[reason.status().as_str(), reason.label()])
            .inc();
    }

    /// How many rejects of `reason` were counted (tests, admin).
    pub fn rejects(&self, reason: RejectReason) -> u64 {
        self.rejects
            .with_label_values(&[reason.status().as_str(), reason.label()])
            .get()
    }

    /// Counts a session lookup outcome.
    pub fn lookup(&self, outcome: &str) {
        self.lookups.with_label_values(&[outcome]).inc();
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
