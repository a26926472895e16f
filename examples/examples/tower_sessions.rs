//! An axum app on `tower-sessions`, with its sessions in Stickless: the one line that differs
//! from the `MemoryStore` version is marked. Run a session server, then
//! `STICKLESS_URL=http://127.0.0.1:50051 cargo run -p stickless-examples --example tower_sessions`
//! and `curl -c jar -b jar http://127.0.0.1:3000/` a few times: the count survives a restart
//! of the app, and any instance of it behind a load balancer sees the same session.

use axum::{Router, routing::get};
use session_client::{ClientConfig, SessionClient};
use tower_sessions::cookie::time::Duration;
use tower_sessions::{Expiry, Session, SessionManagerLayer};
use tower_sessions_stickless::SticklessStore;

/// Counts the visits of one browser.
async fn counter(session: Session) -> Result<String, (axum::http::StatusCode, String)> {
    let failed = |e: tower_sessions::session::Error| {
        (axum::http::StatusCode::SERVICE_UNAVAILABLE, e.to_string())
    };
    let visits: u64 = session.get("visits").await.map_err(failed)?.unwrap_or(0) + 1;
    session.insert("visits", visits).await.map_err(failed)?;
    Ok(format!("visit number {visits}\n"))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("STICKLESS_URL").unwrap_or_else(|_| "http://127.0.0.1:50051".into());
    let mut config = ClientConfig::new(url);
    config.namespace = "tower-example".into();

    // Before: let store = tower_sessions::MemoryStore::default();
    let store = SticklessStore::new(SessionClient::connect_lazy(config)?);

    let sessions = SessionManagerLayer::new(store)
        .with_secure(false)
        .with_expiry(Expiry::OnInactivity(Duration::minutes(30)));
    let app = Router::new().route("/", get(counter)).layer(sessions);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    eprintln!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
