//! The deadline of every SessionStore call but Watch (`--call-timeout`, or the caller's
//! `grpc-timeout` when shorter): a call still running then is dropped (its store call with it)
//! and answered DEADLINE_EXCEEDED, as gRPC says a missed deadline is.
//!
//! tonic enforces a caller's `grpc-timeout` on its own too, but answers CANCELLED ("Timeout
//! expired"), which a client cannot tell from its own cancel. tonic's timer wraps this service
//! and is made after [`CallDeadline::call`] returns, so this deadline, made inside that call
//! for the same duration or a shorter one, falls on the same timer tick or an earlier one; and
//! tonic polls this service's answer before its own timer, so the caller gets
//! DEADLINE_EXCEEDED. Health and reflection calls are not bounded here (no store behind them).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::future::Either;
use session_proto::v1::session_store_server::SessionStoreServer;
use tonic::body::Body;
use tonic::codegen::Service;
use tonic::codegen::http::{HeaderMap, Request, Response};
use tonic::server::NamedService;
use tonic::{Code, Status};

use crate::metrics::{METHODS, Metrics};
use crate::service::SessionService;

/// The header of a caller's deadline (gRPC over HTTP/2).
const GRPC_TIMEOUT: &str = "grpc-timeout";

/// The one SessionStore method the deadline does not bound: the Watch stream lives as long as
/// its caller wants.
const STREAMING_METHOD: &str = "Watch";

/// What a call that has a deadline answers, boxed: the deadline's timer cannot be pinned in
/// place without unsafe code or a projection crate.
type Bounded = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

/// `inner` (the server's top-level service) with a deadline on each unary SessionStore call.
#[derive(Clone)]
pub(crate) struct CallDeadline<S> {
    /// The service that answers.
    inner: S,
    /// The server's deadline of one call.
    timeout: Duration,
    /// Where a call that missed its deadline is counted (its own bookkeeping is dropped with
    /// it). Shared, so that a call takes one reference count, not a copy of every metric handle.
    metrics: Arc<Metrics>,
}

impl<S> CallDeadline<S> {
    /// `inner` with calls bounded by `timeout`, recorded in `metrics` when they miss it.
    pub(crate) fn new(inner: S, timeout: Duration, metrics: Metrics) -> Self {
        CallDeadline {
            inner,
            timeout,
            metrics: Arc::new(metrics),
        }
    }
}

/// The SessionStore method `path` names when it is one the deadline bounds.
fn bounded_method(path: &str) -> Option<&'static str> {
    let method = path
        .strip_prefix('/')?
        .strip_prefix(<SessionStoreServer<SessionService> as NamedService>::NAME)?
        .strip_prefix('/')?;
    METHODS
        .into_iter()
        .find(|&known| known == method && known != STREAMING_METHOD)
}

/// The caller's deadline from its `grpc-timeout` header: 1 to 8 digits and a unit (`H`, `M`,
/// `S`, `m`, `u`, `n`). `None` when there is none or it is malformed (ignored, as tonic does).
fn caller_timeout(headers: &HeaderMap) -> Option<Duration> {
    let (unit, digits) = headers.get(GRPC_TIMEOUT)?.as_bytes().split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // At most 8 digits: no overflow, in any unit.
    let amount = digits
        .iter()
        .fold(0u64, |sum, digit| sum * 10 + u64::from(digit - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(amount * 60 * 60),
        b'M' => Duration::from_secs(amount * 60),
        b'S' => Duration::from_secs(amount),
        b'm' => Duration::from_millis(amount),
        b'u' => Duration::from_micros(amount),
        b'n' => Duration::from_nanos(amount),
        _ => return None,
    })
}

impl<S> Service<Request<Body>> for CallDeadline<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Either<Bounded, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let Some(method) = bounded_method(request.uri().path()) else {
            return Either::Right(self.inner.call(request));
        };
        let (timeout, callers) = match caller_timeout(request.headers()) {
            Some(caller) if caller < self.timeout => (caller, true),
            _ => (self.timeout, false),
        };
        let start = Instant::now();
        // Made here, before tonic makes its own timer for the caller's deadline (see above).
        let deadline = tokio::time::Instant::from_std(start) + timeout;
        let call = self.inner.call(request);
        let metrics = Arc::clone(&self.metrics);
        Either::Left(Box::pin(async move {
            match tokio::time::timeout_at(deadline, call).await {
                Ok(answer) => answer,
                Err(_) => {
                    let code = Code::DeadlineExceeded;
                    metrics.observe_call(method, code, start.elapsed());
                    let whose = if callers {
                        "the caller's grpc-timeout"
                    } else {
                        "the server's call-timeout"
                    };
                    let message = format!("{method} did not finish within {whose} ({timeout:?})");
                    // The server's own deadline missed is the server's failure; the caller's
                    // shorter one, the caller's choice.
                    if callers {
                        tracing::debug!(method, ?code, message, "call refused");
                    } else {
                        tracing::warn!(method, ?code, message, "call failed");
                    }
                    Ok(Status::deadline_exceeded(message).into_http())
                }
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_but_watch_is_bounded() {
        assert_eq!(bounded_method("/session.v1.SessionStore/Get"), Some("Get"));
        assert_eq!(
            bounded_method("/session.v1.SessionStore/ListByUser"),
            Some("ListByUser")
        );
        for other in [
            "/session.v1.SessionStore/Watch",
            "/session.v1.SessionStore/Unknown",
            "/grpc.health.v1.Health/Check",
            "/session.v1.SessionStoreX/Get",
        ] {
            assert_eq!(bounded_method(other), None, "{other}");
        }
    }

    #[test]
    fn the_callers_grpc_timeout_is_read_in_every_unit() {
        let timeout = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(GRPC_TIMEOUT, value.parse().unwrap());
            caller_timeout(&headers)
        };
        assert_eq!(timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(timeout("10S"), Some(Duration::from_secs(10)));
        assert_eq!(timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(
            timeout("99999999u"),
            Some(Duration::from_micros(99_999_999))
        );
        assert_eq!(timeout("5n"), Some(Duration::from_nanos(5)));
        for malformed in ["", "S", "123456789S", "10", "10s", "-1S", "1.5S"] {
            assert_eq!(timeout(malformed), None, "{malformed:?}");
        }
        assert_eq!(caller_timeout(&HeaderMap::new()), None);
    }
}
