//! Health that tells the truth: `grpc.health.v1.Health` answers for the server as a whole (`""`)
//! and for `session.v1.SessionStore`, and both follow the store. A background task reads the
//! store's epoch ([`SessionStore::current_epoch`], its cheapest read) every `--health-interval`,
//! bounded by `--store-timeout`: a failed or late read makes both names NOT_SERVING, the next
//! good one SERVING again. The first check runs as the server starts, without delaying it: a
//! health call that comes before its result waits for it (at most the store timeout), so no
//! probe is told SERVING before the store has answered once. At shutdown both names become
//! NOT_SERVING for good (no later check can undo it) and every open health Watch stream sends
//! that and ends, so that a probe holding a Watch open never keeps the graceful drain from
//! finishing.
//!
//! This is our own implementation of the health service rather than `tonic_health`'s reporter:
//! that one's Watch streams end only when their status channel is dropped, which never happens
//! while the server drains (its service holds the channels), so one open Watch held shutdown
//! until `--shutdown-grace` ran out. Check and Watch answer as `tonic_health` does otherwise
//! (NOT_FOUND for a name that is not served; a Watch sends the status at once, then each
//! change).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use crate::metrics::Metrics;
use crate::store::SessionStore;

/// The names health answers for: the server as a whole, and the API service.
pub(crate) const SERVICES: [&str; 2] = ["", session_proto::SERVICE_NAME];

/// What the server is, as far as health is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The first check of the store has not finished: health calls wait for it.
    Starting,
    /// The last check of the store succeeded: SERVING.
    StoreUp,
    /// The last check of the store failed: NOT_SERVING.
    StoreDown,
    /// Shutdown has begun: NOT_SERVING for good, and Watch streams end.
    Stopped,
}

impl State {
    /// The status health reports in this state (`None` while `Starting`: wait).
    fn status(self) -> Option<ServingStatus> {
        match self {
            State::Starting => None,
            State::StoreUp => Some(ServingStatus::Serving),
            State::StoreDown | State::Stopped => Some(ServingStatus::NotServing),
        }
    }
}

/// The server's health, shared by the store checker, the shutdown signal and the health
/// service (each clone is the same state).
#[derive(Debug, Clone)]
pub(crate) struct Health {
    /// The state; Watch streams follow its changes, and end once it is `Stopped` (or the
    /// sender is gone).
    state: Arc<watch::Sender<State>>,
}

impl Health {
    /// Health waiting for its first check of the store.
    fn new() -> Health {
        Health {
            state: Arc::new(watch::Sender::new(State::Starting)),
        }
    }

    /// Records a check of the store: the state before it when this changed it, `None` when
    /// not. Nothing changes once shutdown has begun, so a check that finishes after
    /// [`Health::stop`] cannot turn the server SERVING again.
    fn store_checked(&self, up: bool) -> Option<State> {
        let next = if up { State::StoreUp } else { State::StoreDown };
        let mut before = None;
        self.state.send_if_modified(|state| {
            if *state == State::Stopped || *state == next {
                return false;
            }
            before = Some(std::mem::replace(state, next));
            true
        });
        before
    }

    /// Shutdown has begun: NOT_SERVING from now on, and every health Watch stream sends it (if
    /// it had not already) and ends.
    pub(crate) fn stop(&self) {
        self.state.send_replace(State::Stopped);
    }

    /// The `grpc.health.v1.Health` service answering from this state.
    pub(crate) fn service(&self) -> HealthServer<HealthService> {
        HealthServer::new(HealthService {
            health: self.clone(),
        })
    }
}

/// Checks the store in the background and keeps a [`Health`] and the `stickless_store_up`
/// gauge up to date; the task is stopped when this is dropped.
#[derive(Debug)]
pub(crate) struct StoreChecker {
    /// The checking task, aborted on drop (also when the server future is dropped without a
    /// shutdown), so that it never outlives the server or keeps the store alive.
    task: JoinHandle<()>,
}

impl StoreChecker {
    /// Checks `store` at once, then every `interval`, in the background, each check bounded by
    /// `timeout`. Gives the health to serve and the checker to drop at shutdown.
    pub(crate) fn start(
        store: Arc<dyn SessionStore>,
        metrics: Metrics,
        interval: Duration,
        timeout: Duration,
    ) -> (Health, StoreChecker) {
        let health = Health::new();
        let task = tokio::spawn(check_every(
            store,
            health.clone(),
            metrics,
            interval,
            timeout,
        ));
        (health, StoreChecker { task })
    }
}

impl Drop for StoreChecker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One check: `Ok` when the store answered its epoch read within `timeout`, else why not.
async fn check(store: &dyn SessionStore, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, store.current_epoch()).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

/// Checks `store` at once and then every `interval`, for as long as it is not aborted,
/// recording each result and logging each change (a store down at warn, back at info).
async fn check_every(
    store: Arc<dyn SessionStore>,
    health: Health,
    metrics: Metrics,
    interval: Duration,
    timeout: Duration,
) {
    let mut ticks = tokio::time::interval(interval);
    // A check slower than the interval delays the next one; checks never pile up.
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let result = check(store.as_ref(), timeout).await;
        metrics.set_store_up(result.is_ok());
        let Some(before) = health.store_checked(result.is_ok()) else {
            continue;
        };
        let kind = store.kind();
        match result {
            Err(why) => {
                tracing::warn!(store = kind, %why, "health: NOT_SERVING, the store cannot be reached");
            }
            Ok(()) if before == State::Starting => {
                tracing::debug!(store = kind, "health: SERVING, the store answered");
            }
            Ok(()) => tracing::info!(store = kind, "health: SERVING, the store answers again"),
        }
    }
}

/// The `grpc.health.v1.Health` service of a [`Health`].
#[derive(Debug)]
pub(crate) struct HealthService {
    /// What it reports.
    health: Health,
}

impl HealthService {
    /// The state's receiver for `service`, or NOT_FOUND for a name health does not answer for.
    fn subscribe(&self, service: &str) -> Result<watch::Receiver<State>, Status> {
        if SERVICES.contains(&service) {
            Ok(self.health.state.subscribe())
        } else {
            Err(Status::not_found("service not registered"))
        }
    }
}

/// A health Watch stream.
type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

/// The answer carrying `status`.
fn response(status: ServingStatus) -> HealthCheckResponse {
    HealthCheckResponse {
        status: status.into(),
    }
}

#[tonic::async_trait]
impl tonic_health::pb::health_server::Health for HealthService {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let mut receiver = self.subscribe(&request.get_ref().service)?;
        // Before the first check's result: wait for it (the check is bounded by the store
        // timeout; shutdown ends the wait too).
        let status = receiver
            .wait_for(|state| state.status().is_some())
            .await
            .ok()
            .and_then(|state| state.status())
            .unwrap_or(ServingStatus::NotServing);
        Ok(Response::new(response(status)))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let receiver = self.subscribe(&request.get_ref().service)?;
        Ok(Response::new(Box::pin(statuses(receiver))))
    }
}

/// The statuses of a Watch: the current one at once (after the first check, while it is
/// under way), then each change of status (a change of state that keeps the status, such as a
/// store down at shutdown, sends nothing), ending once shutdown has begun, right after
/// NOT_SERVING was sent.
fn statuses(
    receiver: watch::Receiver<State>,
) -> impl Stream<Item = Result<HealthCheckResponse, Status>> + Send {
    // (receiver, status last sent: `None` before the first message).
    let start = (receiver, None::<ServingStatus>);
    futures::stream::unfold(start, |(mut receiver, sent)| async move {
        loop {
            let state = *receiver.borrow_and_update();
            if let Some(status) = state.status() {
                if sent != Some(status) {
                    return Some((Ok(response(status)), (receiver, Some(status))));
                }
                if state == State::Stopped {
                    return None;
                }
            }
            if receiver.changed().await.is_err() {
                return None;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use futures::StreamExt as _;

    use super::*;

    /// The next status of a Watch stream, `None` when it ended.
    async fn next(
        stream: &mut (impl Stream<Item = Result<HealthCheckResponse, Status>> + Unpin),
    ) -> Option<ServingStatus> {
        let item = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("a Watch message or its end within 10s");
        item.map(|r| r.expect("no error").status())
    }

    #[tokio::test]
    async fn no_check_after_shutdown_makes_the_server_serving_again() {
        let health = Health::new();
        assert_eq!(health.store_checked(false), Some(State::Starting));
        assert_eq!(health.store_checked(false), None);
        assert_eq!(health.store_checked(true), Some(State::StoreDown));
        health.stop();
        assert_eq!(health.store_checked(true), None);
        assert_eq!(health.store_checked(false), None);
        assert_eq!(*health.state.borrow(), State::Stopped);
    }

    #[tokio::test]
    async fn watch_sends_each_change_then_not_serving_and_ends_at_shutdown() {
        let health = Health::new();
        let mut watch = Box::pin(statuses(health.state.subscribe()));
        // Nothing before the first check's result.
        let early = tokio::time::timeout(Duration::from_millis(50), watch.next()).await;
        assert!(early.is_err(), "{early:?}");
        health.store_checked(true);
        assert_eq!(next(&mut watch).await, Some(ServingStatus::Serving));
        health.store_checked(false);
        assert_eq!(next(&mut watch).await, Some(ServingStatus::NotServing));
        health.store_checked(true);
        assert_eq!(next(&mut watch).await, Some(ServingStatus::Serving));
        health.stop();
        assert_eq!(next(&mut watch).await, Some(ServingStatus::NotServing));
        assert_eq!(next(&mut watch).await, None);
    }

    #[tokio::test]
    async fn watch_of_a_server_already_not_serving_ends_at_shutdown_without_repeating() {
        let health = Health::new();
        health.store_checked(false);
        let mut watch = Box::pin(statuses(health.state.subscribe()));
        assert_eq!(next(&mut watch).await, Some(ServingStatus::NotServing));
        health.stop();
        assert_eq!(next(&mut watch).await, None);
        // A Watch begun after shutdown gets the status once and ends.
        let mut late = Box::pin(statuses(health.state.subscribe()));
        assert_eq!(next(&mut late).await, Some(ServingStatus::NotServing));
        assert_eq!(next(&mut late).await, None);
    }
}
