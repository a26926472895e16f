//! The scenarios, and running one (mode, scenario) pair: start a cluster, drive the users
//! while the scenario's timeline acts on the cluster, check the carts, measure.
//!
//! Timelines (fractions of the run's duration):
//! - `steady`: nothing happens;
//! - `backend-dies`: backend s2 is killed (SIGKILL) at 40%;
//! - `scale-out`: a fourth backend is started and added to the proxy at 40%;
//! - `rolling-restart`: s1, s2, s3 are each killed and started again on their port, at 15%,
//!   40% and 65%;
//! - `middle-proxy`: every user arrives from one address (ip-hash sees one client);
//! - `nat`: users behind four addresses;
//! - `store-outage`: the session server is killed at 30% and started again, empty when it is
//!   the memory store, at 60%;
//! - `session-server-dies`: two session servers on one shared store (the run's store; a
//!   private Redis the harness starts when that is the memory store), both given to every
//!   backend and to the proxy; the first is killed (SIGKILL) at 40% and stays dead;
//! - `store-failover`: two session servers on a Redis primary with one replica, watched by one
//!   Sentinel (`down-after-milliseconds` 1000), all started by the harness whatever the run's
//!   store; the primary is killed (SIGKILL) at 40% and stays dead, the Sentinel promotes the
//!   replica (about 3 s at idle). The users keep going until 60% of the run's duration after
//!   the promotion (a 2 s run lasts about 5 s), so the promoted replica serves them too, and
//!   the carts are read after it.
//!
//! Modes that keep sessions in the backends run every scenario too (the session tier changes
//! nothing for them), so the table is complete.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::binaries::Binaries;
use crate::cluster::{Cluster, ClusterError, ClusterSpec, SessionTier, ensure_dir};
use crate::mode::{Mode, StoreChoice};
use crate::report::Row;
use crate::users::{self, Addressing, LoadSettings};

/// Backends a cluster starts with.
pub const BACKENDS: usize = 3;
/// Time a rolling restart leaves a backend down (a real restart is not instant either).
const RESTART_GAP: Duration = Duration::from_millis(150);
/// Bound on the users' wait for a scenario that moves their deadline once it knows it (a
/// Sentinel failover): far past any failover, only reached when the timeline fails, which
/// ends the load at once anyway.
const OPEN_ENDED: Duration = Duration::from_secs(120);
/// Share of the run's duration the users keep going after a failover.
const AFTER_FAILOVER: f64 = 0.6;

/// A scenario: what happens to the cluster, or to the clients, during a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scenario {
    /// Nothing happens.
    Steady,
    /// One backend is killed mid-run.
    BackendDies,
    /// A fourth backend is added mid-run.
    ScaleOut,
    /// Each backend is restarted in turn.
    RollingRestart,
    /// Every user arrives through one upstream proxy address.
    MiddleProxy,
    /// Users behind four NAT addresses.
    Nat,
    /// The session store is down for a while.
    StoreOutage,
    /// One of two session servers on a shared store dies.
    SessionServerDies,
    /// The Redis primary dies; Sentinel promotes its replica.
    StoreFailover,
}

impl Scenario {
    /// Every scenario, in table order.
    pub const ALL: [Scenario; 9] = [
        Scenario::Steady,
        Scenario::BackendDies,
        Scenario::ScaleOut,
        Scenario::RollingRestart,
        Scenario::MiddleProxy,
        Scenario::Nat,
        Scenario::StoreOutage,
        Scenario::SessionServerDies,
        Scenario::StoreFailover,
    ];

    /// Its name in flags, tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Steady => "steady",
            Scenario::BackendDies => "backend-dies",
            Scenario::ScaleOut => "scale-out",
            Scenario::RollingRestart => "rolling-restart",
            Scenario::MiddleProxy => "middle-proxy",
            Scenario::Nat => "nat",
            Scenario::StoreOutage => "store-outage",
            Scenario::SessionServerDies => "session-server-dies",
            Scenario::StoreFailover => "store-failover",
        }
    }

    /// The session servers this scenario runs, and on which store.
    pub fn session_tier(self) -> SessionTier {
        match self {
            Scenario::SessionServerDies => SessionTier::TwoShared,
            Scenario::StoreFailover => SessionTier::TwoOnSentinel,
            _ => SessionTier::One,
        }
    }

    /// Whether this scenario, on `store`, needs `redis-server` (a Redis the harness starts).
    pub fn needs_redis_server(self, store: &StoreChoice) -> bool {
        self.session_tier().starts_redis(store)
    }

    /// The users' client addresses in this scenario.
    pub fn addressing(self) -> Addressing {
        match self {
            Scenario::MiddleProxy => Addressing::OneProxy,
            Scenario::Nat => Addressing::Nat(4),
            _ => Addressing::Distinct,
        }
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Scenario {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Scenario::ALL
            .into_iter()
            .find(|s| s.name() == text.trim())
            .ok_or_else(|| {
                format!(
                    "unknown scenario {text:?}; expected steady, backend-dies, scale-out, \
                     rolling-restart, middle-proxy, nat, store-outage, session-server-dies or \
                     store-failover"
                )
            })
    }
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The cluster could not be started or changed.
    #[error("{mode} / {scenario}: {source}")]
    Cluster {
        /// The mode.
        mode: Mode,
        /// The scenario.
        scenario: Scenario,
        /// What went wrong.
        #[source]
        source: ClusterError,
    },
    /// The HTTP clients of the users could not be built.
    #[error("HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// Settings shared by every run of a comparison.
#[derive(Debug, Clone)]
pub struct RunSettings {
    /// The binaries.
    pub bins: Binaries,
    /// The session server's store.
    pub store: StoreChoice,
    /// Simulated users per run.
    pub users: usize,
    /// Length of each run's load.
    pub duration: Duration,
    /// Most requests of one user in one run.
    pub max_requests: usize,
    /// Mean think time between two requests of a user.
    pub think: Duration,
    /// Directory for the runs' logs and configuration files.
    pub dir: PathBuf,
}

impl RunSettings {
    /// Defaults for `users` users and `duration` per run: 25 ms think time, budget of
    /// 1000 requests per user (the duration ends runs first), memory store.
    pub fn new(bins: Binaries, dir: PathBuf, users: usize, duration: Duration) -> RunSettings {
        RunSettings {
            bins,
            store: StoreChoice::Memory,
            users,
            duration,
            max_requests: 1000,
            think: Duration::from_millis(25),
            dir,
        }
    }
}

/// Runs one (mode, scenario) pair on a fresh cluster and measures it. `index` makes the run's
/// user names and files unique within the comparison.
pub async fn run_one(
    settings: &RunSettings,
    mode: Mode,
    scenario: Scenario,
    index: usize,
) -> Result<Row, RunError> {
    let cluster_error = |source| RunError::Cluster {
        mode,
        scenario,
        source,
    };
    ensure_dir(&settings.dir).map_err(cluster_error)?;
    let tag = format!("r{index:02}-{}-{}-{}", std::process::id(), mode, scenario);
    let spec = ClusterSpec {
        bins: settings.bins.clone(),
        mode,
        store: settings.store.clone(),
        session_tier: scenario.session_tier(),
        backends: BACKENDS,
        dir: settings.dir.clone(),
        tag: tag.clone(),
    };
    let mut cluster = Cluster::start(spec).await.map_err(cluster_error)?;
    let base = cluster.url();
    let load = LoadSettings {
        users: settings.users,
        max_requests: settings.max_requests,
        think: settings.think,
        addressing: scenario.addressing(),
        tag,
    };
    let started = Instant::now();
    // The failover's end is not known in advance: its users go on until the timeline says.
    let until = match scenario {
        Scenario::StoreFailover => OPEN_ENDED,
        _ => settings.duration,
    };
    let (deadline, users_deadline) = watch::channel(started + until);
    let (users, played) = tokio::join!(users::drive(&base, &load, users_deadline), async {
        let played = play(
            &mut cluster,
            scenario,
            started,
            settings.duration,
            &deadline,
        )
        .await;
        if played.is_err() {
            deadline.send_replace(Instant::now());
        }
        played
    },);
    let elapsed = started.elapsed();
    played.map_err(cluster_error)?;
    let reports = users::verify(&base, users?).await;
    let row = Row::from_reports(
        mode.name(),
        scenario.name(),
        &reports,
        &cluster.backend_names(),
        elapsed,
    );
    drop(cluster);
    Ok(row)
}

/// Where a comparison is, for a progress line.
#[derive(Debug, Clone, Copy)]
pub struct Progress<'a> {
    /// Runs finished.
    pub done: usize,
    /// Runs in all.
    pub total: usize,
    /// The run about to start (`None` when all are done).
    pub next: Option<(Mode, Scenario)>,
    /// The last finished run's row.
    pub last: Option<&'a Row>,
}

/// Runs every scenario for every mode, in order, calling `progress` before each run and once
/// at the end.
pub async fn run_matrix(
    settings: &RunSettings,
    modes: &[Mode],
    scenarios: &[Scenario],
    mut progress: impl FnMut(Progress<'_>),
) -> Result<Vec<Row>, RunError> {
    let pairs: Vec<(Mode, Scenario)> = modes
        .iter()
        .flat_map(|&m| scenarios.iter().map(move |&s| (m, s)))
        .collect();
    let mut rows: Vec<Row> = Vec::with_capacity(pairs.len());
    for (index, &(mode, scenario)) in pairs.iter().enumerate() {
        progress(Progress {
            done: index,
            total: pairs.len(),
            next: Some((mode, scenario)),
            last: rows.last(),
        });
        rows.push(run_one(settings, mode, scenario, index).await?);
    }
    progress(Progress {
        done: pairs.len(),
        total: pairs.len(),
        next: None,
        last: rows.last(),
    });
    Ok(rows)
}

/// Plays `scenario`'s timeline on `cluster`, from `started`, over `duration`; sets the users'
/// `deadline` when the timeline decides it.
async fn play(
    cluster: &mut Cluster,
    scenario: Scenario,
    started: Instant,
    duration: Duration,
    deadline: &watch::Sender<Instant>,
) -> Result<(), ClusterError> {
    let at = |fraction: f64| tokio::time::sleep_until(started + duration.mul_f64(fraction));
    match scenario {
        Scenario::Steady | Scenario::MiddleProxy | Scenario::Nat => {}
        Scenario::BackendDies => {
            at(0.4).await;
            tracing::info!(at = ?started.elapsed(), "killing backend s2");
            cluster.kill_backend(1);
        }
        Scenario::ScaleOut => {
            at(0.4).await;
            tracing::info!(at = ?started.elapsed(), "adding backend s4");
            cluster.add_backend().await?;
        }
        Scenario::RollingRestart => {
            for (index, fraction) in [0.15, 0.4, 0.65].into_iter().enumerate() {
                at(fraction).await;
                tracing::info!(at = ?started.elapsed(), backend = index + 1, "restarting backend");
                cluster.kill_backend(index);
                tokio::time::sleep(RESTART_GAP).await;
                cluster.restart_backend(index).await?;
            }
        }
        Scenario::StoreOutage => {
            at(0.3).await;
            tracing::info!(at = ?started.elapsed(), "killing the session server");
            cluster.kill_session_server(0);
            at(0.6).await;
            tracing::info!(at = ?started.elapsed(), "starting the session server again");
            cluster.start_session_server(0).await?;
        }
        Scenario::SessionServerDies => {
            at(0.4).await;
            tracing::info!(at = ?started.elapsed(), "killing session server 1 of 2");
            cluster.kill_session_server(0);
        }
        Scenario::StoreFailover => {
            at(0.4).await;
            tracing::info!(at = ?started.elapsed(), "killing the Redis primary");
            cluster.fail_over_store().await?;
            tracing::info!(at = ?started.elapsed(), "the Sentinel promoted the replica");
            let end = (Instant::now() + duration.mul_f64(AFTER_FAILOVER)).max(started + duration);
            deadline.send_replace(end);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_scenario_parses_from_its_name() {
        for scenario in Scenario::ALL {
            assert_eq!(scenario.name().parse::<Scenario>(), Ok(scenario));
        }
        assert!("meteor".parse::<Scenario>().is_err());
    }

    #[test]
    fn only_the_two_server_scenarios_start_a_redis_of_their_own_and_only_when_needed() {
        let memory = StoreChoice::Memory;
        let redis = StoreChoice::Redis("redis://127.0.0.1:6379".into());
        let starts: Vec<Scenario> = Scenario::ALL
            .into_iter()
            .filter(|s| s.needs_redis_server(&memory))
            .collect();
        assert_eq!(
            starts,
            [Scenario::SessionServerDies, Scenario::StoreFailover]
        );
        // On a store two servers can share, only the failover needs its own Redis set.
        assert!(!Scenario::SessionServerDies.needs_redis_server(&redis));
        assert!(Scenario::StoreFailover.needs_redis_server(&redis));
    }
}
