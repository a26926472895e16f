//! Sticky cookie (HAProxy `cookie SRV insert`, nginx-plus `sticky cookie`): the first response
//! sets `<cookie>=<backend name>.<tag>`, the tag being HMAC-SHA256 of the name under the
//! configured key, base64url. A request whose cookie of that name verifies (in constant time)
//! and names a usable backend goes there; any other request goes round-robin and its response
//! pins the backend it got. So a user whose backend died is re-pinned to the new one, and a
//! client cannot choose (or spread an attack over) backends by writing the cookie itself.
//!
//! Of several cookies of that name (`srv=a; srv=b`: one a subdomain planted, or a stale one for
//! another path) only the **last** counts, the one the backends' cookie jar (`tower-cookies`)
//! and the session lookup read (`crate::cookie`), so proxy and backend agree on the request.
//!
//! The cookie is `Path=/; HttpOnly; SameSite=Lax`, and `Secure` when the request came over TLS
//! (the proxy's own `X-Forwarded-Proto: https`), so a browser never sends the pin of an HTTPS
//! site in cleartext.
//!
//! Backend names are written as they are when they are valid cookie characters; any other byte
//! (and `%`) is percent-encoded. The name is split from the tag at the last `.`, which base64url
//! never contains, so names like `10.0.0.1:8080` work.
//!
//! What it loses: the pin is only as good as the backend. When it dies, every session kept in
//! its memory is lost (the user is re-pinned, logged out); new backends only get new users, so
//! scale-out and rolling restarts balance slowly; and clients that drop cookies get round-robin.

use std::fmt;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::header::SET_COOKIE;
use http::{HeaderMap, HeaderValue};
use ring::hmac;

use super::cookie::cookie_value;
use super::round_robin::RoundRobin;
use super::{Balancer, RequestInfo, StickyConfig};
use crate::backend::Backend;

/// Prefixed to the name before signing, so a tag made with the same key for another purpose
/// never verifies here.
const CONTEXT: &[u8] = b"stickless sticky backend v1\0";
/// Length of an HMAC-SHA256 tag in unpadded base64url (32 bytes, 43 characters).
const TAG_BASE64_LEN: usize = 43;

/// Pins clients to backends with a signed cookie ([`BalanceMode::StickyCookie`]).
///
/// [`BalanceMode::StickyCookie`]: super::BalanceMode::StickyCookie
pub struct StickyCookie {
    /// The cookie's name.
    cookie: String,
    /// The HMAC key signing backend names.
    key: hmac::Key,
    /// For requests without a valid pin.
    fallback: RoundRobin,
}

impl fmt::Debug for StickyCookie {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key stays out of logs.
        f.debug_struct("StickyCookie")
            .field("cookie", &self.cookie)
            .field("fallback", &self.fallback)
            .finish_non_exhaustive()
    }
}

impl StickyCookie {
    /// A sticky-cookie balancer for a list of `len` backends.
    pub fn new(config: &StickyConfig, len: usize) -> Self {
        StickyCookie {
            cookie: config.cookie.clone(),
            key: hmac::Key::new(hmac::HMAC_SHA256, &config.key),
            fallback: RoundRobin::new(len),
        }
    }

    /// The cookie value pinning `name`.
    pub fn cookie_value(&self, name: &str) -> String {
        let tag = hmac::sign(&self.key, &signed_message(name.as_bytes()));
        format!(
            "{}.{}",
            encode_name(name),
            URL_SAFE_NO_PAD.encode(tag.as_ref())
        )
    }

    /// The backend name the request is pinned to: the one in its last cookie of our name, if
    /// that cookie's tag verifies.
    fn pinned_name(&self, headers: &HeaderMap) -> Option<String> {
        self.verify(cookie_value(headers, &self.cookie)?)
    }

    /// The backend name in a cookie value, if its tag verifies.
    fn verify(&self, value: &str) -> Option<String> {
        let (encoded, tag) = value.rsplit_once('.')?;
        // Refuse to decode anything that cannot be a tag.
        if tag.len() != TAG_BASE64_LEN {
            return None;
        }
        let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
        let name = crate::backend::decode_name(encoded)?;
        hmac::verify(&self.key, &signed_message(name.as_bytes()), &tag).ok()?;
        Some(name)
    }
}

/// What is signed for `name`.
fn signed_message(name: &[u8]) -> Vec<u8> {
    [CONTEXT, name].concat()
}

/// Whether `b` may appear as is in a cookie value (RFC 6265 `cookie-octet`), `%` excepted.
fn is_plain(b: u8) -> bool {
    matches!(b, 0x21 | 0x23..=0x24 | 0x26..=0x2b | 0x2d..=0x3a | 0x3c..=0x5b | 0x5d..=0x7e)
}

/// `name` with every byte that is not a plain cookie octet percent-encoded.
fn encode_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for &b in name.as_bytes() {
        if is_plain(b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Balancer for StickyCookie {
    fn pick(
        &self,
        request: &RequestInfo<'_>,
        backends: &[Arc<Backend>],
        usable: &dyn Fn(&Backend) -> bool,
    ) -> Option<usize> {
        if let Some(name) = self.pinned_name(request.headers)
            && let Some(p) = backends.iter().position(|b| b.name == name && usable(b))
        {
            return Some(p);
        }
        self.fallback.next(backends, usable)
    }

    fn on_response(&self, request: &RequestInfo<'_>, chosen: &Backend, response: &mut HeaderMap) {
        if self.pinned_name(request.headers).as_deref() == Some(chosen.name.as_str()) {
            return;
        }
        let secure = if crate::proxy::forwarded_https(request.headers) {
            "; Secure"
        } else {
            ""
        };
        let cookie = format!(
            "{}={}; Path=/; HttpOnly; SameSite=Lax{secure}",
            self.cookie,
            self.cookie_value(&chosen.name)
        );
        // Only a cookie name with control characters fails here; config validation refuses it.
        if let Ok(value) = HeaderValue::from_str(&cookie) {
            response.append(SET_COOKIE, value);
        }
    }

    /// The request's cookie tells whether the client is already pinned to `chosen`.
    fn reads_request_on_response(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sticky() -> StickyCookie {
        StickyCookie::new(
            &StickyConfig {
                cookie: "srv".into(),
                key: b"k".to_vec(),
            },
            1,
        )
    }

    #[test]
    fn names_round_trip_through_the_cookie() {
        let s = sticky();
        for name in ["10.0.0.1:8080", "a b;c,\"d\"\\%é", "", "x.y.z"] {
            let value = s.cookie_value(name);
            assert!(value.bytes().all(|b| is_plain(b) || b == b'%'), "{value}");
            assert_eq!(s.verify(&value).as_deref(), Some(name));
        }
    }

    #[test]
    fn the_cookie_is_secure_only_over_tls() {
        let s = sticky();
        let backend = Backend::new(0, "b1", "127.0.0.1:1", 1);
        let uri = http::Uri::from_static("/");
        for (proto, secure) in [(None, false), (Some("http"), false), (Some("https"), true)] {
            let mut headers = HeaderMap::new();
            if let Some(proto) = proto {
                headers.insert("x-forwarded-proto", HeaderValue::from_static(proto));
            }
            let request = RequestInfo {
                client_ip: [127, 0, 0, 1].into(),
                uri: &uri,
                headers: &headers,
            };
            let mut response = HeaderMap::new();
            s.on_response(&request, &backend, &mut response);
            let cookie = response[SET_COOKIE].to_str().unwrap();
            assert!(cookie.starts_with("srv=b1."), "{cookie}");
            assert_eq!(cookie.ends_with("; Secure"), secure, "{proto:?}: {cookie}");
        }
    }

    /// Of several cookies of the name, only the last pins, as only the last reaches a backend's
    /// cookie jar: an earlier valid pin does not count when the last one does not verify.
    #[test]
    fn only_the_last_cookie_of_the_name_pins() {
        let s = StickyCookie::new(
            &StickyConfig {
                cookie: "srv".into(),
                key: b"k".to_vec(),
            },
            2,
        );
        let backends: Vec<Arc<Backend>> = (0..2)
            .map(|i| Arc::new(Backend::new(i, format!("b{i}"), "127.0.0.1:1", 1)))
            .collect();
        let (b0, b1) = (s.cookie_value("b0"), s.cookie_value("b1"));
        let uri = http::Uri::from_static("/");
        // The backend picked and whether the response pins it.
        let visit = |cookies: &[String]| {
            let mut headers = HeaderMap::new();
            for cookie in cookies {
                headers.append(http::header::COOKIE, HeaderValue::from_str(cookie).unwrap());
            }
            let request = RequestInfo {
                client_ip: [127, 0, 0, 1].into(),
                uri: &uri,
                headers: &headers,
            };
            let chosen = s.pick(&request, &backends, &|_| true).unwrap();
            let mut response = HeaderMap::new();
            s.on_response(&request, &backends[chosen], &mut response);
            (chosen, response.contains_key(SET_COOKIE))
        };
        assert_eq!(visit(&[format!("srv={b0}; srv={b1}")]), (1, false));
        assert_eq!(visit(&[format!("srv={b1}; srv={b0}")]), (0, false));
        assert_eq!(
            visit(&[format!("srv={b1}"), format!("a=1; srv={b0}")]),
            (0, false),
            "across headers"
        );
        // A last cookie that does not verify: round-robin, and every response re-pins.
        let forged = [format!("srv={b0}; srv=b0.forged")];
        let picks: Vec<_> = (0..2).map(|_| visit(&forged)).collect();
        assert!(picks.iter().all(|(_, pinned)| *pinned), "{picks:?}");
        assert_ne!(picks[0].0, picks[1].0, "round-robin: {picks:?}");
    }

    #[test]
    fn altered_or_garbage_values_do_not_verify() {
        let s = sticky();
        let good = s.cookie_value("b1");
        let forged = good.replacen("b1", "b2", 1);
        for bad in [
            &forged,
            "b1",
            "b1.",
            ".",
            "%zz.abc",
            "%",
            "b1.!!!!",
            &good[..good.len() - 1],
        ] {
            assert_eq!(s.verify(bad), None, "{bad}");
        }
        let other_key = StickyCookie::new(
            &StickyConfig {
                cookie: "srv".into(),
                key: b"other".to_vec(),
            },
            1,
        );
        assert_eq!(other_key.verify(&good), None);
    }
}
