//! WebSocket and other `Upgrade` requests through the `session-proxy` binary: the request keeps
//! its `Connection: upgrade` and `Upgrade` on its way to the backend (other hop-by-hop headers
//! still go), the backend's 101 is relayed with its own, and bytes then flow both ways until a
//! side closes, or both sides are closed after `--idle-timeout` without a byte. A backend that
//! answers anything else has its answer relayed as a normal response; an upgrade request is
//! never replayed on another backend once it reached one; the filters run on it (session
//! headers); other requests are served meanwhile; a tunnel open at SIGTERM is let finish. Only
//! `websocket` is tunnelled: an `h2c` (or other) upgrade goes to the backend as a normal
//! request, without its upgrade headers. An open tunnel keeps its client's slot under
//! `--max-conns-per-ip`.
//!
//! The backend here is hyper with upgrades on (no WebSocket crate: the tunnel is bytes), the
//! client a raw socket. Timing assertions are one-sided.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use support::backend::{Behaviour, TestBackend};
use support::eventually;
use support::proxy_process::ProxyProcess;
use support::raw::read_head;
use support::session::TestSessionServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// Bound on anything a test waits for: generous, since a loaded machine is slow and a passing
/// test never waits it out.
const PATIENCE: Duration = Duration::from_secs(30);

/// What the backend writes first on a tunnel, before echoing: bytes the backend sends unasked.
const GREETING: &[u8] = b"hello from the backend\n";

/// `--idle-timeout` of the idle test.
const IDLE: Duration = Duration::from_millis(500);

/// A backend that switches protocols: `/ws` and `/h2c` asked for an upgrade answer 101
/// (`Upgrade: echo`, whatever was asked), write
/// [`GREETING`] and then echoes every byte until the client closes its half; `/refuse`
/// answers 403 `refused`; anything else 200 `ok`. It records every request head.
struct UpgradeBackend {
    /// Where it listens.
    addr: SocketAddr,
    /// What the serving tasks share with the test.
    shared: Arc<Shared>,
    /// The accept loop (its `JoinSet` owns the connections).
    task: JoinHandle<()>,
}

/// Records of an [`UpgradeBackend`].
#[derive(Default)]
struct Shared {
    /// Every request head: path and headers.
    seen: Mutex<Vec<(String, HeaderMap)>>,
    /// Tunnels whose echo loop ended (the other side closed, or reset).
    ended: AtomicUsize,
}

impl UpgradeBackend {
    async fn start() -> UpgradeBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let shared = Arc::new(Shared::default());
        let task = tokio::spawn(serve(listener, shared.clone()));
        UpgradeBackend { addr, shared, task }
    }

    /// `--backend` for it.
    fn flag(&self) -> String {
        format!("http://{},name=ws", self.addr)
    }

    /// The requests it saw for `path`, by their headers.
    fn seen(&self, path: &str) -> Vec<HeaderMap> {
        let seen = self.shared.seen.lock();
        seen.iter()
            .filter(|(p, _)| p == path)
            .map(|(_, headers)| headers.clone())
            .collect()
    }

    /// Tunnels ended on its side.
    fn ended(&self) -> usize {
        self.shared.ended.load(Ordering::SeqCst)
    }
}

impl Drop for UpgradeBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        connections.spawn(async move {
            let service = service_fn(move |request| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(answer(request, shared)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}

fn answer(mut request: Request<Incoming>, shared: Arc<Shared>) -> Response<Full<Bytes>> {
    let path = request.uri().path().to_owned();
    shared
        .seen
        .lock()
        .push((path.clone(), request.headers().clone()));
    let (status, body) = match path.as_str() {
        "/ws" | "/h2c" if request.headers().contains_key("upgrade") => {
            tokio::spawn(echo(hyper::upgrade::on(&mut request), shared));
            let mut response = Response::new(Full::new(Bytes::new()));
            *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            let headers = response.headers_mut();
            // A hop-by-hop header of its own, named by Connection: not for the client.
            headers.insert("connection", "Upgrade, x-backend-hop".parse().unwrap());
            headers.insert("x-backend-hop", "1".parse().unwrap());
            headers.insert("upgrade", "echo".parse().unwrap());
            headers.insert("x-switched", "yes".parse().unwrap());
            return response;
        }
        "/refuse" => (StatusCode::FORBIDDEN, "refused"),
        _ => (StatusCode::OK, "ok"),
    };
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response
}

/// The backend's side of a tunnel: the greeting, then every byte back, until EOF.
async fn echo(upgrade: OnUpgrade, shared: Arc<Shared>) {
    if let Ok(upgraded) = upgrade.await {
        let mut io = TokioIo::new(upgraded);
        if io.write_all(GREETING).await.is_ok() {
            let mut buf = [0u8; 4096];
            loop {
                match io.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if io.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = io.shutdown().await;
        }
    }
    shared.ended.fetch_add(1, Ordering::SeqCst);
}

/// The proxy binary over `backends`, health checks off, and `args`.
fn start_proxy(backends: &[String], args: &[&str]) -> ProxyProcess {
    let mut all = vec!["--health-check", "off"];
    for backend in backends {
        all.extend(["--backend", backend.as_str()]);
    }
    all.extend_from_slice(args);
    ProxyProcess::start(&all)
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(PATIENCE)
        .build()
        .expect("reqwest client")
}

/// Sends an upgrade request for `path` (with `extra` header lines) on a new connection to the
/// proxy; the socket and the response head.
async fn upgrade(proxy: SocketAddr, path: &str, extra: &str) -> (TcpStream, String) {
    let mut stream = TcpStream::connect(proxy)
        .await
        .expect("connect to the proxy");
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: chat.example\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         {extra}\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let head = read_head(&mut stream, PATIENCE).await;
    (stream, head)
}

/// Opens a tunnel through the proxy to `/ws` and reads the backend's greeting.
async fn open_tunnel(proxy: SocketAddr, extra: &str) -> TcpStream {
    let (mut stream, head) = upgrade(proxy, "/ws", extra).await;
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    assert_eq!(read_exact(&mut stream, GREETING.len()).await, GREETING);
    stream
}

/// Reads exactly `n` bytes, within [`PATIENCE`].
async fn read_exact(stream: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(PATIENCE, stream.read_exact(&mut buf))
        .await
        .expect("bytes within the patience")
        .expect("bytes, not the end of the stream");
    buf
}

/// Sends `bytes` through a tunnel and expects them back (written while the echo is read, so
/// that no buffer on the way has to hold them all).
async fn round_trip(stream: &mut TcpStream, bytes: &[u8]) {
    let (mut reader, mut writer) = stream.split();
    let mut echoed = vec![0u8; bytes.len()];
    let (written, read) = tokio::time::timeout(PATIENCE, async {
        tokio::join!(writer.write_all(bytes), reader.read_exact(&mut echoed))
    })
    .await
    .expect("the echo within the patience");
    written.expect("write into the tunnel");
    read.expect("the echo, not the end of the stream");
    assert_eq!(echoed, bytes);
}

/// Whether the proxy closed the stream (EOF or reset) within [`PATIENCE`], no byte first.
async fn closed_by_peer(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(PATIENCE, stream.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) | Err(_) => false,
    }
}

/// A series of the proxy's `/metrics` (`name{labels}`), 0 when absent.
async fn metric(proxy: &ProxyProcess, series: &str) -> f64 {
    let text = http_client()
        .get(proxy.admin("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    let prefix = format!("{series} ");
    text.lines()
        .find_map(|line| line.strip_prefix(prefix.as_str()))
        .map_or(0.0, |value| value.trim().parse().expect("a number"))
}

/// Waits until `series` reads `value`; false after [`PATIENCE`].
async fn metric_reaches(proxy: &ProxyProcess, series: &str, value: f64) -> bool {
    let deadline = Instant::now() + PATIENCE;
    while Instant::now() < deadline {
        if metric(proxy, series).await == value {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// The header lines of a response head, lower-cased.
fn head_lines(head: &str) -> Vec<String> {
    head.lines().skip(1).map(str::to_ascii_lowercase).collect()
}

#[tokio::test]
async fn a_websocket_upgrade_is_relayed_and_bytes_flow_both_ways_until_a_side_closes() {
    let backend = UpgradeBackend::start().await;
    let proxy = start_proxy(&[backend.flag()], &[]);
    let (mut stream, head) = upgrade(
        proxy.addr,
        "/ws",
        "Connection: x-client-hop\r\nX-Client-Hop: 1\r\nKeep-Alive: timeout=5\r\n",
    )
    .await;

    // The client gets the backend's 101 with its Upgrade, its own hop-by-hop header gone.
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    let lines = head_lines(&head);
    for expected in ["connection: upgrade", "upgrade: echo", "x-switched: yes"] {
        assert!(lines.iter().any(|l| l == expected), "{expected}: {head}");
    }
    assert!(
        !lines.iter().any(|l| l.starts_with("x-backend-hop")),
        "{head}"
    );

    // The backend got the upgrade headers, and none of the other hop-by-hop ones.
    let seen = backend.seen("/ws");
    assert_eq!(seen.len(), 1);
    let headers = &seen[0];
    assert_eq!(headers["connection"], "upgrade");
    assert_eq!(headers["upgrade"], "websocket");
    assert!(headers.get("x-client-hop").is_none(), "{headers:?}");
    assert!(headers.get("keep-alive").is_none(), "{headers:?}");
    assert!(headers.get("x-forwarded-for").is_some(), "{headers:?}");

    // Bytes from the backend unasked, then both ways, several times.
    assert_eq!(read_exact(&mut stream, GREETING.len()).await, GREETING);
    for message in [
        &b"ping"[..],
        b"a longer message \x00\x01\xff",
        &[7u8; 100_000],
    ] {
        round_trip(&mut stream, message).await;
    }
    assert!(metric_reaches(&proxy, "proxy_tunnels_open", 1.0).await);
    assert_eq!(
        metric(&proxy, r#"proxy_upgrades_total{outcome="tunnel"}"#).await,
        1.0
    );

    // The client closes its half: the backend sees it and closes, and so does the tunnel.
    stream.shutdown().await.expect("half-close");
    assert!(
        closed_by_peer(&mut stream).await,
        "the tunnel was not closed"
    );
    assert!(eventually(PATIENCE, || backend.ended() == 1).await);
    assert!(metric_reaches(&proxy, r#"proxy_tunnels_ended_total{reason="closed"}"#, 1.0).await);
    assert!(metric_reaches(&proxy, "proxy_tunnels_open", 0.0).await);
    proxy.terminate().await;
}

#[tokio::test]
async fn a_tunnel_without_traffic_is_closed_on_both_sides_after_the_idle_timeout() {
    let backend = UpgradeBackend::start().await;
    let idle = format!("{}ms", IDLE.as_millis());
    let proxy = start_proxy(&[backend.flag()], &["--idle-timeout", &idle]);
    let mut stream = open_tunnel(proxy.addr, "").await;

    // Traffic for twice the idle timeout keeps it open: idle means silent.
    let busy_until = Instant::now() + 2 * IDLE;
    while Instant::now() < busy_until {
        round_trip(&mut stream, b"still here").await;
        tokio::time::sleep(IDLE / 5).await;
    }
    round_trip(&mut stream, b"last words").await;
    let quiet_since = Instant::now();

    assert!(
        closed_by_peer(&mut stream).await,
        "the idle tunnel stayed open"
    );
    // One-sided; the proxy's clock started when it read the echo, a moment before the client.
    assert!(
        quiet_since.elapsed() >= IDLE - Duration::from_millis(100),
        "closed after {:?}",
        quiet_since.elapsed()
    );
    assert!(
        eventually(PATIENCE, || backend.ended() == 1).await,
        "the backend's side stayed open"
    );
    assert!(metric_reaches(&proxy, r#"proxy_tunnels_ended_total{reason="idle"}"#, 1.0).await);
    assert!(metric_reaches(&proxy, "proxy_tunnels_open", 0.0).await);
    proxy.terminate().await;
}

#[tokio::test]
async fn a_backend_refusing_the_upgrade_has_its_answer_relayed_and_the_connection_goes_on() {
    let backend = UpgradeBackend::start().await;
    let proxy = start_proxy(&[backend.flag()], &[]);
    let (mut stream, head) = upgrade(proxy.addr, "/refuse", "").await;
    assert!(head.starts_with("HTTP/1.1 403 "), "{head}");
    let lines = head_lines(&head);
    assert!(lines.iter().any(|l| l == "content-length: 7"), "{head}");
    assert!(!lines.iter().any(|l| l.starts_with("upgrade:")), "{head}");
    assert_eq!(read_exact(&mut stream, 7).await, b"refused");
    // The backend was asked for the upgrade.
    let seen = backend.seen("/refuse");
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0]["upgrade"], "websocket");

    // Still HTTP: the next request on the same connection is served.
    stream
        .write_all(b"GET /next HTTP/1.1\r\nHost: chat.example\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut stream, PATIENCE).await;
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert_eq!(read_exact(&mut stream, 2).await, b"ok");
    assert_eq!(backend.seen("/next").len(), 1);
    assert_eq!(
        metric(&proxy, r#"proxy_upgrades_total{outcome="refused"}"#).await,
        1.0
    );
    assert_eq!(
        metric(&proxy, r#"proxy_upgrades_total{outcome="tunnel"}"#).await,
        0.0
    );
    proxy.terminate().await;
}

#[tokio::test]
async fn other_requests_are_served_while_a_tunnel_is_open() {
    let backend = UpgradeBackend::start().await;
    let proxy = start_proxy(&[backend.flag()], &[]);
    let mut tunnel = open_tunnel(proxy.addr, "").await;
    let http = http_client();
    for _ in 0..5 {
        let response = http.get(proxy.url("/page")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.text().await.unwrap(), "ok");
    }
    round_trip(&mut tunnel, b"still open").await;
    // A second tunnel beside the first.
    let mut second = open_tunnel(proxy.addr, "").await;
    round_trip(&mut second, b"second").await;
    round_trip(&mut tunnel, b"first").await;
    assert!(metric_reaches(&proxy, "proxy_tunnels_open", 2.0).await);
    assert_eq!(backend.seen("/page").len(), 5);
    // A graceful shutdown waits for open tunnels: close them first.
    drop((tunnel, second));
    proxy.terminate().await;
}

#[tokio::test]
async fn an_upgrade_request_that_reached_a_backend_is_never_sent_to_another() {
    // One backend resets every connection once it has read the head; the other upgrades.
    let resetting = TestBackend::start("reset", Behaviour::Reset).await;
    let backend = UpgradeBackend::start().await;
    let reset_flag = format!("http://{},name=reset", resetting.addr);
    let proxy = start_proxy(
        &[reset_flag, backend.flag()],
        &["--max-tries", "2", "--balance", "round-robin"],
    );
    let (mut switched, mut failed) = (0, 0);
    for _ in 0..2 {
        let (_stream, head) = upgrade(proxy.addr, "/ws", "").await;
        if head.starts_with("HTTP/1.1 101 ") {
            switched += 1;
        } else {
            assert!(head.starts_with("HTTP/1.1 502 "), "{head}");
            failed += 1;
        }
    }
    // Each request reached exactly one backend: a reset one was not replayed on the other.
    assert!(
        failed >= 1,
        "round-robin sent no upgrade to the resetting backend"
    );
    assert_eq!(resetting.hits(), failed);
    assert_eq!(backend.seen("/ws").len(), switched);
    proxy.terminate().await;
}

#[tokio::test]
async fn the_backend_of_a_websocket_gets_the_session_headers() {
    let sessions = TestSessionServer::start().await;
    let session = sessions
        .client("shop")
        .create("alice", Default::default(), None)
        .await
        .expect("create a session");
    let backend = UpgradeBackend::start().await;
    let proxy = start_proxy(
        &[backend.flag()],
        &[
            "--session-lookup",
            &sessions.url(),
            "--session-namespace",
            "shop",
        ],
    );
    let cookie = format!("Cookie: sid={}\r\nX-Session-User: mallory\r\n", session.id);
    let mut stream = open_tunnel(proxy.addr, &cookie).await;
    round_trip(&mut stream, b"who am i").await;
    let seen = backend.seen("/ws");
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0]["x-session-user"], "alice", "{:?}", seen[0]);
    assert_eq!(seen[0]["x-session-id"], session.id);
    assert_eq!(seen[0]["upgrade"], "websocket");
    drop(stream);
    proxy.terminate().await;
}

#[tokio::test]
async fn a_tunnel_open_at_sigterm_is_let_finish_then_the_proxy_exits_0() {
    let backend = UpgradeBackend::start().await;
    let mut proxy = start_proxy(&[backend.flag()], &[]);
    let mut stream = open_tunnel(proxy.addr, "").await;
    proxy.signal("TERM");
    // New connections are refused once the listener is closed; the tunnel still works.
    let addr = proxy.addr;
    let deadline = Instant::now() + PATIENCE;
    while TcpStream::connect(addr).await.is_ok() {
        assert!(Instant::now() < deadline, "still accepting after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    round_trip(&mut stream, b"after SIGTERM").await;
    assert!(proxy.is_running(), "exited with a tunnel open");

    stream.shutdown().await.expect("half-close");
    assert!(closed_by_peer(&mut stream).await);
    let (status, logs) = proxy.wait_exit(PATIENCE).await;
    assert!(status.success(), "{status}: {logs}");
}

#[tokio::test]
async fn an_h2c_or_other_upgrade_reaches_the_backend_as_a_normal_request() {
    let backend = UpgradeBackend::start().await;
    let proxy = start_proxy(&[backend.flag()], &[]);
    let attempts = [
        "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\
         HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n",
        "Connection: upgrade\r\nUpgrade: H2C\r\n",
        "Connection: upgrade\r\nUpgrade: websocket, h2c\r\n",
        "Connection: upgrade\r\nUpgrade: echo\r\n",
    ];
    for (n, headers) in attempts.iter().enumerate() {
        let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
        let request = format!("GET /h2c HTTP/1.1\r\nHost: chat.example\r\n{headers}\r\n");
        stream.write_all(request.as_bytes()).await.expect("write");
        let head = read_head(&mut stream, PATIENCE).await;
        // The backend would have switched, had it been asked: it was not, and no 101 came.
        assert!(head.starts_with("HTTP/1.1 200 "), "{headers}: {head}");
        assert!(
            !head_lines(&head).iter().any(|l| l.starts_with("upgrade:")),
            "{head}"
        );
        assert_eq!(read_exact(&mut stream, 2).await, b"ok");
        let seen = backend.seen("/h2c");
        assert_eq!(seen.len(), n + 1);
        let headers = &seen[n];
        for name in ["upgrade", "connection", "http2-settings"] {
            assert!(headers.get(name).is_none(), "{name}: {headers:?}");
        }
    }
    assert_eq!(
        metric(&proxy, r#"proxy_upgrades_total{outcome="tunnel"}"#).await,
        0.0
    );
    proxy.terminate().await;
}

#[tokio::test]
async fn an_open_tunnel_keeps_its_clients_slot_under_max_conns_per_ip() {
    let backend = UpgradeBackend::start().await;
    let proxy = start_proxy(&[backend.flag()], &["--max-conns-per-ip", "1"]);
    let http = http_client();
    let mut tunnel = open_tunnel(proxy.addr, "").await;
    round_trip(&mut tunnel, b"open").await;
    // The tunnel is this address's request in flight: a second one is refused.
    let response = http.get(proxy.url("/page")).send().await.unwrap();
    assert_eq!(response.status(), 429);
    assert!(backend.seen("/page").is_empty());
    round_trip(&mut tunnel, b"still open").await;

    // Once the tunnel is closed, the slot is free again.
    tunnel.shutdown().await.expect("half-close");
    assert!(closed_by_peer(&mut tunnel).await);
    let deadline = Instant::now() + PATIENCE;
    loop {
        let response = http.get(proxy.url("/page")).send().await.unwrap();
        if response.status() == 200 {
            break;
        }
        assert_eq!(response.status(), 429);
        assert!(Instant::now() < deadline, "the slot was never released");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(backend.seen("/page").len(), 1);
    proxy.terminate().await;
}
