//! The axum/tower layer: gives handlers a [`Session`] backed by the session server, with the
//! signed-cookie snapshot as a fallback when the store is unreachable.
//!
//! Per request: the session id comes from a cookie (`sid` by default). The session is loaded
//! lazily, on the first call that needs it, and saved once after the handler returns, only when
//! something changed, as an attribute-level patch (so two requests of one user that change
//! different keys do not erase each other's changes).
//!
//! # Fallback
//! With [`FallbackMode::OnOutage`] or [`FallbackMode::Always`] the layer also keeps a signed
//! snapshot of the session in a second cookie (`sid_snap`, see [`crate::cookie`]):
//! - store reachable: the store is the truth; the snapshot is rewritten when the session changes
//!   or half its life has passed (`on-outage`), or on every response (`always`);
//! - store unreachable: the session is served from the snapshot, changes are written into it
//!   (version bumped), and its expiry slides like the store's would; a login during the outage
//!   makes a session that lives only in the snapshot, under an id made here;
//! - store back but missing the session (it restarted empty, or the session was made during the
//!   outage), or holding an older version: the snapshot is pushed back with `Restore`, which the
//!   server refuses when the id was deleted (logout leaves a tombstone) and ignores when it holds
//!   a newer version.
//!
//! With [`FallbackMode::Off`] an unreachable store makes session calls fail with
//! [`SessionError::Unavailable`], which answers 503: never a silent logout.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use axum::extract::FromRequestParts;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use http::StatusCode;
use http::request::Parts;
use ring::rand::{SecureRandom as _, SystemRandom};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tower::{Layer, Service};
use tower_cookies::cookie::SameSite;
use tower_cookies::{Cookie, CookieManager, CookieManagerLayer, Cookies};

use crate::client::{ClientError, Patch, SessionClient, SessionData};
use crate::cookie::{CookieCodec, MAX_COOKIE_BYTES, Snapshot, unix_ms};

/// When the signed snapshot cookie is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FallbackMode {
    /// No snapshot: an unreachable store is a 503.
    Off,
    /// Snapshot kept fresh enough to survive an outage; read only when the store is unreachable
    /// or lost the session.
    OnOutage,
    /// As `OnOutage`, but the snapshot is rewritten on every response, so it is never older than
    /// the last request.
    Always,
}

/// Cookie names and attributes, and the fallback mode.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Name of the cookie holding the session id.
    pub cookie_name: String,
    /// Name of the cookie holding the signed snapshot.
    pub snapshot_cookie_name: String,
    /// `Secure` attribute; keep it on except for plain-HTTP localhost development.
    pub secure: bool,
    /// `HttpOnly` attribute: scripts cannot read the cookies.
    pub http_only: bool,
    /// `SameSite` attribute.
    pub same_site: SameSite,
    /// `Path` attribute.
    pub path: String,
    /// `Domain` attribute, if any.
    pub domain: Option<String>,
    /// Ttl for new sessions (`None`: the server's default).
    pub ttl: Option<Duration>,
    /// Fallback mode.
    pub fallback: FallbackMode,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            cookie_name: "sid".into(),
            snapshot_cookie_name: "sid_snap".into(),
            secure: true,
            http_only: true,
            same_site: SameSite::Lax,
            path: "/".into(),
            domain: None,
            ttl: None,
            fallback: FallbackMode::Off,
        }
    }
}

/// Why a session call failed.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The store is unreachable and no snapshot can stand in (503).
    #[error("session store unavailable")]
    Unavailable(#[source] ClientError),
    /// A value could not be (de)serialized as JSON (500).
    #[error("session value is not valid JSON for this type: {0}")]
    Value(#[from] serde_json::Error),
    /// The store refused or failed otherwise (500).
    #[error("session store error: {0}")]
    Store(#[source] ClientError),
    /// The handler asked for a `Session` on a route without [`SessionLayer`] (500).
    #[error("SessionLayer is not installed on this route")]
    MissingLayer,
}

impl IntoResponse for SessionError {
    fn into_response(self) -> Response {
        let status = match self {
            SessionError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        tracing::warn!(error = %self, "session error");
        (status, self.to_string()).into_response()
    }
}

/// Where the loaded session came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// No session yet: a write creates one.
    New,
    /// The store has it.
    Store,
    /// Only the snapshot has it (store unreachable, or the session was made during an outage).
    Snapshot,
}

/// The session as this request sees it.
#[derive(Debug, Clone, Default)]
struct Current {
    /// Session id (empty while `New`).
    id: String,
    /// Owner.
    user_id: String,
    /// Attributes with this request's changes applied.
    attrs: HashMap<String, Vec<u8>>,
    /// Last known version.
    version: u64,
    /// Creation time (unix ms).
    created_at_ms: u64,
    /// Expiry (unix ms).
    expires_at_ms: u64,
    /// Sliding ttl.
    ttl: Duration,
}

impl Current {
    fn from_store(s: SessionData) -> Self {
        Current {
            id: s.id,
            user_id: s.user_id,
            attrs: s.attrs,
            version: s.version,
            created_at_ms: unix_ms(s.created_at),
            expires_at_ms: unix_ms(s.expires_at),
            ttl: s.ttl,
        }
    }

    fn from_snapshot(s: Snapshot) -> Self {
        Current {
            id: s.id,
            user_id: s.user_id,
            attrs: s.attrs.into_iter().collect(),
            version: s.version,
            created_at_ms: s.created_at_ms,
            expires_at_ms: s.expires_at_ms,
            ttl: Duration::from_millis(s.ttl_ms),
        }
    }

    fn snapshot(&self, namespace: &str, now: SystemTime) -> Snapshot {
        Snapshot {
            id: self.id.clone(),
            namespace: namespace.to_owned(),
            user_id: self.user_id.clone(),
            attrs: self.attrs.clone().into_iter().collect(),
            version: self.version,
            created_at_ms: self.created_at_ms,
            issued_at_ms: unix_ms(now),
            expires_at_ms: self.expires_at_ms,
            ttl_ms: u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX),
        }
    }

    fn as_store_data(&self, namespace: &str) -> SessionData {
        let at = |ms: u64| SystemTime::UNIX_EPOCH + Duration::from_millis(ms);
        SessionData {
            id: self.id.clone(),
            namespace: namespace.to_owned(),
            user_id: self.user_id.clone(),
            attrs: self.attrs.clone(),
            version: self.version,
            created_at: at(self.created_at_ms),
            expires_at: at(self.expires_at_ms),
            ttl: self.ttl,
        }
    }
}

/// What this request changed, replayed as one patch when the response goes out.
#[derive(Debug, Default)]
struct Changes {
    /// Keys written.
    set: HashSet<String>,
    /// Keys removed.
    remove: HashSet<String>,
    /// Owner changed.
    user: bool,
    /// `regenerate` was called.
    regenerate: bool,
    /// `destroy` was called.
    destroy: bool,
}

impl Changes {
    fn any(&self) -> bool {
        !self.set.is_empty()
            || !self.remove.is_empty()
            || self.user
            || self.regenerate
            || self.destroy
    }
}

/// Per-request state behind a [`Session`].
#[derive(Debug)]
struct State {
    /// Id from the request's cookie.
    cookie_id: Option<String>,
    /// Raw snapshot cookie from the request.
    cookie_snapshot: Option<String>,
    /// Whether the lazy load ran.
    loaded: bool,
    /// The session, once loaded.
    current: Current,
    /// Where it came from.
    source: Source,
    /// What the handler changed.
    changes: Changes,
}

/// Shared by every request: the client, the codec, the settings.
struct Shared {
    /// The session server.
    client: SessionClient,
    /// The snapshot codec (required unless fallback is off).
    codec: Option<CookieCodec>,
    /// Cookie and fallback settings.
    config: SessionConfig,
    /// Ids for sessions made during an outage.
    rng: SystemRandom,
}

/// The tower layer that installs sessions (and the cookie manager it needs).
#[derive(Clone)]
pub struct SessionLayer {
    /// Client, codec, settings.
    shared: Arc<Shared>,
}

impl std::fmt::Debug for SessionLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionLayer")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl SessionLayer {
    /// Sessions in the store only, with default cookies (fallback off).
    pub fn new(client: SessionClient) -> Self {
        Self::with_config(client, None, SessionConfig::default())
    }

    /// Sessions with the given settings; `codec` is needed for any fallback mode other than
    /// `Off` (without one, fallback is turned off and a warning logged).
    pub fn with_config(
        client: SessionClient,
        codec: Option<CookieCodec>,
        mut config: SessionConfig,
    ) -> Self {
        if codec.is_none() && config.fallback != FallbackMode::Off {
            tracing::warn!("cookie fallback needs a CookieCodec; fallback turned off");
            config.fallback = FallbackMode::Off;
        }
        SessionLayer {
            shared: Arc::new(Shared {
                client,
                codec,
                config,
                rng: SystemRandom::new(),
            }),
        }
    }
}

impl<S> Layer<S> for SessionLayer {
    type Service = CookieManager<SessionService<S>>;

    fn layer(&self, inner: S) -> Self::Service {
        CookieManagerLayer::new().layer(SessionService {
            inner,
            shared: self.shared.clone(),
        })
    }
}

/// The service [`SessionLayer`] wraps around the application (inside the cookie manager).
#[derive(Clone)]
pub struct SessionService<S> {
    /// The application.
    inner: S,
    /// Client, codec, settings.
    shared: Arc<Shared>,
}

impl<S, B> Service<http::Request<B>> for SessionService<S>
where
    S: Service<http::Request<B>, Response = Response> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response;
    type Error = S::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // The clone that was made ready goes into the future; a fresh clone stays (tower idiom).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        Box::pin(async move {
            let Some(cookies) = request.extensions().get::<Cookies>().cloned() else {
                return Ok(SessionError::MissingLayer.into_response());
            };
            let config = &shared.config;
            let cookie_id = cookies
                .get(&config.cookie_name)
                .map(|c| c.value().to_owned());
            let cookie_snapshot = (config.fallback != FallbackMode::Off)
                .then(|| {
                    cookies
                        .get(&config.snapshot_cookie_name)
                        .map(|c| c.value().to_owned())
                })
                .flatten();
            let session = Session {
                shared: shared.clone(),
                state: Arc::new(tokio::sync::Mutex::new(State {
                    cookie_id,
                    cookie_snapshot,
                    loaded: false,
                    current: Current::default(),
                    source: Source::New,
                    changes: Changes::default(),
                })),
                cookies,
            };
            request.extensions_mut().insert(session.clone());
            let response = inner.call(request).await?;
            match session.save().await {
                Ok(()) => Ok(response),
                Err(error) => Ok(error.into_response()),
            }
        })
    }
}

/// The session of the current request: extract it in a handler.
///
/// Values are stored as JSON. Everything loads lazily and is saved once after the handler.
#[derive(Clone)]
pub struct Session {
    /// Client, codec, settings.
    shared: Arc<Shared>,
    /// This request's session state.
    state: Arc<tokio::sync::Mutex<State>>,
    /// The request's cookie jar, written into the response by the cookie manager.
    cookies: Cookies,
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

    /// Removes `key`.
    pub async fn remove(&self, key: &str) -> Result<(), SessionError> {
        let mut state = self.loaded().await?;
        if state.current.attrs.remove(key).is_some() || state.source != Source::New {
            state.changes.set.remove(key);
            state.changes.remove.insert(key.to_owned());
        }
        Ok(())
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

    fn namespace(&self) -> &str {
        self.shared.client.namespace()
    }

    /// The state, loaded on first use.
    async fn loaded(&self) -> Result<tokio::sync::MutexGuard<'_, State>, SessionError> {
        let mut state = self.state.lock().await;
        if !state.loaded {
            self.load(&mut state).await?;
            state.loaded = true;
        }
        Ok(state)
    }

    /// The snapshot from the request, if valid and about the same session.
    fn request_snapshot(&self, state: &State) -> Option<Snapshot> {
        let codec = self.shared.codec.as_ref()?;
        let raw = state.cookie_snapshot.as_deref()?;
        match codec.decode(raw) {
            Ok(snapshot)
                if Some(&snapshot.id) == state.cookie_id.as_ref()
                    && snapshot.namespace == self.namespace() =>
            {
                Some(snapshot)
            }
            Ok(_) => None,
            Err(error) => {
                tracing::info!(%error, "ignoring session snapshot cookie");
                None
            }
        }
    }

    async fn load(&self, state: &mut State) -> Result<(), SessionError> {
        let Some(id) = state.cookie_id.clone() else {
            return Ok(());
        };
        let snapshot = self.request_snapshot(state);
        let client = &self.shared.client;
        let found = match client.get(&id, true).await {
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
            Ok(Some(stored)) => {
                state.current = Current::from_store(stored);
                state.source = Source::Store;
            }
            Ok(None) => {}
            Err(error) if error.is_unavailable() => {
                let Some(snap) = self.request_snapshot(state) else {
                    return Err(SessionError::Unavailable(error));
                };
                tracing::info!(%error, "session store unavailable: serving the session from its snapshot");
                state.current = Current::from_snapshot(snap);
                state.source = Source::Snapshot;
            }
            Err(error) => return Err(SessionError::Store(error)),
        }
        Ok(())
    }

    /// Pushes a snapshot back into the store; `None` when the server refuses it (deleted).
    async fn restore(&self, snap: Snapshot) -> Result<Option<SessionData>, ClientError> {
        let data = Current::from_snapshot(snap).as_store_data(self.namespace());
        match self.shared.client.restore(data).await {
            Ok(stored) => Ok(Some(stored)),
            Err(ClientError::Refused(reason)) => {
                tracing::info!(%reason, "session snapshot not restored");
                Ok(None)
            }
            Err(error) => Err(error),
        }
    }

    /// Writes this request's changes and cookies; called once after the handler.
    async fn save(&self) -> Result<(), SessionError> {
        let mut state = self.state.lock().await;
        if state.changes.destroy {
            return self.save_destroy(&mut state).await;
        }
        if !state.loaded {
            return Ok(());
        }
        if state.changes.any() {
            self.save_changes(&mut state).await?;
        }
        self.write_cookies(&mut state);
        Ok(())
    }

    async fn save_destroy(&self, state: &mut State) -> Result<(), SessionError> {
        let id = state
            .cookie_id
            .clone()
            .or_else(|| Some(state.current.id.clone()))
            .filter(|i| !i.is_empty());
        if let Some(id) = id {
            match self.shared.client.delete(&id).await {
                Ok(_) => {}
                // The cookies still go: the user is logged out in this browser. The store's copy
                // expires on its own (see the README on logouts during an outage).
                Err(error) if error.is_unavailable() => {
                    tracing::warn!(%error, "logout during a store outage: session left to expire");
                }
                Err(error) => return Err(SessionError::Store(error)),
            }
        }
        self.clear_cookies();
        Ok(())
    }

    async fn save_changes(&self, state: &mut State) -> Result<(), SessionError> {
        let client = &self.shared.client;
        let outcome = match state.source {
            Source::New => client
                .create(
                    &state.current.user_id,
                    state.current.attrs.clone(),
                    self.shared.config.ttl,
                )
                .await
                .map(Some),
            Source::Store => self.save_to_store(state).await,
            Source::Snapshot => Err(ClientError::Unavailable(
                "session lives in its snapshot".into(),
            )),
        };
        match outcome {
            Ok(Some(stored)) => {
                state.current = Current::from_store(stored);
                state.source = Source::Store;
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(error)
                if error.is_unavailable() && self.shared.codec.is_some() && self.fallback_on() =>
            {
                self.apply_locally(state)
            }
            Err(error) if error.is_unavailable() => Err(SessionError::Unavailable(error)),
            Err(error) => Err(SessionError::Store(error)),
        }
    }

    /// Regenerate (if asked), then one patch; `None` when there was nothing to write.
    async fn save_to_store(&self, state: &State) -> Result<Option<SessionData>, ClientError> {
        let client = &self.shared.client;
        let mut id = state.current.id.clone();
        let mut latest = None;
        if state.changes.regenerate {
            let moved = client.regenerate(&id).await?;
            id.clone_from(&moved.id);
            latest = Some(moved);
        }
        let patch = self.patch(state);
        if patch.is_empty() {
            return Ok(latest);
        }
        client.update(&id, patch).await.map(Some)
    }

    fn fallback_on(&self) -> bool {
        self.shared.config.fallback != FallbackMode::Off
    }

    /// During an outage: the changes live in the snapshot only, under a bumped version; a new
    /// session (or a regenerated one) gets an id made here, in the server's format.
    fn apply_locally(&self, state: &mut State) -> Result<(), SessionError> {
        let now = unix_ms(SystemTime::now());
        if state.current.id.is_empty() || state.changes.regenerate {
            let mut bytes = [0u8; 24];
            self.shared.rng.fill(&mut bytes).map_err(|_| {
                SessionError::Store(ClientError::Config("random source failed".into()))
            })?;
            state.current.id = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
            if state.current.created_at_ms == 0 {
                state.current.created_at_ms = now;
            }
        }
        if state.current.ttl.is_zero() {
            state.current.ttl = self
                .shared
                .config
                .ttl
                .unwrap_or(Duration::from_secs(30 * 60));
        }
        state.current.version += 1;
        state.source = Source::Snapshot;
        tracing::info!(
            version = state.current.version,
            "session store unavailable: change kept in the snapshot cookie"
        );
        Ok(())
    }

    fn patch(&self, state: &State) -> Patch {
        let changes = &state.changes;
        Patch {
            set: changes
                .set
                .iter()
                .filter_map(|k| state.current.attrs.get(k).map(|v| (k.clone(), v.clone())))
                .collect(),
            remove: changes.remove.iter().cloned().collect(),
            expected_version: None,
            user_id: changes.user.then(|| state.current.user_id.clone()),
            ttl: None,
        }
    }

    fn cookie(&self, name: String, value: String) -> Cookie<'static> {
        let config = &self.shared.config;
        let mut cookie = Cookie::new(name, value);
        cookie.set_http_only(config.http_only);
        cookie.set_secure(config.secure);
        cookie.set_same_site(config.same_site);
        cookie.set_path(config.path.clone());
        if let Some(domain) = &config.domain {
            cookie.set_domain(domain.clone());
        }
        cookie
    }

    fn clear_cookies(&self) {
        let config = &self.shared.config;
        for name in [&config.cookie_name, &config.snapshot_cookie_name] {
            if self.cookies.get(name).is_some() {
                self.cookies
                    .remove(self.cookie(name.clone(), String::new()));
            }
        }
    }

    fn write_cookies(&self, state: &mut State) {
        let config = &self.shared.config;
        if state.current.id.is_empty() {
            // No session (the cookie named a deleted or unknown one): drop stale cookies.
            if state.cookie_id.is_some() {
                self.clear_cookies();
            }
            return;
        }
        if state.cookie_id.as_deref() != Some(&state.current.id) {
            self.cookies
                .add(self.cookie(config.cookie_name.clone(), state.current.id.clone()));
        }
        let Some(codec) = self.shared.codec.as_ref().filter(|_| self.fallback_on()) else {
            return;
        };
        let now = SystemTime::now();
        if state.source == Source::Snapshot {
            // The snapshot is the only copy: slide its expiry as a store touch would.
            let ttl_ms = u64::try_from(state.current.ttl.as_millis()).unwrap_or(u64::MAX);
            state.current.expires_at_ms = unix_ms(now).saturating_add(ttl_ms);
        }
        let current_key = state
            .cookie_snapshot
            .as_deref()
            .is_some_and(|raw| codec.is_current(raw));
        let fresh = current_key
            && self.request_snapshot(state).is_some_and(|old| {
                let half_life =
                    u64::try_from(state.current.ttl.as_millis() / 2).unwrap_or(u64::MAX);
                old.version == state.current.version
                    && old.id == state.current.id
                    && old.expires_at_ms.saturating_sub(unix_ms(now)) > half_life
            });
        let rewrite = config.fallback == FallbackMode::Always
            || state.source == Source::Snapshot
            || state.changes.any()
            || !fresh;
        if !rewrite {
            return;
        }
        let name = config.snapshot_cookie_name.clone();
        match codec.encode(&state.current.snapshot(self.namespace(), now)) {
            Ok(value) if name.len() + 1 + value.len() <= MAX_COOKIE_BYTES => {
                self.cookies.add(self.cookie(name, value));
            }
            Ok(_) | Err(_) => {
                tracing::info!("session too large for a snapshot cookie: kept in the store only");
                if self.cookies.get(&name).is_some() {
                    self.cookies.remove(self.cookie(name, String::new()));
                }
            }
        }
    }
}
