//! TLS settings of the session client: which CA the session server's certificate must chain to,
//! and the client's own certificate for mTLS.
//!
//! The rule the client follows (see [`crate::ClientConfig`]): an `https://` endpoint is always
//! dialled over TLS (rustls, ring), with [`ClientTls::ca_pem`] as the only trusted roots when
//! given and the system's roots otherwise; an `http://` endpoint is cleartext and refuses any
//! TLS settings, so that a forgotten `s` is a configuration error instead of a silent
//! downgrade; any other scheme is refused.
//!
//! ```no_run
//! use std::path::Path;
//! use session_client::{ClientConfig, ClientTls, SessionClient};
//!
//! # fn build() -> Result<SessionClient, session_client::ClientError> {
//! let mut config = ClientConfig::new("https://sessions.internal:50051");
//! config.tls = ClientTls::from_files(
//!     Some(Path::new("/etc/stickless/ca.pem")),
//!     Some(Path::new("/etc/stickless/client.pem")),
//!     Some(Path::new("/etc/stickless/client.key")),
//! )?;
//! SessionClient::connect_lazy(config)
//! # }
//! ```

use std::fmt;
use std::path::Path;
use std::time::Duration;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::client::ClientError;

/// TLS settings for an `https://` session server. The default trusts the system's roots and
/// presents no client certificate.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// PEM bundle of the CA certificates the server's certificate must chain to; they replace
    /// the system's roots (a private CA is the usual case). `None`: the system's roots.
    pub ca_pem: Option<Vec<u8>>,
    /// The client's certificate and key, presented to a server that requires mTLS.
    pub identity: Option<ClientIdentity>,
}

/// A client certificate chain and its private key, both PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    /// The certificate chain, leaf first (PEM).
    pub cert_pem: Vec<u8>,
    /// The private key of the leaf (PEM: PKCS#8, PKCS#1 or SEC1). Never printed.
    pub key_pem: Vec<u8>,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field(
                "ca_pem",
                &self
                    .ca_pem
                    .as_ref()
                    .map_or("<system roots>".to_owned(), |p| {
                        format!("<{} bytes>", p.len())
                    }),
            )
            .field("identity", &self.identity)
            .finish()
    }
}

impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("cert_pem", &format_args!("<{} bytes>", self.cert_pem.len()))
            .field("key_pem", &format_args!("<hidden>"))
            .finish()
    }
}

/// What a PEM file is meant to hold, for reading and for error messages.
#[derive(Debug, Clone, Copy)]
enum Material {
    /// The CA bundle.
    Ca,
    /// The client certificate chain.
    Cert,
    /// The client private key.
    Key,
}

impl Material {
    /// How error messages name it.
    fn label(self) -> &'static str {
        match self {
            Material::Ca => "CA bundle",
            Material::Cert => "client certificate",
            Material::Key => "client key",
        }
    }

    /// Checks that `pem` holds what this material needs: at least one certificate usable as a
    /// trust anchor (CA), at least one certificate (client certificate), a private key (key).
    fn check(self, pem: &[u8]) -> Result<(), String> {
        match self {
            Material::Ca => {
                let mut roots = RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(pem) {
                    let cert = cert.map_err(|e| format!("not valid PEM: {e}"))?;
                    roots
                        .add(cert)
                        .map_err(|e| format!("a certificate cannot be used as a CA: {e}"))?;
                }
                if roots.is_empty() {
                    return Err("no PEM certificate in it".to_owned());
                }
            }
            Material::Cert => {
                let certs = CertificateDer::pem_slice_iter(pem)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("not valid PEM: {e}"))?;
                if certs.is_empty() {
                    return Err("no PEM certificate in it".to_owned());
                }
            }
            Material::Key => {
                PrivateKeyDer::from_pem_slice(pem)
                    .map_err(|e| format!("no PEM private key in it ({e})"))?;
            }
        }
        Ok(())
    }

    /// Reads and checks the file; errors name it.
    fn read(self, path: &Path) -> Result<Vec<u8>, ClientError> {
        let pem = std::fs::read(path).map_err(|e| {
            ClientError::Config(format!(
                "cannot read the {} {}: {e}",
                self.label(),
                path.display()
            ))
        })?;
        self.check(&pem).map_err(|e| {
            ClientError::Config(format!("the {} {}: {e}", self.label(), path.display()))
        })?;
        Ok(pem)
    }
}

impl ClientTls {
    /// Reads the TLS settings from PEM files: the CA bundle (`None`: the system's roots) and,
    /// for mTLS, the client certificate and its key (both or neither). `Ok(None)` when no file
    /// is given. A file that cannot be read or holds no usable PEM is an error naming it.
    pub fn from_files(
        ca: Option<&Path>,
        cert: Option<&Path>,
        key: Option<&Path>,
    ) -> Result<Option<ClientTls>, ClientError> {
        let identity = match (cert, key) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(ClientIdentity {
                cert_pem: Material::Cert.read(cert)?,
                key_pem: Material::Key.read(key)?,
            }),
            (Some(_), None) => {
                return Err(ClientError::Config(
                    "a client certificate is given without its key".into(),
                ));
            }
            (None, Some(_)) => {
                return Err(ClientError::Config(
                    "a client key is given without its certificate".into(),
                ));
            }
        };
        let ca_pem = ca.map(|path| Material::Ca.read(path)).transpose()?;
        if ca_pem.is_none() && identity.is_none() {
            return Ok(None);
        }
        Ok(Some(ClientTls { ca_pem, identity }))
    }

    /// Checks PEM given as bytes (what [`ClientTls::from_files`] checks per file).
    pub(crate) fn check(&self) -> Result<(), ClientError> {
        let refuse = |material: Material, e: String| {
            ClientError::Config(format!("the {}: {e}", material.label()))
        };
        if let Some(ca) = &self.ca_pem {
            Material::Ca
                .check(ca)
                .map_err(|e| refuse(Material::Ca, e))?;
        }
        if let Some(identity) = &self.identity {
            Material::Cert
                .check(&identity.cert_pem)
                .map_err(|e| refuse(Material::Cert, e))?;
            Material::Key
                .check(&identity.key_pem)
                .map_err(|e| refuse(Material::Key, e))?;
        }
        Ok(())
    }

    /// tonic's settings for these: the CA bundle or the system's roots, the identity if any,
    /// and a bound on the handshake.
    pub(crate) fn tonic_config(&self, handshake_timeout: Duration) -> ClientTlsConfig {
        let config = ClientTlsConfig::new().timeout(handshake_timeout);
        let config = match &self.ca_pem {
            Some(ca) => config.ca_certificate(Certificate::from_pem(ca)),
            None => config.with_native_roots(),
        };
        match &self.identity {
            Some(identity) => {
                config.identity(Identity::from_pem(&identity.cert_pem, &identity.key_pem))
            }
            None => config,
        }
    }
}
