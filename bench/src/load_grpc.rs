//! The gRPC load generator behind `load-grpc`: a mix of `Get`/`Touch`/`Update`/`Create` calls
//! against a running session server, over a few tonic channels, for a duration or a count,
//! with latencies in an HDR histogram; and `redis-benchmark` run the same way for a baseline.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use bench::load_grpc::{self, Limit, LoadSettings, Mix};
//! let settings = LoadSettings {
//!     target: "http://127.0.0.1:50051".into(),
//!     mix: "get=80,touch=10,update=8,create=2".parse::<Mix>()?,
//!     concurrency: 32,
//!     connections: 2,
//!     limit: Limit::Count(10_000),
//!     session_bytes: 200,
//!     pool: 1_000,
//!     rate: None,
//!     client_threads: 0,
//! };
//! let report = load_grpc::run(&settings).await?;
//! println!("{report}");
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use hdrhistogram::Histogram;
use session_proto::v1::session_store_client::SessionStoreClient;
use session_proto::v1::{CreateRequest, GetRequest, TouchRequest, UpdateRequest};
use tonic::transport::{Channel, Endpoint};

/// Ttl of every session the generator creates: long enough to outlast any run, short enough
/// that a Redis or MySQL store forgets the benchmark's sessions soon after.
const SESSION_TTL: Duration = Duration::from_secs(300);

/// The attribute every generated session carries (`--session-bytes` of it).
const ATTR: &str = "data";

/// How often the pacer of a rate-limited run wakes to release the calls that have come due.
/// tokio's timer rounds every sleep up to the next millisecond, which would add up to 1 ms to
/// each latency measured from the schedule; a thread sleeping this long adds at most this.
const PACER_TICK: Duration = Duration::from_micros(100);

/// Highest latency the histogram records (60 s, in microseconds); slower calls are clamped.
const MAX_LATENCY_US: u64 = 60_000_000;

/// Why a load run could not be made.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The target is not a usable URI.
    #[error("bad target {target:?}: {source}")]
    Target {
        /// The target given.
        target: String,
        /// The parse error.
        #[source]
        source: tonic::transport::Error,
    },
    /// A channel could not connect.
    #[error("cannot connect to {target}: {source}")]
    Connect {
        /// The target given.
        target: String,
        /// The connection error.
        #[source]
        source: tonic::transport::Error,
    },
    /// Pre-creating the pool of sessions failed.
    #[error("cannot pre-create the session pool: {0}")]
    Pool(#[source] tonic::Status),
    /// A worker task panicked or was cancelled.
    #[error("a load worker failed: {0}")]
    Worker(#[source] tokio::task::JoinError),
    /// A client thread (`client_threads`) could not start, or ended before reporting.
    #[error("a load client thread failed: {0}")]
    ClientThread(String),
}

/// The kinds of call the generator makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Op {
    /// `Get` of a pooled session (no touch).
    Get,
    /// `Touch` of a pooled session (its own ttl).
    Touch,
    /// `Update` of a pooled session's attribute, same size, no version check.
    Update,
    /// `Create` of a new session with one attribute.
    Create,
}

impl Op {
    const ALL: [Op; 4] = [Op::Get, Op::Touch, Op::Update, Op::Create];

    fn name(self) -> &'static str {
        match self {
            Op::Get => "get",
            Op::Touch => "touch",
            Op::Update => "update",
            Op::Create => "create",
        }
    }
}

/// Relative weights of each [`Op`], as in `get=80,touch=10,update=8,create=2`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mix {
    /// Weight of each op, in [`Op::ALL`] order; they need not add up to 100.
    weights: [u32; 4],
}

/// Why a `--mix` does not parse.
#[derive(Debug, thiserror::Error)]
#[error(
    "bad mix {0:?}: expected e.g. get=80,touch=10,update=8,create=2 (ops get, touch, update, create; weights not all zero)"
)]
pub struct MixError(String);

impl FromStr for Mix {
    type Err = MixError;

    fn from_str(s: &str) -> Result<Mix, MixError> {
        let bad = || MixError(s.to_owned());
        let mut weights = [0u32; 4];
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, weight) = part.split_once('=').ok_or_else(bad)?;
            let index = Op::ALL
                .iter()
                .position(|op| op.name() == name.trim())
                .ok_or_else(bad)?;
            weights[index] = weight.trim().parse().map_err(|_| bad())?;
        }
        if weights.iter().all(|w| *w == 0) {
            return Err(bad());
        }
        Ok(Mix { weights })
    }
}

impl fmt::Display for Mix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = Op::ALL
            .iter()
            .zip(self.weights)
            .filter(|(_, w)| *w > 0)
            .map(|(op, w)| format!("{}={w}", op.name()))
            .collect();
        f.write_str(&parts.join(","))
    }
}

impl Mix {
    /// The op a uniform draw `r` picks.
    fn pick(&self, r: u64) -> Op {
        let total: u64 = self.weights.iter().map(|w| u64::from(*w)).sum();
        let mut r = r % total;
        for (op, w) in Op::ALL.iter().zip(self.weights) {
            if r < u64::from(w) {
                return *op;
            }
            r -= u64::from(w);
        }
        Op::Get
    }

    /// Whether the mix reads or writes existing sessions (and so needs a pool).
    fn needs_pool(&self) -> bool {
        self.weights[..3].iter().any(|w| *w > 0)
    }
}

/// When a run stops.
#[derive(Debug, Clone, Copy)]
pub enum Limit {
    /// After this long.
    Duration(Duration),
    /// After this many calls.
    Count(u64),
}

/// What one run does.
#[derive(Debug, Clone)]
pub struct LoadSettings {
    /// The server, as `http://host:port`.
    pub target: String,
    /// The op mix.
    pub mix: Mix,
    /// Calls in flight at once (one task each).
    pub concurrency: usize,
    /// Tonic channels (HTTP/2 connections) the tasks share round-robin.
    pub connections: usize,
    /// When to stop.
    pub limit: Limit,
    /// Size of the one attribute of every session, in bytes.
    pub session_bytes: usize,
    /// Sessions pre-created for get, touch and update to pick from.
    pub pool: usize,
    /// Total calls per second to aim for; `None` runs flat out.
    pub rate: Option<f64>,
    /// Threads of their own for the callers, each a single-threaded runtime with its share of
    /// the connections and callers (an event loop per thread, as wrk has); 0 runs them as tasks
    /// on the caller's runtime.
    pub client_threads: usize,
}

/// What one run measured.
#[derive(Debug)]
pub struct LoadReport {
    /// Calls answered OK.
    pub ok: u64,
    /// Failed calls by gRPC code name.
    pub errors: BTreeMap<String, u64>,
    /// Calls made, by op.
    pub by_op: BTreeMap<&'static str, u64>,
    /// Wall time from the first call to the last answer.
    pub elapsed: Duration,
    /// Latency of every call (OK or not), in microseconds; with a rate, measured from the
    /// call's scheduled start, so a stalled server is not hidden (coordinated omission).
    pub latency_us: Histogram<u64>,
    /// The settings the run used.
    pub settings: LoadSettings,
}

impl LoadReport {
    /// All calls, OK or not.
    pub fn calls(&self) -> u64 {
        self.ok + self.errors.values().sum::<u64>()
    }

    /// Calls answered OK per second.
    pub fn ok_per_sec(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// A latency quantile, in microseconds.
    pub fn quantile_us(&self, q: f64) -> u64 {
        self.latency_us.value_at_quantile(q)
    }
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.settings;
        let rate = s
            .rate
            .map_or("unlimited".to_owned(), |r| format!("{r:.0}/s"));
        writeln!(
            f,
            "load-grpc: {} mix {} concurrency {} connections {} client-threads {} session-bytes {} \
             rate {rate}",
            s.target, s.mix, s.concurrency, s.connections, s.client_threads, s.session_bytes
        )?;
        let by_op: Vec<String> = self.by_op.iter().map(|(k, v)| format!("{k}={v}")).collect();
        writeln!(
            f,
            "  calls {} ({}) in {:.2} s",
            self.calls(),
            by_op.join(" "),
            self.elapsed.as_secs_f64()
        )?;
        writeln!(f, "  ok/s {:.0}", self.ok_per_sec())?;
        writeln!(
            f,
            "  latency us: p50 {} p99 {} p99.9 {} max {}",
            self.quantile_us(0.50),
            self.quantile_us(0.99),
            self.quantile_us(0.999),
            self.latency_us.max()
        )?;
        if self.errors.is_empty() {
            write!(f, "  errors: none")
        } else {
            let errors: Vec<String> = self
                .errors
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            write!(f, "  errors: {}", errors.join(" "))
        }
    }
}

/// Connects, pre-creates the pool, runs the load, and reports.
pub async fn run(settings: &LoadSettings) -> Result<LoadReport, LoadError> {
    let channels = connect(&settings.target, settings.connections.max(1)).await?;
    let value = vec![b'x'; settings.session_bytes];
    let pool = if settings.mix.needs_pool() {
        create_pool(
            &channels,
            settings.pool.max(1),
            &value,
            settings.concurrency,
        )
        .await?
    } else {
        Vec::new()
    };
    let shared = move || {
        Arc::new(Shared {
            mix: settings.mix.clone(),
            limit: settings.limit,
            rate: settings.rate,
            pool,
            value,
            tickets: AtomicU64::new(0),
            start: Instant::now(),
        })
    };
    let (total, shared) = if settings.client_threads > 0 {
        drop(channels);
        run_on_threads(settings, shared).await?
    } else {
        let shared = shared();
        // One pacer thread for all callers: tokio's timer rounds every sleep up to the next
        // millisecond.
        let pace = shared.rate.map(|rate| {
            let pace = Pace::new(1, 0);
            let (due, start, workers) = (
                Arc::clone(&pace.due),
                shared.start,
                settings.concurrency.max(1),
            );
            let scheduled = scheduled(shared.limit, rate);
            std::thread::spawn(move || pace_thread(&due, start, rate, scheduled, workers));
            pace
        });
        let mut tasks = Vec::with_capacity(settings.concurrency);
        for worker in 0..settings.concurrency.max(1) {
            let client = SessionStoreClient::new(channels[worker % channels.len()].clone());
            tasks.push(tokio::spawn(work(
                client,
                Arc::clone(&shared),
                pace.clone(),
                worker as u64,
            )));
        }
        let mut total = Tally::new();
        for task in tasks {
            total.merge(task.await.map_err(LoadError::Worker)?);
        }
        (total, shared)
    };
    Ok(LoadReport {
        ok: total.ok,
        errors: total.errors,
        by_op: total.by_op,
        elapsed: shared.start.elapsed(),
        latency_us: total.latency_us,
        settings: settings.clone(),
    })
}

/// Runs the callers on `settings.client_threads` threads of their own, each a single-threaded
/// runtime with its share of the connections and of the callers (as wrk's threads, or
/// redis-benchmark's event loop), instead of on the caller's work-stealing runtime. Every
/// thread connects first; the load (and its clock) starts when all have.
async fn run_on_threads(
    settings: &LoadSettings,
    shared: impl FnOnce() -> Arc<Shared>,
) -> Result<(Tally, Arc<Shared>), LoadError> {
    let threads = settings.client_threads;
    let (mut readies, mut gos, mut dones) = (Vec::new(), Vec::new(), Vec::new());
    for thread in 0..threads {
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<(), LoadError>>();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<Arc<Shared>>();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<Result<Tally, LoadError>>();
        let target = settings.target.clone();
        let connections = (settings.connections / threads
            + usize::from(thread < settings.connections % threads))
        .max(1);
        let workers: Vec<u64> = (0..settings.concurrency.max(1) as u64)
            .filter(|w| *w as usize % threads == thread)
            .collect();
        std::thread::Builder::new()
            .name(format!("load-{thread}"))
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        let _ = ready_tx.send(Err(LoadError::ClientThread(error.to_string())));
                        return;
                    }
                };
                let result = runtime.block_on(async move {
                    let channels = match connect(&target, connections).await {
                        Ok(channels) => {
                            let _ = ready_tx.send(Ok(()));
                            channels
                        }
                        Err(error) => {
                            let _ = ready_tx.send(Err(error));
                            return Ok(Tally::new());
                        }
                    };
                    // Waits (this thread only) for every other thread to have connected.
                    let Ok(shared) = go_rx.recv() else {
                        return Ok(Tally::new());
                    };
                    // This thread's own pacer: its share of the schedule, released on this
                    // thread by a precise timer, so no call waits for a wake-up from another
                    // thread.
                    let pace = match shared.rate {
                        Some(rate) => {
                            let pace = Pace::new(threads as u64, thread as u64);
                            let scheduled = scheduled(shared.limit, rate)
                                .saturating_sub(thread as u64)
                                .div_ceil(threads as u64);
                            let (start, callers) = (shared.start, workers.len());
                            let pacer = pace.clone();
                            tokio::spawn(async move {
                                if let Err(error) =
                                    pace_local(&pacer, start, rate, scheduled, callers).await
                                {
                                    tracing::error!(%error, "load-grpc pacer failed");
                                    pacer.due.close();
                                }
                            });
                            Some(pace)
                        }
                        None => None,
                    };
                    let tasks: Vec<_> = workers
                        .iter()
                        .enumerate()
                        .map(|(i, worker)| {
                            let client =
                                SessionStoreClient::new(channels[i % channels.len()].clone());
                            tokio::spawn(work(client, Arc::clone(&shared), pace.clone(), *worker))
                        })
                        .collect();
                    let mut total = Tally::new();
                    for task in tasks {
                        total.merge(task.await.map_err(LoadError::Worker)?);
                    }
                    Ok(total)
                });
                let _ = done_tx.send(result);
            })
            .map_err(|error| LoadError::ClientThread(error.to_string()))?;
        readies.push(ready_rx);
        gos.push(go_tx);
        dones.push(done_rx);
    }
    let lost = || LoadError::ClientThread("a client thread ended early".into());
    for ready in readies {
        ready.await.map_err(|_| lost())??;
    }
    let shared = shared();
    for go in gos {
        let _ = go.send(Arc::clone(&shared));
    }
    let mut total = Tally::new();
    for done in dones {
        total.merge(done.await.map_err(|_| lost())??);
    }
    Ok((total, shared))
}

async fn connect(target: &str, connections: usize) -> Result<Vec<Channel>, LoadError> {
    let endpoint = Endpoint::from_shared(target.to_owned())
        .map_err(|source| LoadError::Target {
            target: target.to_owned(),
            source,
        })?
        .tcp_nodelay(true);
    let mut channels = Vec::with_capacity(connections);
    for _ in 0..connections {
        // `connect` (not `connect_lazy`) so each channel is its own HTTP/2 connection.
        let channel = endpoint
            .connect()
            .await
            .map_err(|source| LoadError::Connect {
                target: target.to_owned(),
                source,
            })?;
        channels.push(channel);
    }
    Ok(channels)
}

fn create_request(value: &[u8], user: u64) -> CreateRequest {
    CreateRequest {
        namespace: String::new(),
        user_id: format!("load-{user}"),
        attrs: [(ATTR.to_owned(), value.to_vec())].into_iter().collect(),
        ttl: Some(prost_duration(SESSION_TTL)),
        max_lifetime: Default::default(),
    }
}

fn prost_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: 0,
    }
}

async fn create_pool(
    channels: &[Channel],
    size: usize,
    value: &[u8],
    concurrency: usize,
) -> Result<Vec<String>, LoadError> {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for worker in 0..concurrency.clamp(1, size) {
        let mut client = SessionStoreClient::new(channels[worker % channels.len()].clone());
        let (next, value) = (Arc::clone(&next), value.to_vec());
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < size as u64 {
                let session = client
                    .create(create_request(&value, ids.len() as u64))
                    .await?;
                ids.push(session.into_inner().id);
            }
            Ok::<_, tonic::Status>(ids)
        }));
    }
    let mut pool = Vec::with_capacity(size);
    for task in tasks {
        pool.extend(
            task.await
                .map_err(LoadError::Worker)?
                .map_err(LoadError::Pool)?,
        );
    }
    Ok(pool)
}

/// What every worker reads.
struct Shared {
    /// The op mix.
    mix: Mix,
    /// When to stop.
    limit: Limit,
    /// Total calls per second, if limited.
    rate: Option<f64>,
    /// Ids of the pre-created sessions.
    pool: Vec<String>,
    /// The attribute value of created and updated sessions.
    value: Vec<u8>,
    /// Calls started so far, over all workers: the count limit and the rate schedule.
    tickets: AtomicU64,
    /// When the load started.
    start: Instant,
}

/// One worker's counts, merged at the end.
struct Tally {
    /// Calls answered OK.
    ok: u64,
    /// Failed calls by code name.
    errors: BTreeMap<String, u64>,
    /// Calls by op.
    by_op: BTreeMap<&'static str, u64>,
    /// Latencies in microseconds.
    latency_us: Histogram<u64>,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            ok: 0,
            errors: BTreeMap::new(),
            by_op: BTreeMap::new(),
            latency_us: Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
                .expect("valid histogram bounds"),
        }
    }

    fn merge(&mut self, other: Tally) {
        self.ok += other.ok;
        for (code, n) in other.errors {
            *self.errors.entry(code).or_default() += n;
        }
        for (op, n) in other.by_op {
            *self.by_op.entry(op).or_default() += n;
        }
        self.latency_us
            .add(&other.latency_us)
            .expect("histograms with the same bounds");
    }
}

/// A xorshift64* generator: uniform enough to pick ops and sessions, and no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

async fn work(
    mut client: SessionStoreClient<Channel>,
    shared: Arc<Shared>,
    pace: Option<Pace>,
    worker: u64,
) -> Tally {
    let mut tally = Tally::new();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (worker + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9));
    loop {
        // With a rate: wait for a call to come due, and take its place in the schedule.
        let slot = match &pace {
            Some(pace) => match pace.due.acquire().await {
                Ok(permit) => {
                    permit.forget();
                    Some(pace.next_slot())
                }
                Err(_) => break,
            },
            None => None,
        };
        // The count limit goes by the schedule when there is one: each pacer ends with a spare
        // permit per caller, whose slot lies past the run, and must not be taken for a call
        // another pacer's callers have not made yet.
        let ticket = slot.unwrap_or_else(|| shared.tickets.fetch_add(1, Ordering::Relaxed));
        match shared.limit {
            Limit::Count(n) if ticket >= n => break,
            Limit::Duration(d) if shared.start.elapsed() >= d => break,
            _ => {}
        }
        let began = match (shared.rate, slot) {
            (Some(rate), Some(slot)) => {
                let at = shared.start + Duration::from_secs_f64(slot as f64 / rate);
                if let Limit::Duration(d) = shared.limit
                    && at >= shared.start + d
                {
                    break;
                }
                at
            }
            _ => Instant::now(),
        };
        let op = shared.mix.pick(rng.next());
        let result = call(&mut client, &shared, op, rng.next()).await;
        let micros = began
            .elapsed()
            .as_micros()
            .clamp(1, u128::from(MAX_LATENCY_US)) as u64;
        tally.latency_us.saturating_record(micros);
        *tally.by_op.entry(op.name()).or_default() += 1;
        match result {
            Ok(()) => tally.ok += 1,
            Err(status) => {
                *tally
                    .errors
                    .entry(format!("{:?}", status.code()))
                    .or_default() += 1;
            }
        }
    }
    tally
}

/// One pacer's share of a rate-limited schedule: calls `offset`, `offset + stride`, ... of
/// the whole run (call `k` due at `start + k / rate`).
#[derive(Clone)]
struct Pace {
    /// One permit per call of this share that has come due.
    due: Arc<Semaphore>,
    /// Calls of this share started so far.
    taken: Arc<AtomicU64>,
    /// Pacers in the run.
    stride: u64,
    /// This pacer's first call.
    offset: u64,
}

impl Pace {
    fn new(stride: u64, offset: u64) -> Pace {
        Pace {
            due: Arc::new(Semaphore::new(0)),
            taken: Arc::new(AtomicU64::new(0)),
            stride: stride.max(1),
            offset,
        }
    }

    /// The run-wide number of the next call of this share.
    fn next_slot(&self) -> u64 {
        self.taken.fetch_add(1, Ordering::Relaxed) * self.stride + self.offset
    }
}

/// Calls a rate-limited run schedules in all.
fn scheduled(limit: Limit, rate: f64) -> u64 {
    match limit {
        Limit::Count(n) => n,
        Limit::Duration(d) => (d.as_secs_f64() * rate).ceil() as u64,
    }
}

/// Calls of share `offset` of `stride` (see [`Pace`]) due by `elapsed` seconds, at most
/// `scheduled`.
fn due_by(elapsed: f64, rate: f64, stride: u64, offset: u64, scheduled: u64) -> u64 {
    let calls = (elapsed * rate).floor();
    if calls < offset as f64 {
        return 0;
    }
    (((calls as u64 - offset) / stride) + 1).min(scheduled)
}

/// Releases the `scheduled` calls of a rate-limited run as they come due (call `k` at
/// `start + k / rate`) from a thread of its own, then one permit per worker so that each wakes
/// to see the end.
fn pace_thread(due: &Semaphore, start: Instant, rate: f64, scheduled: u64, workers: usize) {
    let mut released = 0u64;
    while released < scheduled {
        let now_due = due_by(start.elapsed().as_secs_f64(), rate, 1, 0, scheduled);
        if now_due > released {
            due.add_permits((now_due - released) as usize);
            released = now_due;
        }
        std::thread::sleep(PACER_TICK);
    }
    due.add_permits(workers);
}

/// [`pace_thread`] for one client thread's share, as a task on that thread: a periodic timerfd
/// on the thread's own reactor wakes it every [`PACER_TICK`] (tokio's timer would round up to
/// a millisecond), and no other thread is involved.
async fn pace_local(
    pace: &Pace,
    start: Instant,
    rate: f64,
    scheduled: u64,
    workers: usize,
) -> std::io::Result<()> {
    use rustix::time::{
        Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags, Timespec, timerfd_create,
        timerfd_settime,
    };
    let (due, stride, offset) = (&pace.due, pace.stride, pace.offset);
    let timer = timerfd_create(
        TimerfdClockId::Monotonic,
        TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
    )?;
    let tick = Timespec {
        tv_sec: 0,
        tv_nsec: i64::from(PACER_TICK.subsec_nanos()),
    };
    timerfd_settime(
        &timer,
        TimerfdTimerFlags::empty(),
        &Itimerspec {
            it_interval: tick,
            it_value: tick,
        },
    )?;
    // `AsyncFd::new` is deprecated (tokio 1.54) because an arbitrary `AsRawFd` may close or
    // swap its descriptor while registered; its replacement, `register`, is `unsafe`, which
    // this workspace forbids. An `OwnedFd` moved in here is open, and stays the same, for as
    // long as the `AsyncFd` lives: the contract `register` asks for.
    #[allow(deprecated)]
    let timer = tokio::io::unix::AsyncFd::new(timer)?;
    let mut released = 0u64;
    loop {
        let now_due = due_by(
            start.elapsed().as_secs_f64(),
            rate,
            stride,
            offset,
            scheduled,
        );
        if now_due > released {
            due.add_permits((now_due - released) as usize);
            released = now_due;
        }
        if released >= scheduled {
            break;
        }
        let mut ready = timer.readable().await?;
        let mut expirations = [0u8; 8];
        // Drains the count of expirations; a tick that lands after this read is seen at the
        // next one, 100 µs later.
        let _ = rustix::io::read(ready.get_inner(), &mut expirations);
        ready.clear_ready();
    }
    due.add_permits(workers);
    Ok(())
}

async fn call(
    client: &mut SessionStoreClient<Channel>,
    shared: &Shared,
    op: Op,
    r: u64,
) -> Result<(), tonic::Status> {
    let id = || {
        shared
            .pool
            .get(r as usize % shared.pool.len().max(1))
            .cloned()
            .unwrap_or_default()
    };
    match op {
        Op::Get => {
            client
                .get(GetRequest {
                    namespace: String::new(),
                    id: id(),
                    touch: false,
                    bypass_cache: false,
                })
                .await?;
        }
        Op::Touch => {
            client
                .touch(TouchRequest {
                    namespace: String::new(),
                    id: id(),
                    ttl: None,
                })
                .await?;
        }
        Op::Update => {
            client
                .update(UpdateRequest {
                    namespace: String::new(),
                    id: id(),
                    set: [(ATTR.to_owned(), shared.value.clone())]
                        .into_iter()
                        .collect(),
                    ..UpdateRequest::default()
                })
                .await?;
        }
        Op::Create => {
            client.create(create_request(&shared.value, r)).await?;
        }
    }
    Ok(())
}

/// Why `redis-benchmark` gave no numbers.
#[derive(Debug, thiserror::Error)]
pub enum RedisBenchError {
    /// The URL is not `redis://host:port`.
    #[error("bad redis URL {0:?}: expected redis://host[:port]")]
    Url(String),
    /// `redis-benchmark` is not on `PATH`.
    #[error(
        "redis-benchmark is not installed (it comes with Redis: `apt-get install redis-tools` \
         or redis-server); skipping the raw Redis baseline"
    )]
    Missing,
    /// It could not be run.
    #[error("cannot run redis-benchmark: {0}")]
    Spawn(#[source] std::io::Error),
    /// It failed or printed no GET/SET line.
    #[error("redis-benchmark failed ({status}): {output}")]
    Failed {
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed.
        output: String,
    },
}

/// What `redis-benchmark -t get,set --csv` measured.
#[derive(Debug, Clone, Copy)]
pub struct RedisBench {
    /// GET requests per second.
    pub get_per_sec: f64,
    /// SET requests per second.
    pub set_per_sec: f64,
    /// Requests per test (`-n`).
    pub requests: u64,
}

/// Host and port of a `redis://host[:port][/db]` URL.
pub fn redis_host_port(url: &str) -> Result<(String, u16), RedisBenchError> {
    let bad = || RedisBenchError::Url(url.to_owned());
    let rest = url.strip_prefix("redis://").ok_or_else(bad)?;
    let authority = rest.split('/').next().unwrap_or_default();
    let host_port = authority.rsplit('@').next().unwrap_or_default();
    let (host, port) = match host_port.rsplit_once(':') {
        Some((host, port)) => (host, port.parse().map_err(|_| bad())?),
        None => (host_port, 6379),
    };
    if host.is_empty() {
        return Err(bad());
    }
    Ok((host.to_owned(), port))
}

/// Runs `redis-benchmark -h -p -c <concurrency> -d <bytes> -t get,set -n <requests> --csv`.
pub async fn redis_benchmark(
    url: &str,
    concurrency: usize,
    bytes: usize,
    requests: u64,
) -> Result<RedisBench, RedisBenchError> {
    let (host, port) = redis_host_port(url)?;
    let output = tokio::process::Command::new("redis-benchmark")
        .args(["-h", &host, "-p", &port.to_string()])
        .args(["-c", &concurrency.to_string(), "-d", &bytes.to_string()])
        .args(["-t", "get,set", "-n", &requests.to_string(), "--csv"])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|error| match error.kind() {
            std::io::ErrorKind::NotFound => RedisBenchError::Missing,
            _ => RedisBenchError::Spawn(error),
        })?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let rps = |test: &str| {
        text.lines().find_map(|line| {
            let mut fields = line.split(',').map(|f| f.trim().trim_matches('"'));
            (fields.next() == Some(test))
                .then(|| fields.next().and_then(|v| v.parse::<f64>().ok()))
                .flatten()
        })
    };
    match (output.status.success(), rps("GET"), rps("SET")) {
        (true, Some(get_per_sec), Some(set_per_sec)) => Ok(RedisBench {
            get_per_sec,
            set_per_sec,
            requests,
        }),
        _ => Err(RedisBenchError::Failed {
            status: output.status,
            output: format!("{text}{}", String::from_utf8_lossy(&output.stderr)),
        }),
    }
}

/// `redis-benchmark` sized to last about `duration` per test: a short calibration run first
/// (20 000 requests), then enough requests for `duration` at the calibrated rate.
pub async fn redis_benchmark_for(
    url: &str,
    concurrency: usize,
    bytes: usize,
    duration: Duration,
) -> Result<RedisBench, RedisBenchError> {
    let probe = redis_benchmark(url, concurrency, bytes, 20_000).await?;
    let rate = probe.get_per_sec.max(probe.set_per_sec);
    let requests = (rate * duration.as_secs_f64()).max(20_000.0) as u64;
    redis_benchmark(url, concurrency, bytes, requests).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_parses_weights_and_rejects_unknown_ops() {
        let mix: Mix = "get=80,touch=10,update=8,create=2".parse().unwrap();
        assert_eq!(mix.weights, [80, 10, 8, 2]);
        assert_eq!(mix.to_string(), "get=80,touch=10,update=8,create=2");
        assert!("get=1,delete=2".parse::<Mix>().is_err());
        assert!("get=0".parse::<Mix>().is_err());
    }

    #[test]
    fn mix_picks_only_weighted_ops() {
        let mix: Mix = "get=100".parse().unwrap();
        let mut rng = Rng(7);
        assert!((0..1000).all(|_| mix.pick(rng.next()) == Op::Get));
        assert!(!"create=1".parse::<Mix>().unwrap().needs_pool());
    }

    #[test]
    fn pacers_share_the_schedule_without_overlap() {
        let rate = 1000.0;
        for elapsed in [0.0, 0.0004, 0.001, 0.0125, 0.5, 2.0] {
            let whole = due_by(elapsed, rate, 1, 0, 1001);
            let shares: u64 = (0..3)
                .map(|t| due_by(elapsed, rate, 3, t, (1001 - t).div_ceil(3)))
                .sum();
            assert_eq!(shares, whole, "at {elapsed} s");
        }
        // Each share stops at its own part of the run: 1001 calls over 3 pacers.
        assert_eq!(due_by(10.0, rate, 3, 0, 334), 334);
        assert_eq!(due_by(10.0, rate, 3, 2, 333), 333);
        assert_eq!(due_by(0.0, rate, 3, 1, 333), 0, "call 1 is not due at 0");
    }

    /// A paced run with a count ends with exactly that many calls, whichever the pacing mode
    /// (it once waited for ever when one client thread's pacer finished before the other's).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn paced_counted_runs_end_with_the_count_in_both_modes() {
        use session_server::config::Settings;
        use session_server::metrics::Metrics;
        use session_server::store::memory::MemoryStore;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = format!("http://{}", listener.local_addr().unwrap());
        let settings = Settings::default();
        let store = Arc::new(MemoryStore::new(settings.max_session_bytes));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            session_server::server::run(listener, &settings, store, Metrics::new(), shutdown).await
        });
        for client_threads in [0, 2, 3] {
            let settings = LoadSettings {
                target: target.clone(),
                mix: "get=100".parse().unwrap(),
                concurrency: 8,
                connections: 3,
                limit: Limit::Count(1001),
                session_bytes: 10,
                pool: 10,
                rate: Some(5000.0),
                client_threads,
            };
            let report = tokio::time::timeout(Duration::from_secs(20), run(&settings))
                .await
                .unwrap_or_else(|_| panic!("{client_threads} client threads: still running"))
                .unwrap();
            assert_eq!(report.calls(), 1001, "{client_threads} client threads");
            assert_eq!(report.ok, 1001);
        }
        let _ = stop.send(());
        server.await.unwrap().unwrap();
    }

    #[test]
    fn redis_url_gives_host_and_port() {
        assert_eq!(
            redis_host_port("redis://127.0.0.1:6380/0").unwrap(),
            ("127.0.0.1".to_owned(), 6380)
        );
        assert_eq!(
            redis_host_port("redis://:pw@localhost").unwrap(),
            ("localhost".to_owned(), 6379)
        );
        assert!(redis_host_port("http://x").is_err());
    }
}
