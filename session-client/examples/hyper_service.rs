//! `SessionLayer` without axum: a plain `tower::service_fn` behind the layer, served by hyper.
//!
//! ```text
//! cargo run -p session-client --example hyper_service -- http://127.0.0.1:50051
//! curl -i -X POST http://<addr>/login     # Set-Cookie: sid=...
//! curl -i -b sid=<id> http://<addr>/me    # ann
//! ```
//!
//! The handler takes the request's session with `Session::from_request` (axum handlers extract
//! it instead); responses are `http::Response<String>`: any body with `Default` works.

use std::convert::Infallible;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use session_client::{ClientConfig, Session, SessionClient, SessionError, SessionLayer};
use tower::ServiceBuilder;

/// `POST /login` logs `ann` in, `POST /logout` logs out, anything else says who is logged in.
async fn handle(
    request: http::Request<hyper::body::Incoming>,
) -> Result<http::Response<String>, Infallible> {
    let Some(session) = Session::from_request(&request) else {
        return Ok(SessionError::MissingLayer.empty_response());
    };
    let answer = match (request.method().as_str(), request.uri().path()) {
        ("POST", "/login") => login(&session).await,
        ("POST", "/logout") => session.destroy().await.map(|()| "bye".to_owned()),
        _ => session
            .user_id()
            .await
            .map(|user| user.unwrap_or_else(|| "anonymous".into())),
    };
    Ok(match answer {
        Ok(body) => http::Response::new(body),
        Err(error) => error.empty_response(),
    })
}

/// Logs `ann` in under a new session id.
async fn login(session: &Session) -> Result<String, SessionError> {
    session.set_user("ann").await?;
    session.cycle_id().await?;
    let visits: u64 = session.get_or_insert_with("visits", || 0).await?;
    Ok(format!("hello ann ({visits} visits before)"))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "http://127.0.0.1:50051".into());
    let client = SessionClient::connect_lazy(ClientConfig::new(url))?;
    // Plain HTTP on localhost: no `Secure` cookie attribute.
    let service = ServiceBuilder::new()
        .layer(SessionLayer::new(client).with_secure(false))
        .service_fn(handle);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    eprintln!("listening on http://{}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let service = TowerToHyperService::new(service.clone());
        tokio::spawn(async move {
            if let Err(error) = Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                eprintln!("connection: {error}");
            }
        });
    }
}
