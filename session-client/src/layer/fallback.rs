//! The state machine behind every [`Session`](super::Session): the store is the truth while it
//! answers; when it does not, the signed snapshot stands in, takes the request's changes, and
//! is pushed back with `Restore` once the store answers again. Logout deletes the session and
//! clears both cookies, outage or not.
//!
//! Nothing here knows about tower: a request's [`State`] goes in, store calls go out through a
//! [`SessionBackend`], and the cookies the response must carry come back as a
//! [`CookieUpdate`] for the service to apply.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use ring::rand::{SecureRandom as _, SystemRandom};

use super::backend::SessionBackend;
use super::session::{Source, State};
use super::{FallbackMode, SessionConfig, SessionError};
use crate::client::{ClientError, SessionData};
use crate::cookie::{CookieCodec, Snapshot, fits_in_cookie, unix_ms};

/// Only before the server has answered once and with no ttl configured, a session made during
/// an outage gets this ttl: session-server's default (`--default-ttl`), the best guess left.
/// Any answer of the server replaces it (see [`LearnedTtl`]).
const ASSUMED_SERVER_TTL: Duration = Duration::from_secs(30 * 60);

/// What the response's session cookies become; the tower side applies it to the cookie jar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum CookieUpdate {
    /// Leave the cookies as the request sent them.
    Keep,
    /// Remove the id and snapshot cookies the request sent (logout, or the session is gone).
    Clear,
    /// Write the id cookie when it changed, and act on the snapshot cookie.
    Write {
        /// The new session id, when it differs from the request's.
        id: Option<String>,
        /// The snapshot cookie.
        snapshot: SnapshotCookie,
    },
}

/// What happens to the snapshot cookie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum SnapshotCookie {
    /// Left as it is (fallback off, or the request's is up to date).
    Keep,
    /// Set to this value.
    Set(String),
    /// Removed, if the request sent one (the session no longer fits a cookie).
    Remove,
}

/// The ttl the server gives this layer's sessions, learned from its answers: what a session
/// made during an outage gets, so that it lives in its snapshot as long as the store would
/// have kept it.
#[derive(Debug, Default)]
struct LearnedTtl {
    /// Of the last session this layer created: the server's default, or the configured ttl as
    /// the server clamped it (ms; 0 until the first create answered).
    created_ms: AtomicU64,
    /// Of the last session the store returned for any call (ms; 0 until the first answer).
    seen_ms: AtomicU64,
}

impl LearnedTtl {
    fn remember(slot: &AtomicU64, session: &SessionData) {
        let ms = u64::try_from(session.ttl.as_millis()).unwrap_or(u64::MAX);
        if ms > 0 {
            slot.store(ms, Ordering::Relaxed);
        }
    }

    /// The ttl for a session made during an outage: what the server gave the last session this
    /// layer created, else the configured ttl, else the ttl of any session the server returned,
    /// else [`ASSUMED_SERVER_TTL`].
    fn for_new_session(&self, configured: Option<Duration>) -> Duration {
        let learned = |slot: &AtomicU64| {
            Some(slot.load(Ordering::Relaxed))
                .filter(|&ms| ms > 0)
                .map(Duration::from_millis)
        };
        learned(&self.created_ms)
            .or(configured)
            .or_else(|| learned(&self.seen_ms))
            .unwrap_or(ASSUMED_SERVER_TTL)
    }
}

/// The state machine of one layer, shared by all its requests: the store behind its trait, the
/// snapshot codec, the settings.
pub(super) struct Fallback {
    /// The session store.
    backend: Box<dyn SessionBackend>,
    /// The snapshot codec (present whenever the fallback is on).
    codec: Option<CookieCodec>,
    /// Cookie and fallback settings.
    config: SessionConfig,
    /// Ids for sessions made during an outage.
    rng: SystemRandom,
    /// The ttl sessions made during an outage get.
    ttl: LearnedTtl,
}

impl Fallback {
    /// The state machine over `backend`; `codec` is needed for any fallback mode other than
    /// `Off` (without one, fallback is turned off and a warning logged).
    pub(super) fn new(
        backend: Box<dyn SessionBackend>,
        codec: Option<CookieCodec>,
        mut config: SessionConfig,
    ) -> Self {
        if codec.is_none() && config.fallback != FallbackMode::Off {
            tracing::warn!("cookie fallback needs a CookieCodec; fallback turned off");
            config.fallback = FallbackMode::Off;
        }
        Fallback {
            backend,
            codec,
            config,
            rng: SystemRandom::new(),
            ttl: LearnedTtl::default(),
        }
    }

    /// The settings it runs with.
    pub(super) fn config(&self) -> &SessionConfig {
        &self.config
    }

    fn namespace(&self) -> &str {
        self.backend.namespace()
    }

    fn fallback_on(&self) -> bool {
        self.config.fallback != FallbackMode::Off
    }

    /// The snapshot from the request, if valid and about the session its id cookie names.
    fn request_snapshot(&self, state: &State) -> Option<Snapshot> {
        let codec = self.codec.as_ref()?;
        let raw = state.cookie_snapshot.as_deref()?;
        let id = state.cookie_id.as_deref()?;
        codec.decode_for(raw, id, self.namespace())
    }

    /// Loads the session the request's id cookie names: from the store, restoring the request's
    /// snapshot when the store lacks the session or holds an older version, or from the
    /// snapshot alone when the store is unreachable.
    pub(super) async fn load(&self, state: &mut State) -> Result<(), SessionError> {
        let Some(id) = state.cookie_id.clone() else {
            return Ok(());
        };
        let snapshot = self.request_snapshot(state);
        let found = match self.backend.get(&id, true).await {
            Ok(stored) => match snapshot {
                // The store missed writes made during an outage: push them back.
                Some(snap) if snap.version > stored.version => self.restore(snap).await,
                _ => Ok(Some(stored)),
            },
            Err(ClientError::NotFound) => match snapshot {
                Some(snap) => self.restore(snap).await,
                None => Ok(None),
            },
            Err(error) => Err(error),
        };
        match found {
            Ok(Some(stored)) => self.adopt(state, stored),
            Ok(None) => {}
            Err(error) if error.is_unavailable() => {
                let Some(snap) = self.request_snapshot(state) else {
                    return Err(SessionError::Unavailable(error));
                };
                tracing::info!(%error, "session store unavailable: serving the session from its snapshot");
                state.current = snap.into_session();
                state.source = Source::Snapshot;
            }
            Err(error) => return Err(SessionError::Store(error)),
        }
        Ok(())
    }

    /// The store's answer becomes the request's session.
    fn adopt(&self, state: &mut State, stored: SessionData) {
        LearnedTtl::remember(&self.ttl.seen_ms, &stored);
        state.current = stored;
        state.source = Source::Store;
    }

    /// Pushes a snapshot back into the store; `None` when the server refuses it (deleted).
    async fn restore(&self, snap: Snapshot) -> Result<Option<SessionData>, ClientError> {
        match self.backend.restore(snap.into_session()).await {
            Ok(stored) => Ok(Some(stored)),
            Err(ClientError::Refused(reason)) => {
                tracing::info!(%reason, "session snapshot not restored");
                Ok(None)
            }
            Err(error) => Err(error),
        }
    }

    /// Writes the request's changes; called once after the handler. Returns the cookies the
    /// response must carry (none changed on an error).
    pub(super) async fn save(&self, state: &mut State) -> Result<CookieUpdate, SessionError> {
        if state.changes.destroy {
            return self.destroy(state).await;
        }
        if !state.loaded {
            return Ok(CookieUpdate::Keep);
        }
        if state.changes.any() {
            self.save_changes(state).await?;
        }
        Ok(self.cookies(state))
    }

    /// Logout: deletes the session and clears both cookies, also when the store is unreachable.
    async fn destroy(&self, state: &State) -> Result<CookieUpdate, SessionError> {
        let id = state
            .cookie_id
            .clone()
            .or_else(|| Some(state.current.id.clone()))
            .filter(|i| !i.is_empty());
        if let Some(id) = id {
            match self.backend.delete(&id).await {
                Ok(_) => {}
                // The cookies still go: the user is logged out in this browser. The store's copy
                // expires on its own (see the README on logouts during an outage).
                Err(error) if error.is_unavailable() => {
                    tracing::warn!(%error, "logout during a store outage: session left to expire");
                }
                Err(error) => return Err(SessionError::Store(error)),
            }
        }
        Ok(CookieUpdate::Clear)
    }

    async fn save_changes(&self, state: &mut State) -> Result<(), SessionError> {
        let outcome = match state.source {
            Source::New => self
                .backend
                .create(
                    &state.current.user_id,
                    state.current.attrs.clone(),
                    self.config.ttl,
                )
                .await
                .map(|created| {
                    LearnedTtl::remember(&self.ttl.created_ms, &created);
                    Some(created)
                }),
            Source::Store => self.save_to_store(state).await,
            Source::Snapshot => Err(ClientError::Unavailable(
                "session lives in its snapshot".into(),
            )),
        };
        match outcome {
            Ok(Some(stored)) => {
                self.adopt(state, stored);
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(error) if error.is_unavailable() && self.codec.is_some() && self.fallback_on() => {
                self.apply_locally(state)
            }
            Err(error) if error.is_unavailable() => Err(SessionError::Unavailable(error)),
            Err(error) => Err(SessionError::Store(error)),
        }
    }

    /// Regenerate (if asked), then one patch; `None` when there was nothing to write.
    async fn save_to_store(&self, state: &State) -> Result<Option<SessionData>, ClientError> {
        let mut id = state.current.id.clone();
        let mut latest = None;
        if state.changes.regenerate {
            let moved = self.backend.regenerate(&id).await?;
            id.clone_from(&moved.id);
            latest = Some(moved);
        }
        let patch = state.patch();
        if patch.is_empty() {
            return Ok(latest);
        }
        self.backend.update(&id, patch).await.map(Some)
    }

    /// During an outage: the changes live in the snapshot only, under a bumped version; a new
    /// session (or a regenerated one) gets an id made here, in the server's format, and the
    /// ttl the server gives this layer's sessions.
    fn apply_locally(&self, state: &mut State) -> Result<(), SessionError> {
        if state.current.id.is_empty() || state.changes.regenerate {
            let mut bytes = [0u8; 24];
            self.rng.fill(&mut bytes).map_err(|_| {
                SessionError::Store(ClientError::Config("random source failed".into()))
            })?;
            state.current.id = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
            if unix_ms(state.current.created_at) == 0 {
                state.current.created_at = SystemTime::now();
            }
        }
        if state.current.ttl.is_zero() {
            state.current.ttl = self.ttl.for_new_session(self.config.ttl);
        }
        state.current.version += 1;
        state.source = Source::Snapshot;
        tracing::info!(
            version = state.current.version,
            "session store unavailable: change kept in the snapshot cookie"
        );
        Ok(())
    }

    /// The cookies for the session as saved: none when there is none (stale ones cleared), the
    /// id cookie when the id changed, and the snapshot as [`Fallback::snapshot_cookie`] says.
    fn cookies(&self, state: &State) -> CookieUpdate {
        if state.current.id.is_empty() {
            // No session (the cookie named a deleted or unknown one): drop stale cookies.
            return if state.cookie_id.is_some() {
                CookieUpdate::Clear
            } else {
                CookieUpdate::Keep
            };
        }
        let id = (state.cookie_id.as_deref() != Some(state.current.id.as_str()))
            .then(|| state.current.id.clone());
        CookieUpdate::Write {
            id,
            snapshot: self.snapshot_cookie(state),
        }
    }

    /// A new snapshot when the fallback is on and the request's is not up to date (another
    /// session or version, past half its life, an old key or format), when the session changed
    /// or lives in its snapshot only (its expiry then slides as a store touch would), or on
    /// every response in `Always` mode.
    fn snapshot_cookie(&self, state: &State) -> SnapshotCookie {
        let Some(codec) = self.codec.as_ref().filter(|_| self.fallback_on()) else {
            return SnapshotCookie::Keep;
        };
        let now = SystemTime::now();
        let current = &state.current;
        let up_to_date = state
            .cookie_snapshot
            .as_deref()
            .is_some_and(|raw| codec.is_current(raw))
            && self.request_snapshot(state).is_some_and(|old| {
                old.is_up_to_date(&current.id, current.version, current.ttl, now)
            });
        let rewrite = self.config.fallback == FallbackMode::Always
            || state.source == Source::Snapshot
            || state.changes.any()
            || !up_to_date;
        if !rewrite {
            return SnapshotCookie::Keep;
        }
        let mut snapshot = Snapshot::from_session(current, self.namespace(), now);
        if state.source == Source::Snapshot {
            // The snapshot is the only copy: slide its expiry as a store touch would.
            snapshot.slide(now);
        }
        match codec.encode(&snapshot) {
            Ok(value) if fits_in_cookie(&self.config.snapshot_cookie_name, &value) => {
                SnapshotCookie::Set(value)
            }
            Ok(_) | Err(_) => {
                tracing::info!("session too large for a snapshot cookie: kept in the store only");
                SnapshotCookie::Remove
            }
        }
    }
}
