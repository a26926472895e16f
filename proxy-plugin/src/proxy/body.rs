//! Bodies on their way through the proxy, all streamed: what goes to a backend
//! ([`UpstreamBody`]: in memory, or a client's upload through an [`UploadSlot`]), a backend's
//! download to a client ([`Download`]), and the wrapper every response to a client goes out in
//! ([`ClientBody`]). Enums rather than boxed trait objects: a request makes no allocation for
//! its bodies.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use parking_lot::Mutex;
use tokio::time::{Instant, Sleep};

use super::conn::ConnState;
use super::upstream::Pooled;
use crate::backend::Backend;

/// Errors of bodies the proxy relays.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A body sent to a backend.
#[derive(Debug)]
pub(crate) enum UpstreamBody {
    /// Bytes in memory (taken when sent; none for an empty body).
    Full(Option<Bytes>),
    /// A client's streamed upload.
    Upload(TakeUpload),
}

impl UpstreamBody {
    /// A body of `bytes`.
    pub(crate) fn full(bytes: Bytes) -> Self {
        UpstreamBody::Full((!bytes.is_empty()).then_some(bytes))
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            UpstreamBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            UpstreamBody::Upload(upload) => Pin::new(upload).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Full(bytes) => bytes.is_none(),
            UpstreamBody::Upload(upload) => upload.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            UpstreamBody::Upload(upload) => upload.size_hint(),
        }
    }
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
    pub(crate) fn body(self: &Arc<Self>) -> UpstreamBody {
        UpstreamBody::Upload(TakeUpload {
            slot: self.clone(),
            body: None,
        })
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
pub(crate) struct TakeUpload {
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
#[derive(Debug)]
pub(crate) struct InFlight {
    /// The backend the request went to.
    backend: Arc<Backend>,
}

impl InFlight {
    /// Counts a request to `backend` as in flight.
    pub(crate) fn start(backend: Arc<Backend>) -> Self {
        backend.request_started();
        InFlight { backend }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.backend.request_finished();
    }
}

/// A backend's response body on its way to the client, cut when the backend stalls. Its
/// connection goes back to the pool once the body has been read to the end.
#[derive(Debug)]
pub(crate) struct Download {
    /// The backend's body.
    inner: Incoming,
    /// Longest wait for the next chunk (`response_timeout`).
    idle_timeout: Duration,
    /// Fires when the backend stalled; armed while waiting.
    idle: Option<Pin<Box<Sleep>>>,
    /// Keeps the request counted on the backend until the body is done; names it in logs.
    in_flight: InFlight,
    /// The connection the body arrives on, parked when it is complete.
    conn: Option<Pooled>,
}

impl Download {
    /// Relays `inner`, cut after `idle_timeout` without data; `conn` is parked at its end.
    pub(crate) fn new(
        inner: Incoming,
        idle_timeout: Duration,
        in_flight: InFlight,
        conn: Pooled,
    ) -> Self {
        let mut download = Download {
            inner,
            idle_timeout,
            idle: None,
            in_flight,
            conn: Some(conn),
        };
        download.park_if_complete();
        download
    }

    /// Gives the connection back once nothing of the response is left on it.
    fn park_if_complete(&mut self) {
        if self.inner.is_end_stream()
            && let Some(conn) = self.conn.take()
        {
            conn.park();
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
                this.park_if_complete();
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                // The connection is closed, not parked.
                this.conn = None;
                let backend = &this.in_flight.backend.name;
                tracing::warn!(%backend, error = %e, "backend response body failed");
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                if let Some(conn) = this.conn.take() {
                    conn.park();
                }
                Poll::Ready(None)
            }
            Poll::Pending => {
                let timeout = this.idle_timeout;
                let idle = this.idle.get_or_insert_with(|| {
                    Box::pin(tokio::time::sleep_until(Instant::now() + timeout))
                });
                if idle.as_mut().poll(cx).is_ready() {
                    this.conn = None;
                    let backend = &this.in_flight.backend.name;
                    tracing::warn!(%backend, ?timeout, "backend stalled mid-body; cut");
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

/// A response body to a client: a backend's, or the proxy's own text.
#[derive(Debug)]
pub(crate) enum ResponseBody {
    /// Relayed from a backend.
    Download(Download),
    /// Bytes in memory (taken when sent).
    Full(Option<Bytes>),
}

impl ResponseBody {
    /// A body of `bytes`.
    pub(crate) fn full(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        ResponseBody::Full((!bytes.is_empty()).then_some(bytes))
    }
}

/// Every response to a client goes out in this: when hyper is done with it (sent or dropped),
/// the connection's next request head is due.
#[derive(Debug)]
pub(crate) struct ClientBody {
    /// The response body.
    inner: ResponseBody,
    /// Told when the response is done.
    conn: Arc<ConnState>,
}

impl ClientBody {
    /// Wraps `inner` for a response on `conn`.
    pub(crate) fn new(inner: ResponseBody, conn: Arc<ConnState>) -> Self {
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
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().inner {
            ResponseBody::Download(download) => Pin::new(download).poll_frame(cx),
            ResponseBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            ResponseBody::Download(download) => download.is_end_stream(),
            ResponseBody::Full(bytes) => bytes.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            ResponseBody::Download(download) => download.size_hint(),
            ResponseBody::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
        }
    }
}
