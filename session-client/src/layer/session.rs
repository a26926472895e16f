//! The [`Session`] handlers get: typed reads and writes of the request's session, with the
//! change tracking that lets the layer save once, after the handler, as one patch.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::FromRequestParts;
use http::request::Parts;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::SessionError;
use super::expiry::{EXPIRY_ATTRIBUTE, Expiry, ExpiryRecord};
use super::fallback::{CookieUpdate, Fallback};
use crate::client::{Patch, SessionData};
use crate::cookie::Snapshot;

/// Where the loaded session came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Source {
    /// No session yet: a write creates one.
    New,
    /// The store has it.
    Store,
    /// Only the snapshot has it (store unreachable, or the session was made during an outage).
    Snapshot,
}

/// What this request changed, replayed as one patch when the response goes out.
#[derive(Debug, Default)]
pub(super) struct Changes {
    /// Keys written.
    pub(super) set: HashSet<String>,
    /// Keys removed.
    pub(super) remove: HashSet<String>,
    /// Owner changed.
    pub(super) user: bool,
    /// `regenerate` was called.
    pub(super) regenerate: bool,
    /// `destroy` was called.
    pub(super) destroy: bool,
    /// The session's own expiry was set (or reset to the layer's) with `set_expiry`.
    pub(super) expiry: bool,
    /// New sliding ttl for the store (`set_ttl`, or the expiry's).
    pub(super) ttl: Option<Duration>,
    /// New absolute lifetime for the store (an `AtDateTime` expiry's).
    pub(super) max_lifetime: Option<Duration>,
}

impl Changes {
    /// Whether the handler changed anything.
    pub(super) fn any(&self) -> bool {
        !self.set.is_empty()
            || !self.remove.is_empty()
            || self.user
            || self.regenerate
            || self.destroy
            || self.expiry
            || self.ttl.is_some()
            || self.max_lifetime.is_some()
    }
}

/// Per-request state behind a [`Session`].
#[derive(Debug)]
pub(super) struct State {
    /// Id the request sent (in its cookie or header, see [`IdSource`](super::IdSource)).
    pub(super) cookie_id: Option<String>,
    /// Raw snapshot cookie from the request.
    pub(super) cookie_snapshot: Option<String>,
    /// Whether the lazy load ran.
    pub(super) loaded: bool,
    /// The session as this request sees it, with its changes applied (id empty while `New`;
    /// times at the Unix epoch and a zero ttl until the store or a snapshot gives them).
    pub(super) current: SessionData,
    /// Where it came from.
    pub(super) source: Source,
    /// The snapshot of the session as loaded: the store's confirmation of it (the base of any
    /// offline change), or the request's snapshot while the store is unreachable. `None` with
    /// the fallback off, or before anything is loaded.
    pub(super) snapshot: Option<Snapshot>,
    /// What the handler changed.
    pub(super) changes: Changes,
}

impl State {
    /// A request's state before anything is loaded.
    pub(super) fn new(cookie_id: Option<String>, cookie_snapshot: Option<String>) -> Self {
        State {
            cookie_id,
            cookie_snapshot,
            loaded: false,
            current: SessionData {
                id: String::new(),
                namespace: String::new(),
                user_id: String::new(),
                attrs: Default::default(),
                version: 0,
                created_at: SystemTime::UNIX_EPOCH,
                expires_at: SystemTime::UNIX_EPOCH,
                ttl: Duration::ZERO,
                epoch: String::new(),
                write_id: String::new(),
                ends_at: Default::default(),
            },
            source: Source::New,
            snapshot: None,
            changes: Changes::default(),
        }
    }

    /// This request's changes as one attribute-level patch (without compare-and-set: writers of
    /// different keys both win).
    pub(super) fn patch(&self) -> Patch {
        let changes = &self.changes;
        Patch {
            set: changes
                .set
                .iter()
                .filter_map(|k| self.current.attrs.get(k).map(|v| (k.clone(), v.clone())))
                .collect(),
            remove: changes.remove.iter().cloned().collect(),
            expected_version: None,
            user_id: changes.user.then(|| self.current.user_id.clone()),
            ttl: changes.ttl,
            write_id: None,
            max_lifetime: changes.max_lifetime,
        }
    }
}

/// The session of the current request: extract it in a handler.
///
/// Values are stored as JSON. Everything loads lazily and is saved once after the handler.
#[derive(Clone)]
pub struct Session {
    /// The state machine shared by every request of the layer.
    fallback: Arc<Fallback>,
    /// This request's session state.
    state: Arc<tokio::sync::Mutex<State>>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").finish_non_exhaustive()
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Session {
    type Rejection = SessionError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Session>()
            .cloned()
            .ok_or(SessionError::MissingLayer)
    }
}

impl Session {
    /// The session of a request that sent `cookie_id` and `cookie_snapshot`, not loaded yet.
    pub(super) fn new(
        fallback: Arc<Fallback>,
        cookie_id: Option<String>,
        cookie_snapshot: Option<String>,
    ) -> Self {
        Session {
            fallback,
            state: Arc::new(tokio::sync::Mutex::new(State::new(
                cookie_id,
                cookie_snapshot,
            ))),
        }
    }

    /// The value under `key`, if any.
    pub async fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, SessionError> {
        let state = self.loaded().await?;
        match state.current.attrs.get(key) {
            Some(bytes) => Ok(Some(serde_json::from_slice(bytes)?)),
            None => Ok(None),
        }
    }

    /// Writes `value` under `key`.
    pub async fn insert<T: Serialize>(&self, key: &str, value: &T) -> Result<(), SessionError> {
        let bytes = serde_json::to_vec(value)?;
        let mut state = self.loaded().await?;
        state.current.attrs.insert(key.to_owned(), bytes);
        state.changes.remove.remove(key);
        state.changes.set.insert(key.to_owned());
        Ok(())
    }

    /// Removes `key` and returns the value it held (`None`: there was none). A value that does
    /// not deserialize as `T` is an error and stays (see [`Session::remove_value`]).
    pub async fn remove<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, SessionError> {
        let mut state = self.loaded().await?;
        let old = match state.current.attrs.get(key) {
            Some(bytes) => Some(serde_json::from_slice(bytes)?),
            None => None,
        };
        Self::remove_key(&mut state, key);
        Ok(old)
    }

    /// Removes `key` without reading its value; whether it held one.
    pub async fn remove_value(&self, key: &str) -> Result<bool, SessionError> {
        let mut state = self.loaded().await?;
        Ok(Self::remove_key(&mut state, key))
    }

    /// Removes every attribute (the user, the id and the expiry stay): the session is kept,
    /// empty. Keys another request adds meanwhile are not removed.
    pub async fn clear(&self) -> Result<(), SessionError> {
        let mut state = self.loaded().await?;
        let keys: Vec<String> = state
            .current
            .attrs
            .keys()
            .filter(|k| k.as_str() != EXPIRY_ATTRIBUTE)
            .cloned()
            .collect();
        for key in keys {
            Self::remove_key(&mut state, &key);
        }
        Ok(())
    }

    /// The value under `key`, or `make()`'s, written under `key` first.
    pub async fn get_or_insert_with<T, F>(&self, key: &str, make: F) -> Result<T, SessionError>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> T,
    {
        let mut state = self.loaded().await?;
        if let Some(bytes) = state.current.attrs.get(key) {
            return Ok(serde_json::from_slice(bytes)?);
        }
        let value = make();
        let bytes = serde_json::to_vec(&value)?;
        state.current.attrs.insert(key.to_owned(), bytes);
        state.changes.remove.remove(key);
        state.changes.set.insert(key.to_owned());
        Ok(value)
    }

    /// Whether this request changed the session (it is saved after the handler if so).
    pub async fn is_modified(&self) -> bool {
        self.state.lock().await.changes.any()
    }

    /// Removes `key` from the state and records the removal; whether it was there.
    fn remove_key(state: &mut State, key: &str) -> bool {
        let was = state.current.attrs.remove(key).is_some();
        if was || state.source != Source::New {
            state.changes.set.remove(key);
            state.changes.remove.insert(key.to_owned());
        }
        was
    }

    /// The session's own expiry (`None`: it follows the layer's [`SessionConfig::expiry`]).
    ///
    /// [`SessionConfig::expiry`]: super::SessionConfig::expiry
    pub async fn expiry(&self) -> Result<Option<Expiry>, SessionError> {
        let state = self.loaded().await?;
        Ok(ExpiryRecord::read(&state.current.attrs).own())
    }

    /// Gives this session an expiry of its own ("remember me": `Some(Expiry::OnInactivity(30
    /// days))`), or `None` to follow the layer's again. Saved with the session; the id cookie
    /// is sent again with its new lifetime.
    ///
    /// Going back from `AtDateTime` does not lift the store's absolute end already set.
    pub async fn set_expiry(&self, expiry: Option<Expiry>) -> Result<(), SessionError> {
        let mut state = self.loaded().await?;
        let mut record = ExpiryRecord::read(&state.current.attrs);
        if record.own() == expiry {
            return Ok(());
        }
        record.set_own(expiry);
        write_record(&mut state, record);
        state.changes.expiry = true;
        Ok(())
    }

    /// Sets this session's sliding ttl in the store (from the next save on, each request
    /// extends it by `ttl`); a persistent id cookie follows it.
    pub async fn set_ttl(&self, ttl: Duration) -> Result<(), SessionError> {
        let mut state = self.loaded().await?;
        state.changes.ttl = Some(ttl);
        Ok(())
    }

    /// When the store expires the session unless a request comes first (`None`: no session
    /// yet).
    pub async fn expires_at(&self) -> Result<Option<SystemTime>, SessionError> {
        let state = self.loaded().await?;
        Ok(
            (!state.current.id.is_empty() && state.current.expires_at > SystemTime::UNIX_EPOCH)
                .then_some(state.current.expires_at),
        )
    }

    /// The logged-in user, if any.
    pub async fn user_id(&self) -> Result<Option<String>, SessionError> {
        let state = self.loaded().await?;
        Ok(Some(state.current.user_id.clone()).filter(|u| !u.is_empty()))
    }

    /// Sets the session's user (log in). Call [`Session::regenerate`] too.
    pub async fn set_user(&self, user_id: impl Into<String>) -> Result<(), SessionError> {
        let mut state = self.loaded().await?;
        state.current.user_id = user_id.into();
        state.changes.user = true;
        Ok(())
    }

    /// Gives the session a new id when the response goes out, killing the old one (session
    /// fixation defence: call it on login).
    pub async fn regenerate(&self) -> Result<(), SessionError> {
        let mut state = self.loaded().await?;
        state.changes.regenerate = true;
        Ok(())
    }

    /// [`Session::regenerate`], by tower-sessions' name.
    pub async fn cycle_id(&self) -> Result<(), SessionError> {
        self.regenerate().await
    }

    /// Deletes the session (log out) and clears its cookies.
    pub async fn destroy(&self) -> Result<(), SessionError> {
        let mut state = self.state.lock().await;
        state.changes.destroy = true;
        Ok(())
    }

    /// The session id, if the session exists.
    pub async fn id(&self) -> Result<Option<String>, SessionError> {
        let state = self.loaded().await?;
        Ok(Some(state.current.id.clone()).filter(|id| !id.is_empty()))
    }

    /// Whether this request is served from the snapshot because the store is unreachable.
    pub async fn is_degraded(&self) -> Result<bool, SessionError> {
        Ok(self.loaded().await?.source == Source::Snapshot)
    }

    /// The session of this request, outside axum: what [`SessionLayer`] put into the request's
    /// extensions (`None` without the layer).
    ///
    /// [`SessionLayer`]: super::SessionLayer
    pub fn from_request<B>(request: &http::Request<B>) -> Option<Session> {
        request.extensions().get::<Session>().cloned()
    }

    /// The state, loaded on first use.
    async fn loaded(&self) -> Result<tokio::sync::MutexGuard<'_, State>, SessionError> {
        let mut state = self.state.lock().await;
        if !state.loaded {
            self.fallback.load(&mut state).await?;
            state.loaded = true;
        }
        Ok(state)
    }

    /// Writes this request's changes; called once after the handler. Returns the cookies the
    /// response must carry.
    pub(super) async fn save(&self) -> Result<CookieUpdate, SessionError> {
        let mut state = self.state.lock().await;
        self.fallback.save(&mut state).await
    }
}

/// Writes the expiry record into the session (or removes it when empty), as a change.
pub(super) fn write_record(state: &mut State, record: ExpiryRecord) {
    let key = EXPIRY_ATTRIBUTE.to_owned();
    if record.is_empty() {
        if state.current.attrs.remove(&key).is_some() {
            state.changes.set.remove(&key);
            state.changes.remove.insert(key);
        }
    } else {
        state.current.attrs.insert(key.clone(), record.to_bytes());
        state.changes.remove.remove(&key);
        state.changes.set.insert(key);
    }
}
