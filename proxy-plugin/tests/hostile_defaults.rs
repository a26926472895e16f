//! The released `session-proxy` binary with its default limits and header rules (only a
//! listener on port 0, the admin API on port 0 and one backend are given), against each header
//! attack once over raw HTTP/1.1 sockets: spoofed `x-session-*` headers in any spelling and
//! names with `_` never reach the backend; a client's `X-Forwarded-For`, `X-Real-IP` and
//! `Forwarded` are replaced by its own address and its `X-Forwarded-Proto: https` by `http`;
//! two `Host` headers, none, or an absolute-form target naming another host are a 400 that
//! reaches nothing. Afterwards an honest request is served and the backend is still up.
//!
//! The default `--idle-timeout` (75 s) and `--body-read-timeout` (60 s) are not checked here:
//! the binary reports no effective configuration (its `--help` text states the defaults, and
//! `tests/config.rs` pins the values `config::load` gives without flags); `tests/slow_clients.rs`
//! exercises both timeouts with short values.

mod support;

use std::time::Duration;

use http::HeaderMap;
use support::backend::{Behaviour, Seen, TestBackend};
use support::proxy_process::ProxyProcess;
use support::raw::raw_exchange;

/// Bound on anything the test waits for: generous for a loaded machine, never reached when the
/// proxy answers (every exchange ends with the proxy closing the connection).
const PATIENCE: Duration = Duration::from_secs(10);

/// The attacker's forged address.
const FORGED: &str = "6.6.6.6";

/// Sends `head` (request line and headers, without the blank line that ends them) on a fresh
/// connection and returns the response and what the backend saw, if the request reached it.
async fn exchange(
    proxy: &ProxyProcess,
    backend: &TestBackend,
    head: &str,
) -> (String, Option<Seen>) {
    let before = backend.hits();
    let request = format!("{head}\r\n\r\n");
    let response = raw_exchange(proxy.addr, request.as_bytes(), PATIENCE).await;
    let seen = (backend.hits() > before).then(|| backend.last().expect("a request seen"));
    (response, seen)
}

/// Sends `head` with `Connection: close` and expects a 200 from the backend; what it saw.
async fn forwarded(proxy: &ProxyProcess, backend: &TestBackend, head: &str) -> Seen {
    let (response, seen) = exchange(proxy, backend, &format!("{head}\r\nConnection: close")).await;
    assert!(
        response.starts_with("HTTP/1.1 200"),
        "{head:?}: {response}; logs: {}",
        proxy.logs()
    );
    seen.unwrap_or_else(|| panic!("{head:?} did not reach the backend"))
}

/// The values of header `name` the backend saw, line by line.
fn lines(headers: &HeaderMap, name: &str) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect()
}

/// Every header the backend saw, as `name: value` lines, for failure messages and searches.
fn all_headers(headers: &HeaderMap) -> String {
    headers
        .iter()
        .map(|(name, value)| format!("{name}: {}\n", String::from_utf8_lossy(value.as_bytes())))
        .collect()
}

/// Fails unless the forwarding headers the backend saw name the client (127.0.0.1) and the
/// scheme it used (http), once each, with the forged address nowhere.
fn assert_forwarded_as_the_peer(seen: &Seen, attack: &str) {
    let h = &seen.headers;
    let all = all_headers(h);
    assert_eq!(
        lines(h, "x-forwarded-for"),
        ["127.0.0.1"],
        "{attack}: {all}"
    );
    assert_eq!(lines(h, "x-real-ip"), ["127.0.0.1"], "{attack}: {all}");
    let forwarded = lines(h, "forwarded");
    assert_eq!(forwarded.len(), 1, "{attack}: {all}");
    let pairs: Vec<&str> = forwarded[0].split(';').collect();
    assert!(pairs.contains(&"for=127.0.0.1"), "{attack}: {all}");
    assert!(pairs.contains(&"proto=http"), "{attack}: {all}");
    assert_eq!(lines(h, "x-forwarded-proto"), ["http"], "{attack}: {all}");
    assert!(!all.contains(FORGED), "{attack}: {all}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_default_limits_the_binary_refuses_every_header_attack() {
    let backend = TestBackend::start("b", Behaviour::Echo).await;
    let proxy = ProxyProcess::start(&["--backend", &format!("http://{},name=b", backend.addr)]);

    // Spoofed session identity in every spelling, and a name with `_`.
    let seen = forwarded(
        &proxy,
        &backend,
        "GET /spoof HTTP/1.1\r\nHost: shop.test\r\nx_session_user: admin\r\n\
         x-session_attr-role: admin\r\nX-Session-User: admin\r\nfoo_bar: 1\r\nX-Honest: yes",
    )
    .await;
    assert_eq!(seen.target, "/spoof");
    let all = all_headers(&seen.headers);
    assert_eq!(lines(&seen.headers, "x-honest"), ["yes"], "{all}");
    for name in seen.headers.keys() {
        let name = name.as_str();
        assert!(!name.contains('_'), "{name} reached the backend: {all}");
        assert!(
            !name.starts_with("x-session") && name != "foo-bar",
            "{name} reached the backend: {all}"
        );
    }
    assert!(!all.contains("admin"), "{all}");

    // Forged forwarding entries, one at a time and all at once, and a forged scheme.
    let claims = [
        format!("X-Forwarded-For: {FORGED}"),
        format!("X-Real-IP: {FORGED}"),
        format!("Forwarded: for={FORGED}"),
        "X-Forwarded-Proto: https".to_owned(),
        format!(
            "X-Forwarded-For: {FORGED}\r\nX-Real-IP: {FORGED}\r\nForwarded: for={FORGED}\r\n\
             X-Forwarded-Proto: https"
        ),
    ];
    for claim in &claims {
        let head = format!("GET /forged HTTP/1.1\r\nHost: shop.test\r\n{claim}");
        let seen = forwarded(&proxy, &backend, &head).await;
        assert_forwarded_as_the_peer(&seen, claim);
    }

    // Ambiguous or missing hosts: a 400 that reaches no backend.
    let refused = [
        "GET / HTTP/1.1\r\nHost: shop.test\r\nHost: evil.test",
        "GET / HTTP/1.1\r\nX-Honest: yes",
        "GET http://evil.test/ HTTP/1.1\r\nHost: shop.test",
    ];
    for head in refused {
        let (response, seen) = exchange(&proxy, &backend, head).await;
        assert!(response.starts_with("HTTP/1.1 400"), "{head:?}: {response}");
        assert!(seen.is_none(), "{head:?} reached the backend: {seen:?}");
    }

    // Afterwards an honest request on a fresh connection is served, and the backend is up.
    let seen = forwarded(&proxy, &backend, "GET /honest HTTP/1.1\r\nHost: shop.test").await;
    assert_eq!(seen.target, "/honest");
    assert_forwarded_as_the_peer(&seen, "an honest request");
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(PATIENCE)
        .build()
        .expect("reqwest client");
    let response = http
        .get(proxy.admin("/backends"))
        .send()
        .await
        .expect("the admin API answers");
    assert_eq!(response.status(), 200);
    let list: Vec<serde_json::Value> = response.json().await.expect("a JSON list");
    assert_eq!(list.len(), 1, "{list:?}");
    assert!(list.iter().all(|b| b["up"] == true), "{list:?}");

    let logs = proxy.logs();
    assert!(!logs.contains("panicked"), "{logs}");
}
