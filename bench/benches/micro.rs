//! Micro-benchmarks of the hot paths (issue 7): the cookie codec, id generation, every
//! balancer's pick, and the in-memory store's get and update.
//!
//! ```sh
//! cargo bench -p bench --bench micro -- --measurement-time 2 --warm-up-time 1
//! ```

// criterion_group! makes an undocumented public function.
#![allow(missing_docs)]

use std::collections::{BTreeMap, HashMap};
use std::hint::black_box;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use http::header::{COOKIE, SET_COOKIE};
use http::{HeaderMap, HeaderValue, Uri};
use proxy_plugin::backend::Backend;
use proxy_plugin::balance::{BalanceMode, HashType, RequestInfo, StickyConfig, build};
use session_client::cookie::{
    CookieCodec, CookieFormat, CookieKey, Encryption, KeyRing, Snapshot, unix_ms,
};
use session_server::id::IdGenerator;
use session_server::store::memory::MemoryStore;
use session_server::store::{NewSession, Patch, SessionStore};

/// Size of the attribute data in the cookie benchmark ("a 1 KB session").
const COOKIE_ATTR_BYTES: usize = 1024;
/// Sessions in the store for the get/update benchmarks.
const STORE_SESSIONS: usize = 10_000;
/// Attribute size of those sessions (the issue's 200 B).
const STORE_ATTR_BYTES: usize = 200;

fn snapshot_1kb() -> Snapshot {
    let now = unix_ms(SystemTime::now());
    // Two attributes adding up to 1 KiB of values, varied bytes (not all one value).
    let cart: Vec<u8> = (0..COOKIE_ATTR_BYTES - 24)
        .map(|i| (i % 251) as u8)
        .collect();
    Snapshot {
        id: IdGenerator::new().generate().expect("random id"),
        namespace: "default".to_owned(),
        user_id: "alice".to_owned(),
        attrs: BTreeMap::from([
            ("cart".to_owned(), cart),
            ("csrf".to_owned(), b"0123456789abcdef01234567".to_vec()),
        ]),
        version: 7,
        created_at_ms: now,
        issued_at_ms: now,
        expires_at_ms: now + 3_600_000,
        ttl_ms: 1_800_000,
        // As the store confirmed it: its epoch, no offline changes.
        epoch: "0123456789abcdef".to_owned(),
        base_version: 7,
        confirmed_at_ms: now,
        ..Default::default()
    }
}

fn cookie(c: &mut Criterion) {
    let snapshot = snapshot_1kb();
    let mut group = c.benchmark_group("cookie_1kb");
    for (name, encryption) in [
        ("plain", Encryption::None),
        ("aes256gcm", Encryption::Aes256Gcm),
    ] {
        let key = CookieKey::new(&[7u8; 32]).expect("cookie key");
        let codec = CookieCodec::new(KeyRing::new(vec![key]).expect("key ring"), encryption);
        let value = codec.encode(&snapshot).expect("encode");
        group.bench_function(BenchmarkId::new("encode", name), |b| {
            b.iter(|| codec.encode(black_box(&snapshot)).expect("encode"))
        });
        group.bench_function(BenchmarkId::new("decode", name), |b| {
            b.iter(|| codec.decode(black_box(&value)).expect("decode"))
        });
        group.bench_function(BenchmarkId::new("sign_verify", name), |b| {
            b.iter(|| {
                let value = codec.encode(black_box(&snapshot)).expect("encode");
                codec.decode(&value).expect("decode")
            })
        });
    }
    // The first release's format, still written on request during a rolling upgrade: the
    // reference the v2 figures are compared with in the same run.
    for (name, encryption) in [
        ("plain_v1", Encryption::None),
        ("aes256gcm_v1", Encryption::Aes256Gcm),
    ] {
        let key = CookieKey::new(&[7u8; 32]).expect("cookie key");
        let codec = CookieCodec::new(KeyRing::new(vec![key]).expect("key ring"), encryption)
            .with_format(CookieFormat::V1);
        group.bench_function(BenchmarkId::new("sign_verify", name), |b| {
            b.iter(|| {
                let value = codec.encode(black_box(&snapshot)).expect("encode");
                codec.decode(&value).expect("decode")
            })
        });
    }
    group.finish();
}

fn id_generation(c: &mut Criterion) {
    let ids = IdGenerator::new();
    c.bench_function("id_generate", |b| {
        b.iter(|| ids.generate().expect("random id"))
    });
}

fn backends(n: usize) -> Vec<Arc<Backend>> {
    (0..n)
        .map(|i| Arc::new(Backend::new(i, format!("b{i}"), "127.0.0.1:1", 1)))
        .collect()
}

fn usable(b: &Backend) -> bool {
    b.is_usable()
}

/// Every balancing mode, named, with the request headers it keys on.
fn modes() -> Vec<(&'static str, BalanceMode)> {
    use HashType::{Consistent, Map};
    vec![
        ("round_robin", BalanceMode::RoundRobin),
        ("static_rr", BalanceMode::StaticRr),
        ("least_conn", BalanceMode::LeastConn),
        ("random", BalanceMode::Random),
        ("ip_hash", BalanceMode::IpHash),
        ("source_map", BalanceMode::Source(Map)),
        ("source_consistent", BalanceMode::Source(Consistent)),
        ("uri_map", BalanceMode::Uri(Map)),
        ("uri_consistent", BalanceMode::Uri(Consistent)),
        (
            "url_param_consistent",
            BalanceMode::UrlParam("sid".to_owned(), Consistent),
        ),
        (
            "header_consistent",
            BalanceMode::Header("x-user".to_owned(), Consistent),
        ),
        (
            "cookie_hash_consistent",
            BalanceMode::CookieHash("SID".to_owned(), Consistent),
        ),
        (
            "sticky_cookie",
            BalanceMode::StickyCookie(StickyConfig {
                cookie: "STICKY".to_owned(),
                key: vec![9u8; 32],
            }),
        ),
    ]
}

fn balancers(c: &mut Criterion) {
    let ip: IpAddr = [10, 0, 0, 1].into();
    let uri: Uri = "/cart/items?sid=4f2a9c&page=2".parse().expect("uri");
    let mut group = c.benchmark_group("balance_pick");
    for n in [3, 10] {
        let list = backends(n);
        for (name, mode) in modes() {
            let balancer = build(&mode, &list);
            let mut headers = HeaderMap::new();
            headers.insert("x-user", HeaderValue::from_static("alice"));
            headers.insert(
                COOKIE,
                HeaderValue::from_static("SID=4f2a9c0d1e; theme=dark"),
            );
            if let BalanceMode::StickyCookie(config) = &mode {
                // Pick once without the cookie, and send back the cookie the balancer set, so
                // the measured pick verifies a real signed cookie.
                let info = RequestInfo {
                    client_ip: ip,
                    uri: &uri,
                    headers: &headers,
                };
                let chosen = balancer.pick(&info, &list, &usable).expect("a backend");
                let mut response = HeaderMap::new();
                balancer.on_response(&info, &list[chosen], &mut response);
                let set = response
                    .get(SET_COOKIE)
                    .and_then(|v| v.to_str().ok())
                    .expect("sticky Set-Cookie");
                let pair = set.split(';').next().expect("cookie pair");
                assert!(pair.starts_with(&config.cookie), "{set}");
                headers.insert(COOKIE, HeaderValue::from_str(pair).expect("cookie header"));
            }
            let info = RequestInfo {
                client_ip: ip,
                uri: &uri,
                headers: &headers,
            };
            group.bench_function(BenchmarkId::new(name, n), |b| {
                b.iter(|| balancer.pick(black_box(&info), &list, &usable))
            });
        }
    }
    group.finish();
}

fn memory_store(c: &mut Criterion) {
    // One thread: each call is driven by `block_on`, which adds a small constant to every
    // measurement (the store's own work never awaits).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let store = rt.block_on(async { MemoryStore::new(usize::MAX) });
    let ids = IdGenerator::new();
    let live: Vec<String> = (0..STORE_SESSIONS)
        .map(|i| {
            let id = ids.generate().expect("random id");
            let new = NewSession {
                id: id.clone(),
                namespace: "default".to_owned(),
                user_id: format!("user-{i}"),
                attrs: HashMap::from([("data".to_owned(), vec![b'x'; STORE_ATTR_BYTES])]),
                ttl: Duration::from_secs(86_400),
            };
            rt.block_on(store.create(new)).expect("create");
            id
        })
        .collect();
    let mut group = c.benchmark_group("memory_store");
    let mut i = 0usize;
    let mut next = || {
        i = (i + 7919) % live.len();
        &live[i]
    };
    group.bench_function("get", |b| {
        b.iter(|| {
            rt.block_on(store.get("default", next(), false))
                .expect("get")
        })
    });
    group.bench_function("get_touch", |b| {
        b.iter(|| {
            rt.block_on(store.get("default", next(), true))
                .expect("get")
        })
    });
    group.bench_function("update_one_attr", |b| {
        b.iter(|| {
            let patch = Patch {
                set: HashMap::from([("data".to_owned(), vec![b'y'; STORE_ATTR_BYTES])]),
                ..Patch::default()
            };
            rt.block_on(store.update("default", next(), patch))
                .expect("update")
        })
    });
    group.finish();
}

criterion_group!(benches, cookie, id_generation, balancers, memory_store);
criterion_main!(benches);
