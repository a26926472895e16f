//! The lookup plugin's calls to the session store: each bounded by the lookup timeout (a call
//! that does not answer in time is [`ClientError::TimedOut`], never taken for an unreachable
//! store), the time of the store's last answer (anything it said, NOT_FOUND included), whether
//! a failure is an outage the snapshot may stand in for, and pushing a snapshot back with
//! `Restore` under the store's rules (see `Restore` in `session.proto`).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use session_client::cookie::{Snapshot, SnapshotPolicy};
use session_client::{ClientConfig, ClientError, OutageGrace, SessionClient, SessionData};

use super::LookupError;
use crate::config::LookupConfig;

/// How often the host names of the session servers are resolved again.
const RESOLVE_INTERVAL: Duration = Duration::from_secs(30);

/// The session store as the plugin sees it.
#[derive(Debug)]
pub(super) struct Store {
    /// The one client every request shares (one HTTP/2 connection per session server).
    client: SessionClient,
    /// Bound on one call (`LookupConfig::timeout`).
    timeout: Duration,
    /// Reads go past the session server's own cache (`GetRequest.bypass_cache`): set when the
    /// plugin keeps a lookup cache, which would otherwise keep a read of the server's near
    /// cache made inside its staleness window (after the Watch event that invalidated the
    /// entry) for a whole touch window.
    uncached: bool,
    /// Down or slow: a timeout within the outage grace of the store's last answer (or of the
    /// plugin's start) is not an outage.
    outage: OutageGrace,
}

/// The session the store holds once a request's snapshot is accounted for; `None` from
/// [`Store::resync`] means there is none (deleted, expired, or refused as a snapshot).
#[derive(Debug)]
pub(super) struct Stored {
    /// The stored session (shared with the lookup cache).
    pub(super) session: Arc<SessionData>,
    /// The lookup outcome counted: `found`, `restored` (a snapshot pushed back and applied, or
    /// recreated in a store that lost its data) or `conflict` (the store changed the session
    /// meanwhile: it wins, the offline changes are dropped).
    pub(super) outcome: &'static str,
    /// The request's snapshot holds offline changes that could not be pushed yet (the store
    /// did not answer the `Restore`): it stays as it is, for a later request.
    pub(super) keep_snapshot: bool,
}

impl Store {
    pub(super) fn new(config: &LookupConfig) -> Result<Self, LookupError> {
        let client = SessionClient::connect_lazy(ClientConfig {
            endpoints: config.session_servers.clone(),
            tls: config.tls.clone(),
            namespace: config.namespace.clone(),
            auth_token: config.auth_token.clone(),
            // The plugin bounds every call itself (`call`), so that running out of time is
            // always TimedOut: the channel's own deadline would end the call as CANCELLED,
            // which the client cannot tell from a broken connection. Its deadline is a
            // backstop past the plugin's.
            timeout: config.timeout.saturating_mul(2),
            connect_timeout: config.timeout,
            // A request waits for the lookup: one bounded try (and, for a server that cannot
            // be reached, one more on another server), no backoff. The lazy channels reconnect
            // by themselves for the next request.
            retries: 0,
            backoff: Duration::ZERO,
            resolve_interval: RESOLVE_INTERVAL,
        })
        .map_err(LookupError::Client)?;
        Ok(Store {
            client,
            timeout: config.timeout,
            uncached: config.cache > 0,
            outage: OutageGrace::new(config.outage_grace),
        })
    }

    /// `call` within the lookup timeout, noting whether the store answered.
    async fn call<T>(
        &self,
        call: impl Future<Output = Result<T, ClientError>>,
    ) -> Result<T, ClientError> {
        let result = tokio::time::timeout(self.timeout, call)
            .await
            .unwrap_or_else(|_| {
                Err(ClientError::TimedOut(format!(
                    "no answer within {:?}",
                    self.timeout
                )))
            });
        self.outage.note(&result);
        result
    }

    /// The client every call goes through (the lookup cache's Watch stream too).
    pub(super) fn client(&self) -> &SessionClient {
        &self.client
    }

    /// Reads session `id`, sliding its expiry (as a backend's read would); past the server's
    /// cache when the plugin has its own.
    pub(super) async fn get(&self, id: &str) -> Result<SessionData, ClientError> {
        if self.uncached {
            return self.call(self.client.get_uncached(id, true)).await;
        }
        self.call(self.client.get(id, true)).await
    }

    /// Whether `error` means the store is down, so a snapshot may stand in for the session:
    /// unreachable (connection refused or broken, UNAVAILABLE), or timed out while the store
    /// has not answered for longer than the outage grace. A timeout within the grace is a slow
    /// store, not a lost one.
    pub(super) fn is_outage(&self, error: &ClientError) -> bool {
        self.outage.is_outage(error)
    }

    /// Pushes `snapshot` back with `Restore`: `stored` is the store's session when it has one
    /// (the snapshot holds offline changes), `None` when it answered NOT_FOUND in another (or
    /// no) epoch. `Err` only when the store did not answer and there is no stored session to
    /// serve.
    pub(super) async fn resync(
        &self,
        snapshot: &Snapshot,
        stored: Option<SessionData>,
    ) -> Result<Option<Stored>, ClientError> {
        let session = id_prefix(&snapshot.id);
        let found = |session, outcome, keep_snapshot| {
            Some(Stored {
                session: Arc::new(session),
                outcome,
                keep_snapshot,
            })
        };
        match self.call(self.client.restore(snapshot.to_restore())).await {
            Ok(restored) => {
                tracing::info!(
                    session,
                    recreated = stored.is_none(),
                    "session snapshot pushed back to the store"
                );
                Ok(found(restored, "restored", false))
            }
            Err(ClientError::Refused(reason)) => {
                tracing::info!(session, %reason, "session snapshot refused by the store");
                Ok(None)
            }
            Err(ClientError::Conflict(reason)) => {
                tracing::info!(
                    session,
                    %reason,
                    base_version = snapshot.base_version,
                    keys_set = snapshot.offline_set.len(),
                    keys_removed = snapshot.offline_removed.len(),
                    "the store changed the session meanwhile: the store wins, offline changes dropped"
                );
                let stored = match stored {
                    Some(stored) => stored,
                    None => match self.get(&snapshot.id).await {
                        Ok(stored) => stored,
                        Err(ClientError::NotFound { .. }) => return Ok(None),
                        Err(error) => return Err(error),
                    },
                };
                Ok(found(stored, "conflict", false))
            }
            Err(error) => match stored {
                // Not pushed now; the snapshot keeps its changes for a later request.
                Some(stored) if error.is_retryable() => {
                    tracing::warn!(session, %error, "offline session changes not pushed yet");
                    Ok(found(stored, "found", true))
                }
                // A token without the write right: the changes stay in the snapshot for a
                // backend (whose token may write) to push; the store's session is served.
                Some(stored) if matches!(error, ClientError::PermissionDenied(_)) => {
                    tracing::warn!(
                        session,
                        %error,
                        "offline session changes not pushed: the lookup's token may not write (give it rw to push them)"
                    );
                    Ok(found(stored, "found", true))
                }
                // The store will never take them (a limit, a malformed change): the store's
                // session is served and its snapshot replaces the request's.
                Some(stored) => {
                    tracing::warn!(session, %error, "offline session changes refused: dropped");
                    Ok(found(stored, "found", false))
                }
                None if error.is_retryable() => Err(error),
                None => {
                    tracing::warn!(session, %error, "session snapshot not restored");
                    Ok(None)
                }
            },
        }
    }
}

/// The first characters of a session id, enough to follow one session through the logs
/// without writing a usable id there.
fn id_prefix(id: &str) -> &str {
    id.get(..6).unwrap_or("")
}
