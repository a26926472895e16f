//! Health checking: one task per backend per config generation.
//!
//! - Active ([`HealthCheckKind::Tcp`], [`HealthCheckKind::Http`]): every `interval` a probe
//!   bounded by `timeout`; `fall` consecutive failures take an up backend down, `rise`
//!   consecutive successes bring a down one up (whatever took it down: a probe or passive
//!   marking).
//! - Passive only ([`HealthCheckKind::Off`]): the proxy marks a backend down after `max_fails`
//!   failures within `fail_timeout` ([`Backend::report_failure`]); this task brings it back
//!   `fail_timeout` later so it is tried again (nginx `max_fails`/`fail_timeout`).
//!
//! An `https://` backend is probed over TLS, its certificate verified as for requests: the TCP
//! check is a connect and a handshake, the HTTP check a `GET` over TLS. A backend whose
//! certificate does not verify is down, as no request could reach it.
//!
//! The tasks stop when their [`HealthChecks`] is dropped (on reload, or with the proxy).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, Uri, header};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use crate::backend::Backend;
use crate::config::{HealthCheckKind, HealthConfig};
use crate::tls::BackendTls;

/// Shortest and longest pause between two looks at a passively marked backend: short enough
/// that recovery happens close to `fail_timeout`, long enough not to spin.
const PASSIVE_TICK: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// No answer within the check timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The TCP connection failed.
    #[error("connect: {0}")]
    Connect(#[source] std::io::Error),
    /// The TLS handshake with an `https://` backend failed (its certificate did not verify,
    /// or it does not speak TLS).
    #[error("tls: {0}")]
    Tls(#[source] std::io::Error),
    /// The HTTP exchange failed.
    #[error("http: {0}")]
    Http(#[source] hyper::Error),
    /// The check request could not be built (bad path).
    #[error("bad check request: {0}")]
    Request(#[source] http::Error),
    /// The backend answered with a status other than 2xx.
    #[error("status {0}")]
    Status(StatusCode),
}

/// The health-check tasks of one backend list; dropping it stops them.
#[derive(Debug, Default)]
pub struct HealthChecks {
    /// One task per backend.
    tasks: Vec<JoinHandle<()>>,
}

impl HealthChecks {
    /// Starts one task per backend. Must be called in a tokio runtime.
    pub fn start(backends: &[Arc<Backend>], config: &HealthConfig) -> HealthChecks {
        let tasks = backends
            .iter()
            .map(|backend| {
                let backend = backend.clone();
                let config = config.clone();
                match config.kind {
                    HealthCheckKind::Off => tokio::spawn(passive_recovery(backend, config)),
                    _ => tokio::spawn(active_checks(backend, config)),
                }
            })
            .collect();
        HealthChecks { tasks }
    }
}

impl Drop for HealthChecks {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Brings a passively marked-down backend back after `fail_timeout`.
async fn passive_recovery(backend: Arc<Backend>, config: HealthConfig) {
    if config.max_fails == 0 {
        return;
    }
    let tick = (config.fail_timeout / 4).clamp(PASSIVE_TICK.0, PASSIVE_TICK.1);
    let mut down_since: Option<Instant> = None;
    loop {
        tokio::time::sleep(tick).await;
        if backend.is_up() {
            down_since = None;
            continue;
        }
        let since = *down_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= config.fail_timeout && backend.set_up(true) {
            tracing::info!(backend = %backend.name, fail_timeout = ?config.fail_timeout,
                "backend up again: fail_timeout passed, it will be tried");
            down_since = None;
        }
    }
}

/// Probes a backend every `interval`, applying `rise`/`fall`.
async fn active_checks(backend: Arc<Backend>, config: HealthConfig) {
    let mut interval = tokio::time::interval(config.interval.max(Duration::from_millis(1)));
    interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let (mut successes, mut failures) = (0u32, 0u32);
    let mut seen_up = backend.is_up();
    loop {
        interval.tick().await;
        let result = probe(
            &backend.authority,
            backend.tls(),
            &config.kind,
            config.timeout,
        )
        .await;
        if backend.is_up() != seen_up {
            // Someone else (passive marking) changed it: count afresh from here.
            (successes, failures) = (0, 0);
        }
        match result {
            Ok(()) => {
                successes = successes.saturating_add(1);
                failures = 0;
                if !backend.is_up() && successes >= config.rise.max(1) && backend.set_up(true) {
                    tracing::info!(backend = %backend.name, successes, "backend up (health check)");
                }
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                successes = 0;
                tracing::debug!(backend = %backend.name, %error, failures, "health check failed");
                if backend.is_up() && failures >= config.fall.max(1) && backend.set_up(false) {
                    tracing::warn!(backend = %backend.name, %error, failures,
                        "backend down (health check)");
                }
            }
        }
        seen_up = backend.is_up();
    }
}

/// One check of the backend at `authority` (over TLS when `tls` is given): a connect (and
/// handshake), or `GET path` expecting a 2xx, all within `timeout`. [`HealthCheckKind::Off`]
/// always succeeds.
pub async fn probe(
    authority: &str,
    tls: Option<&BackendTls>,
    kind: &HealthCheckKind,
    timeout: Duration,
) -> Result<(), ProbeError> {
    let check = async {
        if *kind == HealthCheckKind::Off {
            return Ok(());
        }
        let stream = TcpStream::connect(authority)
            .await
            .map_err(ProbeError::Connect)?;
        let _ = stream.set_nodelay(true);
        match (kind, tls) {
            (HealthCheckKind::Http(path), None) => http_check(stream, authority, path).await,
            (HealthCheckKind::Http(path), Some(tls)) => {
                let stream = tls.connect(stream).await.map_err(ProbeError::Tls)?;
                http_check(stream, authority, path).await
            }
            (_, Some(tls)) => tls.connect(stream).await.map(drop).map_err(ProbeError::Tls),
            (_, None) => Ok(()),
        }
    };
    tokio::time::timeout(timeout, check)
        .await
        .map_err(|_| ProbeError::Timeout(timeout))?
}

/// `GET path` on `stream`, a fresh connection (so a dead accept loop is noticed), expecting a
/// 2xx.
async fn http_check<S>(stream: S, authority: &str, path: &str) -> Result<(), ProbeError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let request = Request::get(path)
        .header(header::HOST, authority)
        .header(header::USER_AGENT, "session-proxy-health-check")
        .body(Empty::<Bytes>::new())
        .map_err(ProbeError::Request)?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(ProbeError::Http)?;
    // Drive the connection and the request together; both are dropped on the timeout above.
    // A connection that ends first (the backend answered and closed) has delivered the answer
    // or failed the request, so the request future settles right after.
    let mut connection = std::pin::pin!(connection);
    let mut exchange = std::pin::pin!(sender.send_request(request));
    let response = tokio::select! {
        biased;
        response = &mut exchange => response,
        _ = &mut connection => exchange.await,
    }
    .map_err(ProbeError::Http)?;
    if response.status().is_success() {
        Ok(())
    } else {
        Err(ProbeError::Status(response.status()))
    }
}

/// Whether `path` can be the target of an HTTP check (`/…`).
pub fn valid_check_path(path: &str) -> bool {
    path.starts_with('/') && path.parse::<Uri>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tcp_probe_tells_listening_from_closed_ports() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let timeout = Duration::from_secs(2);
        probe(&addr, None, &HealthCheckKind::Tcp, timeout)
            .await
            .unwrap();
        drop(listener);
        assert!(
            probe(&addr, None, &HealthCheckKind::Tcp, timeout)
                .await
                .is_err()
        );
    }

    /// A one-shot HTTP server answering every connection with `status`.
    async fn http_server(status: &'static str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = stream.read(&mut buf).await;
                let reply = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
                let _ = stream.write_all(reply.as_bytes()).await;
            }
        });
        addr
    }

    fn config(kind: HealthCheckKind) -> HealthConfig {
        HealthConfig {
            kind,
            interval: Duration::from_millis(20),
            timeout: Duration::from_millis(500),
            rise: 2,
            fall: 2,
            max_fails: 1,
            fail_timeout: Duration::from_millis(200),
        }
    }

    async fn eventually(mut condition: impl FnMut() -> bool) -> bool {
        for _ in 0..300 {
            if condition() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    #[tokio::test]
    async fn http_probe_wants_a_2xx() {
        let kind = HealthCheckKind::Http("/healthz".into());
        let timeout = Duration::from_secs(2);
        let ok = http_server("204 No Content").await;
        probe(&ok, None, &kind, timeout).await.unwrap();
        let failing = http_server("500 Internal Server Error").await;
        let error = probe(&failing, None, &kind, timeout).await.unwrap_err();
        assert!(
            matches!(error, ProbeError::Status(s) if s == 500),
            "{error}"
        );
    }

    #[tokio::test]
    async fn active_checks_apply_fall_and_rise() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let backend = Arc::new(Backend::new(0, "b", addr.to_string(), 1));
        let _checks = HealthChecks::start(
            std::slice::from_ref(&backend),
            &config(HealthCheckKind::Tcp),
        );
        drop(listener);
        assert!(
            eventually(|| !backend.is_up()).await,
            "down after `fall` failures"
        );
        let _listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        assert!(
            eventually(|| backend.is_up()).await,
            "up after `rise` successes"
        );
    }

    #[tokio::test]
    async fn passively_marked_backend_is_tried_again_after_fail_timeout() {
        let backend = Arc::new(Backend::new(0, "b", "127.0.0.1:1", 1));
        let config = config(HealthCheckKind::Off);
        let checks = HealthChecks::start(std::slice::from_ref(&backend), &config);
        let started = Instant::now();
        assert!(backend.report_failure(config.max_fails, config.fail_timeout));
        assert!(eventually(|| backend.is_up()).await);
        assert!(started.elapsed() >= config.fail_timeout);
        drop(checks);
        backend.report_failure(config.max_fails, config.fail_timeout);
        tokio::time::sleep(config.fail_timeout * 2).await;
        assert!(!backend.is_up(), "stopped checks bring nothing back");
    }

    #[test]
    fn check_paths_must_be_absolute() {
        assert!(valid_check_path("/healthz"));
        assert!(valid_check_path("/health?full=1"));
        assert!(!valid_check_path("healthz"));
        assert!(!valid_check_path("/bad path"));
    }
}
