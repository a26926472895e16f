//! `mem-footprint`: how much memory the in-memory store takes per session, and whether a mass
//! expiry hurts reads (issue 7).
//!
//! Default mode fills a [`MemoryStore`] with `--sessions` sessions of one `--bytes`-byte
//! attribute through [`SessionStore::create`] and prints the process RSS (`VmRSS` of
//! `/proc/self/status`) before and after, and the difference per session.
//!
//! `--expire` mode also keeps a separate set of `--live` long-lived sessions, fills the store
//! with `--sessions` sessions of a short `--ttl`, then has `--readers` tasks `get` random live
//! sessions while the reaper removes the expiring ones, and prints the Get latency (p50, p99,
//! p99.9, max) before the first deadline (baseline) and while expiry runs.
//!
//! ```sh
//! cargo run --release -p bench --bin mem-footprint -- --sessions 1000000 --bytes 200
//! cargo run --release -p bench --bin mem-footprint -- --sessions 1000000 --bytes 200 --expire
//! ```

// The report on stdout is this command's output.
#![allow(clippy::print_stdout)]

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use session_server::id::IdGenerator;
use session_server::store::memory::MemoryStore;
use session_server::store::{NewSession, SessionStore};

/// Namespace every session is created in.
const NAMESPACE: &str = "default";
/// Name of the single attribute each session carries.
const ATTR: &str = "data";

/// Flags of `mem-footprint`.
#[derive(Debug, Parser)]
#[command(
    name = "mem-footprint",
    about = "Memory per session of the in-memory store, and Get latency during mass expiry"
)]
struct Cli {
    /// Sessions to create (in `--expire` mode: the ones that expire).
    #[arg(long, default_value_t = 1_000_000)]
    sessions: usize,
    /// Size of each session's single attribute value, in bytes.
    #[arg(long, default_value_t = 200)]
    bytes: usize,
    /// Give every session its own user id (exercises the per-user index); anonymous otherwise.
    #[arg(long)]
    users: bool,
    /// Measure Get latency while the reaper expires `--sessions` sessions.
    #[arg(long)]
    expire: bool,
    /// `--expire`: ttl of the expiring sessions (counted from each one's creation). Longer than
    /// the fill, so that a baseline is measured before the first deadline.
    #[arg(long, default_value = "8s", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// `--expire`: long-lived sessions the readers get.
    #[arg(long, default_value_t = 10_000)]
    live: usize,
    /// `--expire`: concurrent reader tasks.
    #[arg(long, default_value_t = 4)]
    readers: usize,
}

/// A field of `/proc/self/status` in KiB (`VmRSS`, `VmHWM`), or 0 when it cannot be read.
fn status_kib(field: &str) -> u64 {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return 0;
    };
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// What to create: how many sessions, how big, for how long, with owners or not.
#[derive(Debug, Clone, Copy)]
struct Fill {
    /// Sessions to create.
    n: usize,
    /// Size of each one's single attribute value.
    bytes: usize,
    /// Their ttl.
    ttl: Duration,
    /// Whether each gets its own user id.
    users: bool,
    /// Whether to return the ids (off when measuring RSS, so the list does not count).
    keep: bool,
}

/// Creates sessions as `spec` says; returns their ids when `spec.keep`.
async fn fill(store: &MemoryStore, ids: &IdGenerator, spec: Fill) -> Result<Vec<String>, String> {
    let Fill {
        n,
        bytes,
        ttl,
        users,
        keep,
    } = spec;
    let mut made = Vec::with_capacity(if keep { n } else { 0 });
    for i in 0..n {
        let id = ids.generate().map_err(|_| "random source failed")?;
        // A value unique per session, so no allocator or page sharing flatters the numbers.
        let mut value = vec![b'x'; bytes];
        for (slot, byte) in value.iter_mut().zip(i.to_le_bytes()) {
            *slot = byte;
        }
        if keep {
            made.push(id.clone());
        }
        let new = NewSession {
            id,
            namespace: NAMESPACE.to_owned(),
            user_id: if users {
                format!("user-{i}")
            } else {
                String::new()
            },
            attrs: HashMap::from([(ATTR.to_owned(), value)]),
            ttl,
        };
        store
            .create(new)
            .await
            .map_err(|e| format!("create {i}: {e}"))?;
    }
    Ok(made)
}

/// Latency histogram in nanoseconds, 1 ns to 10 s at 3 significant digits.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 10_000_000_000, 3).expect("valid histogram bounds")
}

fn summary(name: &str, h: &Histogram<u64>) {
    let us = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "| {name} | {} | {:.2} | {:.2} | {:.2} | {:.1} |",
        h.len(),
        us(0.5),
        us(0.99),
        us(0.999),
        h.max() as f64 / 1000.0,
    );
}

async fn footprint(cli: &Cli) -> Result<(), String> {
    let store = MemoryStore::new(usize::MAX);
    let ids = IdGenerator::new();
    let before = status_kib("VmRSS");
    let started = Instant::now();
    // A day: nothing expires while RSS is read.
    let spec = Fill {
        n: cli.sessions,
        bytes: cli.bytes,
        ttl: Duration::from_secs(86_400),
        users: cli.users,
        keep: false,
    };
    fill(&store, &ids, spec).await?;
    let took = started.elapsed();
    let after = status_kib("VmRSS");
    let live = store.live_sessions().unwrap_or(0);
    println!(
        "sessions={} bytes={} users={} live={live}",
        cli.sessions, cli.bytes, cli.users
    );
    println!("fill: {:.2} s ({:.0} creates/s)", took.as_secs_f64(), {
        cli.sessions as f64 / took.as_secs_f64()
    });
    println!(
        "VmRSS before: {:.1} MiB, after: {:.1} MiB, delta: {:.1} MiB, VmHWM: {:.1} MiB",
        mib(before),
        mib(after),
        mib(after.saturating_sub(before)),
        mib(status_kib("VmHWM")),
    );
    println!(
        "per session: {:.0} B (delta) / {:.0} B (total RSS)",
        after.saturating_sub(before) as f64 * 1024.0 / cli.sessions.max(1) as f64,
        after as f64 * 1024.0 / cli.sessions.max(1) as f64,
    );
    Ok(())
}

async fn expiry(cli: &Cli) -> Result<(), String> {
    let store = Arc::new(MemoryStore::new(usize::MAX));
    let ids = IdGenerator::new();
    let spec = Fill {
        n: cli.live,
        bytes: cli.bytes,
        ttl: Duration::from_secs(86_400),
        users: cli.users,
        keep: true,
    };
    let live = fill(&store, &ids, spec).await?;
    let live = Arc::new(live);
    let fill_started = Instant::now();
    let spec = Fill {
        n: cli.sessions,
        ttl: cli.ttl,
        keep: false,
        ..spec
    };
    fill(&store, &ids, spec).await?;
    let fill_took = fill_started.elapsed();
    // The first expiring session was created at `fill_started`, so nothing is due before this.
    let first_deadline = fill_started + cli.ttl;
    println!(
        "expiring={} live={} bytes={} ttl={:?} readers={} fill={:.2} s",
        cli.sessions,
        cli.live,
        cli.bytes,
        cli.ttl,
        cli.readers,
        fill_took.as_secs_f64()
    );
    if fill_took >= cli.ttl {
        println!("warning: the fill took longer than --ttl; there is no baseline phase");
    }

    let stop = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for r in 0..cli.readers {
        let (store, live, stop) = (store.clone(), live.clone(), stop.clone());
        readers.push(tokio::spawn(async move {
            let (mut baseline, mut during) = (histogram(), histogram());
            let mut misses = 0u64;
            // A cheap per-task xorshift: which session is read does not matter, only spread.
            let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (r as u64 + 1);
            while !stop.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let id = &live[(x % live.len() as u64) as usize];
                let start = Instant::now();
                let got = store.get(NAMESPACE, id, false).await;
                let took = start.elapsed().as_nanos() as u64;
                misses += u64::from(got.is_err());
                let h = if start < first_deadline {
                    &mut baseline
                } else {
                    &mut during
                };
                h.saturating_record(took.max(1));
                // Let the reaper (and the other readers) have the worker: a get never awaits.
                tokio::task::yield_now().await;
            }
            (baseline, during, misses)
        }));
    }

    // Wait until every expiring session is reaped (live count back to the long-lived set).
    let watch_started = Instant::now();
    let mut reaped_at = None;
    while watch_started.elapsed() < cli.ttl + fill_took + Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if Instant::now() > first_deadline && store.live_sessions() == Some(cli.live as u64) {
            reaped_at = Some(Instant::now());
            break;
        }
    }
    // A little more reading after the last removal.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);

    let (mut baseline, mut during, mut misses) = (histogram(), histogram(), 0);
    for reader in readers {
        let (b, d, m) = reader.await.map_err(|e| format!("reader: {e}"))?;
        baseline.add(&b).map_err(|e| format!("merge: {e}"))?;
        during.add(&d).map_err(|e| format!("merge: {e}"))?;
        misses += m;
    }
    match reaped_at {
        Some(at) => println!(
            "all {} expired sessions reaped {:.2} s after the first deadline",
            cli.sessions,
            at.saturating_duration_since(first_deadline).as_secs_f64()
        ),
        None => println!("warning: not every expiring session was reaped within the wait"),
    }
    println!("get misses on live sessions: {misses}");
    println!();
    println!("| phase | gets | p50 µs | p99 µs | p99.9 µs | max µs |");
    println!("|---|---:|---:|---:|---:|---:|");
    summary("baseline (before first deadline)", &baseline);
    summary("from first deadline to 0.5 s after the last reap", &during);
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = if cli.expire {
        expiry(&cli).await
    } else {
        footprint(&cli).await
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("mem-footprint: {error}");
            ExitCode::FAILURE
        }
    }
}
