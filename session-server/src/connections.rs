//! The limit on client connections open at once (`--max-connections`): each accepted
//! connection takes a permit before anything else (its TLS handshake included) and its I/O
//! holds the permit until the connection ends. Past the limit a new connection is closed at once
//! and counted (`stickless_connections_refused_total`), so clients that connect and never speak,
//! or never finish their handshake, cannot take every file descriptor of the process (nginx
//! bounds the same with `worker_connections`, HAProxy with `maxconn`).
//!
//! A connection admitted must then speak within `--handshake-timeout`: its TLS handshake is
//! bounded by it (see `tls.rs`), and so is the wait for its first bytes (the HTTP/2 preface),
//! on plaintext from the accept and over TLS from the end of the handshake. A connection still
//! silent then is closed and its permit given back, so silent sockets cannot hold every permit
//! (nginx `client_header_timeout`, HAProxy `timeout http-request`).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt as _};
use prometheus::IntGauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tonic::transport::server::Connected;

use crate::metrics::Metrics;

/// The permits of every connection of one server.
#[derive(Debug, Clone)]
pub(crate) struct ConnectionLimit {
    /// One permit per connection that may be open; shared by the accept loop and every
    /// serving thread.
    permits: Arc<Semaphore>,
    /// The limit, for the log line of a refusal.
    max: usize,
    /// Bound on each connection's TLS handshake and on the wait for its first bytes.
    handshake_timeout: Duration,
    /// Where open and refused connections are counted.
    metrics: Metrics,
}

impl ConnectionLimit {
    /// At most `max` connections at once (at least 1; clamped to what a semaphore holds),
    /// each to finish its TLS handshake and send its first bytes within `handshake_timeout`.
    pub(crate) fn new(max: usize, handshake_timeout: Duration, metrics: Metrics) -> Self {
        let max = max.clamp(1, Semaphore::MAX_PERMITS);
        ConnectionLimit {
            permits: Arc::new(Semaphore::new(max)),
            max,
            handshake_timeout,
            metrics,
        }
    }

    /// The permit of a connection just accepted from `peer`, or `None` when `max` are open:
    /// the refusal is counted and logged, and the caller drops the connection, which closes it.
    pub(crate) fn admit(&self, peer: Option<SocketAddr>) -> Option<ConnectionPermit> {
        match self.permits.clone().try_acquire_owned() {
            Ok(permit) => {
                let open = self.metrics.connections_open_gauge().clone();
                open.inc();
                Some(ConnectionPermit {
                    _permit: permit,
                    open,
                    handshake_timeout: self.handshake_timeout,
                })
            }
            Err(_) => {
                self.metrics.connection_refused();
                tracing::debug!(
                    ?peer,
                    max_connections = self.max,
                    "too many connections open; connection closed"
                );
                None
            }
        }
    }

    /// The connections of `accepted` that get a permit, each carrying it; the others are
    /// closed at once. Accept errors pass through for the server to handle.
    pub(crate) fn admitted<S>(
        &self,
        accepted: S,
    ) -> impl Stream<Item = io::Result<Limited<TcpStream>>> + Send + 'static
    where
        S: Stream<Item = io::Result<TcpStream>> + Send + 'static,
    {
        let limit = self.clone();
        accepted.filter_map(move |accepted| {
            let admitted = match accepted {
                Ok(tcp) => limit
                    .admit(tcp.peer_addr().ok())
                    .map(|permit| Ok(Limited::new(tcp, permit))),
                Err(error) => Some(Err(error)),
            };
            std::future::ready(admitted)
        })
    }
}

/// One connection's place under the limit, given back (and the open-connections gauge moved
/// down) when dropped.
#[derive(Debug)]
pub(crate) struct ConnectionPermit {
    /// The semaphore permit itself.
    _permit: OwnedSemaphorePermit,
    /// `stickless_connections_open`, moved up when the permit was taken.
    open: IntGauge,
    /// Bound on the connection's TLS handshake and on the wait for its first bytes.
    handshake_timeout: Duration,
}

impl ConnectionPermit {
    /// How long the connection may take over its TLS handshake (`--handshake-timeout`).
    pub(crate) fn handshake_timeout(&self) -> Duration {
        self.handshake_timeout
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// A connection's I/O with its permit: the permit goes when the connection does (after the
/// socket is closed, since fields drop in order). Until the connection's first byte arrives,
/// a read past the first-bytes deadline fails (`TimedOut`), which makes the server close it.
#[derive(Debug)]
pub(crate) struct Limited<IO> {
    /// The connection (TCP, or TLS over TCP).
    io: IO,
    /// Its place under the limit.
    permit: ConnectionPermit,
    /// The first-bytes deadline, until a first byte has been read.
    first_bytes: Option<FirstBytes>,
}

/// When a connection that has sent nothing yet is closed.
#[derive(Debug)]
struct FirstBytes {
    /// The deadline.
    at: Instant,
    /// Its timer, made at the first read that has to wait (on the runtime serving the
    /// connection).
    timer: Option<Pin<Box<Sleep>>>,
}

impl<IO> Limited<IO> {
    /// `io` holding `permit`; its first bytes are due within the permit's handshake timeout
    /// from now.
    pub(crate) fn new(io: IO, permit: ConnectionPermit) -> Self {
        let at = Instant::now() + permit.handshake_timeout;
        Limited {
            io,
            permit,
            first_bytes: Some(FirstBytes { at, timer: None }),
        }
    }

    /// The connection and its permit apart (to run a TLS handshake on the connection while
    /// the permit is still held).
    pub(crate) fn into_parts(self) -> (IO, ConnectionPermit) {
        (self.io, self.permit)
    }
}

impl<IO: Connected> Connected for Limited<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Limited<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = Pin::new(&mut this.io).poll_read(cx, buf);
        let Some(first_bytes) = &mut this.first_bytes else {
            return read;
        };
        match read {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                this.first_bytes = None;
                Poll::Ready(Ok(()))
            }
            Poll::Ready(done) => Poll::Ready(done),
            Poll::Pending => {
                let at = first_bytes.at;
                let timer = first_bytes
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at.into())));
                if timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                tracing::debug!(
                    timeout = ?this.permit.handshake_timeout,
                    "no bytes from the client within the handshake timeout; connection closed"
                );
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no bytes from the client within --handshake-timeout",
                )))
            }
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Limited<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_permit_is_refused_past_the_limit_and_given_back_on_drop() {
        let metrics = Metrics::new();
        let limit = ConnectionLimit::new(2, Duration::from_secs(10), metrics.clone());
        let first = limit.admit(None).expect("first");
        let _second = limit.admit(None).expect("second");
        assert_eq!(metrics.connections_open(), 2);
        assert!(limit.admit(None).is_none(), "a third past a limit of 2");
        assert_eq!(metrics.connections_refused(), 1);
        drop(first);
        assert_eq!(metrics.connections_open(), 1);
        assert!(limit.admit(None).is_some(), "room again once one is gone");
    }
}
