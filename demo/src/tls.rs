//! HTTPS on demo-app's listener (`--tls-cert`, `--tls-key`), so that session-proxy can use it
//! as an `https://` backend: rustls with ring, TLS 1.2 and 1.3, ALPN `h2` and `http/1.1`, no
//! client certificates.
//!
//! With TLS the listener serves HTTPS only. Each handshake runs in its connection's own task,
//! bounded by [`HANDSHAKE_TIMEOUT`], so a client that connects and stays silent never holds up
//! the accept loop. Shutdown is graceful as with plain HTTP: accepting stops, each connection
//! finishes the request in flight and closes, and [`serve`] returns once they all have.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

/// Bound on one TLS handshake: a client that has not finished it by then is disconnected.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed accept (out of file descriptors, say) before the next one.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// The application protocols offered, preferred first.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Why the listener's TLS configuration could not be built (the session server's error: one
/// line naming the file at fault).
pub use session_server::tls::TlsError;

/// The listener's TLS settings, read from the certificate and key files. Clones share them.
#[derive(Debug, Clone)]
pub struct ListenerTls {
    /// The rustls configuration every handshake uses.
    config: Arc<ServerConfig>,
}

impl ListenerTls {
    /// Reads the certificate chain (PEM, the server's certificate first) and its private key
    /// (PEM: PKCS#8, PKCS#1 or SEC1) and builds the configuration, or says which file is at
    /// fault.
    pub fn from_files(cert: &Path, key: &Path) -> Result<ListenerTls, TlsError> {
        let config = session_server::tls::listener_config(cert, key, None, &ALPN)?;
        Ok(ListenerTls {
            config: Arc::new(config),
        })
    }
}

/// Serves `app` over HTTPS on `listener` until `shutdown` completes; then stops accepting and
/// waits for the connections in flight to finish their requests (those still in their
/// handshake are closed).
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    tls: &ListenerTls,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let acceptor = TlsAcceptor::from(tls.config.clone());
    // Each connection holds a receiver: `true` tells it to finish, and `closed` resolves once
    // every connection has dropped its receiver.
    let (stop, _) = watch::channel(false);
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
        tokio::spawn(connection(
            stream,
            peer,
            acceptor.clone(),
            app.clone(),
            stop.subscribe(),
        ));
    }
    drop(listener);
    tracing::info!("demo-app shutting down: finishing requests in flight");
    stop.send_replace(true);
    stop.closed().await;
    Ok(())
}

/// Resolves once `stop` says so (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// One client connection: the TLS handshake (bounded by [`HANDSHAKE_TIMEOUT`]), then HTTP/1.1
/// or HTTP/2 until the client closes or shutdown.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    app: Router,
    mut stop: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream));
    let stream = tokio::select! {
        accepted = handshake => match accepted {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => {
                tracing::debug!(%peer, %error, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, timeout = ?HANDSHAKE_TIMEOUT, "TLS handshake timed out");
                return;
            }
        },
        // Shutdown: a connection that has sent no request yet is simply closed.
        () = stopped(&mut stop) => return,
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    builder.http2().timer(TokioTimer::new());
    let service = TowerToHyperService::new(app);
    let mut conn = std::pin::pin!(builder.serve_connection(TokioIo::new(stream), service));
    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = stopped(&mut stop) => {
            // Finish the request in flight (if any), then close.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(error) = result {
        tracing::debug!(%peer, %error, "HTTPS connection ended with an error");
    }
}
