//! A logout through the session-lookup plugin clears every session cookie: the session cookie
//! and the snapshot cookie leave the browser together, whether the backend expires both
//! (`demo-app --sessions proxy`) or only the session cookie (then the proxy expires the
//! snapshot), and the cookies copied before the logout bring nobody back while the store is up.
//! Real pieces: a session server (memory store), the proxy with snapshot keys, and backends
//! served on loopback ports.

mod support;

use std::collections::HashMap;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use demo::{DemoConfig, Sessions};
use proxy_plugin::config::{BackendConfig, LookupFailure};
use session_client::{ClientError, SessionClient};
use support::lookup::{NAMESPACE, attrs, lookup_config};
use support::proxy::{TestProxy, client, config};
use support::session::TestSessionServer;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The key material the proxy and the backends share.
const KEY: [u8; 32] = [0x5a; 32];

/// A backend served on a loopback port, stopped when dropped.
struct Backend {
    /// Its entry in the proxy's config.
    config: BackendConfig,
    /// The serving task.
    task: JoinHandle<()>,
}

impl Backend {
    async fn serve(name: &str, app: Router) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local address");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let config = BackendConfig {
            name: name.to_owned(),
            authority: addr.to_string(),
            weight: 1,
            tls: false,
        };
        Backend { config, task }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The proxy with the plugin over `sessions` (snapshot keys [`KEY`]) in front of `backend`.
async fn proxy(sessions: &TestSessionServer, backend: &Backend) -> TestProxy {
    let mut cfg = config(&[]);
    cfg.backends = vec![backend.config.clone()];
    cfg.lookup = Some(lookup_config(&sessions.url(), LookupFailure::Open, &[&KEY]));
    TestProxy::start(cfg).await
}

/// A backend with no session code whose logout deletes the session and clears only the session
/// cookie, written as `{style}` says: what `demo-app --sessions proxy` did before it cleared
/// both, and other ways frameworks write a removal.
fn sid_only_backend(store: SessionClient) -> Router {
    async fn me(headers: HeaderMap) -> Response {
        match headers.get("x-session-user") {
            Some(user) => (StatusCode::OK, user.to_str().unwrap_or("?").to_owned()).into_response(),
            None => StatusCode::UNAUTHORIZED.into_response(),
        }
    }
    async fn logout(
        State(store): State<SessionClient>,
        Path(style): Path<String>,
        headers: HeaderMap,
    ) -> Response {
        if let Some(id) = headers.get("x-session-id").and_then(|v| v.to_str().ok()) {
            store.delete(id).await.expect("delete");
        }
        let clear = match style.as_str() {
            "max-age" => "sid=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax",
            "expires" => "sid=gone; Path=/; Expires=Thu, 01 Jan 1970 00:00:00 GMT",
            "empty" => "sid=; Path=/",
            other => panic!("no logout style {other}"),
        };
        ([("set-cookie", clear)], "logged out").into_response()
    }
    Router::new()
        .route("/me", get(me))
        .route("/logout/{style}", post(logout))
        .with_state(store)
}

/// The `Set-Cookie` lines of a response.
fn set_cookies(response: &reqwest::Response) -> Vec<String> {
    response
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().expect("ascii").to_owned())
        .collect()
}

/// The lines of `lines` setting cookie `name`.
fn lines_of<'a>(lines: &'a [String], name: &str) -> Vec<&'a str> {
    lines
        .iter()
        .map(String::as_str)
        .filter(|line| line.split_once('=').is_some_and(|(n, _)| n == name))
        .collect()
}

/// The value the lines set for cookie `name` (the last line for it).
fn value_of(lines: &[String], name: &str) -> Option<String> {
    let line = *lines_of(lines, name).last()?;
    let pair = line.split(';').next()?;
    Some(pair[name.len() + 1..].to_owned())
}

/// Whether `line` is the proxy's (and the demo's) expiry of a cookie over plain HTTP.
fn is_expiry(line: &str, name: &str) -> bool {
    line == format!("{name}=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax")
}

#[tokio::test]
async fn a_logout_clearing_only_the_session_cookie_gets_the_snapshot_expired_too() {
    let sessions = TestSessionServer::start().await;
    let store = sessions.client(NAMESPACE);
    let backend = Backend::serve("sid-only", sid_only_backend(store.clone())).await;
    let proxy = proxy(&sessions, &backend).await;
    let http = client();

    for style in ["max-age", "expires", "empty"] {
        let session = store
            .create("alice", attrs(&[("cart", b"[1,2]")]), None)
            .await
            .expect("create");
        let me = http
            .get(proxy.url("/me"))
            .header("cookie", format!("sid={}", session.id))
            .send()
            .await
            .unwrap();
        assert_eq!(me.status(), StatusCode::OK, "{style}");
        let snapshot = value_of(&set_cookies(&me), "sid_snap").expect("a snapshot on first use");
        assert!(!snapshot.is_empty());
        let before = format!("sid={}; sid_snap={snapshot}", session.id);

        // The snapshot is fresh: only the logout response itself can make the proxy act.
        let out = http
            .post(proxy.url(&format!("/logout/{style}")))
            .header("cookie", &before)
            .send()
            .await
            .unwrap();
        assert_eq!(out.status(), StatusCode::OK, "{style}");
        let lines = set_cookies(&out);
        assert_eq!(lines_of(&lines, "sid").len(), 1, "{style}: {lines:?}");
        let snap = lines_of(&lines, "sid_snap");
        assert!(
            snap.len() == 1 && is_expiry(snap[0], "sid_snap"),
            "{style}: the snapshot is expired, not rewritten: {lines:?}"
        );
        assert!(matches!(
            store.get(&session.id, false).await,
            Err(ClientError::NotFound { .. })
        ));

        // The cookies copied before the logout bring nobody back while the store is up.
        let replay = http
            .get(proxy.url("/me"))
            .header("cookie", &before)
            .send()
            .await
            .unwrap();
        assert_eq!(replay.status(), StatusCode::UNAUTHORIZED, "{style}");
        let lines = set_cookies(&replay);
        let snap = lines_of(&lines, "sid_snap");
        assert!(
            snap.len() == 1 && is_expiry(snap[0], "sid_snap"),
            "{style}: {lines:?}"
        );
    }
}

#[tokio::test]
async fn a_response_setting_the_session_cookie_still_gets_no_snapshot() {
    // Login: a new session cookie, its snapshot left to the next request (not expired either).
    let sessions = TestSessionServer::start().await;
    let store = sessions.client(NAMESPACE);
    let app = Router::new().route(
        "/login",
        post(|| async { ([("set-cookie", "sid=new-session; Path=/")], "in") }),
    );
    let backend = Backend::serve("login", app).await;
    let proxy = proxy(&sessions, &backend).await;
    let session = store.create("alice", HashMap::new(), None).await.unwrap();
    let first = client()
        .post(proxy.url("/login"))
        .header("cookie", format!("sid={}", session.id))
        .send()
        .await
        .unwrap();
    let snapshot = value_of(&set_cookies(&first), "sid_snap");
    assert_eq!(snapshot, None, "{:?}", set_cookies(&first));
}

#[tokio::test]
async fn demo_app_logout_through_the_proxy_expires_both_cookies() {
    let sessions = TestSessionServer::start().await;
    let mut demo_config = DemoConfig::new("s1", Sessions::Proxy(sessions.url()));
    demo_config.secure_cookies = false;
    demo_config.namespace = NAMESPACE.to_owned();
    demo_config.cookie_keys = vec![KEY.to_vec()];
    let app = demo::app(&demo_config).await.expect("demo app");
    let backend = Backend::serve("s1", app).await;
    let proxy = proxy(&sessions, &backend).await;
    let http = client();

    let login = http
        .post(proxy.url("/login"))
        .json(&serde_json::json!({ "user": "alice" }))
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), StatusCode::OK);
    let lines = set_cookies(&login);
    let id = value_of(&lines, "sid").expect("session cookie");
    let snapshot = value_of(&lines, "sid_snap").expect("the demo's snapshot cookie");
    let before = format!("sid={id}; sid_snap={snapshot}");
    let me = http
        .get(proxy.url("/me"))
        .header("cookie", &before)
        .send()
        .await
        .unwrap();
    assert_eq!(me.status(), StatusCode::OK);

    let out = http
        .post(proxy.url("/logout"))
        .header("cookie", &before)
        .send()
        .await
        .unwrap();
    assert_eq!(out.status(), StatusCode::OK);
    let lines = set_cookies(&out);
    for name in ["sid", "sid_snap"] {
        let mine = lines_of(&lines, name);
        assert!(
            mine.len() == 1 && is_expiry(mine[0], name),
            "{name} expired once: {lines:?}"
        );
    }

    let replay = http
        .get(proxy.url("/me"))
        .header("cookie", &before)
        .send()
        .await
        .unwrap();
    assert_eq!(
        replay.status(),
        StatusCode::UNAUTHORIZED,
        "logged out stays out"
    );
}
