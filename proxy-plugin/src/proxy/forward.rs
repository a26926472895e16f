//! One request's way through the proxy: size checks, the request filters (session lookup),
//! the body plan, the backend choice and the retries.

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version, header};
use http_body_util::BodyExt as _;
use hyper::body::{Body as _, Incoming};
use tokio::time::Instant;

use super::body::{
    BodyLimits, ClientBody, Download, InFlight, ResponseBody, Upload, UploadFault, UploadSlot,
    UploadState, UpstreamBody,
};
use super::conn::ConnState;
use super::tunnel::UpgradeRequest;
use super::upstream::{Pool, Pooled, SendError};
use super::{Generation, Proxy, headers};
use crate::backend::Backend;
use crate::balance::RequestInfo;
use crate::config::Limits;
use crate::filter::{self, FilterContext, HeldUntilResponseEnd, Peer, Reject, ResponseFilter};
use crate::metrics::{ClientTimeouts, RejectReason, UpgradeOutcome};

/// What [`Proxy::send`] sends, besides the request head.
struct Exchange {
    /// The request body.
    plan: BodyPlan,
    /// The real client address, for the balancer.
    client_ip: IpAddr,
    /// The protocol switch the request asks for (WebSocket), if any.
    upgrade: Option<UpgradeRequest>,
}

/// How a request body is sent to backends.
enum BodyPlan {
    /// Empty, or small with a known length: kept in memory, so any try can resend it.
    Buffered(Bytes),
    /// Large or of unknown length: streamed; resendable only while no try has started it.
    Streamed(Arc<UploadSlot>),
}

/// Why one try at a backend failed.
#[derive(Debug)]
enum Failure {
    /// The connection could not be made: nothing reached the backend.
    Connect(String),
    /// No response head within `response_timeout`.
    Timeout,
    /// The exchange failed after the request may have reached the backend.
    Upstream(String),
}

impl From<SendError> for Failure {
    fn from(error: SendError) -> Self {
        match error {
            SendError::Connect(text) => Failure::Connect(text),
            SendError::Exchange(text) => Failure::Upstream(text),
        }
    }
}

impl Failure {
    fn reason(&self) -> RejectReason {
        match self {
            Failure::Connect(_) | Failure::Upstream(_) => RejectReason::BadGateway,
            Failure::Timeout => RejectReason::GatewayTimeout,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Connect(e) => write!(f, "connect failed: {e}"),
            Failure::Timeout => f.write_str("no response head within response_timeout"),
            Failure::Upstream(e) => write!(f, "upstream failed: {e}"),
        }
    }
}

/// Methods whose repetition has the effect of one request (RFC 9110 §9.2.2).
fn is_idempotent(method: &Method) -> bool {
    [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::PUT,
        Method::DELETE,
        Method::TRACE,
    ]
    .contains(method)
}

impl Proxy {
    /// The service of every client request.
    pub(crate) async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
        peer: Arc<Peer>,
        conn: Arc<ConnState>,
        over_limit: bool,
    ) -> Result<Response<ClientBody>, Infallible> {
        let guard = conn.request_started(request.version() == Version::HTTP_2);
        let (parts, body) = request.into_parts();
        let mut response = if over_limit {
            self.reject(
                RejectReason::TooManyConnections,
                &parts,
                "over max_connections",
                true,
            )
        } else {
            let generation = self.current();
            self.forward(&generation, parts, body, peer, &conn).await
        };
        // What the response filters keep to the end of the body (a client's request slot).
        let held = response.extensions_mut().remove::<HeldUntilResponseEnd>();
        Ok(response.map(|body| ClientBody::new(body, guard).holding(held)))
    }

    async fn forward(
        &self,
        generation: &Generation,
        mut parts: Parts,
        body: Incoming,
        peer: Arc<Peer>,
        conn: &ConnState,
    ) -> Response<ResponseBody> {
        let limits = &generation.config.limits;
        if headers::head_size(&parts) > limits.max_header_bytes {
            conn.set_linger();
            let detail = "request head over max_header_bytes";
            return self.reject(RejectReason::HeaderTooLarge, &parts, detail, true);
        }
        // Its `Connection: upgrade` and `Upgrade` are put back on the backend's request.
        let upgrade = UpgradeRequest::take(&mut parts);
        headers::strip_hop_by_hop(&mut parts.headers);
        // Read before the filters rewrite the forwarding headers.
        let ctx = FilterContext::new(peer, &parts, &generation.config.trusted_proxies);
        let hooks = match filter::run(&generation.filters, &mut parts, &ctx).await {
            Ok(hooks) => hooks,
            Err(reject) => {
                if reject.close_connection {
                    conn.set_linger();
                }
                return self.refuse(reject, &parts, "request filter");
            }
        };
        let timeouts = self.metrics.client_timeout_counters();
        let plan = match plan_body(limits, body, timeouts).await {
            Ok(plan) => plan,
            Err(reason) => {
                conn.set_linger();
                return self.reject(reason, &parts, "request body", true);
            }
        };
        let exchange = Exchange {
            plan,
            client_ip: ctx.client_ip(),
            upgrade,
        };
        self.send(generation, parts, exchange, conn, hooks).await
    }

    /// Tries backends until one answers, as far as retrying is safe and `max_tries` allows;
    /// `hooks` run on the response head of the backend that answers. An upgrade request goes
    /// to another backend only when nothing reached the first.
    async fn send(
        &self,
        generation: &Generation,
        mut parts: Parts,
        exchange: Exchange,
        conn: &ConnState,
        hooks: Vec<Box<dyn ResponseFilter>>,
    ) -> Response<ResponseBody> {
        let Exchange {
            plan,
            client_ip,
            mut upgrade,
        } = exchange;
        let limits = &generation.config.limits;
        let health = &generation.config.health;
        let idempotent = is_idempotent(&parts.method) && upgrade.is_none();
        let max_tries = limits.max_tries.max(1);
        let mut tried = Tried::default();
        let mut last: Option<Failure> = None;
        for attempt in 1..=max_tries {
            let usable = |b: &Backend| b.is_usable() && !tried.contains(b.index);
            let info = RequestInfo {
                client_ip,
                uri: &parts.uri,
                headers: &parts.headers,
            };
            let picked = generation
                .balancer
                .pick(&info, &generation.backends, &usable)
                .and_then(|i| generation.backends.get(i).cloned());
            let Some(backend) = picked else { break };
            tried.push(backend.index);
            let Some(pool) = generation.pools.get(backend.index) else {
                break;
            };
            let body = match &plan {
                BodyPlan::Buffered(bytes) => UpstreamBody::full(bytes.clone()),
                BodyPlan::Streamed(slot) => slot.body(),
            };
            // The headers are needed again only for another try, or by a balancer that looks
            // at the request when the response comes; otherwise they are moved, not copied.
            let retry_possible = attempt < max_tries
                && generation
                    .backends
                    .iter()
                    .any(|b| b.is_usable() && !tried.contains(b.index));
            let headers = if retry_possible || generation.balancer.reads_request_on_response() {
                parts.headers.clone()
            } else {
                std::mem::take(&mut parts.headers)
            };
            let mut request = upstream_request(&parts, headers, pool, body);
            if let Some(upgrade) = &upgrade {
                upgrade.restore(request.headers_mut());
            }
            let in_flight = InFlight::start(backend.clone());
            let started = Instant::now();
            // An HTTP/2 client's response may stall on its flow control: its connection gets
            // a task of its own, which the connection's send watch can end.
            let detached = parts.version == Version::HTTP_2;
            let exchange = pool.send(request, upgrade.is_some(), detached);
            let upload = match &plan {
                BodyPlan::Buffered(_) => None,
                BodyPlan::Streamed(slot) => Some(slot.state()),
            };
            let timeout = limits.response_timeout;
            let failure = match on_backend_time(exchange, timeout, started, upload, conn).await {
                Ok(Ok((response, upstream))) => {
                    if upgrade.is_none() && response.status() == StatusCode::SWITCHING_PROTOCOLS {
                        // hyper would send it and close: a backend's error, not to relay.
                        let detail = "101 Switching Protocols to a request asking for no upgrade";
                        return self.reject(RejectReason::BadGateway, &parts, detail, false);
                    }
                    let info = RequestInfo {
                        client_ip,
                        uri: &parts.uri,
                        headers: &parts.headers,
                    };
                    let relay = Relay {
                        generation,
                        info: &info,
                        backend: &backend,
                        hooks,
                        upgrade: upgrade.take(),
                        conn,
                    };
                    return relay.response(self, response, upstream, in_flight, started);
                }
                Ok(Err(error)) => Failure::from(error),
                Err(timeout) => timeout,
            };
            drop(in_flight);
            if let BodyPlan::Streamed(slot) = &plan {
                if let Some(fault) = slot.state().fault() {
                    // The client's fault, not the backend's.
                    conn.set_linger();
                    return self.reject(fault_reason(fault), &parts, "streamed request body", true);
                }
                if slot.state().backend_since().is_none() {
                    // The backend gave up on a body still arriving (its own body timeout,
                    // most likely): a slow client's doing, not held against the backend.
                    tracing::warn!(backend = %backend.name, method = %parts.method,
                        path = parts.uri.path(), error = %failure,
                        "upstream request failed while the client's body was still arriving");
                    conn.set_linger();
                    return self.reject(failure.reason(), &parts, &failure.to_string(), true);
                }
            }
            if backend.report_failure(health.max_fails, health.fail_timeout) {
                tracing::warn!(backend = %backend.name, max_fails = health.max_fails,
                    fail_timeout = ?health.fail_timeout, "backend marked down (passive)");
            }
            let replayable = match &plan {
                BodyPlan::Buffered(_) => true,
                BodyPlan::Streamed(slot) => slot.unsent(),
            };
            let connect = matches!(failure, Failure::Connect(_));
            let retry = replayable && (connect || idempotent);
            tracing::warn!(backend = %backend.name, method = %parts.method, path = parts.uri.path(),
                error = %failure, retry, "upstream request failed");
            last = Some(failure);
            if !retry {
                break;
            }
            self.metrics.retry(&backend.name);
        }
        match last {
            None => self.reject(RejectReason::NoBackend, &parts, "no usable backend", false),
            Some(failure) => self.reject(failure.reason(), &parts, &failure.to_string(), false),
        }
    }

    /// A response of the proxy's own, logged and counted.
    pub(crate) fn reject(
        &self,
        reason: RejectReason,
        parts: &Parts,
        detail: &str,
        close: bool,
    ) -> Response<ResponseBody> {
        let mut reject = Reject::from(reason);
        reject.close_connection = close;
        self.refuse(reject, parts, detail)
    }
}

/// A plain-text response of the proxy's own.
pub(crate) fn local_response(status: StatusCode, close: bool) -> Response<ResponseBody> {
    let text = format!(
        "{} {}\n",
        status.as_str(),
        status.canonical_reason().unwrap_or("")
    );
    let mut response = Response::new(ResponseBody::full(text));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if close {
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// The status a client whose body went wrong gets.
fn fault_reason(fault: UploadFault) -> RejectReason {
    match fault {
        UploadFault::TooLarge => RejectReason::BodyTooLarge,
        UploadFault::Stalled | UploadFault::TooSlow => RejectReason::ClientTimeout,
        UploadFault::Aborted => RejectReason::ClientAborted,
    }
}

/// Decides how the body goes to backends: refused when its announced length is over
/// `max_body_bytes`, buffered when it is at most `retry_buffer_bytes`, else streamed; either
/// way timed by `body_read_timeout` and `min_upload_rate` (see [`Upload`]).
async fn plan_body(
    limits: &Limits,
    body: Incoming,
    timeouts: ClientTimeouts,
) -> Result<BodyPlan, RejectReason> {
    if body.is_end_stream() {
        return Ok(BodyPlan::Buffered(Bytes::new()));
    }
    let upload = Upload::new(body, BodyLimits::new(limits), timeouts);
    if let Some(length) = upload.size_hint().exact() {
        if length > limits.max_body_bytes {
            return Err(RejectReason::BodyTooLarge);
        }
        if length <= limits.retry_buffer_bytes as u64 {
            let state = upload.state().clone();
            // Boxed, so that requests without a body do not carry (and move) this future.
            let read = Box::pin(upload.collect());
            return match read.await {
                Ok(collected) => Ok(BodyPlan::Buffered(collected.to_bytes())),
                Err(_) => Err(fault_reason(state.fault().unwrap_or(UploadFault::Aborted))),
            };
        }
    }
    Ok(BodyPlan::Streamed(UploadSlot::new(upload)))
}

/// Runs `exchange` (a request to a backend, until its response head) for at most
/// `response_timeout` of the backend's time: from `started` with a body in memory; with a
/// streamed `upload`, from the client's last piece of body, the clock stopped while the proxy
/// waits for the next (that is the client's time, bounded by `body_read_timeout`). `Err` when
/// the backend took too long. The timer is `conn`'s, reset (see [`ConnState::response_timer`]).
async fn on_backend_time<F: Future>(
    exchange: F,
    response_timeout: std::time::Duration,
    started: Instant,
    upload: Option<&UploadState>,
    conn: &ConnState,
) -> Result<F::Output, Failure> {
    let mut exchange = std::pin::pin!(exchange);
    let mut check = started + response_timeout;
    let mut timer = conn.response_timer(check);
    let mut sleep = timer.sleep();
    loop {
        tokio::select! {
            biased;
            output = &mut exchange => return Ok(output),
            () = &mut sleep => {}
        }
        let Some(upload) = upload else {
            return Err(Failure::Timeout);
        };
        let now = Instant::now();
        check = match upload.backend_since() {
            // The client's turn: look again later.
            None => now + response_timeout,
            Some(since) => {
                let due = since.max(started) + response_timeout;
                if now >= due {
                    return Err(Failure::Timeout);
                }
                due
            }
        };
        sleep.as_mut().reset(check);
    }
}

/// The request for one backend: origin-form target (authority-form for `CONNECT`), HTTP/1.1,
/// the rewritten `headers`, and a `Host` (the backend's) when the client sent none.
fn upstream_request(
    parts: &Parts,
    headers: HeaderMap,
    pool: &Pool,
    body: UpstreamBody,
) -> Request<UpstreamBody> {
    let mut request = Request::new(body);
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = origin_form(&parts.method, &parts.uri, pool);
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = headers;
    let headers = request.headers_mut();
    if !headers.contains_key(header::HOST)
        && let Some(host) = pool.host()
    {
        headers.insert(header::HOST, host.clone());
    }
    request
}

/// The request target a backend gets: the client's path and query (`/` when it has none).
fn origin_form(method: &Method, uri: &Uri, pool: &Pool) -> Uri {
    if method == Method::CONNECT {
        return Uri::from(pool.authority().clone());
    }
    match uri.path_and_query() {
        // Already origin-form (every HTTP/1 request but absolute-form ones): reuse it.
        Some(_) if uri.scheme().is_none() && uri.authority().is_none() => uri.clone(),
        Some(path) if path.as_str() != "/" => Uri::from(path.clone()),
        _ => Uri::from_static("/"),
    }
}

/// The backends a request has tried, by index: the first few inline, so that a request
/// allocates nothing for it.
#[derive(Debug, Default)]
struct Tried {
    /// The first tries.
    inline: [usize; 4],
    /// How many of `inline` are used.
    len: usize,
    /// Tries past the first four (`max_tries` above 4).
    more: Vec<usize>,
}

impl Tried {
    fn push(&mut self, index: usize) {
        match self.inline.get_mut(self.len) {
            Some(slot) => {
                *slot = index;
                self.len += 1;
            }
            None => self.more.push(index),
        }
    }

    fn contains(&self, index: usize) -> bool {
        self.inline[..self.len].contains(&index) || self.more.contains(&index)
    }
}

/// What relaying a backend's response needs.
struct Relay<'a> {
    /// The config generation the request runs under.
    generation: &'a Generation,
    /// What the balancer saw.
    info: &'a RequestInfo<'a>,
    /// The backend that answered.
    backend: &'a Arc<Backend>,
    /// The request filters' response hooks, in filter order.
    hooks: Vec<Box<dyn ResponseFilter>>,
    /// The request's upgrade, when it asked for one.
    upgrade: Option<UpgradeRequest>,
    /// The client connection, handed to a tunnel after a 101.
    conn: &'a ConnState,
}

impl Relay<'_> {
    fn response(
        self,
        proxy: &Proxy,
        response: Response<Incoming>,
        upstream: Pooled,
        in_flight: InFlight,
        started: Instant,
    ) -> Response<ResponseBody> {
        let latency = started.elapsed();
        let (mut parts, body) = response.into_parts();
        let switched = match self.upgrade {
            Some(upgrade) if parts.status == StatusCode::SWITCHING_PROTOCOLS => {
                Some(upgrade.switched(&mut parts))
            }
            Some(_) => {
                proxy.metrics.tunnels().upgrade(UpgradeOutcome::Refused);
                None
            }
            None => None,
        };
        headers::strip_hop_by_hop(&mut parts.headers);
        if let Some(switched) = &switched {
            switched.restore(&mut parts.headers);
        }
        self.generation
            .balancer
            .on_response(self.info, self.backend, &mut parts.headers);
        for hook in self.hooks {
            hook.response_filter(&mut parts);
        }
        match self.generation.backend_metrics.get(self.backend.index) {
            Some(metrics) => metrics.observe_response(parts.status, latency),
            None => {
                proxy
                    .metrics
                    .observe_response(&self.backend.name, parts.status.as_u16(), latency)
            }
        }
        tracing::debug!(backend = %self.backend.name, status = parts.status.as_u16(), ?latency,
            "relaying response");
        parts.version = Version::HTTP_11;
        if let Some(switched) = switched {
            // Both connections are the tunnel's once the 101 is written: never pooled.
            drop((body, upstream));
            let limits = &self.generation.config.limits;
            let metrics = proxy.metrics.tunnels().clone();
            // What the response filters hold to the end of the response (the client's slot
            // among its requests in flight) is held to the end of the tunnel: the 101's empty
            // body would release it at once.
            let held = parts.extensions.remove::<HeldUntilResponseEnd>();
            let tunnel = switched.tunnel(
                limits.idle_timeout,
                metrics,
                self.backend.clone(),
                (in_flight, held),
            );
            self.conn.start_tunnel(tunnel);
            return Response::from_parts(parts, ResponseBody::full(Bytes::new()));
        }
        let timeout = self.generation.config.limits.response_timeout;
        let body = Download::new(body, timeout, in_flight, upstream);
        Response::from_parts(parts, ResponseBody::Download(body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tried_backends_are_remembered_past_the_inline_ones() {
        let mut tried = Tried::default();
        for index in [7, 3, 9, 1, 4, 8] {
            assert!(!tried.contains(index));
            tried.push(index);
            assert!(tried.contains(index));
        }
        assert!(!tried.contains(0) && !tried.contains(5));
    }

    #[test]
    fn idempotent_methods_are_the_rfc_ones() {
        for m in [
            Method::GET,
            Method::HEAD,
            Method::PUT,
            Method::DELETE,
            Method::OPTIONS,
            Method::TRACE,
        ] {
            assert!(is_idempotent(&m), "{m}");
        }
        for m in [Method::POST, Method::PATCH, Method::CONNECT] {
            assert!(!is_idempotent(&m), "{m}");
        }
    }
}
