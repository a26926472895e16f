//! One client connection's socket: the request-head deadline (answered 408), the idle
//! deadline between requests, the send deadline, and the socket handed back at the end for a
//! lingering close.
//!
//! hyper's own `header_read_timeout` closes the connection without a word, and starts only
//! once hyper-util has sniffed the protocol. [`ClientIo`] wraps the socket instead: a deadline
//! runs from accept (and again from the end of each HTTP/1 response) until hyper hands the
//! next request head to the service. When it passes while part of a head has arrived, the
//! wrapper writes a 408 itself (giving up on it after [`REPLY_GRACE`] if the client does not
//! take it) and fails the read; when nothing arrived (an idle keep-alive connection) it just
//! ends the connection, like nginx. hyper's own header timer is off: it would arm one more
//! sleep per request for what this already does.
//!
//! Between two HTTP/1 requests the deadline is `idle_timeout` (nginx `keepalive_timeout`)
//! until the first byte of the next head arrives, then `header_read_timeout` from there. An
//! HTTP/2 connection is idle while it has no open stream; [`http2_idle`] tells the connection
//! task when that lasted `idle_timeout`, whatever PINGs the client sends. Writes that make no
//! progress for `send_timeout` (nginx `send_timeout`: the client reads none of its response)
//! fail, which ends the connection and with it the responses it carried, their backend
//! requests included. An HTTP/2 client can also stop taking one stream's data (flow control)
//! while the connection flows: [`http2_send_watch`] then ends that response's backend
//! connection after `send_timeout`.
//!
//! Once a response switches protocols (a 101, see `proxy/tunnel.rs`) no head is due any more:
//! the deadlines stop, and the tunnel bounds itself (the send deadline still applies).
//!
//! On a TLS listener the wrapper sits on the TLS stream ([`ClientStream::Tls`]), after the
//! handshake: the deadline, the 408 and the lingering close then speak TLS too.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::task::AtomicWaker;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::task::AbortHandle;
use tokio::time::{Instant, Sleep};

use super::tunnel::Tunnel;
use crate::config::Limits;
use crate::metrics::{ClientTimeoutKind, ClientTimeouts};

/// What a client that was too slow with its request head gets.
const REQUEST_TIMEOUT_REPLY: &[u8] =
    b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";
/// Longest the 408 may take to write before the connection is dropped without it.
const REPLY_GRACE: Duration = Duration::from_secs(1);
/// Longest a lingering close drains a client's input (nginx's `lingering_time` is 30 s; a
/// client still sending after 2 s of it has had its chance to read our answer).
const LINGER_TIME: Duration = Duration::from_secs(2);
/// Drain buffer of a lingering close.
const LINGER_BUFFER: usize = 16 * 1024;

/// A client connection's byte stream: the socket itself, or the TLS session on it.
pub(crate) type ClientStream = MaybeTls<tokio_rustls::server::TlsStream<TcpStream>>;

/// A connection's byte stream, a socket or the TLS session `T` on it: a client's
/// ([`ClientStream`]) or a backend's (`upstream::BackendStream`).
#[derive(Debug)]
pub(crate) enum MaybeTls<T> {
    /// A plain connection (an HTTP listener's, an `http://` backend's).
    Plain(TcpStream),
    /// A TLS session, its handshake done (an HTTPS listener's, an `https://` backend's with
    /// its certificate verified).
    Tls(Box<T>),
}

impl<T: AsyncRead + Unpin> AsyncRead for MaybeTls<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            MaybeTls::Tls(stream) => Pin::new(stream).poll_read(cx, buf),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for MaybeTls<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            MaybeTls::Tls(stream) => Pin::new(stream).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            MaybeTls::Tls(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            MaybeTls::Plain(stream) => stream.is_write_vectored(),
            MaybeTls::Tls(stream) => stream.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(stream) => Pin::new(stream).poll_flush(cx),
            MaybeTls::Tls(stream) => Pin::new(stream).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            MaybeTls::Tls(stream) => Pin::new(stream).poll_shutdown(cx),
        }
    }
}

/// State shared by a connection's socket wrapper, its service and its task.
#[derive(Debug)]
pub(crate) struct ConnState {
    /// Time a client gets to send a request head.
    header_timeout: Duration,
    /// Time an HTTP/1 connection may wait for its next request, or an HTTP/2 one stay without
    /// a stream.
    idle_timeout: Duration,
    /// Time a pending write may make no progress.
    send_timeout: Duration,
    /// When the head awaited now must be complete; `None` while a request is being handled,
    /// and for good once the connection turned out to be HTTP/2 (h2 bounds its own frames).
    deadline: Mutex<Option<Instant>>,
    /// The armed deadline is the idle one (HTTP/1, between requests, nothing of the next
    /// head arrived yet).
    idle: AtomicBool,
    /// The connection was closed for `idle_timeout` between HTTP/1 requests.
    idle_closed: AtomicBool,
    /// A write made no progress for `send_timeout`: the connection was cut.
    send_timed_out: AtomicBool,
    /// The requests being handled (HTTP/2 streams), for [`http2_idle`].
    streams: Mutex<Streams>,
    /// HTTP/2 responses relayed from backends, by [`SendWatch`] slot, for
    /// [`http2_send_watch`]; a freed slot is `None` and reused.
    sends: Mutex<Vec<Option<SendEntry>>>,
    /// Some bytes arrived since the deadline was armed: a timeout gets a 408, not a silent close.
    partial_head: AtomicBool,
    /// The connection speaks HTTP/2.
    http2: AtomicBool,
    /// An HTTP/1 request was received: unless `http2` is set (a preface sniffed), the
    /// connection speaks HTTP/1 for good, and its HTTP/2-only watchers can stop.
    http1: AtomicBool,
    /// The deadline passed with part of a head received, and a 408 was sent.
    timed_out: AtomicBool,
    /// Close by draining the client's input, so an early answer (413, 431) is not destroyed by
    /// the reset a close with unread input causes.
    linger: AtomicBool,
    /// A read parked while no deadline was armed; woken when one is armed.
    reader: AtomicWaker,
    /// The socket, handed back when hyper drops the connection.
    returned: Mutex<Option<ClientStream>>,
    /// The connection is being switched to another protocol (a 101 is on its way): no more
    /// request heads, so no more deadlines; the tunnel bounds itself.
    upgraded: AtomicBool,
    /// The tunnel to run once hyper hands the socket over, for the connection task to await.
    tunnel: Mutex<Option<Tunnel>>,
    /// The timer of the response timeout, kept between requests ([`ConnState::response_timer`]).
    response_timer: Mutex<Option<Pin<Box<Sleep>>>>,
}

/// The requests of a connection being handled.
#[derive(Debug)]
struct Streams {
    /// Requests whose response is not done.
    open: usize,
    /// When `open` last dropped to 0 (or the connection was accepted).
    idle_since: Instant,
    /// Whether a request was received at all.
    started: bool,
}

/// An HTTP/2 response relayed from a backend, as [`http2_send_watch`] sees it.
#[derive(Debug)]
struct SendEntry {
    /// Since when its last piece waits for the client to take it; `None` while hyper asks for
    /// more (or the body waits for the backend).
    waiting_since: Option<Instant>,
    /// The backend connection's task, while the response holds it.
    upstream: Option<AbortHandle>,
}

/// A response body's slot in its connection's send watch (HTTP/2 only); freed on drop.
#[derive(Debug)]
pub(crate) struct SendWatch {
    /// The connection.
    conn: Arc<ConnState>,
    /// The slot in [`ConnState::sends`].
    slot: usize,
}

impl SendWatch {
    /// Watches a response relayed over `upstream` on `conn`, if `conn` speaks HTTP/2 (HTTP/1
    /// has no flow control of its own: the socket's send deadline covers it).
    pub(crate) fn start(conn: &Arc<ConnState>, upstream: &AbortHandle) -> Option<SendWatch> {
        if !conn.http2.load(Ordering::Relaxed) {
            return None;
        }
        let entry = SendEntry {
            waiting_since: None,
            upstream: Some(upstream.clone()),
        };
        let mut sends = conn.sends.lock();
        let slot = match sends.iter().position(Option::is_none) {
            Some(free) => {
                sends[free] = Some(entry);
                free
            }
            None => {
                sends.push(Some(entry));
                sends.len() - 1
            }
        };
        drop(sends);
        Some(SendWatch {
            conn: conn.clone(),
            slot,
        })
    }

    /// hyper asks for the next piece: the client took the last one.
    pub(crate) fn polled(&self) {
        if let Some(Some(entry)) = self.conn.sends.lock().get_mut(self.slot) {
            entry.waiting_since = None;
        }
    }

    /// What the poll gave hyper: `delivered` a piece (which now waits for the client), and
    /// whether the response still holds its backend connection.
    pub(crate) fn returned(&self, delivered: bool, holds_upstream: bool) {
        if let Some(Some(entry)) = self.conn.sends.lock().get_mut(self.slot) {
            entry.waiting_since = delivered.then(Instant::now);
            if !holds_upstream {
                entry.upstream = None;
            }
        }
    }
}

impl Drop for SendWatch {
    fn drop(&mut self) {
        if let Some(entry) = self.conn.sends.lock().get_mut(self.slot) {
            *entry = None;
        }
    }
}

/// A request's response-timeout timer, lent by its connection ([`ConnState::response_timer`]).
#[derive(Debug)]
pub(crate) struct ResponseTimer<'a> {
    /// The connection it goes back to.
    conn: &'a ConnState,
    /// The timer (`None` only while being dropped).
    sleep: Option<Pin<Box<Sleep>>>,
}

impl ResponseTimer<'_> {
    /// The timer.
    pub(crate) fn sleep(&mut self) -> Pin<&mut Sleep> {
        match &mut self.sleep {
            Some(sleep) => sleep.as_mut(),
            None => unreachable!("a response timer has its sleep until dropped"),
        }
    }
}

impl Drop for ResponseTimer<'_> {
    fn drop(&mut self) {
        let mut kept = self.conn.response_timer.lock();
        if kept.is_none() {
            *kept = self.sleep.take();
        }
    }
}

/// Held from a request's head to the end of its response (dropped with the response body, or
/// with the request if no response was made): the connection's next head is then due, and an
/// HTTP/2 connection may become idle.
#[derive(Debug)]
pub(crate) struct RequestGuard {
    /// The connection.
    conn: Arc<ConnState>,
}

impl RequestGuard {
    /// The connection the request came on.
    pub(crate) fn conn(&self) -> &Arc<ConnState> {
        &self.conn
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.conn.response_done();
    }
}

impl ConnState {
    /// State for a connection accepted now, under `limits`.
    pub(crate) fn new(limits: &Limits) -> Arc<Self> {
        let header_timeout = limits.header_read_timeout;
        let now = Instant::now();
        Arc::new(ConnState {
            header_timeout,
            idle_timeout: limits.idle_timeout,
            send_timeout: limits.send_timeout,
            deadline: Mutex::new(Some(now + header_timeout)),
            idle: AtomicBool::new(false),
            idle_closed: AtomicBool::new(false),
            send_timed_out: AtomicBool::new(false),
            streams: Mutex::new(Streams {
                open: 0,
                idle_since: now,
                started: false,
            }),
            sends: Mutex::new(Vec::new()),
            partial_head: AtomicBool::new(false),
            http2: AtomicBool::new(false),
            http1: AtomicBool::new(false),
            timed_out: AtomicBool::new(false),
            linger: AtomicBool::new(false),
            reader: AtomicWaker::new(),
            returned: Mutex::new(None),
            upgraded: AtomicBool::new(false),
            tunnel: Mutex::new(None),
            response_timer: Mutex::new(None),
        })
    }

    /// A timer set to `deadline`, for a request's response timeout: the connection's own,
    /// reset, when no other request of it has that one (a timer made and dropped per request
    /// costs a registration in the runtime's timer wheel and its removal; resetting a
    /// registered one to a later deadline costs neither). Goes back to the connection when
    /// dropped.
    pub(crate) fn response_timer(&self, deadline: Instant) -> ResponseTimer<'_> {
        let kept = self.response_timer.lock().take();
        let sleep = match kept {
            Some(mut sleep) => {
                sleep.as_mut().reset(deadline);
                sleep
            }
            None => Box::pin(tokio::time::sleep_until(deadline)),
        };
        ResponseTimer {
            conn: self,
            sleep: Some(sleep),
        }
    }

    /// A whole request head arrived (the service was called): stop the clock until the
    /// returned guard is dropped with the response.
    pub(crate) fn request_started(self: &Arc<Self>, http2: bool) -> RequestGuard {
        if http2 {
            self.http2.store(true, Ordering::Relaxed);
        } else {
            self.http1.store(true, Ordering::Relaxed);
        }
        *self.deadline.lock() = None;
        let mut streams = self.streams.lock();
        streams.open += 1;
        streams.started = true;
        drop(streams);
        RequestGuard { conn: self.clone() }
    }

    /// A response was sent (or dropped): the next HTTP/1 head is due within the idle timeout,
    /// then the head timeout once it begins.
    fn response_done(&self) {
        let now = Instant::now();
        {
            let mut streams = self.streams.lock();
            streams.open = streams.open.saturating_sub(1);
            if streams.open == 0 {
                streams.idle_since = now;
            }
        }
        if self.http2.load(Ordering::Relaxed) || self.upgraded.load(Ordering::Relaxed) {
            return;
        }
        self.idle.store(true, Ordering::Relaxed);
        *self.deadline.lock() = Some(now + self.idle_timeout);
        self.partial_head.store(false, Ordering::Relaxed);
        self.reader.wake();
    }

    /// The response being sent switches protocols: no request head is due any more, and
    /// `tunnel` is to run on the socket once hyper hands it over ([`ConnState::take_tunnel`]).
    pub(crate) fn start_tunnel(&self, tunnel: Tunnel) {
        self.upgraded.store(true, Ordering::Relaxed);
        *self.tunnel.lock() = Some(tunnel);
    }

    /// The tunnel the connection switched to, once hyper is done with the connection.
    pub(crate) fn take_tunnel(&self) -> Option<Tunnel> {
        self.tunnel.lock().take()
    }

    /// Whether the connection was closed for `idle_timeout` between HTTP/1 requests.
    pub(crate) fn idle_closed(&self) -> bool {
        self.idle_closed.load(Ordering::Relaxed)
    }

    /// Whether the connection was cut for `send_timeout`.
    pub(crate) fn send_timed_out(&self) -> bool {
        self.send_timed_out.load(Ordering::Relaxed)
    }

    /// Asks for a lingering close at the end of the connection.
    pub(crate) fn set_linger(&self) {
        self.linger.store(true, Ordering::Relaxed);
    }

    /// Whether a lingering close was asked for.
    pub(crate) fn wants_linger(&self) -> bool {
        self.linger.load(Ordering::Relaxed)
    }

    /// Whether the connection ended with a 408 for a slow head.
    pub(crate) fn timed_out(&self) -> bool {
        self.timed_out.load(Ordering::Relaxed)
    }

    /// The socket, once hyper is done with it.
    pub(crate) fn take_stream(&self) -> Option<ClientStream> {
        self.returned.lock().take()
    }

    /// Whether the connection is known to speak HTTP/1: a request came, and it was not
    /// HTTP/2 (what [`http2_idle`] and [`http2_send_watch`] wait for before they stop).
    fn known_http1(&self) -> bool {
        self.http1.load(Ordering::Relaxed) && !self.http2.load(Ordering::Relaxed)
    }

    fn deadline(&self) -> Option<Instant> {
        *self.deadline.lock()
    }

    fn bytes_arrived(&self) {
        let mut deadline = self.deadline.lock();
        if deadline.is_some() {
            if self.idle.swap(false, Ordering::Relaxed) {
                // The next head begins: it gets the head timeout from now.
                *deadline = Some(Instant::now() + self.header_timeout);
            }
            self.partial_head.store(true, Ordering::Relaxed);
        }
    }
}

/// The client socket as hyper sees it, enforcing the request-head deadline.
#[derive(Debug)]
pub(crate) struct ClientIo {
    /// The socket (taken on drop, to hand it back).
    stream: Option<ClientStream>,
    /// Shared with the service and the connection task.
    state: Arc<ConnState>,
    /// Fires at the head deadline.
    sleep: Pin<Box<Sleep>>,
    /// Once the deadline passed with a partial head: bytes of the 408 written so far.
    reply_written: Option<usize>,
    /// Whether the first bytes were looked at (for the HTTP/2 preface).
    sniffed: bool,
    /// Fires `send_timeout` after a write started waiting; made at the first wait.
    send_sleep: Option<Pin<Box<Sleep>>>,
    /// A write is waiting for the client to take bytes (`send_sleep` is armed).
    send_waiting: bool,
}

impl ClientIo {
    /// Wraps an accepted socket.
    pub(crate) fn new(stream: ClientStream, state: Arc<ConnState>) -> Self {
        let first = state.deadline().unwrap_or_else(Instant::now);
        ClientIo {
            stream: Some(stream),
            state,
            sleep: Box::pin(tokio::time::sleep_until(first)),
            reply_written: None,
            sniffed: false,
            send_sleep: None,
            send_waiting: false,
        }
    }

    /// Passes on a write's outcome; a write pending for `send_timeout` in a row fails.
    fn poll_sent<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if poll.is_ready() {
            self.send_waiting = false;
            return poll;
        }
        if !self.send_waiting {
            self.send_waiting = true;
            let deadline = Instant::now() + self.state.send_timeout;
            match &mut self.send_sleep {
                Some(sleep) => sleep.as_mut().reset(deadline),
                None => self.send_sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
        if let Some(sleep) = &mut self.send_sleep
            && sleep.as_mut().poll(cx).is_ready()
        {
            self.state.send_timed_out.store(true, Ordering::Relaxed);
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client took none of its response within send_timeout",
            )));
        }
        Poll::Pending
    }

    fn stream(&mut self) -> io::Result<Pin<&mut ClientStream>> {
        match self.stream.as_mut() {
            Some(stream) => Ok(Pin::new(stream)),
            None => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    /// The read found nothing: has the head deadline passed?
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(deadline) = self.state.deadline() else {
            self.state.reader.register(cx.waker());
            // Armed in between? Then look again, now that the waker is registered.
            if self.state.deadline().is_none() {
                return Poll::Pending;
            }
            return self.poll_deadline(cx);
        };
        if self.sleep.deadline() != deadline {
            self.sleep.as_mut().reset(deadline);
        }
        if self.sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        if self.state.partial_head.load(Ordering::Relaxed)
            && !self.state.http2.load(Ordering::Relaxed)
        {
            self.state.timed_out.store(true, Ordering::Relaxed);
            self.reply_written = Some(0);
            self.sleep.as_mut().reset(Instant::now() + REPLY_GRACE);
            self.poll_reply(cx)
        } else if self.state.idle.load(Ordering::Relaxed) {
            self.state.idle_closed.store(true, Ordering::Relaxed);
            tracing::debug!("keep-alive client connection closed after idle_timeout");
            Poll::Ready(Ok(()))
        } else {
            tracing::debug!("silent client connection closed after header_read_timeout");
            Poll::Ready(Ok(()))
        }
    }

    /// Writes the 408, then fails the read so hyper ends the connection.
    fn poll_reply(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut written = self.reply_written.unwrap_or(0);
        while written < REQUEST_TIMEOUT_REPLY.len() {
            let poll = match self.stream() {
                Ok(stream) => stream.poll_write(cx, &REQUEST_TIMEOUT_REPLY[written..]),
                Err(_) => break,
            };
            match poll {
                Poll::Ready(Ok(n)) if n > 0 => written += n,
                Poll::Ready(_) => break,
                Poll::Pending => {
                    self.reply_written = Some(written);
                    if self.sleep.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    // The client takes nothing: close without the rest of the 408.
                    break;
                }
            }
        }
        // TLS keeps what it was given until flushed (a socket's flush does nothing).
        let flushed = match self.stream() {
            Ok(stream) => stream.poll_flush(cx),
            Err(_) => Poll::Ready(Ok(())),
        };
        if flushed.is_pending() {
            self.reply_written = Some(written);
            if self.sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
        self.reply_written = Some(REQUEST_TIMEOUT_REPLY.len());
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "request head not received within header_read_timeout",
        )))
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.reply_written.is_some() {
            return this.poll_reply(cx);
        }
        let before = buf.filled().len();
        match this.stream()?.poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let fresh = &buf.filled()[before..];
                if !fresh.is_empty() {
                    if !this.sniffed {
                        this.sniffed = true;
                        if fresh.starts_with(b"PRI") {
                            // The HTTP/2 preface: an HTTP/1 408 would mean nothing to it.
                            this.state.http2.store(true, Ordering::Relaxed);
                        }
                    }
                    this.state.bytes_arrived();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => this.poll_deadline(cx),
        }
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = this.stream()?.poll_write(cx, buf);
        this.poll_sent(cx, poll)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = this.stream()?.poll_write_vectored(cx, bufs);
        this.poll_sent(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.as_ref().is_some_and(|s| s.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = this.stream()?.poll_flush(cx);
        this.poll_sent(cx, poll)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = this.stream()?.poll_shutdown(cx);
        this.poll_sent(cx, poll)
    }
}

/// An HTTP/2-only watcher of a connection ([`http2_idle`], [`http2_send_watch`]), polled
/// until the connection is known to speak HTTP/1 and never again after that: the connection
/// task is woken a few times per HTTP/1 request, and each wake would otherwise poll the
/// watchers' timers for nothing.
pub(crate) struct Http2Only<'a, F> {
    /// The connection.
    state: &'a ConnState,
    /// The watcher; `None` once the connection is known to speak HTTP/1.
    inner: Option<Pin<&'a mut F>>,
}

impl<'a, F: Future> Http2Only<'a, F> {
    /// Polls `inner` as long as `state` may speak HTTP/2.
    pub(crate) fn new(state: &'a ConnState, inner: Pin<&'a mut F>) -> Self {
        Http2Only {
            state,
            inner: Some(inner),
        }
    }
}

impl<F: Future> Future for Http2Only<'_, F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        if this.inner.is_some() && this.state.known_http1() {
            // Such a watcher never completes on HTTP/1: it would only be polled for nothing.
            this.inner = None;
        }
        match &mut this.inner {
            Some(inner) => inner.as_mut().poll(cx),
            None => Poll::Pending,
        }
    }
}

/// Resolves once the connection, speaking HTTP/2, has had no open stream for `timeout`,
/// counted from `not_before` at the earliest. Never for an HTTP/1 connection: its idle time
/// between requests is the read deadline's business. Looks at the connection once per
/// `timeout` while streams are open, so a busy connection costs one timer.
pub(crate) async fn http2_idle(state: &ConnState, timeout: Duration, not_before: Instant) {
    let mut check = not_before + timeout;
    loop {
        tokio::time::sleep_until(check).await;
        let (open, idle_since, started) = {
            let streams = state.streams.lock();
            (streams.open, streams.idle_since, streams.started)
        };
        let http2 = state.http2.load(Ordering::Relaxed);
        if !http2 && started {
            return std::future::pending().await;
        }
        let now = Instant::now();
        if http2 && open == 0 {
            let due = idle_since.max(not_before) + timeout;
            if now >= due {
                return;
            }
            check = due;
        } else {
            check = now + timeout;
        }
    }
}

impl Drop for ClientIo {
    fn drop(&mut self) {
        if let Some(stream) = self.stream.take() {
            *self.state.returned.lock() = Some(stream);
        }
    }
}

/// Ends the backend connection of every HTTP/2 response whose last piece has waited for the
/// client for `timeout` (the client keeps the stream's flow-control window shut), counting
/// each in `timeouts`; the stream itself fails once the client takes data again. Never ends.
/// Wakes at most once per `timeout` when nothing waits, and at each deadline otherwise.
pub(crate) async fn http2_send_watch(
    state: &ConnState,
    timeout: Duration,
    timeouts: ClientTimeouts,
) -> std::convert::Infallible {
    let mut check = Instant::now() + timeout;
    loop {
        tokio::time::sleep_until(check).await;
        if !state.http2.load(Ordering::Relaxed) && state.streams.lock().started {
            return std::future::pending().await;
        }
        let now = Instant::now();
        check = now + timeout;
        let mut sends = state.sends.lock();
        for entry in sends.iter_mut().flatten() {
            let Some(since) = entry.waiting_since else {
                continue;
            };
            let due = since + timeout;
            if now < due {
                check = check.min(due);
            } else if let Some(upstream) = entry.upstream.take() {
                upstream.abort();
                timeouts.count(ClientTimeoutKind::Send);
                tracing::warn!(
                    ?timeout,
                    "HTTP/2 client took none of a response in time: backend request ended"
                );
            }
        }
    }
}

/// Closes our side (after TLS's `close_notify` on a TLS connection), then reads and discards
/// what the client still sends, so the answer already written reaches it instead of a reset.
/// All of it, the shutdown included, within [`LINGER_TIME`]: on TLS the shutdown first writes
/// out what is buffered, which never ends for a client that does not read.
pub(crate) async fn linger(mut stream: ClientStream) {
    let deadline = Instant::now() + LINGER_TIME;
    let _ = tokio::time::timeout_at(deadline, stream.shutdown()).await;
    let mut buf = vec![0u8; LINGER_BUFFER];
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
        if n == 0 {
            break;
        }
    }
}
