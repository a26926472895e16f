//! The session-lookup plugin: a request filter (pingora's `request_filter` hook) run before a
//! backend is picked, so backends get the session without any session code.
//!
//! On every request, plugin on or off, it first strips each `x-session-*` header the client
//! sent: those headers are the proxy's word, and a client must never be able to claim a user.
//! With the plugin on ([`LookupConfig`]), it then reads the session cookie, fetches the session
//! through one shared [`SessionClient`] (`get(id, touch = true)`, so a request slides the expiry
//! like a backend would) and sets:
//!
//! | header | value |
//! |---|---|
//! | `x-session-id` | the session id |
//! | `x-session-user` | the user id (absent for anonymous sessions) |
//! | `x-session-attr-<name>` | each configured attribute present, base64 (standard alphabet, padded), since attributes are bytes |
//! | `x-session-degraded` | `1` when the session comes from its snapshot cookie (store unreachable, see below) |
//!
//! No cookie, a malformed id or an unknown session: the request goes on without session
//! headers. Store unreachable (or not answering within `timeout`), and no snapshot to stand in:
//! [`LookupFailure::Open`] forwards without session headers, [`LookupFailure::Closed`] answers
//! 503. Nothing is cached: a logout is seen by the very next request.
//!
//! # Outage fallback: the snapshot cookie
//! With snapshot keys configured ([`LookupConfig::snapshot_keys`]) the plugin keeps a signed
//! snapshot of the session in a second cookie (`sid_snap` by default), in `session-client`'s
//! format ([`session_client::cookie`]) and by the rule its layer follows in `OnOutage` mode:
//! - **Store reachable, session found**: the plugin's response filter ([`ResponseFilter`]) sets
//!   the snapshot cookie (`Path=/; HttpOnly; SameSite=Lax`, and `Secure` when the request came
//!   over TLS, as the proxy's `X-Forwarded-Proto` says) when the request's is missing,
//!   invalid, of another session or version, or past half its life; a fresh one is left alone,
//!   so a user gets a new snapshot about twice a ttl, not on every response. It snapshots the
//!   session as the lookup saw it: a change the backend makes in that request is taken up by
//!   the next one (the version differs). Snapshots are sealed (AES-256-GCM): the client cannot
//!   read the attributes. A response that sets the session cookie (login) or the snapshot
//!   cookie itself (a backend keeping its own snapshot) is left alone. A session too large for
//!   a 4096-byte cookie gets no snapshot (a stale one the client sent is expired).
//! - **Logout**: a response that clears the session cookie (its `Set-Cookie` has an empty
//!   value, `Max-Age=0` or an `Expires` in the past, see `lookup/set_cookie.rs`) also gets the
//!   snapshot cookie expired (same attributes, `Max-Age=0`) unless the backend expires or sets
//!   it itself, whatever the lookup found, and never a fresh snapshot: every session cookie
//!   leaves the browser together. The sticky balancer's cookie is left alone: it pins a
//!   backend, not a user, and holds nothing of the session.
//! - **Store unreachable** (down, or no answer within `timeout`): a valid snapshot of the
//!   session the session cookie names stands in for it: its id, user and configured attributes
//!   become the headers, plus `x-session-degraded: 1`, and the request is forwarded whatever
//!   `on_failure` says (a valid snapshot is a session). Its expiry slides as the store's would
//!   (rewritten once past half its life). Without a valid snapshot, `on_failure` applies.
//! - **Store reachable, session missing** (logged out, expired): the snapshot is never trusted,
//!   whatever it says, and the client's is expired: this is what makes a logout stick.
//!
//! A snapshot counts only when its HMAC verifies (constant time), it has not expired, and its
//! session id and namespace are those of the request's session cookie and this plugin: a
//! forged, altered, expired or foreign one is ignored.
//!
//! **The proxy and the backends must share the key material**: the same bytes, signing key
//! first, in `--session-snapshot-key` here and `demo-app --cookie-key` (a `session-client`
//! [`KeyRing`]) there. Key ids derive from the material ([`CookieKey::new`]), so each side
//! verifies what the other signed; with different keys each ignores (and overwrites) the
//! other's snapshots. When the store answers NOT_FOUND for a session whose request carries a
//! valid snapshot, the proxy pushes the snapshot back with `Restore` (as `session-client`'s
//! layer does); the server refuses ids deleted less than one ttl ago (logout tombstones).
//! Limits: nothing yet tells a session the store lost (a restart of a memory store) from one
//! deleted or expired longer ago than that, so such a session's snapshot, replayed, is
//! restored (issue 12's store epoch closes this); a session deleted in the store behind its
//! user's back (`DeleteByUser`) stays usable through its snapshot during an outage that begins
//! before that user's next request, until the snapshot expires.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use futures::future::BoxFuture;
use http::header::{HeaderName, SET_COOKIE};
use http::{HeaderMap, HeaderValue};
use session_client::cookie::{
    CookieCodec, CookieError, CookieKey, Encryption, KeyRing, Snapshot, fits_in_cookie, unix_ms,
};
use session_client::{ClientConfig, ClientError, SessionClient, SessionData};

use crate::config::{LookupConfig, LookupFailure};
use crate::cookie::cookie_values;
use crate::metrics::{ProxyMetrics, RejectReason};
use crate::proxy::{RequestFilter, ResponseFilter};

mod set_cookie;
use set_cookie::{clears_cookie, sets_cookie};

/// Prefix of every header this plugin owns.
const SESSION_HEADER_PREFIX: &str = "x-session-";
/// Set (to `1`) when the session comes from its snapshot because the store is unreachable.
const DEGRADED_HEADER: HeaderName = HeaderName::from_static("x-session-degraded");
/// Longest cookie value sent to the store as an id: real ids are 32 characters; anything much
/// longer is garbage not worth a round trip.
const MAX_ID_LEN: usize = 128;

/// Why the plugin cannot be built from its config.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    /// The session server URL or token is unusable.
    #[error("session client: {0}")]
    Client(#[source] ClientError),
    /// An attribute name that cannot be part of a header name.
    #[error("attribute {0:?} cannot be used in a header name")]
    AttrName(String),
    /// An empty cookie name.
    #[error("the session cookie name is empty")]
    CookieName,
    /// A snapshot key refused (shorter than 32 bytes) or two with the same id.
    #[error("session snapshot keys: {0}")]
    SnapshotKeys(#[source] CookieError),
    /// An empty snapshot cookie name, or the session cookie's.
    #[error(
        "the session snapshot cookie name must be non-empty and differ from the session cookie"
    )]
    SnapshotCookie,
}

/// The plugin; with no config it only strips client-sent `x-session-*` headers.
#[derive(Debug)]
pub struct SessionLookup {
    /// The lookup itself, when on.
    plugin: Option<Plugin>,
    /// Lookup outcomes are counted here.
    metrics: ProxyMetrics,
}

/// An enabled plugin.
#[derive(Debug)]
struct Plugin {
    /// Its settings (kept to compare on reload).
    config: LookupConfig,
    /// The one client every request shares (one HTTP/2 connection).
    client: SessionClient,
    /// Configured attribute names with their header names, built once.
    attrs: Vec<(String, HeaderName)>,
    /// The snapshot cookie, when keys are configured; shared with the response filters of
    /// requests in flight.
    snapshots: Option<Arc<Snapshots>>,
}

/// The snapshot-cookie side of the plugin.
#[derive(Debug)]
struct Snapshots {
    /// Signs (and seals) with the first key, verifies with every key.
    codec: CookieCodec,
    /// Name of the snapshot cookie.
    cookie: String,
    /// Name of the session cookie: a response setting it changed the session, so its snapshot
    /// is left to the next request.
    session_cookie: String,
    /// Namespace written into snapshots and required of them.
    namespace: String,
}

/// A request's snapshot cookie, as far as the session it names is concerned.
enum Sent {
    /// No snapshot cookie.
    Absent,
    /// One that is not a valid snapshot of this session (forged, altered, expired, another
    /// session or namespace, an unknown key).
    Invalid,
    /// A valid snapshot of this session.
    Valid(Snapshot),
}

/// The plugin's response filter for one request: the snapshot cookie to set, or to expire.
#[derive(Debug)]
struct SnapshotUpdate {
    /// Codec and cookie names.
    snapshots: Arc<Snapshots>,
    /// What to do with the snapshot cookie when the response leaves the session cookie alone.
    action: SnapshotAction,
    /// Whether the request carried a snapshot cookie (expired when no new one can be made).
    sent: bool,
    /// The request came over TLS: the cookie is `Secure`.
    secure: bool,
}

/// What a [`SnapshotUpdate`] does when the response neither clears nor sets the session cookie
/// (a response clearing it, a logout, always gets the snapshot cookie expired).
#[derive(Debug)]
enum SnapshotAction {
    /// Nothing: the request's snapshot is fine.
    Keep,
    /// Sets a snapshot of this session (issued-at set when encoded).
    Set(Snapshot),
    /// Expires the client's.
    Expire,
}

impl SessionLookup {
    /// The plugin for `config` (`None`: strip only). Must be called in a tokio runtime (the
    /// client connects lazily, on first use).
    pub fn new(config: Option<&LookupConfig>, metrics: ProxyMetrics) -> Result<Self, LookupError> {
        let plugin = match config {
            None => None,
            Some(config) => Some(Plugin::new(config)?),
        };
        Ok(SessionLookup { plugin, metrics })
    }

    /// The settings it runs with (`None`: strip only).
    pub fn config(&self) -> Option<&LookupConfig> {
        self.plugin.as_ref().map(|p| &p.config)
    }

    /// Strips client-sent session headers, then (when on) adds the session's; returns the
    /// response filter that keeps the snapshot cookie up to date, when one is needed.
    pub async fn apply(
        &self,
        headers: &mut HeaderMap,
    ) -> Result<Option<Box<dyn ResponseFilter>>, RejectReason> {
        strip_session_headers(headers);
        let Some(plugin) = &self.plugin else {
            return Ok(None);
        };
        let secure = crate::proxy::forwarded_https(headers);
        let update = self.lookup(plugin, headers, secure).await?.or_else(|| {
            // A request carrying a snapshot cookie always gets the filter, so that a logout
            // response (clearing the session cookie) expires that cookie too.
            let snapshots = plugin.snapshots.as_ref()?;
            cookie_values(headers, &snapshots.cookie).next()?;
            Some(snapshots.update(SnapshotAction::Keep, true, secure))
        });
        Ok(update.map(|update| Box::new(update) as Box<dyn ResponseFilter>))
    }

    /// Looks the session up and sets its headers; returns what to do with the snapshot cookie.
    async fn lookup(
        &self,
        plugin: &Plugin,
        headers: &mut HeaderMap,
        secure: bool,
    ) -> Result<Option<SnapshotUpdate>, RejectReason> {
        let Some(id) = cookie_values(headers, &plugin.config.cookie).next() else {
            self.metrics.lookup("no_cookie");
            return Ok(None);
        };
        if !plausible_id(id) {
            self.metrics.lookup("malformed");
            tracing::debug!("session cookie is not a session id; forwarding without session");
            return Ok(None);
        }
        let id = id.to_owned();
        let result = tokio::time::timeout(plugin.config.timeout, plugin.client.get(&id, true))
            .await
            .unwrap_or_else(|_| {
                Err(ClientError::Unavailable(format!(
                    "no answer within {:?}",
                    plugin.config.timeout
                )))
            });
        let snapshots = plugin.snapshots.as_ref();
        match result {
            Ok(session) => {
                self.metrics.lookup("found");
                plugin.set_headers(headers, &session.id, &session.user_id, |name| {
                    session.attrs.get(name)
                });
                Ok(snapshots.and_then(|s| s.refresh(headers, &session, secure)))
            }
            Err(ClientError::NotFound)
                if let Some(restored) = self.restore(plugin, headers, &id).await =>
            {
                self.metrics.lookup("restored");
                plugin.set_headers(headers, &restored.id, &restored.user_id, |name| {
                    restored.attrs.get(name)
                });
                Ok(snapshots.and_then(|s| s.refresh(headers, &restored, secure)))
            }
            Err(ClientError::NotFound | ClientError::Invalid(_)) => {
                self.metrics.lookup("missing");
                Ok(snapshots.and_then(|s| s.expire(headers, secure)))
            }
            Err(error) => {
                if error.is_unavailable()
                    && let Some(snapshots) = snapshots
                    && let Sent::Valid(snapshot) = snapshots.sent(headers, &id)
                {
                    self.metrics.lookup("snapshot");
                    tracing::warn!(%error, "session lookup failed; session served from its snapshot cookie");
                    plugin.set_headers(headers, &snapshot.id, &snapshot.user_id, |name| {
                        snapshot.attrs.get(name)
                    });
                    headers.insert(DEGRADED_HEADER, HeaderValue::from_static("1"));
                    return Ok(snapshots.slide(snapshot, secure));
                }
                match plugin.config.on_failure {
                    LookupFailure::Open => {
                        self.metrics.lookup("failed_open");
                        tracing::warn!(%error, "session lookup failed; forwarding without session (fail-open)");
                        Ok(None)
                    }
                    LookupFailure::Closed => {
                        self.metrics.lookup("failed_closed");
                        tracing::warn!(%error, "session lookup failed; answering 503 (fail-closed)");
                        Err(RejectReason::LookupFailed)
                    }
                }
            }
        }
    }
}

impl SessionLookup {
    /// The store does not have the session (it restarted empty, or lost it): pushes the
    /// request's valid snapshot back with `Restore`, as session-client's layer does. The server
    /// refuses ids deleted less than one ttl ago (logout tombstones), so a logged-out session
    /// never comes back; `None` then, or when there is no valid snapshot or the call fails.
    async fn restore(&self, plugin: &Plugin, headers: &HeaderMap, id: &str) -> Option<SessionData> {
        let Sent::Valid(snapshot) = plugin.snapshots.as_ref()?.sent(headers, id) else {
            return None;
        };
        let data = snapshot.into_session();
        match tokio::time::timeout(plugin.config.timeout, plugin.client.restore(data)).await {
            Ok(Ok(session)) => Some(session),
            Ok(Err(error)) => {
                tracing::info!(%error, "session snapshot not restored");
                None
            }
            Err(_) => {
                tracing::warn!("session restore did not answer in time");
                None
            }
        }
    }
}

impl RequestFilter for SessionLookup {
    fn request_filter<'a>(
        &'a self,
        head: &'a mut http::request::Parts,
    ) -> BoxFuture<'a, Result<Option<Box<dyn ResponseFilter>>, RejectReason>> {
        if self.plugin.is_none() {
            // Off: stripping is all there is, done now; the ready future is a few bytes.
            strip_session_headers(&mut head.headers);
            return Box::pin(std::future::ready(Ok(None)));
        }
        Box::pin(self.apply(&mut head.headers))
    }
}

impl Plugin {
    fn new(config: &LookupConfig) -> Result<Self, LookupError> {
        if config.cookie.trim().is_empty() {
            return Err(LookupError::CookieName);
        }
        let attrs = config
            .attrs
            .iter()
            .map(|name| {
                HeaderName::try_from(format!(
                    "{SESSION_HEADER_PREFIX}attr-{}",
                    name.to_ascii_lowercase()
                ))
                .map(|header| (name.clone(), header))
                .map_err(|_| LookupError::AttrName(name.clone()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let snapshots = if config.snapshot_keys.is_empty() {
            None
        } else {
            Some(Arc::new(Snapshots::new(config)?))
        };
        let client = SessionClient::connect_lazy(ClientConfig {
            endpoint: config.session_server.clone(),
            tls: config.tls.clone(),
            namespace: config.namespace.clone(),
            auth_token: config.auth_token.clone(),
            timeout: config.timeout,
            connect_timeout: config.timeout,
            // A request waits for the lookup: one bounded try, no backoff. The lazy channel
            // reconnects by itself for the next request.
            retries: 0,
            backoff: std::time::Duration::ZERO,
        })
        .map_err(LookupError::Client)?;
        Ok(Plugin {
            config: config.clone(),
            client,
            attrs,
            snapshots,
        })
    }

    /// Sets the session headers from a session (store or snapshot): its id, user and the
    /// configured attributes `attr` finds.
    fn set_headers<'s>(
        &self,
        headers: &mut HeaderMap,
        id: &str,
        user_id: &str,
        attr: impl Fn(&str) -> Option<&'s Vec<u8>>,
    ) {
        if let Ok(id) = HeaderValue::from_str(id) {
            headers.insert(HeaderName::from_static("x-session-id"), id);
        }
        if !user_id.is_empty() {
            match HeaderValue::from_bytes(user_id.as_bytes()) {
                Ok(user) => {
                    headers.insert(HeaderName::from_static("x-session-user"), user);
                }
                Err(_) => {
                    tracing::warn!("session user id is not a valid header value; not forwarded")
                }
            }
        }
        for (name, header) in &self.attrs {
            if let Some(value) = attr(name) {
                let encoded = base64::engine::general_purpose::STANDARD.encode(value);
                if let Ok(value) = HeaderValue::from_str(&encoded) {
                    headers.insert(header.clone(), value);
                }
            }
        }
    }
}

impl Snapshots {
    fn new(config: &LookupConfig) -> Result<Self, LookupError> {
        let cookie = config.snapshot_cookie.trim();
        if cookie.is_empty() || cookie == config.cookie.trim() {
            return Err(LookupError::SnapshotCookie);
        }
        let keys = config
            .snapshot_keys
            .iter()
            .map(|key| CookieKey::new(&key.0))
            .collect::<Result<Vec<_>, _>>()
            .map_err(LookupError::SnapshotKeys)?;
        let ring = KeyRing::new(keys).map_err(LookupError::SnapshotKeys)?;
        Ok(Snapshots {
            codec: CookieCodec::new(ring, Encryption::Aes256Gcm),
            cookie: cookie.to_owned(),
            session_cookie: config.cookie.clone(),
            namespace: config.namespace.clone(),
        })
    }

    /// The request's snapshot cookie, checked against session `id`.
    fn sent(&self, headers: &HeaderMap, id: &str) -> Sent {
        let Some(value) = cookie_values(headers, &self.cookie).next() else {
            return Sent::Absent;
        };
        match self.codec.decode_for(value, id, &self.namespace) {
            Some(snapshot) => Sent::Valid(snapshot),
            None => Sent::Invalid,
        }
    }

    /// Whether the request's snapshot cookie is signed with the current signing key (so one
    /// signed by a key rotating out is re-issued at once, not only at half its life).
    fn sent_is_current(&self, headers: &HeaderMap) -> bool {
        cookie_values(headers, &self.cookie)
            .next()
            .is_some_and(|value| self.codec.is_current(value))
    }

    /// Store reachable, session found: a new snapshot unless the request's is fresh (same
    /// version, more than half its life left, signed with the current key). `secure`: the
    /// request came over TLS.
    fn refresh(
        self: &Arc<Self>,
        headers: &HeaderMap,
        session: &SessionData,
        secure: bool,
    ) -> Option<SnapshotUpdate> {
        let sent = match self.sent(headers, &session.id) {
            Sent::Valid(old)
                if old.is_up_to_date(
                    &session.id,
                    session.version,
                    session.ttl,
                    SystemTime::now(),
                ) && self.sent_is_current(headers) =>
            {
                return None;
            }
            Sent::Absent => false,
            Sent::Invalid | Sent::Valid(_) => true,
        };
        // Issued-at is set when the response filter encodes it.
        let snapshot = Snapshot::from_session(session, &self.namespace, UNIX_EPOCH);
        Some(self.update(SnapshotAction::Set(snapshot), sent, secure))
    }

    /// Store unreachable, session served from `snapshot`: its expiry slides as the store's
    /// would, written out once past half its life.
    fn slide(self: &Arc<Self>, mut snapshot: Snapshot, secure: bool) -> Option<SnapshotUpdate> {
        let now = SystemTime::now();
        if snapshot.is_fresh(snapshot.ttl(), now) {
            return None;
        }
        snapshot.slide(now);
        Some(self.update(SnapshotAction::Set(snapshot), true, secure))
    }

    /// Store reachable, session missing: the client's snapshot cookie, if any, is expired.
    fn expire(self: &Arc<Self>, headers: &HeaderMap, secure: bool) -> Option<SnapshotUpdate> {
        cookie_values(headers, &self.cookie).next()?;
        Some(self.update(SnapshotAction::Expire, true, secure))
    }

    fn update(
        self: &Arc<Self>,
        action: SnapshotAction,
        sent: bool,
        secure: bool,
    ) -> SnapshotUpdate {
        SnapshotUpdate {
            snapshots: self.clone(),
            action,
            sent,
            secure,
        }
    }
}

impl ResponseFilter for SnapshotUpdate {
    fn response_filter(self: Box<Self>, head: &mut http::response::Parts) {
        let snapshots = &self.snapshots;
        let name = &snapshots.cookie;
        if sets_cookie(&head.headers, name) {
            // The backend keeps (or expires) the snapshot itself.
            return;
        }
        let secure = if self.secure { "; Secure" } else { "" };
        let expired = || format!("{name}=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax{secure}");
        let session_cookie = &snapshots.session_cookie;
        let cookie = if clears_cookie(&head.headers, session_cookie, SystemTime::now()) {
            // A logout: the snapshot goes with the session cookie, so no browser keeps a
            // snapshot of a session its user ended.
            expired()
        } else if sets_cookie(&head.headers, session_cookie) {
            // A new session (login): its snapshot is left to the next request.
            return;
        } else {
            match self.action {
                SnapshotAction::Keep => return,
                SnapshotAction::Expire => expired(),
                SnapshotAction::Set(mut snapshot) => {
                    snapshot.issued_at_ms = unix_ms(SystemTime::now());
                    match snapshots.codec.encode(&snapshot) {
                        Ok(value) if fits_in_cookie(name, &value) => {
                            format!("{name}={value}; Path=/; HttpOnly; SameSite=Lax{secure}")
                        }
                        Ok(_) | Err(_) => {
                            tracing::info!("session too large for a snapshot cookie: none set");
                            if !self.sent {
                                return;
                            }
                            expired()
                        }
                    }
                }
            }
        };
        if let Ok(value) = HeaderValue::from_str(&cookie) {
            head.headers.append(SET_COOKIE, value);
        }
    }
}

/// Removes every `x-session-*` header.
fn strip_session_headers(headers: &mut HeaderMap) {
    let names: Vec<HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().starts_with(SESSION_HEADER_PREFIX))
        .cloned()
        .collect();
    for name in names {
        headers.remove(&name);
    }
}

/// Whether a cookie value looks like a session id (base64url, bounded length).
fn plausible_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use http::header::COOKIE;

    use super::*;

    #[tokio::test]
    async fn client_session_headers_are_stripped_even_when_off() {
        let lookup = SessionLookup::new(None, ProxyMetrics::new().unwrap()).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("x-session-user", HeaderValue::from_static("admin"));
        headers.insert("x-session-attr-role", HeaderValue::from_static("cm9vdA=="));
        headers.insert("x-sessionless", HeaderValue::from_static("kept"));
        lookup.apply(&mut headers).await.unwrap();
        assert!(headers.get("x-session-user").is_none());
        assert!(headers.get("x-session-attr-role").is_none());
        assert_eq!(headers.get("x-sessionless").unwrap(), "kept");
    }

    #[test]
    fn session_cookie_is_found_among_others() {
        let mut headers = HeaderMap::new();
        headers.append(COOKIE, HeaderValue::from_static("a=1; sid=abc_DEF-123"));
        headers.append(COOKIE, HeaderValue::from_static("sid=second"));
        let first = |name| cookie_values(&headers, name).next();
        assert_eq!(first("sid"), Some("abc_DEF-123"));
        assert_eq!(first("a"), Some("1"));
        assert_eq!(first("missing"), None);
    }

    #[test]
    fn implausible_ids_are_not_looked_up() {
        assert!(plausible_id("AbC_-0123456789abcdefghijklmnopq"));
        assert!(!plausible_id(""));
        assert!(!plausible_id("has space"));
        assert!(!plausible_id("../../etc"));
        assert!(!plausible_id(&"a".repeat(MAX_ID_LEN + 1)));
    }
}
