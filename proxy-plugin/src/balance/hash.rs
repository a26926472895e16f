//! Hashing a request key onto a backend (HAProxy `balance source | uri | url_param | hdr |
//! rdp-cookie`, nginx `hash`): the key is the whole client address, the path (query excluded),
//! one query parameter, one header or one cookie. A request without the key (no such parameter,
//! header or cookie, or an empty value) goes round-robin, as in HAProxy.
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

use super::cookie::cookie_values;
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
    /// The value of this cookie (the first one carrying a value).
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
            HashKey::Cookie(name) => h.write(
                cookie_values(request.headers, name)
                    .find(|v| !v.is_empty())?
                    .as_bytes(),
            ),
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

    #[test]
    fn hasher_is_stable_across_releases() {
        // Several proxies, and restarts, must agree: pin the function's output.
        let mut h = KeyHasher::new();
        h.write(b"");
        assert_eq!(KeyHasher::new().finish(), h.finish());
        let mut a = KeyHasher::new();
        a.write(b"/cart");
        let mut b = KeyHasher::new();
        b.write(b"/cart");
        assert_eq!(a.finish(), b.finish());
        let mut c = KeyHasher::new();
        c.write(b"/carts");
        assert_ne!(a.finish(), c.finish());
        // FNV-1a("a") = 0xaf63dc4c8601ec8c, then fmix64.
        let mut fnv = KeyHasher::new();
        fnv.write(b"a");
        assert_eq!(fnv.0, 0xaf63_dc4c_8601_ec8c);
    }
}
