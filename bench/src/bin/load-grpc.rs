//! `load-grpc`: drives a session server with a mix of gRPC calls and reports ops/s, latency
//! percentiles (HDR histogram, microseconds) and errors by code; optionally runs
//! `redis-benchmark` afterwards as a raw-Redis baseline and prints the ratio.
//!
//! ```sh
//! target/release/load-grpc --spawn --mix get=100 --concurrency 32 --duration 10s \
//!     --vs-redis redis://127.0.0.1:6379
//! ```
//!
//! Client and server share the machine: the numbers are for the pair, not the server alone.

#![allow(clippy::print_stdout)]

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use bench::load_grpc::{self, Limit, LoadSettings, Mix};
use clap::{Parser, ValueEnum};

/// How long a spawned server gets to accept connections (a release build starts in well under
/// a second; a cold Redis pool may take a little longer).
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// Drive a Stickless session server with gRPC load and report throughput and latency.
#[derive(Debug, Parser)]
#[command(name = "load-grpc", version)]
struct Cli {
    /// Server to drive (ignored with --spawn).
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    target: String,
    /// Start `session-server` (next to this executable) on a free port, and stop it after.
    #[arg(long)]
    spawn: bool,
    /// Store of the spawned server.
    #[arg(long, value_enum, default_value_t = Store::Memory)]
    store: Store,
    /// Redis of the spawned server's `--store redis` [default: --vs-redis, else
    /// redis://127.0.0.1:6379].
    #[arg(long)]
    redis_url: Option<String>,
    /// The `session-server` binary to spawn [default: next to this executable].
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Op weights (ops: get, touch, update, create).
    #[arg(long, default_value = "get=80,touch=10,update=8,create=2")]
    mix: Mix,
    /// Calls in flight at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Tonic channels (HTTP/2 connections) shared by the callers.
    #[arg(long, default_value_t = 2)]
    connections: usize,
    /// How long to run (e.g. 10s); the default when --count is not given.
    #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "count")]
    duration: Option<Duration>,
    /// Stop after this many calls instead of after a duration.
    #[arg(long)]
    count: Option<u64>,
    /// Size of each session's one attribute, in bytes.
    #[arg(long, default_value_t = 200)]
    session_bytes: usize,
    /// Sessions pre-created for get, touch and update.
    #[arg(long, default_value_t = 10_000)]
    pool: usize,
    /// Total calls per second to aim for (latency then counts from each call's scheduled
    /// start); flat out when unset.
    #[arg(long)]
    rate: Option<f64>,
    /// Threads running the callers, each an event loop (a single-threaded runtime) with its
    /// share of the connections and callers, as wrk's threads; 0 runs them as tasks on one
    /// work-stealing runtime (the generator's mode before 2026-11-26 evening) [default: the
    /// number of CPUs]
    #[arg(long)]
    client_threads: Option<usize>,
    /// After the load, run `redis-benchmark` against this Redis for a baseline.
    #[arg(long)]
    vs_redis: Option<String>,
    /// Measure staleness instead of throughput: write through one server (`--target`, or the
    /// first spawned), read through another (`--read-target`, or a second spawned on the same
    /// store), and count reads older than the caller's acknowledged write (`--count` trials,
    /// default 10 000, over `--concurrency` sessions).
    #[arg(long)]
    staleness: bool,
    /// The server reads go through with `--staleness` (ignored with --spawn).
    #[arg(long, default_value = "http://127.0.0.1:50052")]
    read_target: String,
    /// With `--staleness`: reads are plain Gets instead of Gets that touch.
    #[arg(long)]
    no_touch: bool,
    /// `--cache-capacity` of the spawned servers with `--store redis` (their near cache of
    /// sessions; 0 is off) [default: the server's, 0].
    #[arg(long)]
    cache_capacity: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Store {
    Memory,
    Redis,
}

/// A spawned `session-server`, killed on drop.
struct Spawned {
    /// The process.
    child: Child,
    /// Its stderr and stdout, kept until it is stopped, shown when it fails to start.
    log: tempfile::NamedTempFile,
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_addr() -> std::io::Result<SocketAddr> {
    TcpListener::bind("127.0.0.1:0")?.local_addr()
}

fn server_bin(cli: &Cli) -> Result<PathBuf, String> {
    if let Some(path) = &cli.server_bin {
        return Ok(path.clone());
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
    let path = exe.with_file_name("session-server");
    if path.exists() {
        Ok(path)
    } else {
        Err(format!(
            "{} is missing; build it with `cargo build --release -p session-server` or pass \
             --server-bin",
            path.display()
        ))
    }
}

fn spawn_server(cli: &Cli) -> Result<(Spawned, SocketAddr), String> {
    let bin = server_bin(cli)?;
    let addr = free_addr().map_err(|e| format!("cannot find a free port: {e}"))?;
    let log = tempfile::NamedTempFile::new().map_err(|e| format!("cannot make a log: {e}"))?;
    let out = log
        .reopen()
        .map_err(|e| format!("cannot open the log: {e}"))?;
    let err = log
        .reopen()
        .map_err(|e| format!("cannot open the log: {e}"))?;
    let mut command = Command::new(&bin);
    command.args(["--listen", &addr.to_string()]);
    match cli.store {
        Store::Memory => command.args(["--store", "memory"]),
        Store::Redis => {
            let url = cli
                .redis_url
                .clone()
                .or_else(|| cli.vs_redis.clone())
                .unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned());
            // A prefix of its own, so the run neither reads nor clobbers anyone's sessions.
            let prefix = format!("stickless-load-{}", std::process::id());
            command.args([
                "--store",
                "redis",
                "--redis-url",
                &url,
                "--redis-prefix",
                &prefix,
            ]);
            if let Some(capacity) = cli.cache_capacity {
                command.args(["--cache-capacity", &capacity.to_string()]);
            }
            &mut command
        }
    };
    let child = command
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
    let mut spawned = Spawned { child, log };
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Ok((spawned, addr));
        }
        let exited = spawned.child.try_wait().ok().flatten();
        if exited.is_some() || Instant::now() >= deadline {
            let log = std::fs::read_to_string(spawned.log.path()).unwrap_or_default();
            let why = exited.map_or(format!("not listening within {START_TIMEOUT:?}"), |s| {
                format!("exited ({s})")
            });
            return Err(format!("session-server {why}:\n{log}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `--staleness`: two servers on one store, writes through one and reads through the other.
async fn staleness(cli: Cli) -> Result<(), String> {
    if cli.spawn && cli.store == Store::Memory {
        return Err("--staleness needs two servers on one store: --store redis".into());
    }
    let mut spawned = Vec::new();
    let (writer, reader) = if cli.spawn {
        for _ in 0..2 {
            let (server, addr) = spawn_server(&cli)?;
            spawned.push((server, addr));
        }
        println!(
            "load-grpc: spawned two session-servers on one Redis: writes through {}, reads \
             through {}",
            spawned[0].1, spawned[1].1
        );
        (
            format!("http://{}", spawned[0].1),
            format!("http://{}", spawned[1].1),
        )
    } else {
        (cli.target.clone(), cli.read_target.clone())
    };
    let settings = bench::staleness::StalenessSettings {
        writer,
        reader,
        sessions: cli.concurrency.max(1),
        trials: cli.count.unwrap_or(10_000),
        touch: !cli.no_touch,
        catch_up_within: Duration::from_secs(5),
    };
    let report = bench::staleness::run(&settings)
        .await
        .map_err(|e| e.to_string())?;
    println!("{report}");
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("load-grpc: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("load-grpc: {error}");
            ExitCode::FAILURE
        }
    }
}

/// CPU time (user + system, in clock ticks of 10 ms) a process has used so far, from
/// `/proc/<pid>/stat`; `None` where there is no such file.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count fields after its closing parenthesis,
    // where utime and stime are the 12th and 13th.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(user + system)
}

async fn run(cli: Cli) -> Result<(), String> {
    if cli.staleness {
        return staleness(cli).await;
    }
    let (server, target) = if cli.spawn {
        let (server, addr) = spawn_server(&cli)?;
        let store = match cli.store {
            Store::Memory => "memory",
            Store::Redis => "redis",
        };
        println!("load-grpc: spawned session-server on {addr} (store {store})");
        (Some(server), format!("http://{addr}"))
    } else {
        (None, cli.target.clone())
    };
    let duration = cli.duration.unwrap_or(Duration::from_secs(10));
    let settings = LoadSettings {
        target,
        mix: cli.mix.clone(),
        concurrency: cli.concurrency.max(1),
        connections: cli.connections.max(1),
        limit: cli.count.map_or(Limit::Duration(duration), Limit::Count),
        session_bytes: cli.session_bytes,
        pool: cli.pool,
        rate: cli.rate.filter(|r| *r > 0.0),
        client_threads: cli
            .client_threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
    };
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "load-grpc: NOTE client and server share this {cores}-core machine; the numbers are \
         for the pair, a lower bound for the server alone"
    );
    let server_cpu =
        |server: &Option<Spawned>| server.as_ref().and_then(|s| cpu_ticks(s.child.id()));
    let cpu_before = server_cpu(&server);
    let report = load_grpc::run(&settings).await.map_err(|e| e.to_string())?;
    println!("{report}");
    if let (Some(before), Some(after)) = (cpu_before, server_cpu(&server)) {
        // Ticks of 10 ms (Linux's USER_HZ); the pool's creates are in it too.
        let micros = after.saturating_sub(before) as f64 * 10_000.0;
        println!(
            "  server CPU (user+system) {:.1} us per call ({} calls, and {} creates of the pool)",
            micros / report.calls().max(1) as f64,
            report.calls(),
            settings.pool
        );
    }

    let Some(redis_url) = &cli.vs_redis else {
        return Ok(());
    };
    let lasts = match settings.limit {
        Limit::Duration(d) => d,
        Limit::Count(_) => report.elapsed,
    };
    println!(
        "load-grpc: redis-benchmark against {redis_url} (after the load, not during it; \
         -c {} -d {} -t get,set, sized to ~{:.0} s per test)",
        settings.concurrency,
        settings.session_bytes,
        lasts.as_secs_f64()
    );
    match load_grpc::redis_benchmark_for(
        redis_url,
        settings.concurrency,
        settings.session_bytes,
        lasts,
    )
    .await
    {
        Ok(raw) => {
            let get_ops = report
                .by_op
                .get("get")
                .map_or(0.0, |n| *n as f64 / report.elapsed.as_secs_f64());
            println!(
                "  redis-benchmark -n {}: GET {:.0}/s SET {:.0}/s",
                raw.requests, raw.get_per_sec, raw.set_per_sec
            );
            println!(
                "  ratio ours/raw: Get {:.0}/s / redis GET {:.0}/s = {:.2}x",
                get_ops,
                raw.get_per_sec,
                get_ops / raw.get_per_sec
            );
        }
        Err(error) => println!("  {error}"),
    }
    Ok(())
}
