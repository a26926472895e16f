//! An axum app behind `tower-sessions`' `SessionManagerLayer` over `SticklessStore`, called
//! in-process against a real session server: the session made by the first request is in
//! Stickless under the cookie's id, later requests with the cookie see and change it, and a
//! second app instance (another store over another client) sees the same session.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use http::{Request, header};
use session_client::{ClientConfig, SessionClient};
use session_server::config::Settings;
use session_server::metrics::Metrics;
use session_server::store::memory::MemoryStore;
use tokio::sync::oneshot;
use tower::ServiceExt as _;
use tower_sessions::session::Id;
use tower_sessions::{Session, SessionManagerLayer};
use tower_sessions_stickless::{SticklessStore, stickless_id};

async fn counter(session: Session) -> String {
    let visits: u64 = session.get("visits").await.unwrap().unwrap_or(0) + 1;
    session.insert("visits", visits).await.unwrap();
    visits.to_string()
}

fn app(url: &str) -> (Router, SessionClient) {
    let mut config = ClientConfig::new(url);
    config.timeout = Duration::from_secs(20);
    let client = SessionClient::connect_lazy(config).expect("valid config");
    let layer = SessionManagerLayer::new(SticklessStore::new(client.clone())).with_secure(false);
    (Router::new().route("/", get(counter)).layer(layer), client)
}

/// The body and the `Set-Cookie` value (name=value only) of a GET `/` with `cookie`.
async fn visit(app: &Router, cookie: Option<&str>) -> (String, Option<String>) {
    let mut request = Request::get("/");
    if let Some(cookie) = cookie {
        request = request.header(header::COOKIE, cookie);
    }
    let response = app
        .clone()
        .oneshot(request.body(Body::empty()).unwrap())
        .await
        .expect("response");
    assert!(response.status().is_success(), "{:?}", response.status());
    let set_cookie = response
        .headers()
        .get(header::SET_COOKIE)
        .map(|v| v.to_str().unwrap().split(';').next().unwrap().to_owned());
    let body = axum::body::to_bytes(response.into_body(), 1 << 16)
        .await
        .unwrap();
    (String::from_utf8(body.to_vec()).unwrap(), set_cookie)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_of_a_tower_sessions_app_live_in_stickless() {
    let settings = Settings::default();
    let store = Arc::new(MemoryStore::new(settings.max_session_bytes));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (_stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let shutdown = async {
            let _ = stopped.await;
        };
        session_server::server::run(listener, &settings, store, Metrics::new(), shutdown)
            .await
            .expect("session server failed");
    });

    let (one, client) = app(&url);
    let (two, _) = app(&url);
    let (body, cookie) = visit(&one, None).await;
    assert_eq!(body, "1");
    let cookie = cookie.expect("a session cookie");
    let id: Id = cookie
        .split_once('=')
        .unwrap()
        .1
        .parse()
        .expect("a tower-sessions id");
    let stored = client
        .get(&stickless_id(&id), false)
        .await
        .expect("in Stickless");
    assert_eq!(stored.attrs["visits"], b"1");

    // The other instance reads and changes the same session.
    assert_eq!(visit(&two, Some(&cookie)).await.0, "2");
    assert_eq!(visit(&one, Some(&cookie)).await.0, "3");
    let stored = client.get(&stickless_id(&id), false).await.unwrap();
    assert_eq!(stored.attrs["visits"], b"3");
    // Without the cookie: a new session.
    assert_eq!(visit(&two, None).await.0, "1");
}
