//! The soak under hostile clients (issue 13): does the proxy, and the session server behind
//! its lookup plugin, hold their ground while clients try to wear them down?
//!
//! [`run`] starts a small cluster of the project's own binaries on loopback, every one on
//! port 0 (a session server on the memory store with scoped tokens, two `demo-app --sessions
//! proxy` backends, `session-proxy` with the session-lookup plugin in front), then runs two
//! phases of honest traffic (logged-in users doing `GET /me`, `POST /cart/add`, `GET /cart`
//! in a closed loop at a fixed concurrency):
//! - **baseline**: the honest traffic alone;
//! - **attack**: the same traffic while slowloris connections trickle a request head to the
//!   proxy, slow uploaders trickle a 1 MB body, and a Watch flood opens more streams on the
//!   honest users' namespace than the session server allows.
//!
//! The [`SoakReport`] has the honest latency and error rate of both phases, what each
//! attacker achieved (connections cut, 408s, Watch refusals), and whether the proxy marked a
//! backend down at any time (its admin API is polled throughout, and read once more at the
//! end). [`SoakReport::failures`] says why a soak failed: more than
//! [`SoakSettings::max_error_rate`] honest errors under attack, or a backend marked down.
//!
//! The attackers connect from their own loopback address ([`SoakSettings::attacker_ip`],
//! `127.0.0.2`), as real attackers and users come from different addresses: a per-address
//! limit of the proxy then falls on the attackers, not on the honest users.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use bench::{Binaries, soak::{self, SoakSettings}};
//! let dir = tempfile::tempdir()?;
//! let mut settings = SoakSettings::new(Binaries::locate()?, dir.path().to_owned());
//! settings.baseline = Duration::from_secs(5);
//! settings.attack = Duration::from_secs(5);
//! let report = soak::run(&settings).await?;
//! assert!(report.failures().is_empty(), "{}", report.markdown());
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - [`cluster`]: the processes under attack and the proxy's view of its backends.
//! - [`honest`]: the honest users and what they measure.
//! - [`attack`]: slowloris and slow uploaders (raw TCP to the proxy).
//! - [`watch_flood`]: Watch streams against the session server.
//! - this file: the settings, the two phases, the report.

mod attack;
mod cluster;
mod honest;
mod watch_flood;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

pub use attack::{SlowlorisReport, UploadReport};
pub use honest::HonestReport;
pub use watch_flood::WatchReport;

use crate::binaries::Binaries;
use crate::cluster::ClusterError;

/// Time every attacker gets past the end of its phase to notice and stop; past it, it is
/// aborted (each one watches the phase's deadline itself, so this is a safety net).
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How often the proxy's admin API is asked which backends are up: well under the time a
/// backend taken down stays down (a passing health check every 1 s, two to rise).
const BACKEND_POLL: Duration = Duration::from_millis(250);

/// Why a soak could not be run (a soak that ran and failed is a [`SoakReport`] with
/// [`SoakReport::failures`]).
#[derive(Debug, thiserror::Error)]
pub enum SoakError {
    /// The cluster did not start.
    #[error("starting the cluster: {0}")]
    Cluster(#[from] ClusterError),
    /// The settings cannot make a soak.
    #[error("bad settings: {0}")]
    Settings(String),
    /// Something of the harness itself failed (a client, a task).
    #[error("{0}")]
    Harness(String),
}

/// What to run, how hard, for how long. [`SoakSettings::new`] gives the defaults of the
/// `soak` command.
#[derive(Debug, Clone)]
pub struct SoakSettings {
    /// The binaries of the cluster.
    pub bins: Binaries,
    /// Directory for the children's logs and the token file (must exist).
    pub dir: PathBuf,
    /// Length of the baseline phase (honest traffic alone).
    pub baseline: Duration,
    /// Length of the attack phase (honest traffic under attack).
    pub attack: Duration,
    /// Honest users, each one connection in a closed loop.
    pub concurrency: usize,
    /// Slowloris connections open at once.
    pub slowloris: usize,
    /// Pause between two bytes of a slowloris request head.
    pub slowloris_interval: Duration,
    /// Slow uploaders at once.
    pub slow_uploaders: usize,
    /// The `Content-Length` a slow uploader announces.
    pub upload_bytes: u64,
    /// Pause between two bytes of a slow upload.
    pub upload_interval: Duration,
    /// Watch streams the flood tries to keep open on the honest users' namespace.
    pub watchers: usize,
    /// HTTP/2 connections the Watch flood spreads its streams over.
    pub watch_connections: usize,
    /// Pause of a refused or ended watcher before it opens its stream again.
    pub watch_retry: Duration,
    /// `session-server --max-watchers-per-namespace`.
    pub max_watchers_per_namespace: usize,
    /// `session-proxy --header-read-timeout`: what cuts a slowloris connection.
    pub header_read_timeout: Duration,
    /// `session-proxy --body-read-timeout`: with `--min-upload-rate` (500 bytes/s by
    /// default) what cuts a slow upload, after about this long.
    pub body_read_timeout: Duration,
    /// More `session-proxy` flags (e.g. `--max-conns-per-ip=64`), after the soak's own.
    pub proxy_args: Vec<String>,
    /// More `session-server` flags, after the soak's own.
    pub server_args: Vec<String>,
    /// The address attackers connect from (any loopback address works on Linux); `None`: the
    /// system's choice, as the honest users.
    pub attacker_ip: Option<IpAddr>,
    /// Honest errors under attack (a share, 0..=1) above which the soak fails.
    pub max_error_rate: f64,
}

impl SoakSettings {
    /// The defaults of the `soak` command: 30 s baseline, 30 s attack, 16 honest users, 200
    /// slowloris connections, 50 slow uploaders, 2000 watchers against a limit of 1000.
    pub fn new(bins: Binaries, dir: PathBuf) -> SoakSettings {
        SoakSettings {
            bins,
            dir,
            baseline: Duration::from_secs(30),
            attack: Duration::from_secs(30),
            concurrency: 16,
            slowloris: 200,
            slowloris_interval: Duration::from_secs(2),
            slow_uploaders: 50,
            upload_bytes: 1 << 20,
            upload_interval: Duration::from_secs(1),
            watchers: 2000,
            watch_connections: 10,
            watch_retry: Duration::from_secs(1),
            max_watchers_per_namespace: 1000,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(10),
            proxy_args: Vec::new(),
            server_args: Vec::new(),
            attacker_ip: Some(IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2))),
            max_error_rate: 0.01,
        }
    }

    fn check(&self) -> Result<(), SoakError> {
        let bad = |why: &str| Err(SoakError::Settings(why.to_owned()));
        if self.concurrency == 0 {
            return bad("the honest concurrency must be at least 1");
        }
        if self.baseline.is_zero() || self.attack.is_zero() {
            return bad("both phases must last longer than zero");
        }
        if self.watchers > 0 && self.watch_connections == 0 {
            return bad("a Watch flood needs at least one connection");
        }
        if self.slowloris_interval.is_zero() || self.upload_interval.is_zero() {
            return bad("the trickle intervals must be longer than zero");
        }
        if !(0.0..=1.0).contains(&self.max_error_rate) {
            return bad("the error rate limit is a share from 0 to 1");
        }
        Ok(())
    }
}

/// What a soak measured. Serialised as the `soak --json` file.
#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    /// Honest traffic alone.
    pub baseline: HonestReport,
    /// Honest traffic under attack.
    pub attack: HonestReport,
    /// p99 latency under attack over p99 latency of the baseline.
    pub p99_ratio: f64,
    /// The slowloris connections.
    pub slowloris: SlowlorisReport,
    /// The slow uploaders.
    pub uploads: UploadReport,
    /// The Watch flood.
    pub watch: WatchReport,
    /// Names of the proxy's backends.
    pub backends: Vec<String>,
    /// Backends the proxy listed as down at any poll of its admin API, during either phase.
    pub backends_seen_down: Vec<String>,
    /// Backends the proxy listed as down at the end (or that it did not list at all).
    pub backends_down_at_end: Vec<String>,
    /// Polls of the admin API that got no answer (a proxy too busy to answer its admin API
    /// is worth knowing about).
    pub admin_poll_failures: u64,
    /// The limit the attack phase's error rate is held to.
    pub max_error_rate: f64,
}

impl SoakReport {
    /// Why the soak failed; empty when it passed.
    pub fn failures(&self) -> Vec<String> {
        let mut failures = Vec::new();
        if self.baseline.requests == 0 || self.attack.requests == 0 {
            failures.push("a phase made no honest request at all".to_owned());
        }
        if self.attack.error_rate > self.max_error_rate {
            failures.push(format!(
                "honest error rate under attack {:.2}% is above {:.2}%",
                self.attack.error_rate * 100.0,
                self.max_error_rate * 100.0
            ));
        }
        if !self.backends_seen_down.is_empty() {
            failures.push(format!(
                "the proxy marked backends down during the soak: {}",
                self.backends_seen_down.join(", ")
            ));
        }
        if !self.backends_down_at_end.is_empty() {
            failures.push(format!(
                "backends not up at the end: {}",
                self.backends_down_at_end.join(", ")
            ));
        }
        failures
    }

    /// The report as Markdown: the honest traffic's table, the attackers' table, the
    /// backends and the verdict.
    pub fn markdown(&self) -> String {
        let mut out = String::from(
            "| honest traffic | requests | req/s | p50 ms | p99 ms | max ms | errors | error rate |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        for (name, phase) in [("baseline", &self.baseline), ("under attack", &self.attack)] {
            let _ = writeln!(
                out,
                "| {name} | {} | {:.0} | {:.2} | {:.2} | {:.1} | {}{} | {:.3}% |",
                phase.requests,
                phase.rps,
                phase.p50_ms,
                phase.p99_ms,
                phase.max_ms,
                phase.errors,
                error_kinds(phase),
                phase.error_rate * 100.0
            );
        }
        let _ = writeln!(
            out,
            "\np99 under attack / p99 baseline: **{:.2}×**\n",
            self.p99_ratio
        );
        let s = &self.slowloris;
        let u = &self.uploads;
        let w = &self.watch;
        out.push_str("| attacker | how many | what it got |\n|---|---:|---|\n");
        let _ = writeln!(
            out,
            "| slowloris (a head byte every {}) | {} | {} connections opened, {} cut by the \
             proxy ({} of them with a 408), {} still open at the end, {} failed connects |",
            humantime::format_duration(s.interval),
            s.clients,
            s.opened,
            s.cut,
            s.answered_408,
            s.open_at_end,
            s.connect_failed
        );
        let _ = writeln!(
            out,
            "| slow uploaders ({} B announced, a byte every {}) | {} | {} uploads started, \
             {} answered 408, {} answered otherwise, {} cut without an answer, {} still \
             running at the end, {} failed connects |",
            u.announced_bytes,
            humantime::format_duration(u.interval),
            u.clients,
            u.opened,
            u.answered_408,
            u.answered_other,
            u.cut_without_answer,
            u.open_at_end,
            u.connect_failed
        );
        let _ = writeln!(
            out,
            "| Watch flood ({} connections, limit {} a namespace) | {} | {} opens tried, {} \
             refused RESOURCE_EXHAUSTED, at most {} open at once, {} ended by the server, {} \
             other errors, {} events received |",
            w.connections,
            w.limit,
            w.watchers,
            w.attempts,
            w.refused,
            w.peak_open,
            w.ended_by_server,
            w.other_errors,
            w.events
        );
        let _ = writeln!(
            out,
            "\nBackends: {} up at the end of {}; seen down during the soak: {}; admin polls \
             unanswered: {}.",
            self.backends.len() - self.backends_down_at_end.len(),
            self.backends.len(),
            if self.backends_seen_down.is_empty() {
                "none".to_owned()
            } else {
                self.backends_seen_down.join(", ")
            },
            self.admin_poll_failures
        );
        let failures = self.failures();
        if failures.is_empty() {
            let _ = writeln!(
                out,
                "\n**PASS**: honest errors under attack at most {:.2}%, no backend marked down.",
                self.max_error_rate * 100.0
            );
        } else {
            let _ = writeln!(out, "\n**FAIL**: {}.", failures.join("; "));
        }
        out
    }
}

/// A duration as `"2s"` in the JSON report.
fn duration_text<S: serde::Serializer>(
    duration: &Duration,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_str(&humantime::format_duration(*duration))
}

/// ` (502: 3, timeout: 1)` for a phase with errors, nothing otherwise.
fn error_kinds(phase: &HonestReport) -> String {
    if phase.error_kinds.is_empty() {
        return String::new();
    }
    let kinds: Vec<String> = phase
        .error_kinds
        .iter()
        .map(|(kind, count)| format!("{kind}: {count}"))
        .collect();
    format!(" ({})", kinds.join(", "))
}

/// Runs the soak: starts the cluster, runs the baseline then the attack phase, and reports.
/// Every process is killed when it returns.
pub async fn run(settings: &SoakSettings) -> Result<SoakReport, SoakError> {
    settings.check()?;
    let cluster = cluster::SoakCluster::start(settings).await?;
    let base = format!("http://{}", cluster.proxy);
    let admin = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()
        .map_err(|e| SoakError::Harness(format!("building an HTTP client: {e}")))?;

    let stop_polling = Arc::new(AtomicBool::new(false));
    let poller = tokio::spawn(poll_backends(
        admin.clone(),
        cluster.admin_url(),
        stop_polling.clone(),
    ));

    tracing::info!(duration = ?settings.baseline, "baseline phase");
    let baseline = honest::run(&base, settings.concurrency, settings.baseline, "baseline").await?;

    tracing::info!(duration = ?settings.attack, "attack phase");
    let deadline = Instant::now() + settings.attack;
    let attackers = Attackers::start(settings, &cluster, deadline).await?;
    let attack = honest::run(&base, settings.concurrency, settings.attack, "attack").await?;
    let (slowloris, uploads, watch) = attackers.finish(settings, deadline).await;

    stop_polling.store(true, Ordering::Relaxed);
    let (seen_down, admin_poll_failures) = poller
        .await
        .map_err(|e| SoakError::Harness(format!("the admin poller failed: {e}")))?;
    let down_at_end = match cluster::backend_states(&admin, &cluster.admin_url()).await {
        Ok(states) => cluster
            .backends
            .iter()
            .filter(|name| !states.iter().any(|(n, up)| n == *name && *up))
            .cloned()
            .collect(),
        Err(why) => {
            tracing::warn!(%why, "the admin API did not answer at the end");
            cluster.backends.clone()
        }
    };
    Ok(SoakReport {
        p99_ratio: if baseline.p99_ms > 0.0 {
            attack.p99_ms / baseline.p99_ms
        } else {
            0.0
        },
        baseline,
        attack,
        slowloris,
        uploads,
        watch,
        backends: cluster.backends.clone(),
        backends_seen_down: seen_down.into_iter().collect(),
        backends_down_at_end: down_at_end,
        admin_poll_failures,
        max_error_rate: settings.max_error_rate,
    })
}

/// Polls the proxy's admin API until `stop`: the backends it ever listed as down, and the
/// polls that got no answer.
async fn poll_backends(
    http: reqwest::Client,
    url: String,
    stop: Arc<AtomicBool>,
) -> (BTreeSet<String>, u64) {
    let mut seen_down = BTreeSet::new();
    let mut failures = 0;
    while !stop.load(Ordering::Relaxed) {
        match cluster::backend_states(&http, &url).await {
            Ok(states) => {
                for (name, up) in states {
                    if !up && seen_down.insert(name.clone()) {
                        tracing::warn!(backend = %name, "the proxy lists a backend as down");
                    }
                }
            }
            Err(why) => {
                tracing::debug!(%why, "admin poll failed");
                failures += 1;
            }
        }
        tokio::time::sleep(BACKEND_POLL).await;
    }
    (seen_down, failures)
}

/// The attackers of the attack phase, running.
struct Attackers {
    /// One task per slowloris connection.
    slowloris: Vec<tokio::task::JoinHandle<attack::SlowlorisTally>>,
    /// One task per slow uploader.
    uploads: Vec<tokio::task::JoinHandle<attack::UploadTally>>,
    /// The Watch flood.
    watch: watch_flood::Flood,
}

impl Attackers {
    /// Starts every attacker; each stops by itself at `deadline`.
    async fn start(
        settings: &SoakSettings,
        cluster: &cluster::SoakCluster,
        deadline: Instant,
    ) -> Result<Attackers, SoakError> {
        let watch = watch_flood::Flood::start(
            &watch_flood::FloodSpec {
                target: format!("http://{}", cluster.session_server),
                token: cluster.watch_token.clone(),
                namespace: cluster::NAMESPACE.to_owned(),
                watchers: settings.watchers,
                connections: settings.watch_connections,
                retry: settings.watch_retry,
                limit: settings.max_watchers_per_namespace,
                source: settings.attacker_ip,
            },
            deadline,
        )
        .await
        .map_err(SoakError::Harness)?;
        let target = cluster.proxy;
        let source = settings.attacker_ip;
        let slowloris = (0..settings.slowloris)
            .map(|_| {
                tokio::spawn(attack::slowloris(
                    target,
                    source,
                    settings.slowloris_interval,
                    deadline,
                ))
            })
            .collect();
        let uploads = (0..settings.slow_uploaders)
            .map(|_| {
                tokio::spawn(attack::slow_upload(
                    target,
                    source,
                    settings.upload_bytes,
                    settings.upload_interval,
                    deadline,
                ))
            })
            .collect();
        Ok(Attackers {
            slowloris,
            uploads,
            watch,
        })
    }

    /// Waits for every attacker to stop (aborting any still running [`STOP_GRACE`] after
    /// `deadline`) and sums what they got.
    async fn finish(
        self,
        settings: &SoakSettings,
        deadline: Instant,
    ) -> (SlowlorisReport, UploadReport, WatchReport) {
        let bound = deadline + STOP_GRACE;
        let mut slowloris = SlowlorisReport::new(settings.slowloris, settings.slowloris_interval);
        for tally in join_bounded(self.slowloris, bound).await {
            slowloris.add(&tally);
        }
        let mut uploads = UploadReport::new(
            settings.slow_uploaders,
            settings.upload_bytes,
            settings.upload_interval,
        );
        for tally in join_bounded(self.uploads, bound).await {
            uploads.add(&tally);
        }
        let watch = self.watch.finish(bound).await;
        (slowloris, uploads, watch)
    }
}

/// The results of `tasks` that end by `bound`; the others are aborted and left out (with a
/// warning: an attacker must stop with its phase).
pub(crate) async fn join_bounded<T: Send + 'static>(
    tasks: Vec<tokio::task::JoinHandle<T>>,
    bound: Instant,
) -> Vec<T> {
    let mut results = Vec::with_capacity(tasks.len());
    let mut stuck = 0;
    for mut task in tasks {
        match tokio::time::timeout_at(bound, &mut task).await {
            Ok(Ok(result)) => results.push(result),
            Ok(Err(error)) => tracing::error!(%error, "an attacker task failed"),
            Err(_) => {
                task.abort();
                stuck += 1;
            }
        }
    }
    if stuck > 0 {
        tracing::warn!(stuck, "attackers did not stop with their phase; aborted");
    }
    results
}
