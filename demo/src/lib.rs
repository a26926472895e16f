//! The Stickless demo backend: the "personal centre" of the problem statement, used by the demo
//! cluster, the tests and the comparison harness.
//!
//! Routes: `POST /login` (form or JSON `user`), `GET /me` (401 with a login hint when there is
//! no session), `POST /cart/add` (form or JSON `item`; guests have a cart too), `GET /cart`,
//! `POST /logout`, `GET /healthz`. Every response names the instance in `x-served-by`.
//!
//! Session modes: `store` keeps sessions in the session server (any instance serves any user);
//! `proxy` reads the session that `session-proxy` injected as headers and writes through the
//! session server (no session code in the request path at all);
//! `local` keeps them inside this process (an in-process memory store no other instance can
//! see): the baseline that loses sessions when a user lands on another instance.
//!
//! # Layout
//! - this file: [`DemoConfig`], [`app`] (the router) and [`run`], the handlers of the
//!   `local`/`store` modes.
//! - [`proxy_mode`]: the handlers of `--sessions proxy` (session from the proxy's headers).
//! - [`tls`]: HTTPS on the listener (`--tls-cert`, `--tls-key`).
//! - `main.rs`: the `demo-app` binary's flags.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequest, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use session_client::cookie::{
    CookieCodec, CookieKey, DEFAULT_SNAPSHOT_MAX_AGE, Encryption, KeyRing,
};
use session_client::{
    ClientConfig, ClientError, ClientTls, FallbackMode, IdSource, Session, SessionClient,
    SessionConfig, SessionError, SessionLayer,
};
use session_server::config::Settings;
use session_server::metrics::Metrics;
use session_server::store::memory::MemoryStore;
use tokio::net::TcpListener;

pub mod proxy_mode;
pub mod tls;

pub use tls::ListenerTls;

/// Where the demo keeps sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sessions {
    /// In this process only (the broken baseline).
    Local,
    /// In the session server at this URL.
    Store(String),
    /// Resolved by `session-proxy`'s session-lookup plugin and injected as headers; writes go
    /// to the session server at this URL (the app keeps no session state).
    Proxy(String),
}

/// Everything the demo app needs.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// Instance name, sent in `x-served-by`.
    pub name: String,
    /// Where sessions live.
    pub sessions: Sessions,
    /// Cookie fallback mode (store sessions only).
    pub fallback: FallbackMode,
    /// Cookie key material, signing key first (needed for any fallback but `Off`).
    pub cookie_keys: Vec<Vec<u8>>,
    /// Seal the snapshot cookie's content too.
    pub encryption: Encryption,
    /// `Secure` cookies; turn off only for plain-HTTP localhost.
    pub secure_cookies: bool,
    /// Session namespace.
    pub namespace: String,
    /// Bearer token for the session server.
    pub auth_token: Option<String>,
    /// TLS settings of an `https://` session server (CA bundle, client identity for mTLS);
    /// `None`: the system's roots for `https://`. Refused with an `http://` URL and with
    /// `local` sessions.
    pub session_tls: Option<ClientTls>,
    /// HTTPS on the listener (`--tls-cert`, `--tls-key`): with it [`run`] serves HTTPS only;
    /// `None`: plain HTTP.
    pub listener_tls: Option<ListenerTls>,
    /// How long past the store's last confirmation a snapshot may stand in for the session
    /// (`--snapshot-max-age`; `store` and `proxy` modes): the proxy's `--snapshot-max-age`
    /// should say the same.
    pub snapshot_max_age: Duration,
    /// A store call that times out while the store answered less than this long ago is a 503
    /// with `Retry-After`, not an outage the snapshot stands in for (`--outage-grace`).
    pub outage_grace: Duration,
    /// `--session-header NAME`: the session id may also travel in this header, for clients
    /// without cookies (`store` mode: the layer's `IdSource::Both`; `proxy` mode: a login
    /// answers the new id in it and a logout answers it empty, for session-proxy's
    /// `--session-header`).
    pub session_header: Option<http::HeaderName>,
}

/// The outage grace unless configured otherwise: `session-client`'s layer default (and so
/// `session-proxy`'s `--session-outage-grace` default).
pub const DEFAULT_OUTAGE_GRACE: Duration = session_client::layer::DEFAULT_OUTAGE_GRACE;

/// `demo-app --namespace` unless given: the session server's own default namespace (what it
/// calls an empty one), which is also `session-proxy --session-namespace`'s default, so that
/// `--sessions proxy` behind the proxy's lookup works with both sides' defaults.
pub const DEFAULT_NAMESPACE: &str = session_server::service::DEFAULT_NAMESPACE;

/// `demo-app --session-server` unless given: `session-server`'s default listen address.
pub const DEFAULT_SESSION_SERVER: &str = "http://127.0.0.1:50051";

impl DemoConfig {
    /// A store-backed instance named `name` with defaults (fallback off, secure cookies).
    pub fn new(name: impl Into<String>, sessions: Sessions) -> Self {
        DemoConfig {
            name: name.into(),
            sessions,
            fallback: FallbackMode::Off,
            cookie_keys: Vec::new(),
            encryption: Encryption::None,
            secure_cookies: true,
            namespace: DEFAULT_NAMESPACE.into(),
            auth_token: None,
            session_tls: None,
            listener_tls: None,
            snapshot_max_age: DEFAULT_SNAPSHOT_MAX_AGE,
            outage_grace: DEFAULT_OUTAGE_GRACE,
            session_header: None,
        }
    }

    /// The settings of the client of the session server (`store` and `proxy` modes): its
    /// URL, the namespace, the token and the TLS settings. `None` for `local` sessions, whose
    /// in-process store is reached over loopback.
    pub fn session_client_config(&self) -> Option<ClientConfig> {
        let (Sessions::Store(url) | Sessions::Proxy(url)) = &self.sessions else {
            return None;
        };
        let mut client_config = ClientConfig::new(url.clone());
        client_config.namespace.clone_from(&self.namespace);
        client_config.auth_token.clone_from(&self.auth_token);
        client_config.tls.clone_from(&self.session_tls);
        Some(client_config)
    }
}

/// Why the demo could not start.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// A cookie key was refused.
    #[error("cookie key: {0}")]
    Key(#[from] session_client::cookie::CookieError),
    /// The session client could not be set up.
    #[error("session client: {0}")]
    Client(#[from] session_client::ClientError),
    /// The in-process store for `local` mode could not start.
    #[error("local session store: {0}")]
    Local(String),
    /// Serving failed.
    #[error("serving: {0}")]
    Io(#[from] std::io::Error),
}

/// Instance name for handlers.
#[derive(Debug, Clone)]
struct Instance {
    /// Sent in `x-served-by` and in bodies.
    name: Arc<str>,
}

/// The demo's router with its session layer. For `local` sessions it starts an in-process
/// session server on a private loopback port, alive as long as the runtime.
pub async fn app(config: &DemoConfig) -> Result<Router, DemoError> {
    let client_config = match config.session_client_config() {
        Some(client_config) => client_config,
        None if config.session_tls.is_some() => {
            return Err(DemoError::Client(ClientError::Config(
                "session server TLS settings are for a session server; local sessions have none"
                    .into(),
            )));
        }
        None => {
            let mut client_config = ClientConfig::new(local_store().await?);
            client_config.namespace.clone_from(&config.namespace);
            client_config.auth_token.clone_from(&config.auth_token);
            client_config
        }
    };
    // Proxy mode bounds each call itself, so that running out of time is always a timeout
    // (see `proxy_mode`): the client's own deadline is a backstop past it.
    let call_timeout = client_config.timeout;
    let mut client_config = client_config;
    if let Sessions::Proxy(_) = config.sessions {
        client_config.timeout = call_timeout.saturating_mul(2);
    }
    let client = SessionClient::connect_lazy(client_config)?;
    let instance = Instance {
        name: Arc::from(config.name.as_str()),
    };
    let codec = if config.cookie_keys.is_empty() {
        None
    } else {
        let keys = config
            .cookie_keys
            .iter()
            .map(|k| CookieKey::new(k))
            .collect::<Result<Vec<_>, _>>()?;
        Some(CookieCodec::new(KeyRing::new(keys)?, config.encryption))
    };
    if let Sessions::Proxy(_) = config.sessions {
        let mode = proxy_mode::ProxyModeConfig {
            cookie: SessionConfig::default().cookie_name,
            secure: config.secure_cookies,
            codec,
            snapshot_max_age: config.snapshot_max_age,
            outage_grace: config.outage_grace,
            timeout: call_timeout,
            id_header: config.session_header.clone(),
        };
        let routes = proxy_mode::router(instance, client, mode);
        return Ok(finish(routes, &config.name));
    }
    let session_config = SessionConfig {
        secure: config.secure_cookies,
        fallback: if config.sessions == Sessions::Local {
            FallbackMode::Off
        } else {
            config.fallback
        },
        snapshot_max_age: config.snapshot_max_age,
        outage_grace: config.outage_grace,
        id_source: match &config.session_header {
            Some(header) => IdSource::Both {
                header: header.clone(),
            },
            None => IdSource::Cookie,
        },
        ..SessionConfig::default()
    };
    let layer = SessionLayer::with_config(client, codec, session_config);
    let routes = Router::new()
        .route("/login", post(login))
        .route("/me", get(me))
        .route("/cart/add", post(cart_add))
        .route("/cart", get(cart))
        .route("/logout", post(logout))
        .layer(layer)
        .with_state(instance);
    Ok(finish(routes, &config.name))
}

/// Adds what every mode shares: `/healthz` and the `x-served-by` header.
fn finish(routes: Router, name: &str) -> Router {
    let served_by = HeaderValue::from_str(name).unwrap_or(HeaderValue::from_static("demo"));
    routes
        .route("/healthz", get(|| async { "ok" }))
        .layer(axum::middleware::map_response(
            move |mut response: Response| {
                let served_by = served_by.clone();
                async move {
                    response.headers_mut().insert("x-served-by", served_by);
                    response
                }
            },
        ))
}

/// An in-process memory-store session server on a private port; returns its URL.
async fn local_store() -> Result<String, DemoError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let settings = Settings::default();
    let store = Arc::new(MemoryStore::new(settings.max_session_bytes));
    tokio::spawn(async move {
        let never = std::future::pending::<()>();
        if let Err(error) =
            session_server::server::run(listener, &settings, store, Metrics::new(), never).await
        {
            tracing::error!(%error, "local session store stopped");
        }
    });
    Ok(format!("http://{addr}"))
}

/// Serves the demo on `listener` (HTTPS only with [`DemoConfig::listener_tls`], else plain
/// HTTP) until `shutdown` completes, then finishes the requests in flight.
pub async fn run(
    listener: TcpListener,
    config: &DemoConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DemoError> {
    let app = app(config).await?;
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    let https = config.listener_tls.is_some();
    tracing::info!(?addr, name = %config.name, sessions = ?config.sessions, https, "demo-app serving");
    match &config.listener_tls {
        Some(tls) => tls::serve(listener, app, tls, shutdown).await?,
        None => {
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await?;
        }
    }
    Ok(())
}

/// A body given as JSON or as a form, whichever the content type says.
struct JsonOrForm<T>(T);

impl<S, T> FromRequest<S> for JsonOrForm<T>
where
    S: Send + Sync,
    T: serde::de::DeserializeOwned + Send + 'static,
{
    type Rejection = Response;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let is_json = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        if is_json {
            let Json(value) = Json::<T>::from_request(request, state)
                .await
                .map_err(IntoResponse::into_response)?;
            Ok(JsonOrForm(value))
        } else {
            let Form(value) = Form::<T>::from_request(request, state)
                .await
                .map_err(IntoResponse::into_response)?;
            Ok(JsonOrForm(value))
        }
    }
}

/// `POST /login` body.
#[derive(Debug, Deserialize)]
struct Login {
    /// Who logs in (the demo trusts it: it is about sessions, not passwords).
    user: String,
}

/// `POST /cart/add` body.
#[derive(Debug, Deserialize)]
struct CartAdd {
    /// What to add.
    item: String,
}

/// The cart as stored in the session.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Cart {
    /// Items in the order added.
    items: Vec<String>,
}

/// Most items a cart holds: keeps a session far below the size limits.
const MAX_CART_ITEMS: usize = 100;

fn not_logged_in() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        Json(json!({ "error": "not logged in", "login": "POST /login with user=<name>" })),
    )
        .into_response()
}

async fn login(
    session: Session,
    JsonOrForm(body): JsonOrForm<Login>,
) -> Result<Response, SessionError> {
    let user = body.user.trim();
    if user.is_empty() || user.len() > 64 {
        return Ok((
            StatusCode::BAD_REQUEST,
            Json(json!({ "error": "user must be 1 to 64 characters" })),
        )
            .into_response());
    }
    // A new id on login: whatever id the visitor had before (maybe planted) is dead.
    session.regenerate().await?;
    session.set_user(user).await?;
    Ok(Json(json!({ "user": user })).into_response())
}

async fn me(
    axum::extract::State(instance): axum::extract::State<Instance>,
    session: Session,
) -> Result<Response, SessionError> {
    let Some(user) = session.user_id().await? else {
        return Ok(not_logged_in());
    };
    let cart: Cart = session.get("cart").await?.unwrap_or_default();
    let body = json!({
        "user": user,
        "served_by": &*instance.name,
        "cart_items": cart.items.len(),
        "degraded": session.is_degraded().await?,
    });
    Ok(Json(body).into_response())
}

async fn cart_add(
    session: Session,
    JsonOrForm(body): JsonOrForm<CartAdd>,
) -> Result<Response, SessionError> {
    let mut cart: Cart = session.get("cart").await?.unwrap_or_default();
    if cart.items.len() >= MAX_CART_ITEMS || body.item.is_empty() || body.item.len() > 64 {
        return Ok((
            StatusCode::BAD_REQUEST,
            Json(json!({ "error": "cart full or bad item" })),
        )
            .into_response());
    }
    cart.items.push(body.item);
    session.insert("cart", &cart).await?;
    Ok(Json(json!({ "items": cart.items })).into_response())
}

async fn cart(session: Session) -> Result<Response, SessionError> {
    let cart: Cart = session.get("cart").await?.unwrap_or_default();
    Ok(Json(json!({ "items": cart.items })).into_response())
}

async fn logout(session: Session) -> Result<Response, SessionError> {
    session.destroy().await?;
    Ok(Json(json!({ "logged_out": true })).into_response())
}
