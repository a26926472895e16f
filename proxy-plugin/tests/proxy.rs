//! The proxy end to end: real sockets on loopback, real backends, a real session server:
//! balancing, forwarding headers, the session-lookup plugin, reload and shutdown with a request
//! in flight, HTTP/2 clients. Limits and timeouts are in `limits.rs`, failing backends in
//! `failover.rs`.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use base64::Engine as _;
use http::StatusCode;
use proxy_plugin::balance::{BalanceMode, StickyConfig};
use proxy_plugin::config::{LookupConfig, LookupFailure};
use support::backend::{Behaviour, TestBackend};
use support::eventually;
use support::lookup::lookup_config;
use support::proxy::{TestProxy, client, config};
use support::raw::raw_exchange;
use support::session::TestSessionServer;
use tokio::net::TcpStream;

/// Bound on any wait for a condition: generous, a passing test never waits it out.
const PATIENCE: Duration = Duration::from_secs(30);

/// The plugin over `server`, without snapshot keys.
fn lookup_without_keys(server: &str, on_failure: LookupFailure) -> LookupConfig {
    lookup_config(server, on_failure, &[])
}

#[tokio::test]
async fn round_robin_spreads_requests_over_three_backends() {
    let (a, b, c) = (
        TestBackend::start("a", Behaviour::Echo).await,
        TestBackend::start("b", Behaviour::Echo).await,
        TestBackend::start("c", Behaviour::Echo).await,
    );
    let proxy = TestProxy::start(config(&[&a, &b, &c])).await;
    let http = client();
    let mut order = Vec::new();
    for _ in 0..9 {
        let response = http.get(proxy.url("/")).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        order.push(response.text().await.unwrap());
    }
    assert_eq!(
        (a.hits(), b.hits(), c.hits()),
        (3, 3, 3),
        "order: {order:?}"
    );
    assert_eq!(
        order[0..3],
        order[3..6],
        "the same cycle repeats: {order:?}"
    );
    let metrics = proxy.proxy.render_metrics();
    assert!(
        metrics.contains("proxy_requests_total{backend=\"a\",status=\"200\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("proxy_upstream_latency_seconds_count{backend=\"b\"} 3"),
        "{metrics}"
    );
}

#[tokio::test]
async fn forwarding_headers_are_added_and_hop_by_hop_headers_removed() {
    let backend = TestBackend::start("a", Behaviour::Echo).await;
    let proxy = TestProxy::start(config(&[&backend])).await;
    let request = "GET /hop?q=1 HTTP/1.1\r\nHost: example.test:8080\r\n\
        Connection: close, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\n\
        Proxy-Authorization: Basic eA==\r\nTE: trailers\r\nUpgrade: h2c\r\n\
        X-Forwarded-For: 198.51.100.9\r\nX-End-To-End: yes\r\n\r\n";
    let response = raw_exchange(proxy.addr, request.as_bytes(), PATIENCE).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");

    let seen = backend.last().expect("backend saw the request");
    let h = &seen.headers;
    assert_eq!(seen.target, "/hop?q=1");
    assert_eq!(h["host"], "example.test:8080", "the client's Host is kept");
    // Nobody is trusted: the client's own X-Forwarded-For is replaced, not appended to.
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "example.test:8080");
    assert_eq!(
        h["forwarded"],
        "for=127.0.0.1;proto=http;host=\"example.test:8080\""
    );
    assert_eq!(h["x-end-to-end"], "yes");
    for hop in [
        "x-hop",
        "keep-alive",
        "proxy-authorization",
        "te",
        "upgrade",
        "transfer-encoding",
    ] {
        assert!(!h.contains_key(hop), "{hop} reached the backend: {h:?}");
    }

    let lower = response.to_ascii_lowercase();
    assert!(lower.contains("x-end-to-end: kept"), "{response}");
    for hop in ["x-resp-hop", "keep-alive:", "proxy-authenticate"] {
        assert!(!lower.contains(hop), "{hop} reached the client: {response}");
    }
}

#[tokio::test]
async fn forwarded_and_https_claims_are_believed_from_trusted_proxies_only() {
    let backend = TestBackend::start("a", Behaviour::Echo).await;
    let request = "GET /claims HTTP/1.1\r\nHost: shop.test\r\n\
        Forwarded: for=203.0.113.9;proto=https;host=bank.example\r\n\
        X-Forwarded-Proto: https\r\nConnection: close\r\n\r\n";
    let sticky = BalanceMode::StickyCookie(StickyConfig {
        cookie: "stickless_backend".into(),
        key: vec![7; 32],
    });
    // (trusted proxies, the Forwarded the backend sees, its X-Forwarded-Proto)
    let cases = [
        // Nobody trusted (the default): a client on the plaintext listener claims nothing.
        (vec![], "for=127.0.0.1;proto=http;host=shop.test", "http"),
        // A TLS-terminating load balancer the proxy trusts: its element and its https kept.
        (
            vec!["127.0.0.0/8".parse().unwrap()],
            "for=203.0.113.9;proto=https;host=bank.example, \
             for=127.0.0.1;proto=http;host=shop.test",
            "https",
        ),
    ];
    for (trusted, forwarded, proto) in cases {
        let mut cfg = config(&[&backend]);
        cfg.trusted_proxies = trusted;
        cfg.balance = sticky.clone();
        let proxy = TestProxy::start(cfg).await;
        let response = raw_exchange(proxy.addr, request.as_bytes(), PATIENCE).await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        let seen = backend.last().expect("backend saw the request");
        let lines: Vec<_> = seen.headers.get_all("forwarded").iter().collect();
        assert_eq!(lines, [forwarded], "{proto}");
        assert_eq!(seen.headers["x-forwarded-proto"], proto);
        // The cookie the proxy sets is Secure exactly when the client used https.
        let cookie = response
            .lines()
            .find(|line| {
                line.to_ascii_lowercase()
                    .starts_with("set-cookie: stickless_backend=")
            })
            .unwrap_or_else(|| panic!("a sticky cookie: {response}"));
        assert_eq!(
            cookie.split(';').any(|a| a.trim() == "Secure"),
            proto == "https",
            "{cookie}"
        );
        proxy.shutdown(PATIENCE).await.expect("proxy shutdown");
    }
}

#[tokio::test]
async fn spoofed_session_headers_never_reach_a_backend_plugin_off_or_on() {
    let backend = TestBackend::start("a", Behaviour::Echo).await;
    let mut cfg = config(&[&backend]);
    let proxy = TestProxy::start(cfg.clone()).await;
    let http = client();
    let send = |url: String| {
        http.get(url)
            .header("x-session-user", "admin")
            .header("X-Session-Attr-Role", "cm9vdA==")
            .header("x-session-id", "forged")
            .header("cookie", "sid=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")
            .send()
    };
    assert_eq!(send(proxy.url("/")).await.unwrap().status(), StatusCode::OK);
    let seen = backend.last().unwrap();
    assert!(
        !seen
            .headers
            .keys()
            .any(|k| k.as_str().starts_with("x-session-")),
        "plugin off: {:?}",
        seen.headers
    );

    // Plugin on, session store unreachable, fail-open: still nothing from the client.
    cfg.lookup = Some(lookup_without_keys(
        "http://127.0.0.1:1",
        LookupFailure::Open,
    ));
    proxy.proxy.reload(cfg).unwrap();
    assert_eq!(send(proxy.url("/")).await.unwrap().status(), StatusCode::OK);
    let seen = backend.last().unwrap();
    assert!(
        !seen
            .headers
            .keys()
            .any(|k| k.as_str().starts_with("x-session-")),
        "plugin on: {:?}",
        seen.headers
    );
    assert_eq!(backend.hits(), 2);
}

#[tokio::test]
async fn session_lookup_forwards_the_session_and_applies_the_failure_policy() {
    let sessions = TestSessionServer::start().await;
    let store = sessions.client("shop");
    let session = store
        .create(
            "alice",
            HashMap::from([("cart".to_owned(), b"[1,2]".to_vec())]),
            None,
        )
        .await
        .unwrap();
    let backend = TestBackend::start("a", Behaviour::Echo).await;
    let mut cfg = config(&[&backend]);
    cfg.lookup = Some(lookup_without_keys(&sessions.url(), LookupFailure::Open));
    let proxy = TestProxy::start(cfg.clone()).await;
    let http = client();
    let cookie = format!("theme=dark; sid={}", session.id);

    let response = http
        .get(proxy.url("/me"))
        .header("cookie", &cookie)
        .header("x-session-user", "mallory")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let h = backend.last().unwrap().headers;
    assert_eq!(h["x-session-id"], session.id.as_str());
    assert_eq!(
        h["x-session-user"], "alice",
        "the spoofed user was replaced"
    );
    assert_eq!(h.get_all("x-session-user").iter().count(), 1);
    let cart = base64::engine::general_purpose::STANDARD.encode(b"[1,2]");
    assert_eq!(h["x-session-attr-cart"], cart.as_str());

    // Unknown session: forwarded without session headers.
    http.get(proxy.url("/me"))
        .header("cookie", "sid=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")
        .send()
        .await
        .unwrap();
    assert!(!backend.last().unwrap().headers.contains_key("x-session-id"));

    let session_url = sessions.url();
    sessions.stop().await;
    let response = http
        .get(proxy.url("/me"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK, "fail-open forwards");
    let h = backend.last().unwrap().headers;
    assert!(
        !h.keys().any(|k| k.as_str().starts_with("x-session-")),
        "{h:?}"
    );

    cfg.lookup = Some(lookup_without_keys(&session_url, LookupFailure::Closed));
    proxy.proxy.reload(cfg).unwrap();
    let hits = backend.hits();
    let response = http
        .get(proxy.url("/me"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "fail-closed refuses"
    );
    assert_eq!(backend.hits(), hits);
    // Without a cookie there is nothing to look up, so even fail-closed forwards.
    let response = http.get(proxy.url("/")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn reload_swaps_backends_without_dropping_an_in_flight_request() {
    let old = TestBackend::start("old", Behaviour::Hold).await;
    let new = TestBackend::start("new", Behaviour::Echo).await;
    let mut cfg = config(&[&old]);
    cfg.limits.response_timeout = PATIENCE;
    let proxy = TestProxy::start(cfg.clone()).await;
    let http = client();

    let in_flight = tokio::spawn(http.get(proxy.url("/")).send());
    assert!(eventually(PATIENCE, || old.active() == 1).await);
    cfg.backends = vec![new.config()];
    proxy.proxy.reload(cfg).unwrap();
    assert_eq!(proxy.proxy.backends()[0].name, "new");

    for _ in 0..3 {
        let response = http.get(proxy.url("/")).send().await.unwrap();
        assert_eq!(response.text().await.unwrap(), "new");
    }
    assert!(!in_flight.is_finished(), "held by the old backend");
    old.release();
    let response = in_flight.await.unwrap().unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.text().await.unwrap(),
        "old",
        "the in-flight request finished on the old backend"
    );
    assert_eq!((old.hits(), new.hits()), (1, 3));
}

#[tokio::test]
async fn shutdown_stops_accepting_and_lets_the_request_in_flight_finish() {
    let backend = TestBackend::start("a", Behaviour::Hold).await;
    let mut cfg = config(&[&backend]);
    cfg.limits.response_timeout = PATIENCE;
    let proxy = TestProxy::start(cfg).await;
    let http = client();
    let in_flight = tokio::spawn(http.get(proxy.url("/")).send());
    assert!(eventually(PATIENCE, || backend.active() == 1).await);

    let addr = proxy.addr;
    let stopping = tokio::spawn(proxy.shutdown(PATIENCE));
    let deadline = Instant::now() + PATIENCE;
    while TcpStream::connect(addr).await.is_ok() {
        assert!(Instant::now() < deadline, "still accepting after shutdown");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!stopping.is_finished(), "stopped with a request in flight");
    backend.release();
    stopping.await.unwrap().unwrap();
    let response = in_flight.await.unwrap().unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.text().await.unwrap(), "a");
}

#[tokio::test]
async fn http2_clients_are_served_and_their_authority_becomes_host() {
    use http_body_util::BodyExt as _;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let backend = TestBackend::start("a", Behaviour::Echo).await;
    let proxy = TestProxy::start(config(&[&backend])).await;
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    for _ in 0..2 {
        let request = http::Request::get("http://shop.test/h2")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.version(), http::Version::HTTP_2);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "a");
    }
    let seen = backend.last().unwrap();
    assert_eq!(seen.headers["host"], "shop.test");
    assert_eq!(seen.headers["x-forwarded-host"], "shop.test");
}
