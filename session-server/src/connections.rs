//! The limit on client connections open at once (`--max-connections`): each accepted
//! connection takes a permit before anything else (its TLS handshake included) and its I/O
//! holds the permit until the connection ends. Past the limit a new connection is closed at once
//! and counted (`stickless_connections_refused_total`), so clients that connect and never speak,
//! or never finish their handshake, cannot take every file descriptor of the process (nginx
//! bounds the same with `worker_connections`, HAProxy with `maxconn`).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::{Stream, StreamExt as _};
use prometheus::IntGauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
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
    /// Where open and refused connections are counted.
    metrics: Metrics,
}

impl ConnectionLimit {
    /// At most `max` connections at once (at least 1; clamped to what a semaphore holds).
    pub(crate) fn new(max: usize, metrics: Metrics) -> Self {
        let max = max.clamp(1, Semaphore::MAX_PERMITS);
        ConnectionLimit {
            permits: Arc::new(Semaphore::new(max)),
            max,
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
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// A connection's I/O with its permit: the permit goes when the connection does (after the
/// socket is closed, since fields drop in order).
#[derive(Debug)]
pub(crate) struct Limited<IO> {
    /// The connection (TCP, or TLS over TCP).
    io: IO,
    /// Its place under the limit.
    permit: ConnectionPermit,
}

impl<IO> Limited<IO> {
    /// `io` holding `permit`.
    pub(crate) fn new(io: IO, permit: ConnectionPermit) -> Self {
        Limited { io, permit }
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
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
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
        let limit = ConnectionLimit::new(2, metrics.clone());
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
