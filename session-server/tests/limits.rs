//! The session server's resource limits, as README's Configuration table describes them:
//! `--max-concurrent-streams` (one connection cannot open more streams, however it tries),
//! `--max-connections` (TLS handshakes under way included; past it a connection is closed at
//! once), `--handshake-timeout` (a silent socket closed, its place back),
//! `--max-watchers-per-namespace` and `--max-watchers` (RESOURCE_EXHAUSTED past them, a place
//! back when a stream ends), `--call-timeout` (DEADLINE_EXCEEDED, the caller's shorter `grpc-timeout`
//! honoured, Watch not bounded) and ListByUser's pages. In-process servers run both on the
//! caller's runtime (1 thread) and on serving threads (2) where the accept path matters.

mod support;

#[path = "limits/raw_h2.rs"]
// Some of its frames serve only the call-deadline tests, which need the Redis store.
#[cfg_attr(not(feature = "redis-store"), allow(dead_code))]
mod raw_h2;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

#[cfg(feature = "redis-store")]
use raw_h2::{END_STREAM, HEADERS, RST_STREAM};
use raw_h2::{GOAWAY, REFUSED_STREAM, RawH2, reset_code};
use session_proto::v1::session_store_client::SessionStoreClient;
use session_proto::v1::{CreateRequest, ListByUserRequest, WatchRequest};
use session_server::config::Settings;
use session_server::id::IdGenerator;
use session_server::service::{DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE};
use session_server::store::memory::MemoryStore;
use session_server::store::{NewSession, SessionStore};
use support::harness::TestServer;
use support::tls::{self, create_in_plaintext, create_on, create_over_tls};
use support::wait::{eventually, eventually_ok};
use test_pki::{Ca, PemDir};
use tokio::io::AsyncReadExt as _;
use tokio::net::TcpStream;
use tonic::Code;
#[cfg(feature = "redis-store")]
use tonic::transport::Channel;

/// The two accept paths: connections on the caller's runtime, and on serving threads.
const THREADS: [usize; 2] = [1, 2];

/// Bound on anything a test waits for: generous, for a loaded machine.
const WITHIN: Duration = Duration::from_secs(10);

/// The path of the Watch method.
const WATCH: &str = "/session.v1.SessionStore/Watch";

/// An in-process server over a memory store with `settings` on `threads` serving threads.
async fn start(mut settings: Settings, threads: usize) -> TestServer {
    settings.serve_threads = Some(threads);
    let store = Arc::new(MemoryStore::new(settings.max_session_bytes));
    TestServer::start(settings, store).await
}

/// A Watch of every session of `namespace`.
fn watch(namespace: &str) -> WatchRequest {
    WatchRequest {
        namespace: namespace.into(),
        user_id: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_cannot_open_more_streams_than_max_concurrent_streams() {
    // What an attacker opening streams by the thousand on one connection gets: the first 8
    // are served, every other one is refused with REFUSED_STREAM.
    const ATTEMPTED: u32 = 1000;
    for threads in THREADS {
        let settings = Settings {
            max_concurrent_streams: 8,
            ..Settings::default()
        };
        let server = start(settings, threads).await;
        let mut raw = RawH2::connect(server.addr).await;
        assert_eq!(raw.server_max_streams(WITHIN).await, Some(8), "advertised");
        let authority = server.addr.to_string();
        for n in 0..ATTEMPTED {
            raw.open_call(2 * n + 1, &authority, WATCH, &[]).await;
        }
        let mut refused = BTreeSet::new();
        while refused.len() < usize::try_from(ATTEMPTED - 8).unwrap() {
            let frame = raw
                .next(WITHIN)
                .await
                .unwrap_or_else(|| panic!("{threads} thread(s): only {} refused", refused.len()));
            assert_ne!(frame.kind, GOAWAY, "{threads} thread(s): {frame:?}");
            if let Some(code) = reset_code(&frame) {
                assert_eq!(code, REFUSED_STREAM, "{threads} thread(s): {frame:?}");
                refused.insert(frame.stream);
            }
        }
        let beyond_the_first_8: BTreeSet<u32> = (8..ATTEMPTED).map(|n| 2 * n + 1).collect();
        assert_eq!(refused, beyond_the_first_8, "{threads} thread(s)");
        // Meanwhile an honest client on a connection of its own is served.
        let created = create_in_plaintext(server.addr).await;
        assert!(created.is_ok(), "{threads} thread(s): {created:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_honest_client_past_max_concurrent_streams_waits_for_a_free_stream() {
    let settings = Settings {
        max_concurrent_streams: 8,
        ..Settings::default()
    };
    let server = start(settings, 1).await;
    let channel = server.channel().await;
    let mut client = SessionStoreClient::new(channel.clone());
    create_on(channel.clone()).await.expect("a first call");
    let mut watches = Vec::new();
    for _ in 0..8 {
        let stream = client.watch(watch("streams")).await.expect("a Watch");
        watches.push(stream.into_inner());
    }
    let ninth = tokio::spawn(create_on(channel.clone()));
    // Another connection is served while this one has every stream it may have.
    create_in_plaintext(server.addr)
        .await
        .expect("a call on a second connection");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!ninth.is_finished(), "a ninth stream went past the limit");
    assert_eq!(server.metrics.watchers(), 8);
    drop(watches.pop());
    let served = tokio::time::timeout(WITHIN, ninth)
        .await
        .expect("served once a stream is free")
        .expect("the call's task");
    assert!(served.is_ok(), "{served:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_max_connections_are_closed_until_one_ends() {
    for threads in THREADS {
        let settings = Settings {
            max_connections: 2,
            ..Settings::default()
        };
        let server = start(settings, threads).await;
        let first = server.channel().await;
        let second = server.channel().await;
        for channel in [&first, &second] {
            create_on(channel.clone())
                .await
                .expect("a call within the limit");
        }
        assert_eq!(server.metrics.connections_open(), 2, "{threads} thread(s)");
        let mut third = TcpStream::connect(server.addr)
            .await
            .expect("the kernel accepts");
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(WITHIN, third.read(&mut byte))
            .await
            .expect("closed at once, not left open");
        assert!(
            matches!(read, Ok(0) | Err(_)),
            "{threads} thread(s): {read:?}"
        );
        assert!(server.metrics.connections_refused() >= 1);
        // The connections within the limit are still served.
        create_on(second.clone())
            .await
            .expect("the second connection");
        drop(first);
        eventually("a closed connection gives its place back", WITHIN, || {
            let open = server.metrics.connections_open();
            async move { (open == 1).then_some(()) }
        })
        .await;
        let created = create_in_plaintext(server.addr).await;
        assert!(created.is_ok(), "{threads} thread(s): {created:?}");
    }
}

/// A silent socket: the server may write to it (its HTTP/2 SETTINGS), but must close it (EOF
/// or an error) within `WITHIN`.
async fn closed_by_the_server(mut socket: TcpStream, what: &str) {
    let mut bytes = [0u8; 1024];
    let closed = tokio::time::timeout(WITHIN, async {
        loop {
            match socket.read(&mut bytes).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "{what}: still open past the first-bytes deadline"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sockets_are_closed_after_the_handshake_timeout_and_give_their_place_back() {
    let dir = PemDir::new("limits_first_bytes");
    let ca = Ca::new("limits first bytes ca");
    for (tls_on, threads) in [(false, 1), (false, 2), (true, 1), (true, 2)] {
        let base = if tls_on {
            tls::settings(&dir, &ca, None)
        } else {
            Settings::default()
        };
        let settings = Settings {
            max_connections: 2,
            handshake_timeout: Duration::from_millis(300),
            ..base
        };
        let what = format!("tls {tls_on}, {threads} thread(s)");
        let server = start(settings, threads).await;
        // Two clients that connect and never send a byte hold both permits...
        let silent = [
            TcpStream::connect(server.addr).await.expect("connect"),
            TcpStream::connect(server.addr).await.expect("connect"),
        ];
        eventually("both permits taken", WITHIN, || {
            let open = server.metrics.connections_open();
            async move { (open == 2).then_some(()) }
        })
        .await;
        // ...only until the deadline: the server closes them and their places come back.
        for socket in silent {
            closed_by_the_server(socket, &what).await;
        }
        eventually("the silent sockets' places come back", WITHIN, || {
            let open = server.metrics.connections_open();
            async move { (open == 0).then_some(()) }
        })
        .await;
        // An honest client is served, and a call that takes longer than the deadline on an
        // established connection is not cut by it (its first bytes came in time).
        let created = if tls_on {
            create_over_tls(server.addr, ca.cert_pem(), None).await
        } else {
            create_in_plaintext(server.addr).await
        };
        assert!(created.is_ok(), "{what}: {created:?}");
        if !tls_on {
            let channel = server.channel().await;
            tokio::time::sleep(Duration::from_millis(600)).await;
            create_on(channel)
                .await
                .expect("an established connection outlives the first-bytes deadline");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_silent_after_its_tls_handshake_is_closed_after_the_handshake_timeout() {
    use rustls::pki_types::pem::PemObject as _;
    let dir = PemDir::new("limits_first_bytes_after_tls");
    let ca = Ca::new("limits first bytes after tls ca");
    let settings = Settings {
        max_connections: 1,
        handshake_timeout: Duration::from_millis(300),
        ..tls::settings(&dir, &ca, None)
    };
    let server = start(settings, 1).await;
    let mut roots = rustls::RootCertStore::empty();
    let ca_der = rustls::pki_types::CertificateDer::from_pem_slice(ca.cert_pem().as_bytes())
        .expect("the CA certificate");
    roots.add(ca_der).expect("a trust anchor");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS 1.2 and 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(server.addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from(tls::SERVER_NAME).expect("a name");
    let mut stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("the handshake");
    // Handshake done, then nothing: closed once the deadline passes, its place back.
    let mut bytes = [0u8; 1024];
    let closed = tokio::time::timeout(WITHIN, async {
        loop {
            match stream.read(&mut bytes).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "still open past the first-bytes deadline");
    eventually("its place comes back", WITHIN, || {
        let open = server.metrics.connections_open();
        async move { (open == 0).then_some(()) }
    })
    .await;
    let created = create_over_tls(server.addr, ca.cert_pem(), None).await;
    assert!(created.is_ok(), "{created:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_handshakes_under_way_count_against_max_connections() {
    let dir = PemDir::new("limits_tls_handshakes");
    let ca = Ca::new("limits ca");
    for threads in THREADS {
        let settings = Settings {
            max_connections: 2,
            ..tls::settings(&dir, &ca, None)
        };
        let server = start(settings, threads).await;
        // Two clients that connect and never start their handshake.
        let silent = [
            TcpStream::connect(server.addr).await.expect("connect"),
            TcpStream::connect(server.addr).await.expect("connect"),
        ];
        eventually("two handshakes under way", WITHIN, || {
            let open = server.metrics.connections_open();
            async move { (open == 2).then_some(()) }
        })
        .await;
        let refused = create_over_tls(server.addr, ca.cert_pem(), None).await;
        assert!(refused.is_err(), "{threads} thread(s): {refused:?}");
        assert!(server.metrics.connections_refused() >= 1);
        drop(silent);
        eventually_ok("served once the silent clients left", WITHIN, || {
            create_over_tls(server.addr, ca.cert_pem(), None)
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_past_max_watchers_per_namespace_are_resource_exhausted_until_one_ends() {
    let settings = Settings {
        max_watchers_per_namespace: 2,
        ..Settings::default()
    };
    let server = start(settings, 1).await;
    let mut client = server.client().await;
    let first = client.watch(watch("w")).await.expect("first").into_inner();
    let _second = client.watch(watch("w")).await.expect("second").into_inner();
    let refused = client.watch(watch("w")).await.expect_err("a third");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("max-watchers-per-namespace"),
        "{refused:?}"
    );
    assert_eq!(server.metrics.watchers_refused(), 1);
    let _other = client
        .watch(watch("other"))
        .await
        .expect("another namespace has its own count");
    // The client cancels one (drops it): its place comes back.
    drop(first);
    let mut third = eventually_ok("a cancelled Watch gives its place back", WITHIN, || {
        let mut client = client.clone();
        async move { client.watch(watch("w")).await }
    })
    .await
    .into_inner();
    assert_eq!(server.metrics.watchers(), 3);
    // And the stream that took it is served.
    let created = client
        .create(CreateRequest {
            namespace: "w".into(),
            ..CreateRequest::default()
        })
        .await
        .expect("create")
        .into_inner();
    let event = tokio::time::timeout(WITHIN, third.message())
        .await
        .expect("an event within the bound")
        .expect("the stream")
        .expect("not ended");
    assert_eq!(event.id, created.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_namespaces_do_not_get_round_max_watchers() {
    let settings = Settings {
        max_watchers_per_namespace: 2,
        max_watchers: 3,
        ..Settings::default()
    };
    let server = start(settings, 1).await;
    let mut client = server.client().await;
    let first = client.watch(watch("n1")).await.expect("n1").into_inner();
    let _second = client.watch(watch("n2")).await.expect("n2").into_inner();
    let _third = client.watch(watch("n3")).await.expect("n3").into_inner();
    let refused = client
        .watch(watch("n4"))
        .await
        .expect_err("a fourth, on a namespace of its own");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("--max-watchers)"), "{refused:?}");
    assert_eq!(server.metrics.watchers_refused(), 1);
    assert_eq!(server.metrics.watchers(), 3);
    drop(first);
    eventually_ok("a cancelled Watch gives its place back", WITHIN, || {
        let mut client = client.clone();
        async move { client.watch(watch("n4")).await }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_is_not_bounded_by_the_call_timeout() {
    let settings = Settings {
        call_timeout: Duration::from_millis(200),
        ..Settings::default()
    };
    let server = start(settings, 1).await;
    let mut client = server.client().await;
    let mut events = client
        .watch(watch("long"))
        .await
        .expect("watch")
        .into_inner();
    // Past the call timeout, on purpose.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let created = client
        .create(CreateRequest {
            namespace: "long".into(),
            ..CreateRequest::default()
        })
        .await
        .expect("create")
        .into_inner();
    let event = tokio::time::timeout(WITHIN, events.message())
        .await
        .expect("an event within the bound")
        .expect("the stream outlived the call timeout")
        .expect("not ended");
    assert_eq!(event.id, created.id);
}

/// A server over a Redis that accepts connections and never answers (a store too slow, not
/// gone), with a store timeout far above `call_timeout`: only the call's deadline can end a
/// call. The listener must outlive the server.
#[cfg(feature = "redis-store")]
async fn server_over_a_silent_redis(
    call_timeout: Duration,
) -> (
    TestServer,
    SessionStoreClient<Channel>,
    std::net::TcpListener,
) {
    let settings = Settings {
        store_timeout: Duration::from_secs(60),
        call_timeout,
        ..Settings::default()
    };
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("redis://{}", silent.local_addr().expect("address"));
    let store = Arc::new(support::harness::redis_store(
        &url,
        "call_timeout",
        &settings,
    ));
    let server = TestServer::start(settings, store).await;
    let client = server.client().await;
    (server, client, silent)
}

#[cfg(feature = "redis-store")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_past_the_call_timeout_is_deadline_exceeded() {
    use support::outage::fails_within;
    let call_timeout = Duration::from_millis(300);
    let (server, mut client, _silent) = server_over_a_silent_redis(call_timeout).await;
    for _ in 0..2 {
        let create = client.create(CreateRequest::default());
        fails_within("create", call_timeout, create, |status| {
            status.code() == Code::DeadlineExceeded && status.message().contains("call-timeout")
        })
        .await;
    }
    assert_eq!(server.metrics.calls("Create", Code::DeadlineExceeded), 2);
}

#[cfg(feature = "redis-store")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shorter_grpc_timeout_of_the_caller_is_answered_deadline_exceeded_not_cancelled() {
    // A tonic client ends such a call itself, CANCELLED "Timeout expired", before any answer
    // (session-client takes that as a timeout); what the server answers shows with a client
    // that waits for it, as other gRPC clients do. Several times: the server's deadline and
    // tonic's own timer for the same grpc-timeout must never let tonic's CANCELLED through.
    const CALLS: u32 = 5;
    let (server, _client, _silent) = server_over_a_silent_redis(Duration::from_secs(60)).await;
    let mut raw = RawH2::connect(server.addr).await;
    raw.server_max_streams(WITHIN).await;
    let authority = server.addr.to_string();
    let create = "/session.v1.SessionStore/Create";
    for n in 0..CALLS {
        let stream = 2 * n + 1;
        raw.open_call(stream, &authority, create, &[("grpc-timeout", "300m")])
            .await;
        raw.send_empty_message(stream).await;
        // The answer ends with trailers (a HEADERS frame that ends the stream), long before
        // the store's timeout.
        loop {
            let frame = raw.next(WITHIN).await.expect("an answer within the bound");
            assert!(
                !(frame.kind == RST_STREAM && frame.stream == stream),
                "call {n} reset: {frame:?}"
            );
            if frame.kind == HEADERS && frame.stream == stream && frame.flags & END_STREAM != 0 {
                break;
            }
        }
    }
    // Each answer was the server's deadline, which counts it; tonic's timer counts nothing.
    assert_eq!(
        server.metrics.calls("Create", Code::DeadlineExceeded),
        u64::from(CALLS)
    );
}

/// Makes `count` sessions of `user` straight in `store`; their ids, sorted.
async fn sessions_of(store: &MemoryStore, user: &str, count: usize) -> Vec<String> {
    let ids = IdGenerator::new();
    let mut made = Vec::with_capacity(count);
    for _ in 0..count {
        let new = NewSession {
            id: ids.generate().expect("random source"),
            namespace: "default".into(),
            user_id: user.into(),
            attrs: Default::default(),
            ttl: Duration::from_secs(3600),
        };
        made.push(store.create(new).await.expect("create").id);
    }
    made.sort();
    made
}

/// ListByUser of `user`, one page.
fn list(user: &str, page_size: u32, page_token: &str) -> ListByUserRequest {
    ListByUserRequest {
        namespace: String::new(),
        user_id: user.into(),
        page_size,
        page_token: page_token.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_by_user_pages_in_id_order_with_a_default_a_clamp_and_checked_tokens() {
    let settings = Settings::default();
    let store = Arc::new(MemoryStore::new(settings.max_session_bytes));
    let five = sessions_of(&store, "five", 5).await;
    let many = sessions_of(&store, "many", MAX_PAGE_SIZE + 1).await;
    let server = TestServer::start(settings, store).await;
    let mut client = server.client().await;

    // Three pages of two, two and one, in id order, the last with no token.
    let (mut seen, mut sizes, mut token) = (Vec::new(), Vec::new(), String::new());
    loop {
        let page = client.list_by_user(list("five", 2, &token)).await;
        let page = page.expect("a page").into_inner();
        sizes.push(page.sessions.len());
        seen.extend(page.sessions.into_iter().map(|s| s.id));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(sizes, [2, 2, 1]);
    assert_eq!(seen, five);

    // page_size 0: the default.
    let page = client.list_by_user(list("many", 0, "")).await;
    let page = page.expect("a default page").into_inner();
    assert_eq!(page.sessions.len(), DEFAULT_PAGE_SIZE);
    assert!(!page.next_page_token.is_empty());
    // Above the most: clamped, and the rest on the next page.
    for asked in [5000, u32::MAX] {
        let page = client.list_by_user(list("many", asked, "")).await;
        let page = page.expect("a clamped page").into_inner();
        assert_eq!(page.sessions.len(), MAX_PAGE_SIZE, "page_size {asked}");
        let last = client
            .list_by_user(list("many", asked, &page.next_page_token))
            .await;
        let last = last.expect("the last page").into_inner();
        assert!(last.next_page_token.is_empty());
        let ids: Vec<String> = page
            .sessions
            .into_iter()
            .chain(last.sessions)
            .map(|s| s.id)
            .collect();
        assert_eq!(ids, many, "page_size {asked}");
    }

    // A token the server did not make.
    let nuls = "A".repeat(43);
    for bad in ["not a token!", "c2hvcnQ", nuls.as_str()] {
        let refused = client.list_by_user(list("five", 2, bad)).await;
        let status = refused.expect_err(bad);
        assert_eq!(status.code(), Code::InvalidArgument, "{bad}: {status:?}");
    }
}
