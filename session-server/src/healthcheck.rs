//! `session-server healthcheck`: a probe for Docker's `HEALTHCHECK` and other orchestrators,
//! in the server's own binary, so an image needs no other tool. It makes one
//! `grpc.health.v1.Health/Check` call for `session.v1.SessionStore` (or `--service`) and exits
//! 0 when the answer is SERVING, 1 otherwise: NOT_SERVING (the store cannot be reached, or
//! the server is shutting down), an unknown service, nothing listening, a TLS failure, no
//! answer within `--timeout`, or flags it cannot use. Exit status 2 is never used (Docker
//! reserves it). A failure prints one line on stderr saying why; success prints nothing.
//!
//! ```text
//! HEALTHCHECK CMD ["session-server", "healthcheck"]
//! session-server healthcheck --addr https://sessions:50051 --tls-ca /etc/stickless/ca.pem
//! ```
//!
//! Health is served without a bearer token (only SessionStore calls take one), so the probe
//! needs none; a server with `--tls-client-ca` needs `--tls-cert` and `--tls-key`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// The word after the binary's name that selects the probe: `session-server healthcheck`.
pub const SUBCOMMAND: &str = "healthcheck";

/// Default `--addr`: where the server listens by default ([`crate::config::DEFAULT_LISTEN`]).
pub const DEFAULT_ADDR: &str = "http://127.0.0.1:50051";

/// The probe's flags; each has an environment-variable twin (`STICKLESS_HEALTHCHECK_*`). There
/// is no TOML file: a probe is a command line.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "session-server healthcheck",
    version,
    about = "Checks a session server's gRPC health: exit 0 when SERVING, 1 otherwise \
             (one line on stderr says why)"
)]
pub struct Probe {
    /// The server: `host:port` (plaintext, or TLS when a --tls-* flag is given),
    /// `http://host:port` or `https://host:port`.
    #[arg(long, env = "STICKLESS_HEALTHCHECK_ADDR", default_value = DEFAULT_ADDR)]
    pub addr: String,
    /// The service whose status is asked (`""`: the server as a whole).
    #[arg(long, env = "STICKLESS_HEALTHCHECK_SERVICE", default_value = session_proto::SERVICE_NAME)]
    pub service: String,
    /// Bound on the whole probe: connection, TLS handshake and answer.
    #[arg(long, env = "STICKLESS_HEALTHCHECK_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// PEM CA certificate(s) to trust for the server's certificate instead of the system's
    /// roots.
    #[arg(long, env = "STICKLESS_HEALTHCHECK_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate chain, for a server that requires one (`--tls-client-ca`).
    #[arg(long, env = "STICKLESS_HEALTHCHECK_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `--tls-cert`.
    #[arg(long, env = "STICKLESS_HEALTHCHECK_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The name the server's certificate is checked against [default: the host of --addr].
    #[arg(long, env = "STICKLESS_HEALTHCHECK_TLS_SERVER_NAME")]
    pub tls_server_name: Option<String>,
}

/// Why the probe did not find the service SERVING.
#[derive(Debug, thiserror::Error)]
pub enum Unhealthy {
    /// The flags cannot make a probe (a bad address, an unreadable file).
    #[error("{0}")]
    Config(String),
    /// No connection (nothing listening, refused, TLS handshake failed).
    #[error("cannot connect to {addr}: {why}")]
    Unreachable {
        /// The server's URL.
        addr: String,
        /// The transport's error, with its causes.
        why: String,
    },
    /// The Check call failed (NOT_FOUND for a service the server does not report on).
    #[error("Health/Check of {service:?} failed with {:?}: {}", status.code(), status.message())]
    Refused {
        /// The service asked about.
        service: String,
        /// The call's status.
        status: tonic::Status,
    },
    /// The server answered, not SERVING.
    #[error("{service:?} is {status} (the store cannot be reached, or the server is stopping)")]
    NotServing {
        /// The service asked about.
        service: String,
        /// Its status, as the server named it.
        status: &'static str,
    },
    /// No answer within `--timeout`.
    #[error("no answer from {addr} within {timeout:?}")]
    Timeout {
        /// The server's URL.
        addr: String,
        /// `--timeout`.
        timeout: Duration,
    },
}

/// Runs the probe with `args` (the subcommand's own: `args[0]` is taken as its name) and gives
/// the exit status; prints one line on stderr unless the service is SERVING. `--help` and
/// `--version` print and exit 0; a flag error is exit 1, as any other failure.
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let probe = match Probe::try_parse_from(args) {
        Ok(probe) => probe,
        Err(error) => {
            let _ = error.print();
            return if error.use_stderr() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    // One call: a runtime on this thread is all it needs.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("session-server healthcheck: cannot start a runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(check(&probe)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(why) => {
            eprintln!("session-server healthcheck: {why}");
            ExitCode::FAILURE
        }
    }
}

/// Asks the server at `probe.addr` for the status of `probe.service`: `Ok` when SERVING.
pub async fn check(probe: &Probe) -> Result<(), Unhealthy> {
    let (url, tls) = target(probe)?;
    let mut endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| Unhealthy::Config(format!("bad --addr {:?}: {e}", probe.addr)))?
        // The whole probe is bounded below; this ends a hanging connect (and says so) sooner.
        .connect_timeout(probe.timeout);
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).map_err(|e| {
            Unhealthy::Config(format!("cannot use the TLS settings: {}", chain(&e)))
        })?;
    }
    let call = async {
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| Unhealthy::Unreachable {
                addr: url.clone(),
                why: chain(&e),
            })?;
        let request = HealthCheckRequest {
            service: probe.service.clone(),
        };
        let answer = HealthClient::new(channel)
            .check(request)
            .await
            .map_err(|status| Unhealthy::Refused {
                service: probe.service.clone(),
                status,
            })?
            .into_inner();
        match answer.status() {
            ServingStatus::Serving => Ok(()),
            other => Err(Unhealthy::NotServing {
                service: probe.service.clone(),
                status: other.as_str_name(),
            }),
        }
    };
    tokio::time::timeout(probe.timeout, call)
        .await
        .unwrap_or(Err(Unhealthy::Timeout {
            addr: url.clone(),
            timeout: probe.timeout,
        }))
}

/// The URL to dial and its TLS settings (`None`: plaintext), from `--addr` and the TLS flags.
fn target(probe: &Probe) -> Result<(String, Option<ClientTlsConfig>), Unhealthy> {
    let config = |msg: String| Unhealthy::Config(msg);
    let tls_flags =
        probe.tls_ca.is_some() || probe.tls_cert.is_some() || probe.tls_server_name.is_some();
    let addr = probe.addr.trim();
    let (url, use_tls) = match addr.split_once("://") {
        None => {
            let scheme = if tls_flags { "https" } else { "http" };
            (format!("{scheme}://{addr}"), tls_flags)
        }
        Some(("http", _)) if tls_flags => {
            return Err(config(format!(
                "--addr {addr} is plaintext (http://) but TLS flags are given: use https://"
            )));
        }
        Some(("http", _)) => (addr.to_owned(), false),
        Some(("https", _)) => (addr.to_owned(), true),
        Some((scheme, _)) => {
            return Err(config(format!(
                "--addr {addr}: unknown scheme {scheme:?} (use host:port, http:// or https://)"
            )));
        }
    };
    if !use_tls {
        return Ok((url, None));
    }
    let mut tls = ClientTlsConfig::new();
    tls = match &probe.tls_ca {
        Some(ca) => tls.ca_certificate(Certificate::from_pem(read(ca, "--tls-ca")?)),
        None => tls.with_native_roots(),
    };
    if let (Some(cert), Some(key)) = (&probe.tls_cert, &probe.tls_key) {
        let (cert, key) = (read(cert, "--tls-cert")?, read(key, "--tls-key")?);
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    if let Some(name) = &probe.tls_server_name {
        tls = tls.domain_name(name.clone());
    }
    Ok((url, Some(tls)))
}

/// The contents of the file `flag` names.
fn read(path: &Path, flag: &str) -> Result<Vec<u8>, Unhealthy> {
    std::fs::read(path)
        .map_err(|e| Unhealthy::Config(format!("cannot read {flag} {}: {e}", path.display())))
}

/// An error and its causes on one line (`transport error: tcp connect error: Connection
/// refused`): the transport's own message alone says little.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let message = cause.to_string();
        // Some layers repeat their cause's message in their own.
        if !text.ends_with(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(args: &[&str]) -> Probe {
        Probe::try_parse_from(std::iter::once("healthcheck").chain(args.iter().copied()))
            .expect("valid flags")
    }

    #[test]
    fn addresses_take_a_scheme_from_the_flags_or_their_own() {
        let url = |args: &[&str]| target(&probe(args)).map(|(url, tls)| (url, tls.is_some()));
        assert_eq!(
            url(&[]).expect("default"),
            ("http://127.0.0.1:50051".to_owned(), false)
        );
        assert_eq!(
            url(&["--addr", "db:7"]).expect("host:port"),
            ("http://db:7".to_owned(), false)
        );
        assert_eq!(
            url(&["--addr", "db:7", "--tls-server-name", "x"]).expect("host:port with TLS"),
            ("https://db:7".to_owned(), true)
        );
        assert_eq!(
            url(&["--addr", "https://db:7"]).expect("https"),
            ("https://db:7".to_owned(), true)
        );
        assert!(url(&["--addr", "http://db:7", "--tls-server-name", "x"]).is_err());
        assert!(url(&["--addr", "ftp://db:7"]).is_err());
    }

    #[test]
    fn a_client_certificate_needs_its_key() {
        let parsed = Probe::try_parse_from(["healthcheck", "--tls-cert", "c.pem"]);
        assert!(parsed.is_err());
    }
}
