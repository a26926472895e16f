//! TLS on both sides of the proxy: the client listener's certificate (HTTPS on `--listen`) and
//! the dialling of `https://` backends. rustls with ring, TLS 1.2 and 1.3.
//!
//! - **Listener** ([`ListenerTls`]): the certificate and key files (`--tls-cert`,
//!   `--tls-key`) make a rustls configuration offering ALPN `h2` and `http/1.1`, swapped whole
//!   by [`ListenerTls::reload`] (on SIGHUP): handshakes that start after a reload get the new
//!   certificate, connections already up keep their session, and files that do not make a
//!   valid configuration are refused with the one in use kept. Each handshake runs in its
//!   connection's task, bounded in time by `header_read_timeout` (`--header-read-timeout`);
//!   the connections under way, handshakes included, are bounded by `max_connections` alone,
//!   so clients that connect and stay silent hold only their own places, never a shared
//!   handshake budget that would lock every other TLS client out.
//! - **Backends** ([`BackendTls`]): an `https://` backend is always dialled over TLS, its
//!   certificate verified against the CA bundle of `--backend-ca` (the system's roots without
//!   it) and for the host name (or IP address) of its URL; ALPN `http/1.1`, the protocol the
//!   proxy speaks to backends. There is no way to reach an `https://` backend in cleartext: a
//!   failed handshake is a failed connection (another backend is tried, else 502).

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::net::TcpStream;

use crate::config::TlsConfig;

/// The application protocols the listener offers, preferred first.
const LISTENER_ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];
/// The one application protocol offered to backends: the proxy speaks HTTP/1.1 to them.
const BACKEND_ALPN: &[u8] = b"http/1.1";

/// Why a TLS configuration could not be built. Each message is one line and names the file at
/// fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read TLS {what} {path}: {source}")]
    Read {
        /// Which file: `certificate`, `private key` or `backend CA`.
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
        /// Which file: `certificate`, `private key` or `backend CA`.
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
    /// No CA bundle is configured and the system has no usable root certificate.
    #[error(
        "no root certificate found on this system to verify https:// backends ({0}); give \
         --backend-ca PATH"
    )]
    NoSystemRoots(String),
    /// A backend host that cannot be a TLS server name.
    #[error("backend host {host:?} is not a DNS name or an IP address usable for TLS")]
    ServerName {
        /// The host as configured.
        host: String,
    },
}

/// The client listener's TLS: the configuration new handshakes use, swapped whole by
/// [`reload`](ListenerTls::reload). Clones share it, so the clone kept by whoever handles
/// SIGHUP reloads the one the accept loop uses.
#[derive(Debug, Clone)]
pub struct ListenerTls {
    /// What the clones share.
    inner: Arc<ListenerInner>,
}

/// What the clones of a [`ListenerTls`] share.
#[derive(Debug)]
struct ListenerInner {
    /// The configuration for the next handshake. A lock held only to clone or replace the
    /// `Arc`, never across a handshake; each handshake keeps the `Arc` it started with.
    current: RwLock<Arc<ServerConfig>>,
}

impl ListenerTls {
    /// Reads the certificate and key files and builds the configuration, or says which file
    /// is at fault.
    pub fn load(files: &TlsConfig) -> Result<ListenerTls, TlsError> {
        let config = server_config(files)?;
        Ok(ListenerTls {
            inner: Arc::new(ListenerInner {
                current: RwLock::new(Arc::new(config)),
            }),
        })
    }

    /// Reads `files` and, when they make a valid configuration, uses it for every handshake
    /// from now on; established connections are not touched. On an error the configuration in
    /// use stays as it was.
    pub fn reload(&self, files: &TlsConfig) -> Result<(), TlsError> {
        let config = Arc::new(server_config(files)?);
        *self
            .inner
            .current
            .write()
            .unwrap_or_else(PoisonError::into_inner) = config;
        Ok(())
    }

    /// The server side of the handshake on a new client connection, with the configuration in
    /// use now, at most `timeout` long (the proxy gives its `header_read_timeout`); `None` (the
    /// connection closed, logged at debug) when it fails or times out.
    pub(crate) async fn accept(
        &self,
        tcp: TcpStream,
        timeout: Duration,
    ) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
        let peer = tcp.peer_addr().ok();
        let config = self
            .inner
            .current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
            Ok(Ok(stream)) => Some(stream),
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
}

/// How the proxy dials one `https://` backend: the shared client configuration and the name
/// the backend's certificate must be valid for. Cheap to clone.
#[derive(Clone)]
pub struct BackendTls {
    /// rustls' client side, with the trusted roots.
    connector: tokio_rustls::TlsConnector,
    /// The backend's host name or IP address, as its URL gives it.
    server_name: ServerName<'static>,
}

impl fmt::Debug for BackendTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl BackendTls {
    /// Dials the backend whose URL names `host` (a DNS name, an IPv4 address, or an IPv6 one
    /// with or without its brackets) with `config` (see [`backend_client_config`]).
    pub fn new(config: Arc<ClientConfig>, host: &str) -> Result<BackendTls, TlsError> {
        let bare = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let server_name =
            ServerName::try_from(bare.to_owned()).map_err(|_| TlsError::ServerName {
                host: host.to_owned(),
            })?;
        Ok(BackendTls {
            connector: tokio_rustls::TlsConnector::from(config),
            server_name,
        })
    }

    /// The client side of the handshake on `tcp`, the backend's certificate verified; the
    /// caller bounds it in time.
    pub async fn connect(
        &self,
        tcp: TcpStream,
    ) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        self.connector.connect(self.server_name.clone(), tcp).await
    }
}

/// The client configuration for `https://` backends: certificates verified against the PEM
/// bundle `ca`, or the system's roots without one; ALPN `http/1.1`; no client certificate.
pub fn backend_client_config(ca: Option<&Path>) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    match ca {
        Some(path) => {
            for cert in certificates(path, "backend CA")? {
                roots.add(cert).map_err(|error| TlsError::Parse {
                    what: "backend CA",
                    path: path.to_owned(),
                    reason: format!("a certificate cannot be used as a CA: {error}"),
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _ignored) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                let reason = match found.errors.first() {
                    Some(error) => error.to_string(),
                    None => "none in the system's store".to_owned(),
                };
                return Err(TlsError::NoSystemRoots(reason));
            }
        }
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports TLS 1.2 and 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![BACKEND_ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// ring, the one crypto provider of the workspace.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The listener's rustls configuration: ring, TLS 1.2 and 1.3, ALPN `h2` then `http/1.1`, no
/// client certificates.
fn server_config(files: &TlsConfig) -> Result<ServerConfig, TlsError> {
    let chain = certificates(&files.cert, "certificate")?;
    let key = private_key(&files.key)?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|source| TlsError::Identity {
            cert: files.cert.clone(),
            key: files.key.clone(),
            source,
        })?;
    config.alpn_protocols = LISTENER_ALPN.iter().map(|p| p.to_vec()).collect();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_hosts_become_server_names() {
        let config = backend_client_config_for_tests();
        for host in ["backend.internal", "127.0.0.1", "[::1]", "::1"] {
            BackendTls::new(config.clone(), host).unwrap_or_else(|e| panic!("{host}: {e}"));
        }
        let error = BackendTls::new(config, "bad host!").unwrap_err();
        assert!(error.to_string().contains("bad host!"), "{error}");
    }

    #[test]
    fn unreadable_or_empty_files_are_named_in_the_error() {
        let missing = Path::new("/nonexistent/stickless/ca.pem");
        let error = backend_client_config(Some(missing)).unwrap_err();
        assert!(
            error.to_string().contains("/nonexistent/stickless/ca.pem"),
            "{error}"
        );
        let dir = std::env::temp_dir().join(format!("stickless-proxy-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not PEM\n").unwrap();
        let error = ListenerTls::load(&TlsConfig {
            cert: empty.clone(),
            key: empty.clone(),
        })
        .unwrap_err();
        assert!(
            error.to_string().contains("no PEM certificate")
                && error.to_string().contains("empty.pem"),
            "{error}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A client configuration that needs no file and no system store.
    fn backend_client_config_for_tests() -> Arc<ClientConfig> {
        Arc::new(
            ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(RootCertStore::empty())
                .with_no_client_auth(),
        )
    }
}
