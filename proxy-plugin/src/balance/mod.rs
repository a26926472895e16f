//! Load balancing: one [`Balancer`] trait, one file per algorithm.
//!
//! A balancer is built for one backend list ([`build`]) and picks a backend for each request
//! among those the caller allows (`usable`: up, weight > 0, not already tried by this request),
//! so retries and health checks compose with every algorithm.
//!
//! # Algorithms
//! - `round_robin`: [`RoundRobin`], nginx's smooth weighted round-robin over live weights.
//! - `static_rr`: [`StaticRr`], the same over build-time weights (HAProxy `static-rr`).
//! - `least_conn`: [`LeastConn`], fewest in-flight requests per weight.
//! - `random`: [`Random`], power of two weighted random choices.
//! - `ip_hash`: [`IpHash`], nginx's `ip_hash`.
//! - `hash` (and its ring, `hash_ring`): [`KeyHash`], map-based or consistent hashing of a
//!   [`HashKey`] (client address, path, query parameter, header, cookie).
//! - `sticky`: [`StickyCookie`], a signed cookie naming the backend.
//! - The last two read `Cookie` headers with the crate's one parser (`crate::cookie`) and,
//!   like the backends' cookie jar and the session lookup, take the **last** cookie of a name.

use std::net::IpAddr;
use std::sync::Arc;

use http::{HeaderMap, Uri};

use crate::backend::Backend;
// The crate's cookie parser, as `super::cookie` for the balancers reading cookies.
use crate::cookie;

mod hash;
mod hash_ring;
mod ip_hash;
mod least_conn;
mod random;
mod round_robin;
mod static_rr;
mod sticky;

pub use hash::{HashKey, KeyHash};
pub use ip_hash::IpHash;
pub use least_conn::LeastConn;
pub use random::Random;
pub use round_robin::RoundRobin;
pub use static_rr::StaticRr;
pub use sticky::StickyCookie;

/// The balancer for `mode` over `backends` (the list it will be asked to pick from).
///
/// ```
/// use std::sync::Arc;
///
/// use http::{HeaderMap, Uri};
/// use proxy_plugin::backend::Backend;
/// use proxy_plugin::balance::{BalanceMode, RequestInfo, build};
///
/// let backends: Vec<Arc<Backend>> = (0..3)
///     .map(|i| Arc::new(Backend::new(i, format!("b{i}"), "127.0.0.1:8080", 1)))
///     .collect();
/// let balancer = build(&BalanceMode::LeastConn, &backends);
/// let (uri, headers) = (Uri::from_static("/"), HeaderMap::new());
/// let request = RequestInfo { client_ip: [10, 0, 0, 1].into(), uri: &uri, headers: &headers };
/// let busy = backends[0].start_request();
/// let chosen = balancer.pick(&request, &backends, &|b| b.is_usable());
/// assert_ne!(chosen, Some(0), "b0 has a request in flight");
/// drop(busy);
/// ```
pub fn build(mode: &BalanceMode, backends: &[Arc<Backend>]) -> Box<dyn Balancer> {
    let len = backends.len();
    let hash = |key: HashKey, kind: &HashType| -> Box<dyn Balancer> {
        Box::new(KeyHash::new(key, *kind, backends))
    };
    match mode {
        BalanceMode::RoundRobin => Box::new(RoundRobin::new(len)),
        BalanceMode::StaticRr => Box::new(StaticRr::new(backends)),
        BalanceMode::LeastConn => Box::new(LeastConn::new(len)),
        BalanceMode::Random => Box::new(Random::new()),
        BalanceMode::IpHash => Box::new(IpHash::new(len)),
        BalanceMode::Source(kind) => hash(HashKey::Source, kind),
        BalanceMode::Uri(kind) => hash(HashKey::Uri, kind),
        BalanceMode::UrlParam(name, kind) => hash(HashKey::UrlParam(name.clone()), kind),
        BalanceMode::Header(name, kind) => {
            hash(HashKey::Header(crate::config::header_name(name).ok()), kind)
        }
        BalanceMode::CookieHash(name, kind) => hash(HashKey::Cookie(name.clone()), kind),
        BalanceMode::StickyCookie(config) => Box::new(StickyCookie::new(config, len)),
    }
}

/// What a balancer may look at in a request.
#[derive(Debug, Clone, Copy)]
pub struct RequestInfo<'a> {
    /// The real client address (socket peer, or from `X-Forwarded-For` of a trusted proxy).
    pub client_ip: IpAddr,
    /// The request URI (path and query).
    pub uri: &'a Uri,
    /// The request headers (cookies included).
    pub headers: &'a HeaderMap,
}

/// How keys are mapped onto backends by the hashing balancers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashType {
    /// Modulo over the weighted backend list (nginx/HAProxy `map-based`): removing a backend
    /// moves most keys.
    Map,
    /// Ketama-style ring: removing one of N backends moves only about 1/N of keys.
    Consistent,
}

/// The balancing algorithms, as configured: what `--balance` (`balance =`) is parsed into,
/// the hash type taken from `--hash-type` and the sticky-cookie settings from their own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BalanceMode {
    /// Smooth weighted round-robin (nginx's), weights changeable at run time.
    RoundRobin,
    /// Static weighted round-robin (HAProxy `static-rr`): weights fixed at build time.
    StaticRr,
    /// Fewest requests in flight, weighted (ties broken round-robin).
    LeastConn,
    /// Power of two random choices, weighted, then the less loaded.
    Random,
    /// nginx `ip_hash`: the first three octets of an IPv4 address (whole IPv6), map-based,
    /// rehashing to the next on a down backend.
    IpHash,
    /// HAProxy `balance source`: hash of the whole client address.
    Source(HashType),
    /// Hash of the path (HAProxy `balance uri`; query excluded).
    Uri(HashType),
    /// Hash of one query parameter (HAProxy `url_param`); round-robin without it.
    UrlParam(String, HashType),
    /// Hash of one header (HAProxy `hdr(name)`, any case); round-robin without it, and for a
    /// name that is not a valid header name (which the configuration refuses).
    Header(String, HashType),
    /// Hash of the last cookie of this name (also what HAProxy's `rdp-cookie` maps to);
    /// round-robin without it, or when it is empty.
    CookieHash(String, HashType),
    /// Insert a signed cookie naming the backend; requests carrying it (as the last cookie of
    /// its name) go back there while it is usable, otherwise to another backend (and the
    /// cookie is re-pinned).
    StickyCookie(StickyConfig),
}

impl BalanceMode {
    /// The mode's name as `--balance` and `balance =` take it, without its `:NAME`: the one
    /// spelling of each mode, which the configuration parses (HAProxy's aliases aside) and
    /// that logs and error messages print (rather than the mode's `Debug` form, which shows
    /// its settings).
    ///
    /// ```
    /// use proxy_plugin::balance::{BalanceMode, HashType};
    ///
    /// assert_eq!(BalanceMode::LeastConn.name(), "least-conn");
    /// assert_eq!(BalanceMode::CookieHash("sid".into(), HashType::Map).name(), "cookie-hash");
    /// ```
    pub fn name(&self) -> &'static str {
        match self {
            BalanceMode::RoundRobin => "round-robin",
            BalanceMode::StaticRr => "static-rr",
            BalanceMode::LeastConn => "least-conn",
            BalanceMode::Random => "random",
            BalanceMode::IpHash => "ip-hash",
            BalanceMode::Source(_) => "source",
            BalanceMode::Uri(_) => "uri",
            BalanceMode::UrlParam(..) => "url-param",
            BalanceMode::Header(..) => "header",
            BalanceMode::CookieHash(..) => "cookie-hash",
            BalanceMode::StickyCookie(_) => "sticky-cookie",
        }
    }
}

/// Settings of the sticky-cookie balancer.
#[derive(Clone, PartialEq, Eq)]
pub struct StickyConfig {
    /// Cookie name.
    pub cookie: String,
    /// HMAC key material so clients cannot choose their backend by forging the cookie.
    pub key: Vec<u8>,
}

impl std::fmt::Debug for StickyConfig {
    /// Names the cookie, never the key (config is logged on start and reload).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StickyConfig")
            .field("cookie", &self.cookie)
            .finish_non_exhaustive()
    }
}

/// Picks backends for requests.
pub trait Balancer: Send + Sync + std::fmt::Debug {
    /// The backend for this request among `backends` for which `usable` is true, or `None`
    /// when there is none.
    fn pick(
        &self,
        request: &RequestInfo<'_>,
        backends: &[Arc<Backend>],
        usable: &dyn Fn(&Backend) -> bool,
    ) -> Option<usize>;

    /// Lets the balancer add response headers for the chosen backend (sticky cookie's
    /// `Set-Cookie`). Default: nothing.
    fn on_response(&self, request: &RequestInfo<'_>, chosen: &Backend, response: &mut HeaderMap) {
        let _ = (request, chosen, response);
    }

    /// Whether [`Balancer::on_response`] reads the request's headers. When it does not, the
    /// proxy moves them into the request to the backend instead of copying them (on a try
    /// after which no other is possible). Default: false.
    fn reads_request_on_response(&self) -> bool {
        false
    }
}
