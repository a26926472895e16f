//! Header rewriting: hop-by-hop headers removed both ways, forwarding headers added.
//!
//! The client's `Host` is kept (like nginx `proxy_set_header Host $host`): backends build
//! absolute URLs and cookies for the name the client used, not for `10.0.0.5:8080`. An HTTP/2
//! client's `:authority` becomes the `Host` of the HTTP/1.1 request to the backend.

use std::net::IpAddr;

use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue};

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), and that a proxy
/// must not forward; `proxy-*` and those named in `Connection` go too.
static HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// `X-Forwarded-For`.
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `X-Forwarded-Proto`.
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `X-Forwarded-Host`.
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Removes hop-by-hop headers: the fixed list, every `proxy-*` header, and each header the
/// `Connection` header names.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|token| HeaderName::try_from(token.trim()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    let proxy: Vec<HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().starts_with("proxy-"))
        .cloned()
        .collect();
    for name in proxy {
        headers.remove(&name);
    }
}

/// Adds the forwarding headers for a request from `peer` for `host`: appends the peer to
/// `X-Forwarded-For` and a `for=…;proto=http;host=…` element to `Forwarded` (RFC 7239), and
/// sets `X-Forwarded-Proto: http` and `X-Forwarded-Host`.
pub(crate) fn add_forwarding(headers: &mut HeaderMap, peer: IpAddr, host: Option<&str>) {
    let peer = peer.to_canonical();
    append_to_list(headers, X_FORWARDED_FOR, &peer.to_string());
    let node = match peer {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("\"[{v6}]\""),
    };
    let mut element = format!("for={node};proto=http");
    if let Some(host) = host {
        element.push_str(";host=");
        element.push_str(&token_or_quoted(host));
    }
    append_to_list(headers, header::FORWARDED, &element);
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    match host.and_then(|h| HeaderValue::from_str(h).ok()) {
        Some(value) => {
            headers.insert(X_FORWARDED_HOST, value);
        }
        None => {
            headers.remove(X_FORWARDED_HOST);
        }
    }
}

/// Joins every existing line of list header `name` and `item` into one line (many backends
/// read only the first line of `X-Forwarded-For`).
fn append_to_list(headers: &mut HeaderMap, name: HeaderName, item: &str) {
    let mut parts: Vec<&str> = headers
        .get_all(&name)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .map(str::trim)
        .filter(|value| !value.is_empty())
        .collect();
    parts.push(item);
    match HeaderValue::from_str(&parts.join(", ")) {
        Ok(value) => {
            headers.insert(name, value);
        }
        Err(_) => {
            // Only reachable with a non-visible-ASCII item; keep the old lines, add ours.
            if let Ok(value) = HeaderValue::from_str(item) {
                headers.append(name, value);
            }
        }
    }
}

/// `value` as an RFC 7230 token when it is one, else as a quoted string.
fn token_or_quoted(value: &str) -> String {
    let tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if !value.is_empty() && value.chars().all(tchar) {
        return value.to_owned();
    }
    let mut quoted = String::with_capacity(value.len() + 2);
    quoted.push('"');
    for c in value.chars() {
        if c == '"' || c == '\\' {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push('"');
    quoted
}

/// The host the client asked for: its `Host` header, else the URI authority (HTTP/2).
pub(crate) fn request_host(parts: &http::request::Parts) -> Option<String> {
    parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| parts.uri.authority().map(|a| a.as_str().to_owned()))
}

/// Approximate size of a request head as sent on the wire (HTTP/1.1 framing).
pub(crate) fn head_size(parts: &http::request::Parts) -> usize {
    let line = parts.method.as_str().len() + parts.uri.to_string().len() + 12;
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
    }

    #[test]
    fn forwarding_headers_append_and_quote() {
        let mut h = HeaderMap::new();
        h.insert(X_FORWARDED_FOR, HeaderValue::from_static("203.0.113.1"));
        h.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        add_forwarding(&mut h, "::1".parse().unwrap(), Some("example.com:8080"));
        assert_eq!(h[X_FORWARDED_FOR], "203.0.113.1, ::1");
        assert_eq!(h[X_FORWARDED_PROTO], "http");
        assert_eq!(h[X_FORWARDED_HOST], "example.com:8080");
        assert_eq!(
            h[header::FORWARDED],
            "for=\"[::1]\";proto=http;host=\"example.com:8080\""
        );

        let mut h = HeaderMap::new();
        add_forwarding(&mut h, "192.0.2.7".parse().unwrap(), Some("example.com"));
        assert_eq!(
            h[header::FORWARDED],
            "for=192.0.2.7;proto=http;host=example.com"
        );
    }

    #[test]
    fn quoting_escapes() {
        assert_eq!(token_or_quoted("a\"b\\c"), "\"a\\\"b\\\\c\"");
        assert_eq!(token_or_quoted(""), "\"\"");
    }
}
