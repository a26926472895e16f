//! The limits and timeouts the proxy enforces, end to end on loopback: 408 for a client too
//! slow with its head (the first one, or the next one on a keep-alive connection), 431 for a
//! head too large, 413 for a body too large, 503 past `max_connections`, 504 for a backend
//! that does not answer. Timing assertions are one-sided where load can only make things later:
//! never before the configured timeout, and within a bound ten times as long or more.

mod support;

use std::time::{Duration, Instant};

use http::StatusCode;
use proxy_plugin::metrics::RejectReason;
use support::backend::{Behaviour, TestBackend};
use support::proxy::{TestProxy, client, config};
use support::raw::{raw_exchange, read_head, read_until_close};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

/// Bound on a read that ends with the server closing the connection, or on a wait for a
/// condition: generous, since a loaded machine is slow and a passing test never waits it out.
const PATIENCE: Duration = Duration::from_secs(30);

#[tokio::test]
async fn slow_header_client_is_cut_at_the_timeout_while_others_are_served() {
    let backend = TestBackend::start("a", Behaviour::Echo).await;
    let mut cfg = config(&[&backend]);
    let timeout = Duration::from_secs(1);
    cfg.limits.header_read_timeout = timeout;
    let proxy = TestProxy::start(cfg).await;

    let addr = proxy.addr;
    let (head_started, head_started_rx) = oneshot::channel();
    let slow = tokio::spawn(async move {
        // Before the connection exists, so the proxy's deadline cannot start earlier.
        let started = Instant::now();
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut read, mut write) = stream.into_split();
        // One byte every 200 ms, for 13 s: the head is never complete, the client never idle.
        let writer = tokio::spawn(async move {
            let mut head_started = Some(head_started);
            for byte in b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
                if write.write_all(&[*byte]).await.is_err() {
                    return;
                }
                if let Some(tx) = head_started.take() {
                    let _ = tx.send(());
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        let mut out = Vec::new();
        let _ = tokio::time::timeout(PATIENCE, read.read_to_end(&mut out)).await;
        writer.abort();
        (
            String::from_utf8_lossy(&out).into_owned(),
            started.elapsed(),
        )
    });

    head_started_rx.await.unwrap();
    let http = client();
    let mut served_meanwhile = 0;
    while !slow.is_finished() {
        let response = http.get(proxy.url("/")).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        if !slow.is_finished() {
            served_meanwhile += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (answer, elapsed) = slow.await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(
        elapsed >= timeout,
        "cut after {elapsed:?}, before the timeout"
    );
    assert!(
        elapsed < timeout * 15,
        "cut after {elapsed:?} (the head would never have ended)"
    );
    assert!(
        served_meanwhile >= 1,
        "nobody was served while the slow head was pending"
    );
    assert_eq!(
        proxy.proxy.metrics().rejects(RejectReason::ClientTimeout),
        1
    );
}

#[tokio::test]
async fn a_two_megabyte_header_gets_431_and_a_large_legal_one_passes() {
    let backend = TestBackend::start("a", Behaviour::Echo).await;
    let proxy = TestProxy::start(config(&[&backend])).await; // max_header_bytes: 16 KiB

    let legal = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: {}\r\n\r\n",
        "b".repeat(12 * 1024)
    );
    let response = raw_exchange(proxy.addr, legal.as_bytes(), PATIENCE).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");

    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut read, mut write) = stream.split();
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(2 * 1024 * 1024)
    );
    let writer = async {
        let _ = write.write_all(huge.as_bytes()).await;
    };
    let reader = async {
        let mut out = Vec::new();
        let _ = tokio::time::timeout(PATIENCE, read.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    };
    let ((), answer) = tokio::join!(writer, reader);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");
    assert_eq!(
        backend.hits(),
        1,
        "the huge request never reached the backend"
    );
    assert_eq!(
        proxy.proxy.metrics().rejects(RejectReason::HeaderTooLarge),
        1
    );
}

#[tokio::test]
async fn silent_upstream_gets_504_after_response_timeout() {
    let backend = TestBackend::start("hang", Behaviour::Hang).await;
    let mut cfg = config(&[&backend]);
    let timeout = Duration::from_millis(500);
    cfg.limits.response_timeout = timeout;
    let proxy = TestProxy::start(cfg).await;
    let started = Instant::now();
    // The client waits 20 s: a proxy waiting for the backend forever would fail the request.
    let response = client().get(proxy.url("/")).send().await.unwrap();
    let elapsed = started.elapsed();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(
        elapsed >= timeout,
        "504 after {elapsed:?}, before the timeout"
    );
    assert!(elapsed < timeout * 20, "504 after {elapsed:?}");
}

#[tokio::test]
async fn body_over_max_body_bytes_gets_413_announced_or_streamed() {
    let backend = TestBackend::start("a", Behaviour::Echo).await;
    let mut cfg = config(&[&backend]);
    cfg.limits.max_body_bytes = 1024;
    cfg.limits.retry_buffer_bytes = 256;
    let proxy = TestProxy::start(cfg).await;
    let http = client();

    let response = http
        .post(proxy.url("/"))
        .body(vec![b'x'; 4096])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        backend.hits(),
        0,
        "refused before any backend was contacted"
    );

    let response = http
        .post(proxy.url("/"))
        .body(vec![b'x'; 1000])
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "a streamed body under the limit passes"
    );
    assert_eq!(response.headers()["x-body-len"], "1000");

    // Chunked (no length): streamed and cut past the limit.
    let mut request = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..8 {
        request.extend_from_slice(b"200\r\n");
        request.extend_from_slice(&[b'y'; 512]);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    let answer = raw_exchange(proxy.addr, &request, PATIENCE).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert_eq!(proxy.proxy.metrics().rejects(RejectReason::BodyTooLarge), 2);
}

#[tokio::test]
async fn connections_over_max_connections_get_503() {
    let backend = TestBackend::start("a", Behaviour::Echo).await;
    let mut cfg = config(&[&backend]);
    cfg.limits.max_connections = 2;
    let proxy = TestProxy::start(cfg).await;
    let get = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";

    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        stream.write_all(get).await.unwrap();
        let head = read_head(&mut stream, PATIENCE).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        held.push(stream);
    }
    let answer = raw_exchange(proxy.addr, get, PATIENCE).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert_eq!(
        proxy
            .proxy
            .metrics()
            .rejects(RejectReason::TooManyConnections),
        1
    );

    drop(held.pop());
    let served = async {
        loop {
            let answer = raw_exchange(
                proxy.addr,
                b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                PATIENCE,
            )
            .await;
            if answer.starts_with("HTTP/1.1 200") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(PATIENCE, served)
        .await
        .expect("a freed place is given to a new connection");
}

#[tokio::test]
async fn an_http2_connection_over_max_connections_gets_503_then_goaway() {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let backend = TestBackend::start("a", Behaviour::Echo).await;
    let mut cfg = config(&[&backend]);
    cfg.limits.max_connections = 1;
    // Far past the patience: only the GOAWAY of the over-limit connection can end it in time.
    cfg.limits.idle_timeout = Duration::from_secs(600);
    let proxy = TestProxy::start(cfg).await;
    let mut held = TcpStream::connect(proxy.addr).await.unwrap();
    held.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut held, PATIENCE).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");

    // HTTP/2 with prior knowledge, over the limit: 503, then the proxy closes the connection.
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("HTTP/2 handshake");
    let driver = tokio::spawn(connection);
    let request = http::Request::builder()
        .uri("http://x/")
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = tokio::time::timeout(PATIENCE, sender.send_request(request))
        .await
        .expect("a response within the patience")
        .expect("a response");
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let _ = response.into_body().collect().await;
    let ended = tokio::time::timeout(PATIENCE, driver).await;
    assert!(
        ended.is_ok(),
        "the HTTP/2 connection over max_connections stayed open"
    );
    assert!(
        proxy
            .proxy
            .metrics()
            .rejects(RejectReason::TooManyConnections)
            >= 1
    );
    drop(held);
}

#[tokio::test]
async fn keep_alive_connections_get_a_fresh_head_deadline_after_each_response() {
    let backend = TestBackend::start("a", Behaviour::Echo).await;
    let mut cfg = config(&[&backend]);
    let timeout = Duration::from_secs(1);
    cfg.limits.header_read_timeout = timeout;
    cfg.limits.idle_timeout = timeout;
    let proxy = TestProxy::start(cfg).await;
    let get = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";

    // Idle after a response: closed without a word once the idle timeout passes. The clock starts
    // before the request goes out, so the deadline (armed after the response) cannot be earlier.
    let mut idle = TcpStream::connect(proxy.addr).await.unwrap();
    let started = Instant::now();
    idle.write_all(get).await.unwrap();
    let answer = read_until_close(&mut idle, PATIENCE).await;
    let elapsed = started.elapsed();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(answer.matches("HTTP/1.1").count(), 1, "{answer}");
    assert!(elapsed >= timeout, "closed after {elapsed:?}");
    assert!(elapsed < timeout * 15, "still open after {elapsed:?}");

    // Part of a second head, then silence: 408.
    let mut slow = TcpStream::connect(proxy.addr).await.unwrap();
    slow.write_all(get).await.unwrap();
    let head = read_head(&mut slow, PATIENCE).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    slow.write_all(b"GET / HT").await.unwrap();
    let answer = read_until_close(&mut slow, PATIENCE).await;
    assert!(
        answer.ends_with(
            "HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
        ),
        "{answer:?}"
    );
}
