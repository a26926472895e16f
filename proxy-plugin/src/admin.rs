//! The admin API, on a listener of its own (`--admin-listen`, off by default) so that it is
//! never exposed on the client-facing address:
//!
//! - `GET /backends`: JSON array of `{name, address, weight, up, active, served}`;
//!   `GET /backends/NAME`: one of them.
//! - `GET /metrics`: Prometheus text.
//! - `PUT /backends/NAME/weight` (or `POST`) with a body such as `0` or `5`: changes the
//!   weight at run time (0..=1000; 0 drains the backend). 400 on a bad body, 404 on an unknown
//!   name. A reload rebuilds the backends from the configuration, which resets these weights.
//!
//! Anything else is 404 (405 for a known path with the wrong method).

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::backend::Backend;
use crate::config::MAX_WEIGHT;
use crate::proxy::Proxy;

/// Largest request body: a weight is a few digits, anything longer is a mistake or abuse.
const MAX_BODY_BYTES: usize = 1024;
/// Time a client gets to send a request head, and then its body.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Most admin connections at once: it serves operators and one scraper, not the public.
const MAX_CONNECTIONS: usize = 64;
/// Time open admin connections get to finish their request at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Serves the admin API on `listener` until `shutdown` resolves, then lets requests in progress
/// finish (briefly) and returns.
pub async fn serve_admin(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut connections = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(error) => {
                        // Out of file descriptors and the like: wait instead of spinning.
                        tracing::warn!(%error, "admin listener cannot accept");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if connections.len() >= MAX_CONNECTIONS {
                    tracing::warn!("too many admin connections; closing a new one");
                    continue;
                }
                let proxy = proxy.clone();
                let mut stop = stop_rx.clone();
                connections.spawn(async move {
                    let service = service_fn(move |request| {
                        let proxy = proxy.clone();
                        async move { Ok::<_, Infallible>(handle(&proxy, request).await) }
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
                        tracing::debug!(%error, "admin connection ended with an error");
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

/// Routes one request.
async fn handle(proxy: &Proxy, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = request.uri().path().to_owned();
    let segments: Vec<&str> = path.strip_prefix('/').unwrap_or(&path).split('/').collect();
    let method = request.method().clone();
    let read = method == Method::GET || method == Method::HEAD;
    let write = method == Method::PUT || method == Method::POST;
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

/// `PUT /backends/NAME/weight`: the body is the new weight.
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
    let weight = std::str::from_utf8(&bytes)
        .ok()
        .and_then(|text| text.trim().parse::<u32>().ok())
        .filter(|w| *w <= MAX_WEIGHT);
    let Some(weight) = weight else {
        return error(
            StatusCode::BAD_REQUEST,
            &format!("the body must be a weight, 0..={MAX_WEIGHT}"),
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
