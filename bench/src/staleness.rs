//! Staleness, measured honestly: two session servers on one store, writes through one and
//! reads through the other, counting the reads that return a version older than one already
//! acknowledged to the same client (a read that does not see the caller's own acknowledged
//! write). Each such read is then repeated until the reader catches up, and the longest wait is
//! reported. Caches (a near cache in the server, a lookup cache in the proxy) are judged by it:
//! one is on by default only if a run of many trials under load shows none.
//!
//! ```no_run
//! # async fn example() -> Result<(), bench::load_grpc::LoadError> {
//! use bench::staleness::{StalenessSettings, run};
//! let report = run(&StalenessSettings {
//!     writer: "http://127.0.0.1:50051".into(),
//!     reader: "http://127.0.0.1:50052".into(),
//!     sessions: 16,
//!     trials: 10_000,
//!     touch: true,
//!     catch_up_within: std::time::Duration::from_secs(5),
//! })
//! .await?;
//! println!("{report}");
//! # Ok(()) }
//! ```

use std::fmt;
use std::time::{Duration, Instant};

use session_proto::v1::session_store_client::SessionStoreClient;
use session_proto::v1::{CreateRequest, GetRequest, UpdateRequest};
use tonic::transport::{Channel, Endpoint};

use crate::load_grpc::LoadError;

/// What a staleness run does.
#[derive(Debug, Clone)]
pub struct StalenessSettings {
    /// The server every write goes through.
    pub writer: String,
    /// The server every read goes through (another server on the same store).
    pub reader: String,
    /// Sessions written and read at once, one client task each.
    pub sessions: usize,
    /// Write-then-read trials in all (spread over the sessions).
    pub trials: u64,
    /// Whether reads touch (`Get{touch}`, the path a near cache may serve).
    pub touch: bool,
    /// How long a stale reader is polled before the run gives up on it (counted as never
    /// caught up).
    pub catch_up_within: Duration,
}

/// What a staleness run saw.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StalenessReport {
    /// Write-then-read trials made.
    pub trials: u64,
    /// Reads that returned a version older than the caller's acknowledged write.
    pub stale_reads: u64,
    /// The longest a stale reader took to show the acknowledged version.
    pub worst_delay: Duration,
    /// Stale readers that did not catch up within `catch_up_within`.
    pub never_caught_up: u64,
    /// Calls that failed (any code).
    pub errors: u64,
    /// How long the run took.
    pub elapsed: Duration,
}

impl fmt::Display for StalenessReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "staleness: {} trials in {:.1} s, {} stale reads (worst catch-up {:?}, {} never \
             caught up), {} errors",
            self.trials,
            self.elapsed.as_secs_f64(),
            self.stale_reads,
            self.worst_delay,
            self.never_caught_up,
            self.errors
        )
    }
}

impl StalenessReport {
    fn merge(&mut self, other: &StalenessReport) {
        self.trials += other.trials;
        self.stale_reads += other.stale_reads;
        self.worst_delay = self.worst_delay.max(other.worst_delay);
        self.never_caught_up += other.never_caught_up;
        self.errors += other.errors;
    }
}

async fn channel(target: &str) -> Result<Channel, LoadError> {
    let endpoint =
        Endpoint::from_shared(target.to_owned()).map_err(|source| LoadError::Target {
            target: target.to_owned(),
            source,
        })?;
    endpoint
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|source| LoadError::Connect {
            target: target.to_owned(),
            source,
        })
}

/// Runs the trials: every session task writes its session through the writer (a plain
/// Update), then reads it through the reader, `trials / sessions` times.
pub async fn run(settings: &StalenessSettings) -> Result<StalenessReport, LoadError> {
    let writer = channel(&settings.writer).await?;
    let reader = channel(&settings.reader).await?;
    let sessions = settings.sessions.max(1);
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(sessions);
    for n in 0..sessions {
        let trials = settings.trials / sessions as u64
            + u64::from((n as u64) < settings.trials % sessions as u64);
        let (writer, reader) = (writer.clone(), reader.clone());
        let (touch, within) = (settings.touch, settings.catch_up_within);
        tasks.push(tokio::spawn(async move {
            trial_loop(writer, reader, trials, touch, within).await
        }));
    }
    let mut report = StalenessReport::default();
    for task in tasks {
        let part = task.await.map_err(LoadError::Worker)??;
        report.merge(&part);
    }
    report.elapsed = start.elapsed();
    Ok(report)
}

/// One session's trials.
async fn trial_loop(
    writer: Channel,
    reader: Channel,
    trials: u64,
    touch: bool,
    within: Duration,
) -> Result<StalenessReport, LoadError> {
    let mut writer = SessionStoreClient::new(writer);
    let reader = SessionStoreClient::new(reader);
    let created = writer
        .create(CreateRequest {
            attrs: [("n".to_owned(), b"0".to_vec())].into(),
            ttl: Some(prost_types::Duration {
                seconds: 600,
                nanos: 0,
            }),
            ..CreateRequest::default()
        })
        .await
        .map_err(LoadError::Pool)?
        .into_inner();
    let id = created.id;
    let mut report = StalenessReport::default();
    for n in 1..=trials {
        report.trials += 1;
        let written = writer
            .update(UpdateRequest {
                id: id.clone(),
                set: [("n".to_owned(), n.to_string().into_bytes())].into(),
                ..UpdateRequest::default()
            })
            .await;
        let acked = match written {
            Ok(session) => session.into_inner().version,
            Err(_) => {
                report.errors += 1;
                continue;
            }
        };
        let read = |reader: &SessionStoreClient<Channel>| {
            let request = GetRequest {
                id: id.clone(),
                touch,
                ..GetRequest::default()
            };
            let mut reader = reader.clone();
            async move { reader.get(request).await.map(|r| r.into_inner().version) }
        };
        match read(&reader).await {
            Ok(version) if version >= acked => {}
            Ok(_) => {
                report.stale_reads += 1;
                let stale_at = Instant::now();
                loop {
                    match read(&reader).await {
                        Ok(version) if version >= acked => {
                            report.worst_delay = report.worst_delay.max(stale_at.elapsed());
                            break;
                        }
                        Ok(_) if stale_at.elapsed() < within => {
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                        Ok(_) => {
                            report.never_caught_up += 1;
                            break;
                        }
                        Err(_) => {
                            report.errors += 1;
                            break;
                        }
                    }
                }
            }
            Err(_) => report.errors += 1,
        }
    }
    Ok(report)
}
