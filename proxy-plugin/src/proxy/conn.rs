//! One client connection's socket: the request-head deadline (answered 408) and the socket
//! handed back at the end for a lingering close.
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
//! On a TLS listener the wrapper sits on the TLS stream ([`ClientStream::Tls`]), after the
//! handshake: the deadline, the 408 and the lingering close then speak TLS too.

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
use tokio::time::{Instant, Sleep};

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
#[derive(Debug)]
pub(crate) enum ClientStream {
    /// A plain HTTP listener's connection.
    Plain(TcpStream),
    /// An HTTPS listener's connection, its handshake done.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            ClientStream::Tls(stream) => Pin::new(stream).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            ClientStream::Tls(stream) => Pin::new(stream).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            ClientStream::Tls(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ClientStream::Plain(stream) => stream.is_write_vectored(),
            ClientStream::Tls(stream) => stream.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(stream) => Pin::new(stream).poll_flush(cx),
            ClientStream::Tls(stream) => Pin::new(stream).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            ClientStream::Tls(stream) => Pin::new(stream).poll_shutdown(cx),
        }
    }
}

/// State shared by a connection's socket wrapper, its service and its task.
#[derive(Debug)]
pub(crate) struct ConnState {
    /// Time a client gets to send a request head.
    header_timeout: Duration,
    /// When the head awaited now must be complete; `None` while a request is being handled,
    /// and for good once the connection turned out to be HTTP/2 (h2 bounds its own frames).
    deadline: Mutex<Option<Instant>>,
    /// Some bytes arrived since the deadline was armed: a timeout gets a 408, not a silent close.
    partial_head: AtomicBool,
    /// The connection speaks HTTP/2.
    http2: AtomicBool,
    /// The deadline passed with part of a head received, and a 408 was sent.
    timed_out: AtomicBool,
    /// Close by draining the client's input, so an early answer (413, 431) is not destroyed by
    /// the reset a close with unread input causes.
    linger: AtomicBool,
    /// A read parked while no deadline was armed; woken when one is armed.
    reader: AtomicWaker,
    /// The socket, handed back when hyper drops the connection.
    returned: Mutex<Option<ClientStream>>,
}

impl ConnState {
    /// State for a connection accepted now.
    pub(crate) fn new(header_timeout: Duration) -> Arc<Self> {
        Arc::new(ConnState {
            header_timeout,
            deadline: Mutex::new(Some(Instant::now() + header_timeout)),
            partial_head: AtomicBool::new(false),
            http2: AtomicBool::new(false),
            timed_out: AtomicBool::new(false),
            linger: AtomicBool::new(false),
            reader: AtomicWaker::new(),
            returned: Mutex::new(None),
        })
    }

    /// A whole request head arrived (the service was called): stop the clock.
    pub(crate) fn head_received(&self, http2: bool) {
        if http2 {
            self.http2.store(true, Ordering::Relaxed);
        }
        *self.deadline.lock() = None;
    }

    /// A response was sent: the next HTTP/1 head is due within the timeout.
    pub(crate) fn response_done(&self) {
        if self.http2.load(Ordering::Relaxed) {
            return;
        }
        *self.deadline.lock() = Some(Instant::now() + self.header_timeout);
        self.partial_head.store(false, Ordering::Relaxed);
        self.reader.wake();
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

    fn deadline(&self) -> Option<Instant> {
        *self.deadline.lock()
    }

    fn bytes_arrived(&self) {
        if self.deadline.lock().is_some() {
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
        }
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
        } else {
            tracing::debug!("idle client connection closed after header_read_timeout");
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
        self.get_mut().stream()?.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().stream()?.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.as_ref().is_some_and(|s| s.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().stream()?.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().stream()?.poll_shutdown(cx)
    }
}

impl Drop for ClientIo {
    fn drop(&mut self) {
        if let Some(stream) = self.stream.take() {
            *self.state.returned.lock() = Some(stream);
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
