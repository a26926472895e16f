//! `soak`: the proxy and the session server under hostile clients (issue 13). Starts a
//! session server (memory store, scoped tokens), two `demo-app --sessions proxy` backends and
//! `session-proxy` with the session-lookup plugin, all on port 0; measures honest traffic
//! alone, then the same traffic while slowloris connections, slow uploaders and a Watch flood
//! attack; prints a Markdown report and exits 1 when the honest error rate under attack is
//! above `--max-error-rate` or the proxy marked a backend down (2 when the soak could not run).
//!
//! ```sh
//! cargo run --release -p bench --bin soak                  # 60 s: 30 s baseline, 30 s attack
//! cargo run --release -p bench --bin soak -- --duration 10s --slowloris 20 --watchers 100
//! ```

// The report on stdout is this command's output.
#![allow(clippy::print_stdout)]

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use bench::Binaries;
use bench::soak::{self, SoakSettings};
use clap::Parser;

/// Flags of `soak`.
#[derive(Debug, Parser)]
#[command(
    name = "soak",
    about = "session-proxy and session-server under hostile clients: honest latency and errors \
             before and during slowloris, slow uploads and a Watch flood"
)]
struct Cli {
    /// Length of the whole soak: baseline plus attack.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Length of the baseline (honest traffic alone) [default: half of --duration]; the
    /// attack takes the rest.
    #[arg(long, value_parser = humantime::parse_duration)]
    baseline: Option<Duration>,
    /// Honest users, each one connection in a closed loop.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Slowloris connections kept open at once.
    #[arg(long, default_value_t = 200)]
    slowloris: usize,
    /// Pause between two bytes of a slowloris request head.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    slowloris_interval: Duration,
    /// Slow uploaders at once.
    #[arg(long, default_value_t = 50)]
    slow_uploaders: usize,
    /// Content-Length a slow uploader announces.
    #[arg(long, default_value_t = 1 << 20)]
    upload_bytes: u64,
    /// Pause between two bytes of a slow upload.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    upload_interval: Duration,
    /// Watch streams the flood tries to keep open on the honest users' namespace.
    #[arg(long, default_value_t = 2000)]
    watchers: usize,
    /// HTTP/2 connections the Watch flood uses.
    #[arg(long, default_value_t = 10)]
    watch_connections: usize,
    /// session-server --max-watchers-per-namespace.
    #[arg(long, default_value_t = 1000)]
    max_watchers_per_namespace: usize,
    /// session-proxy --header-read-timeout (what cuts slowloris).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    header_read_timeout: Duration,
    /// session-proxy --body-read-timeout (with --min-upload-rate, what cuts a slow upload);
    /// shorter than the proxy's 60 s so that uploads are cut within the attack phase.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    body_read_timeout: Duration,
    /// One more session-proxy flag, e.g. `--proxy-arg=--max-conns-per-ip=64` (repeatable).
    #[arg(long = "proxy-arg", value_name = "ARG", allow_hyphen_values = true)]
    proxy_args: Vec<String>,
    /// One more session-server flag (repeatable).
    #[arg(long = "server-arg", value_name = "ARG", allow_hyphen_values = true)]
    server_args: Vec<String>,
    /// Address the attackers connect from (any 127.x address on Linux); `none`: the
    /// system's choice, as the honest users.
    #[arg(long, default_value = "127.0.0.2")]
    attacker_ip: String,
    /// Honest error rate under attack, in percent, above which the soak fails.
    #[arg(long, default_value_t = 1.0)]
    max_error_rate: f64,
    /// Also write the report as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Keep the children's logs in this directory [default: a temporary directory, kept
    /// only when the soak fails].
    #[arg(long, value_name = "DIR")]
    logs: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,bench=info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("soak: cannot start the runtime: {error}");
            return ExitCode::from(2);
        }
    };
    runtime.block_on(async {
        tokio::select! {
            code = run(cli) => code,
            _ = tokio::signal::ctrl_c() => {
                // Dropping `run` drops the cluster, which kills every child.
                eprintln!("\nsoak: interrupted");
                ExitCode::from(130)
            }
        }
    })
}

async fn run(cli: Cli) -> ExitCode {
    match try_run(cli).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("soak: {error}");
            ExitCode::from(2)
        }
    }
}

async fn try_run(cli: Cli) -> Result<ExitCode, String> {
    let baseline = cli.baseline.unwrap_or(cli.duration / 2);
    let attack = cli
        .duration
        .checked_sub(baseline)
        .filter(|attack| !attack.is_zero())
        .ok_or("--baseline must be shorter than --duration")?;
    let attacker_ip = match cli.attacker_ip.as_str() {
        "none" => None,
        text => Some(
            text.parse::<IpAddr>()
                .map_err(|e| format!("--attacker-ip {text}: {e}"))?,
        ),
    };
    let bins = Binaries::locate().map_err(|e| e.to_string())?;
    // A temporary directory is removed when dropped, unless kept because the soak failed.
    let mut temp = None;
    let dir = match &cli.logs {
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            dir.clone()
        }
        None => {
            let made = tempfile::Builder::new()
                .prefix("stickless-soak-")
                .tempdir()
                .map_err(|e| format!("creating a directory for the logs: {e}"))?;
            let path = made.path().to_owned();
            temp = Some(made);
            path
        }
    };
    // The logs say why a soak failed or could not run.
    let keep_logs = |temp: Option<tempfile::TempDir>| {
        if let Some(temp) = temp {
            let _ = temp.keep();
        }
    };
    let mut settings = SoakSettings::new(bins, dir.clone());
    settings.baseline = baseline;
    settings.attack = attack;
    settings.concurrency = cli.concurrency;
    settings.slowloris = cli.slowloris;
    settings.slowloris_interval = cli.slowloris_interval;
    settings.slow_uploaders = cli.slow_uploaders;
    settings.upload_bytes = cli.upload_bytes;
    settings.upload_interval = cli.upload_interval;
    settings.watchers = cli.watchers;
    settings.watch_connections = cli.watch_connections;
    settings.max_watchers_per_namespace = cli.max_watchers_per_namespace;
    settings.header_read_timeout = cli.header_read_timeout;
    settings.body_read_timeout = cli.body_read_timeout;
    settings.proxy_args = cli.proxy_args;
    settings.server_args = cli.server_args;
    settings.attacker_ip = attacker_ip;
    settings.max_error_rate = cli.max_error_rate / 100.0;

    eprintln!(
        "soak: {} baseline, then {} under attack ({} slowloris, {} slow uploaders, {} \
         watchers); {} honest users; {} CPUs; logs in {}",
        humantime::format_duration(baseline),
        humantime::format_duration(attack),
        settings.slowloris,
        settings.slow_uploaders,
        settings.watchers,
        settings.concurrency,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        dir.display()
    );
    let report = match soak::run(&settings).await {
        Ok(report) => report,
        Err(error) => {
            keep_logs(temp);
            return Err(format!("{error} (logs in {})", dir.display()));
        }
    };
    println!("{}", report.markdown());
    if let Some(path) = &cli.json {
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if report.failures().is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        keep_logs(temp);
        eprintln!("soak: failed; logs in {}", dir.display());
        Ok(ExitCode::FAILURE)
    }
}
