//! Reading cookies from request headers: the one `Cookie` parser of the proxy, used by the
//! cookie-hash and sticky-cookie balancers and by the session-lookup plugin.
//!
//! Handles several `Cookie` headers (HTTP/2 clients may split them; the header hygiene filter
//! joins them before anyone reads them) and `a=1; b=2` lists; header values that are not
//! visible ASCII and pairs without `=` are skipped, never a panic.
//!
//! When a name appears twice (`sid=a; sid=b`: a cookie for `/` and one for `/app`, or one a
//! subdomain planted), the session lookup and the cookie-hash and sticky-cookie balancers take
//! the **last**, [`cookie_value`], as the backends' cookie jar does (`tower-cookies`, whose jar
//! keeps the last cookie of a name), so the proxy and a backend never read two different
//! sessions, or pins, from one request.

use http::HeaderMap;
use http::header::COOKIE;

/// The values of every cookie called `name` in the request, in header order; surrounding
/// whitespace is removed, and one pair of double quotes around the value (an unbalanced quote
/// is kept, so such a value is never mistaken for a valid id or snapshot).
pub(crate) fn cookie_values<'a>(
    headers: &'a HeaderMap,
    name: &'a str,
) -> impl Iterator<Item = &'a str> + 'a {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|list| list.split(';'))
        .filter_map(move |pair| {
            let (n, v) = pair.split_once('=')?;
            (n.trim() == name).then(|| {
                let v = v.trim();
                v.strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .unwrap_or(v)
            })
        })
}

/// The value of cookie `name` a backend reading the request with `tower-cookies` sees: the
/// last of [`cookie_values`].
pub(crate) fn cookie_value<'a>(headers: &'a HeaderMap, name: &'a str) -> Option<&'a str> {
    cookie_values(headers, name).last()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(values: &[&[u8]]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(COOKIE, HeaderValue::from_bytes(v).expect("test header"));
        }
        h
    }

    #[test]
    fn finds_cookies_across_headers_and_lists() {
        let h = headers(&[b"a=1; b=2", b"c=\"3\";b=4", b"junk; ;=;b"]);
        assert_eq!(cookie_values(&h, "b").collect::<Vec<_>>(), ["2", "4"]);
        assert_eq!(cookie_values(&h, "c").collect::<Vec<_>>(), ["3"]);
        assert_eq!(cookie_values(&h, "z").count(), 0);
    }

    #[test]
    fn the_value_is_the_last_in_header_order() {
        // What the session lookup takes: the last `sid`, even across headers, as tower-cookies.
        let h = headers(&[b"a=1; sid=abc_DEF-123", b"sid=second; b=2"]);
        assert_eq!(cookie_value(&h, "sid"), Some("second"));
        assert_eq!(cookie_value(&h, "a"), Some("1"));
        assert_eq!(cookie_value(&h, "missing"), None);
        let h = headers(&[b"sid=first; sid=last"]);
        assert_eq!(cookie_value(&h, "sid"), Some("last"));
    }

    #[test]
    fn whitespace_quotes_and_empty_values() {
        let h = headers(&[b" sid = \" abc \" ;e=;q=\"\";u=\"x;v=y\"\"\""]);
        assert_eq!(cookie_values(&h, "sid").next(), Some(" abc "));
        assert_eq!(cookie_values(&h, "e").next(), Some(""), "present, empty");
        assert_eq!(cookie_values(&h, "q").next(), Some(""));
        // Only a balanced pair of quotes is removed.
        assert_eq!(cookie_values(&h, "u").next(), Some("\"x"));
        assert_eq!(cookie_values(&h, "v").next(), Some("y\"\"\""));
    }

    #[test]
    fn garbage_is_skipped() {
        let h = headers(&[b"\xff\xfe=1", b"b=\xc3\xa9", b"=", b";;;", b"b"]);
        assert_eq!(cookie_values(&h, "b").count(), 0);
        assert_eq!(
            cookie_values(&h, "").count(),
            1,
            "`=` is an empty name with an empty value"
        );
    }
}
