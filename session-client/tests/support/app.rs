//! A tiny axum app behind a [`SessionLayer`], driven in-process (`tower::ServiceExt::oneshot`),
//! and what a test reads from its responses: status, JSON body and `Set-Cookie` headers parsed
//! into cookies with their attributes.

use axum::Router;
use axum::body::Body;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::StatusCode;
use serde_json::{Value, json};
use session_client::cookie::{CookieCodec, CookieKey, Encryption, KeyRing};
use session_client::{Session, SessionError, SessionLayer};
use tower::ServiceExt as _;
use tower_cookies::Cookie;

/// Reads the session and changes nothing: `{user, a, degraded}`.
async fn read(session: Session) -> Result<Response, SessionError> {
    let user = session.user_id().await?;
    let a: Option<String> = session.get("a").await?;
    let degraded = session.is_degraded().await?;
    Ok(axum::Json(json!({ "user": user, "a": a, "degraded": degraded })).into_response())
}

/// Writes two keys, `a` and `b`.
async fn write_two(session: Session) -> Result<Response, SessionError> {
    session.insert("a", &"one").await?;
    session.insert("b", &"two").await?;
    Ok(StatusCode::OK.into_response())
}

/// Logs `ann` in (owner and a key `a`).
async fn login(session: Session) -> Result<Response, SessionError> {
    session.set_user("ann").await?;
    session.insert("a", &"cart").await?;
    Ok(StatusCode::OK.into_response())
}

/// Logs out.
async fn logout(session: Session) -> Result<Response, SessionError> {
    session.destroy().await?;
    Ok(StatusCode::OK.into_response())
}

/// `GET /read`, `POST /write-two`, `POST /login`, `POST /logout` behind `layer`.
pub fn app(layer: SessionLayer) -> Router {
    Router::new()
        .route("/read", get(read))
        .route("/write-two", post(write_two))
        .route("/login", post(login))
        .route("/logout", post(logout))
        .layer(layer)
}

/// What a test reads from one response.
#[derive(Debug)]
pub struct Reply {
    /// Status.
    pub status: StatusCode,
    /// Body as JSON (`Null` when it is not JSON).
    pub body: Value,
    /// The raw `Set-Cookie` header values.
    pub raw_cookies: Vec<String>,
    /// The same, parsed.
    pub cookies: Vec<Cookie<'static>>,
}

impl Reply {
    /// The cookie `name` this response set, if any.
    pub fn cookie(&self, name: &str) -> Option<&Cookie<'static>> {
        self.cookies.iter().find(|c| c.name() == name)
    }

    /// The raw `Set-Cookie` value for `name`.
    pub fn raw_cookie(&self, name: &str) -> Option<&str> {
        self.raw_cookies
            .iter()
            .find(|raw| raw.split_once('=').is_some_and(|(n, _)| n.trim() == name))
            .map(String::as_str)
    }

    /// The value of the cookie `name` this response set; panics when it set none.
    pub fn value(&self, name: &str) -> String {
        self.cookie(name)
            .unwrap_or_else(|| panic!("no {name} cookie set: {:?}", self.raw_cookies))
            .value()
            .to_owned()
    }
}

/// Sends `method path` to `app` with `cookies` (name, value) and reads the response.
pub async fn send(app: &Router, method: &str, path: &str, cookies: &[(&str, &str)]) -> Reply {
    let mut request = http::Request::builder().method(method).uri(path);
    if !cookies.is_empty() {
        let header = cookies
            .iter()
            .map(|(n, v)| format!("{n}={v}"))
            .collect::<Vec<_>>()
            .join("; ");
        request = request.header(http::header::COOKIE, header);
    }
    let response = app
        .clone()
        .oneshot(request.body(Body::empty()).unwrap())
        .await
        .expect("the router is infallible");
    let status = response.status();
    let raw_cookies: Vec<String> = response
        .headers()
        .get_all(http::header::SET_COOKIE)
        .iter()
        .map(|v| v.to_str().expect("ASCII Set-Cookie").to_owned())
        .collect();
    let cookies = raw_cookies
        .iter()
        .map(|raw| Cookie::parse(raw.clone()).expect("a valid Set-Cookie"))
        .collect();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .expect("a readable body");
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Reply {
        status,
        body,
        raw_cookies,
        cookies,
    }
}

/// A codec over keys made from `materials`, the first signing.
pub fn codec(materials: &[[u8; 32]]) -> CookieCodec {
    let keys = materials
        .iter()
        .map(|m| CookieKey::new(m).unwrap())
        .collect();
    CookieCodec::new(KeyRing::new(keys).unwrap(), Encryption::None)
}

/// The key id [`CookieKey::new`] gives `material`.
pub fn key_id(material: &[u8; 32]) -> String {
    CookieKey::new(material).unwrap().id().to_owned()
}

/// The key id a `v2.<kid>.<body>` or `v1.<kid>.…` cookie value names.
pub fn kid_of(value: &str) -> &str {
    value.split('.').nth(1).expect("a versioned cookie value")
}
