//! Prometheus metrics: calls by method and code, call latency, store errors, Restore outcomes,
//! live sessions, open and refused connections, open and refused Watch streams, sessions the
//! per-user session cap evicted or refused, whether the store answered the last health
//! check, and what the Redis near cache did.
//!
//! Served as text on `GET /metrics` of their own listener (`--metrics-listen`, off by default),
//! so scraping never competes with gRPC traffic for the same port or auth.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};
use tokio::net::TcpListener;

use crate::store::SessionStore;

/// The API's methods, as the service names them when it records a call.
pub(crate) const METHODS: [&str; 10] = [
    "Create",
    "Get",
    "Update",
    "Touch",
    "Delete",
    "Regenerate",
    "Restore",
    "ListByUser",
    "DeleteByUser",
    "Watch",
];

/// What a Restore can do, as `stickless_restores_total` labels it: the offline changes
/// `applied`, the session returned `unchanged`, `recreated` in a store of another epoch,
/// `refused` (FAILED_PRECONDITION: deleted or expired) or a `conflict` (ABORTED: the store
/// wins). A Restore that failed otherwise (store down, bad input) is in the call counts only.
pub const RESTORE_OUTCOMES: [&str; 6] = [
    "applied",
    "unchanged",
    "recreated",
    "rebased",
    "refused",
    "conflict",
];

/// What the session cap did (`stickless_session_cap_total{action}`): a session `evicted` to make
/// room for a user's new one, or a new one `refused` (see [`crate::store::cap`]).
pub const SESSION_CAP_ACTIONS: [&str; 2] = ["evicted", "refused"];

/// What a touch (Touch, Get with touch) did (`stickless_touches_total{outcome}`): `written`
/// to the store, or `skipped` because it would have moved the expiry by less than
/// `--touch-granularity`.
pub const TOUCH_OUTCOMES: [&str; 2] = ["written", "skipped"];

/// What the Redis near cache did with a plain read (`stickless_near_cache_total{outcome}`):
/// answered it (`hit`), read Redis and kept the answer if it could (`miss`), or read Redis
/// because its invalidation feed was down (`bypass`). Brought up to the store's counts
/// ([`SessionStore::near_cache_stats`]) at each rendering; absent without a near cache.
pub const NEAR_CACHE_OUTCOMES: [&str; 3] = ["hit", "miss", "bypass"];

/// A method's series resolved once: the label lookup (hashing the label values under a lock)
/// is then off the path of every successful call.
#[derive(Debug, Clone)]
struct MethodSeries {
    /// The method.
    method: &'static str,
    /// Its `calls{method, code="OK"}` counter.
    ok: IntCounter,
    /// Its `latency{method}` histogram.
    latency: Histogram,
}

/// The server's metrics and the registry that renders them.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Everything below, for rendering.
    registry: Registry,
    /// `stickless_grpc_calls_total{method, code}`.
    calls: IntCounterVec,
    /// `stickless_grpc_call_seconds{method}`.
    latency: HistogramVec,
    /// `stickless_store_errors_total{store, kind}`: failures of the backing store.
    store_errors: IntCounterVec,
    /// `stickless_restores_total{outcome}`: what Restore calls did (see [`RESTORE_OUTCOMES`]).
    restores: IntCounterVec,
    /// `stickless_sessions_live`: sessions held (memory store; absent elsewhere).
    sessions_live: IntGauge,
    /// `stickless_session_cap_total{action}` (see [`SESSION_CAP_ACTIONS`]). `refused` is
    /// counted by the service as it answers; `evicted` is brought up to the store's own count
    /// ([`SessionStore::session_cap_evictions`]) at each rendering.
    session_cap: IntCounterVec,
    /// `stickless_touches_total{outcome}` (see [`TOUCH_OUTCOMES`]).
    touches: IntCounterVec,
    /// Held while `evicted` is brought up to the store's count, so that two scrapes at once
    /// never add the same evictions twice.
    cap_sync: Arc<parking_lot::Mutex<()>>,
    /// `stickless_connections_open`: client connections held, TLS handshakes under way included.
    connections_open: IntGauge,
    /// `stickless_connections_refused_total`: connections closed at once, over
    /// `--max-connections`.
    connections_refused: IntCounter,
    /// `stickless_watchers`: Watch streams open, all namespaces.
    watchers: IntGauge,
    /// `stickless_watchers_refused_total`: Watch calls refused over
    /// `--max-watchers-per-namespace` or `--max-watchers`.
    watchers_refused: IntCounter,
    /// `stickless_store_up`: 1 when the store answered the health service's last check, 0
    /// when it did not (see `health.rs`).
    store_up: IntGauge,
    /// `stickless_near_cache_total{outcome}` (see [`NEAR_CACHE_OUTCOMES`]).
    near_cache: IntCounterVec,
    /// `stickless_near_cache_invalidations_total`: cached sessions dropped because they were
    /// written, expired or flushed, or the invalidation feed was lost.
    near_cache_invalidations: IntCounter,
    /// The series of every method in [`METHODS`].
    methods: Arc<[MethodSeries]>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Fresh metrics in a registry of their own (tests may make many).
    pub fn new() -> Self {
        let registry = Registry::new();
        let calls = IntCounterVec::new(
            Opts::new(
                "stickless_grpc_calls_total",
                "gRPC calls by method and status code",
            ),
            &["method", "code"],
        )
        .expect("valid metric");
        // Buckets from 50µs (memory store hits) to 5s (past the default store timeout).
        let buckets = vec![
            0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
            0.5, 1.0, 2.5, 5.0,
        ];
        let latency = HistogramVec::new(
            HistogramOpts::new("stickless_grpc_call_seconds", "gRPC call latency").buckets(buckets),
            &["method"],
        )
        .expect("valid metric");
        let store_errors = IntCounterVec::new(
            Opts::new(
                "stickless_store_errors_total",
                "Session store failures (unavailable, timeout, internal)",
            ),
            &["store", "kind"],
        )
        .expect("valid metric");
        let restores = IntCounterVec::new(
            Opts::new(
                "stickless_restores_total",
                "Restore calls by outcome (applied, unchanged, recreated, refused, conflict)",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        for outcome in RESTORE_OUTCOMES {
            // Every outcome shows from the start, at zero.
            restores.with_label_values(&[outcome]);
        }
        let session_cap = IntCounterVec::new(
            Opts::new(
                "stickless_session_cap_total",
                "Sessions evicted, and sessions refused, to keep users under \
                 --max-sessions-per-user",
            ),
            &["action"],
        )
        .expect("valid metric");
        for action in SESSION_CAP_ACTIONS {
            session_cap.with_label_values(&[action]);
        }
        let touches = IntCounterVec::new(
            Opts::new(
                "stickless_touches_total",
                "Touches (Touch, Get with touch) written to the store, and skipped as inside \
                 --touch-granularity",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        for outcome in TOUCH_OUTCOMES {
            touches.with_label_values(&[outcome]);
        }
        let sessions_live = IntGauge::new(
            "stickless_sessions_live",
            "Sessions held by the memory store",
        )
        .expect("valid metric");
        let connections_open = IntGauge::new(
            "stickless_connections_open",
            "Client connections open, TLS handshakes under way included",
        )
        .expect("valid metric");
        let connections_refused = IntCounter::new(
            "stickless_connections_refused_total",
            "Client connections closed at once because --max-connections were open",
        )
        .expect("valid metric");
        let watchers =
            IntGauge::new("stickless_watchers", "Watch streams open").expect("valid metric");
        let watchers_refused = IntCounter::new(
            "stickless_watchers_refused_total",
            "Watch calls refused because their namespace had --max-watchers-per-namespace open, or the \
             server --max-watchers",
        )
        .expect("valid metric");
        let store_up = IntGauge::new(
            "stickless_store_up",
            "1 when the session store answered the last health check (every --health-interval), \
             else 0",
        )
        .expect("valid metric");
        let near_cache = IntCounterVec::new(
            Opts::new(
                "stickless_near_cache_total",
                "Plain reads of the Redis near cache (--cache-capacity) by outcome: hit, miss, \
                 bypass (invalidation feed down)",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        for outcome in NEAR_CACHE_OUTCOMES {
            near_cache.with_label_values(&[outcome]);
        }
        let near_cache_invalidations = IntCounter::new(
            "stickless_near_cache_invalidations_total",
            "Sessions dropped from the Redis near cache: written, expired or flushed, or the \
             invalidation feed was lost",
        )
        .expect("valid metric");
        for metric in [
            Box::new(calls.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(latency.clone()),
            Box::new(store_errors.clone()),
            Box::new(restores.clone()),
            Box::new(sessions_live.clone()),
            Box::new(session_cap.clone()),
            Box::new(touches.clone()),
            Box::new(connections_open.clone()),
            Box::new(connections_refused.clone()),
            Box::new(watchers.clone()),
            Box::new(watchers_refused.clone()),
            Box::new(store_up.clone()),
            Box::new(near_cache.clone()),
            Box::new(near_cache_invalidations.clone()),
        ] {
            registry.register(metric).expect("metric names are unique");
        }
        let methods = METHODS
            .iter()
            .map(|&method| MethodSeries {
                method,
                ok: calls.with_label_values(&[method, code_name(tonic::Code::Ok)]),
                latency: latency.with_label_values(&[method]),
            })
            .collect();
        Self {
            methods,
            registry,
            calls,
            latency,
            store_errors,
            restores,
            sessions_live,
            session_cap,
            touches,
            cap_sync: Arc::default(),
            connections_open,
            connections_refused,
            watchers,
            watchers_refused,
            store_up,
            near_cache,
            near_cache_invalidations,
        }
    }

    /// How many plain reads the near cache counted with `outcome` (see
    /// [`NEAR_CACHE_OUTCOMES`]), as of the last rendering.
    pub fn near_cache(&self, outcome: &str) -> u64 {
        self.near_cache.with_label_values(&[outcome]).get()
    }

    /// Records one finished call.
    pub fn observe_call(&self, method: &str, code: tonic::Code, elapsed: Duration) {
        let series = self.methods.iter().find(|s| s.method == method);
        match series {
            Some(series) if code == tonic::Code::Ok => series.ok.inc(),
            _ => self
                .calls
                .with_label_values(&[method, code_name(code)])
                .inc(),
        }
        let seconds = elapsed.as_secs_f64();
        match series {
            Some(series) => series.latency.observe(seconds),
            None => self.latency.with_label_values(&[method]).observe(seconds),
        }
    }

    /// Records one store failure of the given kind ("unavailable", "timeout", "internal").
    pub fn store_error(&self, store: &str, kind: &str) {
        self.store_errors.with_label_values(&[store, kind]).inc();
    }

    /// Records one Restore's outcome (one of [`RESTORE_OUTCOMES`]).
    pub fn restore(&self, outcome: &str) {
        self.restores.with_label_values(&[outcome]).inc();
    }

    /// Records one touch's outcome (one of [`TOUCH_OUTCOMES`]).
    pub fn touch(&self, outcome: &str) {
        self.touches.with_label_values(&[outcome]).inc();
    }

    /// How many touches had `outcome` (see [`TOUCH_OUTCOMES`]).
    pub fn touches(&self, outcome: &str) -> u64 {
        self.touches.with_label_values(&[outcome]).get()
    }

    /// Records one action of the session cap (one of [`SESSION_CAP_ACTIONS`]).
    pub fn session_cap(&self, action: &str) {
        self.session_cap.with_label_values(&[action]).inc();
    }

    /// How many times the session cap took `action` so far (`evicted`: as of the last
    /// rendering, see [`Self::render`]).
    pub fn session_caps(&self, action: &str) -> u64 {
        self.session_cap.with_label_values(&[action]).get()
    }

    /// How many Restore calls had `outcome` so far.
    pub fn restores(&self, outcome: &str) -> u64 {
        self.restores.with_label_values(&[outcome]).get()
    }

    /// The gauge of open client connections (a connection's permit moves it).
    pub(crate) fn connections_open_gauge(&self) -> &IntGauge {
        &self.connections_open
    }

    /// Records one connection closed at once over the connection limit.
    pub(crate) fn connection_refused(&self) {
        self.connections_refused.inc();
    }

    /// The gauge of open Watch streams (each stream's guard moves it).
    pub(crate) fn watchers_gauge(&self) -> &IntGauge {
        &self.watchers
    }

    /// Records one Watch refused over the per-namespace limit.
    pub(crate) fn watcher_refused(&self) {
        self.watchers_refused.inc();
    }

    /// Records whether the store answered the health service's last check.
    pub(crate) fn set_store_up(&self, up: bool) {
        self.store_up.set(i64::from(up));
    }

    /// Whether the store answered the health service's last check (1) or not (0).
    pub fn store_up(&self) -> i64 {
        self.store_up.get()
    }

    /// Client connections open now, TLS handshakes under way included.
    pub fn connections_open(&self) -> i64 {
        self.connections_open.get()
    }

    /// Client connections closed at once over the limit so far.
    pub fn connections_refused(&self) -> u64 {
        self.connections_refused.get()
    }

    /// Watch streams open now.
    pub fn watchers(&self) -> i64 {
        self.watchers.get()
    }

    /// Watch calls refused over the per-namespace limit so far.
    pub fn watchers_refused(&self) -> u64 {
        self.watchers_refused.get()
    }

    /// How many calls of `method` ended with `code` so far.
    pub fn calls(&self, method: &str, code: tonic::Code) -> u64 {
        self.calls
            .with_label_values(&[method, code_name(code)])
            .get()
    }

    /// The Prometheus text exposition of every metric, with the live-session gauge and the
    /// store's cap evictions refreshed.
    pub fn render(&self, store: &dyn SessionStore) -> String {
        {
            let _sync = self.cap_sync.lock();
            let evicted = self.session_cap.with_label_values(&["evicted"]);
            let behind = store.session_cap_evictions().saturating_sub(evicted.get());
            evicted.inc_by(behind);
            if let Some(near) = store.near_cache_stats() {
                for (outcome, count) in [
                    ("hit", near.hits),
                    ("miss", near.misses),
                    ("bypass", near.bypasses),
                ] {
                    let counter = self.near_cache.with_label_values(&[outcome]);
                    counter.inc_by(count.saturating_sub(counter.get()));
                }
                let dropped = &self.near_cache_invalidations;
                dropped.inc_by(near.invalidations.saturating_sub(dropped.get()));
            }
        }
        if let Some(live) = store.live_sessions() {
            self.sessions_live
                .set(i64::try_from(live).unwrap_or(i64::MAX));
        }
        let mut families = self.registry.gather();
        if store.live_sessions().is_none() {
            families.retain(|f| f.name() != "stickless_sessions_live");
        }
        if store.near_cache_stats().is_none() {
            families.retain(|f| !f.name().starts_with("stickless_near_cache"));
        }
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed families.
        let _ = TextEncoder::new().encode(&families, &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// The canonical upper-snake name of a gRPC code, as other gRPC servers label it.
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    metrics: Metrics,
    store: Arc<dyn SessionStore>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    async fn scrape(
        State((metrics, store)): State<(Metrics, Arc<dyn SessionStore>)>,
    ) -> impl IntoResponse {
        (
            [(CONTENT_TYPE, "text/plain; version=0.0.4")],
            metrics.render(store.as_ref()),
        )
    }
    let app = Router::new()
        .route("/metrics", get(scrape))
        .with_state((metrics, store));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
