//! The proxy end to end: real sockets on loopback, real backends, a real session server.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use base64::Engine as _;
use http::StatusCode;
use proxy_plugin::config::{HealthCheckKind, LookupConfig, LookupFailure};
use proxy_plugin::metrics::RejectReason;
use support::backend::{Behaviour, TestBackend};
use support::eventually;
use support::proxy::{TestProxy, client, config};
use support::raw::{raw_exchange, read_head, read_until_close};
use support::session::TestSessionServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn lookup_config(server: &str, on_failure: LookupFailure) -> LookupConfig {
    LookupConfig {
        session_server: server.to_owned(),
        namespace: "shop".to_owned(),
        cookie: "sid".to_owned(),
        attrs: vec!["cart".to_owned()],
        on_failure,
        auth_token: None,
        timeout: Duration::from_millis(500),
        snapshot_keys: Vec::new(),
        snapshot_cookie: "sid_snap".to_owned(),
    }
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
    let response = raw_exchange(proxy.addr, request.as_bytes(), Duration::from_secs(5)).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");

    let seen = backend.last().expect("backend saw the request");
    let h = &seen.headers;
    assert_eq!(seen.target, "/hop?q=1");
    assert_eq!(h["host"], "example.test:8080", "the client's Host is kept");
    assert_eq!(h["x-forwarded-for"], "198.51.100.9, 127.0.0.1");
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
    cfg.lookup = Some(lookup_config("http://127.0.0.1:1", LookupFailure::Open));
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
async fn killed_backend_loses_its_traffic_without_a_failed_get() {
    let (a, b, c) = (
        TestBackend::start("a", Behaviour::Echo).await,
        TestBackend::start("b", Behaviour::Echo).await,
        TestBackend::start("c", Behaviour::Echo).await,
    );
    let mut cfg = config(&[&a, &b, &c]);
    cfg.health.kind = HealthCheckKind::Tcp;
    cfg.health.interval = Duration::from_millis(100);
    cfg.health.timeout = Duration::from_millis(200);
    cfg.health.max_fails = 0; // only the active check may take b down
    let proxy = TestProxy::start(cfg).await;
    let http = client();
    for _ in 0..6 {
        let response = http.get(proxy.url("/")).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }
    assert_eq!(b.hits(), 2);

    b.kill();
    let killed_at = Instant::now();
    for i in 0..60 {
        let response = http.get(proxy.url("/")).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "GET {i} after the kill");
    }
    let b_entry = proxy.proxy.backends()[1].clone();
    assert!(
        eventually(Duration::from_secs(2), || !b_entry.is_up()).await,
        "b marked down"
    );
    let marked_down = killed_at.elapsed();
    let (before_a, before_c) = (a.hits(), c.hits());
    for _ in 0..20 {
        let response = http.get(proxy.url("/")).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }
    assert_eq!(
        a.hits() + c.hits(),
        before_a + before_c + 20,
        "a and c take everything"
    );
    assert_eq!(proxy.proxy.metrics().rejects(RejectReason::BadGateway), 0);
    assert!(
        marked_down < Duration::from_millis(1500),
        "b marked down {marked_down:?} after the kill"
    );
}

#[tokio::test]
async fn post_to_a_resetting_backend_is_not_replayed_but_get_is_retried() {
    let reset = TestBackend::start("reset", Behaviour::Reset).await;
    let good = TestBackend::start("good", Behaviour::Echo).await;
    let mut cfg = config(&[&reset, &good]);
    cfg.health.max_fails = 0; // keep the resetting backend in rotation
    let proxy = TestProxy::start(cfg).await;
    let http = client();

    let mut statuses = Vec::new();
    for _ in 0..4 {
        let response = http
            .post(proxy.url("/order"))
            .body("buy 1")
            .send()
            .await
            .unwrap();
        statuses.push(response.status());
    }
    let failed = statuses
        .iter()
        .filter(|s| **s == StatusCode::BAD_GATEWAY)
        .count();
    let ok = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    assert_eq!(failed + ok, 4, "{statuses:?}");
    assert!(
        failed >= 1,
        "some POST went to the resetting backend: {statuses:?}"
    );
    assert_eq!(
        reset.hits(),
        failed,
        "each failed POST reached the backend once"
    );
    assert_eq!(
        good.hits(),
        ok,
        "no failed POST was replayed on the good backend"
    );

    for _ in 0..4 {
        let response = http.get(proxy.url("/")).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "GETs are retried");
    }
    assert!(
        proxy
            .proxy
            .render_metrics()
            .contains("proxy_retries_total{backend=\"reset\"}")
    );
}

#[tokio::test]
async fn slow_header_client_is_cut_at_the_timeout_while_others_are_served() {
    let backend = TestBackend::start("a", Behaviour::Echo).await;
    let mut cfg = config(&[&backend]);
    cfg.limits.header_read_timeout = Duration::from_secs(1);
    let proxy = TestProxy::start(cfg).await;

    let addr = proxy.addr;
    let slow = tokio::spawn(async move {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut read, mut write) = stream.into_split();
        let started = Instant::now();
        let writer = tokio::spawn(async move {
            for byte in b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
                if write.write_all(&[*byte]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), read.read_to_end(&mut out)).await;
        writer.abort();
        (
            String::from_utf8_lossy(&out).into_owned(),
            started.elapsed(),
        )
    });

    let http = client();
    let mut served = 0;
    while !slow.is_finished() {
        let response = http.get(proxy.url("/")).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        served += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (answer, elapsed) = slow.await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_millis(2500),
        "cut after {elapsed:?}"
    );
    assert!(served >= 5, "only {served} requests served meanwhile");
    assert_eq!(
        proxy.proxy.metrics().rejects(RejectReason::ClientTimeout),
        1
    );
}

#[tokio::test]
async fn a_two_megabyte_header_gets_431_and_a_large_legal_one_passes() {
    let backend = TestBackend::start("a", Behaviour::Echo).await;
    let proxy = TestProxy::start(config(&[&backend])).await; // max_header_bytes: 16 KiB

    let legal = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: {}\r\n\r\n",
        "b".repeat(12 * 1024)
    );
    let response = raw_exchange(proxy.addr, legal.as_bytes(), Duration::from_secs(5)).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");

    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut read, mut write) = stream.split();
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(2 * 1024 * 1024)
    );
    let writer = async {
        let _ = write.write_all(huge.as_bytes()).await;
    };
    let reader = async {
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), read.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    };
    let ((), answer) = tokio::join!(writer, reader);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");
    assert_eq!(
        backend.hits(),
        1,
        "the huge request never reached the backend"
    );
    assert_eq!(
        proxy.proxy.metrics().rejects(RejectReason::HeaderTooLarge),
        1
    );
}

#[tokio::test]
async fn silent_upstream_gets_504_within_response_timeout() {
    let backend = TestBackend::start("hang", Behaviour::Hang).await;
    let mut cfg = config(&[&backend]);
    cfg.limits.response_timeout = Duration::from_millis(500);
    let proxy = TestProxy::start(cfg).await;
    let started = Instant::now();
    let response = client().get(proxy.url("/")).send().await.unwrap();
    let elapsed = started.elapsed();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(
        elapsed >= Duration::from_millis(450) && elapsed < Duration::from_millis(1500),
        "504 after {elapsed:?}"
    );
}

#[tokio::test]
async fn body_over_max_body_bytes_gets_413_announced_or_streamed() {
    let backend = TestBackend::start("a", Behaviour::Echo).await;
    let mut cfg = config(&[&backend]);
    cfg.limits.max_body_bytes = 1024;
    cfg.limits.retry_buffer_bytes = 256;
    let proxy = TestProxy::start(cfg).await;
    let http = client();

    let response = http
        .post(proxy.url("/"))
        .body(vec![b'x'; 4096])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        backend.hits(),
        0,
        "refused before any backend was contacted"
    );

    let response = http
        .post(proxy.url("/"))
        .body(vec![b'x'; 1000])
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "a streamed body under the limit passes"
    );
    assert_eq!(response.headers()["x-body-len"], "1000");

    // Chunked (no length): streamed and cut past the limit.
    let mut request = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..8 {
        request.extend_from_slice(b"200\r\n");
        request.extend_from_slice(&[b'y'; 512]);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    let answer = raw_exchange(proxy.addr, &request, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert_eq!(proxy.proxy.metrics().rejects(RejectReason::BodyTooLarge), 2);
}

#[tokio::test]
async fn connections_over_max_connections_get_503() {
    let backend = TestBackend::start("a", Behaviour::Echo).await;
    let mut cfg = config(&[&backend]);
    cfg.limits.max_connections = 2;
    let proxy = TestProxy::start(cfg).await;
    let get = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";

    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        stream.write_all(get).await.unwrap();
        let head = read_head(&mut stream, Duration::from_secs(5)).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        held.push(stream);
    }
    let answer = raw_exchange(proxy.addr, get, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert_eq!(
        proxy
            .proxy
            .metrics()
            .rejects(RejectReason::TooManyConnections),
        1
    );

    drop(held.pop());
    let served = async {
        loop {
            let answer = raw_exchange(
                proxy.addr,
                b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                Duration::from_secs(5),
            )
            .await;
            if answer.starts_with("HTTP/1.1 200") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), served)
        .await
        .expect("a freed place is given to a new connection");
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
    cfg.lookup = Some(lookup_config(&sessions.url(), LookupFailure::Open));
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

    cfg.lookup = Some(lookup_config(&session_url, LookupFailure::Closed));
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
    let old = TestBackend::start("old", Behaviour::Echo).await;
    let new = TestBackend::start("new", Behaviour::Echo).await;
    let proxy = TestProxy::start(config(&[&old])).await;
    let http = client();

    let slow = tokio::spawn(http.get(proxy.url("/slow/800")).send());
    assert!(eventually(Duration::from_secs(5), || old.active() == 1).await);
    let mut cfg = config(&[&new]);
    cfg.limits.response_timeout = Duration::from_secs(3);
    proxy.proxy.reload(cfg).unwrap();
    assert_eq!(proxy.proxy.backends()[0].name, "new");

    for _ in 0..3 {
        let response = http.get(proxy.url("/")).send().await.unwrap();
        assert_eq!(response.text().await.unwrap(), "new");
    }
    let response = slow.await.unwrap().unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.text().await.unwrap(),
        "old",
        "the in-flight request finished on the old backend"
    );
    assert_eq!(old.hits(), 1);
}

#[tokio::test]
async fn shutdown_lets_the_request_in_flight_finish() {
    let backend = TestBackend::start("a", Behaviour::Echo).await;
    let proxy = TestProxy::start(config(&[&backend])).await;
    let http = client();
    let slow = tokio::spawn(http.get(proxy.url("/slow/500")).send());
    assert!(eventually(Duration::from_secs(5), || backend.active() == 1).await);
    let addr = proxy.addr;
    proxy.shutdown(Duration::from_secs(5)).await.unwrap();
    let response = slow.await.unwrap().unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.text().await.unwrap(), "a");
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "no longer accepting"
    );
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

#[tokio::test]
async fn keep_alive_connections_get_a_fresh_head_deadline_after_each_response() {
    let backend = TestBackend::start("a", Behaviour::Echo).await;
    let mut cfg = config(&[&backend]);
    cfg.limits.header_read_timeout = Duration::from_millis(300);
    let proxy = TestProxy::start(cfg).await;
    let get = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";

    // Idle after a response: closed without a word once the deadline passes.
    let mut idle = TcpStream::connect(proxy.addr).await.unwrap();
    idle.write_all(get).await.unwrap();
    let started = Instant::now();
    let answer = read_until_close(&mut idle, Duration::from_secs(5)).await;
    let elapsed = started.elapsed();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(answer.matches("HTTP/1.1").count(), 1, "{answer}");
    assert!(
        elapsed >= Duration::from_millis(250) && elapsed < Duration::from_secs(2),
        "{elapsed:?}"
    );

    // Part of a second head, then silence: 408.
    let mut slow = TcpStream::connect(proxy.addr).await.unwrap();
    slow.write_all(get).await.unwrap();
    let head = read_head(&mut slow, Duration::from_secs(5)).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    slow.write_all(b"GET / HT").await.unwrap();
    let answer = read_until_close(&mut slow, Duration::from_secs(5)).await;
    assert!(
        answer.ends_with(
            "HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
        ),
        "{answer:?}"
    );
}
