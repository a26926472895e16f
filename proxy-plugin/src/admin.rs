//! The admin API, on a listener of its own (`--admin-listen`, off by default) so that it is
//! never exposed on the client-facing address:
//!
//! - `GET /backends`: JSON array of `{name, address, weight, up, active, served}`;
//!   `GET /backends/NAME`: one of them.
//! - `GET /metrics`: Prometheus text.
//! - `PUT /backends/NAME/weight` (or `POST`) with `Content-Type: application/json` and a JSON
//!   number as the body, such as `0` or `5`: changes the weight at run time (0..=1000; 0 drains
//!   the backend). 400 on a bad body, 404 on an unknown name. A reload rebuilds the backends
//!   from the configuration, which resets these weights.
//!
//! Anything else is 404 (405 for a known path with the wrong method).
//!
//! # Protection
//! Checked in this order, before routing, on every request:
//! 1. **Token** (`--admin-token` or `--admin-token-file`): when one is configured, every call,
//!    reads included, needs `Authorization: Bearer TOKEN`. Without it: 401 with
//!    `WWW-Authenticate: Bearer`; with a wrong token: 401 as well (with `error="invalid_token"`),
//!    as Prometheus exporters and HAProxy's stats page answer, so a client cannot tell an
//!    unknown token from a missing one by status. Tokens are compared as SHA-256 digests with
//!    no early exit. The token is taken from the configuration in force, so a SIGHUP that
//!    reloads a changed token (or token file) applies to the next request. The configuration
//!    refuses a non-loopback `--admin-listen` without a token; should a reload leave a listener
//!    bound off loopback with no token, every call is refused (403).
//! 2. **Cross-site writes**: a request with any method but GET and HEAD is refused with 403
//!    when it carries an `Origin` header (browsers send one on cross-site requests; curl and
//!    scripts do not), and with 415 when its `Content-Type` is not `application/json`
//!    (parameters such as `; charset=utf-8` allowed). A page in a browser can therefore not
//!    change a weight, even on a loopback listener without a token: a cross-site form can only
//!    send form or text content types, and a JSON one needs a CORS preflight this API refuses.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{ALLOW, AUTHORIZATION, CONTENT_TYPE, ORIGIN, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::backend::Backend;
use crate::config::{AdminToken, MAX_WEIGHT};
use crate::proxy::Proxy;

/// Largest request body: a weight is a few digits, anything longer is a mistake or abuse.
const MAX_BODY_BYTES: usize = 1024;
/// Time a client gets to send a request head, and then its body.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Most admin connections at once: it serves operators and one scraper, not the public.
const MAX_CONNECTIONS: usize = 64;
/// Time open admin connections get to finish their request at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The `WWW-Authenticate` challenge of a request without a bearer token.
const CHALLENGE: &str = "Bearer realm=\"session-proxy admin\"";
/// The challenge of a request with a wrong token (RFC 6750 section 3.1).
const CHALLENGE_INVALID: &str = "Bearer realm=\"session-proxy admin\", error=\"invalid_token\"";

/// Serves the admin API on `listener` until `shutdown` resolves, then lets requests in progress
/// finish (briefly) and returns. Every request is checked against the admin token of the
/// configuration in force ([`Proxy::config`]), so a reload that changes it applies at once.
pub async fn serve_admin(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // Where it really is bound decides whether calls without a token may be served.
    let loopback = listener.local_addr()?.ip().to_canonical().is_loopback();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut connections = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of file descriptors and the like: wait instead of spinning.
                        tracing::warn!(%error, "admin listener cannot accept");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if connections.len() >= MAX_CONNECTIONS {
                    tracing::warn!(%peer, "too many admin connections; closing a new one");
                    continue;
                }
                let proxy = proxy.clone();
                let mut stop = stop_rx.clone();
                connections.spawn(async move {
                    let service = service_fn(move |request| {
                        let proxy = proxy.clone();
                        async move {
                            Ok::<_, Infallible>(handle(&proxy, loopback, peer, request).await)
                        }
                    });
                    let connection = http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(READ_TIMEOUT)
                        .serve_connection(TokioIo::new(stream), service);
                    let mut connection = std::pin::pin!(connection);
                    let stopped = async move {
                        let _ = stop.wait_for(|stop| *stop).await;
                    };
                    let result = tokio::select! {
                        result = connection.as_mut() => result,
                        () = stopped => {
                            connection.as_mut().graceful_shutdown();
                            connection.await
                        }
                    };
                    if let Err(error) = result {
                        tracing::debug!(%peer, %error, "admin connection ended with an error");
                    }
                });
            }
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!("admin connections still open at shutdown; closing them");
    }
    Ok(())
}

/// Checks the token, then refuses cross-site writes, then routes one request from `peer`.
/// `loopback`: the listener is bound to a loopback address, so calls may come without a token
/// when none is configured.
async fn handle(
    proxy: &Proxy,
    loopback: bool,
    peer: SocketAddr,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let method = request.method().clone();
    let read = method == Method::GET || method == Method::HEAD;
    let write = method == Method::PUT || method == Method::POST;
    let token = proxy.config().admin_token;
    if let Some(refusal) = authorize(token.as_ref(), loopback, peer, request.headers()) {
        tracing::debug!(%peer, %method, path = request.uri().path(), "admin call refused: token");
        return refusal;
    }
    if !read && let Some(refusal) = cross_site_write(request.headers()) {
        tracing::info!(%peer, %method, path = request.uri().path(),
            "admin write refused: cross-site");
        return refusal;
    }
    let path = request.uri().path().to_owned();
    let segments: Vec<&str> = path.strip_prefix('/').unwrap_or(&path).split('/').collect();
    match segments.as_slice() {
        ["backends"] if read => {
            let list: Vec<_> = proxy.backends().iter().map(|b| backend_json(b)).collect();
            json(StatusCode::OK, &serde_json::Value::Array(list))
        }
        ["backends", name] if read => match find(proxy, name) {
            Some(backend) => json(StatusCode::OK, &backend_json(&backend)),
            None => unknown_backend(name),
        },
        ["metrics"] if read => {
            let mut response = Response::new(Full::new(Bytes::from(proxy.render_metrics())));
            response.headers_mut().insert(
                CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            response
        }
        ["backends", name, "weight"] if write => set_weight(proxy, name, request.into_body()).await,
        ["backends"] | ["backends", _] | ["metrics"] => not_allowed("GET, HEAD"),
        ["backends", _, "weight"] => not_allowed("PUT, POST"),
        _ => error(StatusCode::NOT_FOUND, "no such admin endpoint"),
    }
}

/// The answer refusing the call from `peer`, or `None` when it may go on: `expected` is the
/// configured token (`None`: no token, which lets calls in only on a loopback listener). A
/// wrong token is logged with the peer's address, never the token.
fn authorize(
    expected: Option<&AdminToken>,
    loopback: bool,
    peer: SocketAddr,
    headers: &HeaderMap,
) -> Option<Response<Full<Bytes>>> {
    let Some(expected) = expected else {
        if loopback {
            return None;
        }
        tracing::warn!(
            %peer,
            "the admin API is bound off loopback and the configuration in force has no admin \
             token: refusing every call (set --admin-token-file and reload)"
        );
        return Some(error(
            StatusCode::FORBIDDEN,
            "this admin API is not on a loopback address and has no token configured",
        ));
    };
    let challenge = |value: &'static str, message: &str| {
        let mut response = error(StatusCode::UNAUTHORIZED, message);
        response
            .headers_mut()
            .insert(WWW_AUTHENTICATE, HeaderValue::from_static(value));
        Some(response)
    };
    match bearer(headers) {
        None => challenge(
            CHALLENGE,
            "this admin API needs Authorization: Bearer TOKEN",
        ),
        Some(presented) if expected.matches(presented) => None,
        Some(_) => {
            tracing::warn!(%peer, "admin call with a wrong token refused");
            challenge(CHALLENGE_INVALID, "wrong admin token")
        }
    }
}

/// The credentials of an `Authorization: Bearer <token>` header (scheme case-insensitive).
fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    let value = headers.get(AUTHORIZATION)?.as_bytes();
    let space = value.iter().position(|b| *b == b' ')?;
    let (scheme, credentials) = value.split_at(space);
    let credentials = credentials.trim_ascii();
    (scheme.eq_ignore_ascii_case(b"bearer") && !credentials.is_empty()).then_some(credentials)
}

/// The answer refusing a write (any method but GET and HEAD) that may come from a cross-site
/// page: one with an `Origin` header (403) or without `Content-Type: application/json` (415);
/// `None` for the others.
fn cross_site_write(headers: &HeaderMap) -> Option<Response<Full<Bytes>>> {
    if headers.contains_key(ORIGIN) {
        return Some(error(
            StatusCode::FORBIDDEN,
            "admin writes refuse requests with an Origin header (no writes from web pages)",
        ));
    }
    let json = headers
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"));
    (!json).then(|| {
        error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "admin writes need Content-Type: application/json",
        )
    })
}

/// `PUT /backends/NAME/weight`: the body is the new weight, a JSON number.
async fn set_weight(proxy: &Proxy, name: &str, body: Incoming) -> Response<Full<Bytes>> {
    let Some(backend) = find(proxy, name) else {
        return unknown_backend(name);
    };
    let collected =
        tokio::time::timeout(READ_TIMEOUT, Limited::new(body, MAX_BODY_BYTES).collect());
    let bytes = match collected.await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.is::<LengthLimitError>() => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("body over {MAX_BODY_BYTES} bytes"),
            );
        }
        Ok(Err(_)) => return error(StatusCode::BAD_REQUEST, "cannot read the body"),
        Err(_) => return error(StatusCode::REQUEST_TIMEOUT, "body not received in time"),
    };
    let weight = serde_json::from_slice::<u32>(&bytes)
        .ok()
        .filter(|w| *w <= MAX_WEIGHT);
    let Some(weight) = weight else {
        return error(
            StatusCode::BAD_REQUEST,
            &format!("the body must be a weight, a JSON number 0..={MAX_WEIGHT}"),
        );
    };
    let old = backend.weight();
    backend.set_weight(weight);
    tracing::info!(backend = %backend.name, old, new = weight, "weight changed through the admin API");
    json(StatusCode::OK, &backend_json(&backend))
}

/// The backend named `name` (percent-decoded, for names such as `[::1]:8080`).
fn find(proxy: &Proxy, name: &str) -> Option<Arc<Backend>> {
    let name = crate::backend::decode_name(name)?;
    proxy.backends().into_iter().find(|b| b.name == name)
}

fn backend_json(backend: &Backend) -> serde_json::Value {
    serde_json::json!({
        "name": backend.name,
        "address": backend.authority,
        "weight": backend.weight(),
        "up": backend.is_up(),
        "active": backend.active(),
        "served": backend.served(),
    })
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    json(status, &serde_json::json!({ "error": message }))
}

fn unknown_backend(name: &str) -> Response<Full<Bytes>> {
    error(StatusCode::NOT_FOUND, &format!("no backend named {name:?}"))
}

fn not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut response = error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here");
    response
        .headers_mut()
        .insert(ALLOW, http::HeaderValue::from_static(allow));
    response
}
