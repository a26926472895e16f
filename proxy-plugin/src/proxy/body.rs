//! Bodies on their way through the proxy, all streamed: what goes to a backend
//! ([`UpstreamBody`]: in memory, or a client's upload through an [`UploadSlot`]), a backend's
//! download to a client ([`Download`]), and the wrapper every response to a client goes out in
//! ([`ClientBody`]). Enums rather than boxed trait objects: a request makes no allocation for
//! its bodies.
//!
//! A client's request body ([`Upload`], read whole or streamed) is timed on the client's time
//! only, the time the proxy waits for it with nothing else to do: `body_read_timeout` between
//! two pieces, and `body_read_timeout` plus one second per `min_upload_rate` bytes received in
//! all. Time the body waits because the backend does not take it is the backend's, and is
//! what the response timeout of a streamed body counts ([`UploadState::backend_since`]), so a
//! slow client is never held against a backend.

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

use super::conn::{RequestGuard, SendWatch};
use super::upstream::Pooled;
use crate::backend::Backend;
use crate::config::Limits;
use crate::filter::HeldUntilResponseEnd;
use crate::metrics::{ClientTimeoutKind, ClientTimeouts};

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

/// How a client's request body ended, when it ended badly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UploadFault {
    /// More than `max_body_bytes` (cut; 413).
    TooLarge,
    /// Nothing for `body_read_timeout` (cut; 408).
    Stalled,
    /// The client broke off (400).
    Aborted,
    /// Slower than `min_upload_rate` (cut; 408).
    TooSlow,
}

impl UploadFault {
    fn code(self) -> u8 {
        match self {
            UploadFault::TooLarge => 1,
            UploadFault::Stalled => 2,
            UploadFault::Aborted => 3,
            UploadFault::TooSlow => 4,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(UploadFault::TooLarge),
            2 => Some(UploadFault::Stalled),
            3 => Some(UploadFault::Aborted),
            4 => Some(UploadFault::TooSlow),
            _ => None,
        }
    }
}

/// The limits of one request body, from the generation's [`Limits`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct BodyLimits {
    /// `max_body_bytes`.
    max: u64,
    /// `body_read_timeout`: longest wait for the next piece.
    idle: Duration,
    /// `min_upload_rate` in bytes per second; 0: off.
    min_rate: u64,
}

impl BodyLimits {
    /// The body limits of `limits`.
    pub(crate) fn new(limits: &Limits) -> Self {
        BodyLimits {
            max: limits.max_body_bytes,
            idle: limits.body_read_timeout,
            min_rate: limits.min_upload_rate,
        }
    }

    /// The client time a body that brought `seen` bytes may have taken: `idle`, plus a
    /// second per `min_rate` bytes; `None` when the rate is not checked.
    fn allowance(&self, seen: u64) -> Option<Duration> {
        if self.min_rate == 0 {
            return None;
        }
        let earned = u128::from(seen) * 1_000_000_000 / u128::from(self.min_rate);
        let earned = Duration::from_nanos(u64::try_from(earned).unwrap_or(u64::MAX));
        Some(self.idle.saturating_add(earned))
    }
}

/// What an [`Upload`] shares with the request it belongs to: how it ended badly, and whose
/// turn it is, the client's or the backend's.
#[derive(Debug)]
pub(crate) struct UploadState {
    /// The [`UploadFault`] code, 0 for none.
    fault: AtomicU8,
    /// Whose turn it is.
    clock: Mutex<UploadClock>,
}

/// Whose turn it is in an upload.
#[derive(Debug, Clone, Copy)]
struct UploadClock {
    /// The proxy is waiting for the client's next piece (or end) of the body.
    waiting_on_client: bool,
    /// When the client last delivered a piece (at first: when the upload was made).
    last_piece: Instant,
}

impl UploadState {
    fn new() -> Arc<Self> {
        Arc::new(UploadState {
            fault: AtomicU8::new(0),
            clock: Mutex::new(UploadClock {
                waiting_on_client: false,
                last_piece: Instant::now(),
            }),
        })
    }

    /// What went wrong with the upload, if anything.
    pub(crate) fn fault(&self) -> Option<UploadFault> {
        UploadFault::from_code(self.fault.load(Ordering::Relaxed))
    }

    /// Since when the exchange has waited on the backend alone: the client's last piece of
    /// body (or the upload's start); `None` while the proxy waits for the client's next one.
    pub(crate) fn backend_since(&self) -> Option<Instant> {
        let clock = *self.clock.lock();
        (!clock.waiting_on_client).then_some(clock.last_piece)
    }

    fn set_waiting_on_client(&self) {
        self.clock.lock().waiting_on_client = true;
    }

    fn piece_arrived(&self, at: Instant) {
        *self.clock.lock() = UploadClock {
            waiting_on_client: false,
            last_piece: at,
        };
    }
}

/// A client's request body, cut past `max_body_bytes`, after `body_read_timeout` without a
/// piece, or when slower than `min_upload_rate`; each cut counted in
/// `proxy_client_timeouts_total` and recorded in its [`UploadState`].
#[derive(Debug)]
pub(crate) struct Upload {
    /// The client's body.
    inner: Incoming,
    /// Its limits.
    limits: BodyLimits,
    /// Bytes relayed so far.
    seen: u64,
    /// Time spent waiting on the client in the waits that ended.
    client_time: Duration,
    /// When the current wait on the client began.
    waiting_since: Option<Instant>,
    /// Fires at the current wait's deadline; made at the first wait.
    timer: Option<Pin<Box<Sleep>>>,
    /// Shared with the request.
    state: Arc<UploadState>,
    /// Where its timeouts are counted.
    timeouts: ClientTimeouts,
}

impl Upload {
    /// Times `body` under `limits`.
    pub(crate) fn new(body: Incoming, limits: BodyLimits, timeouts: ClientTimeouts) -> Self {
        Upload {
            inner: body,
            limits,
            seen: 0,
            client_time: Duration::ZERO,
            waiting_since: None,
            timer: None,
            state: UploadState::new(),
            timeouts,
        }
    }

    /// What the request keeps of it.
    pub(crate) fn state(&self) -> &Arc<UploadState> {
        &self.state
    }

    /// When the wait on the client that began at `since` is too long.
    fn wait_deadline(&self, since: Instant) -> Instant {
        let mut wait = self.limits.idle;
        if let Some(allowance) = self.limits.allowance(self.seen) {
            wait = wait.min(allowance.saturating_sub(self.client_time));
        }
        since + wait
    }

    fn fail(
        &mut self,
        fault: UploadFault,
        message: String,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match fault {
            UploadFault::Stalled => self.timeouts.count(ClientTimeoutKind::BodyRead),
            UploadFault::TooSlow => self.timeouts.count(ClientTimeoutKind::SlowUpload),
            UploadFault::TooLarge | UploadFault::Aborted => {}
        }
        self.timer = None;
        self.state.fault.store(fault.code(), Ordering::Relaxed);
        Poll::Ready(Some(Err(message.into())))
    }

    fn too_slow(&mut self) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let message = format!(
            "client sent {} bytes of body in {:?}, under {} bytes/s",
            self.seen, self.client_time, self.limits.min_rate
        );
        self.fail(UploadFault::TooSlow, message)
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
                let now = Instant::now();
                if let Some(since) = this.waiting_since.take() {
                    this.client_time += now.saturating_duration_since(since);
                }
                this.state.piece_arrived(now);
                if let Some(data) = frame.data_ref() {
                    this.seen = this.seen.saturating_add(data.len() as u64);
                    if this.seen > this.limits.max {
                        let message = format!("request body over {} bytes", this.limits.max);
                        return this.fail(UploadFault::TooLarge, message);
                    }
                }
                if this
                    .limits
                    .allowance(this.seen)
                    .is_some_and(|allowance| this.client_time > allowance)
                {
                    return this.too_slow();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.fail(UploadFault::Aborted, format!("client body: {e}"))
            }
            Poll::Ready(None) => {
                this.waiting_since = None;
                this.timer = None;
                this.state.piece_arrived(Instant::now());
                Poll::Ready(None)
            }
            Poll::Pending => {
                let since = match this.waiting_since {
                    Some(since) => since,
                    None => {
                        let now = Instant::now();
                        this.waiting_since = Some(now);
                        this.state.set_waiting_on_client();
                        let deadline = this.wait_deadline(now);
                        match &mut this.timer {
                            Some(timer) => timer.as_mut().reset(deadline),
                            None => this.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
                        }
                        now
                    }
                };
                let Some(timer) = this.timer.as_mut() else {
                    return Poll::Pending;
                };
                if timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                let waited = Instant::now().saturating_duration_since(since);
                if waited >= this.limits.idle {
                    let message = format!("client sent no body data for {:?}", this.limits.idle);
                    return this.fail(UploadFault::Stalled, message);
                }
                this.client_time += waited;
                this.waiting_since = None;
                this.too_slow()
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

/// A client's streamed request body, shared by the tries of one request: the first try that
/// polls it takes it; until then it stays here, so a try that failed before sending anything
/// (connect error) leaves it for the next backend.
#[derive(Debug)]
pub(crate) struct UploadSlot {
    /// The body, until a try starts sending it.
    body: Mutex<Option<Upload>>,
    /// Its fault and clock.
    state: Arc<UploadState>,
}

impl UploadSlot {
    /// A slot for `upload`.
    pub(crate) fn new(upload: Upload) -> Arc<Self> {
        Arc::new(UploadSlot {
            state: upload.state().clone(),
            body: Mutex::new(Some(upload)),
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

    /// The upload's fault and clock.
    pub(crate) fn state(&self) -> &UploadState {
        &self.state
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

    /// Whether the response still holds its backend connection (until it is read to its end).
    fn upstream(&self) -> Option<&Pooled> {
        self.conn.as_ref()
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
        let mut poll = Pin::new(&mut this.inner).poll_frame(cx);
        if poll.is_pending()
            && let Some(conn) = &mut this.conn
        {
            // The body arrives through the connection's I/O, which this request drives.
            conn.poll_driver(cx);
            poll = Pin::new(&mut this.inner).poll_frame(cx);
        }
        match poll {
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
/// its request is over, and the connection's next request head is due. On HTTP/2, a response
/// relayed from a backend also tells the connection's send watch when its pieces wait for the
/// client.
#[derive(Debug)]
pub(crate) struct ClientBody {
    /// The response body.
    inner: ResponseBody,
    /// Its slot in the connection's send watch (HTTP/2, relayed from a backend).
    send_watch: Option<SendWatch>,
    /// Tells the connection when the response is done (dropped with it).
    _request: RequestGuard,
    /// What the request filters keep until the response is done (a client's slot among its
    /// requests in flight).
    _held: Option<HeldUntilResponseEnd>,
}

impl ClientBody {
    /// Wraps `inner` for the response to the request `request` stands for.
    pub(crate) fn new(inner: ResponseBody, request: RequestGuard) -> Self {
        let send_watch = match &inner {
            ResponseBody::Download(download) => download
                .upstream()
                .and_then(|upstream| SendWatch::start(request.conn(), upstream.task()?)),
            ResponseBody::Full(_) => None,
        };
        ClientBody {
            inner,
            send_watch,
            _request: request,
            _held: None,
        }
    }

    /// The same, keeping `held` until the response is done.
    pub(crate) fn holding(mut self, held: Option<HeldUntilResponseEnd>) -> Self {
        self._held = held;
        self
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let Some(watch) = &this.send_watch else {
            return match &mut this.inner {
                ResponseBody::Download(download) => Pin::new(download).poll_frame(cx),
                ResponseBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            };
        };
        watch.polled();
        let ResponseBody::Download(download) = &mut this.inner else {
            return Poll::Ready(None);
        };
        let poll = Pin::new(&mut *download).poll_frame(cx);
        let delivered = matches!(&poll, Poll::Ready(Some(Ok(_))));
        watch.returned(delivered, download.upstream().is_some());
        poll
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
