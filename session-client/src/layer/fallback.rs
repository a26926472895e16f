//! The state machine behind every [`Session`](super::Session): the store is the truth while it
//! answers; when it cannot be reached, the signed snapshot stands in and records the request's
//! changes as offline changes against the version the store last confirmed, and once the store
//! answers again they are pushed back with `Restore`, under the store's rules (see `Restore` in
//! `session.proto`): applied when the store still holds the base version, dropped when the
//! store moved on (the store wins), refused when the session was deleted or expired. Logout
//! deletes the session and clears both cookies, outage or not; a delete the store could not
//! take is retried once it answers again.
//!
//! A slow store is not a lost one: a call that timed out against a store that answered within
//! the outage grace is a 503 with a retry hint, not a switch to the snapshot.
//!
//! Nothing here knows about tower: a request's [`State`] goes in, store calls go out through a
//! [`SessionBackend`], and the cookies the response must carry come back as a
//! [`CookieUpdate`] for the service to apply.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use parking_lot::Mutex;
use ring::rand::{SecureRandom as _, SystemRandom};

use super::backend::SessionBackend;
use super::expiry::{Expiry, ExpiryRecord};
use super::session::{Source, State, write_record};
use super::{FallbackMode, IdSource, SessionConfig, SessionError};
use crate::client::{ClientError, NewSession, RestoreRequest, SessionData, new_write_id};
use crate::cookie::{CookieCodec, Snapshot, SnapshotPolicy, fits_in_cookie, unix_ms};
use crate::outage::OutageGrace;

/// Only before the server has answered once and with no ttl configured, a session made during
/// an outage gets this ttl: session-server's default (`--default-ttl`), the best guess left.
/// Any answer of the server replaces it (see [`LearnedTtl`]).
const ASSUMED_SERVER_TTL: Duration = Duration::from_secs(30 * 60);

/// Most logouts made during an outage that are remembered for a delete once the store is back;
/// beyond it a logout is answered 503 (nothing is forgotten to make room: a flood of logouts
/// of sessions made offline must not push out a real one).
const MAX_PENDING_DELETES: usize = 10_000;

/// Most remembered deletes retried on one request, once the store answers again.
const DELETES_PER_REQUEST: usize = 16;

/// What the response's session cookies become; the tower side applies it to the cookie jar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum CookieUpdate {
    /// Leave the cookies as the request sent them.
    Keep,
    /// Remove the id and snapshot cookies the request sent (logout, or the session is gone).
    Clear,
    /// Write the id cookie when it changed, and act on the snapshot cookie.
    Write {
        /// The session id to send, when it differs from the request's or its persistent
        /// cookie is due again.
        id: Option<String>,
        /// The lifetime the id cookie gets when it is sent.
        lifetime: IdLifetime,
        /// The snapshot cookie.
        snapshot: SnapshotCookie,
    },
}

/// How long the browser keeps the id cookie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum IdLifetime {
    /// Until the browser closes (no `Max-Age`).
    Session,
    /// `Max-Age`.
    MaxAge(Duration),
    /// `Expires`.
    Until(SystemTime),
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
    backend: Arc<dyn SessionBackend>,
    /// The snapshot codec (present whenever the fallback is on).
    codec: Option<Arc<CookieCodec>>,
    /// Cookie and fallback settings.
    config: SessionConfig,
    /// Ids for sessions made during an outage.
    rng: SystemRandom,
    /// The ttl sessions made during an outage get.
    ttl: LearnedTtl,
    /// Down or slow: a timeout within the outage grace of the store's last answer is not an
    /// outage.
    outage: OutageGrace,
    /// Sessions logged out while the store was unreachable, each with the `Restore` of its
    /// snapshot when the request had one: restored (if the store does not hold it) and then
    /// deleted once the store answers again, so the delete leaves a tombstone.
    pending_deletes: Mutex<HashMap<String, Option<RestoreRequest>>>,
    /// Offline changes dropped because the store had moved on (the store wins).
    dropped: AtomicU64,
}

impl Fallback {
    /// The state machine over `backend`; `codec` is needed for any fallback mode other than
    /// `Off` (without one, fallback is turned off and a warning logged).
    pub(super) fn new(
        backend: Arc<dyn SessionBackend>,
        codec: Option<Arc<CookieCodec>>,
        mut config: SessionConfig,
    ) -> Self {
        if codec.is_none() && config.fallback != FallbackMode::Off {
            tracing::warn!("cookie fallback needs a CookieCodec; fallback turned off");
            config.fallback = FallbackMode::Off;
        }
        if matches!(config.id_source, IdSource::Header(_)) && config.fallback != FallbackMode::Off {
            tracing::warn!(
                "the snapshot fallback rides in cookies: off for header-only session ids"
            );
            config.fallback = FallbackMode::Off;
        }
        Fallback {
            outage: OutageGrace::new(config.outage_grace),
            backend,
            codec,
            config,
            rng: SystemRandom::new(),
            ttl: LearnedTtl::default(),

            pending_deletes: Mutex::new(HashMap::new()),
            dropped: AtomicU64::new(0),
        }
    }

    /// The settings it runs with.
    pub(super) fn config(&self) -> &SessionConfig {
        &self.config
    }

    /// How many requests' offline changes were dropped because the store had moved on.
    pub(super) fn dropped_offline_changes(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    fn namespace(&self) -> &str {
        self.backend.namespace()
    }

    fn fallback_on(&self) -> bool {
        self.config.fallback != FallbackMode::Off
    }

    /// The store answered (anything, NOT_FOUND included).
    fn answered(&self) {
        self.outage.answered();
    }

    /// Whether `error` means the store is down, so the snapshot may stand in
    /// ([`OutageGrace::is_outage`]).
    fn is_outage(&self, error: &ClientError) -> bool {
        self.outage.is_outage(error)
    }

    /// The error a failed store call becomes when the snapshot does not stand in.
    fn failure(&self, error: ClientError) -> SessionError {
        if error.is_unavailable() || self.is_outage(&error) {
            SessionError::Unavailable(error)
        } else if error.is_timeout() {
            SessionError::TimedOut(error)
        } else {
            SessionError::Store(error)
        }
    }

    /// The snapshot from the request, if valid and about the session its id cookie names.
    fn request_snapshot(&self, state: &State) -> Option<Snapshot> {
        let codec = self.codec.as_ref()?;
        let raw = state.cookie_snapshot.as_deref()?;
        let id = state.cookie_id.as_deref()?;
        codec.decode_for(
            raw,
            id,
            self.namespace(),
            self.config.snapshot_max_age,
            SystemTime::now(),
        )
    }

    /// Loads the session the request's id cookie names: from the store, pushing the request's
    /// offline changes back first; from the snapshot alone when the store is unreachable.
    pub(super) async fn load(&self, state: &mut State) -> Result<(), SessionError> {
        let Some(id) = state.cookie_id.clone() else {
            return Ok(());
        };
        if self.pending_deletes.lock().contains_key(&id) {
            // Logged out while the store was unreachable and not deleted yet: it stays logged
            // out, from the store and from its snapshot alike (the cookies are cleared).
            self.retry_deletes().await;
            return Ok(());
        }
        let snapshot = self.request_snapshot(state);
        let found = match self.backend.get(&id, true).await {
            Ok(stored) => {
                self.answered();
                match snapshot {
                    // Changes made during an outage: push them back, under the store's rules.
                    Some(snap) if snap.has_offline_changes() => {
                        self.resync(snap, Some(stored)).await?
                    }
                    _ => Some(stored),
                }
            }
            Err(ClientError::NotFound { epoch }) => {
                self.answered();
                match (snapshot, epoch) {
                    // The store lost it (another epoch), or it was made during an outage.
                    (Some(snap), Some(epoch)) if snap.epoch.is_empty() || snap.epoch != epoch => {
                        self.resync(snap, None).await?
                    }
                    (Some(_), epoch) => {
                        // Deleted or expired in this very store (or a store that does not say
                        // its epoch): a logout sticks.
                        tracing::info!(
                            epoch_known = epoch.is_some(),
                            "session gone from the store: snapshot dropped"
                        );
                        None
                    }
                    (None, _) => None,
                }
            }
            Err(ClientError::Invalid(reason)) => {
                // Not an id the server makes (a forged or mangled cookie or header): no
                // session, as for an unknown one, not an error page.
                self.answered();
                tracing::debug!(%reason, "session id refused by the store as invalid");
                None
            }
            Err(error) if self.fallback_on() && self.is_outage(&error) => {
                let Some(snap) = snapshot else {
                    return Err(SessionError::Unavailable(error));
                };
                tracing::info!(%error, "session store unavailable: serving the session from its snapshot");
                state.current = snap.to_session();
                state.snapshot = Some(snap);
                state.source = Source::Snapshot;
                return Ok(());
            }
            Err(error) => return Err(self.failure(error)),
        };
        if let Some(stored) = found {
            self.adopt(state, stored);
        }
        self.retry_deletes().await;
        Ok(())
    }

    /// The store's answer becomes the request's session, and the base of any offline change.
    fn adopt(&self, state: &mut State, stored: SessionData) {
        LearnedTtl::remember(&self.ttl.seen_ms, &stored);
        state.snapshot = self.fallback_on().then(|| {
            Snapshot::confirmed(
                &stored,
                self.namespace(),
                SystemTime::now(),
                self.config.snapshot_max_age,
            )
        });
        state.current = stored;
        state.source = Source::Store;
    }

    /// Brings the store in step with a snapshot (`Restore`): the session to serve, `None` when
    /// the store refuses it (deleted or expired). When the store moved on (ABORTED), the
    /// store's session wins and the offline changes are dropped.
    ///
    /// The store answered the `Get` just before, so a failing `Restore` never makes the
    /// snapshot stand in: a retryable failure is the request's error (503, the cookie kept
    /// for the next try), any other drops the offline changes and serves what the store holds
    /// (nothing, when it holds nothing: the cookies are cleared).
    async fn resync(
        &self,
        snap: Snapshot,
        stored: Option<SessionData>,
    ) -> Result<Option<SessionData>, SessionError> {
        let dropped = |reason: &dyn std::fmt::Display, why: &str| {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                %reason,
                base_version = snap.base_version,
                keys_set = snap.offline_set.len(),
                keys_removed = snap.offline_removed.len(),
                "offline changes dropped: {why}"
            );
        };
        match self.backend.restore(snap.to_restore()).await {
            Ok(restored) => Ok(Some(restored)),
            Err(ClientError::Refused(reason)) => {
                tracing::info!(%reason, "session snapshot not restored");
                Ok(None)
            }
            Err(ClientError::Conflict(reason)) => {
                dropped(
                    &reason,
                    "the store changed the session during the outage, the store wins",
                );
                match stored {
                    Some(stored) => Ok(Some(stored)),
                    None => match self.backend.get(&snap.id, true).await {
                        Ok(stored) => Ok(Some(stored)),
                        Err(ClientError::NotFound { .. }) => Ok(None),
                        Err(error) => Err(self.failure(error)),
                    },
                }
            }
            Err(error) if error.is_retryable() => Err(self.failure(error)),
            Err(error) => {
                dropped(&error, "the store refused the restore");
                Ok(stored)
            }
        }
    }

    /// Settles a few logouts made during an outage, now that the store answers.
    async fn retry_deletes(&self) {
        let batch: Vec<(String, Option<RestoreRequest>)> = {
            let pending = self.pending_deletes.lock();
            if pending.is_empty() {
                return;
            }
            pending
                .iter()
                .take(DELETES_PER_REQUEST)
                .map(|(id, restore)| (id.clone(), restore.clone()))
                .collect()
        };
        for (id, restore) in batch {
            match self.settle_logout(&id, restore).await {
                Ok(()) => {}
                Err(error) if error.is_retryable() => {
                    tracing::debug!(%error, "deferred logout not yet settled");
                    return;
                }
                // Not one the store will ever take (a token without the right, say): retrying
                // it forever would hold up the others.
                Err(error) => tracing::warn!(%error, "deferred logout refused by the store"),
            }
            self.pending_deletes.lock().remove(&id);
        }
    }

    /// One deferred logout: the snapshot's `Restore` first (a session made offline, or lost
    /// with the store's data, is not in the store, and a delete of an absent id leaves no
    /// tombstone to refuse the snapshot if the cookies are replayed), then the delete.
    async fn settle_logout(
        &self,
        id: &str,
        restore: Option<RestoreRequest>,
    ) -> Result<(), ClientError> {
        if let Some(request) = restore {
            match self.backend.restore(request).await {
                // Restored, present already, or refused (deleted, expired): delete it now.
                Ok(_) | Err(ClientError::Refused(_) | ClientError::Conflict(_)) => {}
                Err(error) => return Err(error),
            }
        }
        match self.backend.delete(id).await {
            Ok(_) | Err(ClientError::NotFound { .. }) => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// Remembers a logout the store could not take; `false` when too many are waiting.
    fn defer_delete(&self, id: String, restore: Option<RestoreRequest>) -> bool {
        let mut pending = self.pending_deletes.lock();
        if pending.len() >= MAX_PENDING_DELETES && !pending.contains_key(&id) {
            return false;
        }
        pending.insert(id, restore);
        true
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
        let resend = self.plan_expiry(state, SystemTime::now());
        if state.changes.any() {
            self.save_changes(state).await?;
        }
        Ok(self.cookies(state, resend))
    }

    /// The expiry that applies to the session: its own, else the layer's.
    fn expiry_of(&self, state: &State) -> Expiry {
        ExpiryRecord::read(&state.current.attrs)
            .own()
            .unwrap_or(self.config.expiry)
    }

    /// Turns the session's expiry into store changes (ttl, absolute lifetime) when it is set or
    /// the session is created, and schedules the persistent id cookie: whether the response
    /// must send the id cookie again (its lifetime changed, the session changed, or half the
    /// cookie's life has passed; the time it was sent is then recorded in the session).
    fn plan_expiry(&self, state: &mut State, now: SystemTime) -> bool {
        let new = state.source == Source::New;
        if new && !state.changes.any() {
            // Nothing to create: an anonymous read makes no session.
            return false;
        }
        if state.source == Source::Snapshot {
            // Served from the snapshot: no store to follow; the cookie goes with a new id only.
            return state.changes.expiry;
        }
        let setting = state.changes.expiry || new;
        let mut record = ExpiryRecord::read(&state.current.attrs);
        let layer_ttl = || self.ttl.for_new_session(self.config.ttl);
        match self.expiry_of(state) {
            Expiry::BrowserSession => {
                if state.changes.expiry && !new && state.changes.ttl.is_none() {
                    // Back from "remember me": the layer's ttl again.
                    state.changes.ttl = Some(layer_ttl());
                }
                if record.has_cookie_schedule() {
                    record.forget_cookie();
                    write_record(state, record);
                }
                state.changes.expiry
            }
            Expiry::OnInactivity(inactivity) => {
                if setting && state.changes.ttl.is_none() {
                    state.changes.ttl = Some(inactivity);
                }
                let life = state.changes.ttl.unwrap_or(if state.current.ttl.is_zero() {
                    inactivity
                } else {
                    state.current.ttl
                });
                let due =
                    setting || state.changes.any() || record.cookie_due(now, state.current.ttl);
                if due {
                    record.cookie_sent(now, now + life);
                    write_record(state, record);
                }
                due
            }
            Expiry::AtDateTime(end) => {
                if setting {
                    let left = end.duration_since(now).unwrap_or_default();
                    let base = if new { now } else { state.current.created_at };
                    let lifetime = end
                        .duration_since(base)
                        .unwrap_or_default()
                        .max(Duration::from_secs(1));
                    state.changes.max_lifetime = Some(lifetime);
                    let ttl = state.changes.ttl.unwrap_or_else(|| {
                        if new || state.current.ttl.is_zero() {
                            layer_ttl()
                        } else {
                            state.current.ttl
                        }
                    });
                    if new || ttl > left || state.changes.ttl.is_some() {
                        state.changes.ttl = Some(ttl.min(left).max(Duration::from_secs(1)));
                    }
                }
                if record.has_cookie_schedule() {
                    record.forget_cookie();
                    write_record(state, record);
                }
                setting
            }
        }
    }

    /// Logout: deletes the session and clears both cookies, also when the store is unreachable
    /// (the delete is then retried once the store answers again).
    async fn destroy(&self, state: &State) -> Result<CookieUpdate, SessionError> {
        let ids: HashSet<String> = [state.cookie_id.clone(), Some(state.current.id.clone())]
            .into_iter()
            .flatten()
            .filter(|i| !i.is_empty())
            .collect();
        for id in ids {
            match self.backend.delete(&id).await {
                Ok(_) => self.answered(),
                Err(ClientError::NotFound { .. } | ClientError::Invalid(_)) => {}
                // The cookies still go: the user is logged out in this browser, and the
                // store's copy is deleted once the store answers again.
                Err(error) if error.is_retryable() => {
                    // The session's snapshot (the loaded one, else the request's cookie).
                    let restore = state
                        .snapshot
                        .clone()
                        .or_else(|| self.request_snapshot(state))
                        .filter(|snap| snap.id == id)
                        .map(|snap| snap.to_restore());
                    if !self.defer_delete(id, restore) {
                        tracing::warn!(%error, "logout during a store outage: too many deferred, refused");
                        return Err(SessionError::Unavailable(error));
                    }
                    tracing::warn!(%error, "logout during a store outage: delete deferred");
                }
                Err(error) => return Err(SessionError::Store(error)),
            }
        }
        Ok(CookieUpdate::Clear)
    }

    async fn save_changes(&self, state: &mut State) -> Result<(), SessionError> {
        // The patch's write id: should the store go away before answering, the snapshot keeps
        // it, so that a `Restore` finding the patch applied takes it for its own base.
        let write_id = new_write_id();
        let outcome = match state.source {
            Source::New => {
                let own_ttl = state.changes.ttl.is_some();
                self.backend
                    .create(NewSession {
                        user_id: state.current.user_id.clone(),
                        attrs: state.current.attrs.clone(),
                        ttl: state.changes.ttl.or(self.config.ttl),
                        max_lifetime: state.changes.max_lifetime,
                    })
                    .await
                    .map(|created| {
                        // A session's own ttl ("remember me") says nothing of the layer's.
                        if !own_ttl {
                            LearnedTtl::remember(&self.ttl.created_ms, &created);
                        }
                        Some(created)
                    })
            }
            Source::Store => self.save_to_store(state, &write_id).await,
            Source::Snapshot => Err(ClientError::Unavailable(
                "session lives in its snapshot".into(),
            )),
        };
        match outcome {
            Ok(Some(stored)) => {
                self.answered();
                self.adopt(state, stored);
                self.retry_deletes().await;
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(error) if self.codec.is_some() && self.fallback_on() && self.is_outage(&error) => {
                let sent = (state.source == Source::Store).then_some(write_id.as_str());
                self.apply_locally(state, error, sent)
            }
            Err(error) => Err(self.failure(error)),
        }
    }

    /// Regenerate (if asked), then one patch under `write_id`; `None` when there was nothing to
    /// write.
    async fn save_to_store(
        &self,
        state: &State,
        write_id: &str,
    ) -> Result<Option<SessionData>, ClientError> {
        let mut id = state.current.id.clone();
        let mut latest = None;
        if state.changes.regenerate {
            let moved = self.backend.regenerate(&id).await?;
            id.clone_from(&moved.id);
            latest = Some(moved);
        }
        let mut patch = state.patch();
        if patch.is_empty() {
            return Ok(latest);
        }
        patch.write_id = Some(write_id.to_owned());
        self.backend.update(&id, patch).await.map(Some)
    }

    /// During an outage: the changes go into the snapshot as offline changes against the
    /// version the store last confirmed. A new session gets an id made here, in the server's
    /// format, and the ttl the server gives this layer's sessions; it is a session made
    /// offline, which a store may create once it answers again.
    ///
    /// Regenerating an existing session is refused (`error`, a 503): done offline, it would
    /// turn a stored session into one made offline, whose attributes a store would take on
    /// recovery whatever it had changed meanwhile (the store would no longer win).
    ///
    /// `sent` is the write id of the patch this request sent to the store against the version
    /// it had just confirmed: the store may have applied it before going away, so the snapshot
    /// records it as an unsure write of its own ([`SnapshotPolicy::record_unsure_write`]).
    fn apply_locally(
        &self,
        state: &mut State,
        error: ClientError,
        sent: Option<&str>,
    ) -> Result<(), SessionError> {
        let now = SystemTime::now();
        let max_age = self.config.snapshot_max_age;
        if state.changes.regenerate && !state.current.id.is_empty() {
            tracing::warn!(%error, "session id regeneration during a store outage: refused");
            return Err(self.failure(error));
        }
        let fresh_id = state.current.id.is_empty();
        if fresh_id {
            let mut bytes = [0u8; 24];
            self.rng.fill(&mut bytes).map_err(|_| {
                SessionError::Store(ClientError::Config("random source failed".into()))
            })?;
            state.current.id = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
            if unix_ms(state.current.created_at) == 0 {
                state.current.created_at = now;
            }
        }
        if state.current.ttl.is_zero() {
            state.current.ttl = self.ttl.for_new_session(self.config.ttl);
        }
        let snapshot = match state.snapshot.take() {
            Some(mut snapshot) if !fresh_id => {
                let patch = state.patch();
                snapshot.record_offline(&patch.set, &patch.remove, patch.user_id.as_deref());
                if let Some(write_id) = sent.filter(|_| !state.changes.regenerate) {
                    snapshot.record_unsure_write(write_id);
                }
                snapshot
            }
            _ => Snapshot::made_offline(&state.current, self.namespace(), now, max_age),
        };
        state.current = snapshot.to_session();
        state.snapshot = Some(snapshot);
        state.source = Source::Snapshot;
        tracing::info!(
            version = state.current.version,
            "session store unavailable: change kept in the snapshot cookie"
        );
        Ok(())
    }

    /// The cookies for the session as saved: none when there is none (stale ones cleared), the
    /// id cookie when the id changed or `resend` (its lifetime is due, see
    /// [`Fallback::plan_expiry`]), and the snapshot as [`Fallback::snapshot_cookie`] says.
    fn cookies(&self, state: &State, resend: bool) -> CookieUpdate {
        if state.current.id.is_empty() {
            // No session (the cookie named a deleted or unknown one): drop stale cookies.
            return if state.cookie_id.is_some() {
                CookieUpdate::Clear
            } else {
                CookieUpdate::Keep
            };
        }
        let id = (resend || state.cookie_id.as_deref() != Some(state.current.id.as_str()))
            .then(|| state.current.id.clone());
        CookieUpdate::Write {
            id,
            lifetime: self.id_lifetime(state),
            snapshot: self.snapshot_cookie(state),
        }
    }

    /// The id cookie's lifetime: none for a browser session; the time the store keeps the
    /// session for `OnInactivity` (to its absolute end, if sooner); the end for `AtDateTime`.
    fn id_lifetime(&self, state: &State) -> IdLifetime {
        let now = SystemTime::now();
        match self.expiry_of(state) {
            Expiry::BrowserSession => IdLifetime::Session,
            Expiry::OnInactivity(inactivity) => {
                let current = &state.current;
                let until = current
                    .ends_at
                    .map_or(current.expires_at, |end| end.min(current.expires_at));
                match until.duration_since(now) {
                    Ok(left) if state.source == Source::Store => IdLifetime::MaxAge(left),
                    _ => IdLifetime::MaxAge(inactivity),
                }
            }
            Expiry::AtDateTime(end) => IdLifetime::Until(end),
        }
    }

    /// A new snapshot when the fallback is on and the request's is not up to date (another
    /// session or version, offline changes the store has now taken, past half its life, an old
    /// key or format), when the session changed or lives in its snapshot only (its expiry then
    /// slides as a store touch would, up to the snapshot max age past the store's last word),
    /// or on every response in `Always` mode.
    fn snapshot_cookie(&self, state: &State) -> SnapshotCookie {
        let Some(codec) = self.codec.as_ref().filter(|_| self.fallback_on()) else {
            return SnapshotCookie::Keep;
        };
        let Some(snapshot) = &state.snapshot else {
            return SnapshotCookie::Keep;
        };
        let now = SystemTime::now();
        let current = &state.current;
        let up_to_date = state
            .cookie_snapshot
            .as_deref()
            .is_some_and(|raw| codec.is_current(raw))
            && self
                .request_snapshot(state)
                .is_some_and(|old| old.is_up_to_date(current, now));
        let rewrite = self.config.fallback == FallbackMode::Always
            || state.source == Source::Snapshot
            || state.changes.any()
            || !up_to_date;
        if !rewrite {
            return SnapshotCookie::Keep;
        }
        let mut snapshot = snapshot.clone();
        snapshot.issued_at_ms = unix_ms(now);
        if state.source == Source::Snapshot {
            // The snapshot is the only copy: slide its expiry as a store touch would.
            snapshot.slide_offline(now, self.config.snapshot_max_age);
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
