//! `session-proxy`: the Stickless reverse proxy.
//!
//! `session-proxy --backend http://127.0.0.1:8081 --backend http://127.0.0.1:8082` balances
//! round-robin on 127.0.0.1:8080; `--help` lists every setting. A configuration it cannot use
//! exits with status 2 and the reason on stderr. SIGHUP re-reads the `--config` file (same
//! flags) and applies it without dropping connections; a bad file is logged and the running
//! configuration kept. SIGINT or SIGTERM stops accepting, lets requests in flight finish (up
//! to 30 s), and exits 0.
//!
//! With `--tls-cert` and `--tls-key` the listener serves HTTPS (ALPN `h2` and `http/1.1`); each
//! SIGHUP also re-reads those two files: new connections get the new certificate, open ones
//! keep theirs, and files that cannot be used are logged and the certificate in use kept.
//!
//! Right after each listener is bound, one line goes to stdout (flushed at once), so whoever
//! started it with port 0 (`--listen 127.0.0.1:0`) learns the address: `listening proxy
//! <ip:port>` and, with `--admin-listen`, `listening admin <ip:port>`. Nothing else is written to
//! stdout; logs go to stderr.

use std::io::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser as _;
use proxy_plugin::admin::serve_admin;
use proxy_plugin::config::{self, Cli, ProxyConfig, TlsConfig};
use proxy_plugin::proxy::Proxy;
use proxy_plugin::tls::ListenerTls;
use tokio::net::TcpListener;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::watch;

/// mimalloc instead of the system allocator: every proxied request allocates header maps,
/// futures and buffers, and with a session lookup a gRPC call's worth more; glibc's
/// malloc/free took about a fifth of the proxy's instructions per request with lookup
/// (bench/results/load-http.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Time requests in flight get to finish after SIGINT/SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a person at a terminal, never in files or log collectors.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .init();
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs();
    let config = match config::load(cli.clone()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("session-proxy: {error}");
            return ExitCode::from(2);
        }
    };
    let tls = match config.tls.as_ref().map(ListenerTls::load).transpose() {
        Ok(tls) => tls,
        Err(error) => {
            eprintln!("session-proxy: {error}");
            return ExitCode::from(2);
        }
    };
    let proxy = match Proxy::new(config.clone()) {
        Ok(proxy) => proxy,
        Err(error) => {
            eprintln!("session-proxy: {error}");
            return ExitCode::from(2);
        }
    };
    match run(cli, config, proxy, tls).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "session-proxy failed");
            ExitCode::FAILURE
        }
    }
}

async fn run(
    cli: Cli,
    config: ProxyConfig,
    proxy: Arc<Proxy>,
    tls: Option<ListenerTls>,
) -> Result<(), Box<dyn std::error::Error>> {
    // Signal handlers first: a SIGHUP that arrives once we listen must not kill the process.
    let hangup = signal(SignalKind::hangup())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;

    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    let proxy_address = listener.local_addr()?;
    announce("proxy", proxy_address);
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };

    let mut admin = None;
    if let Some(address) = config.admin_listen {
        let admin_listener = TcpListener::bind(address)
            .await
            .map_err(|e| format!("cannot listen for the admin API on {address}: {e}"))?;
        let address = admin_listener.local_addr()?;
        announce("admin", address);
        tracing::info!(%address, "admin API listening");
        admin = Some(tokio::spawn(serve_admin(
            admin_listener,
            proxy.clone(),
            stopped(stop_rx.clone()),
        )));
    }
    tracing::info!(
        address = %proxy_address,
        tls = tls.is_some(),
        backends = config.backends.len(),
        balance = config.balance.name(),
        "proxy listening"
    );
    let reloads = tokio::spawn(reload_on_hangup(
        hangup,
        cli,
        config,
        proxy.clone(),
        tls.clone(),
    ));

    let mut serving = match tls {
        Some(tls) => tokio::spawn(proxy.serve_tls(listener, tls, stopped(stop_rx))),
        None => tokio::spawn(proxy.serve(listener, stopped(stop_rx))),
    };
    tokio::select! {
        result = &mut serving => {
            reloads.abort();
            return Ok(result??);
        }
        _ = interrupt.recv() => tracing::info!("SIGINT received: shutting down"),
        _ = terminate.recv() => tracing::info!("SIGTERM received: shutting down"),
    }
    reloads.abort();
    let _ = stop_tx.send(true);
    tokio::select! {
        finished = tokio::time::timeout(SHUTDOWN_GRACE, &mut serving) => match finished {
            Ok(result) => result??,
            Err(_) => tracing::warn!(
                grace = ?SHUTDOWN_GRACE,
                "requests still in flight after the shutdown grace period; exiting anyway"
            ),
        },
        _ = interrupt.recv() => tracing::warn!("second SIGINT: exiting now"),
        _ = terminate.recv() => tracing::warn!("second SIGTERM: exiting now"),
    }
    if let Some(admin) = admin {
        // The admin listener stops on the same signal and bounds its own drain.
        let _ = admin.await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// Tells whoever started the process where a listener is bound (the address-reporting contract
/// every Stickless binary follows): `listening <role> <ip:port>` on stdout, flushed at once. A
/// stdout nobody reads (closed pipe) is no reason to stop serving: the failure is logged.
fn announce(role: &str, address: SocketAddr) {
    let mut stdout = std::io::stdout().lock();
    if let Err(error) = writeln!(stdout, "listening {role} {address}").and_then(|()| stdout.flush())
    {
        tracing::warn!(%error, role, %address, "cannot report the bound address on stdout");
    }
}

/// On each SIGHUP: re-reads the file with the same flags and hands the result to the proxy,
/// then re-reads the listener's certificate and key (whether or not the configuration was
/// taken). A configuration or certificate that is refused is logged and the running one kept;
/// the process never exits over a reload.
async fn reload_on_hangup(
    mut hangup: Signal,
    cli: Cli,
    running: ProxyConfig,
    proxy: Arc<Proxy>,
    tls: Option<ListenerTls>,
) {
    let mut running = running;
    while hangup.recv().await.is_some() {
        tracing::info!(file = ?cli.config, "SIGHUP received: reloading the configuration");
        reload_configuration(&cli, &mut running, &proxy).await;
        if let (Some(tls), Some(files)) = (&tls, &running.tls) {
            reload_certificate(tls, files).await;
        }
    }
}

/// Re-reads the certificate and key files of the listener; new handshakes use them, or, when
/// they cannot be used, still the certificate in use (logged).
async fn reload_certificate(tls: &ListenerTls, files: &TlsConfig) {
    let (tls, files) = (tls.clone(), files.clone());
    let cert = files.cert.clone();
    match tokio::task::spawn_blocking(move || tls.reload(&files)).await {
        Ok(Ok(())) => tracing::info!(cert = %cert.display(), "TLS certificate reloaded"),
        Ok(Err(error)) => tracing::error!(%error,
            "TLS certificate reload refused; keeping the certificate in use"),
        Err(error) => tracing::error!(%error,
            "TLS certificate reload failed; keeping the certificate in use"),
    }
}

/// One configuration reload: `running` becomes the new configuration when the proxy takes it.
async fn reload_configuration(cli: &Cli, running: &mut ProxyConfig, proxy: &Proxy) {
    let flags = cli.clone();
    let next = match tokio::task::spawn_blocking(move || config::load(flags)).await {
        Ok(Ok(next)) => next,
        Ok(Err(error)) => {
            tracing::error!(%error, "reload refused; keeping the running configuration");
            return;
        }
        Err(error) => {
            tracing::error!(%error, "reload failed; keeping the running configuration");
            return;
        }
    };
    // The proxy keeps what only a restart changes (the bound listeners, HTTP or HTTPS) and
    // warns; what it runs is `next` less those.
    match proxy.reload(next) {
        Ok(()) => {
            let applied = proxy.config();
            if applied == *running {
                tracing::info!("configuration unchanged");
            }
            tracing::info!(backends = applied.backends.len(), "configuration reloaded");
            *running = applied;
        }
        Err(error) => {
            tracing::error!(%error, "reload refused; keeping the running configuration");
        }
    }
}
