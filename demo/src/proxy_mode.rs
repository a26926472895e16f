//! `--sessions proxy`: the demo app with no session state of its own. `session-proxy`'s
//! session-lookup plugin resolves the session and injects it as headers (`x-session-id`,
//! `x-session-user`, `x-session-attr-cart`, base64, and `x-session-degraded: 1` when the
//! session comes from its snapshot cookie); this app reads those for every read and writes
//! through `session-client` (login, cart changes, logout).
//!
//! Given cookie keys (the same material as the proxy's `--session-snapshot-key`), it also keeps
//! the signed snapshot cookie by `session-client`'s snapshot policy, as the layer does:
//! - after each write the store took, a snapshot the store confirmed (its epoch, the version as
//!   the base, valid for at most `--snapshot-max-age`), so the snapshot the proxy falls back on
//!   holds every change the app acknowledged;
//! - while the store is down (unreachable, or silent for longer than `--outage-grace`), a cart
//!   change on a request carrying a valid snapshot is recorded in the snapshot as an offline
//!   change (its expiry slid, never past the max age after the store's last confirmation) and
//!   acknowledged. The proxy pushes it back with `Restore` once the store answers (and so does
//!   this app before its next write, should it reach the store before the proxy does); when
//!   the store changed the session meanwhile, the store wins and the offline change is dropped.
//!   A login (a new id is the store's to make) or a guest's first item needs the store: 503.
//! - a timeout while the store answered within the outage grace is a slow store, not a lost
//!   one: 503 with `Retry-After: 1`, nothing recorded offline.
//!
//! Logout expires both cookies, outage or not. A logout the store cannot take because it is
//! down is retried in the background until the store deletes the session, so that cookies
//! copied before the logout do not find it there once the store is back.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde_json::{Value, json};
use session_client::cookie::{CookieCodec, Snapshot, SnapshotPolicy, fits_in_cookie, unix_ms};
use session_client::{
    ClientError, OutageGrace, Patch, SessionClient, SessionConfig, SessionData, new_write_id,
};

use crate::{Cart, CartAdd, Instance, JsonOrForm, Login, MAX_CART_ITEMS, not_logged_in};

/// Header with the session id, set by the proxy.
pub const SESSION_ID: &str = "x-session-id";
/// Header with the session's user, set by the proxy.
pub const SESSION_USER: &str = "x-session-user";
/// Header with the cart attribute (base64 of its JSON), set by the proxy when configured to
/// forward the `cart` attribute.
pub const SESSION_CART: &str = "x-session-attr-cart";
/// Header the proxy sets (to `1`) when the session comes from its snapshot cookie.
pub const SESSION_DEGRADED: &str = "x-session-degraded";
/// Tries of a cart update that loses a compare-and-set race.
const CAS_TRIES: usize = 5;
/// Most logouts retried in the background at once: past it, a logout made during an outage
/// leaves its session to expire in the store (its cookies are cleared all the same).
const MAX_PENDING_DELETES: usize = 10_000;
/// How long a logout made during an outage is retried: the longest a session server keeps an
/// untouched session by default (`--max-ttl`), after which there is nothing left to delete.
const PENDING_DELETE_FOR: Duration = Duration::from_secs(24 * 60 * 60);
/// First wait between tries of such a logout; doubles up to [`PENDING_DELETE_BACKOFF_MAX`].
const PENDING_DELETE_BACKOFF: Duration = Duration::from_millis(250);
/// Longest wait between tries of such a logout.
const PENDING_DELETE_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The proxy mode's settings.
#[derive(Debug)]
pub(crate) struct ProxyModeConfig {
    /// Session cookie name (the one the proxy reads).
    pub(crate) cookie: String,
    /// `Secure` attribute on the cookies.
    pub(crate) secure: bool,
    /// Snapshot codec, when keys were given.
    pub(crate) codec: Option<CookieCodec>,
    /// How long past the store's last confirmation a snapshot may stand in.
    pub(crate) snapshot_max_age: Duration,
    /// A timeout within this of the store's last answer is not an outage.
    pub(crate) outage_grace: Duration,
    /// Bound on one store call (the client's own timeout is a backstop past it).
    pub(crate) timeout: Duration,
    /// `--session-header`: a new session's id is also sent in this response header, and a
    /// logout answers it empty (the proxy reads the id from it for clients without cookies).
    pub(crate) id_header: Option<http::HeaderName>,
}

/// What the proxy-mode handlers share.
#[derive(Clone)]
struct ProxyState {
    /// Instance name.
    instance: Instance,
    /// The session server, for writes.
    client: SessionClient,
    /// Cookie names and attributes, the snapshot policy's settings.
    config: Arc<ProxyModeConfig>,
    /// Name of the snapshot cookie (the layer's and the proxy's default).
    snapshot_cookie: Arc<str>,
    /// Namespace written into snapshots and required of them: the client's, as the server
    /// names it (empty is `default`), which is what the proxy's `--session-namespace` says.
    namespace: Arc<str>,
    /// Down or slow: a timeout within the outage grace of the store's last answer is not an
    /// outage.
    outage: Arc<OutageGrace>,
    /// Logouts being retried in the background.
    pending_deletes: Arc<AtomicUsize>,
}

/// The proxy-mode router.
pub(crate) fn router(instance: Instance, client: SessionClient, config: ProxyModeConfig) -> Router {
    let namespace = match client.namespace() {
        "" => "default",
        namespace => namespace,
    };
    let state = ProxyState {
        outage: Arc::new(OutageGrace::new(config.outage_grace)),
        instance,
        namespace: Arc::from(namespace),
        client,
        config: Arc::new(config),
        snapshot_cookie: Arc::from(SessionConfig::default().snapshot_cookie_name),
        pending_deletes: Arc::new(AtomicUsize::new(0)),
    };
    Router::new()
        .route("/login", post(login))
        .route("/me", get(me))
        .route("/cart/add", post(cart_add))
        .route("/cart", get(cart))
        .route("/logout", post(logout))
        .with_state(state)
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
}

fn injected_cart(headers: &HeaderMap) -> Cart {
    header(headers, SESSION_CART)
        .and_then(|v| base64::engine::general_purpose::STANDARD.decode(v).ok())
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default()
}

/// The value of cookie `name` in the request, if any.
fn request_cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|line| line.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

/// The cart a session's attributes hold.
fn cart_of(attrs: Option<&Vec<u8>>) -> Cart {
    attrs
        .and_then(|bytes| serde_json::from_slice(bytes).ok())
        .unwrap_or_default()
}

impl ProxyState {
    /// `call` within the timeout (running out of it is [`ClientError::TimedOut`]), noting
    /// whether the store answered.
    async fn call<T>(
        &self,
        call: impl Future<Output = Result<T, ClientError>>,
    ) -> Result<T, ClientError> {
        let timeout = self.config.timeout;
        let result = tokio::time::timeout(timeout, call)
            .await
            .unwrap_or_else(|_| {
                Err(ClientError::TimedOut(format!(
                    "no answer within {timeout:?}"
                )))
            });
        self.outage.note(&result);
        result
    }

    /// Whether `error` means the store is down: unreachable, or timed out while it has not
    /// answered for longer than the outage grace.
    fn is_outage(&self, error: &ClientError) -> bool {
        self.outage.is_outage(error)
    }

    /// A failed store call as a response: 401 when the session is gone, 503 while the store
    /// is down, 503 with `Retry-After: 1` when it is slow, 500 otherwise.
    fn store_error(&self, error: ClientError) -> Response {
        tracing::warn!(%error, "session write failed");
        if let ClientError::NotFound { .. } = error {
            // Deleted or expired between the proxy's lookup and this write: logged out.
            return (
                StatusCode::UNAUTHORIZED,
                Json(json!({ "error": "no session" })),
            )
                .into_response();
        }
        if self.is_outage(&error) {
            return (StatusCode::SERVICE_UNAVAILABLE, error.to_string()).into_response();
        }
        if error.is_timeout() {
            let mut response = (StatusCode::SERVICE_UNAVAILABLE, error.to_string()).into_response();
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return response;
        }
        (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response()
    }

    /// The request's snapshot cookie, when it is a valid snapshot of session `id`.
    fn request_snapshot(&self, headers: &HeaderMap, id: &str) -> Option<Snapshot> {
        let codec = self.config.codec.as_ref()?;
        let value = request_cookie(headers, &self.snapshot_cookie)?;
        codec.decode_for(
            value,
            id,
            &self.namespace,
            self.config.snapshot_max_age,
            SystemTime::now(),
        )
    }

    /// A `Set-Cookie` line with this app's attributes.
    fn cookie_line(&self, name: &str, value: &str, expire: bool) -> String {
        let secure = if self.config.secure { "; Secure" } else { "" };
        let max_age = if expire { "; Max-Age=0" } else { "" };
        format!("{name}={value}; Path=/{max_age}; HttpOnly; SameSite=Lax{secure}")
    }

    /// Adds `line` as a `Set-Cookie` header.
    fn append_cookie(response: &mut Response, line: &str) {
        if let Ok(value) = line.parse() {
            response.headers_mut().append(header::SET_COOKIE, value);
        }
    }

    /// Sets the session cookie to `id`.
    fn set_session_cookie(&self, id: &str, mut response: Response) -> Response {
        let line = self.cookie_line(&self.config.cookie, id, false);
        Self::append_cookie(&mut response, &line);
        if let (Some(name), Ok(value)) = (&self.config.id_header, HeaderValue::from_str(id)) {
            response.headers_mut().insert(name.clone(), value);
        }
        response
    }

    /// Writes `snapshot` into the snapshot cookie (issued now), or expires that cookie when
    /// the session is too large for one.
    fn write_snapshot(&self, mut snapshot: Snapshot, mut response: Response) -> Response {
        let Some(codec) = &self.config.codec else {
            return response;
        };
        snapshot.issued_at_ms = unix_ms(SystemTime::now());
        let name = &*self.snapshot_cookie;
        let line = match codec.encode(&snapshot) {
            Ok(value) if fits_in_cookie(name, &value) => self.cookie_line(name, &value, false),
            Ok(_) | Err(_) => {
                tracing::info!("session too large for a snapshot cookie: none kept");
                self.cookie_line(name, "", true)
            }
        };
        Self::append_cookie(&mut response, &line);
        response
    }

    /// The snapshot of `session` as the store just confirmed it.
    fn confirmed_snapshot(&self, session: &SessionData, response: Response) -> Response {
        if self.config.codec.is_none() {
            return response;
        }
        let snapshot = Snapshot::confirmed(
            session,
            &self.namespace,
            SystemTime::now(),
            self.config.snapshot_max_age,
        );
        self.write_snapshot(snapshot, response)
    }

    /// A write to session `id` failed with `error`: while the store is down and the request
    /// carries a valid snapshot, `change` records the write in it as an offline change and its
    /// answer (a JSON body) is sent with the snapshot, slid, or it refuses the write (a status
    /// and a JSON body); otherwise the failure is answered.
    fn write_offline(
        &self,
        headers: &HeaderMap,
        id: &str,
        error: ClientError,
        change: impl FnOnce(&mut Snapshot) -> Result<Value, (StatusCode, Value)>,
    ) -> Response {
        if !self.is_outage(&error) {
            return self.store_error(error);
        }
        let Some(mut snapshot) = self.request_snapshot(headers, id) else {
            return self.store_error(error);
        };
        let body = match change(&mut snapshot) {
            Ok(body) => body,
            Err((status, body)) => return (status, Json(body)).into_response(),
        };
        snapshot.slide_offline(SystemTime::now(), self.config.snapshot_max_age);
        tracing::warn!(%error, "session store down: change recorded in the snapshot cookie");
        self.write_snapshot(snapshot, Json(body).into_response())
    }

    /// Pushes the offline changes the request's snapshot holds for session `id`, if any, with
    /// `Restore` before a write: the proxy normally has (it pushes them on its lookup), but not
    /// when it could not reach the store while this app can. When the store changed the
    /// session meanwhile, the store wins and they are dropped. `Err` when the store did not
    /// answer: the write is then recorded offline on top of them.
    async fn push_offline_changes(&self, headers: &HeaderMap, id: &str) -> Result<(), ClientError> {
        let Some(snapshot) = self.request_snapshot(headers, id) else {
            return Ok(());
        };
        if !snapshot.has_offline_changes() {
            return Ok(());
        }
        match self.call(self.client.restore(snapshot.to_restore())).await {
            Ok(_) => {
                tracing::info!("offline session changes pushed back to the store");
                Ok(())
            }
            Err(ClientError::Conflict(reason)) => {
                tracing::info!(%reason, "the store changed the session meanwhile: offline changes dropped");
                Ok(())
            }
            Err(error) if error.is_retryable() => Err(error),
            Err(error) => {
                tracing::warn!(%error, "offline session changes refused: dropped");
                Ok(())
            }
        }
    }

    /// Deletes session `id` once the store answers again (a logout made during an outage),
    /// trying in the background with a growing wait, for as long as the session could live.
    fn delete_later(&self, id: &str) {
        if self.pending_deletes.fetch_add(1, Ordering::Relaxed) >= MAX_PENDING_DELETES {
            self.pending_deletes.fetch_sub(1, Ordering::Relaxed);
            tracing::warn!("too many logouts pending: this session is left to expire");
            return;
        }
        let state = self.clone();
        let id = id.to_owned();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + PENDING_DELETE_FOR;
            let mut wait = PENDING_DELETE_BACKOFF;
            while tokio::time::Instant::now() < deadline {
                tokio::time::sleep(wait).await;
                match state.call(state.client.delete(&id)).await {
                    Err(error) if error.is_retryable() => {
                        wait = (wait * 2).min(PENDING_DELETE_BACKOFF_MAX);
                    }
                    Err(error) => {
                        tracing::warn!(%error, "deferred logout refused");
                        break;
                    }
                    Ok(_) => {
                        tracing::info!("deferred logout done: session deleted from the store");
                        break;
                    }
                }
            }
            state.pending_deletes.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

async fn me(State(state): State<ProxyState>, headers: HeaderMap) -> Response {
    let Some(user) = header(&headers, SESSION_USER) else {
        return not_logged_in();
    };
    let cart = injected_cart(&headers);
    Json(json!({
        "user": user,
        "served_by": &*state.instance.name,
        "cart_items": cart.items.len(),
        "degraded": header(&headers, SESSION_DEGRADED) == Some("1"),
    }))
    .into_response()
}

async fn cart(headers: HeaderMap) -> Response {
    Json(json!({ "items": injected_cart(&headers).items })).into_response()
}

async fn login(
    State(state): State<ProxyState>,
    headers: HeaderMap,
    JsonOrForm(body): JsonOrForm<Login>,
) -> Response {
    let user = body.user.trim();
    if user.is_empty() || user.len() > 64 {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({ "error": "user must be 1 to 64 characters" })),
        )
            .into_response();
    }
    let client = &state.client;
    let patch = Patch {
        user_id: Some(user.to_owned()),
        ..Patch::default()
    };
    // A new id on login (fixation defence), keeping a guest cart. The store makes ids, so a
    // login needs it: during an outage this is a 503.
    let session = match header(&headers, SESSION_ID) {
        Some(id) => match state.call(client.regenerate(id)).await {
            Ok(moved) => state.call(client.update(&moved.id, patch)).await,
            Err(ClientError::NotFound { .. }) => {
                state.call(client.create(user, HashMap::new(), None)).await
            }
            Err(error) => Err(error),
        },
        None => state.call(client.create(user, HashMap::new(), None)).await,
    };
    match session {
        Ok(session) => {
            let response = Json(json!({ "user": user })).into_response();
            let response = state.set_session_cookie(&session.id, response);
            state.confirmed_snapshot(&session, response)
        }
        Err(error) => state.store_error(error),
    }
}

async fn cart_add(
    State(state): State<ProxyState>,
    headers: HeaderMap,
    JsonOrForm(body): JsonOrForm<CartAdd>,
) -> Response {
    if body.item.is_empty() || body.item.len() > 64 {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({ "error": "bad item" })),
        )
            .into_response();
    }
    let client = &state.client;
    let Some(id) = header(&headers, SESSION_ID) else {
        // A guest's first item makes the session.
        let cart = Cart {
            items: vec![body.item],
        };
        let attrs = [(
            "cart".to_owned(),
            serde_json::to_vec(&cart).unwrap_or_default(),
        )]
        .into();
        return match state.call(client.create("", attrs, None)).await {
            Ok(session) => {
                let response = Json(json!({ "items": cart.items })).into_response();
                let response = state.set_session_cookie(&session.id, response);
                state.confirmed_snapshot(&session, response)
            }
            Err(error) => state.store_error(error),
        };
    };
    let cart_full = || (StatusCode::BAD_REQUEST, json!({ "error": "cart full" }));
    // Offline, the snapshot's cart gets the item, as one offline change of `cart`.
    let offline = |snapshot: &mut Snapshot| {
        let mut cart = cart_of(snapshot.attrs.get("cart"));
        if cart.items.len() >= MAX_CART_ITEMS {
            return Err(cart_full());
        }
        cart.items.push(body.item.clone());
        let set = HashMap::from([(
            "cart".to_owned(),
            serde_json::to_vec(&cart).unwrap_or_default(),
        )]);
        snapshot.record_offline(&set, &[], None);
        Ok(json!({ "items": cart.items, "degraded": true }))
    };
    if let Err(error) = state.push_offline_changes(&headers, id).await {
        return state.write_offline(&headers, id, error, offline);
    }
    // Read-modify-write with compare-and-set, so two requests adding at once both land.
    for _ in 0..CAS_TRIES {
        let current = match state.call(client.get(id, false)).await {
            Ok(current) => current,
            Err(error) => return state.write_offline(&headers, id, error, offline),
        };
        let mut cart = cart_of(current.attrs.get("cart"));
        if cart.items.len() >= MAX_CART_ITEMS {
            let (status, body) = cart_full();
            return (status, Json(body)).into_response();
        }
        cart.items.push(body.item.clone());
        let write_id = new_write_id();
        let patch = Patch {
            set: [(
                "cart".to_owned(),
                serde_json::to_vec(&cart).unwrap_or_default(),
            )]
            .into(),
            expected_version: Some(current.version),
            write_id: Some(write_id.clone()),
            ..Patch::default()
        };
        match state.call(client.update(id, patch)).await {
            Ok(session) => {
                let response = Json(json!({ "items": cart.items })).into_response();
                return state.confirmed_snapshot(&session, response);
            }
            Err(ClientError::Conflict(_)) => continue,
            Err(error) => {
                // The store may have applied the write before going away: when the snapshot
                // stands for the version it was sent against, it records the write as its own
                // (so a `Restore` finding it applied rebases onto it instead of dropping the
                // item).
                let unsure = |snapshot: &mut Snapshot| {
                    let at_base = !snapshot.has_offline_changes()
                        && snapshot.base_version == current.version
                        && snapshot.epoch == current.epoch;
                    let answer = offline(snapshot)?;
                    if at_base {
                        snapshot.record_unsure_write(&write_id);
                    }
                    Ok(answer)
                };
                return state.write_offline(&headers, id, error, unsure);
            }
        }
    }
    (StatusCode::CONFLICT, "too many concurrent cart changes").into_response()
}

async fn logout(State(state): State<ProxyState>, headers: HeaderMap) -> Response {
    if let Some(id) = header(&headers, SESSION_ID) {
        match state.call(state.client.delete(id)).await {
            Ok(_) | Err(ClientError::NotFound { .. }) => {}
            // Down: the cookies go now, the session as soon as the store is back.
            Err(error) if state.is_outage(&error) => {
                tracing::warn!(%error, "logout during a store outage: deleting it later");
                state.delete_later(id);
            }
            // Slow: the user tries again with the cookies still there, so the store deletes it.
            Err(error) => return state.store_error(error),
        }
    }
    // Every session cookie goes: the id and the snapshot (whether this app or the proxy wrote
    // it), so no browser keeps a snapshot of a session its user ended.
    let mut response = Json(json!({ "logged_out": true })).into_response();
    for name in [&*state.config.cookie, &*state.snapshot_cookie] {
        let line = state.cookie_line(name, "", true);
        ProxyState::append_cookie(&mut response, &line);
    }
    if let Some(name) = &state.config.id_header {
        response
            .headers_mut()
            .insert(name.clone(), HeaderValue::from_static(""));
    }
    response
}
