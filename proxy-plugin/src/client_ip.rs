//! The real client address of a request.
//!
//! The socket peer is the client unless the peer is a proxy we trust (`trusted_proxies`, CIDRs;
//! empty by default, so nobody is trusted). Behind trusted proxies the client is the right-most
//! `X-Forwarded-For` entry that is not itself trusted: each trusted hop appended the address it
//! saw, so walking from the right we stop at the first address no trusted proxy vouches for.
//! Everything left of it was written by the client and may be forged.
//!
//! This is what nginx `ip_hash` gets wrong behind a middle proxy: it hashes the socket peer, so
//! every client arriving through one proxy (or one NAT) lands on the same backend. The `ip_hash`
//! and `source` balancers here hash the address this module returns instead.
//!
//! It is worked out once per request, before the request filters run, into the
//! [`FilterContext`](crate::filter::FilterContext); the forwarding filter
//! ([`crate::filter::forwarding`]) then rebuilds the headers backends see from it: the
//! `X-Forwarded-For` chain (an untrusted peer's replaced by its address, a trusted one's kept
//! with the peer appended), and `X-Real-IP`, the address returned here.

use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;
use ipnet::IpNet;

use crate::filter::forwarding::X_FORWARDED_FOR;

/// The client address of a request that came from `peer` with `headers`.
///
/// - `peer` not in `trusted`: `peer` (its `X-Forwarded-For` is ignored: anyone can write one).
/// - `peer` trusted: walking `X-Forwarded-For` from the right, the first entry not in
///   `trusted`. When every entry is trusted, the left-most one. Entries are split on `,` in the
///   raw bytes, so only the items that cannot be parsed (`unknown`, garbage, non-ASCII) are
///   unreadable, not the whole line around them. An unreadable entry stops the walk: if it is
///   reached, no readable untrusted entry stands right of it, it sits where the client's
///   address should be, and the client is unknown; the nearest trusted hop (the one that
///   wrote it, right of it) is returned, never anything left of the garbage. Garbage a client
///   sends itself never gets that far: the trusted proxy it reached appended the client's
///   real address right of it, and the walk stops there.
pub fn resolve(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let peer = peer.to_canonical();
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    // Split on the raw bytes: a line with a non-ASCII item still has readable items around it
    // (a trusted nginx appends the real address to the client's own line, garbage and all).
    let mut entries = Vec::new();
    for value in headers.get_all(X_FORWARDED_FOR) {
        entries.extend(
            value
                .as_bytes()
                .split(|&b| b == b',')
                .map(|item| std::str::from_utf8(item).ok().and_then(parse_entry)),
        );
    }
    let mut nearest = peer;
    for entry in entries.into_iter().rev() {
        match entry {
            Some(ip) if is_trusted(&ip) => nearest = ip,
            Some(ip) => return ip,
            None => return nearest,
        }
    }
    nearest
}

/// Whether `peer` (the socket peer) is one of the `trusted` proxies, whose forwarding headers
/// (`X-Forwarded-For`, `X-Forwarded-Proto`, `Forwarded`) are believed.
pub fn is_trusted(peer: IpAddr, trusted: &[IpNet]) -> bool {
    let peer = peer.to_canonical();
    trusted.iter().any(|net| net.contains(&peer))
}

/// One `X-Forwarded-For` entry: `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1`, `[2001:db8::1]`,
/// `[2001:db8::1]:80`, optionally quoted. `None` for anything else (`unknown`, obfuscated
/// identifiers, garbage).
fn parse_entry(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim().trim_matches('"');
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    if let Ok(addr) = entry.parse::<SocketAddr>() {
        return Some(addr.ip().to_canonical());
    }
    entry
        .strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
        .and_then(|inner| inner.parse::<IpAddr>().ok())
        .map(|ip| ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(xff: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for value in xff {
            map.append(X_FORWARDED_FOR, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn untrusted_peer_is_the_client_whatever_its_header_says() {
        let h = headers(&["203.0.113.9"]);
        assert_eq!(resolve(ip("198.51.100.7"), &h, &[]), ip("198.51.100.7"));
        let trusted = nets(&["10.0.0.0/8"]);
        assert_eq!(
            resolve(ip("198.51.100.7"), &h, &trusted),
            ip("198.51.100.7")
        );
    }

    #[test]
    fn trusted_peer_yields_the_right_most_untrusted_entry() {
        let trusted = nets(&["10.0.0.0/8"]);
        // The client forged "1.1.1.1"; the trusted proxy 10.0.0.2 appended what it saw.
        let h = headers(&["1.1.1.1, 203.0.113.9, 10.0.0.2"]);
        assert_eq!(resolve(ip("10.0.0.1"), &h, &trusted), ip("203.0.113.9"));
    }

    #[test]
    fn spoofed_left_most_entries_are_ignored_across_header_lines() {
        let trusted = nets(&["10.0.0.0/8"]);
        let h = headers(&["6.6.6.6, 7.7.7.7", "203.0.113.9"]);
        assert_eq!(resolve(ip("10.0.0.1"), &h, &trusted), ip("203.0.113.9"));
    }

    #[test]
    fn all_trusted_chain_yields_the_left_most() {
        let trusted = nets(&["10.0.0.0/8"]);
        let h = headers(&["10.1.1.1, 10.2.2.2"]);
        assert_eq!(resolve(ip("10.0.0.1"), &h, &trusted), ip("10.1.1.1"));
        assert_eq!(
            resolve(ip("10.0.0.1"), &HeaderMap::new(), &trusted),
            ip("10.0.0.1")
        );
    }

    #[test]
    fn garbage_stops_the_walk_at_the_last_trusted_hop() {
        let trusted = nets(&["10.0.0.0/8"]);
        let h = headers(&["203.0.113.9, unknown, 10.0.0.5"]);
        assert_eq!(resolve(ip("10.0.0.1"), &h, &trusted), ip("10.0.0.5"));
        let h = headers(&["203.0.113.9, not-an-ip"]);
        assert_eq!(resolve(ip("10.0.0.1"), &h, &trusted), ip("10.0.0.1"));
        let h = headers(&[""]);
        assert_eq!(resolve(ip("10.0.0.1"), &h, &trusted), ip("10.0.0.1"));
    }

    #[test]
    fn non_ascii_items_are_unreadable_entries_not_whole_lines() {
        let trusted = nets(&["10.0.0.0/8"]);
        let raw = |lines: &[&[u8]]| {
            let mut map = HeaderMap::new();
            for line in lines {
                map.append(X_FORWARDED_FOR, HeaderValue::from_bytes(line).unwrap());
            }
            map
        };
        // The client sent `\x80`; the trusted nginx appended its real address to that line.
        let h = raw(&[b"\x80, 203.0.113.9"]);
        assert_eq!(resolve(ip("10.0.0.1"), &h, &trusted), ip("203.0.113.9"));
        let h = raw(&[b"\x80, 203.0.113.9, 10.0.0.7"]);
        assert_eq!(resolve(ip("10.0.0.1"), &h, &trusted), ip("203.0.113.9"));
        // Nothing readable left of the trusted hop that follows the garbage: the client is
        // unknown and the nearest trusted hop stands in, never the forged entry left of it.
        let h = raw(&[b"6.6.6.6, \xff\xfe, 10.0.0.7"]);
        assert_eq!(resolve(ip("10.0.0.1"), &h, &trusted), ip("10.0.0.7"));
        let h = raw(&[b"6.6.6.6", b"\x80"]);
        assert_eq!(resolve(ip("10.0.0.1"), &h, &trusted), ip("10.0.0.1"));
        // An untrusted peer's header, garbage or not, is never read.
        assert_eq!(
            resolve(ip("198.51.100.7"), &raw(&[b"\x80, 10.0.0.7"]), &trusted),
            ip("198.51.100.7")
        );
    }

    #[test]
    fn entries_with_ports_brackets_and_quotes_parse() {
        let trusted = nets(&["10.0.0.0/8", "::1/128"]);
        for (value, want) in [
            ("203.0.113.9:4711", "203.0.113.9"),
            ("[2001:db8::1]:443", "2001:db8::1"),
            ("[2001:db8::1]", "2001:db8::1"),
            ("\"2001:db8::2\"", "2001:db8::2"),
            (" 198.51.100.1 ", "198.51.100.1"),
        ] {
            assert_eq!(
                resolve(ip("::1"), &headers(&[value]), &trusted),
                ip(want),
                "{value}"
            );
        }
    }

    #[test]
    fn ipv4_mapped_addresses_are_canonical() {
        let trusted = nets(&["10.0.0.0/8"]);
        assert_eq!(
            resolve(ip("::ffff:10.0.0.1"), &headers(&["192.0.2.1"]), &trusted),
            ip("192.0.2.1")
        );
        assert_eq!(
            resolve(ip("::ffff:192.0.2.3"), &HeaderMap::new(), &[]),
            ip("192.0.2.3")
        );
    }
}
