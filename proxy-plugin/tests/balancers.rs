//! The balancers as specified: distributions over 10,000 picks, affinity, what moves when a
//! backend goes away, the sticky cookie's signing, and that no algorithm ever picks a backend
//! the caller did not allow.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use http::header::SET_COOKIE;
use http::{HeaderMap, HeaderValue, Uri};
use proxy_plugin::backend::Backend;
use proxy_plugin::balance::{
    BalanceMode, Balancer, HashType, Random, RequestInfo, StickyConfig, build,
};

/// Picks per distribution test.
const PICKS: usize = 10_000;

fn backends(weights: &[u32]) -> Vec<Arc<Backend>> {
    weights
        .iter()
        .enumerate()
        .map(|(i, &w)| Arc::new(Backend::new(i, format!("b{i}"), "127.0.0.1:1", w)))
        .collect()
}

fn usable(b: &Backend) -> bool {
    b.is_usable()
}

/// A synthetic request: client address, URI, and `name: value` headers.
struct Req {
    ip: IpAddr,
    uri: Uri,
    headers: HeaderMap,
}

impl Req {
    fn new(ip: IpAddr, uri: &str, headers: &[(&'static str, &str)]) -> Req {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(*name, HeaderValue::from_str(value).expect("test header"));
        }
        Req {
            ip,
            uri: uri.parse().expect("test uri"),
            headers: map,
        }
    }

    fn from(ip: impl Into<IpAddr>) -> Req {
        Req::new(ip.into(), "/", &[])
    }

    fn info(&self) -> RequestInfo<'_> {
        RequestInfo {
            client_ip: self.ip,
            uri: &self.uri,
            headers: &self.headers,
        }
    }

    fn pick(&self, balancer: &dyn Balancer, list: &[Arc<Backend>]) -> Option<usize> {
        balancer.pick(&self.info(), list, &usable)
    }
}

/// A request from one fixed client.
fn at(uri: &str, headers: &[(&'static str, &str)]) -> Req {
    Req::new([10, 0, 0, 1].into(), uri, headers)
}

/// How many of `n` picks of the same request each backend got.
fn counts(balancer: &dyn Balancer, list: &[Arc<Backend>], n: usize) -> Vec<usize> {
    let req = at("/", &[]);
    let mut counts = vec![0; list.len()];
    for _ in 0..n {
        counts[req.pick(balancer, list).expect("a usable backend")] += 1;
    }
    counts
}

/// Asserts each backend's share of `counts` is `expected[i]` within `tolerance` (a fraction).
fn assert_shares(counts: &[usize], expected: &[f64], tolerance: f64) {
    let total: usize = counts.iter().sum();
    for (i, (&c, &e)) in counts.iter().zip(expected).enumerate() {
        let share = c as f64 / total as f64;
        let msg = format!("backend {i}: share {share:.4}, expected {e} ± {tolerance}: {counts:?}");
        assert!((share - e).abs() <= tolerance, "{msg}");
    }
}

#[test]
fn round_robin_is_even() {
    let list = backends(&[1, 1, 1]);
    let rr = build(&BalanceMode::RoundRobin, &list);
    assert_shares(&counts(rr.as_ref(), &list, PICKS), &[1.0 / 3.0; 3], 0.01);
}

#[test]
fn round_robin_follows_weights_smoothly() {
    let list = backends(&[5, 3, 2]);
    let rr = build(&BalanceMode::RoundRobin, &list);
    assert_shares(&counts(rr.as_ref(), &list, PICKS), &[0.5, 0.3, 0.2], 0.01);
    // Smooth: every window of one period (10 picks) holds exactly 5, 3 and 2, never a burst.
    let req = at("/", &[]);
    let seq: Vec<_> = (0..100).map(|_| req.pick(rr.as_ref(), &list)).collect();
    for window in seq.windows(10) {
        let per = |b| window.iter().filter(|&&p| p == Some(b)).count();
        assert_eq!((per(0), per(1), per(2)), (5, 3, 2), "{window:?}");
    }
}

#[test]
fn round_robin_weight_change_takes_effect() {
    let list = backends(&[1, 1, 1]);
    let rr = build(&BalanceMode::RoundRobin, &list);
    counts(rr.as_ref(), &list, 1000);
    list[0].set_weight(3);
    assert_shares(&counts(rr.as_ref(), &list, PICKS), &[0.6, 0.2, 0.2], 0.01);
}

#[test]
fn static_rr_ignores_run_time_weight_change() {
    let list = backends(&[5, 3, 2]);
    let srr = build(&BalanceMode::StaticRr, &list);
    list[2].set_weight(50);
    assert_shares(&counts(srr.as_ref(), &list, PICKS), &[0.5, 0.3, 0.2], 0.01);
    // Weight 0 still drains it: the proxy's `usable` excludes it.
    list[0].set_weight(0);
    assert_shares(&counts(srr.as_ref(), &list, PICKS), &[0.0, 0.6, 0.4], 0.01);
}

#[test]
fn least_conn_prefers_the_idle_backend() {
    let list = backends(&[1, 1, 1]);
    let lc = build(&BalanceMode::LeastConn, &list);
    let _busy = [0, 1, 1].map(|i| list[i].start_request());
    assert_eq!(counts(lc.as_ref(), &list, 1000), [0, 0, 1000]);
}

#[test]
fn least_conn_scales_in_flight_requests_by_weight() {
    let list = backends(&[3, 1]);
    let lc = build(&BalanceMode::LeastConn, &list);
    // Idle: ties are broken by weighted round-robin.
    assert_shares(&counts(lc.as_ref(), &list, PICKS), &[0.75, 0.25], 0.01);
    // b0 has 2 of 3 slots busy (2/3), b1 1 of 1 (1): b0 is less loaded.
    let _b0 = (list[0].start_request(), list[0].start_request());
    let _b1 = list[1].start_request();
    assert_eq!(counts(lc.as_ref(), &list, 100), [100, 0]);
    // Following the picks' own load: b0 takes requests until 3 of 3 busy, then they alternate.
    let req = at("/", &[]);
    let mut held = Vec::new();
    for _ in 0..8 {
        let p = req.pick(lc.as_ref(), &list).expect("usable");
        held.push(list[p].start_request());
    }
    let (a, b) = (list[0].active(), list[1].active());
    assert!(a.abs_diff(3 * b) <= 3, "active {a}:{b} should follow 3:1");
}

#[test]
fn least_conn_breaks_ties_round_robin() {
    let list = backends(&[1, 1, 1]);
    let lc = build(&BalanceMode::LeastConn, &list);
    assert_shares(&counts(lc.as_ref(), &list, PICKS), &[1.0 / 3.0; 3], 0.01);
}

#[test]
fn random_uses_every_backend_in_proportion_to_weight() {
    let list = backends(&[5, 3, 2]);
    let seeded = Random::with_seed(0x5eed);
    assert_shares(&counts(&seeded, &list, PICKS), &[0.5, 0.3, 0.2], 0.05);
    let random = build(&BalanceMode::Random, &list);
    let c = counts(random.as_ref(), &list, PICKS);
    assert!(c.iter().all(|&n| n > 0), "{c:?}");
    assert_shares(&c, &[0.5, 0.3, 0.2], 0.05);
}

#[test]
fn random_prefers_the_less_loaded_of_two() {
    let list = backends(&[1, 1, 1]);
    let random = build(&BalanceMode::Random, &list);
    let _busy = list[0].start_request();
    // The two choices are different backends, so the loaded one always loses.
    let c = counts(random.as_ref(), &list, PICKS);
    assert_eq!(c[0], 0, "{c:?}");
    assert_shares(&c, &[0.0, 0.5, 0.5], 0.05);
}

#[test]
fn ip_hash_sends_a_client_to_the_same_backend() {
    let list = backends(&[1, 1, 1]);
    let ih = build(&BalanceMode::IpHash, &list);
    for client in [[10, 0, 0, 1], [192, 168, 7, 9], [8, 8, 8, 8]] {
        let req = Req::from(client);
        let first = req.pick(ih.as_ref(), &list);
        assert!(first.is_some());
        assert!((0..100).all(|_| req.pick(ih.as_ref(), &list) == first));
    }
    let v6 = Req::from(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1));
    let first = v6.pick(ih.as_ref(), &list);
    assert!((0..100).all(|_| v6.pick(ih.as_ref(), &list) == first));
}

/// 1000 clients, each in its own /24.
fn thousand_clients() -> Vec<Req> {
    (0..1000u32)
        .map(|i| Req::from([10, (i >> 8) as u8, i as u8, 77]))
        .collect()
}

#[test]
fn ip_hash_spreads_clients() {
    let list = backends(&[1, 1, 1]);
    let ih = build(&BalanceMode::IpHash, &list);
    let mut c = [0usize; 3];
    for req in thousand_clients() {
        c[req.pick(ih.as_ref(), &list).expect("usable")] += 1;
    }
    assert!(c.iter().all(|&n| n >= 200), "{c:?}");
}

#[test]
fn ip_hash_clients_of_one_slash_24_share_a_backend() {
    // nginx semantics: the last octet is not part of the key, which is why everyone behind
    // one NAT range lands on one backend.
    let list = backends(&[1, 1, 1]);
    let ih = build(&BalanceMode::IpHash, &list);
    let first = Req::from([172, 16, 5, 0]).pick(ih.as_ref(), &list);
    assert!((0..=255).all(|last| Req::from([172, 16, 5, last]).pick(ih.as_ref(), &list) == first));
    // IPv4-mapped IPv6 (a dual-stack listener's view of an IPv4 client) counts as IPv4.
    let mapped = Req::from(Ipv4Addr::new(172, 16, 5, 9).to_ipv6_mapped());
    assert_eq!(mapped.pick(ih.as_ref(), &list), first);
}

/// Where each request goes, by backend name.
fn placement(balancer: &dyn Balancer, list: &[Arc<Backend>], reqs: &[Req]) -> Vec<String> {
    reqs.iter()
        .map(|r| list[r.pick(balancer, list).expect("usable")].name.clone())
        .collect()
}

#[test]
fn ip_hash_down_backend_moves_only_its_clients() {
    let list = backends(&[1, 1, 1]);
    let ih = build(&BalanceMode::IpHash, &list);
    let clients = thousand_clients();
    let before = placement(ih.as_ref(), &list, &clients);
    list[1].set_up(false);
    let after = placement(ih.as_ref(), &list, &clients);
    for (b, a) in before.iter().zip(&after) {
        assert_ne!(a, "b1");
        if b != "b1" {
            assert_eq!(a, b, "a client of a live backend moved");
        }
    }
    list[1].set_up(true);
    assert_eq!(
        placement(ih.as_ref(), &list, &clients),
        before,
        "clients return"
    );
}

/// The hashing modes with each key, for the determinism tests.
fn hash_modes(kind: HashType) -> Vec<BalanceMode> {
    vec![
        BalanceMode::Source(kind),
        BalanceMode::Uri(kind),
        BalanceMode::UrlParam("user".into(), kind),
        BalanceMode::Header("X-User".into(), kind),
        BalanceMode::CookieHash("sid".into(), kind),
    ]
}

#[test]
fn hashing_is_deterministic_and_spreads_keys() {
    let list = backends(&[1, 1, 1]);
    for kind in [HashType::Map, HashType::Consistent] {
        for mode in hash_modes(kind) {
            let balancer = build(&mode, &list);
            let mut c = [0usize; 3];
            for i in 0..300u32 {
                let key = format!("user{i}");
                let cookie = format!("a=1; sid={key}");
                let req = Req::new(
                    IpAddr::from((0x0a00_0000 + i * 7919).to_be_bytes()),
                    &format!("/u/{key}?user={key}"),
                    &[("x-user", &key), ("cookie", &cookie)],
                );
                let first = req.pick(balancer.as_ref(), &list).expect("usable");
                // Another balancer instance (another proxy, a restart) agrees.
                let other = build(&mode, &list);
                assert_eq!(req.pick(other.as_ref(), &list), Some(first), "{mode:?}");
                let mut again = (0..5).map(|_| req.pick(balancer.as_ref(), &list));
                assert!(again.all(|p| p == Some(first)), "{mode:?}");
                c[first] += 1;
            }
            assert!(c.iter().all(|&n| n >= 60), "{mode:?}: {c:?}");
        }
    }
}

#[test]
fn hashing_reads_exactly_its_key() {
    let list = backends(&[1, 1, 1]);
    let (map, ring) = (HashType::Map, HashType::Consistent);
    for i in 0..30 {
        let k = format!("k{i}");
        // Each pair carries the same key in different surroundings (round-robin would split
        // a pair: consecutive picks differ).
        let pairs = [
            (
                BalanceMode::Uri(map),
                at(&format!("/{k}?x=1"), &[]),
                at(&format!("/{k}?y"), &[]),
            ),
            (
                BalanceMode::UrlParam("user".into(), ring),
                at(&format!("/a?user={k}&x=1"), &[]),
                at(&format!("/b?x=2&user={k}"), &[]),
            ),
            (
                BalanceMode::Header("X-User".into(), map),
                at("/a", &[("x-user", &k)]),
                at("/b", &[("X-USER", &k)]),
            ),
            (
                BalanceMode::CookieHash("sid".into(), map),
                at("/", &[("cookie", &format!("x=9; sid={k}"))]),
                at(
                    "/",
                    &[("cookie", "a=1"), ("cookie", &format!("sid={k}; b=2"))],
                ),
            ),
            (
                BalanceMode::Source(ring),
                at(&format!("/{k}"), &[]),
                at("/b?user=z", &[("x-user", &k)]),
            ),
        ];
        for (mode, a, b) in pairs {
            let balancer = build(&mode, &list);
            let (pa, pb) = (
                a.pick(balancer.as_ref(), &list),
                b.pick(balancer.as_ref(), &list),
            );
            assert_eq!(pa, pb, "{mode:?} key {k}");
        }
    }
}

#[test]
fn missing_hash_key_falls_back_to_round_robin() {
    let list = backends(&[1, 1, 1]);
    let (map, ring) = (HashType::Map, HashType::Consistent);
    let param = |kind| BalanceMode::UrlParam("user".into(), kind);
    let header = |name: &str, kind| BalanceMode::Header(name.into(), kind);
    let cookie = |kind| BalanceMode::CookieHash("sid".into(), kind);
    let keyless = [
        (param(map), at("/a?users=1&user=&user", &[])),
        (param(ring), at("/a", &[])),
        (header("X-User", map), at("/", &[("x-other", "1")])),
        (header("bad header name", map), at("/", &[])),
        (header("X-User", ring), at("/", &[("x-user", "")])),
        (cookie(map), at("/", &[("cookie", "sid=; x")])),
        (cookie(ring), at("/", &[("cookie", ";;=;")])),
    ];
    for (mode, req) in keyless {
        let balancer = build(&mode, &list);
        let mut picks: Vec<_> = (0..3).map(|_| req.pick(balancer.as_ref(), &list)).collect();
        picks.sort();
        assert_eq!(picks, [Some(0), Some(1), Some(2)], "{mode:?}: round-robin");
    }
}

/// 10,000 keyed requests (distinct paths).
fn keys() -> Vec<Req> {
    (0..PICKS).map(|i| at(&format!("/item/{i}"), &[])).collect()
}

/// Share of keys that changed backend, asserting no key left a backend that is still there.
fn moved_share(before: &[String], after: &[String], removed: &str) -> f64 {
    let mut moved = 0;
    for (b, a) in before.iter().zip(after) {
        assert_ne!(a, removed);
        if b != a {
            assert_eq!(b, removed, "a key of a backend still present moved");
            moved += 1;
        }
    }
    moved as f64 / before.len() as f64
}

#[test]
fn consistent_hashing_moves_only_the_removed_backends_keys() {
    let reqs = keys();
    for n in [5usize, 10] {
        let list = backends(&vec![1; n]);
        let mode = BalanceMode::Uri(HashType::Consistent);
        let before = placement(build(&mode, &list).as_ref(), &list, &reqs);
        let limit = 1.3 / n as f64;
        for removed in [0, n / 2, n - 1] {
            let name = format!("b{removed}");
            // Down (the proxy's `usable` says no).
            let balancer = build(&mode, &list);
            list[removed].set_up(false);
            let after = placement(balancer.as_ref(), &list, &reqs);
            list[removed].set_up(true);
            let share = moved_share(&before, &after, &name);
            assert!(share > 0.0 && share <= limit, "n={n} down {name}: {share}");
            // Gone from a rebuilt list (positions shift; names stay).
            let rest: Vec<_> = list.iter().filter(|b| b.name != name).cloned().collect();
            let after = placement(build(&mode, &rest).as_ref(), &rest, &reqs);
            let share = moved_share(&before, &after, &name);
            assert!(
                share > 0.0 && share <= limit,
                "n={n} without {name}: {share}"
            );
        }
    }
}

#[test]
fn consistent_hashing_follows_weights() {
    let list = backends(&[1, 1, 2]);
    let balancer = build(&BalanceMode::Uri(HashType::Consistent), &list);
    let mut c = [0usize; 3];
    for r in keys() {
        c[r.pick(balancer.as_ref(), &list).expect("usable")] += 1;
    }
    assert_shares(&c, &[0.25, 0.25, 0.5], 0.05);
}

#[test]
fn map_hashing_remaps_most_keys_when_the_list_changes() {
    // Map hashing is `hash % total weight`: rebuilding without one of N backends changes the
    // modulus, so a key keeps its backend only by coincidence, about 1/(N-1) of the time and
    // (N-2)/(N-1) of the keys move, where a consistent ring moves only the removed ~1/N.
    let reqs = keys();
    for n in [5usize, 10] {
        let list = backends(&vec![1; n]);
        let mode = BalanceMode::Uri(HashType::Map);
        let before = placement(build(&mode, &list).as_ref(), &list, &reqs);
        let rest: Vec<_> = list[1..].to_vec();
        let after = placement(build(&mode, &rest).as_ref(), &rest, &reqs);
        let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count() as f64 / PICKS as f64;
        assert!(moved > 1.3 / n as f64, "n={n}: map moved only {moved}");
        assert!(moved > 0.6, "n={n}: map moved {moved}");
        // A backend merely down keeps its slots: only its keys move (rehashed over the rest).
        let balancer = build(&mode, &list);
        list[0].set_up(false);
        let after = placement(balancer.as_ref(), &list, &reqs);
        let share = moved_share(&before, &after, "b0");
        assert!(share <= 1.3 / n as f64, "n={n}: down moved {share}");
        list[0].set_up(true);
    }
}

const STICKY: &str = "srv";

fn sticky_mode() -> BalanceMode {
    BalanceMode::StickyCookie(StickyConfig {
        cookie: STICKY.into(),
        key: b"test key, not secret".to_vec(),
    })
}

/// Picks for a request with these `cookie` headers; returns the backend and the `name=value` of
/// the sticky cookie set on the response, if any.
fn sticky_visit(
    balancer: &dyn Balancer,
    list: &[Arc<Backend>],
    cookies: &[&str],
) -> (usize, Option<String>) {
    let headers: Vec<(&'static str, &str)> = cookies.iter().map(|c| ("cookie", *c)).collect();
    let req = at("/", &headers);
    let chosen = req.pick(balancer, list).expect("usable");
    let mut response = HeaderMap::new();
    response.append(SET_COOKIE, HeaderValue::from_static("app=1; Path=/"));
    balancer.on_response(&req.info(), &list[chosen], &mut response);
    let set: Vec<_> = response
        .get_all(SET_COOKIE)
        .iter()
        .flat_map(|v| v.to_str())
        .collect();
    assert!(
        set.contains(&"app=1; Path=/"),
        "the backend's own cookies stay"
    );
    let ours = set.iter().find(|v| v.starts_with("srv=")).map(|v| {
        assert!(v.ends_with("; Path=/; HttpOnly; SameSite=Lax"), "{v}");
        v.split(';').next().unwrap_or_default().to_string()
    });
    (chosen, ours)
}

#[test]
fn sticky_cookie_pins_and_sticks() {
    let list = backends(&[1, 1, 1]);
    let sticky = build(&sticky_mode(), &list);
    let (first, cookie) = sticky_visit(sticky.as_ref(), &list, &[]);
    let cookie = cookie.expect("the first response pins");
    assert!(cookie.starts_with(&format!("srv=b{first}.")), "{cookie}");
    let visit = |cookies: &[&str]| sticky_visit(sticky.as_ref(), &list, cookies);
    assert!((0..50).all(|_| visit(&[&cookie]) == (first, None)));
    let among_others = format!("a=1; {cookie}; b=2");
    assert_eq!(visit(&["x=1", &among_others]), (first, None));
}

#[test]
fn sticky_cookie_ignores_forged_cookies_and_repins() {
    let list = backends(&[1, 1, 1]);
    let sticky = build(&sticky_mode(), &list);
    let (first, cookie) = sticky_visit(sticky.as_ref(), &list, &[]);
    let cookie = cookie.expect("pinned");
    let other = (first + 1) % 3;
    let forged_name = cookie.replacen(&format!("b{first}."), &format!("b{other}."), 1);
    let last = if cookie.ends_with('A') { 'B' } else { 'A' };
    let forged_tag = format!("{}{last}", &cookie[..cookie.len() - 1]);
    let unsigned = format!("srv=b{other}");
    for forged in [forged_name, forged_tag, unsigned, "srv=garbage.%%%".into()] {
        let mut seen = Vec::new();
        for _ in 0..3 {
            let (chosen, set) = sticky_visit(sticky.as_ref(), &list, &[&forged]);
            let set = set.expect("a forged cookie is replaced");
            assert!(set.starts_with(&format!("srv=b{chosen}.")), "{set}");
            seen.push(chosen);
        }
        seen.sort();
        assert_eq!(
            seen,
            [0, 1, 2],
            "{forged}: round-robin, not the forged backend"
        );
    }
}

#[test]
fn sticky_cookie_repins_when_the_backend_is_unusable() {
    let list = backends(&[1, 1, 1]);
    let sticky = build(&sticky_mode(), &list);
    let (first, cookie) = sticky_visit(sticky.as_ref(), &list, &[]);
    let cookie = cookie.expect("pinned");
    list[first].set_up(false);
    let (moved, repinned) = sticky_visit(sticky.as_ref(), &list, &[&cookie]);
    assert_ne!(moved, first);
    let repinned = repinned.expect("re-pinned to the new backend");
    list[first].set_up(true);
    // The new pin holds, even though the old backend is back.
    assert_eq!(
        sticky_visit(sticky.as_ref(), &list, &[&repinned]),
        (moved, None)
    );
}

#[test]
fn cookie_balancers_read_only_the_last_cookie_of_their_name() {
    // What a backend's cookie jar (tower-cookies) and the session lookup read: the last one.
    let list = backends(&[1, 1, 1]);
    for kind in [HashType::Map, HashType::Consistent] {
        let balancer = build(&BalanceMode::CookieHash("sid".into(), kind), &list);
        for i in 0..30 {
            let key = format!("k{i}");
            let alone = at("/", &[("cookie", &format!("sid={key}"))]);
            let shadowed = at("/", &[("cookie", &format!("sid=first{i}; sid={key}"))]);
            let split = at(
                "/",
                &[
                    ("cookie", &format!("sid=first{i}")),
                    ("cookie", &format!("a=1; sid={key}")),
                ],
            );
            let expected = alone.pick(balancer.as_ref(), &list);
            for req in [shadowed, split] {
                assert_eq!(
                    req.pick(balancer.as_ref(), &list),
                    expected,
                    "{kind:?} {key}"
                );
            }
        }
    }

    let sticky = build(&sticky_mode(), &list);
    let (first, pin_first) = sticky_visit(sticky.as_ref(), &list, &[]);
    let (second, pin_second) = sticky_visit(sticky.as_ref(), &list, &[]);
    assert_ne!(first, second, "round-robin");
    let (pin_first, pin_second) = (pin_first.expect("pinned"), pin_second.expect("pinned"));
    let both = format!("{pin_first}; {pin_second}");
    assert_eq!(
        sticky_visit(sticky.as_ref(), &list, &[&both]),
        (second, None)
    );
    assert_eq!(
        sticky_visit(sticky.as_ref(), &list, &[&pin_second, &pin_first]),
        (first, None)
    );
    // A valid pin followed by a bad one: not pinned, re-pinned wherever it goes.
    let spoiled = format!("{pin_first}; srv=b{second}");
    let (chosen, repinned) = sticky_visit(sticky.as_ref(), &list, &[&spoiled]);
    let repinned = repinned.expect("the last cookie does not pin, so the response does");
    assert!(
        repinned.starts_with(&format!("srv=b{chosen}.")),
        "{repinned}"
    );
}

/// Every mode, with both hash types.
fn all_modes() -> Vec<BalanceMode> {
    let mut modes = vec![
        BalanceMode::RoundRobin,
        BalanceMode::StaticRr,
        BalanceMode::LeastConn,
        BalanceMode::Random,
        BalanceMode::IpHash,
        sticky_mode(),
    ];
    modes.extend(hash_modes(HashType::Map));
    modes.extend(hash_modes(HashType::Consistent));
    modes
}

/// xorshift64, for the property loop.
fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn nothing_usable_means_none() {
    let list = backends(&[1, 2, 3]);
    let req = at("/a?user=1", &[("x-user", "1"), ("cookie", "sid=1")]);
    for mode in all_modes() {
        let balancer = build(&mode, &list);
        assert_eq!(
            balancer.pick(&req.info(), &list, &|_| false),
            None,
            "{mode:?}"
        );
        assert_eq!(balancer.pick(&req.info(), &[], &|_| true), None, "{mode:?}");
    }
}

#[test]
fn no_algorithm_picks_an_unusable_backend() {
    let mut rng = 0x2545_f491_4f6c_dd1d_u64;
    let weights: Vec<u32> = (0..7).map(|_| (xorshift(&mut rng) % 5) as u32).collect();
    let list = backends(&weights);
    let sticky_cookie = {
        let pin = build(&sticky_mode(), &list);
        sticky_visit(pin.as_ref(), &list, &[]).1.expect("pinned")
    };
    for mode in all_modes() {
        let balancer = build(&mode, &list);
        for _ in 0..500 {
            let mask = xorshift(&mut rng) & 0x7f;
            let allowed = |b: &Backend| mask & (1 << b.index) != 0;
            let r = xorshift(&mut rng);
            let key = format!("{}", r % 50);
            // Sometimes the keys (and a valid sticky pin), sometimes not.
            let cookie = format!("sid={key}; {sticky_cookie}");
            let mut headers = vec![("cookie", if r & 1 == 0 { cookie.as_str() } else { "x" })];
            headers.extend((r & 2 == 0).then_some(("x-user", key.as_str())));
            let ip = IpAddr::from(((r >> 8) as u32).to_be_bytes());
            let req = Req::new(ip, &format!("/{key}?user={key}"), &headers);
            match balancer.pick(&req.info(), &list, &allowed) {
                None => assert_eq!(mask, 0, "{mode:?} found nothing in mask {mask:#b}"),
                Some(p) => assert!(allowed(&list[p]), "{mode:?} picked {p}, mask {mask:#b}"),
            }
        }
    }
}

#[test]
fn picks_are_safe_from_many_threads() {
    let list = backends(&[1, 1, 1]);
    let modes = [
        BalanceMode::RoundRobin,
        BalanceMode::LeastConn,
        BalanceMode::Random,
    ];
    for (mode, tolerance) in modes.into_iter().zip([0.001, 0.001, 0.05]) {
        let balancer: Arc<dyn Balancer> = Arc::from(build(&mode, &list));
        let per_thread: Vec<Vec<usize>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let (balancer, list) = (balancer.clone(), &list);
                    s.spawn(move || counts(balancer.as_ref(), list, 3000))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("no panic"))
                .collect()
        });
        let total: Vec<usize> = (0..3)
            .map(|i| per_thread.iter().map(|c| c[i]).sum())
            .collect();
        assert_shares(&total, &[1.0 / 3.0; 3], tolerance);
    }
}
