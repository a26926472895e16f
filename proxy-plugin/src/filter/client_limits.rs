//! The per-client limits filter (nginx `limit_conn` and `limit_req`, HAProxy stick tables'
//! `conn_cur` and `http_req_rate`), run first, so a refused request costs no other filter's
//! work (a session lookup).
//!
//! - **The key** is the client address of the [`FilterContext`]: the socket peer, or, when the
//!   peer is in `trusted_proxies`, the address the trusted chain names; an `X-Forwarded-For`
//!   from anyone else changes nothing. An IPv4 address is one key; an IPv6 address counts by
//!   its /64, the block one subscriber's network gets, or a single host could take as many
//!   keys as it has addresses.
//! - **Requests in flight** (`max_conns_per_ip`): at most that many per key at once, each
//!   counted from its request head to the end of its response body (or until it is dropped:
//!   the client went away); past it, 429 with `Retry-After: 1`, counted as `conn_limit`. Like
//!   nginx's `limit_conn` in HTTP, requests are counted rather than connections, so the
//!   streams of one HTTP/2 connection count one each. The slot goes with the request as a
//!   [`ResponseFilter`], which hands it on to the response body
//!   ([`HeldUntilResponseEnd`]); a request refused later, by a filter or the proxy (413,
//!   502, ...), gives it back at once.
//! - **Request rate** (`rate_per_ip`, `burst`): a token bucket per key (GCRA, see `rate.rs`),
//!   `burst + 1` requests at once then one per interval, as nginx `limit_req ... nodelay`;
//!   past it, 429 with `Retry-After` the whole seconds until a token is free (at least 1),
//!   counted as `rate_limit`. A request refused for its requests in flight takes no token.
//!   The table remembers at most 100 000 clients (`rate.rs`).
//!
//! On a reload, the filter's factory keeps the counts of requests in flight, so the requests
//! of the old configuration still count; it keeps the rate table while `rate_per_ip` and
//! `burst` are unchanged, and starts it afresh (every bucket full) when they change.

mod in_flight;
mod rate;

use std::net::IpAddr;
use std::sync::Arc;

use http::StatusCode;
use parking_lot::Mutex;

use self::in_flight::{InFlightCounts, InFlightSlot};
use self::rate::{RATE_KEYS, RateTable, retry_after_secs};
use super::{
    FilterContext, FilterFactory, Filtered, HeldUntilResponseEnd, Reject, RequestFilter,
    ResponseFilter,
};
use crate::config::{ClientLimits, RequestRate};

/// The reject label of a request over `max_conns_per_ip`.
pub const CONN_LIMIT: &str = "conn_limit";
/// The reject label of a request over `rate_per_ip` and `burst`.
pub const RATE_LIMIT: &str = "rate_limit";

/// What the limits count a client by: an IPv4 address, or an IPv6 address's /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum ClientKey {
    /// An IPv4 address (IPv4-mapped IPv6 ones included).
    V4(u32),
    /// The first 64 bits of an IPv6 address.
    V6(u64),
}

impl ClientKey {
    /// The key of `ip`.
    pub(crate) fn of(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(v4) => ClientKey::V4(u32::from(v4)),
            // The high half of a u128 fits a u64.
            IpAddr::V6(v6) => ClientKey::V6((u128::from(v6) >> 64) as u64),
        }
    }
}

/// The per-client limits filter.
#[derive(Debug)]
pub struct ClientLimiter {
    /// The counts of requests in flight and `max_conns_per_ip`, when that is on.
    in_flight: Option<(Arc<InFlightCounts>, u32)>,
    /// The rate table, when `rate_per_ip` is on.
    rate: Option<Arc<RateTable>>,
}

impl ClientLimiter {
    /// The filter of `limits`, counting from nothing; `None` when every limit is off.
    pub fn new(limits: &ClientLimits) -> Option<Self> {
        Kept::default().filter(limits)
    }
}

/// Its entry in the default filter list. The factory keeps the counts across the
/// configurations it builds for (see the module's doc), so a list of factories shared by two
/// proxies would share them too: give each proxy its own [`super::default_filters`].
pub(crate) fn factory() -> FilterFactory {
    let kept = Mutex::new(Kept::default());
    FilterFactory::new("client_limits", move |setup| {
        let filter = kept.lock().filter(&setup.config.client_limits);
        Ok(filter.map(|f| Arc::new(f) as Arc<dyn RequestFilter>))
    })
}

/// The state carried from one configuration to the next.
#[derive(Debug, Default)]
struct Kept {
    /// The counts of requests in flight (made when first needed).
    in_flight: Option<Arc<InFlightCounts>>,
    /// The rate table and the rate and burst it was made for.
    rate: Option<(RequestRate, u32, Arc<RateTable>)>,
}

impl Kept {
    /// The filter of `limits`, reusing what still fits; `None` when every limit is off.
    fn filter(&mut self, limits: &ClientLimits) -> Option<ClientLimiter> {
        let in_flight = (limits.max_conns_per_ip > 0).then(|| {
            let counts = self.in_flight.get_or_insert_with(InFlightCounts::new);
            (counts.clone(), limits.max_conns_per_ip)
        });
        let rate = match limits.rate_per_ip {
            None => {
                self.rate = None;
                None
            }
            Some(rate) => match &self.rate {
                Some((old, burst, table)) if *old == rate && *burst == limits.burst => {
                    Some(table.clone())
                }
                _ => {
                    let table = Arc::new(RateTable::new(rate, limits.burst, RATE_KEYS));
                    self.rate = Some((rate, limits.burst, table.clone()));
                    Some(table)
                }
            },
        };
        (in_flight.is_some() || rate.is_some()).then_some(ClientLimiter { in_flight, rate })
    }
}

impl RequestFilter for ClientLimiter {
    fn request_filter<'a>(
        &'a self,
        _head: &'a mut http::request::Parts,
        ctx: &'a FilterContext,
    ) -> Filtered<'a> {
        let client = ctx.client_ip();
        let key = ClientKey::of(client);
        let slot = match &self.in_flight {
            None => None,
            Some((counts, max)) => match counts.acquire(key, *max) {
                Some(slot) => Some(slot),
                None => {
                    tracing::debug!(%client, max_conns_per_ip = max, "client over its requests in flight");
                    let reject = Reject::new(StatusCode::TOO_MANY_REQUESTS, CONN_LIMIT);
                    return Filtered::reject(reject.retry_after(1));
                }
            },
        };
        if let Some(rate) = &self.rate
            && let Err(wait) = rate.check(key)
        {
            tracing::debug!(%client, ?wait, "client over its request rate");
            let reject = Reject::new(StatusCode::TOO_MANY_REQUESTS, RATE_LIMIT);
            return Filtered::reject(reject.retry_after(retry_after_secs(wait)));
        }
        match slot {
            Some(slot) => Filtered::Ready(Ok(Some(Box::new(HoldSlot(slot))))),
            None => Filtered::pass(),
        }
    }
}

/// A request's slot among its client's requests in flight, handed on to its response.
#[derive(Debug)]
struct HoldSlot(InFlightSlot);

impl ResponseFilter for HoldSlot {
    fn response_filter(self: Box<Self>, head: &mut http::response::Parts) {
        HeldUntilResponseEnd::hold(head, self.0);
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use http::header::RETRY_AFTER;
    use http::{HeaderValue, Request, Response};
    use ipnet::IpNet;

    use super::*;
    use crate::filter::Peer;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn ipv4_counts_by_address_and_ipv6_by_its_64() {
        assert_eq!(
            ClientKey::of(ip("2001:db8:1:2::1")),
            ClientKey::of(ip("2001:db8:1:2:ffff:ffff:ffff:ffff"))
        );
        assert_ne!(
            ClientKey::of(ip("2001:db8:1:2::1")),
            ClientKey::of(ip("2001:db8:1:3::1"))
        );
        assert_ne!(
            ClientKey::of(ip("192.0.2.1")),
            ClientKey::of(ip("192.0.2.2"))
        );
        assert_eq!(
            ClientKey::of(ip("::ffff:192.0.2.1")),
            ClientKey::of(ip("192.0.2.1"))
        );
    }

    /// The context of a request from `peer` with `X-Forwarded-For: xff`, trusting 10/8.
    fn ctx(peer: &str, xff: Option<&str>) -> (http::request::Parts, FilterContext) {
        let mut request = Request::get("/").body(()).unwrap();
        if let Some(xff) = xff {
            request
                .headers_mut()
                .insert("x-forwarded-for", HeaderValue::from_str(xff).unwrap());
        }
        let (head, ()) = request.into_parts();
        let peer = Arc::new(Peer::new(SocketAddr::new(ip(peer), 1234), false));
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let ctx = FilterContext::new(peer, &head, &trusted);
        (head, ctx)
    }

    /// Runs `filter` on a request from `peer` with `xff`: the response filter, or the reject.
    fn run(
        filter: &ClientLimiter,
        peer: &str,
        xff: Option<&str>,
    ) -> Result<Option<Box<dyn ResponseFilter>>, Reject> {
        let (mut head, ctx) = ctx(peer, xff);
        match filter.request_filter(&mut head, &ctx) {
            Filtered::Ready(result) => result,
            Filtered::Pending(_) => panic!("the limits never wait"),
        }
    }

    #[test]
    fn the_slot_is_held_by_the_response_until_it_is_dropped() {
        let limits = ClientLimits {
            max_conns_per_ip: 1,
            ..ClientLimits::default()
        };
        let filter = ClientLimiter::new(&limits).expect("on");
        let hook = run(&filter, "198.51.100.7", None)
            .unwrap()
            .expect("a hook holding the slot");
        let refused = run(&filter, "198.51.100.7", None).unwrap_err();
        assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(refused.reason, CONN_LIMIT);
        assert_eq!(
            refused.headers,
            [(RETRY_AFTER, HeaderValue::from_static("1"))]
        );
        // The response head takes the slot over; the slot is free once the response is gone.
        let (mut head, ()) = Response::new(()).into_parts();
        hook.response_filter(&mut head);
        assert!(run(&filter, "198.51.100.7", None).is_err());
        let held = head.extensions.remove::<HeldUntilResponseEnd>();
        assert!(held.is_some());
        drop(head);
        assert!(run(&filter, "198.51.100.7", None).is_err(), "held apart");
        drop(held);
        assert!(run(&filter, "198.51.100.7", None).unwrap().is_some());
    }

    #[test]
    fn a_trusted_proxys_client_is_the_key_and_an_untrusted_forwarded_for_is_not() {
        let limits = ClientLimits {
            max_conns_per_ip: 1,
            ..ClientLimits::default()
        };
        let filter = ClientLimiter::new(&limits).expect("on");
        // Behind the trusted 10.0.0.2, two clients are counted apart.
        let a = run(&filter, "10.0.0.2", Some("203.0.113.1")).unwrap();
        let b = run(&filter, "10.0.0.2", Some("6.6.6.6, 203.0.113.2")).unwrap();
        assert!(run(&filter, "10.0.0.2", Some("7.7.7.7, 203.0.113.2")).is_err());
        // An untrusted peer is itself, whatever it writes.
        let c = run(&filter, "198.51.100.7", Some("203.0.113.3")).unwrap();
        assert!(run(&filter, "198.51.100.7", Some("203.0.113.4")).is_err());
        drop((a, b, c));
    }

    #[test]
    fn over_the_rate_is_refused_with_the_wait_and_without_taking_a_slot() {
        let limits = ClientLimits {
            max_conns_per_ip: 5,
            rate_per_ip: Some(RequestRate::per_minute(2)),
            burst: 1,
        };
        let filter = ClientLimiter::new(&limits).expect("on");
        let first = run(&filter, "198.51.100.7", None).unwrap();
        let second = run(&filter, "198.51.100.7", None).unwrap();
        let refused = run(&filter, "198.51.100.7", None).unwrap_err();
        assert_eq!(refused.reason, RATE_LIMIT);
        assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
        let retry: u32 = refused.headers[0].1.to_str().unwrap().parse().unwrap();
        assert!((29..=30).contains(&retry), "Retry-After {retry}");
        let (counts, _) = filter.in_flight.as_ref().unwrap();
        assert_eq!(counts.count(&ClientKey::of(ip("198.51.100.7"))), 2);
        drop((first, second));
        assert_eq!(counts.clients(), 0);
    }

    #[test]
    fn a_reload_keeps_the_counts_and_an_unchanged_rate_table() {
        let mut kept = Kept::default();
        let limits = ClientLimits {
            max_conns_per_ip: 1,
            rate_per_ip: Some(RequestRate::per_minute(1)),
            burst: 0,
        };
        assert!(kept.filter(&ClientLimits::default()).is_none(), "all off");
        let old = kept.filter(&limits).unwrap();
        let slot = run(&old, "198.51.100.7", None).unwrap();
        let same = kept.filter(&limits).unwrap();
        let refused = run(&same, "198.51.100.7", None).unwrap_err();
        assert_eq!(refused.reason, CONN_LIMIT, "the old request still counts");
        drop(slot);
        let refused = run(&same, "198.51.100.7", None).unwrap_err();
        assert_eq!(refused.reason, RATE_LIMIT, "the bucket is kept");
        let faster = ClientLimits {
            rate_per_ip: Some(RequestRate::per_second(1)),
            ..limits
        };
        let new = kept.filter(&faster).unwrap();
        assert!(
            run(&new, "198.51.100.7", None).is_ok(),
            "a new rate, a full bucket"
        );
    }
}
