//! Checking how a call fails while its store is down: with the error an outage must give, and
//! within the store's timeout plus a second.

use std::fmt::Debug;
use std::future::Future;
use std::time::{Duration, Instant};

use session_server::store::StoreError;
use tonic::Code;

/// The slack a failing call gets on top of the store's timeout.
const SLACK: Duration = Duration::from_secs(1);

/// Whether a store error is one an outage gives (the caller may retry later).
pub fn is_outage(error: &StoreError) -> bool {
    matches!(error, StoreError::Unavailable(_) | StoreError::Timeout(_))
}

/// Whether a gRPC call failed as the server answers while its store cannot be reached.
pub fn is_unavailable(status: &tonic::Status) -> bool {
    status.code() == Code::Unavailable
}

/// Whether a gRPC call failed as the server answers while its store is down, where the server
/// cannot tell an unreachable store (UNAVAILABLE) from a silent one (DEADLINE_EXCEEDED): a
/// dying cluster node, a database whose pool gets no connection within the timeout.
pub fn is_outage_status(status: &tonic::Status) -> bool {
    matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded)
}

/// Runs `call` and checks it fails with an error `expected` accepts, within `timeout` plus a
/// second. `what` names the call in a failure.
pub async fn fails_within<T: Debug, E: Debug>(
    what: &str,
    timeout: Duration,
    call: impl Future<Output = Result<T, E>>,
    expected: impl Fn(&E) -> bool,
) {
    let started = Instant::now();
    let result = call.await;
    assert!(
        result.as_ref().is_err_and(expected),
        "{what} gave {result:?}"
    );
    let took = started.elapsed();
    assert!(took < timeout + SLACK, "{what} took {took:?}");
}

/// Runs a store `call` and checks it fails as an outage ([`is_outage`]) within `timeout` (the
/// store's) plus a second.
pub async fn fails_as_outage<T: Debug>(
    what: &str,
    timeout: Duration,
    call: impl Future<Output = Result<T, StoreError>>,
) {
    fails_within(what, timeout, call, is_outage).await;
}
