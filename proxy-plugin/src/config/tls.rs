//! HTTPS on the client listener: `--tls-cert PATH --tls-key PATH` (env
//! `STICKLESS_PROXY_TLS_CERT`, `STICKLESS_PROXY_TLS_KEY`; `cert`, `key` in the file's `[tls]`
//! table), each flag over its key. Both or neither: one without the other is a configuration
//! error, never a plaintext listener. The files themselves are read where the listener is built
//! ([`crate::tls::ListenerTls`]), at start and on every SIGHUP.

use std::path::PathBuf;

use super::file::FileTls;
use super::{Cli, ConfigError};

/// The client listener's certificate chain and private key, both PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// Certificate chain, the proxy's own certificate first.
    pub cert: PathBuf,
    /// Private key of the first certificate of `cert` (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// The listener's TLS files from the flags, else from `[tls]`; `None` for plain HTTP.
pub(super) fn resolve(cli: &Cli, file: FileTls) -> Result<Option<TlsConfig>, ConfigError> {
    let cert = cli.tls_cert.clone().or(file.cert);
    let key = cli.tls_key.clone().or(file.key);
    let missing = |given: &str, absent: &str| {
        Err(ConfigError::Invalid(format!(
            "{given} is given without {absent}: HTTPS needs both the certificate and its key \
             (plain HTTP neither)"
        )))
    };
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some(TlsConfig { cert, key })),
        (None, None) => Ok(None),
        (Some(_), None) => missing("--tls-cert (tls.cert)", "--tls-key (tls.key)"),
        (None, Some(_)) => missing("--tls-key (tls.key)", "--tls-cert (tls.cert)"),
    }
}
