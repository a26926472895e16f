//! nginx `ip_hash`, byte for byte: the key is the first three octets of an IPv4 client address
//! (the whole 16 bytes of IPv6), hashed with `hash = 89; hash = (hash * 113 + octet) % 6271`,
//! and `hash % total_weight` walks the weighted backend list. When that backend is unusable the
//! loop continues from the current hash (rehash), up to 20 times, then nginx falls back to
//! round-robin, as this does. Unusable backends keep their slots, so their clients move and
//! everybody else stays put.
//!
//! One deliberate difference: an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, what a dual-stack
//! listener reports for IPv4 clients) is treated as the IPv4 address it carries.
//!
//! What it loses: everyone behind one middle proxy or NAT (one address, or one /24) lands on one
//! backend, which is the hot-spot the comparison shows; the 6271-value hash is coarse; and
//! adding or removing a backend, or changing a weight (the live weights are used), remaps most
//! clients: it is map-based, not consistent.

use std::net::IpAddr;
use std::sync::Arc;

use super::round_robin::RoundRobin;
use super::{Balancer, RequestInfo};
use crate::backend::Backend;

/// nginx's initial hash value.
const SEED: u32 = 89;
/// nginx's multiplier.
const MULTIPLIER: u32 = 113;
/// nginx's modulus: the hash takes only this many values.
const MODULUS: u32 = 6271;
/// nginx gives up rehashing after this many unusable picks and uses round-robin.
const MAX_TRIES: u32 = 20;

/// nginx's `ip_hash` ([`BalanceMode::IpHash`]).
///
/// [`BalanceMode::IpHash`]: super::BalanceMode::IpHash
#[derive(Debug, Default)]
pub struct IpHash {
    /// Where requests go after 20 unusable picks (or when every weight is 0).
    fallback: RoundRobin,
}

impl IpHash {
    /// An ip-hash balancer for a list of `len` backends.
    pub fn new(len: usize) -> Self {
        IpHash {
            fallback: RoundRobin::new(len),
        }
    }
}

/// The bytes nginx hashes for `ip`: three octets of IPv4, sixteen of IPv6.
fn key_bytes(ip: IpAddr) -> ([u8; 16], usize) {
    let mut key = [0u8; 16];
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            key[..3].copy_from_slice(&v4.octets()[..3]);
            (key, 3)
        }
        IpAddr::V6(v6) => (v6.octets(), 16),
    }
}

impl Balancer for IpHash {
    fn pick(
        &self,
        request: &RequestInfo<'_>,
        backends: &[Arc<Backend>],
        usable: &dyn Fn(&Backend) -> bool,
    ) -> Option<usize> {
        let total: u64 = backends.iter().map(|b| u64::from(b.weight())).sum();
        if total == 0 {
            return self.fallback.next(backends, usable);
        }
        let (key, len) = key_bytes(request.client_ip);
        let mut hash = SEED;
        for _ in 0..=MAX_TRIES {
            for &octet in &key[..len] {
                hash = (hash * MULTIPLIER + u32::from(octet)) % MODULUS;
            }
            let mut w = u64::from(hash) % total;
            // The weighted walk: backend p owns `weight(p)` consecutive values of `w`.
            let picked = backends.iter().position(|b| {
                let weight = u64::from(b.weight());
                if w < weight {
                    return true;
                }
                w -= weight;
                false
            });
            if let Some(p) = picked
                && usable(&backends[p])
            {
                return Some(p);
            }
        }
        self.fallback.next(backends, usable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn ipv4_keys_on_three_octets_and_mapped_addresses_count_as_ipv4() {
        let a = key_bytes(IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)));
        let b = key_bytes(IpAddr::V4(Ipv4Addr::new(10, 1, 2, 200)));
        assert_eq!(a, b);
        assert_eq!(a.1, 3);
        let mapped = key_bytes(IpAddr::V6(Ipv4Addr::new(10, 1, 2, 3).to_ipv6_mapped()));
        assert_eq!(mapped, a);
        assert_eq!(key_bytes(IpAddr::V6(Ipv6Addr::LOCALHOST)).1, 16);
    }
}
