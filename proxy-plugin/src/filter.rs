//! The request filters: the proxy's extension point (pingora's `request_filter` and
//! `response_filter` hooks).
//!
//! A [`RequestFilter`] runs on every request, in the order of the proxy's filter list, after
//! the hop-by-hop headers are removed and before a backend is picked. It gets the request head
//! and a [`FilterContext`] (the client's address from the trusted chain, the scheme, the socket
//! peer, the HTTP version), and may rewrite the head, answer the request itself with a
//! [`Reject`] (a synthetic response as data: status, metrics label, whether to close the
//! connection, extra headers), or return a [`ResponseFilter`] holding what it learnt, run on
//! the backend's response head.
//!
//! The list is built for each configuration generation from [`FilterFactory`]s, in order; a
//! factory returns `None` when its filter is off for that configuration. The
//! [`default_filters`]:
//! 1. [`client_limits`]: requests in flight and request rate per client address (nginx
//!    `limit_conn`, `limit_req`), when configured;
//! 2. [`hygiene`]: nginx's default header rules (names with `_`, every `x-session-*`
//!    spelling, `Host`, HTTP/2 cookie crumbs);
//! 3. [`forwarding`]: `X-Forwarded-For`, `Forwarded`, `X-Real-IP`, `X-Forwarded-Proto` and
//!    `X-Forwarded-Host` rebuilt from the trusted chain;
//! 4. the session-lookup plugin ([`crate::lookup`]), when configured: it sets `x-session-*`
//!    after the hygiene filter removed the client's.
//!
//! A new filter is a file under `filter/` and an entry in [`default_filters`] (or in the list
//! given to [`Proxy::with_filters`](crate::proxy::Proxy::with_filters)); the proxy loop does not
//! change.
//!
//! ```
//! use std::sync::Arc;
//!
//! use http::StatusCode;
//! use proxy_plugin::filter::{
//!     FilterContext, FilterFactory, Filtered, Reject, RequestFilter, default_filters,
//! };
//!
//! /// Refuses `TRACE`, as many proxies do.
//! #[derive(Debug)]
//! struct NoTrace;
//!
//! impl RequestFilter for NoTrace {
//!     fn request_filter<'a>(
//!         &'a self,
//!         head: &'a mut http::request::Parts,
//!         _ctx: &'a FilterContext,
//!     ) -> Filtered<'a> {
//!         if head.method == http::Method::TRACE {
//!             return Filtered::reject(Reject::new(StatusCode::METHOD_NOT_ALLOWED, "trace"));
//!         }
//!         Filtered::pass()
//!     }
//! }
//!
//! let mut filters = default_filters();
//! filters.insert(1, FilterFactory::new("no_trace", |_setup| Ok(Some(Arc::new(NoTrace)))));
//! // Proxy::with_filters(config, filters)
//! # assert_eq!(filters.len(), 5);
//! ```

pub mod client_limits;
pub mod forwarding;
pub mod hygiene;

use std::any::Any;
use std::borrow::Cow;
use std::future::{Future, IntoFuture, Ready};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use futures::future::{BoxFuture, Either};
use http::header::{HeaderName, RETRY_AFTER};
use http::{HeaderValue, StatusCode, Version};
use ipnet::IpNet;

use crate::client_ip;
use crate::config::ProxyConfig;
use crate::lookup::SessionLookup;
use crate::metrics::RejectReason;
use crate::proxy::ProxyError;

/// A response the proxy sends itself instead of forwarding the request: a synthetic response
/// as data, like linkerd2-proxy's. The proxy adds a short plain-text body saying the status.
#[derive(Debug, Clone)]
pub struct Reject {
    /// The status sent.
    pub status: StatusCode,
    /// Why, as the `reason` label of `proxy_rejects_total` and in the log line: short,
    /// `snake_case`, from a small fixed set (each value is a metric series).
    pub reason: Cow<'static, str>,
    /// Close the client connection after this response (`Connection: close` on HTTP/1): for a
    /// request whose framing or head cannot be trusted.
    pub close_connection: bool,
    /// Headers added to the response (`Retry-After`, ...), in order. A list rather than a
    /// `HeaderMap`, which is four times the size of the rest, for the few a refusal has.
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl Reject {
    /// A `status` response counted under `reason`, keeping the connection open.
    pub fn new(status: StatusCode, reason: impl Into<Cow<'static, str>>) -> Self {
        Reject {
            status,
            reason: reason.into(),
            close_connection: false,
            headers: Vec::new(),
        }
    }

    /// 400 Bad Request counted under `reason`, closing the connection (nginx closes after a
    /// 400 about the request head).
    pub fn bad_request(reason: &'static str) -> Self {
        Reject::new(StatusCode::BAD_REQUEST, reason).close_connection()
    }

    /// The same, closing the connection after the response.
    pub fn close_connection(mut self) -> Self {
        self.close_connection = true;
        self
    }

    /// The same, with `Retry-After: seconds`.
    pub fn retry_after(self, seconds: u32) -> Self {
        self.header(RETRY_AFTER, HeaderValue::from(seconds))
    }

    /// The same, with header `name: value` added.
    pub fn header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }
}

impl From<RejectReason> for Reject {
    /// One of the proxy's own refusals (limits, timeouts, backends), keeping the connection.
    fn from(reason: RejectReason) -> Self {
        Reject::new(reason.status(), reason.label())
    }
}

/// What a request filter decided: go on (with a response filter to run, or none), or answer
/// with a [`Reject`].
pub type FilterResult = Result<Option<Box<dyn ResponseFilter>>, Reject>;

/// A request filter's answer, at once or later: a filter that needs no I/O answers
/// [`Filtered::Ready`] and costs no allocation; one that waits (a session lookup) returns
/// [`Filtered::Pending`]. Either is awaited the same way.
pub enum Filtered<'a> {
    /// Decided.
    Ready(FilterResult),
    /// Decided when the future completes.
    Pending(BoxFuture<'a, FilterResult>),
}

impl<'a> Filtered<'a> {
    /// Go on, with no response filter.
    pub fn pass() -> Self {
        Filtered::Ready(Ok(None))
    }

    /// Answer the request with `reject`.
    pub fn reject(reject: Reject) -> Self {
        Filtered::Ready(Err(reject))
    }

    /// Decided by `future`.
    pub fn later(future: impl Future<Output = FilterResult> + Send + 'a) -> Self {
        Filtered::Pending(Box::pin(future))
    }
}

impl From<FilterResult> for Filtered<'_> {
    fn from(result: FilterResult) -> Self {
        Filtered::Ready(result)
    }
}

impl std::fmt::Debug for Filtered<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Filtered::Ready(result) => f.debug_tuple("Ready").field(result).finish(),
            Filtered::Pending(_) => f.write_str("Pending"),
        }
    }
}

impl<'a> IntoFuture for Filtered<'a> {
    type Output = FilterResult;
    type IntoFuture = Either<Ready<FilterResult>, BoxFuture<'a, FilterResult>>;

    fn into_future(self) -> Self::IntoFuture {
        match self {
            Filtered::Ready(result) => Either::Left(std::future::ready(result)),
            Filtered::Pending(future) => Either::Right(future),
        }
    }
}

/// A hook run on every request before a backend is picked (pingora's `request_filter`): it
/// may rewrite the request head, answer the request itself with a [`Reject`], or ask to see
/// the response by returning a [`ResponseFilter`] holding what it learnt about this request
/// (pingora's per-request context).
pub trait RequestFilter: Send + Sync + std::fmt::Debug {
    /// Inspects and rewrites `head`; `Err` answers the request with that [`Reject`];
    /// `Ok(Some(hook))` runs `hook` on the response head.
    fn request_filter<'a>(
        &'a self,
        head: &'a mut http::request::Parts,
        ctx: &'a FilterContext,
    ) -> Filtered<'a>;
}

/// The response side of a [`RequestFilter`] for one request (pingora's `response_filter`,
/// with that request's context inside): run once on the backend's response head, after the
/// balancer's `on_response`, before it is relayed. Not run on the proxy's own answers (502,
/// 503, 504, ...): it is dropped then. What must last to the end of the response body goes
/// into [`HeldUntilResponseEnd`].
pub trait ResponseFilter: Send + std::fmt::Debug {
    /// Inspects and rewrites the response head (typically adds `Set-Cookie`).
    fn response_filter(self: Box<Self>, head: &mut http::response::Parts);
}

/// What response filters keep until their response is over: its body sent to the end, or
/// dropped (the client went away). A response filter adds a value with
/// [`HeldUntilResponseEnd::hold`]; the proxy takes them out of the response head and keeps them
/// with the body it sends (pingora keeps a request's context until its logging phase; this is
/// how a part of it lives that long here, e.g. a client's slot among its requests in flight).
#[derive(Clone, Default)]
pub struct HeldUntilResponseEnd(Vec<Arc<dyn Any + Send + Sync>>);

impl HeldUntilResponseEnd {
    /// Keeps `value` until the response whose head is `head` is over.
    pub fn hold(head: &mut http::response::Parts, value: impl Any + Send + Sync) {
        let value: Arc<dyn Any + Send + Sync> = Arc::new(value);
        match head.extensions.get_mut::<HeldUntilResponseEnd>() {
            Some(held) => held.0.push(value),
            None => {
                head.extensions.insert(HeldUntilResponseEnd(vec![value]));
            }
        }
    }

    /// How many values are held.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for HeldUntilResponseEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("HeldUntilResponseEnd")
            .field(&self.0.len())
            .finish()
    }
}

/// One client connection's socket peer, made when the connection is accepted: its address,
/// whether it came over TLS, and what the forwarding headers say about it, formatted once.
#[derive(Debug)]
pub struct Peer {
    /// The peer's address (an IPv4-mapped IPv6 address made IPv4).
    addr: SocketAddr,
    /// The connection is TLS (an HTTPS listener).
    tls: bool,
    /// The forwarding filter's values for this peer.
    forwarding: forwarding::PeerValues,
    /// The `Host` the hygiene filter last found valid on this connection.
    checked_host: hygiene::CheckedHost,
}

impl Peer {
    /// The peer of a connection from `addr`, over TLS when `tls`.
    pub fn new(addr: SocketAddr, tls: bool) -> Self {
        let addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
        Peer {
            addr,
            tls,
            forwarding: forwarding::PeerValues::new(addr.ip()),
            checked_host: hygiene::CheckedHost::default(),
        }
    }

    /// The peer's address and port.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The peer's address.
    pub fn ip(&self) -> IpAddr {
        self.addr.ip()
    }

    /// Whether the connection is TLS.
    pub fn tls(&self) -> bool {
        self.tls
    }
}

/// What a request filter knows about the request besides its head, worked out once before
/// the first filter runs.
#[derive(Debug, Clone)]
pub struct FilterContext {
    /// The connection's socket peer.
    peer: Arc<Peer>,
    /// The peer is in `trusted_proxies`.
    trusted_peer: bool,
    /// The client's address (see [`crate::client_ip`]).
    client_ip: IpAddr,
    /// The client reached the proxy, or the trusted proxy in front of it, over TLS.
    https: bool,
    /// The client's HTTP version.
    version: Version,
}

impl FilterContext {
    /// The context of a request with `head` from `peer`, whose forwarding headers count when it
    /// is one of `trusted` (read before any filter rewrites them).
    pub fn new(peer: Arc<Peer>, head: &http::request::Parts, trusted: &[IpNet]) -> Self {
        let trusted_peer = client_ip::is_trusted(peer.ip(), trusted);
        let client_ip = if trusted_peer {
            client_ip::resolve(peer.ip(), &head.headers, trusted)
        } else {
            peer.ip()
        };
        let https = peer.tls || (trusted_peer && forwarding::says_https(&head.headers));
        FilterContext {
            peer,
            trusted_peer,
            client_ip,
            https,
            version: head.version,
        }
    }

    /// The client's address: the socket peer, or the right-most untrusted `X-Forwarded-For`
    /// entry when the peer is a trusted proxy.
    pub fn client_ip(&self) -> IpAddr {
        self.client_ip
    }

    /// The connection's socket peer.
    pub fn peer(&self) -> &Peer {
        &self.peer
    }

    /// Whether the socket peer is one of `trusted_proxies`, whose forwarding headers count.
    pub fn trusted_peer(&self) -> bool {
        self.trusted_peer
    }

    /// Whether the client used https: the listener is TLS, or a trusted peer said
    /// `X-Forwarded-Proto: https`.
    pub fn https(&self) -> bool {
        self.https
    }

    /// `https` or `http`, as [`FilterContext::https`] says.
    pub fn scheme(&self) -> &'static str {
        if self.https { "https" } else { "http" }
    }

    /// The client's HTTP version (requests go to backends as HTTP/1.1 whatever it is).
    pub fn version(&self) -> Version {
        self.version
    }
}

/// What a [`FilterFactory`] builds its filter from.
#[derive(Debug)]
pub struct FilterSetup<'a> {
    /// The configuration of the generation being built.
    pub config: &'a ProxyConfig,
    /// The session-lookup plugin, kept across reloads so its client is reused (off when its
    /// config is `None`).
    pub lookup: &'a Arc<SessionLookup>,
}

/// How a [`FilterFactory`] builds its filter: `None` when the filter is off.
type BuildFilter =
    dyn Fn(&FilterSetup<'_>) -> Result<Option<Arc<dyn RequestFilter>>, ProxyError> + Send + Sync;

/// Builds one request filter for each configuration generation (at start and on every
/// reload); the proxy keeps an ordered list of them.
#[derive(Clone)]
pub struct FilterFactory {
    /// The filter's name, for logs.
    name: &'static str,
    /// The builder.
    build: Arc<BuildFilter>,
}

impl FilterFactory {
    /// A factory called `name` building with `build`.
    pub fn new(
        name: &'static str,
        build: impl Fn(&FilterSetup<'_>) -> Result<Option<Arc<dyn RequestFilter>>, ProxyError>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        FilterFactory {
            name,
            build: Arc::new(build),
        }
    }

    /// The filter's name.
    pub fn name(&self) -> &'static str {
        self.name
    }
}

impl std::fmt::Debug for FilterFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("FilterFactory").field(&self.name).finish()
    }
}

/// The filters of [`Proxy::new`](crate::proxy::Proxy::new), in order: the per-client limits
/// when configured, header hygiene, forwarding headers, then the session lookup when
/// configured.
pub fn default_filters() -> Vec<FilterFactory> {
    vec![
        client_limits::factory(),
        hygiene::factory(),
        forwarding::factory(),
        FilterFactory::new("session_lookup", |setup| {
            let on = setup.lookup.config().is_some();
            Ok(on.then(|| setup.lookup.clone() as Arc<dyn RequestFilter>))
        }),
    ]
}

/// The filters `factories` make for `setup`, in order, the ones that are off left out.
pub(crate) fn build(
    factories: &[FilterFactory],
    setup: &FilterSetup<'_>,
) -> Result<Vec<Arc<dyn RequestFilter>>, ProxyError> {
    let mut filters = Vec::with_capacity(factories.len());
    for factory in factories {
        if let Some(filter) = (factory.build)(setup)? {
            filters.push(filter);
        }
    }
    Ok(filters)
}

/// Runs `filters` on `head` in order; stops at the first [`Reject`]. Returns the response
/// filters they asked for, in filter order.
pub(crate) async fn run(
    filters: &[Arc<dyn RequestFilter>],
    head: &mut http::request::Parts,
    ctx: &FilterContext,
) -> Result<Vec<Box<dyn ResponseFilter>>, Reject> {
    let mut hooks = Vec::new();
    for filter in filters {
        hooks.extend(filter.request_filter(head, ctx).await?);
    }
    Ok(hooks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reject_carries_its_status_label_and_headers() {
        let reject = Reject::new(StatusCode::SERVICE_UNAVAILABLE, "lookup_timeout").retry_after(1);
        assert_eq!(reject.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(reject.reason, "lookup_timeout");
        assert!(!reject.close_connection);
        assert_eq!(
            reject.headers,
            [(RETRY_AFTER, HeaderValue::from_static("1"))]
        );
        let bad = Reject::bad_request("duplicate_host");
        assert_eq!(bad.status, StatusCode::BAD_REQUEST);
        assert!(bad.close_connection);
        let own = Reject::from(RejectReason::GatewayTimeout);
        assert_eq!(
            (own.status, own.reason.as_ref()),
            (StatusCode::GATEWAY_TIMEOUT, "gateway_timeout")
        );
    }

    fn head(headers: &[(&str, &str)]) -> http::request::Parts {
        let mut request = http::Request::get("/").body(()).unwrap();
        for (name, value) in headers {
            request.headers_mut().append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        request.into_parts().0
    }

    #[test]
    fn the_context_believes_a_trusted_peer_only() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let claims = head(&[
            ("x-forwarded-for", "203.0.113.9"),
            ("x-forwarded-proto", "https"),
        ]);
        let peer =
            |ip: &str, tls| Arc::new(Peer::new(SocketAddr::new(ip.parse().unwrap(), 4000), tls));

        let ctx = FilterContext::new(peer("198.51.100.7", false), &claims, &trusted);
        assert!(!ctx.trusted_peer());
        assert_eq!(ctx.client_ip(), "198.51.100.7".parse::<IpAddr>().unwrap());
        assert_eq!(ctx.scheme(), "http");

        let ctx = FilterContext::new(peer("10.0.0.2", false), &claims, &trusted);
        assert!(ctx.trusted_peer());
        assert_eq!(ctx.client_ip(), "203.0.113.9".parse::<IpAddr>().unwrap());
        assert_eq!(ctx.scheme(), "https");
        assert_eq!(ctx.peer().addr().port(), 4000);

        let plain = head(&[("x-forwarded-proto", "http")]);
        let ctx = FilterContext::new(peer("::ffff:198.51.100.7", true), &plain, &trusted);
        assert!(
            ctx.https(),
            "a TLS listener is https whatever the client says"
        );
        assert_eq!(ctx.peer().ip(), "198.51.100.7".parse::<IpAddr>().unwrap());
        assert_eq!(ctx.version(), Version::HTTP_11);
    }

    #[derive(Debug)]
    struct Mark(&'static str);

    impl RequestFilter for Mark {
        fn request_filter<'a>(
            &'a self,
            head: &'a mut http::request::Parts,
            _ctx: &'a FilterContext,
        ) -> Filtered<'a> {
            if head.headers.contains_key("x-stop") {
                return Filtered::reject(Reject::new(StatusCode::FORBIDDEN, "stopped"));
            }
            head.headers
                .append("x-order", HeaderValue::from_static(self.0));
            if self.0 == "later" {
                return Filtered::later(async { Ok(None) });
            }
            Filtered::pass()
        }
    }

    #[tokio::test]
    async fn filters_run_in_order_and_a_reject_stops_them() {
        let filters: Vec<Arc<dyn RequestFilter>> = vec![
            Arc::new(Mark("first")),
            Arc::new(Mark("later")),
            Arc::new(Mark("last")),
        ];
        let ctx = FilterContext::new(
            Arc::new(Peer::new("127.0.0.1:1".parse().unwrap(), false)),
            &head(&[]),
            &[],
        );
        let mut parts = head(&[]);
        let hooks = run(&filters, &mut parts, &ctx).await.unwrap();
        assert!(hooks.is_empty());
        let order: Vec<_> = parts.headers.get_all("x-order").iter().collect();
        assert_eq!(order, ["first", "later", "last"]);

        let mut parts = head(&[("x-stop", "1")]);
        let reject = run(&filters, &mut parts, &ctx).await.unwrap_err();
        assert_eq!(reject.status, StatusCode::FORBIDDEN);
        assert!(!parts.headers.contains_key("x-order"));
    }
}
