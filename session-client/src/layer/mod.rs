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
//! - store unreachable (connection refused, UNAVAILABLE; or timing out after it has not
//!   answered for [`SessionConfig::outage_grace`]): the session is served from the snapshot,
//!   changes are recorded in it as offline changes against the version the store last confirmed
//!   (its epoch and base version), and its expiry slides like the store's would, but never past
//!   [`SessionConfig::snapshot_max_age`] after the store's last confirmation; a login during the
//!   outage makes a session that lives only in the snapshot, under an id made here, with the
//!   ttl the server gave this layer's sessions (learned from its answers);
//! - a timeout while the store answered within the outage grace is a 503 with `Retry-After`
//!   ([`SessionError::TimedOut`]): a slow store is not a lost one;
//! - store back: offline changes are pushed with `Restore`. The store applies them as one patch
//!   when it still holds the base version; when it moved on (an administrator's change, another
//!   backend's), **the store wins**: the changes are dropped (logged, and counted by
//!   [`SessionLayer::dropped_offline_changes`]) and the stored session served. A session the
//!   store answers NOT_FOUND for in the snapshot's own epoch was deleted or expired: the
//!   snapshot is dropped, never restored, so a logout sticks. Only a store of another epoch
//!   (it lost its data) recreates a session from its snapshot.
//! - logout deletes the session and clears both cookies; during an outage the delete is
//!   remembered and made once the store answers again.
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
    /// How long past the store's last confirmation a snapshot may stand in
    /// (`--snapshot-max-age`): it bounds both how long an outage can last without logging
    /// anyone out and how long a snapshot copied before a logout could bring the session back
    /// into a store that lost its data. Also enforced on snapshots already issued.
    pub snapshot_max_age: Duration,
    /// A call that timed out counts as an outage (the snapshot stands in) only once the store
    /// has not answered for this long; before that it is a 503 with `Retry-After`.
    pub outage_grace: Duration,
}

/// How long the store may be silent before timeouts count as an outage, unless configured.
pub const DEFAULT_OUTAGE_GRACE: Duration = Duration::from_secs(5);

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
            snapshot_max_age: crate::cookie::DEFAULT_SNAPSHOT_MAX_AGE,
            outage_grace: DEFAULT_OUTAGE_GRACE,
        }
    }
}

/// Why a session call failed.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The store is unreachable and no snapshot can stand in (503).
    #[error("session store unavailable")]
    Unavailable(#[source] ClientError),
    /// The store did not answer in time, though it answered within the outage grace: a slow
    /// store, not a lost one (503 with `Retry-After: 1`; the snapshot is not trusted).
    #[error("session store timed out")]
    TimedOut(#[source] ClientError),
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
            SessionError::Unavailable(_) | SessionError::TimedOut(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        tracing::warn!(error = %self, "session error");
        let retry = matches!(self, SessionError::TimedOut(_));
        let mut response = (status, self.to_string()).into_response();
        if retry {
            response.headers_mut().insert(
                http::header::RETRY_AFTER,
                http::HeaderValue::from_static("1"),
            );
        }
        response
    }
}
