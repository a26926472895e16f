//! Upgraded connections: WebSocket, the only HTTP/1.1 `Upgrade` (RFC 9110 §7.8) tunnelled.
//!
//! Only `Upgrade: websocket` (any case) is an upgrade here. Any other protocol, `h2c` above
//! all (the client would then speak HTTP/2 straight to the backend, past every filter: h2c
//! smuggling), has the request forwarded as a normal one, its `Upgrade`, `Connection` and
//! `HTTP2-Settings` stripped as hop-by-hop headers (what nginx does when the upgrade is not
//! configured): the backend sees no upgrade, and no 101 is relayed.
//!
//! An HTTP/1.1 websocket request whose `Connection` names `upgrade` and that carries `Upgrade`
//! keeps those two headers on its way to the backend (every other hop-by-hop header still
//! goes), sent on a connection of its own that is never pooled. It goes through the request filters like any
//! request (the backend of a WebSocket sees the `x-session-*` headers), and to another backend
//! only when nothing reached the first (a connect failure), whatever its method.
//!
//! A backend answering 101 Switching Protocols has its 101 relayed with its `Upgrade` and
//! `Connection: upgrade`; once hyper has written it, both sockets are handed over and the
//! [`Tunnel`] copies bytes both ways (a side that closes its half has the other side's write
//! half closed too) until both sides closed, a read or write failed, or no byte came from
//! either side for `idle_timeout`: then both are closed. The client socket keeps its
//! `send_timeout`. Any other answer is relayed as a normal response.
//!
//! The tunnel runs in the client connection's task once hyper is done with the connection, so
//! it counts against `max_connections` like the connection it was, and a graceful shutdown
//! waits for it as for a request in flight (the binary's shutdown grace ends it). Its backend
//! counts a request in flight until it ends (least-conn sees open WebSockets), and its client
//! keeps its slot under `max_conns_per_ip` until it ends.
//!
//! HTTP/2 has no `Upgrade`, and its extended CONNECT (RFC 8441) is not supported: the
//! `Upgrade` and `Connection` of an HTTP/2 request are dropped like any hop-by-hop header, and
//! so are an HTTP/1.0 request's.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{HeaderMap, Method, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use super::body::InFlight;
use crate::backend::Backend;
use crate::filter::HeldUntilResponseEnd;
use crate::metrics::{TunnelEnd, TunnelMetrics, UpgradeOutcome};

/// An upgrade request: the protocols it asks for, kept apart from the hop-by-hop headers that
/// go, and the client's connection once hyper has sent it a 101.
#[derive(Debug)]
pub(crate) struct UpgradeRequest {
    /// The `Upgrade` values (`websocket`), passed on to the backend.
    protocols: Vec<HeaderValue>,
    /// The client's connection, handed over after its 101.
    client: OnUpgrade,
}

impl UpgradeRequest {
    /// Takes the upgrade out of `parts` when it is an HTTP/1.1 upgrade request (`Connection:
    /// upgrade` and `Upgrade`); `None` for any other request, whose `Upgrade` then goes with
    /// the other hop-by-hop headers. To call before those are stripped.
    pub(crate) fn take(parts: &mut Parts) -> Option<Self> {
        // hyper prepares an upgrade for each HTTP/1.1 request carrying `Upgrade` (and each
        // CONNECT); a request without one costs a look into its empty extensions.
        let client = parts.extensions.remove::<OnUpgrade>()?;
        if parts.version != Version::HTTP_11
            || parts.method == Method::CONNECT
            || !names_upgrade(&parts.headers)
        {
            return None;
        }
        let protocols = upgrade_values(&parts.headers);
        if protocols.is_empty() {
            return None;
        }
        if !only_websocket(&protocols) {
            // `h2c` would have the client speak HTTP/2 straight to the backend, past every
            // filter (h2c smuggling); other protocols are not vouched for either. Like nginx
            // without the upgrade configured: a normal request, `Upgrade` and `Connection`
            // (and `HTTP2-Settings`) stripped as hop-by-hop headers.
            tracing::debug!(upgrade = ?protocols, "upgrade to a protocol other than websocket: \
                forwarded as a normal request");
            return None;
        }
        Some(UpgradeRequest { protocols, client })
    }

    /// Puts `Connection: upgrade` and the protocols asked for on the request to the backend.
    pub(crate) fn restore(&self, headers: &mut HeaderMap) {
        restore(headers, &self.protocols);
    }

    /// The backend answered 101 to it: takes the backend's protocols and connection out of the
    /// response head, before its hop-by-hop headers are stripped.
    pub(crate) fn switched(self, response: &mut http::response::Parts) -> Switched {
        Switched {
            protocols: upgrade_values(&response.headers),
            client: self.client,
            backend: response.extensions.remove::<OnUpgrade>(),
        }
    }
}

/// A 101 on its way to the client: what the tunnel after it needs.
#[derive(Debug)]
pub(crate) struct Switched {
    /// The backend's `Upgrade` values, relayed with the 101.
    protocols: Vec<HeaderValue>,
    /// The client's connection, handed over after its 101.
    client: OnUpgrade,
    /// The backend's connection, handed over after its 101 (`None`: hyper offered none).
    backend: Option<OnUpgrade>,
}

impl Switched {
    /// Puts `Connection: upgrade` and the backend's protocols on the 101 for the client.
    pub(crate) fn restore(&self, headers: &mut HeaderMap) {
        restore(headers, &self.protocols);
    }

    /// The tunnel between the two connections, to run once the 101 is written; `held` (the
    /// backend's request count, and what the response filters hold to the end of the response,
    /// e.g. the client's slot under `max_conns_per_ip`) is kept until it ends.
    pub(crate) fn tunnel(
        self,
        idle_timeout: Duration,
        metrics: TunnelMetrics,
        backend: Arc<Backend>,
        held: (InFlight, Option<HeldUntilResponseEnd>),
    ) -> Tunnel {
        let Switched {
            client,
            backend: upstream,
            ..
        } = self;
        Tunnel(Box::pin(async move {
            let end = relay(client, upstream, idle_timeout, &metrics).await;
            drop(held);
            if let Some(end) = end {
                metrics.ended(end);
                tracing::debug!(backend = %backend.name, reason = end.label(), "tunnel ended");
            }
        }))
    }
}

/// Copies bytes between the client and the backend once both switched protocols, until both
/// sides closed, one failed, or neither sent a byte for `idle_timeout`. `None` when the tunnel
/// never started (counted as a failed upgrade).
async fn relay(
    client: OnUpgrade,
    backend: Option<OnUpgrade>,
    idle_timeout: Duration,
    metrics: &TunnelMetrics,
) -> Option<TunnelEnd> {
    let Some(backend) = backend else {
        metrics.upgrade(UpgradeOutcome::Failed);
        tracing::warn!("the backend's 101 offered no connection to take over");
        return None;
    };
    // The client's side is there already (the tunnel runs once hyper is done with the client
    // connection); the backend's comes with its 101, unless its connection failed.
    let sides = tokio::time::timeout(idle_timeout, async { tokio::try_join!(client, backend) });
    let (client, backend) = match sides.await {
        Ok(Ok(sides)) => sides,
        Ok(Err(error)) => {
            metrics.upgrade(UpgradeOutcome::Failed);
            tracing::debug!(%error, "upgrade failed after the 101");
            return None;
        }
        Err(_) => {
            metrics.upgrade(UpgradeOutcome::Failed);
            tracing::warn!(timeout = ?idle_timeout, "the backend's connection was not handed over");
            return None;
        }
    };
    metrics.upgrade(UpgradeOutcome::Tunnel);
    metrics.opened();
    let activity = Activity::new();
    let mut client = Watched::new(TokioIo::new(client), &activity);
    let mut backend = Watched::new(TokioIo::new(backend), &activity);
    let end = tokio::select! {
        copied = tokio::io::copy_bidirectional(&mut client, &mut backend) => match copied {
            Ok(_) => TunnelEnd::Closed,
            Err(error) => {
                tracing::debug!(%error, "tunnel failed");
                TunnelEnd::Error
            }
        },
        () = activity.idle_for(idle_timeout) => TunnelEnd::Idle,
    };
    Some(end)
}

/// A tunnel waiting for hyper to hand its client connection over (boxed: only upgraded
/// connections carry one). The connection task awaits it.
pub(crate) struct Tunnel(Pin<Box<dyn Future<Output = ()> + Send>>);

impl fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Tunnel")
    }
}

impl Future for Tunnel {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.0.as_mut().poll(cx)
    }
}

/// Whether `Connection` names `upgrade` (any case, any of its lines).
fn names_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

/// Whether the `Upgrade` values name `websocket` (any case) and nothing else: the only
/// protocol tunnelled.
fn only_websocket(protocols: &[HeaderValue]) -> bool {
    let mut any = false;
    for value in protocols {
        let Ok(value) = value.to_str() else {
            return false;
        };
        for token in value.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            if !token.eq_ignore_ascii_case("websocket") {
                return false;
            }
            any = true;
        }
    }
    any
}

/// Every `Upgrade` value.
fn upgrade_values(headers: &HeaderMap) -> Vec<HeaderValue> {
    headers.get_all(header::UPGRADE).iter().cloned().collect()
}

/// `Connection: upgrade` and `protocols` as `Upgrade`, in place of what was there.
fn restore(headers: &mut HeaderMap, protocols: &[HeaderValue]) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.remove(header::UPGRADE);
    for protocol in protocols {
        headers.append(header::UPGRADE, protocol.clone());
    }
}

/// When a byte last came from either side of a tunnel.
#[derive(Debug)]
struct Activity {
    /// The clock's zero.
    origin: Instant,
    /// Nanoseconds from `origin` to the last read that brought bytes.
    last: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            origin: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let nanos = u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last.store(nanos, Ordering::Relaxed);
    }

    /// Resolves once no byte came for `timeout`; wakes at most once per `timeout` while bytes
    /// flow.
    async fn idle_for(&self, timeout: Duration) {
        loop {
            let last = self.origin + Duration::from_nanos(self.last.load(Ordering::Relaxed));
            let due = last + timeout;
            if Instant::now() >= due {
                return;
            }
            tokio::time::sleep_until(due).await;
        }
    }
}

/// One side of a tunnel, telling [`Activity`] when bytes arrive.
struct Watched<'a, T> {
    /// The connection.
    io: T,
    /// Shared by both sides.
    activity: &'a Activity,
}

impl<'a, T> Watched<'a, T> {
    fn new(io: T, activity: &'a Activity) -> Self {
        Watched { io, activity }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<'_, T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.touch();
        }
        poll
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<'_, T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(version: Version, method: Method, headers: &[(&str, &str)]) -> Parts {
        let mut builder = http::Request::builder().method(method).version(version);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let (mut parts, ()) = builder.uri("/ws").body(()).unwrap().into_parts();
        // hyper's marker of an upgrade it prepared (this one, of a request hyper did not
        // read, never resolves).
        parts
            .extensions
            .insert(hyper::upgrade::on(http::Request::new(())));
        parts
    }

    #[test]
    fn only_http11_requests_naming_upgrade_in_connection_are_upgrades() {
        let websocket = [
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ];
        let mut parts = request(Version::HTTP_11, Method::GET, &websocket);
        let upgrade = UpgradeRequest::take(&mut parts).expect("an upgrade request");
        assert!(parts.extensions.get::<OnUpgrade>().is_none());
        let mut headers = HeaderMap::new();
        upgrade.restore(&mut headers);
        assert_eq!(headers["connection"], "upgrade");
        assert_eq!(headers["upgrade"], "websocket");

        for (version, method, headers) in [
            (Version::HTTP_10, Method::GET, &websocket[..]),
            (Version::HTTP_2, Method::GET, &websocket[..]),
            (Version::HTTP_11, Method::CONNECT, &websocket[..]),
            (
                Version::HTTP_11,
                Method::GET,
                &[("upgrade", "websocket")][..],
            ),
            (
                Version::HTTP_11,
                Method::GET,
                &[("connection", "upgrade")][..],
            ),
            // Only websocket is tunnelled: never h2c (smuggling), nor any other protocol.
            (
                Version::HTTP_11,
                Method::GET,
                &[
                    ("connection", "Upgrade, HTTP2-Settings"),
                    ("upgrade", "h2c"),
                ][..],
            ),
            (
                Version::HTTP_11,
                Method::GET,
                &[("connection", "upgrade"), ("upgrade", "websocket, h2c")][..],
            ),
            (
                Version::HTTP_11,
                Method::GET,
                &[("connection", "upgrade"), ("upgrade", "echo")][..],
            ),
        ] {
            let mut parts = request(version, method.clone(), headers);
            assert!(
                UpgradeRequest::take(&mut parts).is_none(),
                "{version:?} {method} {headers:?}"
            );
        }
        let mut parts = request(
            Version::HTTP_11,
            Method::GET,
            &[("connection", "upgrade"), ("upgrade", "WebSocket")],
        );
        assert!(UpgradeRequest::take(&mut parts).is_some(), "any case");
        // Without hyper's marker (an HTTP/2 request, or one hyper did not prepare): none.
        let mut parts = request(Version::HTTP_11, Method::GET, &websocket);
        parts.extensions.clear();
        assert!(UpgradeRequest::take(&mut parts).is_none());
    }

    #[tokio::test]
    async fn a_tunnel_is_idle_only_once_no_byte_came_for_the_timeout() {
        let activity = Activity::new();
        let timeout = Duration::from_millis(200);
        tokio::time::sleep(Duration::from_millis(150)).await;
        activity.touch();
        let touched = Instant::now();
        activity.idle_for(timeout).await;
        assert!(touched.elapsed() >= timeout);
    }
}
