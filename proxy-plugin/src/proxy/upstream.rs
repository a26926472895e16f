//! Connections to backends: one keep-alive pool of HTTP/1.1 connections per backend, on
//! hyper's connection API.
//!
//! This is what the proxy used hyper-util's legacy `Client` for, without what that client
//! costs on every request and a proxy does not need: a task spawned per HTTP/1 request to
//! watch its connection become idle, a hashed pool key, a connector service and URI rewriting.
//!
//! A request checks a connection out ([`Pool::send`]): the most recently parked one that is
//! still open, else a new one (`connect_timeout`, `TCP_NODELAY`; for an `https://` backend a
//! TLS handshake too, within the same `connect_timeout`, the certificate verified: a failed
//! handshake is a failed connect, never a fallback to cleartext). A pooled connection the
//! backend closed before our request went out is replaced by a new one and the request sent
//! there (what the legacy client's `retry_canceled_requests` did), whatever the method, since
//! nothing reached the backend. The connection is parked again ([`Pooled::park`]) once the
//! response body has been read to its end; a response cut short closes it, since HTTP/1 cannot
//! abandon a response and reuse the connection. A sweeper task closes connections idle for
//! [`POOL_IDLE_TIMEOUT`] and ends with the pools. An upgrade request (WebSocket) gets a new
//! connection of its own that can switch protocols, and is never parked, whatever the answer
//! (see `proxy/tunnel.rs`).
//!
//! A connection's I/O (hyper's `Connection` future) is driven by the request using it, in
//! that request's task ([`Pooled::poll_driver`]: while it waits for the response head, then
//! from the response body's polls), not by a task of its own: handing every exchange over to
//! a second task and back cost a wake, a schedule and a poll of that task per request. A parked
//! connection is polled by nobody: a close from the backend is seen when the connection is
//! next used (hyper reads before it writes: the request then comes back unsent, for a new
//! connection). Two kinds of exchange still get a task for their connection
//! ([`Pooled::task`]): an HTTP/2 client's, whose response may stall on the client's flow
//! control while the connection must be ended from outside after `send_timeout` (its send
//! watch), and an upgrade's (hyper hands the upgraded connection over from there). Such a
//! connection keeps its task when parked and reused.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::Authority;
use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::net::TcpStream;
use tokio::task::AbortHandle;
use tokio::time::{Instant, MissedTickBehavior};

use super::body::UpstreamBody;
use super::conn::MaybeTls;
use crate::tls::BackendTls;

/// Idle upstream connections are closed after this: below the usual backend keep-alive
/// timeouts (nginx 75 s, Node 5 s is the outlier), so we rarely reuse one the backend is
/// closing at that very moment (and if we do, the request goes out on a new one, or an
/// idempotent request is retried).
pub(crate) const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// How often the sweeper looks for connections idle past [`POOL_IDLE_TIMEOUT`].
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Idle connections kept per backend; one parked beyond this is closed instead. Far above what
/// the client concurrency of one proxy needs, it only bounds file descriptors after a burst.
const MAX_IDLE_PER_BACKEND: usize = 1024;

/// Why an exchange with a backend failed.
#[derive(Debug)]
pub(crate) enum SendError {
    /// No connection could be made: nothing reached the backend.
    Connect(String),
    /// The exchange failed after the request may have reached the backend.
    Exchange(String),
}

/// One backend's connections.
#[derive(Debug)]
pub(crate) struct Pool {
    /// `host:port` to connect to.
    authority: Authority,
    /// TLS for an `https://` backend; `None`: cleartext.
    tls: Option<BackendTls>,
    /// The `Host` a request without one gets (an HTTP/1.0 client's), as the legacy client did.
    host: Option<HeaderValue>,
    /// Bound on establishing a connection.
    connect_timeout: Duration,
    /// Open connections waiting for a request, most recently parked last.
    idle: Mutex<Vec<Idle>>,
}

/// A parked connection.
#[derive(Debug)]
struct Idle {
    /// The connection's request handle.
    sender: SendRequest<UpstreamBody>,
    /// What does its I/O.
    driver: Driver,
    /// When it was parked.
    since: Instant,
}

/// hyper's side of a backend connection: the future doing its I/O.
type Connection = http1::Connection<TokioIo<BackendStream>, UpstreamBody>;

/// What does a backend connection's I/O.
#[derive(Debug)]
enum Driver {
    /// The connection's future, polled by the request using it ([`Pooled::poll_driver`]).
    Inline(Box<Connection>),
    /// A task of its own: aborting it closes the connection.
    Task(AbortHandle),
    /// The connection's future has ended: it is closed.
    Ended,
}

/// A connection checked out of a [`Pool`], for one request and its response.
#[derive(Debug)]
pub(crate) struct Pooled {
    /// The connection's request handle.
    sender: SendRequest<UpstreamBody>,
    /// What does the connection's I/O.
    driver: Driver,
    /// Where it goes back.
    pool: Arc<Pool>,
    /// Whether it may go back: not a connection made for an upgrade request, whatever its
    /// answer.
    reusable: bool,
}

impl Pool {
    /// A pool of connections to `authority`, over TLS when `tls` is given.
    pub(crate) fn new(
        authority: Authority,
        tls: Option<BackendTls>,
        connect_timeout: Duration,
    ) -> Arc<Self> {
        Arc::new(Pool {
            host: HeaderValue::from_str(authority.as_str()).ok(),
            authority,
            tls,
            connect_timeout,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// The backend's `host:port`.
    pub(crate) fn authority(&self) -> &Authority {
        &self.authority
    }

    /// The `Host` for a request that has none.
    pub(crate) fn host(&self) -> Option<&HeaderValue> {
        self.host.as_ref()
    }

    /// Sends `request` on a pooled or new connection; the response head and the connection,
    /// to park once the response body is read. An `upgrade` request (WebSocket) goes on a new
    /// connection that can switch protocols and is never parked. With `detached` (an HTTP/2
    /// client's request) the connection's I/O runs in a task of its own ([`Pooled::task`]);
    /// otherwise the caller drives it, by polling the response body.
    pub(crate) async fn send(
        self: &Arc<Self>,
        mut request: Request<UpstreamBody>,
        upgrade: bool,
        detached: bool,
    ) -> Result<(Response<Incoming>, Pooled), SendError> {
        if !upgrade && let Some(mut conn) = self.checkout(detached).await {
            let response = conn.sender.try_send_request(request);
            match conn.driving(response).await {
                Ok(response) => return Ok((response, conn)),
                Err(mut error) => match error.take_message() {
                    // The backend closed the pooled connection before the request was
                    // written: a new connection gets it.
                    Some(unsent) => request = unsent,
                    None => return Err(SendError::Exchange(error_chain(error.error()))),
                },
            }
        }
        // Boxed: connecting is the rare case, and its future would make every request's
        // future (moved as it is polled) larger.
        Box::pin(self.send_on_new(request, upgrade, detached)).await
    }

    /// Sends `request` on a new connection (one for an `upgrade`, see [`Pool::send`]).
    async fn send_on_new(
        self: &Arc<Self>,
        request: Request<UpstreamBody>,
        upgrade: bool,
        detached: bool,
    ) -> Result<(Response<Incoming>, Pooled), SendError> {
        let mut conn = self.connect(upgrade, detached).await?;
        let response = conn.sender.send_request(request);
        match conn.driving(response).await {
            Ok(response) => Ok((response, conn)),
            Err(error) => Err(SendError::Exchange(error_chain(&error))),
        }
    }

    /// The most recently parked connection that is open and ready, its I/O in a task of its
    /// own when `detached`.
    async fn checkout(self: &Arc<Self>, detached: bool) -> Option<Pooled> {
        loop {
            let Idle {
                sender,
                driver,
                since,
            } = self.idle.lock().pop()?;
            if sender.is_closed() || since.elapsed() >= POOL_IDLE_TIMEOUT {
                continue;
            }
            let mut conn = Pooled {
                sender,
                driver,
                pool: self.clone(),
                reusable: true,
            };
            // Ready at once but for the end of the last exchange, which the connection has
            // yet to account for (polled, it also reads a close the backend sent while the
            // connection was parked); an error means the backend closed it.
            if std::future::poll_fn(|cx| conn.poll_ready(cx)).await.is_ok() {
                if detached {
                    conn.detach();
                }
                return Some(conn);
            }
        }
    }

    /// A new connection (TCP, then TLS for an `https://` backend, both within
    /// `connect_timeout`), its I/O in a task of its own when `detached`; one that can switch
    /// protocols (its I/O in a task) and is never parked for an `upgrade` request.
    async fn connect(self: &Arc<Self>, upgrade: bool, detached: bool) -> Result<Pooled, SendError> {
        let authority = self.authority.as_str();
        let connecting = async {
            let stream = TcpStream::connect(authority)
                .await
                .map_err(|error| format!("tcp connect to {authority}: {error}"))?;
            // Requests and responses are written whole: Nagle would only delay them.
            let _ = stream.set_nodelay(true);
            let Some(tls) = &self.tls else {
                return Ok(BackendStream::Plain(stream));
            };
            match tls.connect(stream).await {
                Ok(stream) => Ok(BackendStream::Tls(Box::new(stream))),
                Err(error) => Err(format!(
                    "TLS handshake with {authority}: {}",
                    error_chain(&error)
                )),
            }
        };
        let stream = match tokio::time::timeout(self.connect_timeout, connecting).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => return Err(SendError::Connect(error)),
            Err(_) => {
                return Err(SendError::Connect(format!(
                    "connect to {authority}: no connection within {:?}",
                    self.connect_timeout
                )));
            }
        };
        let (sender, connection) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|error| SendError::Connect(error_chain(&error)))?;
        let driver = if upgrade {
            // With upgrades, a 101 hands the connection over (`hyper::upgrade::on` the
            // response): that needs the connection's future to run to its end on its own.
            let task = tokio::spawn(async move {
                if let Err(error) = connection.with_upgrades().await {
                    tracing::debug!(%error, "upstream connection ended with an error");
                }
            });
            Driver::Task(task.abort_handle())
        } else {
            Driver::Inline(Box::new(connection))
        };
        let mut conn = Pooled {
            sender,
            driver,
            pool: self.clone(),
            reusable: !upgrade,
        };
        if detached {
            conn.detach();
        }
        Ok(conn)
    }

    /// Closes the connections idle since before `cutoff`, and those the backend closed.
    fn evict(&self, cutoff: Instant) {
        self.idle
            .lock()
            .retain(|idle| idle.since > cutoff && !idle.sender.is_closed());
    }
}

impl Pooled {
    /// The connection's I/O task, if it has one (see [`Pool::send`]'s `detached`): aborting
    /// it ends the exchange and closes the connection (only while this is checked out: a
    /// parked connection may serve another request).
    pub(crate) fn task(&self) -> Option<&AbortHandle> {
        match &self.driver {
            Driver::Task(task) => Some(task),
            Driver::Inline(_) | Driver::Ended => None,
        }
    }

    /// Does the connection's pending I/O, when this request drives it (no task of its own):
    /// sends the request (and its body), reads the response into its head and body. To be
    /// called whenever the request polls for the response head or body, so that the same
    /// wakes reach it. Once the connection's future ends, the connection is closed.
    pub(crate) fn poll_driver(&mut self, cx: &mut Context<'_>) {
        let Driver::Inline(connection) = &mut self.driver else {
            return;
        };
        if let Poll::Ready(ended) = Pin::new(&mut **connection).poll(cx) {
            if let Err(error) = ended {
                tracing::debug!(%error, "upstream connection ended with an error");
            }
            // Dropped now, so that whatever waits on it (a response head) learns at once.
            self.driver = Driver::Ended;
        }
    }

    /// Whether the connection takes a request now; an error when it is closed. Driven only
    /// when not ready yet: a close the backend sent while the connection was parked is read
    /// before the request is written (hyper reads first), and the request then comes back
    /// unsent, for a new connection.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<hyper::Result<()>> {
        if let Poll::Ready(Ok(())) = self.sender.poll_ready(cx) {
            return Poll::Ready(Ok(()));
        }
        self.poll_driver(cx);
        self.sender.poll_ready(cx)
    }

    /// Awaits `exchange` (a response head on this connection), driving the connection.
    async fn driving<F: Future>(&mut self, exchange: F) -> F::Output {
        let mut exchange = std::pin::pin!(exchange);
        std::future::poll_fn(|cx| {
            self.poll_driver(cx);
            exchange.as_mut().poll(cx)
        })
        .await
    }

    /// Moves the connection's I/O to a task of its own.
    fn detach(&mut self) {
        if let Driver::Inline(connection) = std::mem::replace(&mut self.driver, Driver::Ended) {
            let task = tokio::spawn(async move {
                if let Err(error) = connection.await {
                    tracing::debug!(%error, "upstream connection ended with an error");
                }
            });
            self.driver = Driver::Task(task.abort_handle());
        }
    }

    /// Puts the connection back for the next request (its response was read to the end).
    pub(crate) fn park(self) {
        if !self.reusable || self.sender.is_closed() || matches!(self.driver, Driver::Ended) {
            return;
        }
        let mut idle = self.pool.idle.lock();
        if idle.len() < MAX_IDLE_PER_BACKEND {
            idle.push(Idle {
                sender: self.sender,
                driver: self.driver,
                since: Instant::now(),
            });
        }
    }
}

/// A backend connection's byte stream: the socket of an `http://` backend, or the TLS session
/// of an `https://` one, its certificate verified.
type BackendStream = MaybeTls<tokio_rustls::client::TlsStream<TcpStream>>;

/// Starts the task closing the idle connections of `pools`; it ends once they are all gone.
pub(crate) fn sweep_idle(pools: &[Arc<Pool>]) {
    let pools: Vec<Weak<Pool>> = pools.iter().map(Arc::downgrade).collect();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(SWEEP_INTERVAL);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(cutoff) = Instant::now().checked_sub(POOL_IDLE_TIMEOUT) else {
                continue;
            };
            let mut alive = false;
            for pool in pools.iter().filter_map(Weak::upgrade) {
                alive = true;
                pool.evict(cutoff);
            }
            if !alive {
                return;
            }
        }
    });
}

/// An error with its causes, `a: b: c`.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
