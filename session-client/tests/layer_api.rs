//! The `Session` API a handler uses (tower-sessions' set: `remove` returning the old value,
//! `remove_value`, `clear`, `get_or_insert_with`, `is_modified`, `cycle_id`) against a real
//! session server, and the layer around a service that is not axum's (`tower::service_fn` with
//! `http::Response<String>`), including the layer's own 503 with an empty body.

mod support;

use std::convert::Infallible;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::StatusCode;
use serde_json::{Value, json};
use session_client::{ClientConfig, Session, SessionClient, SessionError, SessionLayer};
use support::counting_server::{CountingServer, Method};
use tower::{ServiceBuilder, ServiceExt as _};

/// Writes `a = 1`, `b = "x"` and the user; says whether the session counted as modified before
/// and after.
async fn fill(session: Session) -> Result<Response, SessionError> {
    let before = session.is_modified().await;
    session.insert("a", &1u32).await?;
    session.insert("b", &"x").await?;
    session.set_user("ann").await?;
    let after = session.is_modified().await;
    Ok(axum::Json(json!({ "before": before, "after": after })).into_response())
}

/// `remove::<u32>("a")`, `remove::<u32>("missing")` and `remove_value("b")`.
async fn take(session: Session) -> Result<Response, SessionError> {
    let a: Option<u32> = session.remove("a").await?;
    let missing: Option<u32> = session.remove("missing").await?;
    let b = session.remove_value("b").await?;
    let modified = session.is_modified().await;
    Ok(
        axum::Json(json!({ "a": a, "missing": missing, "b": b, "modified": modified }))
            .into_response(),
    )
}

/// `remove::<u32>` of a key that holds a string: an error (500), the key stays.
async fn take_wrong_type(session: Session) -> Result<Response, SessionError> {
    let _: Option<u32> = session.remove("b").await?;
    Ok(StatusCode::OK.into_response())
}

/// `get_or_insert_with("n", || 7)`.
async fn counter(session: Session) -> Result<Response, SessionError> {
    let n: u32 = session.get_or_insert_with("n", || 7).await?;
    let modified = session.is_modified().await;
    Ok(axum::Json(json!({ "n": n, "modified": modified })).into_response())
}

async fn clear(session: Session) -> Result<Response, SessionError> {
    session.clear().await?;
    Ok(StatusCode::OK.into_response())
}

async fn cycle(session: Session) -> Result<Response, SessionError> {
    session.cycle_id().await?;
    Ok(StatusCode::OK.into_response())
}

/// Reads the user only.
async fn me(session: Session) -> Result<Response, SessionError> {
    let user = session.user_id().await?;
    let modified = session.is_modified().await;
    Ok(axum::Json(json!({ "user": user, "modified": modified })).into_response())
}

fn app(client: SessionClient) -> Router {
    Router::new()
        .route("/fill", post(fill))
        .route("/take", post(take))
        .route("/take-wrong-type", post(take_wrong_type))
        .route("/counter", post(counter))
        .route("/clear", post(clear))
        .route("/cycle", post(cycle))
        .route("/me", get(me))
        .layer(SessionLayer::new(client).with_secure(false))
}

/// Status, JSON body, and the `sid` cookie the response set.
async fn send(
    app: &Router,
    method: &str,
    path: &str,
    sid: Option<&str>,
) -> (StatusCode, Value, Option<String>) {
    let mut request = http::Request::builder().method(method).uri(path);
    if let Some(sid) = sid {
        request = request.header(http::header::COOKIE, format!("sid={sid}"));
    }
    let response = app
        .clone()
        .oneshot(request.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let sid = set_sid(response.headers());
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        sid,
    )
}

/// The value of the `sid` cookie a response set, if any.
fn set_sid(headers: &http::HeaderMap) -> Option<String> {
    headers
        .get_all(http::header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.strip_prefix("sid="))
        .map(|v| v.split(';').next().unwrap_or_default().to_owned())
        .next()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_returns_the_old_value_clear_empties_and_get_or_insert_with_writes_once() {
    let server = CountingServer::start().await;
    let client = server.client();
    let app = app(client.clone());

    let (status, body, sid) = send(&app, "POST", "/fill", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({ "before": false, "after": true }));
    let sid = sid.expect("a session made");

    // A read changes nothing and writes nothing.
    server.reset();
    let (_, body, _) = send(&app, "GET", "/me", Some(&sid)).await;
    assert_eq!(body, json!({ "user": "ann", "modified": false }));
    assert_eq!(server.calls(), [Method::Get]);

    // remove::<u32> of a string: an error, nothing removed.
    let (status, _, _) = send(&app, "POST", "/take-wrong-type", Some(&sid)).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(
        client
            .get(&sid, false)
            .await
            .unwrap()
            .attrs
            .contains_key("b")
    );

    let (status, body, _) = send(&app, "POST", "/take", Some(&sid)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({ "a": 1, "missing": null, "b": true, "modified": true })
    );
    let stored = client.get(&sid, false).await.unwrap();
    assert!(stored.attrs.is_empty(), "{:?}", stored.attrs);

    // get_or_insert_with: written on first use only.
    let (_, body, _) = send(&app, "POST", "/counter", Some(&sid)).await;
    assert_eq!(body, json!({ "n": 7, "modified": true }));
    server.reset();
    let (_, body, _) = send(&app, "POST", "/counter", Some(&sid)).await;
    assert_eq!(body, json!({ "n": 7, "modified": false }));
    assert_eq!(server.calls(), [Method::Get], "present: no write");

    // clear: attributes gone, the session, its id and its user kept.
    let before = client.get(&sid, false).await.unwrap();
    let (status, _, new_sid) = send(&app, "POST", "/clear", Some(&sid)).await;
    assert_eq!((status, new_sid), (StatusCode::OK, None), "same id");
    let after = client.get(&sid, false).await.unwrap();
    assert!(after.attrs.is_empty(), "{:?}", after.attrs);
    assert_eq!(after.user_id, "ann");
    assert_eq!(after.version, before.version + 1, "one patch");

    // cycle_id: a new id, the old one dead.
    let (status, _, new_sid) = send(&app, "POST", "/cycle", Some(&sid)).await;
    assert_eq!(status, StatusCode::OK);
    let new_sid = new_sid.expect("the new id is set");
    assert_ne!(new_sid, sid);
    assert!(client.get(&sid, false).await.is_err(), "old id dead");
    assert_eq!(client.get(&new_sid, false).await.unwrap().user_id, "ann");
}

/// A plain tower service (not axum): `/login` logs `ann` in, anything else reads the user.
async fn plain(request: http::Request<String>) -> Result<http::Response<String>, Infallible> {
    let Some(session) = Session::from_request(&request) else {
        return Ok(SessionError::MissingLayer.empty_response());
    };
    let answer = if request.uri().path() == "/login" {
        session.set_user("ann").await.map(|()| "in".to_owned())
    } else {
        session
            .user_id()
            .await
            .map(|user| user.unwrap_or_else(|| "anonymous".into()))
    };
    Ok(match answer {
        Ok(body) => http::Response::new(body),
        Err(error) => error.empty_response(),
    })
}

/// Sends `path` with `sid` to a plain service behind `layer`: status, headers, body.
async fn send_plain(
    layer: &SessionLayer,
    path: &str,
    sid: Option<&str>,
) -> (StatusCode, http::HeaderMap, String) {
    let service = ServiceBuilder::new().layer(layer.clone()).service_fn(plain);
    let mut request = http::Request::builder().uri(path);
    if let Some(sid) = sid {
        request = request.header(http::header::COOKIE, format!("sid={sid}"));
    }
    let response = service
        .oneshot(request.body(String::new()).unwrap())
        .await
        .unwrap();
    let (parts, body) = response.into_parts();
    (parts.status, parts.headers, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_tower_service_with_string_bodies_gets_sessions() {
    let server = CountingServer::start().await;
    let layer = SessionLayer::new(server.client()).with_secure(false);

    let (status, headers, body) = send_plain(&layer, "/login", None).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "in"));
    let sid = set_sid(&headers).expect("sid set");
    assert_eq!(
        server.client().get(&sid, false).await.unwrap().user_id,
        "ann"
    );

    let (status, headers, body) = send_plain(&layer, "/me", Some(&sid)).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "ann"));
    assert_eq!(set_sid(&headers), None, "nothing changed, no cookie");

    let (_, _, body) = send_plain(&layer, "/me", None).await;
    assert_eq!(body, "anonymous");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_service_gets_the_layers_503_with_an_empty_body_when_the_store_is_down() {
    // A port nobody listens on.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let mut config = ClientConfig::new(url);
    config.timeout = Duration::from_secs(5);
    config.connect_timeout = Duration::from_secs(2);
    config.retries = 0;
    let layer = SessionLayer::new(SessionClient::connect_lazy(config).unwrap());

    // The handler's login needs no load (no id yet); the layer's save after it fails.
    let (status, headers, body) = send_plain(&layer, "/login", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body, "", "the layer's own answer has an empty body");
    assert_eq!(set_sid(&headers), None);

    // A read of a session: the handler's own error response.
    let (status, _, _) = send_plain(&layer, "/me", Some("some-id")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
}
