//! `session-server`: the Stickless gRPC session server. `cargo run --release -p session-server`
//! serves on 127.0.0.1:50051 with the in-memory store; `--help` lists every setting.
//!
//! Addresses: `--listen` and `--metrics-listen` take port 0 (`--listen 127.0.0.1:0`), and right
//! after each listener is bound the server prints one line to stdout, flushed at once:
//! `listening grpc <ip:port>`, then, with metrics on, `listening metrics <ip:port>`. Nothing
//! else goes to stdout (logs go to stderr), so whoever starts it (tests, the bench harness)
//! reads the real address instead of picking a free port and racing to bind it.
//!
//! TLS: with `--tls-cert` and `--tls-key` the gRPC port speaks only TLS. SIGHUP re-reads the
//! certificate, key and client CA files: new handshakes use them, established connections stay
//! up; files that do not make a valid configuration are refused (logged as an error) and the
//! previous one stays in use. Without TLS there is nothing to reload: SIGHUP is logged and
//! ignored (never the default action, which would kill the server; nginx and HAProxy operators
//! send it out of habit).
//!
//! Exit status: 0 after a clean stop on SIGINT/SIGTERM (also when in-flight calls are cut off at
//! the end of `--shutdown-grace`), 2 for a configuration error (message on stderr), TLS files
//! that cannot be read or used at start-up included, 1 when the server cannot start or fails
//! (a store it cannot set up, an address it cannot bind).
//!
//! `session-server healthcheck [--addr URL] …`: the health probe instead of the server (see
//! `session_server::healthcheck`): exit 0 when the server's `session.v1.SessionStore` is
//! SERVING, 1 otherwise, for Docker's `HEALTHCHECK` with no other tool in the image.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::{CommandFactory as _, FromArgMatches as _};
use session_server::config::{Cli, LogFormat, Settings};
use session_server::healthcheck;
use session_server::metrics::Metrics;
use session_server::server;
use session_server::tls::ServerTls;
use tokio::net::TcpListener;

/// mimalloc instead of the system allocator: a gRPC call allocates a few dozen small blocks
/// (tonic, h2, the record), and glibc's malloc/free took about a tenth of the server's
/// instructions per call (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Prints `listening <role> <address>` to stdout and flushes it, the address-reporting contract
/// (see the top of this file). A closed stdout is no reason to stop serving: the write's error
/// is only logged.
fn report_listening(role: &str, listener: &TcpListener) -> std::io::Result<SocketAddr> {
    use std::io::Write as _;
    let address = listener.local_addr()?;
    let mut stdout = std::io::stdout().lock();
    if let Err(error) = writeln!(stdout, "listening {role} {address}").and_then(|()| stdout.flush())
    {
        tracing::warn!(%error, role, "cannot report the listening address on stdout");
    }
    Ok(address)
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a person at a terminal, never in files or log collectors.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// A future that resolves on the first SIGINT or SIGTERM. The handlers are installed by this
/// call, not when the future is first polled: it is called before any listener is bound, so a
/// signal sent as soon as a `listening` line is read is a clean stop, never the default action
/// (death by the signal).
#[cfg(unix)]
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{Signal, SignalKind, signal};
    let listen = |kind: SignalKind, name: &'static str| {
        signal(kind)
            .inspect_err(|error| tracing::error!(%error, "cannot listen for {name}"))
            .ok()
    };
    async fn received(signal: Option<Signal>) {
        match signal {
            Some(mut signal) => {
                signal.recv().await;
            }
            None => std::future::pending().await,
        }
    }
    let interrupt = received(listen(SignalKind::interrupt(), "SIGINT"));
    let terminate = received(listen(SignalKind::terminate(), "SIGTERM"));
    async move {
        tokio::select! {
            () = interrupt => tracing::info!("SIGINT received"),
            () = terminate => tracing::info!("SIGTERM received"),
        }
    }
}

/// Reloads `tls` from its files on every SIGHUP (without TLS: logs that there is nothing to
/// reload), for as long as the process runs. The handler is installed by this call (before any
/// listener is bound, as for [`shutdown_signal`]), so a SIGHUP sent once the `listening` line
/// is out never kills the server.
#[cfg(unix)]
fn reload_on_sighup(tls: Option<ServerTls>) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(hangup) => hangup,
        Err(error) => {
            tracing::error!(%error, "cannot listen for SIGHUP: TLS files will not be reloaded");
            return;
        }
    };
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            let Some(tls) = &tls else {
                tracing::info!("SIGHUP: no TLS files to reload; ignored");
                continue;
            };
            let files = tls.files();
            // A few small files: read on this task, not worth a blocking thread.
            match tls.reload() {
                Ok(()) => tracing::info!(
                    cert = %files.cert.display(),
                    client_ca = ?files.client_ca,
                    "SIGHUP: TLS files reloaded; new connections use them"
                ),
                Err(error) => tracing::error!(
                    %error,
                    "SIGHUP: TLS files refused; still using the previous certificate"
                ),
            }
        }
    });
}

/// Without SIGHUP there is no reload.
#[cfg(not(unix))]
fn reload_on_sighup(_tls: Option<ServerTls>) {}

/// A future that resolves on the first Ctrl-C.
#[cfg(not(unix))]
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    async {
        match tokio::signal::ctrl_c().await {
            Ok(()) => tracing::info!("SIGINT received"),
            Err(error) => {
                tracing::error!(%error, "cannot listen for Ctrl-C");
                std::future::pending::<()>().await;
            }
        }
    }
}

fn main() -> ExitCode {
    // `session-server healthcheck …`: the probe, on a runtime of its own. The server's flags
    // take no positional argument, so this word never meant anything else.
    let mut args = std::env::args_os().skip(1).peekable();
    if args
        .peek()
        .is_some_and(|word| word == healthcheck::SUBCOMMAND)
    {
        return healthcheck::main(args);
    }
    run_server()
}

/// The server's flags, with `--help` naming the `healthcheck` subcommand.
fn parse_cli() -> Cli {
    let command = Cli::command().after_help(
        "Health probe: `session-server healthcheck [--addr URL]` exits 0 when the server is \
         SERVING, 1 otherwise (`session-server healthcheck --help`).",
    );
    Cli::from_arg_matches(&command.get_matches()).unwrap_or_else(|error| error.exit())
}

#[tokio::main]
async fn run_server() -> ExitCode {
    let settings = match Settings::load(parse_cli()) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("session-server: {error}");
            return ExitCode::from(2);
        }
    };
    let tls = match ServerTls::from_settings(&settings) {
        Ok(tls) => tls,
        Err(error) => {
            eprintln!("session-server: {error}");
            return ExitCode::from(2);
        }
    };
    init_logs(settings.log_format);
    match serve(settings, tls).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "session-server failed");
            ExitCode::FAILURE
        }
    }
}

async fn serve(
    settings: Settings,
    tls: Option<ServerTls>,
) -> Result<(), Box<dyn std::error::Error>> {
    let shutdown = shutdown_signal();
    reload_on_sighup(tls.clone());
    let store = server::build_store(&settings).await?;
    let metrics = Metrics::new();
    let listener = TcpListener::bind(settings.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", settings.listen))?;
    report_listening("grpc", &listener)?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };

    if let Some(address) = settings.metrics_listen {
        let listener = TcpListener::bind(address)
            .await
            .map_err(|e| format!("cannot listen for metrics on {address}: {e}"))?;
        let address = report_listening("metrics", &listener)?;
        tracing::info!(%address, "serving Prometheus metrics on /metrics");
        let (metrics, store, stop) = (metrics.clone(), store.clone(), stopped(stop_rx.clone()));
        tokio::spawn(async move {
            if let Err(error) = session_server::metrics::serve(listener, metrics, store, stop).await
            {
                tracing::error!(%error, "metrics listener failed");
            }
        });
    }

    let grace = settings.shutdown_grace;
    let mut grpc = tokio::spawn({
        let settings = settings.clone();
        let stop = stopped(stop_rx);
        async move {
            let threads = settings.serve_threads();
            server::run_with_tls(listener, &settings, store, metrics, stop, threads, tls).await
        }
    });
    tokio::select! {
        result = &mut grpc => return Ok(result??),
        () = shutdown => {}
    }
    let _ = stop_tx.send(true);
    match tokio::time::timeout(grace, &mut grpc).await {
        Ok(result) => Ok(result??),
        Err(_) => {
            tracing::warn!(
                ?grace,
                "calls still in flight after the shutdown grace period; exiting anyway"
            );
            grpc.abort();
            Ok(())
        }
    }
}
