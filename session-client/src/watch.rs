//! Session events as a typed, self-healing stream ([`SessionClient::watch`]).
//!
//! `Watch` (see `session.proto`) streams the events of a namespace as the store applies them,
//! never replays what happened before the call, and ends a watcher that falls behind with
//! RESOURCE_EXHAUSTED. [`WatchStream`] hides the plumbing: it subscribes on one of the client's
//! session servers, and when the subscription ends or fails for a reason that may heal (a
//! server restart, UNAVAILABLE, RESOURCE_EXHAUSTED) it subscribes again, on any configured
//! server, with a capped exponential backoff ([`RESUBSCRIBE_BACKOFF`] doubling up to
//! [`RESUBSCRIBE_BACKOFF_MAX`], back to the start once a subscription delivers an event, so a
//! server that accepts and drops subscriptions at once is not hammered). Since
//! events between two subscriptions are lost, a lost subscription is announced at once
//! ([`WatchEvent::Interrupted`]) and the first item of every new subscription is
//! [`WatchEvent::Missed`]: re-read what you care about. An error that will not heal
//! (UNAUTHENTICATED, PERMISSION_DENIED, INVALID_ARGUMENT, UNIMPLEMENTED) is yielded as the
//! stream's last item. Dropping the stream cancels the gRPC call.
//!
//! ```no_run
//! use session_client::{ClientConfig, SessionClient, WatchEvent};
//! use session_client::watch::Stream as _;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let client = SessionClient::connect_lazy(ClientConfig::new("http://127.0.0.1:50051"))?;
//! let mut events = client.watch(Some("alice")).await?;
//! while let Some(item) = std::future::poll_fn(|cx| std::pin::Pin::new(&mut events).poll_next(cx)).await {
//!     match item? {
//!         WatchEvent::Session(event) => println!("{:?} {} v{}", event.kind, event.id, event.version),
//!         WatchEvent::Interrupted(_) => {} // a cache would stop serving here
//!         WatchEvent::Missed(reason) => println!("events may be missing ({reason:?}): re-read"),
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! (With `futures::StreamExt` or `tokio_stream::StreamExt` in scope, `events.next().await`.)

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use session_proto::v1;
use session_proto::v1::session_store_client::SessionStoreClient;
use tonic::{Code, Status, Streaming};

/// The `Stream` trait [`WatchStream`] implements (`futures_core::Stream`, as re-exported by
/// tonic through `tokio-stream`): the same trait `futures` and `tokio-stream` use.
pub use tonic::codegen::tokio_stream::Stream;

use crate::client::{ClientError, SessionClient};
use crate::endpoints::Member;

/// Wait before the first resubscription after a subscription was lost.
pub const RESUBSCRIBE_BACKOFF: Duration = Duration::from_millis(100);
/// The longest wait between two subscription attempts.
pub const RESUBSCRIBE_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Bound on waiting for a server to accept a subscription (its response headers).
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(10);

/// What happened to a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// Created (also the new id of a regenerate, and a restore that recreated it).
    Created,
    /// Its attributes, user or ttl were written.
    Updated,
    /// Deleted (also the old id of a regenerate, and delete-by-user).
    Deleted,
    /// It reached its expiry (late, or never, on stores that learn of expiry late or not at
    /// all).
    Expired,
}

/// One event of one session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionEvent {
    /// What happened.
    pub kind: EventKind,
    /// The session's id.
    pub id: String,
    /// The session's user; may be empty for [`EventKind::Expired`].
    pub user_id: String,
    /// The session's version after the event (0 when unknown, as for expiry).
    pub version: u64,
    /// When the store applied it.
    pub at: SystemTime,
    /// The session's namespace.
    pub namespace: String,
}

impl SessionEvent {
    /// The typed event, or `None` for a kind this client does not know (skipped).
    fn from_proto(event: v1::SessionEvent) -> Option<SessionEvent> {
        let kind = match v1::session_event::Kind::try_from(event.kind).ok()? {
            v1::session_event::Kind::Created => EventKind::Created,
            v1::session_event::Kind::Updated => EventKind::Updated,
            v1::session_event::Kind::Deleted => EventKind::Deleted,
            v1::session_event::Kind::Expired => EventKind::Expired,
            v1::session_event::Kind::Unspecified => return None,
        };
        Some(SessionEvent {
            kind,
            id: event.id,
            user_id: event.user_id,
            version: event.version,
            at: event
                .at
                .and_then(|t| SystemTime::try_from(t).ok())
                .unwrap_or(SystemTime::UNIX_EPOCH),
            namespace: event.namespace,
        })
    }
}

/// Why events may have been missed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MissedReason {
    /// The server ended the watcher for falling behind (RESOURCE_EXHAUSTED).
    FellBehind,
    /// The subscription ended or broke (a server restart or shutdown, a lost connection).
    Reconnected,
}

/// An item of a [`WatchStream`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// An event of a session, in the order the store applied them.
    Session(SessionEvent),
    /// The subscription was lost (this is why): events from now until the next
    /// [`WatchEvent::Missed`] are not seen. A cache kept exact by the stream must stop
    /// serving here, not only at the `Missed` that follows the new subscription.
    Interrupted(MissedReason),
    /// The stream subscribed again after losing its subscription: events between the two are
    /// lost. Re-read what you care about. Comes before the new subscription's events.
    Missed(MissedReason),
}

/// The stream [`SessionClient::watch`] returns: `Result<WatchEvent, ClientError>` items,
/// resubscribing on its own; it ends only after an error that will not heal (its last item).
/// Dropping it cancels the call.
pub struct WatchStream {
    /// The next item being made, and the watcher that makes the one after it.
    next: Option<Pin<Box<dyn Future<Output = Step> + Send>>>,
}

impl std::fmt::Debug for WatchStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchStream")
            .field("ended", &self.next.is_none())
            .finish()
    }
}

/// An item and the watcher, or the end.
type Step = Option<(Result<WatchEvent, ClientError>, Watcher)>;

impl Stream for WatchStream {
    type Item = Result<WatchEvent, ClientError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let Some(next) = self.next.as_mut() else {
            return Poll::Ready(None);
        };
        match next.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                self.next = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some((item, watcher))) => {
                self.next = Some(Box::pin(watcher.next()));
                Poll::Ready(Some(item))
            }
        }
    }
}

/// The state behind a [`WatchStream`].
struct Watcher {
    /// The client whose servers and token are used.
    client: SessionClient,
    /// What is watched.
    request: v1::WatchRequest,
    /// The live subscription and the server it is on.
    stream: Option<(Streaming<v1::SessionEvent>, Arc<Member>)>,
    /// Why the next subscription must start with a [`WatchEvent::Missed`].
    missed: Option<MissedReason>,
    /// Wait before the next subscription attempt.
    backoff: Duration,
    /// Servers that failed since the last successful subscription.
    tried: Vec<Arc<Member>>,
    /// Set after a final error.
    done: bool,
}

/// Whether a failure will never heal by subscribing again.
fn is_fatal(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unauthenticated
            | Code::PermissionDenied
            | Code::InvalidArgument
            | Code::OutOfRange
            | Code::Unimplemented
    )
}

impl Watcher {
    /// One subscription attempt on a server not tried since the last success (any, once all
    /// were tried).
    async fn subscribe(&mut self) -> Result<(), Status> {
        if !self.client.endpoints.has_untried(&self.tried) {
            self.tried.clear();
        }
        let member = self.client.endpoints.pick(&self.tried);
        let mut request = self.client.request(self.request.clone());
        // No deadline: the stream lasts as long as the caller keeps it.
        request.metadata_mut().remove("grpc-timeout");
        let mut grpc = SessionStoreClient::new(member.channel());
        let outcome = tokio::time::timeout(SUBSCRIBE_TIMEOUT, grpc.watch(request)).await;
        let status = match outcome {
            Ok(Ok(response)) => {
                self.client.endpoints.answered(&member);
                self.stream = Some((response.into_inner(), member));
                self.tried.clear();
                return Ok(());
            }
            Ok(Err(status)) => status,
            Err(_) => Status::deadline_exceeded(format!(
                "no answer to Watch within {SUBSCRIBE_TIMEOUT:?}"
            )),
        };
        self.failed(&member, &status);
        self.tried.push(member);
        Err(status)
    }

    /// Notes a failure of `member` for the endpoint health bookkeeping.
    fn failed(&self, member: &Arc<Member>, status: &Status) {
        let error = ClientError::from(status.clone());
        if error.is_unavailable() {
            self.client.endpoints.eject(member, &error);
        }
        tracing::debug!(endpoint = member.label(), %error, "session watch failed");
    }

    /// The next item, and the watcher for the one after it; `None` once ended.
    async fn next(mut self) -> Step {
        loop {
            if self.done {
                return None;
            }
            if let Some((stream, _)) = self.stream.as_mut() {
                match stream.message().await {
                    Ok(Some(event)) => {
                        // A subscription that delivers is a good one: the next loss starts
                        // the backoff over (one that fails at once keeps doubling it).
                        self.backoff = RESUBSCRIBE_BACKOFF;
                        if let Some(event) = SessionEvent::from_proto(event) {
                            return Some((Ok(WatchEvent::Session(event)), self));
                        }
                    }
                    Ok(None) => {
                        self.stream = None;
                        self.backoff = self.backoff.saturating_mul(2).min(RESUBSCRIBE_BACKOFF_MAX);
                        self.missed = Some(MissedReason::Reconnected);
                        let interrupted = WatchEvent::Interrupted(MissedReason::Reconnected);
                        return Some((Ok(interrupted), self));
                    }
                    Err(status) => {
                        let (_, member) = self.stream.take().expect("a live subscription");
                        self.backoff = self.backoff.saturating_mul(2).min(RESUBSCRIBE_BACKOFF_MAX);
                        if is_fatal(&status) {
                            self.done = true;
                            return Some((Err(status.into()), self));
                        }
                        self.failed(&member, &status);
                        let reason = if status.code() == Code::ResourceExhausted {
                            MissedReason::FellBehind
                        } else {
                            MissedReason::Reconnected
                        };
                        self.missed = Some(reason);
                        return Some((Ok(WatchEvent::Interrupted(reason)), self));
                    }
                }
                continue;
            }
            tokio::time::sleep(self.backoff).await;
            match self.subscribe().await {
                Ok(()) => {
                    let reason = self.missed.take().unwrap_or(MissedReason::Reconnected);
                    return Some((Ok(WatchEvent::Missed(reason)), self));
                }
                Err(status) if is_fatal(&status) => {
                    self.done = true;
                    return Some((Err(status.into()), self));
                }
                Err(_) => {
                    self.backoff = self.backoff.saturating_mul(2).min(RESUBSCRIBE_BACKOFF_MAX);
                }
            }
        }
    }
}

impl SessionClient {
    /// Watches the session events of the client's namespace: every session's, or only
    /// `user_id`'s. Returns once a server has accepted the subscription, so every event the
    /// store applies from then on is delivered (or announced as [`WatchEvent::Missed`] after a
    /// lost subscription; see [`crate::watch`]). The first subscription tries each configured
    /// server once; when none accepts it, the error of the last one.
    pub async fn watch(&self, user_id: Option<&str>) -> Result<WatchStream, ClientError> {
        let namespace = self.namespace().to_owned();
        self.watch_namespace(&namespace, user_id).await
    }

    /// [`SessionClient::watch`] in another namespace than the client's (the token must reach
    /// it).
    pub async fn watch_namespace(
        &self,
        namespace: &str,
        user_id: Option<&str>,
    ) -> Result<WatchStream, ClientError> {
        let mut watcher = Watcher {
            client: self.clone(),
            request: v1::WatchRequest {
                namespace: namespace.to_owned(),
                user_id: user_id.unwrap_or_default().to_owned(),
            },
            stream: None,
            missed: None,
            backoff: RESUBSCRIBE_BACKOFF,
            tried: Vec::new(),
            done: false,
        };
        let servers = self.endpoints().len().max(1);
        let mut last = None;
        for _ in 0..servers {
            match watcher.subscribe().await {
                Ok(()) => {
                    watcher.tried.clear();
                    return Ok(WatchStream {
                        next: Some(Box::pin(watcher.next())),
                    });
                }
                Err(status) if is_fatal(&status) => return Err(status.into()),
                Err(status) => last = Some(status),
            }
        }
        Err(last
            .map(ClientError::from)
            .unwrap_or_else(|| ClientError::Unavailable("no session server".into())))
    }
}
