//! README ("The proxy", header rules): the header hygiene and forwarding filters against the
//! real proxy, over raw HTTP/1.1 sockets, hyper HTTP/2 and HTTPS. Names with `_` are dropped
//! (kept with `allow_underscore_headers`), every `x-session-*` spelling is dropped, a client
//! that is not a trusted proxy cannot inject `X-Forwarded-For`, `X-Real-IP` or `Forwarded`
//! entries (a trusted one's chain is kept and the peer appended), `X-Forwarded-Proto` is the
//! real scheme, other scheme and client-address claims (`X-Forwarded-Ssl`, `True-Client-IP`,
//! …) and `_` spellings of forwarding headers are dropped, a non-ASCII `X-Forwarded-For` item
//! does not hide the client, bad `Host` headers (and an HTTP/2 `:authority` with userinfo) are
//! a 400, HTTP/2 cookie crumbs reach the backend as one
//! `Cookie`, and the session lookup reads the last `sid`. Each test also checks that honest
//! traffic still goes through.

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use proxy_plugin::config::{LookupFailure, ProxyConfig, TlsConfig};
use proxy_plugin::proxy::Proxy;
use proxy_plugin::tls::ListenerTls;
use rustls::pki_types::ServerName;
use support::backend::{Behaviour, Seen, TestBackend};
use support::lookup::Stack;
use support::proxy::{TestProxy, client, config};
use support::raw::raw_exchange;
use test_pki::{Ca, PemDir};
use tokio::net::{TcpListener, TcpStream};

/// Bound on anything a test waits for: generous, a passing test never waits it out.
const PATIENCE: Duration = Duration::from_secs(30);

/// Sends `request` (raw HTTP/1) and returns the response and what the backend saw, if the
/// request reached it.
async fn raw(proxy: &TestProxy, backend: &TestBackend, request: &str) -> (String, Option<Seen>) {
    let before = backend.hits();
    let response = raw_exchange(proxy.addr, request.as_bytes(), PATIENCE).await;
    let seen = (backend.hits() > before).then(|| backend.last().expect("a request seen"));
    (response, seen)
}

/// `GET {target}` over HTTP/2 (prior knowledge) with `headers` (repeated names are sent as
/// separate fields); the status.
async fn h2_get(proxy: &TestProxy, target: &str, headers: &[(&str, &str)]) -> StatusCode {
    let stream = TcpStream::connect(proxy.addr).await.expect("connect");
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("HTTP/2 handshake");
    tokio::spawn(connection);
    let mut request = Request::get(target);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Empty::<Bytes>::new()).expect("request");
    let response = tokio::time::timeout(PATIENCE, sender.send_request(request))
        .await
        .expect("an answer within the deadline")
        .expect("the proxy answers");
    assert_eq!(response.version(), http::Version::HTTP_2);
    let status = response.status();
    let _ = response.into_body().collect().await;
    status
}

/// The values of header `name` the backend saw, line by line.
fn lines(headers: &HeaderMap, name: &str) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .map(|v| v.to_str().expect("ascii").to_owned())
        .collect()
}

/// Whether any header the backend saw is an `x-session-*` one, in any spelling.
fn any_session_header(headers: &HeaderMap) -> bool {
    headers
        .keys()
        .any(|name| name.as_str().replace('_', "-").starts_with("x-session-"))
}

/// A proxy over `backend` with `allow_underscore_headers` as given.
async fn proxy_with(backend: &TestBackend, allow_underscores: bool) -> TestProxy {
    let mut cfg = config(&[backend]);
    cfg.allow_underscore_headers = allow_underscores;
    TestProxy::start(cfg).await
}

#[tokio::test]
async fn underscore_headers_are_dropped_over_http1_and_http2_unless_allowed() {
    let backend = TestBackend::start("a", Behaviour::Echo).await;
    for allowed in [false, true] {
        let proxy = proxy_with(&backend, allowed).await;

        let request = "GET /h1 HTTP/1.1\r\nHost: shop.test\r\nX_Custom: 1\r\n\
            X-Honest: yes\r\nConnection: close\r\n\r\n";
        let (response, seen) = raw(&proxy, &backend, request).await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        let seen = seen.expect("forwarded");
        assert_eq!(seen.headers["x-honest"], "yes");
        assert_eq!(
            seen.headers.contains_key("x_custom"),
            allowed,
            "h1: {seen:?}"
        );

        let headers = [("x_custom", "1"), ("x-honest", "yes")];
        let status = h2_get(&proxy, "http://shop.test/h2", &headers).await;
        assert_eq!(status, StatusCode::OK);
        let seen = backend.last().expect("forwarded");
        assert_eq!(seen.target, "/h2");
        assert_eq!(seen.headers["x-honest"], "yes");
        assert_eq!(
            seen.headers.contains_key("x_custom"),
            allowed,
            "h2: {seen:?}"
        );
        proxy.shutdown(PATIENCE).await.expect("proxy shutdown");
    }
}

#[tokio::test]
async fn session_headers_in_any_spelling_never_reach_a_backend() {
    let backend = TestBackend::start("a", Behaviour::Echo).await;
    let spoofed = [
        ("x_session_user", "admin"),
        ("x-session_attr-role", "cm9vdA=="),
        ("X_Session-Id", "forged"),
        ("x-session-user", "admin"),
    ];
    // Underscores allowed, so only the session rule can drop them.
    for allowed in [false, true] {
        let proxy = proxy_with(&backend, allowed).await;
        let mut request = client()
            .get(proxy.url("/me"))
            .header("x-sessionless", "kept");
        for (name, value) in spoofed {
            request = request.header(name, value);
        }
        let response = request.send().await.expect("proxy answers");
        assert_eq!(response.status(), StatusCode::OK);
        let seen = backend.last().expect("forwarded");
        assert!(!any_session_header(&seen.headers), "{:?}", seen.headers);
        assert_eq!(seen.headers["x-sessionless"], "kept");

        let h2: Vec<_> = spoofed
            .iter()
            .map(|(n, v)| (n.to_ascii_lowercase(), *v))
            .collect();
        let h2: Vec<(&str, &str)> = h2.iter().map(|(n, v)| (n.as_str(), *v)).collect();
        assert_eq!(
            h2_get(&proxy, "http://shop.test/", &h2).await,
            StatusCode::OK
        );
        let seen = backend.last().expect("forwarded");
        assert!(!any_session_header(&seen.headers), "h2: {:?}", seen.headers);
        proxy.shutdown(PATIENCE).await.expect("proxy shutdown");
    }

    // With the plugin on, the backend sees the store's user, once, and nothing of the client's.
    let stack = Stack::start(LookupFailure::Open, None, &[]).await;
    let mut request = stack
        .http
        .get(stack.proxy.url("/"))
        .header("cookie", format!("sid={}", stack.session.id));
    for (name, value) in spoofed {
        request = request.header(name, value);
    }
    let response = request.send().await.expect("proxy answers");
    assert_eq!(response.status(), StatusCode::OK);
    let seen = stack.backend.last().expect("forwarded");
    assert_eq!(lines(&seen.headers, "x-session-user"), ["alice"]);
    assert_eq!(seen.headers["x-session-id"], stack.session.id.as_str());
    for (name, _) in spoofed {
        let name = name.to_ascii_lowercase();
        if name.contains('_') {
            assert!(!seen.headers.contains_key(name.as_str()), "{name}");
        }
    }
    assert!(!seen.headers.contains_key("x-session-attr-role"));
}

/// The forwarding headers a client sends in [`forwarding_claims`].
const CLAIMS: &str = "X-Forwarded-For: 6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\n\
    Forwarded: for=6.6.6.6;proto=https\r\nX-Forwarded-Proto: https\r\n";

/// What the backend sees of [`CLAIMS`] sent with `Host: shop.test` through a proxy trusting
/// `trusted`, and of an honest request (no claims) on the same proxy.
async fn forwarding_claims(trusted: &str) -> (Seen, Seen) {
    let backend = TestBackend::start("a", Behaviour::Echo).await;
    let mut cfg: ProxyConfig = config(&[&backend]);
    cfg.trusted_proxies = trusted
        .split(',')
        .filter(|n| !n.is_empty())
        .map(|n| n.parse().expect("CIDR"))
        .collect();
    let proxy = TestProxy::start(cfg).await;
    let request = format!("GET / HTTP/1.1\r\nHost: shop.test\r\n{CLAIMS}Connection: close\r\n\r\n");
    let (response, claimed) = raw(&proxy, &backend, &request).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let honest = "GET / HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n";
    let (response, honest) = raw(&proxy, &backend, honest).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    (claimed.expect("forwarded"), honest.expect("forwarded"))
}

#[tokio::test]
async fn an_untrusted_client_cannot_inject_forwarding_entries() {
    let (claimed, honest) = forwarding_claims("").await;
    for seen in [&claimed, &honest] {
        let h = &seen.headers;
        assert_eq!(lines(h, "x-forwarded-for"), ["127.0.0.1"], "{h:?}");
        assert_eq!(lines(h, "x-real-ip"), ["127.0.0.1"]);
        assert_eq!(
            lines(h, "forwarded"),
            ["for=127.0.0.1;proto=http;host=shop.test"]
        );
        assert_eq!(lines(h, "x-forwarded-proto"), ["http"]);
        assert_eq!(lines(h, "x-forwarded-host"), ["shop.test"]);
    }
}

#[tokio::test]
async fn a_trusted_proxys_chain_is_kept_and_the_peer_appended() {
    let (claimed, honest) = forwarding_claims("127.0.0.0/8").await;
    let h = &claimed.headers;
    assert_eq!(lines(h, "x-forwarded-for"), ["6.6.6.6, 127.0.0.1"]);
    assert_eq!(
        lines(h, "x-real-ip"),
        ["6.6.6.6"],
        "the client the chain names"
    );
    assert_eq!(
        lines(h, "forwarded"),
        ["for=6.6.6.6;proto=https, for=127.0.0.1;proto=http;host=shop.test"]
    );
    assert_eq!(
        lines(h, "x-forwarded-proto"),
        ["https"],
        "a trusted peer's https"
    );

    // The trusted proxy's own request, without any claim.
    let h = &honest.headers;
    assert_eq!(lines(h, "x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(lines(h, "x-real-ip"), ["127.0.0.1"]);
    assert_eq!(
        lines(h, "forwarded"),
        ["for=127.0.0.1;proto=http;host=shop.test"]
    );
    assert_eq!(lines(h, "x-forwarded-proto"), ["http"]);
}

/// Scheme and client-address headers beyond the rebuilt ones, and `_` spellings of
/// forwarding headers, that a client sends in [`other_claims_reach_the_backend_only_from_a_trusted_peer`].
const OTHER_CLAIMS: [(&str, &str); 13] = [
    ("X-Forwarded-Ssl", "on"),
    ("X-Forwarded-Scheme", "https"),
    ("X-Url-Scheme", "https"),
    ("Front-End-Https", "on"),
    ("X-Forwarded-Port", "443"),
    ("X-Forwarded-Prefix", "/admin"),
    ("True-Client-IP", "6.6.6.6"),
    ("X-Client-IP", "6.6.6.6"),
    ("X-Cluster-Client-IP", "6.6.6.6"),
    ("X-Original-Forwarded-For", "6.6.6.6"),
    ("CF-Connecting-IP", "6.6.6.6"),
    ("Fastly-Client-IP", "6.6.6.6"),
    ("X-Forwarded-Host", "bank.test"),
];

/// A proxy over `backend` that keeps `_` names and trusts `trusted` (a CIDR, or none).
async fn permissive_proxy(backend: &TestBackend, trusted: Option<&str>) -> TestProxy {
    let mut cfg: ProxyConfig = config(&[backend]);
    cfg.allow_underscore_headers = true;
    cfg.trusted_proxies = trusted
        .map(|n| n.parse().expect("CIDR"))
        .into_iter()
        .collect();
    TestProxy::start(cfg).await
}

#[tokio::test]
async fn other_claims_reach_the_backend_only_from_a_trusted_peer() {
    let backend = TestBackend::start("a", Behaviour::Echo).await;
    let claims: String = OTHER_CLAIMS
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    let request = format!(
        "GET / HTTP/1.1\r\nHost: shop.test\r\n{claims}X_Forwarded_Proto: https\r\n\
        X_Real_IP: 6.6.6.6\r\nX_Custom: 1\r\nConnection: close\r\n\r\n"
    );
    for trusted in [None, Some("127.0.0.0/8")] {
        let proxy = permissive_proxy(&backend, trusted).await;
        let (response, seen) = raw(&proxy, &backend, &request).await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        let h = seen.expect("forwarded").headers;
        for (name, value) in &OTHER_CLAIMS[..OTHER_CLAIMS.len() - 1] {
            let want: &[&str] = if trusted.is_some() { &[value] } else { &[] };
            assert_eq!(lines(&h, name), want, "{name}, trusted {trusted:?}");
        }
        assert_eq!(lines(&h, "x-forwarded-host"), ["shop.test"], "rebuilt");
        // `_` spellings go even from a trusted peer with underscores allowed; others stay.
        assert!(!h.contains_key("x_forwarded_proto"), "{h:?}");
        assert!(!h.contains_key("x_real_ip"), "{h:?}");
        assert_eq!(lines(&h, "x_custom"), ["1"]);
        assert_eq!(lines(&h, "x-forwarded-proto"), ["http"]);
        assert_eq!(lines(&h, "x-real-ip"), ["127.0.0.1"]);
        proxy.shutdown(PATIENCE).await.expect("proxy shutdown");
    }
}

#[tokio::test]
async fn a_non_ascii_forwarded_for_item_does_not_hide_the_client() {
    let backend = TestBackend::start("a", Behaviour::Echo).await;
    let proxy = permissive_proxy(&backend, Some("127.0.0.0/8")).await;
    // The client sent `X-Forwarded-For: é`; the trusted proxy in front appended its address.
    let request = "GET / HTTP/1.1\r\nHost: shop.test\r\n\
        X-Forwarded-For: \u{e9}, 203.0.113.9\r\nConnection: close\r\n\r\n";
    let (response, seen) = raw(&proxy, &backend, request).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let h = seen.expect("forwarded").headers;
    assert_eq!(
        lines(&h, "x-real-ip"),
        ["203.0.113.9"],
        "not the trusted peer"
    );
    assert_eq!(
        lines(&h, "x-forwarded-for"),
        ["unknown, 203.0.113.9, 127.0.0.1"]
    );
    proxy.shutdown(PATIENCE).await.expect("proxy shutdown");
}

#[tokio::test]
async fn an_http2_authority_with_userinfo_is_a_400() {
    let backend = TestBackend::start("a", Behaviour::Echo).await;
    let proxy = proxy_with(&backend, false).await;
    let metrics = proxy.proxy.metrics();
    let before = backend.hits();
    let status = h2_get(&proxy, "http://user@shop.test/h2", &[]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(backend.hits(), before, "it never reached the backend");
    assert!(metrics.rejects_with(StatusCode::BAD_REQUEST, "invalid_host") >= 1);
    // The same request without userinfo goes through, its `:authority` as `Host`.
    let status = h2_get(&proxy, "http://shop.test/h2", &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        lines(&backend.last().expect("forwarded").headers, "host"),
        ["shop.test"]
    );
    proxy.shutdown(PATIENCE).await.expect("proxy shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_forwarded_proto_is_https_on_a_tls_listener() {
    let ca = Ca::new("hygiene");
    let dir = PemDir::new("proxy-hygiene");
    let (cert, key) = dir.write_leaf(&ca.localhost_server(), "proxy");
    let tls = ListenerTls::load(&TlsConfig { cert, key }).expect("the proxy's certificate");
    let backend = TestBackend::start("a", Behaviour::Echo).await;
    let proxy = Proxy::new(config(&[&backend])).expect("proxy");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let serving = tokio::spawn(proxy.serve_tls(listener, tls, std::future::pending()));

    let mut client_config = ca.rustls_client_config();
    client_config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("localhost").expect("name");
    let stream = tokio::time::timeout(
        PATIENCE,
        tokio_rustls::TlsConnector::from(Arc::new(client_config)).connect(name, tcp),
    )
    .await
    .expect("handshake in time")
    .expect("TLS handshake");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("HTTP/1.1 handshake");
    tokio::spawn(connection);
    for claims in [
        &[][..],
        &[
            ("x-forwarded-proto", "http"),
            ("x-forwarded-for", "6.6.6.6"),
        ],
    ] {
        let mut request = Request::get("/tls").header("host", "localhost");
        for (name, value) in claims {
            request = request.header(*name, *value);
        }
        let request = request.body(Empty::<Bytes>::new()).expect("request");
        // The connection is ready again once the previous response is read to its end.
        sender.ready().await.expect("the connection stays open");
        let response = tokio::time::timeout(PATIENCE, sender.send_request(request))
            .await
            .expect("an answer in time")
            .expect("the proxy answers");
        assert_eq!(response.status(), StatusCode::OK);
        let _ = response.into_body().collect().await;
        let h = backend.last().expect("forwarded").headers;
        assert_eq!(lines(&h, "x-forwarded-proto"), ["https"], "{claims:?}");
        assert_eq!(lines(&h, "x-forwarded-for"), ["127.0.0.1"], "{claims:?}");
        assert_eq!(
            lines(&h, "forwarded"),
            ["for=127.0.0.1;proto=https;host=localhost"]
        );
    }
    serving.abort();
}

#[tokio::test]
async fn bad_host_headers_are_a_400_on_http1() {
    let backend = TestBackend::start("a", Behaviour::Echo).await;
    let proxy = proxy_with(&backend, false).await;
    let metrics = proxy.proxy.metrics();
    let refused = [
        (
            "GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n",
            "duplicate_host",
        ),
        (
            "GET / HTTP/1.1\r\nHost: a.test\r\nHost: a.test\r\n\r\n",
            "duplicate_host",
        ),
        ("GET / HTTP/1.1\r\nX-Honest: yes\r\n\r\n", "missing_host"),
        (
            "GET http://a.test/abs HTTP/1.1\r\nHost: b.test\r\n\r\n",
            "host_mismatch",
        ),
        (
            "GET http://a.test/abs HTTP/1.1\r\nHost: a.test:8080\r\n\r\n",
            "host_mismatch",
        ),
        (
            "GET / HTTP/1.1\r\nHost: user@a.test\r\n\r\n",
            "invalid_host",
        ),
    ];
    for (request, reason) in refused {
        let (response, seen) = raw(&proxy, &backend, request).await;
        assert!(
            response.starts_with("HTTP/1.1 400"),
            "{request:?}: {response}"
        );
        assert!(
            response.to_ascii_lowercase().contains("connection: close"),
            "{response}"
        );
        assert!(seen.is_none(), "{request:?} reached the backend");
        assert!(
            metrics.rejects_with(StatusCode::BAD_REQUEST, reason) >= 1,
            "{reason}"
        );
    }
    assert_eq!(
        metrics.rejects_with(StatusCode::BAD_REQUEST, "duplicate_host"),
        2
    );

    // Honest requests: origin-form, absolute-form naming the same host, HTTP/1.0 without Host.
    let honest = [
        (
            "GET /ok HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
            "/ok",
            Some("a.test"),
        ),
        (
            "GET http://A.test:80/abs?q=1 HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
            "/abs?q=1",
            Some("a.test"),
        ),
        ("GET /old HTTP/1.0\r\n\r\n", "/old", None),
    ];
    for (request, target, host) in honest {
        let (response, seen) = raw(&proxy, &backend, request).await;
        assert!(response.contains(" 200 OK"), "{request:?}: {response}");
        let seen = seen.expect("forwarded");
        assert_eq!(seen.target, target);
        if let Some(host) = host {
            assert_eq!(lines(&seen.headers, "host"), [host]);
        }
    }
}

#[tokio::test]
async fn http2_cookie_crumbs_reach_the_backend_as_one_header() {
    let backend = TestBackend::start("a", Behaviour::Echo).await;
    let proxy = proxy_with(&backend, false).await;
    let crumbs = [("cookie", "a=1"), ("cookie", "sid=abc"), ("cookie", "b=2")];
    let status = h2_get(&proxy, "http://shop.test/crumbs", &crumbs).await;
    assert_eq!(status, StatusCode::OK);
    let seen = backend.last().expect("forwarded");
    assert_eq!(lines(&seen.headers, "cookie"), ["a=1; sid=abc; b=2"]);
    assert_eq!(lines(&seen.headers, "host"), ["shop.test"]);

    // One cookie header stays as it is.
    let status = h2_get(&proxy, "http://shop.test/one", &[("cookie", "a=1; b=2")]).await;
    assert_eq!(status, StatusCode::OK);
    let seen = backend.last().expect("forwarded");
    assert_eq!(lines(&seen.headers, "cookie"), ["a=1; b=2"]);
}

#[tokio::test]
async fn the_session_lookup_reads_the_last_sid_cookie() {
    let stack = Stack::start(LookupFailure::Open, None, &[]).await;
    let alice = stack.session.id.clone();
    let unknown = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";

    let reply = stack.get("/", &format!("sid={alice}")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("x-session-user"), Some("alice"), "honest");

    let reply = stack.get("/", &format!("sid={unknown}; sid={alice}")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.header("x-session-user"),
        Some("alice"),
        "the last sid"
    );
    assert_eq!(reply.header("x-session-id"), Some(alice.as_str()));

    let reply = stack
        .get("/", &format!("sid={alice}; theme=dark; sid={unknown}"))
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.header("x-session-user"),
        None,
        "the last sid is unknown"
    );
    assert_eq!(stack.lookups("missing"), 1);

    // Over HTTP/2, as separate cookie crumbs.
    let crumbs = [
        ("cookie", format!("sid={unknown}")),
        ("cookie", format!("sid={alice}")),
    ];
    let crumbs: Vec<(&str, &str)> = crumbs.iter().map(|(n, v)| (*n, v.as_str())).collect();
    let status = h2_get(&stack.proxy, "http://shop.test/", &crumbs).await;
    assert_eq!(status, StatusCode::OK);
    let seen = stack.backend.last().expect("forwarded");
    assert_eq!(lines(&seen.headers, "x-session-user"), ["alice"]);
    assert_eq!(
        lines(&seen.headers, "cookie"),
        [format!("sid={unknown}; sid={alice}")]
    );
}
