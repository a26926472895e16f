//! Sessions without cookies (`IdSource::Header`, as Spring's `HeaderHttpSessionIdResolver`):
//! a client without a cookie jar logs in, reads, regenerates and logs out with the id in the
//! `x-session-token` header, against a real session server; and `IdSource::Both`, which serves
//! browsers and header clients with one layer.

mod support;

use axum::Router;
use axum::body::Body;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::{HeaderMap, StatusCode};
use serde_json::{Value, json};
use session_client::{ClientError, FallbackMode, IdSource, Session, SessionError, SessionLayer};
use support::app::codec;
use support::counting_server::CountingServer;
use tower::ServiceExt as _;

const HEADER: &str = "x-session-token";

async fn login(session: Session) -> Result<Response, SessionError> {
    session.set_user("ann").await?;
    session.insert("cart", &3u32).await?;
    Ok(StatusCode::OK.into_response())
}

async fn me(session: Session) -> Result<Response, SessionError> {
    let user = session.user_id().await?;
    let cart: Option<u32> = session.get("cart").await?;
    Ok(axum::Json(json!({ "user": user, "cart": cart })).into_response())
}

async fn regenerate(session: Session) -> Result<Response, SessionError> {
    session.regenerate().await?;
    Ok(StatusCode::OK.into_response())
}

async fn logout(session: Session) -> Result<Response, SessionError> {
    session.destroy().await?;
    Ok(StatusCode::OK.into_response())
}

fn app(layer: SessionLayer) -> Router {
    Router::new()
        .route("/login", post(login))
        .route("/me", get(me))
        .route("/regenerate", post(regenerate))
        .route("/logout", post(logout))
        .layer(layer)
}

/// What a test reads from a response.
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

impl Reply {
    /// The id header's value, if the response has one.
    fn token(&self) -> Option<&str> {
        self.headers.get(HEADER).map(|v| v.to_str().unwrap())
    }

    fn set_cookies(&self) -> Vec<&str> {
        self.headers
            .get_all(http::header::SET_COOKIE)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect()
    }
}

async fn send(app: &Router, method: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut request = http::Request::builder().method(method).uri(path);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = app
        .clone()
        .oneshot(request.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    Reply {
        status,
        headers,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_only_client_logs_in_reads_regenerates_and_logs_out() {
    let server = CountingServer::start().await;
    let client = server.client();
    // The fallback asked for is turned off: snapshots ride in cookies only.
    let layer = SessionLayer::new(client.clone())
        .with_codec(codec(&[[7u8; 32]]))
        .with_fallback(FallbackMode::OnOutage)
        .with_id_source(IdSource::header());
    let app = app(layer);

    let reply = send(&app, "POST", "/login", &[]).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.set_cookies(), Vec::<&str>::new(), "no cookie at all");
    let id = reply.token().expect("the new id in the header").to_owned();
    assert!(!id.is_empty());
    assert_eq!(client.get(&id, false).await.unwrap().user_id, "ann");
    // No shared cache may keep a response that hands out a session id.
    assert_eq!(reply.headers["cache-control"], "no-store");
    assert_eq!(reply.headers["vary"], HEADER);

    let reply = send(&app, "GET", "/me", &[(HEADER, &id)]).await;
    assert_eq!(reply.body, json!({ "user": "ann", "cart": 3 }));
    assert_eq!(reply.token(), None, "same id: no header");
    assert!(reply.set_cookies().is_empty());

    // A cookie is not read in header mode.
    let reply = send(&app, "GET", "/me", &[("cookie", &format!("sid={id}"))]).await;
    assert_eq!(reply.body["user"], Value::Null);

    let reply = send(&app, "POST", "/regenerate", &[(HEADER, &id)]).await;
    assert_eq!(reply.status, StatusCode::OK);
    let new_id = reply.token().expect("the new id in the header").to_owned();
    assert_ne!(new_id, id);
    assert!(reply.set_cookies().is_empty());
    assert!(
        matches!(
            client.get(&id, false).await,
            Err(ClientError::NotFound { .. })
        ),
        "the old id is dead"
    );
    let reply = send(&app, "GET", "/me", &[(HEADER, &new_id)]).await;
    assert_eq!(reply.body, json!({ "user": "ann", "cart": 3 }));

    let reply = send(&app, "POST", "/logout", &[(HEADER, &new_id)]).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.token(), Some(""), "an empty id: the session is gone");
    assert_eq!(reply.headers["cache-control"], "no-store");
    assert!(reply.set_cookies().is_empty());
    assert!(matches!(
        client.get(&new_id, false).await,
        Err(ClientError::NotFound { .. })
    ));

    // The dead id sent again: answered with the empty header.
    let reply = send(&app, "GET", "/me", &[(HEADER, &new_id)]).await;
    assert_eq!(reply.body["user"], Value::Null);
    assert_eq!(reply.token(), Some(""));

    // So is an id the store never made.
    let reply = send(&app, "GET", "/me", &[(HEADER, "not-a-session")]).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.token(), Some(""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_sources_answer_each_client_its_own_way() {
    let server = CountingServer::start().await;
    let client = server.client();
    let app = app(SessionLayer::new(client.clone())
        .with_secure(false)
        .with_id_source(IdSource::both()));

    // No id sent: the new one goes both ways.
    let reply = send(&app, "POST", "/login", &[]).await;
    let id = reply.token().expect("header").to_owned();
    let cookies = reply.set_cookies();
    assert!(
        cookies.iter().any(|c| c.starts_with(&format!("sid={id};"))),
        "{cookies:?}"
    );

    // A browser (cookie): its new id in the cookie only.
    let reply = send(
        &app,
        "POST",
        "/regenerate",
        &[("cookie", &format!("sid={id}"))],
    )
    .await;
    assert_eq!(reply.token(), None);
    let cookie = reply
        .set_cookies()
        .first()
        .expect("a new sid cookie")
        .to_string();
    let browser_id = cookie
        .strip_prefix("sid=")
        .and_then(|c| c.split(';').next())
        .unwrap()
        .to_owned();
    assert_ne!(browser_id, id);

    // An API client (header, taking precedence over a cookie): the header only.
    let reply = send(
        &app,
        "POST",
        "/regenerate",
        &[(HEADER, &browser_id), ("cookie", "sid=stale")],
    )
    .await;
    let api_id = reply.token().expect("the new id in the header").to_owned();
    assert_ne!(api_id, browser_id);
    assert!(reply.set_cookies().is_empty(), "{:?}", reply.set_cookies());
    let reply = send(&app, "GET", "/me", &[(HEADER, &api_id)]).await;
    assert_eq!(reply.body["user"], "ann");
}
