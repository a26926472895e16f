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
    ClientBody, Download, InFlight, ResponseBody, UploadFault, UploadSlot, UpstreamBody,
};
use super::conn::ConnState;
use super::headers::PeerHeaders;
use super::upstream::{Pool, Pooled, SendError};
use super::{Generation, Proxy, ResponseFilter, headers};
use crate::backend::Backend;
use crate::balance::RequestInfo;
use crate::client_ip;
use crate::config::Limits;
use crate::metrics::RejectReason;

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
        peer: Arc<PeerHeaders>,
        conn: Arc<ConnState>,
        over_limit: bool,
    ) -> Result<Response<ClientBody>, Infallible> {
        conn.head_received(request.version() == Version::HTTP_2);
        let (parts, body) = request.into_parts();
        let response = if over_limit {
            self.reject(
                RejectReason::TooManyConnections,
                &parts,
                "over max_connections",
                true,
            )
        } else {
            let generation = self.current();
            self.forward(&generation, parts, body, &peer, &conn).await
        };
        Ok(response.map(|body| ClientBody::new(body, conn)))
    }

    async fn forward(
        &self,
        generation: &Generation,
        mut parts: Parts,
        body: Incoming,
        peer: &PeerHeaders,
        conn: &ConnState,
    ) -> Response<ResponseBody> {
        let limits = &generation.config.limits;
        let client_ip = client_ip::resolve(
            peer.ip(),
            &parts.headers,
            &generation.config.trusted_proxies,
        );
        if headers::head_size(&parts) > limits.max_header_bytes {
            conn.set_linger();
            let detail = "request head over max_header_bytes";
            return self.reject(RejectReason::HeaderTooLarge, &parts, detail, true);
        }
        headers::strip_hop_by_hop(&mut parts.headers);
        // Before the filters, so that they see how the client connected (the snapshot
        // cookie is `Secure` over TLS), as the balancer does.
        let host = headers::request_host(&parts);
        if !parts.headers.contains_key(header::HOST)
            && let Some(value) = &host
        {
            parts.headers.insert(header::HOST, value.clone());
        }
        let trusted = client_ip::is_trusted(peer.ip(), &generation.config.trusted_proxies);
        headers::add_forwarding(&mut parts.headers, peer, host, trusted);
        let mut hooks = Vec::new();
        for filter in &generation.filters {
            match filter.request_filter(&mut parts).await {
                Ok(hook) => hooks.extend(hook),
                Err(reason) => return self.reject(reason, &parts, "request filter", false),
            }
        }
        let plan = match plan_body(limits, body).await {
            Ok(plan) => plan,
            Err(reason) => {
                conn.set_linger();
                return self.reject(reason, &parts, "request body", true);
            }
        };
        self.send(generation, parts, plan, client_ip, conn, hooks)
            .await
    }

    /// Tries backends until one answers, as far as retrying is safe and `max_tries` allows;
    /// `hooks` run on the response head of the backend that answers.
    async fn send(
        &self,
        generation: &Generation,
        mut parts: Parts,
        plan: BodyPlan,
        client_ip: IpAddr,
        conn: &ConnState,
        hooks: Vec<Box<dyn ResponseFilter>>,
    ) -> Response<ResponseBody> {
        let limits = &generation.config.limits;
        let health = &generation.config.health;
        let idempotent = is_idempotent(&parts.method);
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
            let request = upstream_request(&parts, headers, pool, body);
            let in_flight = InFlight::start(backend.clone());
            let started = Instant::now();
            let exchange = pool.send(request);
            let failure = match tokio::time::timeout(limits.response_timeout, exchange).await {
                Ok(Ok((response, upstream))) => {
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
                    };
                    return relay.response(self, response, upstream, in_flight, started);
                }
                Ok(Err(error)) => Failure::from(error),
                Err(_) => Failure::Timeout,
            };
            drop(in_flight);
            if let BodyPlan::Streamed(slot) = &plan
                && let Some(fault) = slot.fault()
            {
                // The client's fault, not the backend's.
                conn.set_linger();
                let reason = match fault {
                    UploadFault::TooLarge => RejectReason::BodyTooLarge,
                    UploadFault::Stalled => RejectReason::ClientTimeout,
                    UploadFault::Aborted => RejectReason::ClientAborted,
                };
                return self.reject(reason, &parts, "streamed request body", true);
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
        let status = reason.status();
        tracing::warn!(status = status.as_u16(), reason = reason.label(), method = %parts.method,
            path = parts.uri.path(), detail, "request answered by the proxy");
        self.metrics.reject(reason);
        let mut response = local_response(status, close);
        if let Some(seconds) = reason.retry_after() {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
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

/// Decides how the body goes to backends: refused when its announced length is over
/// `max_body_bytes`, buffered when it is at most `retry_buffer_bytes` (read within
/// `header_read_timeout`), else streamed.
async fn plan_body(limits: &Limits, body: Incoming) -> Result<BodyPlan, RejectReason> {
    if body.is_end_stream() {
        return Ok(BodyPlan::Buffered(Bytes::new()));
    }
    if let Some(length) = body.size_hint().exact() {
        if length > limits.max_body_bytes {
            return Err(RejectReason::BodyTooLarge);
        }
        if length <= limits.retry_buffer_bytes as u64 {
            // Boxed, so that requests without a body do not carry (and move) this future.
            let read = Box::pin(tokio::time::timeout(
                limits.header_read_timeout,
                body.collect(),
            ));
            return match read.await {
                Ok(Ok(collected)) => Ok(BodyPlan::Buffered(collected.to_bytes())),
                Ok(Err(_)) => Err(RejectReason::ClientAborted),
                Err(_) => Err(RejectReason::ClientTimeout),
            };
        }
    }
    let slot = UploadSlot::new(body, limits.max_body_bytes, limits.header_read_timeout);
    Ok(BodyPlan::Streamed(slot))
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
        headers::strip_hop_by_hop(&mut parts.headers);
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
        let timeout = self.generation.config.limits.response_timeout;
        let body = Download::new(body, timeout, in_flight, upstream);
        parts.version = Version::HTTP_11;
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
