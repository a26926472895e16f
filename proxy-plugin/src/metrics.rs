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
    /// 503 with `Retry-After: 1`: the session store did not answer in time although it
    /// answered within the outage grace (a slow store, not a lost one), and the lookup plugin
    /// fails closed.
    LookupTimedOut,
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
            | RejectReason::LookupFailed
            | RejectReason::LookupTimedOut => S::SERVICE_UNAVAILABLE,
            RejectReason::GatewayTimeout => S::GATEWAY_TIMEOUT,
            RejectReason::ClientAborted => S::BAD_REQUEST,
        }
    }

    /// Seconds sent in `Retry-After`, for a refusal the client should simply try again soon.
    pub fn retry_after(self) -> Option<u32> {
        match self {
            RejectReason::LookupTimedOut => Some(1),
            _ => None,
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
            RejectReason::LookupTimedOut => "lookup_timeout",
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
            lookup_outcomes: Arc::default(),
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
        match LOOKUP_OUTCOMES.iter().position(|o| *o == outcome) {
            Some(i) => self.lookup_outcomes[i]
                .get_or_init(|| self.lookups.with_label_values(&[outcome]))
                .inc(),
            None => self.lookups.with_label_values(&[outcome]).inc(),
        }
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
