//! `session-server`: the Stickless gRPC session server. `cargo run --release -p session-server`
//! serves on 127.0.0.1:50051 with the in-memory store; `--help` lists every setting.

use std::process::ExitCode;

use clap::Parser as _;
use session_server::config::{Cli, LogFormat, Settings};
use session_server::metrics::Metrics;
use session_server::server;
use tokio::net::TcpListener;

/// mimalloc instead of the system allocator: a gRPC call allocates a few dozen small blocks
/// (tonic, h2, the record), and glibc's malloc/free took about a tenth of the server's
/// instructions per call (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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

/// Resolves on the first SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received"),
        () = term => tracing::info!("SIGTERM received"),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let settings = match Settings::load(Cli::parse()) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("session-server: {error}");
            return ExitCode::from(2);
        }
    };
    init_logs(settings.log_format);
    match serve(settings).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "session-server failed");
            ExitCode::FAILURE
        }
    }
}

async fn serve(settings: Settings) -> Result<(), Box<dyn std::error::Error>> {
    let store = server::build_store(&settings).await?;
    let metrics = Metrics::new();
    let listener = TcpListener::bind(settings.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", settings.listen))?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };

    if let Some(address) = settings.metrics_listen {
        let listener = TcpListener::bind(address)
            .await
            .map_err(|e| format!("cannot listen for metrics on {address}: {e}"))?;
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
            server::run_sharded(listener, &settings, store, metrics, stop, threads).await
        }
    });
    tokio::select! {
        result = &mut grpc => return Ok(result??),
        () = shutdown_signal() => {}
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
