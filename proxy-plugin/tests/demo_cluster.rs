//! End to end with the real pieces: a session server, three `demo-app` instances with no session
//! state of their own (`--sessions proxy`), and `session-proxy` with the session-lookup plugin in
//! front, configured through the same flags an operator uses. Whatever the balancer, a logged-in
//! user stays logged in on every request, including when a backend dies.

mod support;

use std::sync::Arc;
use std::time::Duration;

use clap::Parser as _;
use proxy_plugin::config::{Cli, resolve};
use proxy_plugin::proxy::Proxy;
use reqwest::StatusCode;
use serde_json::Value;
use support::demo::DemoBackend;
use support::session::TestSessionServer;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A task that is aborted when the test lets go of it.
struct Running(JoinHandle<()>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A session server and three `--sessions proxy` demo backends.
async fn cluster() -> (TestSessionServer, Vec<DemoBackend>) {
    let sessions = TestSessionServer::start().await;
    let mut backends = Vec::new();
    for name in ["s1", "s2", "s3"] {
        backends.push(DemoBackend::proxy_mode(name, &sessions.url()).await);
    }
    (sessions, backends)
}

/// The proxy in front of `backends` with `balance`, configured by flags.
async fn proxy(
    backends: &[DemoBackend],
    balance: &[&str],
    session_server: &str,
) -> (String, Arc<Proxy>, Running) {
    let mut args = vec!["session-proxy".to_owned()];
    for b in backends {
        args.extend(["--backend".to_owned(), b.url.clone()]);
    }
    args.extend(balance.iter().map(|s| s.to_string()));
    for flag in [
        "--session-lookup",
        session_server,
        "--session-attr",
        "cart",
        "--health-check",
        "http:/healthz",
        "--health-interval",
        "100ms",
        "--health-timeout",
        "100ms",
        "--health-fall",
        "1",
    ] {
        args.push(flag.to_owned());
    }
    let config = resolve(Cli::try_parse_from(&args).unwrap(), None).unwrap();
    let proxy = Proxy::new(config).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn({
        let proxy = proxy.clone();
        async move {
            proxy.serve(listener, std::future::pending()).await.unwrap();
        }
    });
    (url, proxy, Running(task))
}

fn browser() -> reqwest::Client {
    reqwest::Client::builder()
        .cookie_store(true)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// Logs in through the proxy and checks 30 requests: every one knows the user; returns the
/// backends that served them.
async fn stays_logged_in(front: &str, user: &str) -> Vec<String> {
    let client = browser();
    let login = client
        .post(format!("{front}/login"))
        .form(&[("user", user)])
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), StatusCode::OK);
    let added = client
        .post(format!("{front}/cart/add"))
        .form(&[("item", "pen")])
        .send()
        .await
        .unwrap();
    assert_eq!(added.status(), StatusCode::OK);
    let mut served_by = Vec::new();
    for i in 0..30 {
        let me = client.get(format!("{front}/me")).send().await.unwrap();
        let status = me.status();
        let body: Value = me.json().await.unwrap_or(Value::Null);
        assert_eq!(status, StatusCode::OK, "request {i}: {body}");
        assert_eq!(body["user"], user, "request {i}");
        assert_eq!(
            body["cart_items"], 1,
            "request {i}: the cart came through the proxy's headers"
        );
        served_by.push(body["served_by"].as_str().unwrap().to_owned());
    }
    served_by
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logged_in_user_stays_logged_in_whatever_the_balancer() {
    let (sessions, backends) = cluster().await;
    let modes: [&[&str]; 10] = [
        &["--balance", "round-robin"],
        &["--balance", "static-rr"],
        &["--balance", "least-conn"],
        &["--balance", "random"],
        &["--balance", "ip-hash"],
        &["--balance", "source", "--hash-type", "consistent"],
        &["--balance", "uri"],
        &["--balance", "header:user-agent"],
        &["--balance", "cookie-hash:sid", "--hash-type", "consistent"],
        &["--balance", "sticky-cookie"],
    ];
    for (i, mode) in modes.iter().enumerate() {
        let (front, _proxy, _task) = proxy(&backends, mode, &sessions.url()).await;
        let served_by = stays_logged_in(&front, &format!("user{i}")).await;
        if mode[1] == "round-robin" {
            let mut distinct = served_by.clone();
            distinct.sort();
            distinct.dedup();
            assert_eq!(
                distinct.len(),
                3,
                "round-robin used every backend: {served_by:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_backend_costs_no_session_and_no_error() {
    let (sessions, backends) = cluster().await;
    let (front, proxy, _task) =
        proxy(&backends, &["--balance", "round-robin"], &sessions.url()).await;
    let client = browser();
    let login = client
        .post(format!("{front}/login"))
        .form(&[("user", "hal")])
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), StatusCode::OK);

    backends[1].kill(); // s2 dies: listener and pooled connections closed.
    for i in 0..40 {
        let me = client.get(format!("{front}/me")).send().await.unwrap();
        let status = me.status();
        let body: Value = me.json().await.unwrap_or(Value::Null);
        assert_eq!(status, StatusCode::OK, "request {i} after s2 died: {body}");
        assert_eq!(body["user"], "hal");
        assert_ne!(body["served_by"], "s2");
    }
    let down: Vec<_> = proxy
        .backends()
        .iter()
        .filter(|b| !b.is_up())
        .map(|b| b.authority.clone())
        .collect();
    assert_eq!(
        down,
        vec![backends[1].authority().to_owned()],
        "s2 marked down"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_claim_a_user_through_the_proxy() {
    let sessions = TestSessionServer::start().await;
    // Kept in a binding: a backend dropped is a backend killed.
    let backends = [DemoBackend::proxy_mode("s1", &sessions.url()).await];
    let (front, _proxy, _task) =
        proxy(&backends, &["--balance", "round-robin"], &sessions.url()).await;
    let me = reqwest::Client::new()
        .get(format!("{front}/me"))
        .header("x-session-user", "admin")
        .header("x-session-id", "A".repeat(32))
        .send()
        .await
        .unwrap();
    assert_eq!(
        me.status(),
        StatusCode::UNAUTHORIZED,
        "spoofed session headers reached the backend"
    );
}
