//! Test backends: hyper servers on `127.0.0.1:0` that count requests, record what they saw,
//! and can be killed (listener and every open connection dropped at once).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use proxy_plugin::config::BackendConfig;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};

/// How a test backend answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// 200 with its name as the body (`/slow/<ms>` waits first; `/hop` adds hop-by-hop
    /// headers to the response).
    Echo,
    /// Reads requests and never answers.
    Hang,
    /// Holds every request until [`TestBackend::release`], then answers as `Echo` (200, its
    /// name): a request that is in flight for exactly as long as a test needs.
    Hold,
    /// Accepts, reads the request head, then resets the connection (raw TCP).
    Reset,
    /// 200 with a JSON object of the `x-session-*` headers it received (name to value);
    /// `/set-cookie/NAME` also sets cookie NAME, as a backend logging a user in or out would.
    SessionEcho,
}

/// One request as a backend saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Method.
    pub method: Method,
    /// Path and query.
    pub target: String,
    /// Headers.
    pub headers: HeaderMap,
}

/// What the serving tasks share with the test.
#[derive(Debug, Default)]
struct Shared {
    /// Requests received (counted on arrival of the head).
    hits: AtomicUsize,
    /// Requests being handled now.
    active: AtomicUsize,
    /// Every request seen (all behaviours but Reset).
    seen: Mutex<Vec<Seen>>,
    /// Set by [`TestBackend::release`]: `Hold` answers from then on.
    released: AtomicBool,
    /// Wakes the requests `Hold` is holding.
    release: Notify,
}

/// A running test backend; killed when dropped.
#[derive(Debug)]
pub struct TestBackend {
    /// Its name (the Echo body, and the `x-backend` response header).
    pub name: String,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Counters and records.
    shared: Arc<Shared>,
    /// The accept task; its `JoinSet` owns the connections, so aborting it kills them all.
    task: JoinHandle<()>,
}

impl TestBackend {
    /// Starts a backend on a free loopback port.
    pub async fn start(name: &str, behaviour: Behaviour) -> TestBackend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local address");
        let shared = Arc::new(Shared::default());
        let task = tokio::spawn(accept(listener, name.to_owned(), behaviour, shared.clone()));
        TestBackend {
            name: name.to_owned(),
            addr,
            shared,
            task,
        }
    }

    /// Requests received so far.
    pub fn hits(&self) -> usize {
        self.shared.hits.load(Ordering::SeqCst)
    }

    /// Requests being handled now.
    pub fn active(&self) -> usize {
        self.shared.active.load(Ordering::SeqCst)
    }

    /// The last request seen.
    pub fn last(&self) -> Option<Seen> {
        self.shared.seen.lock().last().cloned()
    }

    /// Lets every request held by [`Behaviour::Hold`] be answered, and the ones to come too.
    pub fn release(&self) {
        self.shared.released.store(true, Ordering::SeqCst);
        self.shared.release.notify_waiters();
    }

    /// Drops the listener and every open connection.
    pub fn kill(&self) {
        self.task.abort();
    }

    /// Its entry in a proxy config (weight 1).
    pub fn config(&self) -> BackendConfig {
        BackendConfig {
            name: self.name.clone(),
            authority: self.addr.to_string(),
            weight: 1,
            tls: false,
        }
    }
}

impl Drop for TestBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept(listener: TcpListener, name: String, behaviour: Behaviour, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (name, shared) = (name.clone(), shared.clone());
        if behaviour == Behaviour::Reset {
            connections.spawn(async move {
                let mut stream = stream;
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                shared.hits.fetch_add(1, Ordering::SeqCst);
                let _ = stream.set_zero_linger();
                drop(stream);
            });
            continue;
        }
        connections.spawn(async move {
            let service = service_fn(move |request| {
                let (name, shared) = (name.clone(), shared.clone());
                async move { Ok::<_, Infallible>(answer(&name, behaviour, &shared, request).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Decrements `active` when a request's handling ends (also when cancelled).
struct ActiveGuard<'a>(&'a Shared);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn answer(
    name: &str,
    behaviour: Behaviour,
    shared: &Shared,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    shared.hits.fetch_add(1, Ordering::SeqCst);
    shared.active.fetch_add(1, Ordering::SeqCst);
    let _guard = ActiveGuard(shared);
    let target = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    shared.seen.lock().push(Seen {
        method: request.method().clone(),
        target: target.clone(),
        headers: request.headers().clone(),
    });
    if behaviour == Behaviour::Hang {
        std::future::pending::<()>().await;
    }
    if behaviour == Behaviour::Hold {
        loop {
            // Made before the flag is read, so a release in between still wakes it.
            let released = shared.release.notified();
            if shared.released.load(Ordering::SeqCst) {
                break;
            }
            released.await;
        }
    }
    if behaviour == Behaviour::SessionEcho {
        return session_echo(&target, request.headers());
    }
    if let Some(ms) = target.strip_prefix("/slow/").and_then(|ms| ms.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let length = match request.into_body().collect().await {
        Ok(body) => body.to_bytes().len(),
        Err(_) => {
            let mut response = Response::new(Full::new(Bytes::from_static(b"body failed")));
            *response.status_mut() = StatusCode::BAD_REQUEST;
            return response;
        }
    };
    let mut response = Response::new(Full::new(Bytes::from(name.to_owned())));
    let headers = response.headers_mut();
    headers.insert(
        "x-backend",
        HeaderValue::from_str(name).expect("ascii name"),
    );
    headers.insert("x-body-len", HeaderValue::from(length));
    if target.starts_with("/hop") {
        headers.insert("connection", HeaderValue::from_static("x-resp-hop"));
        headers.insert("x-resp-hop", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("proxy-authenticate", HeaderValue::from_static("Basic"));
        headers.insert("x-end-to-end", HeaderValue::from_static("kept"));
    }
    response
}

/// The [`Behaviour::SessionEcho`] answer.
fn session_echo(target: &str, seen: &HeaderMap) -> Response<Full<Bytes>> {
    let session: serde_json::Map<String, serde_json::Value> = seen
        .iter()
        .filter(|(name, _)| name.as_str().starts_with("x-session-"))
        .map(|(name, value)| {
            let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
            (name.as_str().to_owned(), value.into())
        })
        .collect();
    let body = serde_json::to_vec(&session).expect("JSON of strings");
    let mut response = Response::new(Full::new(Bytes::from(body)));
    let headers = response.headers_mut();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    if let Some(cookie) = target.strip_prefix("/set-cookie/") {
        let value = format!("{cookie}=set-by-backend; Path=/");
        headers.insert("set-cookie", HeaderValue::from_str(&value).expect("cookie"));
    }
    response
}
