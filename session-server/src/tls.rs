//! gRPC over TLS: the listener's certificate, key and optional client CA, read from PEM files
//! into a rustls configuration that can be swapped while serving (on SIGHUP), and the
//! handshakes of accepted connections, run concurrently and each with a deadline.
//!
//! tonic's own `ServerTlsConfig` cannot be reloaded, so the server does the handshakes itself
//! (`ServerTls::incoming`, used by `server.rs`) and hands tonic finished TLS streams; a
//! handshake under way counts against `--max-connections` like an established connection. A reload
//! changes only the handshakes that start after it: connections already up keep their session.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use futures::{Stream, StreamExt as _};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio_rustls::server::TlsStream;

use crate::config::Settings;
use crate::connections::Limited;

/// Longest a client may take over its handshake once connected, by default
/// (`--handshake-timeout`, which also bounds the wait for the first bytes after it). Handshakes run side by side,
/// so a slow or silent client holds only its own connection, and only this long. A loaded
/// machine finishes a real handshake in milliseconds; 10 s is far from cutting one off. A
/// connection under way holds its place under `--max-connections` (see `connections.rs`), so
/// clients that connect and never finish cannot take every file descriptor either.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The one application protocol offered: gRPC is HTTP/2.
const ALPN_H2: &[u8] = b"h2";

/// The PEM files a TLS listener is configured from, re-read on every [`ServerTls::reload`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain, the server's own certificate first.
    pub cert: PathBuf,
    /// Private key of the first certificate of `cert`.
    pub key: PathBuf,
    /// CA certificates one of which must have signed each client's certificate (mTLS); no
    /// client certificate is asked for without it.
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    /// The TLS files the settings name, or `None` for plaintext. Settings that name only part
    /// of a configuration (a certificate without its key, a client CA without a certificate)
    /// are an error here too, not only in config validation: a caller that builds `Settings`
    /// by hand must never get a plaintext server, or one without mTLS, by leaving a field out.
    pub fn from_settings(settings: &Settings) -> Result<Option<TlsFiles>, TlsError> {
        match (
            &settings.tls_cert,
            &settings.tls_key,
            &settings.tls_client_ca,
        ) {
            (Some(cert), Some(key), client_ca) => Ok(Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: client_ca.clone(),
            })),
            (None, None, None) => Ok(None),
            (Some(_), None, _) => Err(TlsError::Incomplete("tls-cert is set without tls-key")),
            (None, Some(_), _) => Err(TlsError::Incomplete("tls-key is set without tls-cert")),
            (None, None, Some(_)) => Err(TlsError::Incomplete(
                "tls-client-ca is set without tls-cert and tls-key",
            )),
        }
    }
}

/// Why a TLS configuration could not be built from its files. Each message is one line and
/// names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The settings name only part of a TLS configuration.
    #[error("incomplete TLS settings: {0}")]
    Incomplete(&'static str),
    /// A file could not be read.
    #[error("cannot read TLS {what} {path}: {source}")]
    Read {
        /// Which file: `certificate`, `private key` or `client CA`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A file was read but holds no usable PEM item of the kind expected.
    #[error("cannot parse TLS {what} {path}: {reason}")]
    Parse {
        /// Which file: `certificate`, `private key` or `client CA`.
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

/// The TLS side of the gRPC listener: the rustls configuration new handshakes use, swapped
/// whole by [`reload`](ServerTls::reload). Clones share it, so the clone kept by whoever
/// handles SIGHUP reloads the one the server uses.
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// The files and the configuration currently built from them.
    inner: Arc<Inner>,
}

/// What the clones of a [`ServerTls`] share.
#[derive(Debug)]
struct Inner {
    /// Where the configuration is read from, on start-up and on each reload.
    files: TlsFiles,
    /// The configuration for the next handshake. A lock held only to clone or replace the
    /// `Arc`, never across a handshake; each handshake keeps the `Arc` it started with.
    current: RwLock<Arc<ServerConfig>>,
}

impl ServerTls {
    /// Reads `files` and builds the configuration, or says which file is at fault.
    pub fn load(files: TlsFiles) -> Result<ServerTls, TlsError> {
        let config = server_config(&files)?;
        Ok(ServerTls {
            inner: Arc::new(Inner {
                files,
                current: RwLock::new(Arc::new(config)),
            }),
        })
    }

    /// The TLS configuration the settings ask for, loaded; `None` for plaintext.
    pub fn from_settings(settings: &Settings) -> Result<Option<ServerTls>, TlsError> {
        TlsFiles::from_settings(settings)?
            .map(ServerTls::load)
            .transpose()
    }

    /// Re-reads the files and, when they make a valid configuration, uses it for every
    /// handshake from now on; established connections are not touched. On an error the
    /// configuration in use stays as it was.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = Arc::new(server_config(&self.inner.files)?);
        *self
            .inner
            .current
            .write()
            .unwrap_or_else(PoisonError::into_inner) = config;
        Ok(())
    }

    /// The files this configuration is read from.
    pub fn files(&self) -> &TlsFiles {
        &self.inner.files
    }

    /// An acceptor with the configuration in use now.
    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let config = self
            .inner
            .current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        tokio_rustls::TlsAcceptor::from(config)
    }

    /// The TLS streams of the TCP `connections`: each accepted connection's handshake runs in
    /// a task of its own on the runtime that polls the stream (so one slow client never holds
    /// up the others), bounded by `--handshake-timeout` ([`HANDSHAKE_TIMEOUT`] by default,
    /// carried by the connection's permit), and keeps the connection's permit
    /// (its place under the connection limit) throughout. A failed or timed-out handshake
    /// closes that connection (logged at debug), gives its permit back and yields nothing.
    /// Accept errors pass through for the server to handle. Ends when `connections` does;
    /// handshakes still running then are dropped.
    pub(crate) fn incoming<S>(
        &self,
        connections: S,
    ) -> impl Stream<Item = io::Result<Limited<TlsStream<TcpStream>>>> + Send + 'static
    where
        S: Stream<Item = io::Result<Limited<TcpStream>>> + Send + 'static,
    {
        /// The stream's state between items.
        struct Handshaking<S> {
            /// Where TCP connections come from.
            connections: Pin<Box<S>>,
            /// Handshakes under way; each yields its stream, or `None` when it failed.
            handshakes: JoinSet<Option<Limited<TlsStream<TcpStream>>>>,
            /// Whose configuration each new handshake takes.
            tls: ServerTls,
        }
        let state = Handshaking {
            connections: Box::pin(connections),
            handshakes: JoinSet::new(),
            tls: self.clone(),
        };
        futures::stream::unfold(state, |mut state| async move {
            loop {
                tokio::select! {
                    accepted = state.connections.next() => match accepted {
                        Some(Ok(tcp)) => {
                            state.handshakes.spawn(handshake(state.tls.acceptor(), tcp));
                        }
                        Some(Err(error)) => return Some((Err(error), state)),
                        None => return None,
                    },
                    Some(done) = state.handshakes.join_next(), if !state.handshakes.is_empty() => {
                        if let Ok(Some(stream)) = done {
                            return Some((Ok(stream), state));
                        }
                    }
                }
            }
        })
    }
}

/// One server-side handshake, at most the permit's handshake timeout long, the connection's permit
/// held throughout and handed on to the TLS stream; `None` when it fails (the permit goes).
async fn handshake(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: Limited<TcpStream>,
) -> Option<Limited<TlsStream<TcpStream>>> {
    let (tcp, permit) = tcp.into_parts();
    let peer = tcp.peer_addr().ok();
    let timeout = permit.handshake_timeout();
    match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => Some(Limited::new(stream, permit)),
        Ok(Err(error)) => {
            tracing::debug!(?peer, %error, "TLS handshake failed; connection closed");
            None
        }
        Err(_) => {
            tracing::debug!(
                ?peer,
                ?timeout,
                "TLS handshake timed out; connection closed"
            );
            None
        }
    }
}

/// The rustls configuration `files` describe, for gRPC: [`listener_config`] with ALPN `h2`.
fn server_config(files: &TlsFiles) -> Result<ServerConfig, TlsError> {
    listener_config(
        &files.cert,
        &files.key,
        files.client_ca.as_deref(),
        &[ALPN_H2],
    )
}

/// A TLS listener's rustls configuration from PEM files: ring as the crypto provider, TLS 1.2
/// and 1.3, the certificate chain in `cert` (the server's certificate first) with its private
/// key in `key` (PKCS#8, PKCS#1 or SEC1), client certificates required and verified against
/// `client_ca` when given, and `alpn` offered, preferred first. Each error names the file at
/// fault. Also what `demo-app --tls-cert/--tls-key` serves with.
pub fn listener_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
    alpn: &[&[u8]],
) -> Result<ServerConfig, TlsError> {
    let chain = certificates(cert, "certificate")?;
    let private_key = private_key(key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports TLS 1.2 and 1.3");
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let ca_error = |reason: String| TlsError::Parse {
                what: "client CA",
                path: path.to_owned(),
                reason,
            };
            let mut roots = RootCertStore::empty();
            for ca in certificates(path, "client CA")? {
                roots.add(ca).map_err(|error| ca_error(error.to_string()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|error| ca_error(error.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, private_key)
        .map_err(|source| TlsError::Identity {
            cert: cert.to_owned(),
            key: key.to_owned(),
            source,
        })?;
    config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
    Ok(config)
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
fn certificates(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path, what)?;
    let parse_error = |reason: String| TlsError::Parse {
        what,
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

/// The PEM private key (PKCS#8, PKCS#1 or SEC1) in `path`.
fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path, "private key")?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|error| TlsError::Parse {
        what: "private key",
        path: path.to_owned(),
        reason: match error {
            rustls::pki_types::pem::Error::NoItemsFound => "no PEM private key in it".into(),
            other => other.to_string(),
        },
    })
}
