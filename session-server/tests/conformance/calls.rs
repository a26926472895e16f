//! The calls every conformance body makes: start a server on the store under test, and short
//! forms of the gRPC requests.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use session_proto::v1::session_store_client::SessionStoreClient;
use session_proto::v1::{CreateRequest, GetRequest, Session, UpdateRequest};
use session_server::config::Settings;
use tonic::transport::Channel;

use crate::support::harness::{Backend, TestServer};

/// A client of the server under test.
pub type Client = SessionStoreClient<Channel>;

/// Attributes from string pairs.
pub fn attrs(pairs: &[(&str, &str)]) -> HashMap<String, Vec<u8>> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .collect()
}

/// A ttl as the protocol carries it.
pub fn ttl(d: Duration) -> Option<prost_types::Duration> {
    Some(d.try_into().unwrap())
}

/// When `session` expires, as the server said.
pub fn expires_at(session: &Session) -> SystemTime {
    SystemTime::try_from(session.expires_at.unwrap()).unwrap()
}

/// How long until `session` expires, as the server said (zero once past).
pub fn expires_in(session: &Session) -> Duration {
    expires_at(session)
        .duration_since(SystemTime::now())
        .unwrap_or_default()
}

/// Creates a session; `t` is its ttl (`None`: the server's default).
pub async fn create(
    client: &mut Client,
    ns: &str,
    user: &str,
    pairs: &[(&str, &str)],
    t: Option<Duration>,
) -> Session {
    client
        .create(CreateRequest {
            namespace: ns.into(),
            user_id: user.into(),
            attrs: attrs(pairs),
            ttl: t.and_then(ttl),
            max_lifetime: Default::default(),
        })
        .await
        .expect("create")
        .into_inner()
}

/// Reads a session without touching it.
pub async fn get(client: &mut Client, ns: &str, id: &str) -> Result<Session, tonic::Status> {
    client
        .get(GetRequest {
            namespace: ns.into(),
            id: id.into(),
            touch: false,
            bypass_cache: false,
        })
        .await
        .map(|r| r.into_inner())
}

/// An update that sets `pairs`.
pub fn set(ns: &str, id: &str, pairs: &[(&str, &str)]) -> UpdateRequest {
    UpdateRequest {
        namespace: ns.into(),
        id: id.into(),
        set: attrs(pairs),
        ..Default::default()
    }
}

/// A server with default settings on `backend`, and a client; `None` when skipped.
pub async fn start(backend: Backend, test: &str) -> Option<(TestServer, Client)> {
    start_with(backend, test, Settings::default()).await
}

/// A server with `settings` on `backend`, and a client; `None` when skipped.
pub async fn start_with(
    backend: Backend,
    test: &str,
    settings: Settings,
) -> Option<(TestServer, Client)> {
    let server = TestServer::on(backend, test, settings).await?;
    let client = server.client().await;
    Some((server, client))
}
