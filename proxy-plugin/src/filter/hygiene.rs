//! The header hygiene filter: the request rules nginx applies by default, run first.
//!
//! - **Names with `_`** are dropped (nginx `underscores_in_headers off`, `ignore_invalid_headers
//!   on`): CGI-style servers map `X-User-Id` and `X_User_Id` to the same variable, so a client
//!   could otherwise shadow a header the proxy sets. `allow_underscore_headers` keeps them,
//!   except the `_` spellings of forwarding headers (`X_Forwarded_Proto`, `X_Real_IP`, see
//!   [`is_forwarding_header`]), which are dropped always, from trusted peers too.
//! - **Every `x-session-*` spelling** (`x-session-…`, `x_session_…`, `x-session_…`) is
//!   dropped, always: those headers are the session-lookup plugin's word, set after this filter
//!   runs, and a client must never be able to claim a user, not even under a spelling that a
//!   backend's framework folds into the same name. The one exception is the session-lookup
//!   plugin's `--session-header` (say `x-session-token`), in exactly that spelling: it carries
//!   the client's session id, like the session cookie, and is never one the plugin sets.
//! - **`Host`** (RFC 9112 §3.2, RFC 9113 §8.3.1): 400 for two `Host` lines, for an HTTP/1.1
//!   request without one, for one that is not a `host[:port]`, and for one that names another
//!   authority than an absolute-form target (`GET http://a.example/ HTTP/1.1`) or an HTTP/2
//!   `:authority` (hyper checks none of this). An HTTP/2 request without `Host` gets its
//!   `:authority` as `Host`, for the HTTP/1.1 backend; a target authority with userinfo
//!   (`user@host`) is a 400 like such a `Host`.
//! - **Cookie crumbs**: an HTTP/2 client may split its cookies into one `cookie` field each
//!   (RFC 9113 §8.2.3); they are joined with `"; "` into one `Cookie` header before going to
//!   an HTTP/1.1 backend, which expects one. Several HTTP/1 `Cookie` lines are joined the same
//!   way (RFC 6265 allows only one).

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::header::{self, Entry, HeaderName};
use http::uri::{Authority, Scheme};
use http::{HeaderMap, HeaderValue, Version};
use parking_lot::Mutex;

use super::forwarding::is_forwarding_header;
use super::{FilterContext, FilterFactory, Filtered, Reject, RequestFilter};
use crate::lookup::SESSION_HEADER_PREFIX;

/// The header hygiene filter.
#[derive(Debug, Default)]
pub struct HeaderHygiene {
    /// Forward header names containing `_` (`--allow-underscore-headers`); `x_session_*`
    /// spellings are dropped anyway.
    allow_underscores: bool,
    /// The session-lookup plugin's `--session-header`, kept in its exact spelling.
    session_header: Option<HeaderName>,
}

/// Its entry in the default filter list.
pub(crate) fn factory() -> FilterFactory {
    FilterFactory::new("hygiene", |setup| {
        let session_header = setup
            .config
            .lookup
            .as_ref()
            .and_then(|lookup| lookup.session_header.as_deref())
            .and_then(|name| HeaderName::from_bytes(name.as_bytes()).ok());
        Ok(Some(Arc::new(
            HeaderHygiene::new(setup.config.allow_underscore_headers)
                .keeping_session_header(session_header),
        )))
    })
}

impl RequestFilter for HeaderHygiene {
    fn request_filter<'a>(
        &'a self,
        head: &'a mut http::request::Parts,
        ctx: &'a FilterContext,
    ) -> Filtered<'a> {
        match self.apply_checked(head, Some(&ctx.peer().checked_host)) {
            Ok(()) => Filtered::pass(),
            Err(reject) => Filtered::reject(reject),
        }
    }
}

impl HeaderHygiene {
    /// The filter; `allow_underscores` keeps header names containing `_`.
    pub fn new(allow_underscores: bool) -> Self {
        HeaderHygiene {
            allow_underscores,
            session_header: None,
        }
    }

    /// The filter keeping `session_header` (the session-lookup plugin's `--session-header`,
    /// exactly that spelling) although it may be an `x-session-*` name.
    pub fn keeping_session_header(mut self, session_header: Option<HeaderName>) -> Self {
        self.session_header = session_header;
        self
    }

    /// Applies the rules to `head`; `Err` is the 400 to answer.
    pub fn apply(&self, head: &mut http::request::Parts) -> Result<(), Reject> {
        self.apply_checked(head, None)
    }

    /// [`HeaderHygiene::apply`], for a request on the connection whose last valid `Host` is
    /// `checked`: the same `Host` again is not parsed again.
    fn apply_checked(
        &self,
        head: &mut http::request::Parts,
        checked: Option<&CheckedHost>,
    ) -> Result<(), Reject> {
        check_host(head, checked)?;
        self.drop_names(&mut head.headers);
        join_cookie_crumbs(&mut head.headers);
        Ok(())
    }

    /// Drops the names with `_` (unless allowed) and every `x-session-*` spelling.
    fn drop_names(&self, headers: &mut HeaderMap) {
        // One pass over the names; most requests have nothing to drop, and then nothing is
        // allocated.
        let doomed: Vec<HeaderName> = headers
            .keys()
            .filter(|name| {
                let kept = self.session_header.as_ref() == Some(*name);
                let name = name.as_str();
                (is_session_header(name) && !kept)
                    || (name.contains('_')
                        && (!self.allow_underscores || is_forwarding_spelling(name)))
            })
            .cloned()
            .collect();
        if !doomed.is_empty() {
            tracing::debug!(
                headers = ?doomed,
                "request headers dropped (underscores, x-session-* or forwarding spellings)"
            );
        }
        for name in doomed {
            headers.remove(name);
        }
    }
}

/// Removes every `x-session-*` header whatever its spelling (`_` for `-`) but `keep` (the
/// plugin's `--session-header`, that exact name); also run by the session-lookup plugin itself
/// before it sets its headers.
pub(crate) fn strip_session_headers(headers: &mut HeaderMap, keep: Option<&HeaderName>) {
    let names: Vec<HeaderName> = headers
        .keys()
        .filter(|name| is_session_header(name.as_str()) && keep != Some(*name))
        .cloned()
        .collect();
    for name in names {
        headers.remove(name);
    }
}

/// Whether `name` (containing `_`) is a forwarding header spelled with `_` for `-`
/// (`x_forwarded_proto`, `x_real_ip`): a CGI-style backend reads it as the real one.
fn is_forwarding_spelling(name: &str) -> bool {
    is_forwarding_header(&name.replace('_', "-"))
}

/// Whether a header name (lower case, as `HeaderName`s are) is `x-session-…` with any of its
/// dashes written `_`.
fn is_session_header(name: &str) -> bool {
    let prefix = SESSION_HEADER_PREFIX.as_bytes();
    name.len() >= prefix.len()
        && name.as_bytes()[..prefix.len()]
            .iter()
            .zip(prefix)
            .all(|(&b, &p)| b == p || (p == b'-' && b == b'_'))
}

/// Whether `authority` can name the host of a request: a host, no userinfo (`user@`).
fn valid_host(authority: &Authority) -> bool {
    // What `!authority.host().is_empty() && !contains('@')` says, without `host()`'s
    // splitting: without `@`, the host is empty only when the authority is, or begins with
    // the `:` of a port.
    let text = authority.as_str();
    !text.is_empty() && !text.starts_with(':') && !text.contains('@')
}

/// The `Host` a connection's last request had, once the hygiene filter found it valid: an
/// HTTP/1 client sends the same `Host` on every request of a connection, and the same bytes
/// need no second parse (which also copied them).
#[derive(Debug, Default)]
pub(crate) struct CheckedHost(Mutex<Option<HeaderValue>>);

impl CheckedHost {
    /// Whether `host` is the one last found valid.
    fn holds(&self, host: &HeaderValue) -> bool {
        self.0.lock().as_ref() == Some(host)
    }

    /// Remembers `host` as valid (a copy: a clone would keep the client's read buffer alive).
    fn remember(&self, host: &HeaderValue) {
        if let Ok(copy) = HeaderValue::from_bytes(host.as_bytes()) {
            *self.0.lock() = Some(copy);
        }
    }
}

/// The `Host` rules; an HTTP/2 request without `Host` gets its `:authority`. A `Host` equal
/// to `checked`'s on a request without a target authority is known valid.
fn check_host(
    head: &mut http::request::Parts,
    checked: Option<&CheckedHost>,
) -> Result<(), Reject> {
    // The target's authority (HTTP/2 `:authority`, HTTP/1 absolute form) passes the same
    // check as `Host`: it may become `Host` below, and RFC 9110 §4.2.4 makes userinfo an error.
    if let Some(target) = head.uri.authority()
        && !valid_host(target)
    {
        return Err(Reject::bad_request("invalid_host"));
    }
    let mut lines = head.headers.get_all(header::HOST).iter();
    let (host, second) = (lines.next(), lines.next());
    if second.is_some() {
        return Err(Reject::bad_request("duplicate_host"));
    }
    let Some(host) = host else {
        return match head.version {
            Version::HTTP_11 => Err(Reject::bad_request("missing_host")),
            Version::HTTP_2 | Version::HTTP_3 => {
                if let Some(authority) = head.uri.authority()
                    && let Ok(value) = HeaderValue::from_str(authority.as_str())
                {
                    head.headers.insert(header::HOST, value);
                }
                Ok(())
            }
            // HTTP/1.0 and older need no Host: the backend gets its own name.
            _ => Ok(()),
        };
    };
    let target = head.uri.authority();
    if target.is_none() && checked.is_some_and(|checked| checked.holds(host)) {
        return Ok(());
    }
    let parsed = match Authority::try_from(host.as_bytes()) {
        Ok(parsed) if valid_host(&parsed) => parsed,
        _ => return Err(Reject::bad_request("invalid_host")),
    };
    match target {
        Some(target) if !same_authority(target, head.uri.scheme(), &parsed) => {
            Err(Reject::bad_request("host_mismatch"))
        }
        Some(_) => Ok(()),
        None => {
            if let Some(checked) = checked {
                checked.remember(host);
            }
            Ok(())
        }
    }
}

/// Whether `host` names the same host and port as the target's `authority` (host names are
/// case-insensitive; a missing port is the scheme's default).
fn same_authority(authority: &Authority, scheme: Option<&Scheme>, host: &Authority) -> bool {
    let default_port = match scheme.map(Scheme::as_str) {
        Some(s) if s.eq_ignore_ascii_case("https") => Some(443),
        Some(s) if s.eq_ignore_ascii_case("http") => Some(80),
        _ => None,
    };
    let port = |a: &Authority| a.port_u16().or(default_port);
    authority.host().eq_ignore_ascii_case(host.host()) && port(authority) == port(host)
}

/// Joins several `Cookie` lines into one, separated by `"; "`.
fn join_cookie_crumbs(headers: &mut HeaderMap) {
    let Entry::Occupied(mut entry) = headers.entry(header::COOKIE) else {
        return;
    };
    let mut crumbs = entry.iter();
    if crumbs.next().is_none() || crumbs.next().is_none() {
        return;
    }
    let length = entry.iter().map(|c| c.len() + 2).sum();
    let mut joined = BytesMut::with_capacity(length);
    for crumb in entry.iter() {
        let crumb = crumb.as_bytes().trim_ascii();
        if crumb.is_empty() {
            continue;
        }
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(crumb);
    }
    // Visible bytes of valid values and "; ": always a valid value.
    if let Ok(value) = HeaderValue::from_maybe_shared(Bytes::from(joined)) {
        entry.insert(value);
    }
}

#[cfg(test)]
mod tests {
    use http::Request;

    use super::*;

    fn head(version: Version, target: &str, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut request = Request::get(target).version(version).body(()).unwrap();
        for (name, value) in headers {
            request.headers_mut().append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        request.into_parts().0
    }

    fn reason(result: Result<(), Reject>) -> Option<String> {
        result.err().map(|r| {
            assert_eq!(r.status, http::StatusCode::BAD_REQUEST);
            assert!(r.close_connection);
            r.reason.into_owned()
        })
    }

    #[test]
    fn underscore_names_and_session_spellings_are_dropped() {
        let sent = [
            ("host", "example.com"),
            ("x_custom", "1"),
            ("x_session_user", "admin"),
            ("x-session_attr-role", "cm9vdA=="),
            ("x-session-id", "forged"),
            ("x-sessionless", "kept"),
            ("accept", "*/*"),
        ];
        let mut strict = head(Version::HTTP_11, "/", &sent);
        HeaderHygiene::new(false).apply(&mut strict).unwrap();
        let mut names: Vec<_> = strict.headers.keys().map(|n| n.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["accept", "host", "x-sessionless"]);

        let mut allowed = head(Version::HTTP_11, "/", &sent);
        HeaderHygiene::new(true).apply(&mut allowed).unwrap();
        let mut names: Vec<_> = allowed.headers.keys().map(|n| n.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["accept", "host", "x-sessionless", "x_custom"]);

        // Forwarding headers spelled with `_` go even when underscores are allowed.
        let forged = [
            ("host", "example.com"),
            ("x_forwarded_proto", "https"),
            ("x_real_ip", "6.6.6.6"),
            ("x-forwarded_ssl", "on"),
            ("true_client_ip", "6.6.6.6"),
            ("x_custom", "1"),
        ];
        let mut allowed = head(Version::HTTP_11, "/", &forged);
        HeaderHygiene::new(true).apply(&mut allowed).unwrap();
        let mut names: Vec<_> = allowed.headers.keys().map(|n| n.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["host", "x_custom"]);
    }

    #[test]
    fn session_header_spellings() {
        for name in [
            "x-session-id",
            "x_session_user",
            "x-session_a",
            "x_session-b",
        ] {
            assert!(is_session_header(name), "{name}");
        }
        for name in ["x-sessionless", "x-session", "session-id", "xx-session-id"] {
            assert!(!is_session_header(name), "{name}");
        }
        let mut h = HeaderMap::new();
        h.insert("x_session_user", HeaderValue::from_static("admin"));
        h.insert("x_other", HeaderValue::from_static("kept"));
        strip_session_headers(&mut h, None);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x_other"));
    }

    #[test]
    fn host_rules() {
        host_rules_with(None);
    }

    /// The same rules on one connection, its last valid `Host` remembered between requests.
    #[test]
    fn host_rules_with_a_remembered_host() {
        let checked = CheckedHost::default();
        host_rules_with(Some(&checked));
        for _ in 0..2 {
            let mut same = head(Version::HTTP_11, "/", &[("host", "example.com")]);
            assert_eq!(reason(check_host(&mut same, Some(&checked))), None);
            assert!(checked.holds(&HeaderValue::from_static("example.com")));
        }
        // A remembered `Host` still has to match a target's authority.
        let mut other = head(
            Version::HTTP_11,
            "http://other.example/",
            &[("host", "example.com")],
        );
        let why = reason(check_host(&mut other, Some(&checked)));
        assert_eq!(why.as_deref(), Some("host_mismatch"));
        // An invalid one is never remembered.
        let mut bad = head(Version::HTTP_11, "/", &[("host", "user@example.com")]);
        let why = reason(check_host(&mut bad, Some(&checked)));
        assert_eq!(why.as_deref(), Some("invalid_host"));
        assert!(checked.holds(&HeaderValue::from_static("example.com")));
    }

    fn host_rules_with(checked: Option<&CheckedHost>) {
        let check = |version, target, hosts: &[&str]| {
            let headers: Vec<_> = hosts.iter().map(|h| ("host", *h)).collect();
            let mut head = head(version, target, &headers);
            let result = reason(check_host(&mut head, checked));
            (result, head)
        };
        let ok = |version, target, hosts: &[&str]| {
            let (result, head) = check(version, target, hosts);
            assert_eq!(result, None, "{version:?} {target} {hosts:?}");
            head
        };
        let refused = |version, target, hosts: &[&str], why: &str| {
            let (result, _) = check(version, target, hosts);
            assert_eq!(
                result.as_deref(),
                Some(why),
                "{version:?} {target} {hosts:?}"
            );
        };
        use Version as V;
        ok(V::HTTP_11, "/", &["example.com"]);
        ok(V::HTTP_11, "/", &["Example.COM:8080"]);
        ok(V::HTTP_10, "/", &[]);
        refused(V::HTTP_11, "/", &[], "missing_host");
        refused(
            V::HTTP_11,
            "/",
            &["a.example", "a.example"],
            "duplicate_host",
        );
        refused(
            V::HTTP_10,
            "/",
            &["a.example", "b.example"],
            "duplicate_host",
        );
        refused(V::HTTP_11, "/", &[""], "invalid_host");
        refused(V::HTTP_11, "/", &["user@a.example"], "invalid_host");
        refused(V::HTTP_11, "/", &["a.example/x"], "invalid_host");
        refused(V::HTTP_11, "/", &[":80"], "invalid_host");
        ok(V::HTTP_11, "/", &["[::1]:8080"]);
        ok(V::HTTP_11, "/", &["example.com"]);

        ok(V::HTTP_11, "http://a.example/p", &["A.example"]);
        ok(V::HTTP_11, "http://a.example/p", &["a.example:80"]);
        ok(V::HTTP_11, "https://a.example:443/p", &["a.example"]);
        refused(
            V::HTTP_11,
            "http://a.example/p",
            &["b.example"],
            "host_mismatch",
        );
        refused(
            V::HTTP_11,
            "http://a.example/p",
            &["a.example:8080"],
            "host_mismatch",
        );
        refused(V::HTTP_11, "http://a.example/p", &[], "missing_host");

        // HTTP/2: `:authority` is the target's authority.
        let h2 = ok(V::HTTP_2, "https://shop.test/h2", &[]);
        assert_eq!(h2.headers[header::HOST], "shop.test");
        ok(V::HTTP_2, "https://shop.test/h2", &["shop.test:443"]);
        refused(
            V::HTTP_2,
            "https://shop.test/h2",
            &["bank.test"],
            "host_mismatch",
        );
        refused(
            V::HTTP_2,
            "https://shop.test/",
            &["shop.test", "shop.test"],
            "duplicate_host",
        );
        // Userinfo in the target's authority, with or without a `Host`.
        refused(V::HTTP_2, "https://user@shop.test/", &[], "invalid_host");
        refused(
            V::HTTP_2,
            "https://evil@shop.test/",
            &["shop.test"],
            "invalid_host",
        );
        refused(
            V::HTTP_11,
            "http://u:p@a.example/p",
            &["a.example"],
            "invalid_host",
        );
    }

    #[test]
    fn cookie_crumbs_are_joined() {
        let mut h = head(
            Version::HTTP_2,
            "https://a.example/",
            &[
                ("cookie", "a=1"),
                ("cookie", "sid=x"),
                ("cookie", " "),
                ("cookie", "b=2"),
            ],
        );
        HeaderHygiene::default().apply(&mut h).unwrap();
        let lines: Vec<_> = h.headers.get_all(header::COOKIE).iter().collect();
        assert_eq!(lines, ["a=1; sid=x; b=2"]);

        let mut one = head(
            Version::HTTP_11,
            "/",
            &[("host", "a"), ("cookie", "a=1; b=2")],
        );
        HeaderHygiene::default().apply(&mut one).unwrap();
        assert_eq!(one.headers[header::COOKIE], "a=1; b=2");
    }
}
