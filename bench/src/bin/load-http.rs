//! `load-http`: HTTP throughput and latency through `session-proxy` to one fast in-process
//! backend; with `--vs-nginx` also through nginx as the same round-robin reverse proxy (same
//! worker count), printing both and the ratio; with `--lookup` session-proxy runs the
//! session-lookup plugin against a spawned `session-server` holding one session whose cookie
//! every request sends; with `--vs-pingora PATH` also through that build of the Pingora
//! prototype (bench/pingora-proto, its own workspace) as a third proxy, same backend and workers.
//!
//! ```sh
//! cargo build --release -p proxy-plugin -p session-server -p bench --bins
//! target/release/load-http --vs-nginx --connections 64 --duration 10s --runs 3
//! target/release/load-http --lookup --vs-nginx --connections 64 --duration 10s --runs 3
//! (cd bench/pingora-proto && cargo build --release)
//! target/release/load-http --vs-nginx --vs-pingora bench/pingora-proto/target/release/pingora-proto \
//!     --connections 64 --duration 10s --runs 3
//! ```
//!
//! Load comes from `wrk --latency` when installed, else from a built-in bounded loop.

#![allow(clippy::print_stdout)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use bench::load_http::{
    self, Backend, Driver, LoadResult, LoadSpec, Spawned, free_addr, median, wait_answering,
};
use clap::Parser;
use session_client::{ClientConfig, SessionClient};

/// Namespace of the benchmark's session.
const NAMESPACE: &str = "bench";

#[derive(Debug, Parser)]
#[command(about = "HTTP req/s and latency through session-proxy (and nginx), one fast backend")]
struct Cli {
    /// Also measure nginx as the same reverse proxy and print the ratio.
    #[arg(long)]
    vs_nginx: bool,
    /// Also measure this pingora-proto binary (bench/pingora-proto) as the same proxy.
    #[arg(long, value_name = "PATH")]
    vs_pingora: Option<PathBuf>,
    /// Run session-proxy with the session-lookup plugin (a session-server, one session).
    #[arg(long)]
    lookup: bool,
    /// With --lookup: session-proxy's lookup cache of N sessions (`--session-cache N`).
    #[arg(long, value_name = "N", requires = "lookup")]
    session_cache: Option<usize>,
    /// Open client connections.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Length of one measured run.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Unmeasured warm-up before the first run of each proxy.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Measured runs per proxy (alternating); medians are printed when more than one.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// session-proxy tokio worker threads and nginx worker_processes.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// wrk threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Use the built-in load loop even when wrk is installed.
    #[arg(long)]
    builtin: bool,
    /// Directory holding session-proxy and session-server [default: next to this program].
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

/// What one proxy under test is: its name in the output and its URL.
struct Target {
    name: &'static str,
    url: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("load-http: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), String> {
    if cli.connections == 0 || cli.runs == 0 || cli.workers == 0 {
        return Err("--connections, --runs and --workers must be at least 1".into());
    }
    let bin_dir = match &cli.bin_dir {
        Some(dir) => dir.clone(),
        None => std::env::current_exe()
            .map_err(|e| format!("cannot find this program: {e}"))?
            .parent()
            .ok_or("this program has no directory")?
            .to_owned(),
    };
    let binary = |name: &str| -> Result<PathBuf, String> {
        let path = bin_dir.join(name);
        if path.is_file() {
            Ok(path)
        } else {
            Err(format!(
                "{} missing; build it: cargo build --release -p proxy-plugin -p session-server \
                 -p bench --bins",
                path.display()
            ))
        }
    };
    let driver = if !cli.builtin && load_http::wrk_available() {
        Driver::Wrk
    } else {
        Driver::Builtin
    };
    let workdir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
    let backend = Backend::start()
        .await
        .map_err(|e| format!("backend: {e}"))?;

    // Kept alive until the end: dropping them stops the processes.
    let mut processes: Vec<Spawned> = Vec::new();
    let mut cookie = None;
    let lookup_url = if cli.lookup {
        let (server, addr) =
            load_http::start_session_server(&binary("session-server")?, workdir.path())?;
        processes.push(server);
        let url = format!("http://{addr}");
        let mut config = ClientConfig::new(url.clone());
        config.namespace = NAMESPACE.to_owned();
        let client = SessionClient::connect_lazy(config).map_err(|e| e.to_string())?;
        let attrs = HashMap::from([("cart".to_owned(), b"[1,2,3]".to_vec())]);
        let session = client
            .create("load-http-user", attrs, Some(Duration::from_secs(3600)))
            .await
            .map_err(|e| format!("creating the session: {e}"))?;
        cookie = Some(format!("sid={}", session.id));
        Some(url)
    } else {
        None
    };

    let (proxy, proxy_listen) = load_http::start_session_proxy(
        &binary("session-proxy")?,
        backend.addr,
        cli.workers,
        lookup_url.as_deref().map(|url| (url, NAMESPACE)),
        &cli.session_cache
            .map(|n| vec!["--session-cache".to_owned(), n.to_string()])
            .unwrap_or_default(),
        workdir.path(),
    )?;
    processes.push(proxy);
    let mut targets = vec![Target {
        name: if cli.lookup {
            "session-proxy + lookup"
        } else {
            "session-proxy"
        },
        url: format!("http://{proxy_listen}/"),
    }];
    if cli.vs_nginx {
        let listen = free_addr().map_err(|e| e.to_string())?;
        processes.push(load_http::start_nginx(
            backend.addr,
            listen,
            cli.workers,
            &workdir.path().join("nginx"),
        )?);
        targets.push(Target {
            name: "nginx",
            url: format!("http://{listen}/"),
        });
    }
    if let Some(binary) = &cli.vs_pingora {
        let listen = free_addr().map_err(|e| e.to_string())?;
        let mut command = std::process::Command::new(binary);
        command
            .arg("--listen")
            .arg(listen.to_string())
            .arg("--backend")
            .arg(backend.addr.to_string())
            .arg("--threads")
            .arg(cli.workers.to_string());
        let log = workdir.path().join("pingora-proto.log");
        let mut proc = Spawned::spawn("pingora-proto", &mut command, &log)?;
        proc.wait_accepting(listen)?;
        processes.push(proc);
        targets.push(Target {
            name: "pingora-proto",
            url: format!("http://{listen}/"),
        });
    }
    for target in &targets {
        wait_answering(&target.url, cookie.as_deref()).await?;
    }

    println!(
        "load-http: driver {driver}, {} connections, {:?} a run, {} run(s), {} workers, \
         {} CPUs{}",
        cli.connections,
        cli.duration,
        cli.runs,
        cli.workers,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        if cli.lookup {
            ", session lookup on"
        } else {
            ""
        }
    );
    let spec = |target: &Target, duration| LoadSpec {
        url: target.url.clone(),
        connections: cli.connections,
        threads: cli.threads,
        duration,
        cookie: cookie.clone(),
    };
    if !cli.warmup.is_zero() {
        for target in &targets {
            load(driver, &spec(target, cli.warmup)).await?;
        }
    }
    let mut results: Vec<Vec<LoadResult>> = vec![Vec::new(); targets.len()];
    for run in 1..=cli.runs {
        for (target, results) in targets.iter().zip(&mut results) {
            let before = backend.counts();
            let result = load(driver, &spec(target, cli.duration)).await?;
            let after = backend.counts();
            let (answered, with_session) = (after.0 - before.0, after.1 - before.1);
            let session_note = if cli.lookup {
                format!(
                    ", {:.1}% of backend requests had x-session-user",
                    100.0 * with_session as f64 / answered.max(1) as f64
                )
            } else {
                String::new()
            };
            println!(
                "run {run} {:<24} {:>10.0} req/s  p50 {:>7.3} ms  p90 {:>7.3} ms  p99 {:>7.3} ms  \
                 {} requests, {} errors{session_note}",
                target.name,
                result.requests_per_sec,
                result.p50_ms,
                result.p90_ms,
                result.p99_ms,
                result.requests,
                result.errors,
            );
            results.push(result);
        }
    }

    let medians: Vec<(f64, f64, f64)> = results
        .iter()
        .map(|runs| {
            let of = |f: fn(&LoadResult) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
            (
                of(|r| r.requests_per_sec),
                of(|r| r.p50_ms),
                of(|r| r.p99_ms),
            )
        })
        .collect();
    for (target, (rps, p50, p99)) in targets.iter().zip(&medians) {
        println!(
            "median {:<24} {rps:>10.0} req/s  p50 {p50:>7.3} ms  p99 {p99:>7.3} ms",
            target.name
        );
    }
    if let Some(nginx) = targets.iter().position(|target| target.name == "nginx") {
        let (nginx_rps, _, nginx_p99) = medians[nginx];
        for (index, (target, (rps, _, p99))) in targets.iter().zip(&medians).enumerate() {
            if index == nginx {
                continue;
            }
            // The goals (issue 16) are session-proxy's (the first target's); the others are
            // for comparison.
            let (goal, p99_goal) = match (index, cli.lookup, cli.session_cache) {
                (0, true, Some(n)) if n > 0 => (" (target >= 0.6x)", " (target <= 1.5x)"),
                (0, true, _) => (" (target >= 0.35x)", ""),
                (0, false, _) => (" (target >= 0.9x)", ""),
                _ => ("", ""),
            };
            println!(
                "ratio {} / nginx: req/s {:.2}x{goal}, p99 {:.2}x{p99_goal} (nginx = 1)",
                target.name,
                rps / nginx_rps,
                p99 / nginx_p99
            );
        }
    }
    for process in &processes {
        if let Some(name) = process.log.file_name() {
            tracing::debug!(log = ?Path::new(name), "process log");
        }
    }
    drop(processes);
    Ok(())
}

async fn load(driver: Driver, spec: &LoadSpec) -> Result<LoadResult, String> {
    match driver {
        Driver::Wrk => load_http::run_wrk(spec).await,
        Driver::Builtin => load_http::run_builtin(spec).await,
    }
}
