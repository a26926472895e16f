//! Slow and idle clients against the `session-proxy` binary: a body trickled or stalled gets
//! 408 and is never held against the backend (passive health with `--max-fails 1` would take
//! it down at the first failure), a client that reads none of its response is cut after
//! `--send-timeout` and its backend request ended, idle HTTP/1 keep-alive and HTTP/2
//! connections are closed after `--idle-timeout` (HTTP/2 with a GOAWAY, PINGs or not), and
//! honest traffic is served throughout. Timing assertions are one-sided where load can only
//! make things later.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use support::backend::{Behaviour, TestBackend};
use support::proxy_process::ProxyProcess;
use support::raw::{read_head, read_until_close};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Bound on anything a test waits for: generous, since a loaded machine is slow and a passing
/// test never waits it out.
const PATIENCE: Duration = Duration::from_secs(30);

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(PATIENCE)
        .build()
        .expect("reqwest client")
}

/// The proxy binary over `backend` with passive health only, one failure taking a backend
/// down for a minute (so a wrong mark-down stays visible), and `args`.
fn start_proxy(backend: SocketAddr, args: &[&str]) -> ProxyProcess {
    let backend = format!("http://{backend},name=b");
    let mut all = vec![
        "--backend",
        &backend,
        "--health-check",
        "off",
        "--max-fails",
        "1",
        "--fail-timeout",
        "60s",
    ];
    all.extend_from_slice(args);
    ProxyProcess::start(&all)
}

/// Whether the admin API lists the backend as up.
async fn backend_up(proxy: &ProxyProcess, http: &reqwest::Client) -> bool {
    let response = http.get(proxy.admin("/backends")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let list: Vec<serde_json::Value> = response.json().await.unwrap();
    list[0]["up"].as_bool().expect("an up field")
}

/// `proxy_client_timeouts_total{kind}` from the admin API's `/metrics`.
async fn client_timeouts(proxy: &ProxyProcess, http: &reqwest::Client, kind: &str) -> u64 {
    let text = http
        .get(proxy.admin("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let series = format!("proxy_client_timeouts_total{{kind=\"{kind}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(series.as_str()))
        .unwrap_or_else(|| panic!("no {series} in {text}"))
        .trim()
        .parse()
        .expect("a counter value")
}

/// Waits until `check` holds, failing with the proxy's logs after [`PATIENCE`].
async fn eventually<F, Fut>(what: &str, proxy: &ProxyProcess, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + PATIENCE;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "{what}: not after {PATIENCE:?}; logs: {}",
            proxy.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A client sending `head`, then `body` one byte every `pause` (then silence), and reading
/// what comes back until the proxy closes: the answer and the time from connecting to close.
fn trickle(
    addr: SocketAddr,
    head: String,
    body: usize,
    pause: Duration,
) -> JoinHandle<(String, Duration)> {
    tokio::spawn(async move {
        let started = Instant::now();
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut read, mut write) = stream.into_split();
        let writer = tokio::spawn(async move {
            write.write_all(head.as_bytes()).await.unwrap();
            for _ in 0..body {
                if write.write_all(b"x").await.is_err() {
                    return;
                }
                tokio::time::sleep(pause).await;
            }
            // Silence, the connection kept open.
            std::future::pending::<()>().await;
        });
        let mut out = Vec::new();
        let _ = tokio::time::timeout(PATIENCE, read.read_to_end(&mut out)).await;
        writer.abort();
        (
            String::from_utf8_lossy(&out).into_owned(),
            started.elapsed(),
        )
    })
}

fn post_head(length: usize) -> String {
    format!("POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_upload_gets_408_and_the_backend_stays_up_for_everyone_else() {
    let backend = TestBackend::start("b", Behaviour::Echo).await;
    // A response timeout far below the trickle's length: counted on the client's time, as it
    // was, it would end in 504 and take the backend down.
    let proxy = start_proxy(
        backend.addr,
        &[
            "--response-timeout",
            "300ms",
            "--body-read-timeout",
            "1s",
            "--min-upload-rate",
            "1k",
        ],
    );
    let http = http_client();

    // 20 bytes/s: never silent for long, far under 1 KiB/s. Over the retry buffer, so the
    // body is streamed to the backend as it comes (the backend request is open meanwhile).
    let streamed = trickle(
        proxy.addr,
        post_head(200_000),
        100,
        Duration::from_millis(50),
    );
    // A small one is read whole by the proxy first: it never reaches the backend.
    let buffered = trickle(proxy.addr, post_head(1000), 100, Duration::from_millis(50));

    let mut served_meanwhile = 0;
    while !(streamed.is_finished() && buffered.is_finished()) {
        let response = http.get(proxy.url("/")).send().await.unwrap();
        assert_eq!(response.status(), 200, "logs: {}", proxy.logs());
        served_meanwhile += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (name, task) in [("streamed", streamed), ("buffered", buffered)] {
        let (answer, elapsed) = task.await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 408"), "{name}: {answer:?}");
        assert!(
            elapsed >= Duration::from_secs(1),
            "{name}: cut after {elapsed:?}, before body_read_timeout"
        );
    }
    assert!(served_meanwhile >= 1, "nobody was served meanwhile");
    assert_eq!(
        backend.hits(),
        served_meanwhile + 1,
        "the streamed upload reached the backend, the buffered one did not"
    );
    eventually(
        "the backend request of the cut upload ends",
        &proxy,
        || async { backend.active() == 0 },
    )
    .await;

    assert!(backend_up(&proxy, &http).await, "logs: {}", proxy.logs());
    let response = http.get(proxy.url("/after")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(client_timeouts(&proxy, &http, "slow_upload").await, 2);
    assert_eq!(client_timeouts(&proxy, &http, "body_read").await, 0);

    // Honest uploads, small and streamed, pass the same limits.
    for length in [1000, 300_000] {
        let response = http
            .post(proxy.url("/honest"))
            .body(vec![b'h'; length])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()["x-body-len"],
            length.to_string().as_str()
        );
    }
    assert!(backend_up(&proxy, &http).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_body_gets_408_after_body_read_timeout() {
    let backend = TestBackend::start("b", Behaviour::Echo).await;
    let timeout = Duration::from_millis(300);
    let proxy = start_proxy(
        backend.addr,
        &[
            "--response-timeout",
            "200ms",
            "--body-read-timeout",
            "300ms",
            "--min-upload-rate",
            "0",
        ],
    );
    let http = http_client();
    // Ten bytes, then silence: read whole (small) or streamed to the backend (large).
    for length in [100, 200_000] {
        let (answer, elapsed) = trickle(proxy.addr, post_head(length), 10, Duration::ZERO)
            .await
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 408"), "{length}: {answer:?}");
        assert!(elapsed >= timeout, "{length}: cut after {elapsed:?}");
    }
    eventually(
        "the backend request of the cut upload ends",
        &proxy,
        || async { backend.active() == 0 },
    )
    .await;
    assert_eq!(backend.hits(), 1, "only the streamed body reached it");
    assert!(backend_up(&proxy, &http).await, "logs: {}", proxy.logs());
    assert_eq!(client_timeouts(&proxy, &http, "body_read").await, 2);
    let response = http.get(proxy.url("/")).send().await.unwrap();
    assert_eq!(response.status(), 200);
}

/// A raw backend that answers every request at once with a chunked 200, and then either reads
/// the rest of the request ([`RawBackend::answering`]) or sends an endless body
/// ([`RawBackend::flooding`]); it counts the requests whose connection the proxy ended.
struct RawBackend {
    /// Where it listens.
    addr: SocketAddr,
    /// Connections the proxy closed (read end, or write failed).
    ended: Arc<AtomicUsize>,
    /// The accept loop.
    task: JoinHandle<()>,
}

impl RawBackend {
    async fn answering() -> RawBackend {
        RawBackend::start(false).await
    }

    async fn flooding() -> RawBackend {
        RawBackend::start(true).await
    }

    async fn start(flood: bool) -> RawBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let ended = Arc::new(AtomicUsize::new(0));
        let counter = ended.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let ended = counter.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let answer =
                        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n";
                    if stream.write_all(answer).await.is_err() {
                        return;
                    }
                    if flood {
                        let mut chunk = b"10000\r\n".to_vec();
                        chunk.extend_from_slice(&[b'f'; 0x10000]);
                        chunk.extend_from_slice(b"\r\n");
                        while stream.write_all(&chunk).await.is_ok() {}
                    } else {
                        while let Ok(n) = stream.read(&mut buf).await {
                            if n == 0 {
                                break;
                            }
                        }
                    }
                    ended.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        RawBackend { addr, ended, task }
    }

    fn ended(&self) -> usize {
        self.ended.load(Ordering::SeqCst)
    }
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_stalled_after_the_response_started_ends_the_backend_request() {
    let backend = RawBackend::answering().await;
    let proxy = start_proxy(
        backend.addr,
        &["--body-read-timeout", "300ms", "--min-upload-rate", "0"],
    );
    let http = http_client();
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    client
        .write_all(post_head(200_000).as_bytes())
        .await
        .unwrap();
    client.write_all(b"0123456789").await.unwrap();
    let head = read_head(&mut client, PATIENCE).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head:?}");
    // Then silence: the proxy cuts the upload, and with it the backend request and the
    // response (which never gets its last chunk).
    let rest = read_until_close(&mut client, PATIENCE).await;
    assert!(!rest.contains("0\r\n\r\n"), "{rest:?}");
    eventually("the backend sees its request end", &proxy, || async {
        backend.ended() == 1
    })
    .await;
    assert_eq!(client_timeouts(&proxy, &http, "body_read").await, 1);
    assert!(backend_up(&proxy, &http).await, "logs: {}", proxy.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reading_nothing_is_cut_after_send_timeout_and_its_backend_request_ends() {
    let backend = RawBackend::flooding().await;
    let proxy = start_proxy(backend.addr, &["--send-timeout", "300ms"]);
    let http = http_client();
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    let started = Instant::now();
    client
        .write_all(b"GET /endless HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    // Reads nothing: the proxy fills the sockets' buffers, then waits 300 ms, then gives up
    // on the client and on the backend connection (closed, not pooled with a body half read).
    eventually("the backend sees its request end", &proxy, || async {
        backend.ended() == 1
    })
    .await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(client_timeouts(&proxy, &http, "send").await, 1);
    assert!(backend_up(&proxy, &http).await, "logs: {}", proxy.logs());
    drop(client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_stream_the_client_does_not_read_has_its_backend_request_ended() {
    let backend = RawBackend::flooding().await;
    let proxy = start_proxy(backend.addr, &["--send-timeout", "300ms"]);
    let http = http_client();
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    // The connection keeps being read (by the client's connection task); only the stream's
    // window stays shut, since its body is never read.
    let (mut sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .initial_stream_window_size(65_535)
        .handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
        .await
        .unwrap();
    let connection = tokio::spawn(connection);
    let started = Instant::now();
    let request = http::Request::get(format!("http://{}/endless", proxy.addr))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    eventually("the backend sees its request end", &proxy, || async {
        backend.ended() == 1
    })
    .await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(client_timeouts(&proxy, &http, "send").await, 1);
    assert!(
        !connection.is_finished(),
        "only the stream's backend request was ended"
    );
    drop(response);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_after_idle_timeout() {
    let backend = TestBackend::start("b", Behaviour::Echo).await;
    let idle = Duration::from_millis(300);
    let proxy = start_proxy(
        backend.addr,
        &["--idle-timeout", "300ms", "--header-read-timeout", "20s"],
    );
    let http = http_client();
    let get = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    // Honest keep-alive: requests back to back on one connection are all served.
    for _ in 0..3 {
        stream.write_all(get).await.unwrap();
        let head = read_head(&mut stream, PATIENCE).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head:?}");
        let mut body = [0u8; 1];
        stream.read_exact(&mut body).await.unwrap();
    }
    // Then idle: closed without a word, after idle_timeout and long before the head timeout.
    let idle_from = Instant::now();
    let rest = read_until_close(&mut stream, PATIENCE).await;
    let elapsed = idle_from.elapsed();
    assert_eq!(rest, "");
    assert!(elapsed >= idle - Duration::from_millis(50), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(20), "{elapsed:?}");
    assert_eq!(client_timeouts(&proxy, &http, "idle").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_gets_goaway_while_its_pings_are_answered() {
    let backend = TestBackend::start("b", Behaviour::Echo).await;
    let idle = Duration::from_millis(500);
    let proxy = start_proxy(backend.addr, &["--idle-timeout", "500ms"]);
    let http = http_client();

    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    // Pings every 100 ms, each to be answered within 200 ms: unanswered ones would end the
    // connection with an error long before the idle timeout.
    let (mut sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_millis(100))
        .keep_alive_timeout(Duration::from_millis(200))
        .keep_alive_while_idle(true)
        .handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
        .await
        .unwrap();
    let connection = tokio::spawn(async move {
        let result = connection.await;
        (result, Instant::now())
    });

    // A stream open longer than the idle timeout is not idle.
    let request = http::Request::get(format!("http://{}/slow/800", proxy.addr))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"b");
    let idle_from = Instant::now();

    let (result, closed_at) = tokio::time::timeout(PATIENCE, connection)
        .await
        .expect("the idle connection is closed")
        .unwrap();
    result.unwrap_or_else(|e| panic!("closed with an error (unanswered PING?): {e}"));
    let elapsed = closed_at - idle_from;
    assert!(elapsed >= idle - Duration::from_millis(50), "{elapsed:?}");
    assert_eq!(client_timeouts(&proxy, &http, "idle").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_is_reloaded_on_sighup() {
    let backend = TestBackend::start("b", Behaviour::Echo).await;
    let file = std::env::temp_dir().join(format!(
        "stickless-slow-clients-{}-{}.toml",
        std::process::id(),
        backend.addr.port()
    ));
    let write = |idle: &str| {
        let text = format!(
            "[[backend]]\nurl = \"http://{}\"\n\n[limits]\nidle_timeout = \"{idle}\"\n",
            backend.addr
        );
        std::fs::write(&file, text).expect("write the config file");
    };
    write("1m");
    let path = file.to_string_lossy().into_owned();
    let proxy = ProxyProcess::start(&["--config", &path]);
    let http = http_client();
    let get = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";

    let mut before = TcpStream::connect(proxy.addr).await.unwrap();
    before.write_all(get).await.unwrap();
    let head = read_head(&mut before, PATIENCE).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head:?}");
    let mut body = [0u8; 1];
    before.read_exact(&mut body).await.unwrap();
    write("200ms");
    proxy.signal("HUP");
    eventually("the reload is applied", &proxy, || async {
        proxy.logs().contains("configuration reloaded")
    })
    .await;

    let mut after = TcpStream::connect(proxy.addr).await.unwrap();
    after.write_all(get).await.unwrap();
    let answer = read_until_close(&mut after, PATIENCE).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert_eq!(client_timeouts(&proxy, &http, "idle").await, 1);
    // The connection accepted before the reload keeps its minute.
    before.write_all(get).await.unwrap();
    let head = read_head(&mut before, PATIENCE).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head:?}");
    let _ = std::fs::remove_file(&file);
}
