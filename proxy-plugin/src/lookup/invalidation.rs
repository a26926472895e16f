//! What invalidates the lookup cache (`cache.rs`): the `Watch` stream of the namespace,
//! followed by a task of the plugin (events remove sessions, a lost stream empties and bypasses
//! the cache, a new subscription empties it and lets it be used again), and the responses of
//! requests whose session may be cached ([`Forget`]: a logout, a new id, an unsafe method).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use session_client::{SessionClient, WatchEvent};

use super::cache::SessionCache;
use super::snapshots::SnapshotUpdate;
use crate::filter::ResponseFilter;

/// First wait before subscribing again after the stream was lost or refused.
const RESUBSCRIBE_MIN: Duration = Duration::from_millis(100);
/// Longest wait between two subscriptions after retryable failures (session-client's own).
const RESUBSCRIBE_MAX: Duration = Duration::from_secs(5);
/// Wait after a refusal that will not heal by itself (a token without Watch, a server
/// without it): tried again, rarely.
const RESUBSCRIBE_REFUSED: Duration = Duration::from_secs(60);

/// Follows the Watch stream of `client`'s namespace for `cache`, forever (the plugin aborts
/// it when dropped): events invalidate, a lost stream suspends, a new one resumes.
pub(super) async fn follow(cache: Arc<SessionCache>, client: SessionClient) {
    let mut backoff = RESUBSCRIBE_MIN;
    loop {
        let wait = match client.watch(None).await {
            Ok(mut events) => {
                tracing::debug!("session cache: watch stream up");
                cache.resume();
                backoff = RESUBSCRIBE_MIN;
                let mut wait = RESUBSCRIBE_MIN;
                while let Some(item) = events.next().await {
                    match item {
                        Ok(WatchEvent::Session(event)) => cache.event(&event.id),
                        Ok(WatchEvent::Interrupted(reason)) => {
                            tracing::info!(?reason, "session cache: watch stream lost; bypassed");
                            cache.suspend();
                        }
                        Ok(WatchEvent::Missed(reason)) => {
                            tracing::info!(?reason, "session cache: watch stream back; emptied");
                            cache.resume();
                        }
                        Err(error) => {
                            // The stream's last item: a refusal that will not heal.
                            tracing::warn!(%error, "session cache: watch refused; bypassed");
                            wait = RESUBSCRIBE_REFUSED;
                        }
                    }
                }
                wait
            }
            Err(error) if error.is_retryable() => {
                tracing::debug!(%error, "session cache: no watch stream yet; bypassed");
                let wait = backoff;
                backoff = backoff.saturating_mul(2).min(RESUBSCRIBE_MAX);
                wait
            }
            Err(error) => {
                tracing::warn!(%error, "session cache: watch refused; bypassed");
                RESUBSCRIBE_REFUSED
            }
        };
        cache.suspend();
        tokio::time::sleep(wait).await;
    }
}

/// The response filter of a request whose session may be cached: forgets it when the response
/// ends or replaces it (or always after an unsafe method, also when the proxy answers
/// instead of the backend), then runs the snapshot cookie's filter.
#[derive(Debug)]
pub(super) struct Forget {
    /// The cache.
    cache: Arc<SessionCache>,
    /// The request's session id.
    id: String,
    /// The request's method may write the session: forget it whatever the response.
    always: bool,
    /// The snapshot cookie's filter, if any.
    then: Option<SnapshotUpdate>,
    /// Ran on a response (else dropped: the proxy answered itself).
    ran: bool,
}

impl ResponseFilter for Forget {
    fn response_filter(mut self: Box<Self>, head: &mut http::response::Parts) {
        self.ran = true;
        if self.always || self.cache.response_changes(&head.headers, &self.id) {
            self.cache.forget(&self.id);
        }
        if let Some(then) = self.then.take() {
            then.respond(head);
        }
    }
}

impl Drop for Forget {
    fn drop(&mut self) {
        // A request that may have written the session and got no backend response (timed
        // out, failed midway): forgotten all the same.
        if !self.ran && self.always {
            self.cache.forget(&self.id);
        }
    }
}

impl Forget {
    /// The response filter forgetting `id` when the response ends or changes the session, or
    /// always when `unsafe_method` (the request may have written it); runs `then` after.
    pub(super) fn new(
        cache: &Arc<SessionCache>,
        id: String,
        unsafe_method: bool,
        then: Option<SnapshotUpdate>,
    ) -> Forget {
        Forget {
            cache: cache.clone(),
            id,
            always: unsafe_method,
            then,
            ran: false,
        }
    }
}
