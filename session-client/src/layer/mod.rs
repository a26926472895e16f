//! The axum/tower layer: gives handlers a [`Session`] backed by the session server, with the
//! signed-cookie snapshot as a fallback when the store is unreachable.
//!
//! Per request: the session id comes from a cookie (`sid` by default). The session is loaded
//! lazily, on the first call that needs it, and saved once after the handler returns, only when
//! something changed, as an attribute-level patch (so two requests of one user that change
//! different keys do not erase each other's changes).
//!
//! # Fallback
//! With [`FallbackMode::OnOutage`] or [`FallbackMode::Always`] the layer also keeps a signed
//! snapshot of the session in a second cookie (`sid_snap`, see [`crate::cookie`]):
//! - store reachable: the store is the truth; the snapshot is rewritten when the session changes
//!   or half its life has passed (`on-outage`), or on every response (`always`);
//! - store unreachable: the session is served from the snapshot, changes are written into it
//!   (version bumped), and its expiry slides like the store's would; a login during the outage
//!   makes a session that lives only in the snapshot, under an id made here, with the ttl the
//!   server gave this layer's sessions (learned from its answers);
//! - store back but missing the session (it restarted empty, or the session was made during the
//!   outage), or holding an older version: the snapshot is pushed back with `Restore`, which the
//!   server refuses when the id was deleted (logout leaves a tombstone) and ignores when it holds
//!   a newer version.
//!
//! With [`FallbackMode::Off`] an unreachable store makes session calls fail with
//! [`SessionError::Unavailable`], which answers 503: never a silent logout.
//!
//! # Layout
//! As tower-sessions splits it:
//! - `service`: the tower plumbing: [`SessionLayer`], [`SessionService`], the request's cookies
//!   read in and the response's written out.
//! - `session`: the [`Session`] handlers get (its extractor, reads and writes with their change
//!   tracking).
//! - `fallback`: the state machine behind a session (load, save, store outage, `Restore` after
//!   recovery, logout), plain code that knows nothing of tower and returns the cookies to write
//!   as data.
//! - `backend`: the calls it makes to the store, as a trait that [`SessionClient`] implements,
//!   so the state machine is unit-tested against an in-memory fake.
//!
//! [`SessionClient`]: crate::SessionClient

use std::time::Duration;

use axum::response::{IntoResponse, Response};
use http::StatusCode;
use tower_cookies::cookie::SameSite;

use crate::client::ClientError;

mod backend;
mod fallback;
mod service;
mod session;
#[cfg(test)]
mod tests;

pub use service::{SessionLayer, SessionService};
pub use session::Session;

/// When the signed snapshot cookie is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FallbackMode {
    /// No snapshot: an unreachable store is a 503.
    Off,
    /// Snapshot kept fresh enough to survive an outage; read only when the store is unreachable
    /// or lost the session.
    OnOutage,
    /// As `OnOutage`, but the snapshot is rewritten on every response, so it is never older than
    /// the last request.
    Always,
}

/// Cookie names and attributes, and the fallback mode.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Name of the cookie holding the session id.
    pub cookie_name: String,
    /// Name of the cookie holding the signed snapshot.
    pub snapshot_cookie_name: String,
    /// `Secure` attribute; keep it on except for plain-HTTP localhost development.
    pub secure: bool,
    /// `HttpOnly` attribute: scripts cannot read the cookies.
    pub http_only: bool,
    /// `SameSite` attribute.
    pub same_site: SameSite,
    /// `Path` attribute.
    pub path: String,
    /// `Domain` attribute, if any.
    pub domain: Option<String>,
    /// Ttl for new sessions (`None`: the server's default).
    pub ttl: Option<Duration>,
    /// Fallback mode.
    pub fallback: FallbackMode,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            cookie_name: "sid".into(),
            snapshot_cookie_name: "sid_snap".into(),
            secure: true,
            http_only: true,
            same_site: SameSite::Lax,
            path: "/".into(),
            domain: None,
            ttl: None,
            fallback: FallbackMode::Off,
        }
    }
}

/// Why a session call failed.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The store is unreachable and no snapshot can stand in (503).
    #[error("session store unavailable")]
    Unavailable(#[source] ClientError),
    /// A value could not be (de)serialized as JSON (500).
    #[error("session value is not valid JSON for this type: {0}")]
    Value(#[from] serde_json::Error),
    /// The store refused or failed otherwise (500).
    #[error("session store error: {0}")]
    Store(#[source] ClientError),
    /// The handler asked for a `Session` on a route without [`SessionLayer`] (500).
    #[error("SessionLayer is not installed on this route")]
    MissingLayer,
}

impl IntoResponse for SessionError {
    fn into_response(self) -> Response {
        let status = match self {
            SessionError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        tracing::warn!(error = %self, "session error");
        (status, self.to_string()).into_response()
    }
}
