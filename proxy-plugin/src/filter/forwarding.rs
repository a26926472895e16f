//! The forwarding filter: `X-Forwarded-For`, `Forwarded`, `X-Real-IP`, `X-Forwarded-Proto`
//! and `X-Forwarded-Host` rebuilt from the trusted chain (nginx `proxy_add_x_forwarded_for`
//! with `set_real_ip_from`, HAProxy `option forwardfor`).
//!
//! What a request says about earlier hops is believed only from a socket peer in
//! `trusted_proxies` (see [`crate::client_ip`]):
//! - **untrusted peer** (every peer by default): its `X-Forwarded-For`, `Forwarded` and
//!   `X-Real-IP` are dropped and replaced by its own address, so a client cannot inject
//!   entries; `X-Forwarded-Proto` is the listener's (`https` over TLS, else `http`).
//! - **trusted peer**: its `X-Forwarded-For` and `Forwarded` chains are kept and the peer
//!   appended (one line each: many backends read only the first); `X-Real-IP` is the client
//!   the chain names ([`FilterContext::client_ip`]); its `X-Forwarded-Proto: https` is kept,
//!   so behind a TLS-terminating load balancer backends still hear `https` and the proxy's
//!   cookies stay `Secure`.
//!
//! `X-Forwarded-Host` is the host the client asked for (its `Host`, an HTTP/2 client's
//! `:authority`), and the `Forwarded` element the proxy appends is
//! `for=<peer>;proto=<scheme>;host=<host>` (RFC 7239), where, as each element describes one
//! hop, `proto` says how the peer reached this proxy (`https` on a TLS listener): behind a
//! TLS-terminating load balancer, its element says `https` and the proxy's `http`. The cookies
//! the proxy sets itself read the client's scheme back from `X-Forwarded-Proto`
//! ([`forwarded_https`]).
//!
//! This runs on every request, so the common case is kept cheap: the peer's address is
//! formatted once per connection ([`PeerValues`]), and so is its last `Forwarded` element (an
//! HTTP/1 client sends the same `Host` on every request of its connection).

use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, Entry, HeaderName};
use http::{HeaderMap, HeaderValue};
use parking_lot::Mutex;

use super::{FilterContext, FilterFactory, Filtered, RequestFilter};

/// `X-Forwarded-For`.
pub(crate) const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `X-Forwarded-Proto`.
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `X-Forwarded-Host`.
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// `X-Real-IP` (nginx `proxy_set_header X-Real-IP $remote_addr`).
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// The forwarding filter; it has no settings (`trusted_proxies` is in the [`FilterContext`]).
#[derive(Debug, Default)]
pub struct Forwarding;

/// Its entry in the default filter list.
pub(crate) fn factory() -> FilterFactory {
    FilterFactory::new("forwarding", |_setup| Ok(Some(Arc::new(Forwarding))))
}

impl RequestFilter for Forwarding {
    fn request_filter<'a>(
        &'a self,
        head: &'a mut http::request::Parts,
        ctx: &'a FilterContext,
    ) -> Filtered<'a> {
        let host = request_host(head);
        rebuild(&mut head.headers, ctx, host);
        Filtered::pass()
    }
}

/// What the forwarding headers say about one connection's peer, formatted once when it is
/// accepted rather than on each of its requests.
#[derive(Debug)]
pub(crate) struct PeerValues {
    /// The address as an `X-Forwarded-For` item and `X-Real-IP`: `192.0.2.7`, `::1`.
    forwarded_for: HeaderValue,
    /// The address as an RFC 7239 node: `192.0.2.7`, `"[::1]"`.
    node: String,
    /// The last `Forwarded` element made, with the host it names.
    last_element: Mutex<Option<(HeaderValue, HeaderValue)>>,
}

impl PeerValues {
    /// The values of peer `ip` (already canonical).
    pub(crate) fn new(ip: IpAddr) -> Self {
        let text = ip.to_string();
        let node = match ip {
            IpAddr::V4(_) => text.clone(),
            IpAddr::V6(_) => format!("\"[{text}]\""),
        };
        PeerValues {
            forwarded_for: HeaderValue::from_maybe_shared(Bytes::from(text))
                .unwrap_or_else(|_| HeaderValue::from_static("unknown")),
            node,
            last_element: Mutex::new(None),
        }
    }

    /// `for=…;proto=http(s);host=…`, this peer's `Forwarded` element for a request for
    /// `host` over a connection that is TLS when `tls`.
    fn forwarded_element(&self, host: Option<&HeaderValue>, tls: bool) -> Option<HeaderValue> {
        let host_text = host.and_then(|h| h.to_str().ok());
        if let Some(host) = host
            && let Some((last_host, element)) = &*self.last_element.lock()
            && last_host == host
        {
            return Some(element.clone());
        }
        let proto = if tls { "https" } else { "http" };
        let mut element = String::with_capacity(
            "for=;proto=;host=\"\"".len()
                + self.node.len()
                + proto.len()
                + host_text.map_or(0, str::len),
        );
        element.push_str("for=");
        element.push_str(&self.node);
        element.push_str(";proto=");
        element.push_str(proto);
        if let Some(host) = host_text {
            element.push_str(";host=");
            push_token_or_quoted(&mut element, host);
        }
        let element = HeaderValue::from_maybe_shared(Bytes::from(element)).ok()?;
        if let Some(host) = host {
            *self.last_element.lock() = Some((host.clone(), element.clone()));
        }
        Some(element)
    }
}

/// Rewrites the forwarding headers of a request for `host` as the module documentation says.
fn rebuild(headers: &mut HeaderMap, ctx: &FilterContext, host: Option<HeaderValue>) {
    let peer = &ctx.peer().forwarding;
    let element = peer.forwarded_element(host.as_ref(), ctx.peer().tls());
    if ctx.trusted_peer() {
        append_to_list(headers, X_FORWARDED_FOR, &peer.forwarded_for, "unknown");
        if let Some(element) = element {
            append_to_list(headers, header::FORWARDED, &element, "for=unknown");
        }
    } else {
        strip_client_claims(headers);
        headers.insert(X_FORWARDED_FOR, peer.forwarded_for.clone());
        match element {
            Some(element) => headers.insert(header::FORWARDED, element),
            None => headers.remove(header::FORWARDED),
        };
    }
    let real_ip = if ctx.client_ip() == ctx.peer().ip() {
        peer.forwarded_for.clone()
    } else {
        HeaderValue::from_maybe_shared(Bytes::from(ctx.client_ip().to_string()))
            .unwrap_or_else(|_| peer.forwarded_for.clone())
    };
    headers.insert(X_REAL_IP, real_ip);
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(ctx.scheme()));
    match host {
        Some(value) => {
            headers.insert(X_FORWARDED_HOST, value);
        }
        None => {
            headers.remove(X_FORWARDED_HOST);
        }
    }
}

/// Headers other proxies and CDNs set to say who the client is or how it connected, which
/// some frameworks believe; besides these, every `X-Forwarded-*` name is one.
const CLIENT_CLAIMS: [&str; 7] = [
    "true-client-ip",
    "x-client-ip",
    "x-cluster-client-ip",
    "cf-connecting-ip",
    "fastly-client-ip",
    "x-url-scheme",
    "front-end-https",
];

/// Whether header `name` (lower case, `_` already folded to `-`) says something about an
/// earlier hop: the forwarding headers this filter rebuilds, every `X-Forwarded-*`
/// (`-Ssl`, `-Scheme`, `-Port`, `-Prefix`, …), `X-Original-Forwarded-For`, and the
/// [`CLIENT_CLAIMS`].
pub(crate) fn is_forwarding_header(name: &str) -> bool {
    name.starts_with("x-forwarded-")
        || name == "forwarded"
        || name == "x-real-ip"
        || name == "x-original-forwarded-for"
        || CLIENT_CLAIMS.contains(&name)
}

/// Drops what an untrusted peer says about earlier hops beyond the headers [`rebuild`]
/// replaces: `X-Forwarded-Ssl: on`, `True-Client-IP`, `X-Forwarded-Prefix` and the like (see
/// [`is_forwarding_header`]).
fn strip_client_claims(headers: &mut HeaderMap) {
    // One pass over the names; nothing is allocated unless there is something to drop.
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|name| is_forwarding_header(name.as_str()))
        .cloned()
        .collect();
    for name in doomed {
        headers.remove(name);
    }
}

/// Whether the client reached the proxy (or the trusted proxy in front of it) over TLS, as
/// the `X-Forwarded-Proto` that the forwarding filter set says (it replaces whatever an
/// untrusted client sent, before the later filters and the balancer see the request).
pub(crate) fn forwarded_https(headers: &HeaderMap) -> bool {
    headers
        .get(X_FORWARDED_PROTO)
        .is_some_and(|proto| proto.as_bytes().eq_ignore_ascii_case(b"https"))
}

/// Whether the incoming `X-Forwarded-Proto` says `https`: its last item (the nearest proxy's,
/// should one have appended rather than replaced), and only that protocol. Believed only from
/// a trusted peer ([`FilterContext::https`]).
pub(crate) fn says_https(headers: &HeaderMap) -> bool {
    let Some(last) = headers.get_all(X_FORWARDED_PROTO).iter().next_back() else {
        return false;
    };
    last.to_str()
        .ok()
        .and_then(|value| value.rsplit(',').next())
        .is_some_and(|proto| proto.trim().eq_ignore_ascii_case("https"))
}

/// Joins every existing line of list header `name` and `item` into one line (many backends
/// read only the first line of `X-Forwarded-For`); `unknown` stands in for each item of a
/// line that is not ASCII.
fn append_to_list(
    headers: &mut HeaderMap,
    name: HeaderName,
    item: &HeaderValue,
    unknown: &'static str,
) {
    let mut entry = match headers.entry(name) {
        Entry::Vacant(vacant) => {
            vacant.insert(item.clone());
            return;
        }
        Entry::Occupied(occupied) => occupied,
    };
    let Ok(item_text) = item.to_str() else {
        entry.append(item.clone());
        return;
    };
    let mut parts: Vec<&str> = Vec::new();
    for value in entry.iter() {
        match value.to_str() {
            Ok(value) => parts.push(value.trim()),
            // A line with non-ASCII bytes keeps its place in the chain: its readable items are
            // kept and each unreadable one becomes `unknown`, so a backend walking the chain
            // stops where this proxy's [`crate::client_ip`] walk did.
            Err(_) => parts.extend(value.as_bytes().split(|&b| b == b',').map(|item| {
                match std::str::from_utf8(item) {
                    Ok(text) if text.bytes().all(|b| b.is_ascii() && b != 0x7f) => text.trim(),
                    _ => unknown,
                }
            })),
        }
    }
    parts.retain(|part| !part.is_empty());
    parts.push(item_text);
    match HeaderValue::from_str(&parts.join(", ")) {
        Ok(value) => {
            entry.insert(value);
        }
        Err(_) => {
            // Only reachable with a non-visible-ASCII item; keep the old lines, add ours.
            entry.append(item.clone());
        }
    }
}

/// Appends `value` as an RFC 7230 token when it is one, else as a quoted string.
fn push_token_or_quoted(out: &mut String, value: &str) {
    let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if !value.is_empty() && value.bytes().all(tchar) {
        out.push_str(value);
        return;
    }
    out.push('"');
    let mut rest = value;
    while let Some(at) = rest.find(['"', '\\']) {
        out.push_str(&rest[..at]);
        out.push('\\');
        out.push_str(&rest[at..=at]);
        rest = &rest[at + 1..];
    }
    out.push_str(rest);
    out.push('"');
}

/// The host the client asked for: its `Host` header, else the URI authority (HTTP/2); `None`
/// when neither is there, or the `Host` is not visible ASCII.
fn request_host(parts: &http::request::Parts) -> Option<HeaderValue> {
    match parts.headers.get(header::HOST) {
        Some(host) if host.to_str().is_ok() => Some(host.clone()),
        Some(_) => None,
        None => parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use ipnet::IpNet;

    use super::super::Peer;
    use super::*;

    /// The headers `sent` become for a request for `host` from `peer`, with `trusted`
    /// proxies.
    fn forwarded(
        sent: &[(&str, &'static str)],
        peer: &Arc<Peer>,
        host: Option<&'static str>,
        trusted: &[&str],
    ) -> HeaderMap {
        let mut request = http::Request::get("/").body(()).unwrap();
        for (name, value) in sent {
            request.headers_mut().append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_static(value),
            );
        }
        if let Some(host) = host {
            request
                .headers_mut()
                .insert(header::HOST, HeaderValue::from_static(host));
        }
        let mut head = request.into_parts().0;
        let trusted: Vec<IpNet> = trusted.iter().map(|n| n.parse().unwrap()).collect();
        let ctx = FilterContext::new(peer.clone(), &head, &trusted);
        let host = request_host(&head);
        rebuild(&mut head.headers, &ctx, host);
        head.headers
    }

    fn peer(ip: &str, tls: bool) -> Arc<Peer> {
        Arc::new(Peer::new(SocketAddr::new(ip.parse().unwrap(), 40000), tls))
    }

    #[test]
    fn an_untrusted_peer_cannot_inject_entries() {
        let sent = [
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-for", "7.7.7.7"),
            ("x-real-ip", "6.6.6.6"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "bank.example"),
            ("forwarded", "for=6.6.6.6;proto=https;host=bank.example"),
        ];
        let h = forwarded(&sent, &peer("::1", false), Some("example.com:8080"), &[]);
        assert_eq!(h.get_all(X_FORWARDED_FOR).iter().count(), 1);
        assert_eq!(h[X_FORWARDED_FOR], "::1");
        assert_eq!(h[X_REAL_IP], "::1");
        assert_eq!(h[X_FORWARDED_PROTO], "http");
        assert_eq!(h[X_FORWARDED_HOST], "example.com:8080");
        assert_eq!(h.get_all(header::FORWARDED).iter().count(), 1);
        assert_eq!(
            h[header::FORWARDED],
            "for=\"[::1]\";proto=http;host=\"example.com:8080\""
        );
        assert!(!forwarded_https(&h));
    }

    #[test]
    fn a_trusted_peers_chain_is_kept_and_the_peer_appended() {
        let sent = [
            ("x-forwarded-for", "6.6.6.6, 203.0.113.9"),
            ("x-forwarded-for", "10.0.0.3"),
            ("x-real-ip", "1.1.1.1"),
            ("x-forwarded-proto", "https"),
            ("forwarded", "for=203.0.113.9;proto=https"),
        ];
        let h = forwarded(
            &sent,
            &peer("10.0.0.2", false),
            Some("shop.test"),
            &["10.0.0.0/8"],
        );
        assert_eq!(
            h[X_FORWARDED_FOR],
            "6.6.6.6, 203.0.113.9, 10.0.0.3, 10.0.0.2"
        );
        assert_eq!(
            h[X_REAL_IP], "203.0.113.9",
            "the right-most untrusted entry"
        );
        assert_eq!(
            h[header::FORWARDED],
            "for=203.0.113.9;proto=https, for=10.0.0.2;proto=http;host=shop.test",
            "each element says how its hop was reached"
        );
        assert_eq!(h[X_FORWARDED_PROTO], "https");
        assert!(forwarded_https(&h));

        // A trusted peer's `http` (or nothing, or an appended list ending in http) is not
        // https; the last item of an appended list is the nearest proxy's.
        for (sent, https) in [
            (None, false),
            (Some("http"), false),
            (Some("https, http"), false),
            (Some("http, HTTPS"), true),
        ] {
            let headers: Vec<_> = sent.map(|s| ("x-forwarded-proto", s)).into_iter().collect();
            let h = forwarded(&headers, &peer("10.0.0.2", false), None, &["10.0.0.0/8"]);
            assert_eq!(forwarded_https(&h), https, "{sent:?}: {h:?}");
        }
    }

    #[test]
    fn other_client_claims_are_dropped_from_untrusted_peers_only() {
        let sent = [
            ("x-forwarded-ssl", "on"),
            ("x-forwarded-scheme", "https"),
            ("x-url-scheme", "https"),
            ("front-end-https", "on"),
            ("x-forwarded-port", "443"),
            ("x-forwarded-prefix", "/admin"),
            ("true-client-ip", "6.6.6.6"),
            ("x-client-ip", "6.6.6.6"),
            ("x-cluster-client-ip", "6.6.6.6"),
            ("x-original-forwarded-for", "6.6.6.6"),
            ("cf-connecting-ip", "6.6.6.6"),
            ("fastly-client-ip", "6.6.6.6"),
            ("x-forwarded-hostname", "kept-only-if-trusted"),
            ("x-honest", "yes"),
        ];
        let h = forwarded(&sent, &peer("192.0.2.7", false), Some("shop.test"), &[]);
        for (name, _) in &sent[..sent.len() - 1] {
            assert!(!h.contains_key(*name), "{name}: {h:?}");
        }
        assert_eq!(h["x-honest"], "yes");
        assert_eq!(h[X_FORWARDED_HOST], "shop.test");

        let h = forwarded(
            &sent,
            &peer("192.0.2.7", false),
            Some("shop.test"),
            &["192.0.2.0/24"],
        );
        for (name, value) in &sent {
            assert_eq!(h[*name], *value, "{name}");
        }
    }

    #[test]
    fn a_non_ascii_line_keeps_its_readable_items_in_the_chain() {
        let mut headers = HeaderMap::new();
        headers.append(
            X_FORWARDED_FOR,
            HeaderValue::from_bytes(b"\x80, 203.0.113.9").unwrap(),
        );
        headers.append(X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.3"));
        append_to_list(
            &mut headers,
            X_FORWARDED_FOR,
            &HeaderValue::from_static("10.0.0.2"),
            "unknown",
        );
        let lines: Vec<_> = headers.get_all(X_FORWARDED_FOR).iter().collect();
        assert_eq!(lines, ["unknown, 203.0.113.9, 10.0.0.3, 10.0.0.2"]);
    }

    #[test]
    fn a_tls_listener_forwards_https_whatever_the_client_said() {
        let sent = [("x-forwarded-proto", "http")];
        for trusted in [&[][..], &["192.0.2.0/24"][..]] {
            let h = forwarded(
                &sent,
                &peer("192.0.2.7", true),
                Some("example.com"),
                trusted,
            );
            assert_eq!(h[X_FORWARDED_PROTO], "https", "{trusted:?}");
            assert_eq!(
                h[header::FORWARDED],
                "for=192.0.2.7;proto=https;host=example.com"
            );
        }
    }

    #[test]
    fn the_element_is_remembered_per_host() {
        let p = peer("::ffff:192.0.2.7", false);
        let h = forwarded(&[], &p, Some("example.com"), &[]);
        assert_eq!(
            h[header::FORWARDED],
            "for=192.0.2.7;proto=http;host=example.com"
        );
        let h = forwarded(&[], &p, Some("other.example"), &[]);
        assert_eq!(
            h[header::FORWARDED],
            "for=192.0.2.7;proto=http;host=other.example"
        );
        let h = forwarded(&[], &p, None, &[]);
        assert_eq!(h[header::FORWARDED], "for=192.0.2.7;proto=http");
        assert!(!h.contains_key(X_FORWARDED_HOST));
    }

    #[test]
    fn quoting_escapes() {
        let quoted = |value| {
            let mut out = String::new();
            push_token_or_quoted(&mut out, value);
            out
        };
        assert_eq!(quoted("a\"b\\c"), "\"a\\\"b\\\\c\"");
        assert_eq!(quoted(""), "\"\"");
        assert_eq!(quoted("example.com"), "example.com");
    }
}
