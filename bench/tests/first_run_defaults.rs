//! A first run on defaults (issue 15): `session-server`, `demo-app --sessions proxy` and
//! `session-proxy --session-lookup` started with nothing but what cannot have a default (their
//! ports, each bound to port 0, and the URLs of one another) work together: a user logs in,
//! adds to the cart and reads it back through the proxy, with no 401 and nothing lost between
//! requests. Once, demo-app's namespace defaulted to `demo` and the proxy's to `default`, so
//! every logged-in request was a 401. The token is given the way all three read it by default,
//! `STICKLESS_AUTH_TOKEN` alone, so the session server refuses anyone using another name.
//!
//! Real binaries (found or built by `bench::binaries::Binaries`), a memory store (the session
//! server's default): no outside service. The pairs of default constants are pinned one by
//! one in `proxy-plugin/tests/defaults_agree.rs`.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bench::binaries::{Binaries, Reported};
use reqwest::StatusCode;
use reqwest::header::{COOKIE, HeaderMap, SET_COOKIE};
use serde_json::Value;

/// Bound on anything the test waits for.
const WITHIN: Duration = Duration::from_secs(30);
/// The one token of the run, in `STICKLESS_AUTH_TOKEN` for all three.
const TOKEN: &str = "first-run-defaults-token";

/// A child process; killed when dropped.
struct Proc {
    child: Child,
    reported: Reported,
}

impl Proc {
    /// Starts `program` with `args`, the token in `STICKLESS_AUTH_TOKEN` and no other
    /// `STICKLESS_*` / `DEMO_*` variable of the caller (so its defaults are what runs), and
    /// waits for its `listening <role>` address.
    fn start(program: &Path, args: &[&str], role: &str) -> (Proc, SocketAddr) {
        let mut command = Command::new(program);
        for (name, _) in std::env::vars_os() {
            let text = name.to_string_lossy();
            if text.starts_with("STICKLESS_") || text.starts_with("DEMO_") {
                command.env_remove(&name);
            }
        }
        let mut child = command
            .args(args)
            .env("STICKLESS_AUTH_TOKEN", TOKEN)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{} starts: {e}", program.display()));
        let stdout = child.stdout.take().expect("piped stdout");
        let mut proc = Proc {
            reported: Reported::tee(stdout, std::io::sink()),
            child,
        };
        let deadline = Instant::now() + WITHIN;
        loop {
            if let Some(addr) = proc.reported.get(role) {
                return (proc, addr);
            }
            if let Ok(Some(status)) = proc.child.try_wait() {
                panic!(
                    "{} {args:?} exited before listening: {status}",
                    program.display()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} never reported its {role} address",
                program.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of cookie `name` set by a response with `headers`, if any.
fn set_cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|line| line.to_str().ok())
        .find_map(|line| {
            let (key, rest) = line.split_once('=')?;
            (key.trim() == name).then(|| rest.split(';').next().unwrap_or("").to_owned())
        })
}

/// Status, JSON body (or the text, as a string) and headers of the answer to `request`.
async fn call(request: reqwest::RequestBuilder) -> (StatusCode, Value, HeaderMap) {
    let response = request.send().await.expect("the proxy answers");
    let status = response.status();
    let headers = response.headers().clone();
    let text = response.text().await.expect("a body");
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, body, headers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_behind_the_proxy_lookup_works_on_every_default() {
    let bins = Binaries::locate().expect("the binaries are there or can be built");
    let (_server, grpc) = Proc::start(&bins.session_server, &["--listen", "127.0.0.1:0"], "grpc");
    let session_url = format!("http://{grpc}");
    let (_demo, app) = Proc::start(
        &bins.demo_app,
        &[
            "--sessions",
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--session-server",
            &session_url,
        ],
        "http",
    );
    let backend = format!("http://{app}");
    let (_proxy, front) = Proc::start(
        &bins.session_proxy,
        &[
            "--listen",
            "127.0.0.1:0",
            "--backend",
            &backend,
            "--session-lookup",
            &session_url,
        ],
        "proxy",
    );
    let url = |path: &str| format!("http://{front}{path}");
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");

    // The backend up behind the proxy (its health checks start it as up; poll all the same).
    let deadline = Instant::now() + WITHIN;
    loop {
        match http.get(url("/healthz")).send().await {
            Ok(response) if response.status() == StatusCode::OK => break,
            other => assert!(
                Instant::now() < deadline,
                "the demo never answered through the proxy: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (status, body, headers) = call(http.post(url("/login")).form(&[("user", "alice")])).await;
    assert_eq!(status, StatusCode::OK, "login: {body}");
    // The cookie the demo sets is the one the proxy reads (`sid`, both sides' default).
    let sid = set_cookie(&headers, "sid").expect("the login sets the session cookie");
    assert!(!sid.is_empty());
    let jar = format!("sid={sid}");

    let (status, body, _) = call(http.get(url("/me")).header(COOKIE, &jar)).await;
    assert_eq!(status, StatusCode::OK, "/me right after login: {body}");
    assert_eq!(body["user"], "alice", "{body}");
    assert_eq!(body["degraded"], false, "{body}");

    for (item, expected) in [("book", 1), ("pen", 2)] {
        let (status, body, _) = call(
            http.post(url("/cart/add"))
                .header(COOKIE, &jar)
                .form(&[("item", item)]),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "add {item}: {body}");
        assert_eq!(
            body["items"].as_array().map(Vec::len),
            Some(expected),
            "{body}"
        );
    }

    // Read back on later requests: the cart comes from the session the proxy looked up.
    let (status, body, _) = call(http.get(url("/cart")).header(COOKIE, &jar)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["items"], serde_json::json!(["book", "pen"]), "{body}");
    let (status, body, _) = call(http.get(url("/me")).header(COOKIE, &jar)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["user"], "alice", "{body}");
    assert_eq!(body["cart_items"], 2, "{body}");

    // And a logout sticks: the same cookie is nobody afterwards.
    let (status, body, _) = call(http.post(url("/logout")).header(COOKIE, &jar)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body, _) = call(http.get(url("/me")).header(COOKIE, &jar)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
}
