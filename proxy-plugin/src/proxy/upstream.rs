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
//! [`POOL_IDLE_TIMEOUT`] and ends with the pools. A checked-out connection can also be ended
//! at once from outside ([`Pooled::task`]: a client that takes none of its HTTP/2 response).
//! An upgrade request (WebSocket) gets a new connection of its own that can switch protocols,
//! and is never parked, whatever the answer (see `proxy/tunnel.rs`).

use std::sync::{Arc, Weak};
use std::time::Duration;

use http::uri::Authority;
use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::task::AbortHandle;
use tokio::time::{Instant, MissedTickBehavior};

use super::body::UpstreamBody;
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
    /// The connection's request handle (its I/O runs in a task of its own).
    sender: SendRequest<UpstreamBody>,
    /// That task.
    task: AbortHandle,
    /// When it was parked.
    since: Instant,
}

/// A connection checked out of a [`Pool`], for one request and its response.
#[derive(Debug)]
pub(crate) struct Pooled {
    /// The connection's request handle.
    sender: SendRequest<UpstreamBody>,
    /// The task doing the connection's I/O: aborting it closes the connection.
    task: AbortHandle,
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
    /// connection that can switch protocols and is never parked.
    pub(crate) async fn send(
        self: &Arc<Self>,
        mut request: Request<UpstreamBody>,
        upgrade: bool,
    ) -> Result<(Response<Incoming>, Pooled), SendError> {
        if !upgrade && let Some(mut conn) = self.checkout().await {
            match conn.sender.try_send_request(request).await {
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
        Box::pin(self.send_on_new(request, upgrade)).await
    }

    /// Sends `request` on a new connection (one for an `upgrade`, see [`Pool::send`]).
    async fn send_on_new(
        self: &Arc<Self>,
        request: Request<UpstreamBody>,
        upgrade: bool,
    ) -> Result<(Response<Incoming>, Pooled), SendError> {
        let mut conn = self.connect(upgrade).await?;
        match conn.sender.send_request(request).await {
            Ok(response) => Ok((response, conn)),
            Err(error) => Err(SendError::Exchange(error_chain(&error))),
        }
    }

    /// The most recently parked connection that is open and ready.
    async fn checkout(self: &Arc<Self>) -> Option<Pooled> {
        loop {
            let Idle {
                mut sender,
                task,
                since,
            } = self.idle.lock().pop()?;
            if sender.is_closed() || since.elapsed() >= POOL_IDLE_TIMEOUT {
                continue;
            }
            // Ready at once but for a response whose last bytes the connection's task has yet
            // to account for; an error means the backend closed it.
            if sender.ready().await.is_ok() {
                return Some(Pooled {
                    sender,
                    task,
                    pool: self.clone(),
                    reusable: true,
                });
            }
        }
    }

    /// A new connection (TCP, then TLS for an `https://` backend, both within
    /// `connect_timeout`), its I/O spawned; one that can switch protocols and is never parked
    /// for an `upgrade` request.
    async fn connect(self: &Arc<Self>, upgrade: bool) -> Result<Pooled, SendError> {
        let authority = self.authority.as_str();
        let connecting = async {
            let stream = TcpStream::connect(authority)
                .await
                .map_err(|error| format!("tcp connect to {authority}: {error}"))?;
            // Requests and responses are written whole: Nagle would only delay them.
            let _ = stream.set_nodelay(true);
            let Some(tls) = &self.tls else {
                return Ok(Dialled::Plain(stream));
            };
            match tls.connect(stream).await {
                Ok(stream) => Ok(Dialled::Tls(Box::new(stream))),
                Err(error) => Err(format!(
                    "TLS handshake with {authority}: {}",
                    error_chain(&error)
                )),
            }
        };
        let (sender, task) = match tokio::time::timeout(self.connect_timeout, connecting).await {
            Ok(Ok(Dialled::Plain(stream))) => handshake(stream, upgrade).await?,
            Ok(Ok(Dialled::Tls(stream))) => handshake(stream, upgrade).await?,
            Ok(Err(error)) => return Err(SendError::Connect(error)),
            Err(_) => {
                return Err(SendError::Connect(format!(
                    "connect to {authority}: no connection within {:?}",
                    self.connect_timeout
                )));
            }
        };
        Ok(Pooled {
            sender,
            task,
            pool: self.clone(),
            reusable: !upgrade,
        })
    }

    /// Closes the connections idle since before `cutoff`, and those the backend closed.
    fn evict(&self, cutoff: Instant) {
        self.idle
            .lock()
            .retain(|idle| idle.since > cutoff && !idle.sender.is_closed());
    }
}

impl Pooled {
    /// The connection's I/O task: aborting it ends the exchange and closes the connection
    /// (only while this is checked out: a parked connection may serve another request).
    pub(crate) fn task(&self) -> &AbortHandle {
        &self.task
    }

    /// Puts the connection back for the next request (its response was read to the end).
    pub(crate) fn park(self) {
        if !self.reusable || self.sender.is_closed() {
            return;
        }
        let mut idle = self.pool.idle.lock();
        if idle.len() < MAX_IDLE_PER_BACKEND {
            idle.push(Idle {
                sender: self.sender,
                task: self.task,
                since: Instant::now(),
            });
        }
    }
}

/// A new connection to a backend, before HTTP/1.1 is spoken on it.
enum Dialled {
    /// An `http://` backend's.
    Plain(TcpStream),
    /// An `https://` backend's, its certificate verified.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// HTTP/1.1 on a new connection to a backend, its I/O spawned in a task of its own; with
/// `upgrade`, a 101 hands the connection over (`hyper::upgrade::on` the response).
async fn handshake<S>(
    stream: S,
    upgrade: bool,
) -> Result<(SendRequest<UpstreamBody>, AbortHandle), SendError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|error| SendError::Connect(error_chain(&error)))?;
    let task = tokio::spawn(async move {
        let ended = if upgrade {
            connection.with_upgrades().await
        } else {
            connection.await
        };
        if let Err(error) = ended {
            tracing::debug!(%error, "upstream connection ended with an error");
        }
    });
    Ok((sender, task.abort_handle()))
}

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
