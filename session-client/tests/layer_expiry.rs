//! Persistent cookies and lifetimes (`Expiry`) against a real session server: a "remember me"
//! session (`set_expiry(Some(OnInactivity(30 days)))`) gets an id cookie with `Max-Age` and a
//! store ttl to match, and survives a browser restart, which a browser-session one does not;
//! its cookie is not sent again on every response, only when the session changes; going back
//! to the layer's expiry makes the cookie a browser-session one again. Layer-wide
//! `OnInactivity` and `AtDateTime` set the cookie's `Max-Age` / `Expires` and the store's
//! ttl / absolute lifetime.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Body;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::StatusCode;
use serde_json::{Value, json};
use session_client::{ClientConfig, Expiry, Session, SessionClient, SessionError, SessionLayer};
use session_proto::v1::session_store_server::SessionStoreServer;
use session_server::config::Settings;
use session_server::metrics::Metrics;
use session_server::service::{Limits, SessionService};
use session_server::store::memory::MemoryStore;
use support::counting_server::{CountingServer, Method};
use tower::ServiceExt as _;
use tower_cookies::Cookie;

const MONTH: Duration = Duration::from_secs(30 * 24 * 3600);

/// A real session server over a memory store on `127.0.0.1:0` that allows ttls up to
/// `max_ttl` (the default allows one day), and a client of it. The server stops with the test.
async fn server_allowing(max_ttl: Duration) -> SessionClient {
    let settings = Settings::default();
    let limits = Limits {
        default_ttl: settings.default_ttl,
        max_ttl,
        max_session_bytes: settings.max_session_bytes,
    };
    let (watch_stop, watch_rx) = tokio::sync::watch::channel(false);
    let store = Arc::new(MemoryStore::new(settings.max_session_bytes));
    let service = SessionService::new(store, limits, Metrics::new(), watch_rx);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _keep = watch_stop;
        tonic::transport::Server::builder()
            .add_service(SessionStoreServer::new(service))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await
            .expect("session server failed");
    });
    SessionClient::connect_lazy(ClientConfig::new(format!("http://{addr}"))).unwrap()
}

async fn login(session: Session) -> Result<Response, SessionError> {
    session.set_user("ann").await?;
    session.regenerate().await?;
    Ok(StatusCode::OK.into_response())
}

/// Login with "remember me" ticked.
async fn login_remembered(session: Session) -> Result<Response, SessionError> {
    session.set_user("ann").await?;
    session.regenerate().await?;
    session
        .set_expiry(Some(Expiry::OnInactivity(MONTH)))
        .await?;
    Ok(StatusCode::OK.into_response())
}

/// "Remember me" unticked: back to the layer's expiry.
async fn forget(session: Session) -> Result<Response, SessionError> {
    session.set_expiry(None).await?;
    Ok(StatusCode::OK.into_response())
}

async fn me(session: Session) -> Result<Response, SessionError> {
    let user = session.user_id().await?;
    let expiry = session.expiry().await?.map(|e| format!("{e:?}"));
    Ok(axum::Json(json!({ "user": user, "own_expiry": expiry })).into_response())
}

async fn add(session: Session) -> Result<Response, SessionError> {
    session.insert("cart", &1u32).await?;
    Ok(StatusCode::OK.into_response())
}

fn app(layer: SessionLayer) -> Router {
    Router::new()
        .route("/login", post(login))
        .route("/login-remembered", post(login_remembered))
        .route("/forget", post(forget))
        .route("/me", get(me))
        .route("/add", post(add))
        .layer(layer.with_secure(false))
}

/// A browser's cookie jar: each cookie with whether it outlives the browser.
#[derive(Debug, Default)]
struct Browser {
    cookies: HashMap<String, (String, bool)>,
}

/// What one response said.
struct Reply {
    status: StatusCode,
    body: Value,
    set: Vec<Cookie<'static>>,
}

impl Reply {
    fn sid(&self) -> Option<&Cookie<'static>> {
        self.set.iter().find(|c| c.name() == "sid")
    }
}

impl Browser {
    async fn send(&mut self, app: &Router, method: &str, path: &str) -> Reply {
        let mut request = http::Request::builder().method(method).uri(path);
        if !self.cookies.is_empty() {
            let header = self
                .cookies
                .iter()
                .map(|(n, (v, _))| format!("{n}={v}"))
                .collect::<Vec<_>>()
                .join("; ");
            request = request.header(http::header::COOKIE, header);
        }
        let response = app
            .clone()
            .oneshot(request.body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let set: Vec<Cookie<'static>> = response
            .headers()
            .get_all(http::header::SET_COOKIE)
            .iter()
            .map(|v| Cookie::parse(v.to_str().unwrap().to_owned()).unwrap())
            .collect();
        for cookie in &set {
            let removed = cookie.max_age().is_some_and(|age| age.is_zero());
            if removed {
                self.cookies.remove(cookie.name());
            } else {
                let persistent = cookie.max_age().is_some() || cookie.expires().is_some();
                self.cookies.insert(
                    cookie.name().to_owned(),
                    (cookie.value().to_owned(), persistent),
                );
            }
        }
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        Reply {
            status,
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            set,
        }
    }

    /// The browser is closed and opened again: cookies without `Max-Age`/`Expires` are gone.
    fn restart(&mut self) {
        self.cookies.retain(|_, (_, persistent)| *persistent);
    }

    fn sid(&self) -> String {
        self.cookies["sid"].0.clone()
    }
}

/// The cookie's `Max-Age` in seconds; panics without one.
fn max_age(cookie: &Cookie<'static>) -> i64 {
    cookie
        .max_age()
        .unwrap_or_else(|| panic!("no Max-Age: {cookie}"))
        .whole_seconds()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remembered_session_survives_a_browser_restart_and_a_browser_session_does_not() {
    let client = server_allowing(2 * MONTH).await;
    let app = app(SessionLayer::new(client.clone()));

    let mut plain = Browser::default();
    let reply = plain.send(&app, "POST", "/login").await;
    assert_eq!(reply.status, StatusCode::OK);
    let cookie = reply.sid().expect("sid set");
    assert!(
        cookie.max_age().is_none() && cookie.expires().is_none(),
        "a browser-session cookie: {cookie}"
    );
    let plain_ttl = client.get(&plain.sid(), false).await.unwrap().ttl;
    assert!(plain_ttl < MONTH, "the server's default ttl: {plain_ttl:?}");
    plain.restart();
    let reply = plain.send(&app, "GET", "/me").await;
    assert_eq!(reply.body["user"], Value::Null, "logged out by the restart");

    let mut remembered = Browser::default();
    let reply = remembered.send(&app, "POST", "/login-remembered").await;
    assert_eq!(reply.status, StatusCode::OK);
    let age = max_age(reply.sid().expect("sid set"));
    assert!(
        (MONTH.as_secs() as i64 - 60..=MONTH.as_secs() as i64).contains(&age),
        "Max-Age {age}"
    );
    let id = remembered.sid();
    let stored = client.get(&id, false).await.unwrap();
    assert_eq!(stored.ttl, MONTH, "the store keeps it as long");
    assert_eq!(stored.user_id, "ann");

    // Soon after: the cookie is not sent again, and nothing is written.
    let reply = remembered.send(&app, "GET", "/me").await;
    assert_eq!(reply.body["user"], "ann");
    assert!(reply.set.is_empty(), "{:?}", reply.set);
    assert_eq!(
        client.get(&id, false).await.unwrap().version,
        stored.version
    );

    remembered.restart();
    let reply = remembered.send(&app, "GET", "/me").await;
    assert_eq!(
        reply.body,
        json!({ "user": "ann", "own_expiry": format!("{:?}", Expiry::OnInactivity(MONTH)) }),
        "still logged in after the restart"
    );
    assert_eq!(remembered.sid(), id);

    // A change: the cookie goes again, with its Max-Age.
    let reply = remembered.send(&app, "POST", "/add").await;
    assert_eq!(reply.status, StatusCode::OK);
    let cookie = reply.sid().expect("sid sent again after a change");
    assert_eq!(cookie.value(), id);
    assert!(max_age(cookie) > MONTH.as_secs() as i64 - 60);

    // Unticked: a browser-session cookie again, the layer's ttl in the store.
    let reply = remembered.send(&app, "POST", "/forget").await;
    let cookie = reply.sid().expect("sid sent again without Max-Age");
    assert!(
        cookie.max_age().is_none() && cookie.expires().is_none(),
        "{cookie}"
    );
    let stored = client.get(&id, false).await.unwrap();
    assert_eq!(stored.ttl, plain_ttl);
    assert_eq!(stored.attrs.get("cart").map(Vec::as_slice), Some(&b"1"[..]));
    remembered.restart();
    let reply = remembered.send(&app, "GET", "/me").await;
    assert_eq!(reply.body["user"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cookie_follows_the_store_when_it_clamps_the_ttl() {
    // The default server allows one day: a month asked for is a day, cookie included.
    let server = CountingServer::start().await;
    let client = server.client();
    let app = app(SessionLayer::new(client.clone()));
    let mut browser = Browser::default();
    let reply = browser.send(&app, "POST", "/login-remembered").await;
    let age = max_age(reply.sid().expect("sid set"));
    let stored = client.get(&browser.sid(), false).await.unwrap();
    assert!(stored.ttl < MONTH);
    assert!(
        (stored.ttl.as_secs() as i64 - 60..=stored.ttl.as_secs() as i64).contains(&age),
        "Max-Age {age}, store ttl {:?}",
        stored.ttl
    );

    // Read soon after: one Get, no write, no cookie.
    server.reset();
    let reply = browser.send(&app, "GET", "/me").await;
    assert_eq!(reply.body["user"], "ann");
    assert!(reply.set.is_empty(), "{:?}", reply.set);
    assert_eq!(server.calls(), [Method::Get]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_wide_inactivity_expiry_sets_max_age_and_the_store_ttl() {
    let server = CountingServer::start().await;
    let client = server.client();
    let hour = Duration::from_secs(3600);
    let app = app(SessionLayer::new(client.clone()).with_expiry(Expiry::OnInactivity(hour)));

    let mut browser = Browser::default();
    let reply = browser.send(&app, "POST", "/add").await;
    let age = max_age(reply.sid().expect("sid set"));
    assert!((3540..=3600).contains(&age), "Max-Age {age}");
    assert_eq!(client.get(&browser.sid(), false).await.unwrap().ttl, hour);

    // An anonymous read makes no session.
    server.reset();
    let reply = Browser::default().send(&app, "GET", "/me").await;
    assert!(reply.set.is_empty());
    assert!(server.calls().is_empty(), "{:?}", server.calls());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiry_at_a_date_sets_expires_a_lifetime_and_caps_the_ttl() {
    let server = CountingServer::start().await;
    let client = server.client();
    let end = SystemTime::now() + Duration::from_secs(600);
    let app = app(SessionLayer::new(client.clone()).with_expiry(Expiry::AtDateTime(end)));

    let mut browser = Browser::default();
    let reply = browser.send(&app, "POST", "/add").await;
    let cookie = reply.sid().expect("sid set");
    let expires = cookie
        .expires_datetime()
        .unwrap_or_else(|| panic!("Expires: {cookie}"));
    let end_secs = end
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert_eq!(expires.unix_timestamp(), end_secs);
    assert!(cookie.max_age().is_none());

    let creates = server.creates();
    let lifetime = creates[0].max_lifetime.expect("an absolute lifetime sent");
    assert!((599..=600).contains(&lifetime.seconds), "{lifetime:?}");
    let ttl = client.get(&browser.sid(), false).await.unwrap().ttl;
    assert!(
        ttl <= Duration::from_secs(600),
        "ttl capped to the time left: {ttl:?}"
    );
}
