//! The admin API's protection, on the `session-proxy` binary as an operator runs it: the
//! bearer token (`--admin-token`, `--admin-token-file` and its environment twin, re-read on
//! SIGHUP) on every call, the refusal of cross-site writes (an `Origin` header, a content type
//! other than JSON), and the refusal to start with a non-loopback `--admin-listen` and no
//! token. Every proxy here listens on port 0 and reports its addresses.

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use reqwest::{Method, RequestBuilder, StatusCode};
use support::backend::{Behaviour, TestBackend};
use support::proxy_process::{ProxyProcess, command, run_bounded, run_command_bounded};

/// Generous bound on anything the tests wait for (a loaded 2-core machine is slow, never this
/// slow).
const PATIENCE: Duration = Duration::from_secs(30);
/// The token the tests configure.
const TOKEN: &str = "admin-s3cret-7f3a";

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(PATIENCE)
        .build()
        .unwrap()
}

/// A backend named `alpha` and its `--backend` flag value.
async fn alpha() -> (TestBackend, String) {
    let backend = TestBackend::start("alpha", Behaviour::Echo).await;
    let flag = format!("http://{},name=alpha", backend.addr);
    (backend, flag)
}

/// `http://ADMIN{path}` on the loopback address of the admin listener (which may be bound to
/// `0.0.0.0`).
fn admin_url(proxy: &ProxyProcess, path: &str) -> String {
    let admin = proxy.admin_addr.expect("started with --admin-listen");
    format!("http://127.0.0.1:{}{path}", admin.port())
}

/// Alpha's weight, read with `token` (if any).
async fn weight(proxy: &ProxyProcess, http: &reqwest::Client, token: Option<&str>) -> u64 {
    let mut request = http.get(admin_url(proxy, "/backends/alpha"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200, "{}", proxy.logs());
    let backend: serde_json::Value = response.json().await.unwrap();
    backend["weight"].as_u64().unwrap()
}

/// `PUT /backends/alpha/weight` with the JSON content type and `body`.
fn put_weight(proxy: &ProxyProcess, http: &reqwest::Client, body: &'static str) -> RequestBuilder {
    http.put(admin_url(proxy, "/backends/alpha/weight"))
        .header("content-type", "application/json")
        .body(body)
}

/// A token file in a directory of its own, removed on drop.
struct TokenFile {
    dir: PathBuf,
    path: PathBuf,
}

impl TokenFile {
    fn with(name: &str, text: &str) -> TokenFile {
        let dir = std::env::temp_dir().join(format!(
            "stickless-admin-test-{}-{name}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let file = TokenFile {
            path: dir.join("admin-token"),
            dir,
        };
        file.write(text);
        file
    }

    fn write(&self, text: &str) {
        std::fs::write(&self.path, text).unwrap();
    }

    fn path(&self) -> &str {
        self.path.to_str().unwrap()
    }
}

impl Drop for TokenFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_every_admin_call_needs_it() {
    let (_backend, flag) = alpha().await;
    let proxy = ProxyProcess::start(&["--backend", &flag, "--admin-token", TOKEN]);
    let http = http_client();

    let calls: [(Method, &str, Option<&'static str>); 6] = [
        (Method::GET, "/backends", None),
        (Method::GET, "/backends/alpha", None),
        (Method::HEAD, "/backends", None),
        (Method::GET, "/metrics", None),
        (Method::GET, "/no-such-endpoint", None),
        (Method::PUT, "/backends/alpha/weight", Some("4")),
    ];
    for (method, path, body) in &calls {
        let request = || {
            let request = http
                .request(method.clone(), admin_url(&proxy, path))
                .header("content-type", "application/json");
            match body {
                Some(body) => request.body(*body),
                None => request,
            }
        };
        let missing = request().send().await.unwrap();
        assert_eq!(missing.status(), 401, "{method} {path} without a token");
        let challenge = missing.headers()["www-authenticate"].to_str().unwrap();
        assert!(challenge.starts_with("Bearer"), "{challenge}");

        for wrong in [
            "wrong-token",
            &TOKEN[..TOKEN.len() - 1],
            &format!("{TOKEN}x"),
        ] {
            let response = request().bearer_auth(wrong).send().await.unwrap();
            assert_eq!(response.status(), 401, "{method} {path} with {wrong:?}");
            assert!(response.headers().contains_key("www-authenticate"));
        }
        for header in [
            format!("Basic {TOKEN}"),
            TOKEN.to_owned(),
            "Bearer ".to_owned(),
        ] {
            let response = request()
                .header("authorization", header.clone())
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 401, "{method} {path} with {header:?}");
        }
        assert_eq!(weight(&proxy, &http, Some(TOKEN)).await, 1, "unchanged");

        let right = request().bearer_auth(TOKEN).send().await.unwrap();
        let expected = if *path == "/no-such-endpoint" {
            StatusCode::NOT_FOUND
        } else {
            StatusCode::OK
        };
        assert_eq!(right.status(), expected, "{method} {path} with the token");
    }
    assert_eq!(
        weight(&proxy, &http, Some(TOKEN)).await,
        4,
        "the PUT with the token"
    );

    // The scheme is case-insensitive (RFC 7235).
    let response = put_weight(&proxy, &http, "6")
        .header("authorization", format!("bearer {TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(weight(&proxy, &http, Some(TOKEN)).await, 6);

    let logs = proxy.terminate().await;
    assert!(!logs.contains(TOKEN), "the token is never logged: {logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_site_writes_are_refused_and_json_ones_accepted() {
    let (_backend, flag) = alpha().await;
    // Loopback, no token: only the cross-site rules stand between a web page and the API.
    let proxy = ProxyProcess::start(&["--backend", &flag]);
    let http = http_client();
    assert_eq!(weight(&proxy, &http, None).await, 1);

    let with_origin = put_weight(&proxy, &http, "0")
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(with_origin.status(), 403);
    assert_eq!(weight(&proxy, &http, None).await, 1, "unchanged after 403");
    let null_origin = put_weight(&proxy, &http, "0")
        .header("origin", "null")
        .send()
        .await
        .unwrap();
    assert_eq!(null_origin.status(), 403, "any Origin value");
    let preflight = http
        .request(Method::OPTIONS, admin_url(&proxy, "/backends/alpha/weight"))
        .header("origin", "https://evil.example")
        .header("access-control-request-method", "PUT")
        .send()
        .await
        .unwrap();
    assert_eq!(preflight.status(), 403, "CORS preflight");

    for content_type in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        Some("application/jsonp"),
        None,
    ] {
        let mut request = http
            .post(admin_url(&proxy, "/backends/alpha/weight"))
            .body("0");
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 415, "{content_type:?}");
        assert_eq!(weight(&proxy, &http, None).await, 1, "unchanged after 415");
    }

    let response = put_weight(&proxy, &http, "5").send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(weight(&proxy, &http, None).await, 5);
    let response = http
        .post(admin_url(&proxy, "/backends/alpha/weight"))
        .header("content-type", "Application/JSON; charset=utf-8")
        .body("0")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "parameters and case allowed");
    assert_eq!(weight(&proxy, &http, None).await, 0, "drained");
    for bad in ["\"5\"", "5.5", "{\"weight\":5}", "", "1001"] {
        let response = put_weight(&proxy, &http, bad).send().await.unwrap();
        assert_eq!(response.status(), 400, "body {bad:?}");
    }

    // Reads stay open to a page's Origin: they change nothing.
    let read = http
        .get(admin_url(&proxy, "/backends"))
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), 200);
    proxy.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_a_cross_site_write_is_still_refused() {
    let (_backend, flag) = alpha().await;
    let proxy = ProxyProcess::start(&["--backend", &flag, "--admin-token", TOKEN]);
    let http = http_client();
    let response = put_weight(&proxy, &http, "3")
        .bearer_auth(TOKEN)
        .header("origin", "http://127.0.0.1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    let response = http
        .put(admin_url(&proxy, "/backends/alpha/weight"))
        .bearer_auth(TOKEN)
        .header("content-type", "text/plain")
        .body("3")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 415);
    assert_eq!(weight(&proxy, &http, Some(TOKEN)).await, 1);
    proxy.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_loopback_admin_listener_needs_a_token_to_start() {
    let (_backend, flag) = alpha().await;
    for address in ["0.0.0.0:0", "[::]:0"] {
        let out = run_bounded(&["--backend", &flag, "--admin-listen", address]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{address}: {stderr}");
        let line = stderr
            .lines()
            .find(|line| line.contains("refusing to serve the admin API"))
            .unwrap_or_else(|| panic!("{address}: {stderr}"));
        assert!(
            line.contains("--admin-token-file") && line.contains("loopback"),
            "{line}"
        );
        assert!(out.stdout.is_empty(), "bound something: {:?}", out.stdout);
    }

    let mut started = command();
    started.args([
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "0.0.0.0:0",
        "--admin-token",
        TOKEN,
        "--backend",
        &flag,
    ]);
    let proxy = ProxyProcess::spawn(started, &["proxy", "admin"]);
    let bound: SocketAddr = proxy.admin_addr.unwrap();
    assert!(bound.ip().is_unspecified(), "{bound}");
    let http = http_client();
    let url = admin_url(&proxy, "/backends");
    assert_eq!(http.get(&url).send().await.unwrap().status(), 401);
    let response = http.get(&url).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(response.status(), 200);
    proxy.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_file_is_read_at_start_and_again_on_sighup() {
    let (_backend, flag) = alpha().await;
    let file = TokenFile::with("sighup", "# session-proxy admin token\n\n  first-token  \n");
    let mut started = command();
    started
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(["--backend", &flag])
        .env("STICKLESS_PROXY_ADMIN_TOKEN_FILE", file.path());
    let mut proxy = ProxyProcess::spawn(started, &["proxy", "admin"]);
    let http = http_client();
    let url = admin_url(&proxy, "/backends");
    let status = |token: &'static str| {
        let request = http.get(&url).bearer_auth(token).send();
        async move { request.await.unwrap().status() }
    };
    assert_eq!(status("first-token").await, 200);
    assert_eq!(status("second-token").await, 401);

    file.write("second-token\n");
    proxy.signal("HUP");
    let deadline = Instant::now() + PATIENCE;
    while status("second-token").await != 200 {
        assert!(Instant::now() < deadline, "not reloaded: {}", proxy.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status("first-token").await, 401, "the old token is gone");

    // A file left empty is refused and the running token kept.
    file.write("# nothing yet\n");
    proxy.signal("HUP");
    let deadline = Instant::now() + PATIENCE;
    while !proxy.logs().contains("holds no token") {
        assert!(Instant::now() < deadline, "not refused: {}", proxy.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(proxy.is_running());
    assert_eq!(status("second-token").await, 200);
    let logs = proxy.terminate().await;
    assert!(
        !logs.contains("first-token") && !logs.contains("second-token"),
        "{logs}"
    );
}

#[test]
fn an_empty_token_file_or_two_token_flags_exit_2() {
    let empty = TokenFile::with("empty", "");
    let token_file = TokenFile::with("both", "t0ken\n");
    let cases: [(&[&str], &str); 3] = [
        (&["--admin-token-file", empty.path()], "holds no token"),
        (
            &[
                "--admin-token",
                "x",
                "--admin-token-file",
                token_file.path(),
            ],
            "both given",
        ),
        (
            &["--admin-token-file", "/nonexistent/admin-token"],
            "cannot read the admin token file",
        ),
    ];
    for (args, expected) in cases {
        let out = run_bounded(
            &[
                &[
                    "--backend",
                    "http://127.0.0.1:1",
                    "--admin-listen",
                    "127.0.0.1:0",
                ],
                args,
            ]
            .concat(),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}: bound something");
    }
}

#[test]
fn a_bad_secret_is_refused_with_exit_2_without_quoting_it() {
    // Not a valid token (a space, non-ASCII) nor key material (not hex or base64 of 32 bytes).
    const SECRET: &str = "s3cret tok\u{e9}n";
    let lookup: &[&str] = &["--session-lookup", "http://127.0.0.1:1"];
    let cases: [(&str, &[&str], &str); 4] = [
        (
            "STICKLESS_PROXY_ADMIN_TOKEN",
            &["--admin-listen", "127.0.0.1:0"],
            "--admin-token",
        ),
        ("STICKLESS_AUTH_TOKEN", lookup, "--session-auth-token"),
        (
            "STICKLESS_PROXY_STICKY_KEY",
            &["--balance", "sticky-cookie"],
            "--sticky-key",
        ),
        (
            "STICKLESS_PROXY_SESSION_SNAPSHOT_KEYS",
            lookup,
            "--session-snapshot-key",
        ),
    ];
    for (variable, args, flag) in cases {
        // From the environment (`hide_env_values`), and as the flag itself.
        let mut by_env = command();
        by_env
            .args(["--listen", "127.0.0.1:0", "--backend", "http://127.0.0.1:1"])
            .args(args)
            .env(variable, SECRET);
        let mut by_flag = command();
        by_flag
            .args(["--listen", "127.0.0.1:0", "--backend", "http://127.0.0.1:1"])
            .args(args)
            .args([flag, SECRET]);
        for (how, run) in [("env", by_env), ("flag", by_flag)] {
            let out = run_command_bounded(run);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{variable} by {how}: {stderr}");
            assert!(stderr.contains(flag), "{variable} by {how}: {stderr}");
            assert!(
                !stderr.contains("s3cret"),
                "{variable} by {how}: the secret is quoted: {stderr}"
            );
            assert!(out.stdout.is_empty(), "bound something: {:?}", out.stdout);
        }
    }
}
