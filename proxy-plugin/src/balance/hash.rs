//! Hashing a request key onto a backend (HAProxy `balance source | uri | url_param | hdr |
//! rdp-cookie`, nginx `hash`): the key is the whole client address, the path (query excluded),
//! one query parameter, one header or one cookie (the last of its name, as the backends' cookie
//! jar and the session lookup read it). A request without the key (no such parameter, header or
//! cookie, or an empty value) goes round-robin, as in HAProxy.
//!
//! Keys are hashed with 64-bit FNV-1a finished by the murmur3 mixer (fast, stable across
//! processes and releases, so several proxies agree), then mapped one of two ways:
//! - [`HashType::Map`]: `hash % total weight` walks the weighted list. An unusable pick is
//!   rehashed (up to 20 times, like nginx `hash`) so a dead backend's keys spread over the
//!   others, then the next usable backend in list order. What it loses: changing the list
//!   (adding or removing a backend, or a weight) changes the modulus and remaps most keys.
//! - [`HashType::Consistent`]: the [`Ring`] (ketama): removing one of N backends moves ~1/N.
//!
//! What every hash loses: the spread follows the keys, so one hot key (a big NAT, a popular
//! path) overloads its backend whatever its load.

use std::net::IpAddr;
use std::sync::Arc;

use http::HeaderName;
use parking_lot::RwLock;

use super::cookie::cookie_value;
use super::hash_ring::Ring;
use super::round_robin::RoundRobin;
use super::{Balancer, HashType, RequestInfo};
use crate::backend::Backend;

/// Rehashes of an unusable pick before walking the list (nginx's limit).
const MAX_REHASHES: u64 = 20;

/// What part of the request is hashed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    /// The whole client address (IPv4-mapped IPv6 counts as IPv4).
    Source,
    /// The path, without the query.
    Uri,
    /// The value of this query parameter (raw, not percent-decoded).
    UrlParam(String),
    /// The values of this header (all of them, in order); `None` for a name that is not a valid
    /// header name, which then never matches.
    Header(Option<HeaderName>),
    /// The value of the last cookie of this name (`crate::cookie::cookie_value`), as the
    /// backends read it.
    Cookie(String),
}

impl HashKey {
    /// The key's hash for `request`, or `None` when the request does not carry the key.
    fn hash(&self, request: &RequestInfo<'_>) -> Option<u64> {
        let mut h = KeyHasher::new();
        match self {
            HashKey::Source => match request.client_ip.to_canonical() {
                IpAddr::V4(v4) => h.write(&v4.octets()),
                IpAddr::V6(v6) => h.write(&v6.octets()),
            },
            HashKey::Uri => h.write(request.uri.path().as_bytes()),
            HashKey::UrlParam(name) => {
                let value = request.uri.query()?.split('&').find_map(|pair| {
                    let (n, v) = pair.split_once('=')?;
                    (n == name && !v.is_empty()).then_some(v)
                })?;
                h.write(value.as_bytes());
            }
            HashKey::Header(name) => {
                let mut values = request
                    .headers
                    .get_all(name.as_ref()?)
                    .iter()
                    .filter(|v| !v.is_empty());
                h.write(values.next()?.as_bytes());
                for value in values {
                    h.write(b",");
                    h.write(value.as_bytes());
                }
            }
            HashKey::Cookie(name) => {
                let value = cookie_value(request.headers, name).filter(|v| !v.is_empty())?;
                h.write(value.as_bytes());
            }
        }
        Some(h.finish())
    }
}

/// 64-bit FNV-1a over the key's bytes, finished with murmur3's `fmix64` so nearby keys land far
/// apart (FNV alone is weak in its low bits, which `%` uses).
#[derive(Debug, Clone, Copy)]
pub(crate) struct KeyHasher(u64);

impl KeyHasher {
    /// FNV-1a's offset basis.
    pub(crate) fn new() -> Self {
        KeyHasher(0xcbf2_9ce4_8422_2325)
    }

    /// Adds bytes to the key.
    pub(crate) fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    /// The mixed hash.
    pub(crate) fn finish(self) -> u64 {
        fmix64(self.0)
    }
}

/// murmur3's 64-bit finalizer.
fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^ (k >> 33)
}

/// A hashing balancer ([`BalanceMode::Source`], `Uri`, `UrlParam`, `Header`, `CookieHash`).
///
/// [`BalanceMode::Source`]: super::BalanceMode::Source
#[derive(Debug)]
pub struct KeyHash {
    /// What is hashed.
    key: HashKey,
    /// How hashes map onto backends.
    kind: HashType,
    /// The consistent-hash ring, rebuilt when a weight or the list changes (unused by `Map`).
    ring: RwLock<Ring>,
    /// For requests without the key.
    fallback: RoundRobin,
}

impl KeyHash {
    /// A hashing balancer over `backends`.
    pub fn new(key: HashKey, kind: HashType, backends: &[Arc<Backend>]) -> Self {
        let ring = match kind {
            HashType::Consistent => Ring::build(backends),
            HashType::Map => Ring::default(),
        };
        KeyHash {
            key,
            kind,
            ring: RwLock::new(ring),
            fallback: RoundRobin::new(backends.len()),
        }
    }

    /// The backend for a key's hash on the ring, rebuilding it first if the weights changed.
    fn consistent(
        &self,
        hash: u64,
        backends: &[Arc<Backend>],
        usable: &dyn Fn(&Backend) -> bool,
    ) -> Option<usize> {
        {
            let ring = self.ring.read();
            if ring.is_current(backends) {
                return ring.lookup(hash, backends, usable);
            }
        }
        let mut ring = self.ring.write();
        if !ring.is_current(backends) {
            *ring = Ring::build(backends);
        }
        ring.lookup(hash, backends, usable)
    }
}

/// The backend owning `hash` in the weighted list (backend p owns `weight(p)` consecutive slots
/// of `0..total`), rehashing when it is unusable, then taking the next usable one.
fn map(hash: u64, backends: &[Arc<Backend>], usable: &dyn Fn(&Backend) -> bool) -> Option<usize> {
    let total: u64 = backends.iter().map(|b| u64::from(b.weight())).sum();
    if total == 0 {
        return None;
    }
    let slot_owner = |h: u64| {
        let mut w = h % total;
        backends.iter().position(|b| {
            let weight = u64::from(b.weight());
            if w < weight {
                return true;
            }
            w -= weight;
            false
        })
    };
    let first = slot_owner(hash)?;
    let mut h = hash;
    for attempt in 0..=MAX_REHASHES {
        if let Some(p) = slot_owner(h)
            && usable(&backends[p])
        {
            return Some(p);
        }
        h = fmix64(h ^ (attempt + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    }
    (1..backends.len())
        .map(|step| (first + step) % backends.len())
        .find(|&p| usable(&backends[p]))
}

impl Balancer for KeyHash {
    fn pick(
        &self,
        request: &RequestInfo<'_>,
        backends: &[Arc<Backend>],
        usable: &dyn Fn(&Backend) -> bool,
    ) -> Option<usize> {
        let Some(hash) = self.key.hash(request) else {
            return self.fallback.next(backends, usable);
        };
        let picked = match self.kind {
            HashType::Map => map(hash, backends, usable),
            HashType::Consistent => self.consistent(hash, backends, usable),
        };
        // Nothing found by hashing: either nothing is usable (round-robin says so too) or only
        // weight-0 backends are, which own no slot or point.
        picked.or_else(|| self.fallback.next(backends, usable))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // These values are what users' keys map to. Several proxies, restarts and upgrades must
    // agree on them: a change here moves users (and the caches or local sessions they have
    // there) to other backends on upgrade, so it is a breaking change to announce, never a
    // refactoring. They were computed once with this code (and checked against an
    // independent FNV-1a + fmix64) and are pinned, not recomputed.

    /// `finish()` of known keys: FNV-1a 64 then murmur3's fmix64.
    #[test]
    fn key_hashes_are_pinned_across_releases() {
        let cases: [(&[u8], u64); 7] = [
            (b"", 0xefd0_1f60_ba99_2926),
            (b"a", 0x82a2_a958_a9be_ce5b),
            (b"/cart", 0x5bd8_8173_f27a_4e79),
            (b"/products/42", 0x9c53_09c7_9805_9cd4),
            (&[10, 0, 0, 1], 0x251c_e681_282f_daa9),
            (&[192, 0, 2, 7], 0x22eb_cd15_a5d3_7b69),
            (b"Ab3_-xYz", 0xa7a0_f49e_796f_b109),
        ];
        for (key, pinned) in cases {
            let mut h = KeyHasher::new();
            h.write(key);
            assert_eq!(h.finish(), pinned, "key {key:?}");
        }
        // The intermediate FNV-1a state too: FNV-1a("a").
        let mut fnv = KeyHasher::new();
        fnv.write(b"a");
        assert_eq!(fnv.0, 0xaf63_dc4c_8601_ec8c);
        // Writing in pieces is writing the whole.
        let mut pieces = KeyHasher::new();
        pieces.write(b"/ca");
        pieces.write(b"rt");
        assert_eq!(pieces.finish(), 0x5bd8_8173_f27a_4e79);
    }

    /// Of several cookies of the name, only the last is the key: the one a backend reads.
    #[test]
    fn the_cookie_key_is_the_last_cookie_of_its_name() {
        let key = HashKey::Cookie("sid".into());
        let uri = http::Uri::from_static("/");
        let hash = |cookies: &[&'static str]| {
            let mut headers = http::HeaderMap::new();
            for cookie in cookies {
                headers.append(http::header::COOKIE, http::HeaderValue::from_static(cookie));
            }
            key.hash(&RequestInfo {
                client_ip: [10, 0, 0, 1].into(),
                uri: &uri,
                headers: &headers,
            })
        };
        let b = hash(&["sid=b"]);
        assert!(b.is_some());
        assert_ne!(hash(&["sid=a"]), b);
        assert_eq!(hash(&["sid=a; sid=b"]), b);
        assert_eq!(hash(&["sid=a", "x=1; sid=b; y=2"]), b, "across headers");
        assert_eq!(hash(&["sid=b; sid=a"]), hash(&["sid=a"]));
        assert_eq!(
            hash(&["sid=b; sid="]),
            None,
            "an empty last cookie is no key"
        );
    }

    /// The backend (of s1, s2, s3, weight 1 each) that `balance uri` picks for known paths,
    /// with all up and with s2 down, for both hash types.
    #[test]
    fn chosen_backends_are_pinned_across_releases() {
        let backends: Vec<Arc<Backend>> = (0..3)
            .map(|i| {
                let name = format!("s{}", i + 1);
                Arc::new(Backend::new(i, name, format!("127.0.0.1:{}", 8081 + i), 1))
            })
            .collect();
        let paths = [
            "/",
            "/cart",
            "/login",
            "/me",
            "/products/42",
            "/products/43",
            "/a",
            "/b",
        ];
        let picks = |balancer: &KeyHash| -> Vec<usize> {
            let headers = http::HeaderMap::new();
            paths
                .iter()
                .map(|path| {
                    let uri: http::Uri = path.parse().expect("path");
                    let request = RequestInfo {
                        client_ip: [10, 0, 0, 1].into(),
                        uri: &uri,
                        headers: &headers,
                    };
                    balancer
                        .pick(&request, &backends, &|b| b.is_usable())
                        .expect("a backend")
                })
                .collect()
        };
        let map = KeyHash::new(HashKey::Uri, HashType::Map, &backends);
        let ring = KeyHash::new(HashKey::Uri, HashType::Consistent, &backends);
        assert_eq!(picks(&map), [1, 1, 1, 2, 0, 1, 1, 2]);
        assert_eq!(picks(&ring), [0, 2, 0, 1, 2, 2, 1, 0]);
        backends[1].set_up(false);
        // Map: s2's keys are rehashed; consistent: only s2's keys move, to ring neighbours.
        assert_eq!(picks(&map), [2, 2, 2, 2, 0, 0, 0, 2]);
        assert_eq!(picks(&ring), [0, 2, 0, 0, 2, 2, 2, 0]);
    }
}
