//! The accept loop: connection limit, the TLS handshake on an HTTPS listener, per-connection
//! protocol settings, the HTTP/2 idle timeout (GOAWAY), the tunnel of an upgraded connection,
//! graceful shutdown.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::Proxy;
use super::conn::{self, ClientIo, ClientStream, ConnState};
use crate::filter::Peer;
use crate::metrics::{ClientTimeoutKind, RejectReason};
use crate::tls::ListenerTls;

/// Pause after a failed accept (out of file descriptors, most likely) so the loop does not spin
/// while the process has none to give.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// HTTP/2 clients are pinged this often when idle, so a vanished peer's connection (and its
/// `max_connections` place) is freed.
const H2_PING_INTERVAL: Duration = Duration::from_secs(30);
/// An HTTP/2 ping unanswered this long closes the connection.
const H2_PING_TIMEOUT: Duration = Duration::from_secs(10);
/// hyper's smallest allowed read buffer (its `max_buf_size` panics below it).
const MIN_READ_BUFFER: usize = 8192;
/// After the GOAWAY of an idle HTTP/2 connection, longest it stays open without a stream (for
/// the client to close it, or to finish a request that crossed the GOAWAY).
const GOAWAY_GRACE: Duration = Duration::from_secs(1);
/// How often a connection over `max_connections` is looked at until it has sent its 503 over
/// HTTP/2 (then GOAWAY); such connections are few (bounded) and short-lived.
const OVER_LIMIT_CHECK: Duration = Duration::from_millis(100);

/// Connections counted against `max_connections`, released on drop.
struct Counted {
    /// The open-connection counter.
    open: Arc<AtomicUsize>,
    /// The proxy, for the active-connections gauge.
    proxy: Arc<Proxy>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
        self.proxy.metrics.connection_closed();
    }
}

/// Graceful shutdown of the connections (what hyper-util's `server-graceful` feature offers,
/// which this crate does not enable): a signal every connection watches, and a channel whose
/// closing tells that the last one is done.
struct Graceful {
    /// Sets the signal at shutdown, or when the server is dropped.
    trigger: StopTrigger,
    /// Cloned into each connection; dropped when it ends.
    alive: mpsc::Sender<()>,
    /// Yields `None` once every clone of `alive` is gone.
    done: mpsc::Receiver<()>,
}

/// The shutdown signal: a flag, and the task of each connection waiting for it. A connection
/// task looks at it every time it is polled, so that costs a load and a waker comparison (a
/// `watch` channel took a lock there, on every poll).
#[derive(Debug, Default)]
struct StopSignal {
    /// Set at shutdown.
    stop: AtomicBool,
    /// The waiting connection tasks, by [`Stopped::id`].
    waiters: Mutex<HashMap<u64, Waker>>,
    /// The next [`Stopped::id`].
    next_id: AtomicU64,
}

impl StopSignal {
    fn trigger(&self) {
        self.stop.store(true, Ordering::Release);
        let waiters = std::mem::take(&mut *self.waiters.lock());
        for waker in waiters.into_values() {
            waker.wake();
        }
    }
}

/// Sets the [`StopSignal`] when dropped: at shutdown, and when the server's future is dropped
/// without one, so connections finish either way.
struct StopTrigger(Arc<StopSignal>);

impl Drop for StopTrigger {
    fn drop(&mut self) {
        self.0.trigger();
    }
}

/// One connection's wait for the [`StopSignal`].
struct Stopped {
    /// The signal.
    signal: Arc<StopSignal>,
    /// Its key in the signal's waiters.
    id: u64,
    /// The waker registered there, if any.
    waker: Option<Waker>,
}

impl Future for Stopped {
    type Output = ();

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if this.signal.stop.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        if !this.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            let waker = cx.waker().clone();
            this.signal.waiters.lock().insert(this.id, waker.clone());
            this.waker = Some(waker);
            // Triggered between the first look and the registration?
            if this.signal.stop.load(Ordering::Acquire) {
                return Poll::Ready(());
            }
        }
        Poll::Pending
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        if self.waker.is_some() {
            self.signal.waiters.lock().remove(&self.id);
        }
    }
}

/// A connection's part of [`Graceful`].
struct Watcher {
    /// The shutdown signal.
    stopped: Stopped,
    /// Held until the connection ends.
    _alive: mpsc::Sender<()>,
}

impl Graceful {
    fn new() -> Self {
        let (alive, done) = mpsc::channel(1);
        Graceful {
            trigger: StopTrigger(Arc::default()),
            alive,
            done,
        }
    }

    fn watcher(&self) -> Watcher {
        let signal = self.trigger.0.clone();
        let id = signal.next_id.fetch_add(1, Ordering::Relaxed);
        Watcher {
            stopped: Stopped {
                signal,
                id,
                waker: None,
            },
            _alive: self.alive.clone(),
        }
    }

    /// Tells every connection to finish and waits until they all have.
    async fn shutdown(self) {
        let Graceful {
            trigger,
            alive,
            mut done,
        } = self;
        drop(trigger);
        drop(alive);
        let _ = done.recv().await;
    }
}

/// Serves `listener` (HTTPS when `tls` is given) until `shutdown` completes; then stops
/// accepting and waits for the connections in flight to finish their requests.
pub(crate) async fn run(
    proxy: Arc<Proxy>,
    listener: TcpListener,
    tls: Option<ListenerTls>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let graceful = Graceful::new();
    // Client connections being served, and those only being told 503. A counter rather than a
    // semaphore so that a reload changing `max_connections` applies at the next accept.
    let open = Arc::new(AtomicUsize::new(0));
    let rejecting = Arc::new(AtomicUsize::new(0));
    tracing::info!(address = ?listener.local_addr().ok(), tls = tls.is_some(), "proxy serving");
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let max = proxy.current().config.limits.max_connections;
        // Reserve a place first, so two accepts never both take the last one.
        if open.fetch_add(1, Ordering::AcqRel) < max {
            proxy.metrics.connection_opened();
            let counted = Counted {
                open: open.clone(),
                proxy: proxy.clone(),
            };
            let watcher = graceful.watcher();
            tokio::spawn(connection(
                proxy.clone(),
                stream,
                tls.clone(),
                peer,
                watcher,
                Some(counted),
            ));
            continue;
        }
        open.fetch_sub(1, Ordering::AcqRel);
        // Over the limit: answer 503 on a connection of its own, at most `max` of those at once
        // (past that the socket is just closed: telling floods apart costs resources too).
        if rejecting.fetch_add(1, Ordering::AcqRel) < max.max(1) {
            let rejecting = rejecting.clone();
            let watcher = graceful.watcher();
            let (proxy, tls) = (proxy.clone(), tls.clone());
            tokio::spawn(async move {
                connection(proxy, stream, tls, peer, watcher, None).await;
                rejecting.fetch_sub(1, Ordering::AcqRel);
            });
        } else {
            rejecting.fetch_sub(1, Ordering::AcqRel);
            proxy.metrics.reject(RejectReason::TooManyConnections);
            tracing::warn!(%peer, "over max_connections, and too many 503s in progress: closed");
        }
    }
    drop(listener);
    tracing::info!("proxy shutting down: finishing requests in flight");
    graceful.shutdown().await;
    tracing::info!("proxy stopped");
    Ok(())
}

/// Serves one client connection, after its TLS handshake when `tls` is given; `counted` is
/// `None` for a connection over the limit, which gets 503 to its first request and is closed.
async fn connection(
    proxy: Arc<Proxy>,
    stream: TcpStream,
    tls: Option<ListenerTls>,
    peer: SocketAddr,
    mut watcher: Watcher,
    counted: Option<Counted>,
) {
    let _ = stream.set_nodelay(true);
    let https = tls.is_some();
    let stream = match tls {
        None => ClientStream::Plain(stream),
        // Bounded like a request head: a client silent for `header_read_timeout` is dropped.
        Some(tls) => tokio::select! {
            accepted = tls.accept(
                stream,
                proxy.current().config.limits.header_read_timeout,
            ) => match accepted {
                Some(stream) => ClientStream::Tls(Box::new(stream)),
                // Failed or timed out: logged, and closed by the drop.
                None => return,
            },
            // Shutdown: a connection that has sent no request yet is simply closed.
            () = &mut watcher.stopped => return,
        },
    };
    // Read after the handshake, so a reload during it applies.
    let limits = proxy.current().config.limits.clone();
    let state = ConnState::new(&limits);
    let io = TokioIo::new(ClientIo::new(stream, state.clone()));
    let over_limit = counted.is_none();

    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // `ClientIo` keeps the head deadline (and bounds its own 408); hyper's timer would
        // allocate and arm one more sleep for every request.
        .header_read_timeout(None)
        .max_buf_size(limits.max_header_bytes.max(MIN_READ_BUFFER))
        .keep_alive(!over_limit);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(H2_PING_INTERVAL)
        .keep_alive_timeout(H2_PING_TIMEOUT)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    let service = {
        let (proxy, state) = (proxy.clone(), state.clone());
        let peer = Arc::new(Peer::new(peer, https));
        service_fn(move |request| {
            proxy
                .clone()
                .handle(request, peer.clone(), state.clone(), over_limit)
        })
    };
    // `alive` is held through an upgraded connection's tunnel too.
    let Watcher {
        stopped,
        _alive: alive,
    } = watcher;
    let result = {
        let mut conn = std::pin::pin!(builder.serve_connection_with_upgrades(io, service));
        let idle = std::pin::pin!(conn::http2_idle(
            &state,
            limits.idle_timeout,
            Instant::now()
        ));
        let timeouts = proxy.metrics.client_timeout_counters();
        let send_watch = std::pin::pin!(conn::http2_send_watch(
            &state,
            limits.send_timeout,
            timeouts
        ));
        // `keep_alive(false)` closes an HTTP/1 connection over the limit after its 503; an
        // HTTP/2 one gets GOAWAY once its first stream (the 503) is over.
        let served = std::pin::pin!(async {
            if over_limit {
                conn::http2_idle(&state, OVER_LIMIT_CHECK, Instant::now()).await;
            } else {
                std::future::pending::<()>().await;
            }
        });
        // The HTTP/2-only watchers are polled no more once the connection turns out to speak
        // HTTP/1 (they would never complete there).
        let (idle, send_watch, served) = (
            conn::Http2Only::new(&state, idle),
            conn::Http2Only::new(&state, send_watch),
            conn::Http2Only::new(&state, served),
        );
        tokio::select! {
            // The connection first: it is what every wake of this task is almost always for.
            biased;
            result = conn.as_mut() => result,
            // Never completes: ends the backend requests of streams the client does not read.
            never = send_watch => match never {},
            // Shutdown, or the server itself dropped: finish either way.
            () = stopped => {
                // Finish the request in flight (if any), then close.
                conn.as_mut().graceful_shutdown();
                conn.await
            }
            // Over max_connections, speaking HTTP/2, its 503 sent: GOAWAY.
            () = served => {
                tracing::debug!(%peer, "HTTP/2 connection over max_connections: GOAWAY");
                conn.as_mut().graceful_shutdown();
                tokio::select! {
                    result = conn.as_mut() => result,
                    () = conn::http2_idle(&state, GOAWAY_GRACE, Instant::now()) => Ok(()),
                }
            }
            // An HTTP/2 connection without a stream for idle_timeout, PINGs or not.
            () = idle => {
                proxy.metrics.client_timeout(ClientTimeoutKind::Idle);
                tracing::debug!(%peer, timeout = ?limits.idle_timeout,
                    "idle HTTP/2 connection: GOAWAY");
                conn.as_mut().graceful_shutdown();
                tokio::select! {
                    result = conn.as_mut() => result,
                    () = conn::http2_idle(&state, GOAWAY_GRACE, Instant::now()) => Ok(()),
                }
            }
        }
    };
    // A 101 was sent: hyper has handed the socket over (or failed to), and the tunnel runs
    // until a side closes or idle_timeout; a graceful shutdown waits for it like for a request.
    if let Some(tunnel) = state.take_tunnel() {
        tunnel.await;
    }
    drop(alive);

    if state.timed_out() {
        proxy.metrics.reject(RejectReason::ClientTimeout);
        tracing::warn!(%peer, timeout = ?limits.header_read_timeout,
            "request head not received in time: 408, connection closed");
    }
    if state.idle_closed() {
        proxy.metrics.client_timeout(ClientTimeoutKind::Idle);
    }
    let send_timed_out = state.send_timed_out();
    if send_timed_out {
        proxy.metrics.client_timeout(ClientTimeoutKind::Send);
        tracing::warn!(%peer, timeout = ?limits.send_timeout,
            "client took none of its response in time: connection cut");
    }
    let failed = match &result {
        Ok(()) => false,
        Err(error) => {
            match error.downcast_ref::<hyper::Error>() {
                Some(e) if e.is_parse_too_large() => {
                    proxy.metrics.reject(RejectReason::HeaderTooLarge);
                    tracing::warn!(%peer, max = limits.max_header_bytes,
                        "request head too large: 431, connection closed");
                }
                Some(e) if e.is_timeout() && !state.timed_out() => {
                    tracing::warn!(%peer, "request head not received in time: connection closed");
                }
                _ if state.timed_out() || send_timed_out => {}
                _ => tracing::debug!(%peer, %error, "client connection ended with an error"),
            }
            true
        }
    };
    // A client that reads nothing would not read the end of a lingering close either.
    if (failed || state.wants_linger())
        && !send_timed_out
        && let Some(stream) = state.take_stream()
    {
        conn::linger(stream).await;
    }
    drop(counted);
}
