//! The upstream keep-alive pool: connections are reused, a connection the backend closed while
//! it sat in the pool costs no request (not even a POST), a response read only in part closes
//! its connection instead of handing it to the next request.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use proxy_plugin::config::BackendConfig;
use reqwest::StatusCode;
use support::eventually;
use support::proxy::{TestProxy, client, config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A raw HTTP/1.1 backend counting the connections it accepted and closed; `close_after`
/// closes each connection that long after its first response (as a backend with a short
/// keep-alive timeout does), without saying so in the response.
struct CountingBackend {
    addr: SocketAddr,
    /// Connections accepted.
    connections: Arc<AtomicUsize>,
    /// Connections it closed (counted once the socket is closed).
    closed: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingBackend {
    async fn start(close_after: Option<Duration>, body: &'static [u8]) -> CountingBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let (accepted, ended) = (connections.clone(), closed.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                let ended = ended.clone();
                tokio::spawn(async move {
                    // `serve` owns the stream: it is closed when `serve` returns.
                    serve(stream, close_after, body).await;
                    ended.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        CountingBackend {
            addr,
            connections,
            closed,
            task,
        }
    }

    fn config(&self) -> BackendConfig {
        BackendConfig {
            name: "counting".into(),
            authority: self.addr.to_string(),
            weight: 1,
            tls: false,
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    fn closed(&self) -> usize {
        self.closed.load(Ordering::SeqCst)
    }
}

impl Drop for CountingBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Answers each request head (bodies are small and read with it) with 200 and `body`.
async fn serve(mut stream: TcpStream, close_after: Option<Duration>, body: &'static [u8]) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut filled = 0;
    loop {
        let Ok(n) = stream.read(&mut buf[filled..]).await else {
            return;
        };
        if n == 0 {
            return;
        }
        filled += n;
        let Some(end) = buf[..filled].windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        // Wait for the (small) body, then forget this request.
        while filled < end + 4 + length {
            match stream.read(&mut buf[filled..]).await {
                Ok(0) | Err(_) => return,
                Ok(n) => filled += n,
            }
        }
        buf.copy_within(end + 4 + length..filled, 0);
        filled -= end + 4 + length;
        let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
        if stream.write_all(head.as_bytes()).await.is_err() || stream.write_all(body).await.is_err()
        {
            return;
        }
        if let Some(after) = close_after {
            tokio::time::sleep(after).await;
            return;
        }
    }
}

#[tokio::test]
async fn sequential_requests_reuse_one_upstream_connection() {
    let backend = CountingBackend::start(None, b"pooled\n").await;
    let mut cfg = config(&[]);
    cfg.backends = vec![backend.config()];
    let proxy = TestProxy::start(cfg).await;
    let http = client();
    for _ in 0..20 {
        let response = http.get(proxy.url("/")).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.text().await.unwrap(), "pooled\n");
    }
    assert_eq!(backend.connections(), 1, "one connection served them all");
}

#[tokio::test]
async fn a_pooled_connection_the_backend_closed_costs_no_request_even_a_post() {
    // Each connection closes 50 ms after its response, while parked in the pool.
    let backend = CountingBackend::start(Some(Duration::from_millis(50)), b"fresh\n").await;
    let mut cfg = config(&[]);
    cfg.backends = vec![backend.config()];
    cfg.limits.max_tries = 1; // no retry: only the pool itself may help
    let proxy = TestProxy::start(cfg).await;
    let http = client();
    for round in 0..5 {
        let response = http
            .post(proxy.url("/order"))
            .body("buy 1")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "round {round}");
        assert_eq!(response.text().await.unwrap(), "fresh\n");
        // The backend has closed the connection (its FIN is on the proxy's socket) while the
        // connection sits in the proxy's pool.
        assert!(
            eventually(Duration::from_secs(30), || backend.closed() == round + 1).await,
            "the backend closed connection {round}"
        );
        // One more turn of the runtime's I/O driver (a yield is woken after it), so the
        // connection's task has seen that FIN before the next request is handed to the pool.
        tokio::task::yield_now().await;
    }
    assert_eq!(backend.connections(), 5, "a new connection each time");
    assert_eq!(
        proxy
            .proxy
            .metrics()
            .rejects(proxy_plugin::metrics::RejectReason::BadGateway),
        0
    );
}

#[tokio::test]
async fn a_response_cut_short_is_not_followed_on_its_connection() {
    // A body larger than what the client reads before it goes away.
    let big: &'static [u8] = Box::leak(vec![b'x'; 4 * 1024 * 1024].into_boxed_slice());
    let backend = CountingBackend::start(None, big).await;
    let mut cfg = config(&[]);
    cfg.backends = vec![backend.config()];
    let proxy = TestProxy::start(cfg).await;

    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"GET /big HTTP/1.1\r\nhost: test\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 1024];
    let n = stream.read(&mut first).await.unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
    drop(stream); // leaves most of the 4 MiB unread

    // The next request gets the whole body, on a connection of its own.
    let response = client().get(proxy.url("/big")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.bytes().await.unwrap().len(), big.len());
    assert_eq!(backend.connections(), 2);
}
