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
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

/// Bound on one TLS handshake: a client that has not finished it by then is disconnected.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed accept (out of file descriptors, say) before the next one.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// The application protocols offered, preferred first.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Why the listener's TLS configuration could not be built. Each message is one line and names
/// the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read TLS {what} {path}: {source}")]
    Read {
        /// Which file: `certificate` or `private key`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file was read but holds no usable PEM item of the kind expected.
    #[error("cannot parse TLS {what} {path}: {reason}")]
    Parse {
        /// Which file: `certificate` or `private key`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The certificate and key were parsed but rustls refused them (a key that does not match
    /// the certificate, an unsupported key type).
    #[error("cannot use TLS certificate {cert} with private key {key}: {source}")]
    Identity {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// rustls' reason.
        #[source]
        source: rustls::Error,
    },
}

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
        let chain = certificates(cert)?;
        let private_key = private_key(key)?;
        let mut config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("ring supports TLS 1.2 and 1.3")
                .with_no_client_auth()
                .with_single_cert(chain, private_key)
                .map_err(|source| TlsError::Identity {
                    cert: cert.to_owned(),
                    key: key.to_owned(),
                    source,
                })?;
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(ListenerTls {
            config: Arc::new(config),
        })
    }
}

/// The contents of `path`, or an error naming it as the TLS `what`.
fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

/// Every PEM certificate in `path`; an error when there is none or one is malformed.
fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    const WHAT: &str = "certificate";
    let pem = read(path, WHAT)?;
    let parse_error = |reason: String| TlsError::Parse {
        what: WHAT,
        path: path.to_owned(),
        reason,
    };
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| parse_error(error.to_string()))?;
    if chain.is_empty() {
        return Err(parse_error("no PEM certificate in it".into()));
    }
    Ok(chain)
}

/// The PEM private key in `path`.
fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    const WHAT: &str = "private key";
    let pem = read(path, WHAT)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|error| TlsError::Parse {
        what: WHAT,
        path: path.to_owned(),
        reason: match error {
            rustls::pki_types::pem::Error::NoItemsFound => "no PEM private key in it".into(),
            other => other.to_string(),
        },
    })
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
