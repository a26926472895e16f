//! `compare`: runs every scenario for every routing mode on a loopback cluster of the
//! project's own binaries and prints two Markdown tables: the summary (one line per mode: the
//! users sent back to log in, the requests answered "please log in", the cart items lost), then
//! every measure of every run (load spread, latency, errors too; `--json`, `--svg` for files).
//!
//! `cargo run --release -p bench --bin compare` runs the default matrix (6 modes × 9
//! scenarios, 20 users for 2 s each) in about three minutes on two cores. The scenarios with
//! two session servers need `redis-server` (a private Redis, or a primary, a replica and a
//! Sentinel); without it they are skipped with a message.

// The table on stdout is this command's output.
#![allow(clippy::print_stdout)]

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use bench::{Binaries, Mode, Progress, RunSettings, Scenario, StoreChoice, external, report, svg};
use clap::{Parser, ValueEnum};

/// The session server's store.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum StoreKind {
    /// Embedded, in memory (lost when the server restarts).
    Memory,
    /// Standalone Redis (`--redis-url`).
    Redis,
    /// Redis Cluster (`--redis-url` with comma-separated seed nodes).
    RedisCluster,
    /// MySQL/MariaDB (`--mysql-url`).
    Mysql,
}

/// Flags of `compare`.
#[derive(Debug, Parser)]
#[command(
    name = "compare",
    about = "Stickless comparison harness: routing modes × failure scenarios, measured"
)]
struct Cli {
    /// Modes to run, comma-separated [default: rr-local,ip-hash,sticky-cookie,rr-store,
    /// rr-store-fallback,proxy-lookup].
    #[arg(long, value_delimiter = ',')]
    modes: Vec<Mode>,
    /// Scenarios to run, comma-separated [default: steady,backend-dies,scale-out,
    /// rolling-restart,middle-proxy,nat,store-outage,session-server-dies,store-failover].
    #[arg(long, value_delimiter = ',')]
    scenarios: Vec<Scenario>,
    /// Simulated users per run.
    #[arg(long, default_value_t = 20)]
    users: usize,
    /// Length of each run.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Mean think time between two requests of one user.
    #[arg(long, default_value = "25ms", value_parser = humantime::parse_duration)]
    think: Duration,
    /// Most requests of one user in one run.
    #[arg(long, default_value_t = 1000)]
    max_requests: usize,
    /// The session server's store.
    #[arg(long, value_enum, default_value = "memory")]
    store: StoreKind,
    /// Redis URL (`--store redis`), or comma-separated seed nodes (`--store redis-cluster`).
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// MySQL/MariaDB URL (`--store mysql`).
    #[arg(long, default_value = "mysql://root@127.0.0.1:3306/test")]
    mysql_url: String,
    /// Also write the rows as a JSON array to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Also draw the charts (users sent to log in, session loss, load spread) to this SVG file.
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
    /// Also run nginx (ip_hash, cookie hash) in front of local-session backends.
    #[arg(long)]
    against_nginx: bool,
    /// Also run HAProxy (balance source, cookie insert) in front of local-session backends.
    #[arg(long)]
    against_haproxy: bool,
    /// Keep the children's logs in this directory [default: a temporary directory, kept
    /// only when a run fails].
    #[arg(long, value_name = "DIR")]
    logs: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("compare: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        tokio::select! {
            code = run(cli) => code,
            _ = tokio::signal::ctrl_c() => {
                // Dropping `run` drops the cluster, which kills every child.
                eprintln!("\ncompare: interrupted");
                ExitCode::from(130)
            }
        }
    })
}

/// The modes to run: the chosen (or default) ones, plus the external ones asked for and
/// installed.
fn modes(cli: &Cli) -> Vec<Mode> {
    let mut modes = if cli.modes.is_empty() {
        Mode::OWN.to_vec()
    } else {
        cli.modes.clone()
    };
    let mut external: Vec<Mode> = Vec::new();
    if cli.against_nginx {
        external.extend(Mode::NGINX);
    }
    if cli.against_haproxy {
        external.extend(Mode::HAPROXY);
    }
    for mode in external {
        if !modes.contains(&mode) {
            modes.push(mode);
        }
    }
    modes.retain(|mode| match mode {
        Mode::External(kind) => match external::available(*kind) {
            Ok(_) => true,
            Err(why) => {
                eprintln!("compare: skipping {mode}: {why}");
                false
            }
        },
        _ => true,
    });
    modes
}

async fn run(cli: Cli) -> ExitCode {
    let started = Instant::now();
    let modes = modes(&cli);
    let scenarios = if cli.scenarios.is_empty() {
        Scenario::ALL.to_vec()
    } else {
        cli.scenarios.clone()
    };
    let store = store_choice(&cli);
    let scenarios = runnable(scenarios, &store);
    if modes.is_empty() || scenarios.is_empty() {
        eprintln!("compare: nothing to run");
        return ExitCode::from(2);
    }
    let bins = match tokio::task::spawn_blocking(Binaries::locate).await {
        Ok(Ok(bins)) => bins,
        Ok(Err(error)) => {
            eprintln!("compare: {error}");
            return ExitCode::FAILURE;
        }
        Err(error) => {
            eprintln!("compare: {error}");
            return ExitCode::FAILURE;
        }
    };
    if modes.contains(&Mode::ProxyLookup) && !bins.proxy_snapshot_key {
        eprintln!(
            "compare: this session-proxy has no --session-snapshot-key: proxy-lookup runs \
             without the proxy's snapshot fallback (store outages will log users out)"
        );
    }
    let temp = match &cli.logs {
        Some(_) => None,
        None => match tempfile::Builder::new()
            .prefix("stickless-bench-")
            .tempdir()
        {
            Ok(dir) => Some(dir),
            Err(error) => {
                eprintln!("compare: cannot make a temporary directory: {error}");
                return ExitCode::FAILURE;
            }
        },
    };
    let dir = match (&cli.logs, &temp) {
        (Some(dir), _) => dir.clone(),
        (None, Some(temp)) => temp.path().to_owned(),
        (None, None) => std::env::temp_dir(),
    };
    let mut settings = RunSettings::new(bins, dir.clone(), cli.users, cli.duration);
    settings.think = cli.think;
    settings.max_requests = cli.max_requests;
    settings.store = store;
    let interactive = std::io::stderr().is_terminal();
    let rows = bench::run_matrix(&settings, &modes, &scenarios, |p| {
        progress_line(p, started, interactive)
    })
    .await;
    let rows = match rows {
        Ok(rows) => rows,
        Err(error) => {
            eprintln!("\ncompare: {error}");
            if let Some(temp) = temp {
                eprintln!(
                    "compare: the processes' logs are in {}",
                    temp.keep().display()
                );
            } else {
                eprintln!("compare: the processes' logs are in {}", dir.display());
            }
            return ExitCode::FAILURE;
        }
    };
    println!(
        "Store: {}{}; {} users × {:?} per run; {} runs in {:.0?}\n",
        settings.store.name(),
        own_stores(&scenarios, &settings.store),
        settings.users,
        settings.duration,
        rows.len(),
        started.elapsed()
    );
    println!("{}\n", report::SUMMARY_LEGEND);
    println!("{}", report::summary(&rows));
    print!("{}", report::markdown(&rows));
    let mut code = ExitCode::SUCCESS;
    if let Some(path) = &cli.json
        && let Err(error) = std::fs::write(path, report::json(&rows))
    {
        eprintln!("compare: cannot write {}: {error}", path.display());
        code = ExitCode::FAILURE;
    }
    if let Some(path) = &cli.svg
        && let Err(error) = svg::write(path, &rows)
    {
        eprintln!("compare: {error}");
        code = ExitCode::FAILURE;
    }
    code
}

/// The run's store, from the flags.
fn store_choice(cli: &Cli) -> StoreChoice {
    match cli.store {
        StoreKind::Memory => StoreChoice::Memory,
        StoreKind::Redis => StoreChoice::Redis(cli.redis_url.clone()),
        StoreKind::RedisCluster => StoreChoice::RedisCluster(cli.redis_url.clone()),
        StoreKind::Mysql => StoreChoice::Mysql(cli.mysql_url.clone()),
    }
}

/// The scenarios that can run here: those that start a Redis of their own are skipped, with a
/// message, when `redis-server` is missing; the ones that do start one say so.
fn runnable(mut scenarios: Vec<Scenario>, store: &StoreChoice) -> Vec<Scenario> {
    let redis = bench::cluster::redis::redis_server();
    scenarios.retain(|scenario| {
        if !scenario.needs_redis_server(store) {
            return true;
        }
        match &redis {
            Ok(_) if *scenario == Scenario::SessionServerDies => {
                eprintln!(
                    "compare: {scenario}: two session servers cannot share the memory store; \
                     they run on a private Redis this harness starts"
                );
                true
            }
            Ok(_) => true,
            Err(why) => {
                eprintln!("compare: skipping {scenario}: {why}");
                false
            }
        }
    });
    scenarios
}

/// What the scenarios that run on a store of their own run on, for the header line.
fn own_stores(scenarios: &[Scenario], store: &StoreChoice) -> String {
    let mut notes = Vec::new();
    for &scenario in scenarios {
        if !scenario.needs_redis_server(store) {
            continue;
        }
        notes.push(match scenario {
            Scenario::StoreFailover => {
                format!("{scenario} on a Redis primary + replica + Sentinel of its own")
            }
            _ => format!(
                "{scenario} on a Redis of its own, as two servers cannot share the memory store"
            ),
        });
    }
    if notes.is_empty() {
        String::new()
    } else {
        format!(" ({})", notes.join("; "))
    }
}

/// One progress line on stderr: rewritten in place at a terminal, one line per run otherwise.
fn progress_line(progress: Progress<'_>, started: Instant, interactive: bool) {
    let elapsed = started.elapsed().as_secs();
    let last = progress
        .last
        .map(|r| {
            format!(
                "  (last: {} / {}: {:.0}% users sent to log in, loss {:.1}% of requests, \
                 lost writes {}, {} errors)",
                r.mode,
                r.scenario,
                r.users_sent_to_login * 100.0,
                r.session_loss * 100.0,
                r.lost_writes,
                r.errors
            )
        })
        .unwrap_or_default();
    let line = match progress.next {
        Some((mode, scenario)) => format!(
            "[{:>2}/{}] {elapsed:>3}s running {mode} / {scenario}{last}",
            progress.done + 1,
            progress.total
        ),
        None => format!(
            "[{}/{}] {elapsed:>3}s done{last}",
            progress.done, progress.total
        ),
    };
    if interactive {
        eprint!("\r\x1b[2K{line}");
        if progress.next.is_none() {
            eprintln!();
        }
    } else {
        eprintln!("{line}");
    }
}
