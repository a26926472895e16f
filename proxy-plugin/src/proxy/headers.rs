//! Header rewriting: hop-by-hop headers removed both ways, forwarding headers added.
//!
//! `X-Forwarded-Proto` and the `proto=` of the `Forwarded` element say how the client reached
//! the proxy: `https` on a TLS listener, `http` otherwise, whatever the client sent. The cookies
//! the proxy sets itself read it back ([`forwarded_https`]) to be `Secure` over TLS.
//!
//! What a client says about earlier hops is believed only from a peer in `trusted_proxies`
//! (see [`crate::client_ip`]): from anyone else an incoming `Forwarded` is dropped, so the
//! backend sees only the proxy's own element, and `X-Forwarded-Proto` is replaced. A trusted
//! peer's `Forwarded` elements are kept (the proxy's appended), and its
//! `X-Forwarded-Proto: https` too, so that behind a TLS-terminating load balancer backends
//! still hear `https` and the proxy's cookies stay `Secure`.
//!
//! The client's `Host` is kept (like nginx `proxy_set_header Host $host`): backends build
//! absolute URLs and cookies for the name the client used, not for `10.0.0.5:8080`. An HTTP/2
//! client's `:authority` becomes the `Host` of the HTTP/1.1 request to the backend.
//!
//! This runs on every request, so the common case is kept cheap: one pass over the header
//! names finds that there is nothing hop-by-hop to remove, and what the forwarding headers say
//! about the client's address is formatted once per connection ([`PeerHeaders`]).

use std::net::IpAddr;

use bytes::Bytes;
use http::header::{self, Entry, HeaderName};
use http::{HeaderMap, HeaderValue};
use parking_lot::Mutex;

/// `X-Forwarded-For`.
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `X-Forwarded-Proto`.
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `X-Forwarded-Host`.
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// What the forwarding headers say about one client connection's peer, formatted once when it
/// is accepted rather than on each of its requests.
#[derive(Debug)]
pub(crate) struct PeerHeaders {
    /// The peer's address (IPv4-mapped IPv6 ones made IPv4).
    ip: IpAddr,
    /// The address as an `X-Forwarded-For` item: `192.0.2.7`, `::1`.
    forwarded_for: HeaderValue,
    /// The address as an RFC 7239 node: `192.0.2.7`, `"[::1]"`.
    node: String,
    /// How the client reached the proxy: `http`, or `https` over TLS.
    proto: HeaderValue,
    /// The last `Forwarded` element made, with the host it names: an HTTP/1 client sends the
    /// same `Host` on every request of its connection.
    last_element: Mutex<Option<(HeaderValue, HeaderValue)>>,
}

impl PeerHeaders {
    /// The forwarding values for a connection from `peer`, over TLS when `https`.
    pub(crate) fn new(peer: IpAddr, https: bool) -> Self {
        let ip = peer.to_canonical();
        let text = ip.to_string();
        let node = match ip {
            IpAddr::V4(_) => text.clone(),
            IpAddr::V6(_) => format!("\"[{text}]\""),
        };
        PeerHeaders {
            ip,
            forwarded_for: HeaderValue::from_maybe_shared(Bytes::from(text))
                .unwrap_or_else(|_| HeaderValue::from_static("unknown")),
            node,
            proto: HeaderValue::from_static(if https { "https" } else { "http" }),
            last_element: Mutex::new(None),
        }
    }

    /// The peer's address.
    pub(crate) fn ip(&self) -> IpAddr {
        self.ip
    }

    /// `for=…;proto=http(s);host=…`, this peer's `Forwarded` element for a request for `host`.
    fn forwarded_element(&self, host: Option<&HeaderValue>) -> Option<HeaderValue> {
        let host_text = host.and_then(|h| h.to_str().ok());
        if let Some(host) = host
            && let Some((last_host, element)) = &*self.last_element.lock()
            && last_host == host
        {
            return Some(element.clone());
        }
        let proto = self.proto.to_str().unwrap_or("http");
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

/// Whether a header (its lower-case name) describes one connection, not the message (RFC 9110
/// §7.6.1), so that a proxy must not forward it whatever `Connection` says: `Connection`,
/// `Keep-Alive`, `TE`, `Trailer`, `Transfer-Encoding`, `Upgrade` and every `proxy-*` header.
/// Matched as strings, which is cheaper than comparing `HeaderName`s.
fn is_hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection" | "keep-alive" | "te" | "trailer" | "transfer-encoding" | "upgrade"
    ) || name.starts_with("proxy-")
}

/// Removes hop-by-hop headers: the fixed list, every `proxy-*` header, and each header the
/// `Connection` header names.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed = |name: &HeaderName| is_hop_by_hop(name.as_str());
    // Most messages have none, or only the `Connection: keep-alive` (or `close`) of an
    // HTTP/1.1 backend: one pass over the names, without hashing, says which.
    let (mut connection, mut others, mut named_close) = (false, false, false);
    for name in headers.keys() {
        match name.as_str() {
            "connection" => connection = true,
            "close" => named_close = true,
            other if is_hop_by_hop(other) => others = true,
            _ => {}
        }
    }
    if !connection && !others {
        return;
    }
    let plain_option = |value: &HeaderValue| {
        let value = value.as_bytes();
        value.eq_ignore_ascii_case(b"keep-alive") || value.eq_ignore_ascii_case(b"close")
    };
    if !others && !named_close && headers.get_all(header::CONNECTION).iter().all(plain_option) {
        // It names no header present: it is the only one to go.
        headers.remove(header::CONNECTION);
        return;
    }
    let named: Vec<&str> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|token| !token.is_empty())
        .collect();
    // Tokens are matched against the names present (names are lower case, tokens are not
    // always): cheaper than parsing each token into a name to remove whether present or not.
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|name| {
            listed(name)
                || named
                    .iter()
                    .any(|token| name.as_str().eq_ignore_ascii_case(token))
        })
        .cloned()
        .collect();
    for name in doomed {
        headers.remove(name);
    }
}

/// Adds the forwarding headers for a request from `peer` for `host`: appends the peer to
/// `X-Forwarded-For` and a `for=…;proto=http;host=…` element to `Forwarded` (RFC 7239), and
/// sets `X-Forwarded-Proto: http` and `X-Forwarded-Host`; both protocols say `https` when the
/// peer's connection is TLS. Unless the peer is `trusted` (in `trusted_proxies`), the
/// `Forwarded` it sent is dropped first; a trusted peer's `X-Forwarded-Proto: https` is kept.
pub(crate) fn add_forwarding(
    headers: &mut HeaderMap,
    peer: &PeerHeaders,
    host: Option<HeaderValue>,
    trusted: bool,
) {
    append_to_list(headers, X_FORWARDED_FOR, &peer.forwarded_for);
    if !trusted {
        headers.remove(header::FORWARDED);
    }
    if let Some(element) = peer.forwarded_element(host.as_ref()) {
        append_to_list(headers, header::FORWARDED, &element);
    }
    let proto = if trusted && says_https(headers) {
        HeaderValue::from_static("https")
    } else {
        peer.proto.clone()
    };
    headers.insert(X_FORWARDED_PROTO, proto);
    match host {
        Some(value) => {
            headers.insert(X_FORWARDED_HOST, value);
        }
        None => {
            headers.remove(X_FORWARDED_HOST);
        }
    }
}

/// Whether the client reached the proxy (or the trusted proxy in front of it) over TLS, as
/// the `X-Forwarded-Proto` that [`add_forwarding`] set says (it replaces whatever an untrusted
/// client sent, before the request filters and the balancer see the request).
pub(crate) fn forwarded_https(headers: &HeaderMap) -> bool {
    headers
        .get(X_FORWARDED_PROTO)
        .is_some_and(|proto| proto.as_bytes().eq_ignore_ascii_case(b"https"))
}

/// Whether the incoming `X-Forwarded-Proto` says `https`: its last item (the nearest proxy's,
/// should one have appended rather than replaced), and only that protocol.
fn says_https(headers: &HeaderMap) -> bool {
    let Some(last) = headers.get_all(X_FORWARDED_PROTO).iter().next_back() else {
        return false;
    };
    last.to_str()
        .ok()
        .and_then(|value| value.rsplit(',').next())
        .is_some_and(|proto| proto.trim().eq_ignore_ascii_case("https"))
}

/// Joins every existing line of list header `name` and `item` into one line (many backends
/// read only the first line of `X-Forwarded-For`).
fn append_to_list(headers: &mut HeaderMap, name: HeaderName, item: &HeaderValue) {
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
    let mut parts: Vec<&str> = entry
        .iter()
        .filter_map(|value| value.to_str().ok())
        .map(str::trim)
        .filter(|value| !value.is_empty())
        .collect();
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
pub(crate) fn request_host(parts: &http::request::Parts) -> Option<HeaderValue> {
    match parts.headers.get(header::HOST) {
        Some(host) if host.to_str().is_ok() => Some(host.clone()),
        Some(_) => None,
        None => parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
    }
}

/// Approximate size of a request head as sent on the wire (HTTP/1.1 framing).
pub(crate) fn head_size(parts: &http::request::Parts) -> usize {
    let uri = &parts.uri;
    // The length of `uri`'s `Display`, without formatting it.
    let target = uri.scheme_str().map_or(0, |s| s.len() + 3)
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path().len()
        + uri.query().map_or(0, |q| q.len() + 1);
    let line = parts.method.as_str().len() + target + 12;
    parts.headers.iter().fold(line, |n, (name, value)| {
        n + name.as_str().len() + value.len() + 4
    }) + 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Custom"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-custom", HeaderValue::from_static("1"));
        h.insert("proxy-authorization", HeaderValue::from_static("Basic x"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key(header::ACCEPT));

        // A backend's usual `Connection: keep-alive`, alone or next to a `Keep-Alive`.
        for extra in [None, Some("keep-alive"), Some("close")] {
            let mut h = HeaderMap::new();
            h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
            h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
            if let Some(name) = extra {
                h.insert(name, HeaderValue::from_static("timeout=5"));
            }
            strip_hop_by_hop(&mut h);
            let expected = if extra == Some("close") { 2 } else { 1 };
            assert_eq!(h.len(), expected, "{extra:?}: {h:?}");
            assert!(h.contains_key(header::CONTENT_LENGTH));
        }
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        h.insert("close", HeaderValue::from_static("named by Connection"));
        strip_hop_by_hop(&mut h);
        assert!(h.is_empty(), "{h:?}");

        // Across two lines and in any case.
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("Keep-Alive"));
        h.append(
            header::CONNECTION,
            HeaderValue::from_static("X-Other , close"),
        );
        h.insert("x-other", HeaderValue::from_static("1"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key(header::CONTENT_LENGTH));
    }

    #[test]
    fn forwarding_headers_append_and_quote() {
        let mut h = HeaderMap::new();
        h.insert(X_FORWARDED_FOR, HeaderValue::from_static("203.0.113.1"));
        h.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        let host = HeaderValue::from_static("example.com:8080");
        add_forwarding(
            &mut h,
            &PeerHeaders::new("::1".parse().unwrap(), false),
            Some(host),
            false,
        );
        assert_eq!(h[X_FORWARDED_FOR], "203.0.113.1, ::1");
        assert_eq!(h[X_FORWARDED_PROTO], "http");
        assert_eq!(h[X_FORWARDED_HOST], "example.com:8080");
        assert_eq!(
            h[header::FORWARDED],
            "for=\"[::1]\";proto=http;host=\"example.com:8080\""
        );

        let mut h = HeaderMap::new();
        let peer = PeerHeaders::new("::ffff:192.0.2.7".parse().unwrap(), false);
        add_forwarding(
            &mut h,
            &peer,
            Some(HeaderValue::from_static("example.com")),
            false,
        );
        assert_eq!(
            h[header::FORWARDED],
            "for=192.0.2.7;proto=http;host=example.com"
        );

        // The element is remembered per host, never reused for another host or none.
        let mut h = HeaderMap::new();
        add_forwarding(
            &mut h,
            &peer,
            Some(HeaderValue::from_static("other.example")),
            false,
        );
        assert_eq!(
            h[header::FORWARDED],
            "for=192.0.2.7;proto=http;host=other.example"
        );
        let mut h = HeaderMap::new();
        add_forwarding(&mut h, &peer, None, false);
        assert_eq!(h[header::FORWARDED], "for=192.0.2.7;proto=http");
        assert!(!h.contains_key(X_FORWARDED_HOST));
        assert!(!forwarded_https(&h));
    }

    #[test]
    fn a_tls_connection_forwards_https_whatever_the_client_said() {
        let peer = PeerHeaders::new("192.0.2.7".parse().unwrap(), true);
        let mut h = HeaderMap::new();
        h.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
        add_forwarding(
            &mut h,
            &peer,
            Some(HeaderValue::from_static("example.com")),
            false,
        );
        assert_eq!(h[X_FORWARDED_PROTO], "https");
        assert_eq!(
            h[header::FORWARDED],
            "for=192.0.2.7;proto=https;host=example.com"
        );
        assert!(forwarded_https(&h));

        let plain = PeerHeaders::new("192.0.2.7".parse().unwrap(), false);
        let mut h = HeaderMap::new();
        h.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        add_forwarding(&mut h, &plain, None, false);
        assert_eq!(h[X_FORWARDED_PROTO], "http");
        assert!(!forwarded_https(&h));
    }

    #[test]
    fn only_a_trusted_peers_forwarded_and_https_are_believed() {
        let spoof = |h: &mut HeaderMap| {
            h.insert(
                header::FORWARDED,
                HeaderValue::from_static("for=203.0.113.9;proto=https;host=bank.example"),
            );
            h.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        };
        let peer = PeerHeaders::new("192.0.2.7".parse().unwrap(), false);
        let host = || Some(HeaderValue::from_static("example.com"));

        let mut h = HeaderMap::new();
        spoof(&mut h);
        add_forwarding(&mut h, &peer, host(), false);
        assert_eq!(
            h[header::FORWARDED],
            "for=192.0.2.7;proto=http;host=example.com"
        );
        assert_eq!(h[X_FORWARDED_PROTO], "http");
        assert!(!forwarded_https(&h));

        let mut h = HeaderMap::new();
        spoof(&mut h);
        add_forwarding(&mut h, &peer, host(), true);
        assert_eq!(
            h[header::FORWARDED],
            "for=203.0.113.9;proto=https;host=bank.example, \
             for=192.0.2.7;proto=http;host=example.com"
        );
        assert_eq!(h[X_FORWARDED_PROTO], "https");
        assert!(forwarded_https(&h));

        // A trusted peer's `http` (or nothing, or an appended list ending in http) is not https;
        // the last item of an appended list is the nearest proxy's.
        for (sent, https) in [
            (None, false),
            (Some("http"), false),
            (Some("https, http"), false),
            (Some("http, HTTPS"), true),
        ] {
            let mut h = HeaderMap::new();
            if let Some(sent) = sent {
                h.insert(X_FORWARDED_PROTO, HeaderValue::from_static(sent));
            }
            add_forwarding(&mut h, &peer, None, true);
            assert_eq!(forwarded_https(&h), https, "{sent:?}: {h:?}");
        }
        // Over TLS it is https whatever a trusted peer says.
        let tls = PeerHeaders::new("192.0.2.7".parse().unwrap(), true);
        let mut h = HeaderMap::new();
        h.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
        add_forwarding(&mut h, &tls, None, true);
        assert_eq!(h[X_FORWARDED_PROTO], "https");
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

    #[test]
    fn head_size_counts_the_target_as_written() {
        for target in ["/", "/a/b?x=1&y", "http://example.com:8080/p?q", "*"] {
            let (parts, ()) = http::Request::get(target).body(()).unwrap().into_parts();
            let expected = "GET".len() + parts.uri.to_string().len() + 12 + 2;
            assert_eq!(head_size(&parts), expected, "{target}");
        }
    }

    #[test]
    fn the_name_list_and_its_string_match_agree() {
        let names = [
            header::CONNECTION,
            HeaderName::from_static("keep-alive"),
            header::TE,
            header::TRAILER,
            header::TRANSFER_ENCODING,
            header::UPGRADE,
        ];
        assert!(names.iter().all(|name| is_hop_by_hop(name.as_str())));
        assert!(is_hop_by_hop("proxy-authorization"));
        assert!(!is_hop_by_hop("host") && !is_hop_by_hop("tes"));
    }

    #[test]
    fn messages_without_hop_by_hop_headers_are_left_alone() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("example.com"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        let before = h.clone();
        strip_hop_by_hop(&mut h);
        assert_eq!(h, before);
    }
}
