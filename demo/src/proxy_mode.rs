//! `--sessions proxy`: the demo app with no session state of its own. `session-proxy`'s
//! session-lookup plugin resolves the session and injects it as headers (`x-session-id`,
//! `x-session-user`, `x-session-attr-cart`, base64); this app reads those for every read and
//! writes through `session-client` (login, cart changes, logout). Given cookie keys (the same
//! material as the proxy's `--session-snapshot-key`), it also rewrites the signed snapshot
//! cookie after each of its writes, so the snapshot the proxy falls back on during a store
//! outage holds every change the app acknowledged. Logout expires both cookies.

use std::time::SystemTime;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde_json::json;
use session_client::cookie::{CookieCodec, Snapshot};
use session_client::{ClientError, Patch, SessionClient, SessionConfig, SessionData};

use crate::{Cart, CartAdd, Instance, JsonOrForm, Login, MAX_CART_ITEMS, not_logged_in};

/// Header with the session id, set by the proxy.
pub const SESSION_ID: &str = "x-session-id";
/// Header with the session's user, set by the proxy.
pub const SESSION_USER: &str = "x-session-user";
/// Header with the cart attribute (base64 of its JSON), set by the proxy when configured to
/// forward the `cart` attribute.
pub const SESSION_CART: &str = "x-session-attr-cart";
/// Tries of a cart update that loses a compare-and-set race.
const CAS_TRIES: usize = 5;

/// What the proxy-mode handlers share.
#[derive(Clone)]
struct ProxyState {
    /// Instance name.
    instance: Instance,
    /// The session server, for writes.
    client: SessionClient,
    /// Session cookie name (the one the proxy reads).
    cookie: String,
    /// `Secure` attribute on the cookie.
    secure: bool,
    /// Snapshot codec, when keys were given.
    codec: Option<std::sync::Arc<CookieCodec>>,
}

/// The proxy-mode router.
pub(crate) fn router(
    instance: Instance,
    client: SessionClient,
    cookie: String,
    secure: bool,
    codec: Option<CookieCodec>,
) -> Router {
    let codec = codec.map(std::sync::Arc::new);
    let state = ProxyState {
        instance,
        client,
        cookie,
        secure,
        codec,
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

fn store_error(error: ClientError) -> Response {
    let status = if error.is_unavailable() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    };
    tracing::warn!(%error, "session write failed");
    (status, error.to_string()).into_response()
}

fn set_cookie(state: &ProxyState, id: &str, mut response: Response) -> Response {
    let secure = if state.secure { "; Secure" } else { "" };
    let value = format!(
        "{}={id}; Path=/; HttpOnly; SameSite=Lax{secure}",
        state.cookie
    );
    if let Ok(value) = value.parse() {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
    response
}

/// Adds the signed snapshot of `session` (as just written) when the app has cookie keys.
fn set_snapshot(state: &ProxyState, session: &SessionData, mut response: Response) -> Response {
    let Some(codec) = &state.codec else {
        return response;
    };
    let snapshot = Snapshot::from_session(session, &session.namespace, SystemTime::now());
    let name = SessionConfig::default().snapshot_cookie_name;
    let secure = if state.secure { "; Secure" } else { "" };
    match codec.encode(&snapshot) {
        Ok(value) => {
            let cookie = format!("{name}={value}; Path=/; HttpOnly; SameSite=Lax{secure}");
            if let Ok(cookie) = cookie.parse() {
                response.headers_mut().append(header::SET_COOKIE, cookie);
            }
        }
        Err(error) => tracing::info!(%error, "no snapshot cookie for this session"),
    }
    response
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
        "degraded": false,
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
    let patch = Patch {
        user_id: Some(user.to_owned()),
        ..Patch::default()
    };
    // A new id on login (fixation defence), keeping a guest cart.
    let session = match header(&headers, SESSION_ID) {
        Some(id) => match state.client.regenerate(id).await {
            Ok(moved) => state.client.update(&moved.id, patch).await,
            Err(ClientError::NotFound) => state.client.create(user, Default::default(), None).await,
            Err(error) => Err(error),
        },
        None => state.client.create(user, Default::default(), None).await,
    };
    match session {
        Ok(session) => {
            let response = Json(json!({ "user": user })).into_response();
            set_snapshot(&state, &session, set_cookie(&state, &session.id, response))
        }
        Err(error) => store_error(error),
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
        return match client.create("", attrs, None).await {
            Ok(session) => {
                let response = Json(json!({ "items": cart.items })).into_response();
                set_snapshot(&state, &session, set_cookie(&state, &session.id, response))
            }
            Err(error) => store_error(error),
        };
    };
    // Read-modify-write with compare-and-set, so two requests adding at once both land.
    for _ in 0..CAS_TRIES {
        let current = match client.get(id, false).await {
            Ok(current) => current,
            Err(error) => return store_error(error),
        };
        let mut cart: Cart = current
            .attrs
            .get("cart")
            .and_then(|b| serde_json::from_slice(b).ok())
            .unwrap_or_default();
        if cart.items.len() >= MAX_CART_ITEMS {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({ "error": "cart full" })),
            )
                .into_response();
        }
        cart.items.push(body.item.clone());
        let patch = Patch {
            set: [(
                "cart".to_owned(),
                serde_json::to_vec(&cart).unwrap_or_default(),
            )]
            .into(),
            expected_version: Some(current.version),
            ..Patch::default()
        };
        match client.update(id, patch).await {
            Ok(session) => {
                let response = Json(json!({ "items": cart.items })).into_response();
                return set_snapshot(&state, &session, response);
            }
            Err(ClientError::Conflict(_)) => continue,
            Err(error) => return store_error(error),
        }
    }
    (StatusCode::CONFLICT, "too many concurrent cart changes").into_response()
}

async fn logout(State(state): State<ProxyState>, headers: HeaderMap) -> Response {
    if let Some(id) = header(&headers, SESSION_ID)
        && let Err(error) = state.client.delete(id).await
    {
        return store_error(error);
    }
    // Every session cookie goes: the id and the snapshot (whether this app or the proxy wrote
    // it), so no browser keeps a snapshot of a session its user ended.
    let secure = if state.secure { "; Secure" } else { "" };
    let snapshot = SessionConfig::default().snapshot_cookie_name;
    let mut response = Json(json!({ "logged_out": true })).into_response();
    for name in [state.cookie.as_str(), snapshot.as_str()] {
        let clear = format!("{name}=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax{secure}");
        if let Ok(value) = clear.parse() {
            response.headers_mut().append(header::SET_COOKIE, value);
        }
    }
    response
}
