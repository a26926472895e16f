//! The `session-proxy` binary as an operator runs it: configuration errors, serving through a
//! backend, the admin API, SIGHUP reloads (good and bad files, and with a request in flight),
//! and a clean exit on SIGTERM that lets a request in flight finish. Every proxy here listens
//! on port 0 and reports its addresses (`listening proxy|admin <ip:port>` on stdout).

mod support;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use support::backend::{Behaviour, TestBackend};
use support::proxy_process::{ProxyProcess, command, run_bounded};

/// Generous bound on anything the tests wait for (a loaded 2-core machine is slow, never this
/// slow).
const PATIENCE: Duration = Duration::from_secs(30);

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(PATIENCE)
        .build()
        .unwrap()
}

/// Polls `check` until it holds, failing with the proxy's logs after [`PATIENCE`].
async fn eventually<F, Fut>(what: &str, process: &ProxyProcess, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + PATIENCE;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "{what}: not after {PATIENCE:?}; logs: {}",
            process.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `GET /` through the proxy until it answers 200, returning the body.
async fn wait_until_serving(proxy: &ProxyProcess, http: &reqwest::Client) -> String {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Ok(response) = http.get(proxy.url("/")).send().await
            && response.status() == 200
        {
            return response.text().await.unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "no 200 within {PATIENCE:?}; logs: {}",
            proxy.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The admin API's backend list.
async fn backends(proxy: &ProxyProcess, http: &reqwest::Client) -> Vec<serde_json::Value> {
    let response = http.get(proxy.admin("/backends")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// The names in the admin API's backend list.
async fn backend_names(proxy: &ProxyProcess, http: &reqwest::Client) -> Vec<String> {
    backends(proxy, http)
        .await
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_owned())
        .collect()
}

/// A `[[backend]]` table of a config file.
fn backend_table(backend: &TestBackend) -> String {
    format!(
        "[[backend]]\nurl = \"http://{}\"\nname = \"{}\"\n",
        backend.addr, backend.name
    )
}

/// A file in the temp dir, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn with(text: &str) -> TempFile {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "stickless-proxy-{}-{}.toml",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let file = TempFile(std::env::temp_dir().join(name));
        file.write(text);
        file
    }

    fn write(&self, text: &str) {
        std::fs::write(&self.0, text).unwrap();
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn a_bad_configuration_exits_2_naming_the_problem() {
    let file = TempFile::with(
        "listen = \"127.0.0.1:0\"\n\n[[backend]]\nurl = \"http://127.0.0.1:1\"\nweigth = 2\n",
    );
    let cases: [(&[&str], &[&str]); 4] = [
        (
            &["--config", file.path()],
            &["weigth", "line 5", file.path()],
        ),
        (&[], &["no backend"]),
        (
            &["--backend", "http://127.0.0.1:1", "--balance", "fastest"],
            &["unknown balance mode", "--balance"],
        ),
        (
            &["--backend", "ftp://127.0.0.1:1"],
            &["must look like http://host:port"],
        ),
    ];
    for (args, expected) in cases {
        let out = run_bounded(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        for text in expected {
            assert!(stderr.contains(text), "{args:?}: {text:?} not in {stderr}");
        }
        assert!(out.stdout.is_empty(), "{args:?}: stdout {:?}", out.stdout);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_through_flag_backends_with_a_working_admin_api_and_exits_0_on_sigterm() {
    let backend = TestBackend::start("alpha", Behaviour::Echo).await;
    let proxy = ProxyProcess::start(&["--backend", &format!("http://{},name=alpha", backend.addr)]);
    assert!(proxy.addr.ip().is_loopback() && proxy.addr.port() != 0);
    let http = http_client();
    // Bound before it was reported: the first request is served, no polling needed.
    let response = http.get(proxy.url("/")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "alpha");

    let list = backends(&proxy, &http).await;
    assert_eq!(list.len(), 1, "{list:?}");
    let alpha = &list[0];
    assert_eq!(alpha["name"], "alpha");
    assert_eq!(alpha["address"], backend.addr.to_string());
    assert_eq!(alpha["weight"], 1);
    assert_eq!(alpha["up"], true);
    assert!(alpha["active"].is_u64(), "{alpha}");
    // Counted once the proxy is done with the exchange, which may be just after we read it.
    eventually("the request is counted as served", &proxy, || async {
        backends_served(&proxy, &http).await >= 1
    })
    .await;

    // Admin writes are JSON (and refused cross-site: see tests/admin.rs).
    let put = |path: &str, body: &'static str| {
        http.put(proxy.admin(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let response = put("/backends/alpha/weight", "7\n").await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(backends(&proxy, &http).await[0]["weight"], 7);
    let response = http
        .post(proxy.admin("/backends/alpha/weight"))
        .header("content-type", "application/json; charset=utf-8")
        .body("3")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(backends(&proxy, &http).await[0]["weight"], 3);
    for (path, body, status) in [
        ("/backends/alpha/weight", "heavy", 400),
        ("/backends/alpha/weight", "1001", 400),
        ("/backends/alpha/weight", "-1", 400),
        ("/backends/nope/weight", "2", 404),
    ] {
        let response = put(path, body).await.unwrap();
        assert_eq!(response.status(), status, "PUT {path} {body:?}");
    }
    assert_eq!(backends(&proxy, &http).await[0]["weight"], 3);
    let big = http
        .put(proxy.admin("/backends/alpha/weight"))
        .header("content-type", "application/json")
        .body(vec![b'1'; 4096])
        .send()
        .await
        .unwrap();
    assert_eq!(big.status(), 413);

    let metrics = http.get(proxy.admin("/metrics")).send().await.unwrap();
    assert_eq!(metrics.status(), 200);
    assert_eq!(
        metrics.headers()["content-type"],
        "text/plain; version=0.0.4"
    );
    for path in ["/", "/backend", "/backends/alpha/weight/x"] {
        let response = http.get(proxy.admin(path)).send().await.unwrap();
        assert_eq!(response.status(), 404, "GET {path}");
    }

    let logs = proxy.terminate().await;
    assert!(logs.contains("SIGTERM received"), "{logs}");
}

/// The first backend's `served` count in the admin API.
async fn backends_served(proxy: &ProxyProcess, http: &reqwest::Client) -> u64 {
    backends(proxy, http).await[0]["served"]
        .as_u64()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_accepting_lets_a_request_in_flight_finish_then_exits_0() {
    let backend = TestBackend::start("held", Behaviour::Hold).await;
    let mut proxy = ProxyProcess::start(&["--backend", &format!("http://{}", backend.addr)]);
    let http = http_client();
    let in_flight = tokio::spawn(http.get(proxy.url("/")).send());
    eventually("the request reaches the backend", &proxy, || async {
        backend.active() == 1
    })
    .await;

    proxy.signal("TERM");
    eventually("SIGTERM is handled", &proxy, || async {
        proxy.logs().contains("SIGTERM received")
    })
    .await;
    let addr = proxy.addr;
    eventually("no new connection is accepted", &proxy, || async {
        tokio::net::TcpStream::connect(addr).await.is_err()
    })
    .await;
    assert!(
        proxy.is_running(),
        "exited with a request in flight: {}",
        proxy.logs()
    );
    assert!(!in_flight.is_finished());

    backend.release();
    let response = in_flight.await.unwrap().unwrap();
    assert_eq!(response.status(), 200, "{}", proxy.logs());
    assert_eq!(response.text().await.unwrap(), "held");
    let (status, logs) = proxy.wait_exit(PATIENCE).await;
    assert!(status.success(), "{status}: {logs}");
    assert!(logs.contains("stopped"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_changed_file_and_keeps_the_running_config_when_it_is_bad() {
    let alpha = TestBackend::start("alpha", Behaviour::Echo).await;
    let beta = TestBackend::start("beta", Behaviour::Echo).await;
    let one = backend_table(&alpha);
    let two = format!("{one}\n{}", backend_table(&beta));
    let file = TempFile::with(&one);
    let mut proxy = ProxyProcess::start(&["--config", file.path()]);
    let http = http_client();
    assert_eq!(wait_until_serving(&proxy, &http).await, "alpha");
    assert_eq!(backend_names(&proxy, &http).await, ["alpha"]);

    file.write(&two);
    proxy.signal("HUP");
    eventually("two backends after SIGHUP", &proxy, || async {
        backends(&proxy, &http).await.len() == 2
    })
    .await;
    assert_eq!(backend_names(&proxy, &http).await, ["alpha", "beta"]);
    eventually("beta gets traffic (round-robin)", &proxy, || async {
        let response = http.get(proxy.url("/")).send().await.unwrap();
        response.text().await.unwrap() == "beta"
    })
    .await;

    file.write(&format!("{two}\n[health]\nrise = 0\n"));
    proxy.signal("HUP");
    eventually("the bad file is refused", &proxy, || async {
        proxy.logs().contains("reload refused")
    })
    .await;
    assert!(proxy.logs().contains("line"), "{}", proxy.logs());
    assert!(proxy.is_running(), "exited on a bad reload");
    assert_eq!(backend_names(&proxy, &http).await, ["alpha", "beta"]);
    let response = http.get(proxy.url("/")).send().await.unwrap();
    assert_eq!(response.status(), 200);

    proxy.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_moves_new_requests_to_the_new_file_while_one_in_flight_finishes_on_the_old() {
    let old = TestBackend::start("old", Behaviour::Hold).await;
    let new = TestBackend::start("new", Behaviour::Echo).await;
    let file = TempFile::with(&backend_table(&old));
    let proxy = ProxyProcess::start(&["--config", file.path()]);
    let http = http_client();
    let in_flight = tokio::spawn(http.get(proxy.url("/in-flight")).send());
    eventually("the old backend holds the request", &proxy, || async {
        old.active() == 1
    })
    .await;

    file.write(&backend_table(&new));
    proxy.signal("HUP");
    eventually("the reload is applied", &proxy, || async {
        proxy.logs().contains("configuration reloaded")
    })
    .await;
    assert_eq!(backend_names(&proxy, &http).await, ["new"]);
    for _ in 0..3 {
        let response = http.get(proxy.url("/")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.text().await.unwrap(), "new");
    }
    assert!(
        !in_flight.is_finished(),
        "the held request is still in flight"
    );
    assert_eq!(old.active(), 1);

    old.release();
    let response = in_flight.await.unwrap().unwrap();
    assert_eq!(response.status(), 200, "{}", proxy.logs());
    assert_eq!(
        response.text().await.unwrap(),
        "old",
        "the in-flight request finished on the old backend"
    );
    assert_eq!((old.hits(), new.hits()), (1, 3));
    let response = http.get(proxy.url("/")).send().await.unwrap();
    assert_eq!(response.text().await.unwrap(), "new");
    proxy.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_twins_configure_the_proxy() {
    let alpha = TestBackend::start("a", Behaviour::Echo).await;
    let beta = TestBackend::start("b", Behaviour::Echo).await;
    let mut command = command();
    command
        .env(
            "STICKLESS_PROXY_BACKENDS",
            format!(
                "http://{},name=a http://{},weight=2,name=b",
                alpha.addr, beta.addr
            ),
        )
        .env("STICKLESS_PROXY_LISTEN", "127.0.0.1:0")
        .env("STICKLESS_PROXY_ADMIN_LISTEN", "127.0.0.1:0");
    let proxy = ProxyProcess::spawn(command, &["proxy", "admin"]);
    let http = http_client();
    let summary: Vec<_> = backends(&proxy, &http)
        .await
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().to_owned(),
                b["weight"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(summary, [("a".to_owned(), 1), ("b".to_owned(), 2)]);
    proxy.terminate().await;
}
