//! The Watch flood: many `Watch` streams on the honest users' namespace, over a few HTTP/2
//! connections to the session server, with a valid read token (a leaked token, or a client
//! with a bug in its retry loop). Each watcher opens its stream, reads every event it gets
//! (so the server does the whole fan-out work), and when refused or ended opens it again
//! after a pause, until the phase's deadline. The server should refuse every stream past
//! `--max-watchers-per-namespace` with RESOURCE_EXHAUSTED and keep serving the lookups.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde::Serialize;
use session_proto::v1::WatchRequest;
use session_proto::v1::session_store_client::SessionStoreClient;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until, timeout_at};
use tonic::Code;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};

/// Bound on opening one connection of the flood.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the flood is.
#[derive(Debug, Clone)]
pub(crate) struct FloodSpec {
    /// The session server, `http://host:port`.
    pub(crate) target: String,
    /// A read token of `namespace`.
    pub(crate) token: String,
    /// The namespace watched.
    pub(crate) namespace: String,
    /// Watchers (streams it tries to keep open).
    pub(crate) watchers: usize,
    /// HTTP/2 connections they share.
    pub(crate) connections: usize,
    /// Pause before opening a refused or ended stream again.
    pub(crate) retry: Duration,
    /// The server's limit, for the report.
    pub(crate) limit: usize,
    /// The address the connections come from.
    pub(crate) source: Option<IpAddr>,
}

/// What the Watch flood got.
#[derive(Debug, Clone, Serialize)]
pub struct WatchReport {
    /// Watchers.
    pub watchers: usize,
    /// HTTP/2 connections they shared.
    pub connections: usize,
    /// The server's `--max-watchers-per-namespace`.
    pub limit: usize,
    /// Streams the watchers tried to open.
    pub attempts: u64,
    /// Opens refused with RESOURCE_EXHAUSTED (the namespace's limit).
    pub refused: u64,
    /// Most streams open at once, as the watchers counted them.
    pub peak_open: usize,
    /// Open streams the server ended before the phase did (RESOURCE_EXHAUSTED when the
    /// watcher fell behind, or a clean end).
    pub ended_by_server: u64,
    /// Of those, the ones ended because the watcher fell behind.
    pub fell_behind: u64,
    /// Opens or streams that failed otherwise (any other code).
    pub other_errors: u64,
    /// Events the watchers received.
    pub events: u64,
}

/// What one watcher saw.
#[derive(Debug, Default)]
struct WatchTally {
    attempts: u64,
    refused: u64,
    ended_by_server: u64,
    fell_behind: u64,
    other_errors: u64,
    events: u64,
}

/// Streams open now and at most, over every watcher.
#[derive(Debug, Default)]
struct OpenStreams {
    now: AtomicUsize,
    peak: AtomicUsize,
}

impl OpenStreams {
    fn opened(&self) {
        let now = self.now.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }

    fn closed(&self) {
        self.now.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The running flood.
#[derive(Debug)]
pub(crate) struct Flood {
    /// What it is.
    spec: FloodSpec,
    /// One task per watcher.
    tasks: Vec<JoinHandle<WatchTally>>,
    /// Shared by the watchers.
    open: Arc<OpenStreams>,
}

impl Flood {
    /// Opens the connections and starts the watchers; they stop by themselves at `deadline`.
    pub(crate) async fn start(spec: &FloodSpec, deadline: Instant) -> Result<Flood, String> {
        let open = Arc::new(OpenStreams::default());
        let mut tasks = Vec::with_capacity(spec.watchers);
        if spec.watchers == 0 {
            return Ok(Flood {
                spec: spec.clone(),
                tasks,
                open,
            });
        }
        let token: MetadataValue<Ascii> = format!("Bearer {}", spec.token)
            .parse()
            .map_err(|e| format!("the Watch token is not a header value: {e}"))?;
        let endpoint = Endpoint::from_shared(spec.target.clone())
            .map_err(|e| format!("{}: {e}", spec.target))?
            .tcp_nodelay(true)
            .connect_timeout(CONNECT_TIMEOUT)
            .local_address(spec.source);
        let mut channels: Vec<Channel> = Vec::with_capacity(spec.connections);
        for _ in 0..spec.connections {
            // `connect` (not `connect_lazy`): each channel is its own HTTP/2 connection.
            let channel = endpoint
                .connect()
                .await
                .map_err(|e| format!("the Watch flood cannot connect to {}: {e}", spec.target))?;
            channels.push(channel);
        }
        for index in 0..spec.watchers {
            let client = SessionStoreClient::new(channels[index % channels.len()].clone());
            tasks.push(tokio::spawn(watcher(
                client,
                token.clone(),
                spec.namespace.clone(),
                spec.retry,
                deadline,
                open.clone(),
            )));
        }
        Ok(Flood {
            spec: spec.clone(),
            tasks,
            open,
        })
    }

    /// Waits (until `bound` at most) for the watchers and sums what they got.
    pub(crate) async fn finish(self, bound: Instant) -> WatchReport {
        let mut report = WatchReport {
            watchers: self.spec.watchers,
            connections: self.spec.connections,
            limit: self.spec.limit,
            attempts: 0,
            refused: 0,
            peak_open: 0,
            ended_by_server: 0,
            fell_behind: 0,
            other_errors: 0,
            events: 0,
        };
        for tally in super::join_bounded(self.tasks, bound).await {
            report.attempts += tally.attempts;
            report.refused += tally.refused;
            report.ended_by_server += tally.ended_by_server;
            report.fell_behind += tally.fell_behind;
            report.other_errors += tally.other_errors;
            report.events += tally.events;
        }
        report.peak_open = self.open.peak.load(Ordering::Relaxed);
        report
    }
}

/// One watcher: open, read to the end, pause, again, until `deadline`.
async fn watcher(
    mut client: SessionStoreClient<Channel>,
    token: MetadataValue<Ascii>,
    namespace: String,
    retry: Duration,
    deadline: Instant,
    open: Arc<OpenStreams>,
) -> WatchTally {
    let mut tally = WatchTally::default();
    let pause = || sleep_until((Instant::now() + retry).min(deadline));
    while Instant::now() < deadline {
        tally.attempts += 1;
        let mut request = tonic::Request::new(WatchRequest {
            namespace: namespace.clone(),
            user_id: String::new(),
        });
        request
            .metadata_mut()
            .insert("authorization", token.clone());
        let stream = match timeout_at(deadline, client.watch(request)).await {
            Err(_) => break,
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => {
                if status.code() == Code::ResourceExhausted {
                    tally.refused += 1;
                } else {
                    tracing::debug!(%status, "a Watch open failed");
                    tally.other_errors += 1;
                }
                pause().await;
                continue;
            }
        };
        open.opened();
        let mut stream = stream;
        loop {
            let message = tokio::select! {
                message = stream.message() => message,
                () = sleep_until(deadline) => break,
            };
            match message {
                Ok(Some(_)) => tally.events += 1,
                Ok(None) => {
                    tally.ended_by_server += 1;
                    break;
                }
                Err(status) => {
                    if status.code() == Code::ResourceExhausted {
                        tally.ended_by_server += 1;
                        tally.fell_behind += 1;
                    } else {
                        tracing::debug!(%status, "a Watch stream failed");
                        tally.other_errors += 1;
                    }
                    break;
                }
            }
        }
        // Dropping the stream cancels it: the server gives its place back.
        drop(stream);
        open.closed();
        if Instant::now() < deadline {
            pause().await;
        }
    }
    tally
}
