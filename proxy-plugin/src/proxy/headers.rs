//! Header rewriting the proxy always does, whatever its filters: hop-by-hop headers removed
//! both ways, and the size of a request head.
//!
//! The forwarding headers (`X-Forwarded-*`, `Forwarded`, `X-Real-IP`) are the forwarding
//! filter's ([`crate::filter::forwarding`]); the rules on `Host`, names and cookies the header
//! hygiene filter's ([`crate::filter::hygiene`]).
//!
//! The client's `Host` is kept (like nginx `proxy_set_header Host $host`): backends build
//! absolute URLs and cookies for the name the client used, not for `10.0.0.5:8080`.
//!
//! This runs on every request, so the common case is kept cheap: one pass over the header
//! names finds that there is nothing hop-by-hop to remove.

use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue};

/// Whether a header (its lower-case name) describes one connection, not the message (RFC 9110
/// §7.6.1), so that a proxy must not forward it whatever `Connection` says: `Connection`,
/// `Keep-Alive`, `TE`, `Trailer`, `Transfer-Encoding`, `Upgrade`, `HTTP2-Settings` (the `h2c`
/// upgrade's, RFC 7540 §3.2.1, never forwarded) and every `proxy-*` header. Matched as
/// strings, which is cheaper than comparing `HeaderName`s.
fn is_hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "http2-settings"
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
            HeaderName::from_static("http2-settings"),
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
