//! Bodies on their way through the proxy, all streamed: a client's upload to a backend
//! ([`TakeUpload`] over an [`UploadSlot`]), a backend's download to a client ([`Download`]),
//! and the wrapper every response to a client goes out in ([`ClientBody`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt as _;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use parking_lot::Mutex;
use tokio::time::{Instant, Sleep};

use super::conn::ConnState;
use crate::backend::Backend;

/// Errors of bodies the proxy relays.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Any body the proxy sends (upstream requests, client responses).
pub(crate) type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// A body of the given bytes.
pub(crate) fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    http_body_util::Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// How a client's streamed upload ended, when it ended badly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UploadFault {
    /// More than `max_body_bytes` (cut; 413).
    TooLarge,
    /// Nothing for the client idle timeout (cut; 408).
    Stalled,
    /// The client broke off (400).
    Aborted,
}

/// A client's streamed request body, shared by the tries of one request: the first try that
/// polls it takes it; until then it stays here, so a try that failed before sending anything
/// (connect error) leaves it for the next backend.
#[derive(Debug)]
pub(crate) struct UploadSlot {
    /// The body, until a try starts sending it.
    body: Mutex<Option<Upload>>,
    /// Set when the upload was cut or failed (0: no fault).
    fault: Arc<AtomicU8>,
}

impl UploadSlot {
    /// A slot for `body`, cut past `max` bytes or after `idle` without data.
    pub(crate) fn new(body: Incoming, max: u64, idle: Duration) -> Arc<Self> {
        let fault = Arc::new(AtomicU8::new(0));
        let upload = Upload {
            inner: body,
            seen: 0,
            max,
            idle_timeout: idle,
            idle: None,
            fault: fault.clone(),
        };
        Arc::new(UploadSlot {
            body: Mutex::new(Some(upload)),
            fault,
        })
    }

    /// Whether no try has started sending the body yet (so another may).
    pub(crate) fn unsent(&self) -> bool {
        self.body.lock().is_some()
    }

    /// The body for one try.
    pub(crate) fn body(self: &Arc<Self>) -> ProxyBody {
        TakeUpload {
            slot: self.clone(),
            body: None,
        }
        .boxed_unsync()
    }

    /// What went wrong with the upload, if anything.
    pub(crate) fn fault(&self) -> Option<UploadFault> {
        match self.fault.load(Ordering::Relaxed) {
            1 => Some(UploadFault::TooLarge),
            2 => Some(UploadFault::Stalled),
            3 => Some(UploadFault::Aborted),
            _ => None,
        }
    }
}

/// The client's body with its size cap and idle timeout.
#[derive(Debug)]
struct Upload {
    /// The client's body.
    inner: Incoming,
    /// Bytes relayed so far.
    seen: u64,
    /// `max_body_bytes`.
    max: u64,
    /// Longest wait for the next chunk.
    idle_timeout: Duration,
    /// Fires when the client stalled; armed while waiting.
    idle: Option<Pin<Box<Sleep>>>,
    /// Where faults are recorded.
    fault: Arc<AtomicU8>,
}

impl Upload {
    fn fail(
        &mut self,
        fault: UploadFault,
        message: String,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let code = match fault {
            UploadFault::TooLarge => 1,
            UploadFault::Stalled => 2,
            UploadFault::Aborted => 3,
        };
        self.fault.store(code, Ordering::Relaxed);
        Poll::Ready(Some(Err(message.into())))
    }
}

impl Body for Upload {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.idle = None;
                if let Some(data) = frame.data_ref() {
                    this.seen = this.seen.saturating_add(data.len() as u64);
                    if this.seen > this.max {
                        let message = format!("request body over {} bytes", this.max);
                        return this.fail(UploadFault::TooLarge, message);
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.fail(UploadFault::Aborted, format!("client body: {e}"))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let timeout = this.idle_timeout;
                let idle = this
                    .idle
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                if idle.as_mut().poll(cx).is_ready() {
                    let message = format!("client sent no body data for {timeout:?}");
                    return this.fail(UploadFault::Stalled, message);
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// One try's view of an [`UploadSlot`]: takes the body at the first poll.
#[derive(Debug)]
struct TakeUpload {
    /// Where the body waits.
    slot: Arc<UploadSlot>,
    /// The body, once taken.
    body: Option<Upload>,
}

impl Body for TakeUpload {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.body.is_none() {
            this.body = this.slot.body.lock().take();
        }
        match this.body.as_mut() {
            Some(body) => Pin::new(body).poll_frame(cx),
            // Another try took it: this one cannot send the body (never happens: tries are
            // sequential and a taken body is never retried).
            None => Poll::Ready(Some(Err(
                "request body already sent to another backend".into()
            ))),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.body {
            Some(body) => body.size_hint(),
            None => self
                .slot
                .body
                .lock()
                .as_ref()
                .map(Body::size_hint)
                .unwrap_or_default(),
        }
    }
}

/// Holds a backend's in-flight count (least-conn reads it) for as long as it lives, which is
/// until the response body is done, not just the head.
///
/// [`Backend::start_request`] hands out a guard borrowing the backend. An `async` block may own
/// both the `Arc<Backend>` and that guard; polled once, it runs up to a never-ready await with
/// the guard alive, and dropping it drops the guard.
pub(crate) struct InFlight {
    /// The `async` block owning the backend and its guard.
    _hold: Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl InFlight {
    /// Counts a request to `backend` as in flight.
    pub(crate) fn start(backend: Arc<Backend>) -> Self {
        let mut hold = Box::pin(async move {
            let _guard = backend.start_request();
            std::future::pending::<()>().await;
        });
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        let _ = hold.as_mut().poll(&mut cx);
        InFlight { _hold: hold }
    }
}

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InFlight")
    }
}

/// A backend's response body on its way to the client, cut when the backend stalls.
#[derive(Debug)]
pub(crate) struct Download {
    /// The backend's body.
    inner: Incoming,
    /// Longest wait for the next chunk (`response_timeout`).
    idle_timeout: Duration,
    /// Fires when the backend stalled; armed while waiting.
    idle: Option<Pin<Box<Sleep>>>,
    /// Keeps the request counted on the backend until the body is done.
    _in_flight: InFlight,
    /// The backend, for the log line.
    backend: String,
}

impl Download {
    /// Relays `inner`, cut after `idle_timeout` without data.
    pub(crate) fn new(
        inner: Incoming,
        idle_timeout: Duration,
        in_flight: InFlight,
        backend: String,
    ) -> Self {
        Download {
            inner,
            idle_timeout,
            idle: None,
            _in_flight: in_flight,
            backend,
        }
    }
}

impl Body for Download {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.idle = None;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                tracing::warn!(backend = %this.backend, error = %e, "backend response body failed");
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let timeout = this.idle_timeout;
                let idle = this.idle.get_or_insert_with(|| {
                    Box::pin(tokio::time::sleep_until(Instant::now() + timeout))
                });
                if idle.as_mut().poll(cx).is_ready() {
                    tracing::warn!(backend = %this.backend, ?timeout, "backend stalled mid-body; cut");
                    return Poll::Ready(Some(Err(
                        format!("backend sent nothing for {timeout:?}").into()
                    )));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Every response to a client goes out in this: when hyper is done with it (sent or dropped),
/// the connection's next request head is due.
#[derive(Debug)]
pub(crate) struct ClientBody {
    /// The response body.
    inner: ProxyBody,
    /// Told when the response is done.
    conn: Arc<ConnState>,
}

impl ClientBody {
    /// Wraps `inner` for a response on `conn`.
    pub(crate) fn new(inner: ProxyBody, conn: Arc<ConnState>) -> Self {
        ClientBody { inner, conn }
    }
}

impl Drop for ClientBody {
    fn drop(&mut self) {
        self.conn.response_done();
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
