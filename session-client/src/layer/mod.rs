//! The axum/tower layer: gives handlers a [`Session`] backed by the session server, with the
//! signed-cookie snapshot as a fallback when the store is unreachable.
//!
//! Per request: the session id comes from a cookie (`sid` by default), or a header (see
//! [`IdSource`]). The session is loaded lazily, on the first call that needs it, and saved once
//! after the handler returns, only when something changed, as an attribute-level patch (so two
//! requests of one user that change different keys do not erase each other's changes).
//!
//! Any tower service with `http::Response<B>` responses (`B: Default`) can sit behind the
//! layer, axum or not ([`SessionService`]; outside axum, handlers take the session with
//! [`Session::from_request`]).
//!
//! # Ids in a header
//! [`IdSource::Header`] (`x-session-token` by default) serves clients without a cookie jar: the
//! id is read from the header, a new id (login, regenerate) goes back in it, a logout answers it
//! empty. [`IdSource::Both`] reads the header first, then the cookie. The snapshot fallback
//! rides in cookies only: header-only sessions have none (an unreachable store is a 503).
//!
//! # Expiry
//! [`Expiry`] per layer ([`SessionConfig::expiry`]) or per session ([`Session::set_expiry`],
//! "remember me"): `BrowserSession` (an id cookie without `Max-Age`, the default),
//! `OnInactivity(d)` (store ttl `d`, cookie `Max-Age` in step with the store's expiry),
//! `AtDateTime(t)` (the store ends the session at `t`, cookie `Expires=t`). A persistent cookie
//! is sent again only when the session or its expiry changes, or half its life has passed
//! (the time it was sent is kept in the session under [`EXPIRY_ATTRIBUTE`]).
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
use http::{HeaderName, StatusCode};
use tower_cookies::cookie::SameSite;

use crate::client::ClientError;

mod backend;
mod expiry;
mod fallback;
mod service;
mod session;
#[cfg(test)]
mod tests;

pub use expiry::{EXPIRY_ATTRIBUTE, Expiry};
pub use service::{SessionLayer, SessionService};
pub use session::Session;

/// The header [`IdSource::header`] reads and writes the session id in.
pub const DEFAULT_ID_HEADER: &str = "x-session-token";

/// Where the session id travels between client and server.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum IdSource {
    /// In the id cookie ([`SessionConfig::cookie_name`]): browsers.
    #[default]
    Cookie,
    /// In a request header, for clients without a cookie jar (mobile apps, scripts, other
    /// services), as Spring's `HeaderHttpSessionIdResolver` does: the id is read from the
    /// request's header; a response that creates or regenerates the session carries the new id
    /// in the same header; a logout (or an id the store does not know) answers the header with
    /// an empty value. No id cookie is set.
    ///
    /// The snapshot fallback rides in cookies only, so it is off for header-only sessions: an
    /// unreachable store is a 503 ([`SessionError::Unavailable`]) for them.
    Header(HeaderName),
    /// The header first, then the cookie: one layer for browsers and API clients. A new id goes
    /// back where the request's came from (both, when the request sent none); the snapshot
    /// fallback works for cookie-borne ids only (a request with the id in the header gets no
    /// snapshot cookie).
    Both {
        /// The header.
        header: HeaderName,
    },
}

impl IdSource {
    /// [`IdSource::Header`] with [`DEFAULT_ID_HEADER`] (`x-session-token`).
    pub fn header() -> Self {
        IdSource::Header(HeaderName::from_static(DEFAULT_ID_HEADER))
    }

    /// [`IdSource::Both`] with [`DEFAULT_ID_HEADER`].
    pub fn both() -> Self {
        IdSource::Both {
            header: HeaderName::from_static(DEFAULT_ID_HEADER),
        }
    }

    /// The header the id is read from and written to, if any.
    pub fn header_name(&self) -> Option<&HeaderName> {
        match self {
            IdSource::Cookie => None,
            IdSource::Header(header) | IdSource::Both { header } => Some(header),
        }
    }

    /// Whether the id cookie is read and written.
    pub fn uses_cookie(&self) -> bool {
        !matches!(self, IdSource::Header(_))
    }
}

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
    /// Where the session id travels (cookie, header, or both).
    pub id_source: IdSource,
    /// How long sessions and their id cookie live, unless a handler chose otherwise for its
    /// session ([`Session::set_expiry`]).
    pub expiry: Expiry,
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
            id_source: IdSource::Cookie,
            expiry: Expiry::BrowserSession,
        }
    }
}

/// Builder methods, named as tower-sessions names them.
impl SessionConfig {
    /// Name of the id cookie (`sid` by default).
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.cookie_name = name.into();
        self
    }

    /// `Domain` attribute of both cookies.
    pub fn with_domain(mut self, domain: impl Into<String>) -> Self {
        self.domain = Some(domain.into());
        self
    }

    /// `Path` attribute of both cookies (`/` by default).
    pub fn with_path(mut self, path: impl Into<String>) -> Self {
        self.path = path.into();
        self
    }

    /// `SameSite` attribute of both cookies (`Lax` by default).
    pub fn with_same_site(mut self, same_site: SameSite) -> Self {
        self.same_site = same_site;
        self
    }

    /// `Secure` attribute of both cookies (on by default).
    pub fn with_secure(mut self, secure: bool) -> Self {
        self.secure = secure;
        self
    }

    /// `HttpOnly` attribute of both cookies (on by default).
    pub fn with_http_only(mut self, http_only: bool) -> Self {
        self.http_only = http_only;
        self
    }

    /// How long sessions and their id cookie live ([`Expiry`]; `BrowserSession` by default).
    pub fn with_expiry(mut self, expiry: Expiry) -> Self {
        self.expiry = expiry;
        self
    }

    /// Sliding ttl of new sessions in the store (`None`: the server's default).
    pub fn with_ttl(mut self, ttl: Option<Duration>) -> Self {
        self.ttl = ttl;
        self
    }

    /// Name of the snapshot cookie (`sid_snap` by default).
    pub fn with_snapshot_cookie_name(mut self, name: impl Into<String>) -> Self {
        self.snapshot_cookie_name = name.into();
        self
    }

    /// Fallback mode (needs a [`crate::cookie::CookieCodec`] for anything but `Off`).
    pub fn with_fallback(mut self, fallback: FallbackMode) -> Self {
        self.fallback = fallback;
        self
    }

    /// Where the session id travels ([`IdSource`]).
    pub fn with_id_source(mut self, id_source: IdSource) -> Self {
        self.id_source = id_source;
        self
    }

    /// [`SessionConfig::snapshot_max_age`].
    pub fn with_snapshot_max_age(mut self, max_age: Duration) -> Self {
        self.snapshot_max_age = max_age;
        self
    }

    /// [`SessionConfig::outage_grace`].
    pub fn with_outage_grace(mut self, grace: Duration) -> Self {
        self.outage_grace = grace;
        self
    }
}

/// Why a session call failed. Every variant answers with a status of its own when returned
/// from a handler (`IntoResponse`), and the layer answers so itself when the save after the
/// handler fails (then with an empty body):
///
/// | variant | status | meaning |
/// |---|---|---|
/// | [`Unavailable`](SessionError::Unavailable) | 503 | store unreachable, no snapshot to stand in |
/// | [`TimedOut`](SessionError::TimedOut) | 503, `Retry-After: 1` | store slow, not lost |
/// | [`Value`](SessionError::Value) | 500 | a value is not valid JSON for the type asked |
/// | [`Store`](SessionError::Store) | 500 | the store refused the call (a bad token, say) |
/// | [`MissingLayer`](SessionError::MissingLayer) | 500 | no [`SessionLayer`] on the route |
///
/// With a handler's `IntoResponse` the body is the error's text (never a session id, but a
/// `Value` error may quote part of the malformed value: map the error yourself to hide it);
/// the layer's own answers, and [`SessionError::empty_response`], have an empty body.
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

impl SessionError {
    /// The status this error answers with (see the table above).
    pub fn status(&self) -> StatusCode {
        match self {
            SessionError::Unavailable(_) | SessionError::TimedOut(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            SessionError::Value(_) | SessionError::Store(_) | SessionError::MissingLayer => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    /// `Retry-After` seconds, when the client should simply try again.
    pub fn retry_after(&self) -> Option<u32> {
        matches!(self, SessionError::TimedOut(_)).then_some(1)
    }

    /// The error as a response with an empty body of any type (the layer's own answer, for any
    /// tower service).
    pub fn empty_response<B: Default>(&self) -> http::Response<B> {
        tracing::warn!(error = %self, "session error");
        let mut response = http::Response::new(B::default());
        *response.status_mut() = self.status();
        if let Some(secs) = self.retry_after() {
            response
                .headers_mut()
                .insert(http::header::RETRY_AFTER, http::HeaderValue::from(secs));
        }
        response
    }
}

impl IntoResponse for SessionError {
    fn into_response(self) -> Response {
        tracing::warn!(error = %self, "session error");
        let mut response = (self.status(), self.to_string()).into_response();
        if let Some(secs) = self.retry_after() {
            response
                .headers_mut()
                .insert(http::header::RETRY_AFTER, http::HeaderValue::from(secs));
        }
        response
    }
}
