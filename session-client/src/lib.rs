//! `session-client`: the crate Stickless backends call, so that any backend can serve any
//! request of a logged-in user and a store outage does not log anyone out.
//!
//! Three lines put sessions into an axum app (a client, a layer, handlers that take a
//! [`Session`]):
//!
//! ```no_run
//! use axum::{Router, routing::get};
//! use session_client::{ClientConfig, Session, SessionClient, SessionError, SessionLayer};
//!
//! async fn me(session: Session) -> Result<String, SessionError> {
//!     Ok(session.user_id().await?.unwrap_or_else(|| "anonymous".into()))
//! }
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let client = SessionClient::connect_lazy(ClientConfig::new("http://127.0.0.1:50051"))?;
//! let app = Router::new().route("/me", get(me)).layer(SessionLayer::new(client));
//! axum::serve(tokio::net::TcpListener::bind("127.0.0.1:3000").await?, app).await?;
//! # Ok(()) }
//! ```
//!
//! With the signed-cookie fallback, sessions survive a store outage:
//!
//! ```no_run
//! use session_client::cookie::{CookieCodec, CookieKey, Encryption, KeyRing};
//! use session_client::{ClientConfig, FallbackMode, SessionClient, SessionConfig, SessionLayer};
//!
//! # fn build() -> Result<SessionLayer, Box<dyn std::error::Error>> {
//! let keys = KeyRing::new(vec![CookieKey::new(b"32 bytes or more of secret material!")?])?;
//! let codec = CookieCodec::new(keys, Encryption::Aes256Gcm);
//! let config = SessionConfig { fallback: FallbackMode::OnOutage, ..SessionConfig::default() };
//! let client = SessionClient::connect_lazy(ClientConfig::new("http://127.0.0.1:50051"))?;
//! Ok(SessionLayer::with_config(client, Some(codec), config))
//! # }
//! ```
//!
//! # Layout
//! - [`client`]: [`SessionClient`], the typed gRPC client (a channel per server, timeouts, retries of
//!   idempotent calls, errors told apart).
//! - [`endpoints`]: several session servers as one store: power of two choices over the healthy
//!   ones, ejection of an unreachable one and `grpc.health.v1` probes to take it back, DNS names
//!   resolved to every address and re-resolved.
//! - [`cookie`]: [`cookie::CookieCodec`], the signed (optionally sealed) snapshot cookie with key
//!   rotation, and the one snapshot policy its every writer follows ([`cookie::Snapshot`]).
//! - [`layer`]: [`SessionLayer`] and the [`Session`] extractor for axum/tower, with the fallback
//!   modes (tower plumbing, the session API and the fallback state machine apart).
//! - [`tls`]: [`ClientTls`], the CA bundle and client identity of an `https://` session server
//!   (an `https://` URL is always TLS; `http://` is cleartext and refuses TLS settings).
//! - [`watch`]: [`SessionClient::watch`], session events as a typed stream that subscribes again
//!   by itself and says when events may have been missed.

pub mod client;
pub mod cookie;
pub mod endpoints;
pub mod layer;
pub mod outage;
pub mod tls;
pub mod watch;

pub use client::{
    ClientConfig, ClientError, EPOCH_METADATA, NewSession, Patch, RestoreRequest, SessionClient,
    SessionData, SessionPage, new_write_id,
};
pub use endpoints::EndpointState;
pub use layer::{
    DEFAULT_ID_HEADER, DEFAULT_OUTAGE_GRACE, EXPIRY_ATTRIBUTE, Expiry, FallbackMode, IdSource,
    Session, SessionConfig, SessionError, SessionLayer, SessionService,
};
pub use outage::OutageGrace;
pub use tls::{ClientIdentity, ClientTls};
pub use watch::{EventKind, MissedReason, SessionEvent, WatchEvent, WatchStream};
