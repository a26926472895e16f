//! The `session-proxy` binary as an operator runs it: configuration errors, serving through a
//! backend, the admin API, SIGHUP reloads (good and bad files), and a clean exit on SIGTERM.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BINARY: &str = env!("CARGO_BIN_EXE_session-proxy");

/// A loopback port nobody listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The binary with none of the environment twins a developer's shell might set.
fn command() -> Command {
    let mut command = Command::new(BINARY);
    for var in [
        "STICKLESS_PROXY_CONFIG",
        "STICKLESS_PROXY_LISTEN",
        "STICKLESS_PROXY_ADMIN_LISTEN",
        "STICKLESS_PROXY_BACKENDS",
        "STICKLESS_PROXY_BALANCE",
        "STICKLESS_PROXY_HEALTH_CHECK",
        "STICKLESS_PROXY_SESSION_LOOKUP",
    ] {
        command.env_remove(var);
    }
    command.env("RUST_LOG", "info");
    command
}

/// A backend answering every request with `200` and its name as the body, on its own threads.
fn start_backend(name: &'static str) -> u16 {
    start_slow_backend(name, Duration::ZERO)
}

/// [`start_backend`] taking `delay` to answer each request.
fn start_slow_backend(name: &'static str, delay: Duration) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || answer_requests(stream, name, delay));
        }
    });
    port
}

/// Answers requests on one connection (keep-alive) until the peer closes it.
fn answer_requests(stream: TcpStream, name: &str, delay: Duration) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    loop {
        let mut line = String::new();
        let mut head_len = 0;
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            head_len += line.len();
            if line == "\r\n" || line == "\n" {
                break;
            }
        }
        if head_len <= 2 {
            continue;
        }
        std::thread::sleep(delay);
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\
             x-served-by: {name}\r\n\r\n{name}",
            name.len()
        );
        if writer.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

/// A running `session-proxy`, its stderr collected; killed on drop if still running.
struct ProxyProcess {
    child: Child,
    logs: Arc<Mutex<String>>,
    port: u16,
    admin_port: u16,
}

impl ProxyProcess {
    /// Starts the binary with `--listen` and `--admin-listen` on free ports plus `args`.
    fn start(args: &[&str]) -> ProxyProcess {
        let (port, admin_port) = (free_port(), free_port());
        let mut child = command()
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--admin-listen")
            .arg(format!("127.0.0.1:{admin_port}"))
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let logs = Arc::new(Mutex::new(String::new()));
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let sink = logs.clone();
        std::thread::spawn(move || {
            let mut line = String::new();
            while stderr.read_line(&mut line).is_ok_and(|n| n > 0) {
                sink.lock().unwrap().push_str(&line);
                line.clear();
            }
        });
        ProxyProcess {
            child,
            logs,
            port,
            admin_port,
        }
    }

    fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn admin(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin_port)
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([format!("-{name}"), self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{name}");
    }

    /// Waits for `GET path` through the proxy to answer 200, returning the body.
    async fn wait_until_serving(&mut self, http: &reqwest::Client) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(response) = http.get(self.url("/")).send().await
                && response.status() == 200
            {
                return response.text().await.unwrap();
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("proxy exited ({status}): {}", self.logs());
            }
            assert!(
                Instant::now() < deadline,
                "proxy not serving after 30s: {}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The admin API's backend list.
    async fn backends(&self, http: &reqwest::Client) -> Vec<serde_json::Value> {
        let response = http.get(self.admin("/backends")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    /// Sends SIGTERM and returns once the process exited with status 0.
    async fn terminate(mut self) -> String {
        self.signal("TERM");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "{status}: {}", self.logs());
                break;
            }
            assert!(
                Instant::now() < deadline,
                "still running 15s after SIGTERM: {}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Let the reader thread take the last lines.
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.logs()
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// Polls `check` until it holds, for at most 10 s.
async fn eventually<F, Fut>(what: &str, process: &ProxyProcess, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "{what}: not after 10s; logs: {}",
            process.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A file in the temp dir, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn with(text: &str) -> TempFile {
        let name = format!(
            "stickless-proxy-{}-{}.toml",
            std::process::id(),
            free_port()
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
        (&["--backend", "https://127.0.0.1:1"], &["only http://"]),
    ];
    for (args, expected) in cases {
        let out = command().args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        for text in expected {
            assert!(stderr.contains(text), "{args:?}: {text:?} not in {stderr}");
        }
    }
}

#[tokio::test]
async fn serves_through_flag_backends_with_a_working_admin_api_and_exits_0_on_sigterm() {
    let backend = start_backend("alpha");
    let mut proxy = ProxyProcess::start(&[
        "--backend",
        &format!("http://127.0.0.1:{backend},name=alpha"),
    ]);
    let http = http_client();
    assert_eq!(proxy.wait_until_serving(&http).await, "alpha");

    let backends = proxy.backends(&http).await;
    assert_eq!(backends.len(), 1, "{backends:?}");
    let alpha = &backends[0];
    assert_eq!(alpha["name"], "alpha");
    assert_eq!(alpha["address"], format!("127.0.0.1:{backend}"));
    assert_eq!(alpha["weight"], 1);
    assert_eq!(alpha["up"], true);
    assert!(alpha["active"].is_u64(), "{alpha}");
    // Counted once the proxy is done with the exchange, which may be just after we read it.
    eventually("the request is counted as served", &proxy, || async {
        proxy.backends(&http).await[0]["served"].as_u64() >= Some(1)
    })
    .await;

    let put = |path: &str, body: &'static str| http.put(proxy.admin(path)).body(body).send();
    let response = put("/backends/alpha/weight", "7\n").await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(proxy.backends(&http).await[0]["weight"], 7);
    let response = http
        .post(proxy.admin("/backends/alpha/weight"))
        .body("3")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(proxy.backends(&http).await[0]["weight"], 3);
    for (path, body, status) in [
        ("/backends/alpha/weight", "heavy", 400),
        ("/backends/alpha/weight", "1001", 400),
        ("/backends/alpha/weight", "-1", 400),
        ("/backends/nope/weight", "2", 404),
    ] {
        let response = put(path, body).await.unwrap();
        assert_eq!(response.status(), status, "PUT {path} {body:?}");
    }
    assert_eq!(proxy.backends(&http).await[0]["weight"], 3);
    let big = http
        .put(proxy.admin("/backends/alpha/weight"))
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

#[tokio::test]
async fn sigterm_lets_a_request_in_flight_finish_then_exits_0() {
    let backend = start_slow_backend("slow", Duration::from_millis(1500));
    let mut proxy = ProxyProcess::start(&["--backend", &format!("http://127.0.0.1:{backend}")]);
    let http = http_client();
    assert_eq!(proxy.wait_until_serving(&http).await, "slow");
    let in_flight = tokio::spawn(http.get(proxy.url("/")).send());
    eventually("the request reaches the backend", &proxy, || async {
        proxy.backends(&http).await[0]["active"] == 1
    })
    .await;
    let logs = proxy.terminate().await;
    let response = in_flight.await.unwrap().unwrap();
    assert_eq!(response.status(), 200, "{logs}");
    assert_eq!(response.text().await.unwrap(), "slow");
}

#[tokio::test]
async fn sighup_applies_a_changed_file_and_keeps_the_running_config_when_it_is_bad() {
    let (alpha, beta) = (start_backend("alpha"), start_backend("beta"));
    let one = format!("[[backend]]\nurl = \"http://127.0.0.1:{alpha}\"\nname = \"alpha\"\n");
    let two = format!("{one}\n[[backend]]\nurl = \"http://127.0.0.1:{beta}\"\nname = \"beta\"\n");
    let file = TempFile::with(&one);
    let mut proxy = ProxyProcess::start(&["--config", file.path()]);
    let http = http_client();
    assert_eq!(proxy.wait_until_serving(&http).await, "alpha");
    assert_eq!(proxy.backends(&http).await.len(), 1);

    file.write(&two);
    proxy.signal("HUP");
    eventually("two backends after SIGHUP", &proxy, || async {
        proxy.backends(&http).await.len() == 2
    })
    .await;
    let names: Vec<_> = proxy
        .backends(&http)
        .await
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["alpha", "beta"]);
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
    assert!(
        proxy.child.try_wait().unwrap().is_none(),
        "exited on a bad reload"
    );
    assert_eq!(proxy.backends(&http).await.len(), 2);
    let response = http.get(proxy.url("/")).send().await.unwrap();
    assert_eq!(response.status(), 200);

    proxy.terminate().await;
}

#[tokio::test]
async fn environment_twins_configure_the_proxy() {
    let (alpha, beta) = (start_backend("alpha"), start_backend("beta"));
    let (port, admin_port) = (free_port(), free_port());
    let mut child = command()
        .env(
            "STICKLESS_PROXY_BACKENDS",
            format!("http://127.0.0.1:{alpha},name=a http://127.0.0.1:{beta},weight=2,name=b"),
        )
        .env("STICKLESS_PROXY_LISTEN", format!("127.0.0.1:{port}"))
        .env(
            "STICKLESS_PROXY_ADMIN_LISTEN",
            format!("127.0.0.1:{admin_port}"),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let http = http_client();
    let deadline = Instant::now() + Duration::from_secs(30);
    let backends: Vec<serde_json::Value> = loop {
        if let Ok(response) = http
            .get(format!("http://127.0.0.1:{admin_port}/backends"))
            .send()
            .await
        {
            break response.json().await.unwrap();
        }
        assert!(child.try_wait().unwrap().is_none(), "proxy exited");
        assert!(Instant::now() < deadline, "admin API not up after 30s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _ = child.kill();
    let _ = child.wait();
    let summary: Vec<_> = backends
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().to_owned(),
                b["weight"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(summary, [("a".to_owned(), 1), ("b".to_owned(), 2)]);
}
