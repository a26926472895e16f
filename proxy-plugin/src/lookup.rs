//! The session-lookup plugin: a request filter (pingora's `request_filter` hook) run before a
//! backend is picked, so backends get the session without any session code.
//!
//! Every `x-session-*` header the client sent, in any spelling (`x_session_user` too), is
//! gone before it runs: the header hygiene filter ([`crate::filter::hygiene`]) drops them, and
//! the plugin strips them again itself. Those headers are the proxy's word, and a client must
//! never be able to claim a user. With the plugin on ([`LookupConfig`]), it then reads the
//! session cookie (the last `sid`, as the backends' cookie jar keeps it), fetches the session
//! through one shared [`SessionClient`](session_client::SessionClient) (`get(id, touch =
//! true)`, so a request slides the expiry like a backend would) and sets:
//!
//! | header | value |
//! |---|---|
//! | `x-session-id` | the session id |
//! | `x-session-user` | the user id (absent for anonymous sessions) |
//! | `x-session-attr-<name>` | each configured attribute present, base64 (standard alphabet, padded), since attributes are bytes |
//! | `x-session-degraded` | `1` when the session comes from its snapshot cookie (store down, see below) |
//!
//! With `--session-header NAME` ([`LookupConfig::session_header`]) the id may come in request
//! header `NAME` instead (clients without cookies): present and non-empty, it takes precedence
//! over the cookie (an empty one counts as absent), and it is forwarded to the backends, the
//! one `x-session-*` name a client may send. The snapshot cookie is for cookie-borne ids only.
//!
//! No cookie, a malformed id or an unknown session: the request goes on without session
//! headers. By default nothing is cached: a logout, or any write, is seen by the very next
//! request.
//!
//! # The lookup cache (`--session-cache N`, off by default)
//! With `N` above zero, sessions the store returned are kept (at most `N`) and served to the
//! next requests of the same id, as `lookup/cache.rs` details: only while a `Watch` stream of
//! the namespace is up (emptied and bypassed while it is down, emptied again when events were
//! missed), each removed by any event of it, and at once (without waiting for the event) by a
//! response that clears the session cookie or sets it to another id, carries
//! `--session-header` empty or with another id, or answers an unsafe method. An entry is
//! served only within one touch window (the larger of 1 s and 1% of the ttl) of the `Get`
//! that touched the session, so the sliding expiry still slides: an active user's session
//! never expires because of the cache. A request whose snapshot cookie holds offline changes
//! bypasses it (they are pushed with `Restore` as below), and so do the outage and timeout
//! rules: a miss reads the store exactly as without a cache. A write made elsewhere (another
//! backend, an administrator) is seen once its event arrives, not by a request already served.
//!
//! # When the store fails
//! Two failures are told apart, as `session-client`'s layer tells them apart:
//! - **Unreachable** (connection refused or broken, UNAVAILABLE): an outage.
//! - **Timed out** (no answer within `timeout`, or DEADLINE_EXCEEDED): a slow store, not a lost
//!   one, while the store answered anything (NOT_FOUND included) within the last
//!   `outage_grace` (`--session-outage-grace`, 5 s by default). Then [`LookupFailure::Closed`]
//!   answers 503 with `Retry-After: 1` and [`LookupFailure::Open`] forwards without session
//!   headers; the snapshot is never used. A store silent for longer than the grace is down: an
//!   outage (the plugin's start counts as an answer, so a store slow at start-up is not).
//!
//! In an outage without a snapshot to stand in, `on_failure` applies: `Open` forwards without
//! session headers, `Closed` answers 503.
//!
//! # Outage fallback: the snapshot cookie
//! With snapshot keys configured ([`LookupConfig::snapshot_keys`]) the plugin keeps a signed
//! snapshot of the session in a second cookie (`sid_snap` by default): a `session.v1.Snapshot`
//! in `session-client`'s cookie format ([`session_client::cookie`], docs/snapshot-cookie.md),
//! read and written by `session-client`'s one snapshot policy, as its layer and `demo-app
//! --sessions proxy` do. A snapshot records the store epoch and the version the store last
//! confirmed (its base), when it confirmed them, and the changes made while the store was
//! unreachable (its offline changes).
//! - **Store answers, session found**: the plugin's response filter sets a snapshot confirmed
//!   by that answer (`Path=/; HttpOnly; SameSite=Lax`, and `Secure` when the client used https,
//!   as the request's [`FilterContext`] says) unless the request's is up to date: the same
//!   session, epoch and version, no offline changes, more than half its life left, signed with
//!   the current key. So a user gets a new snapshot about twice a ttl, not on every response.
//!   It snapshots the session as the lookup saw it: a change the backend makes in that request
//!   is taken up by the next one (the version differs). Snapshots are sealed (AES-256-GCM): the
//!   client cannot read the attributes. A response that sets the session cookie (login) or the
//!   snapshot cookie itself (a backend keeping its own snapshot) is left alone. A session too
//!   large for a 4096-byte cookie gets no snapshot (a stale one the client sent is expired).
//! - **Store answers, and the request's snapshot holds offline changes** (a backend wrote them
//!   during an outage: `demo-app --sessions proxy`, or `session-client`'s layer): they are
//!   pushed with `Restore` before the headers are set. The store applies them when it still
//!   holds the snapshot's base version (lookup outcome `restored`); when it changed the session
//!   meanwhile, **the store wins**: nothing is applied, the stored session is served and
//!   snapshotted, and the offline changes are dropped (logged at info level with the first
//!   characters of the id, outcome `conflict`). A change made in the store during a partition
//!   (an administrator removing a role) is never undone by a snapshot. A `Restore` that does
//!   not answer leaves the snapshot as it is, for a later request.
//! - **Store answers NOT_FOUND**: the answer carries the store's epoch. A snapshot of that same
//!   epoch stands for a session that was deleted (logout, `DeleteByUser`) or expired in this
//!   store: it is never pushed back, the request goes on without session and the snapshot
//!   cookie is expired. This is what makes a logout stick against replayed cookies. A snapshot
//!   of another epoch (the store lost its data: a memory store restarted, a Redis flushed), or
//!   of none (a session made during an outage), is pushed back with `Restore`, which recreates
//!   it unless the id was deleted less than one ttl ago (outcome `restored`); refused, it is
//!   missing. A NOT_FOUND without an epoch is "no session". A `Restore` that fails after a
//!   NOT_FOUND is an error (`on_failure`), never the snapshot standing in: the store has just
//!   said it does not hold the session. A `Restore` of offline changes that the lookup's token
//!   may not make (PERMISSION_DENIED, a read-only token) leaves the snapshot as it is, for a
//!   backend whose token may write; other refusals drop the offline changes.
//! - **Logout**: a response that clears the session cookie (its `Set-Cookie` has an empty
//!   value, `Max-Age=0` or an `Expires` in the past, see `lookup/set_cookie.rs`), or carries the
//!   `--session-header` with an empty value (Spring's `HeaderHttpSessionIdResolver` and
//!   `session-client`'s header id source on logout), also gets the
//!   snapshot cookie expired (same attributes, `Max-Age=0`) unless the backend expires or sets
//!   it itself, whatever the lookup found, and never a fresh snapshot: every session cookie
//!   leaves the browser together. The sticky balancer's cookie is left alone: it pins a
//!   backend, not a user, and holds nothing of the session.
//! - **Outage** (see above): a valid snapshot of the session the session cookie names stands in
//!   for it: its id, user and configured attributes (offline changes included) become the
//!   headers, plus `x-session-degraded: 1`, and the request is forwarded whatever `on_failure`
//!   says (a valid snapshot is a session). Its expiry slides by the ttl as the store's would
//!   (rewritten once past half its life), but never past `snapshot_max_age` after the store
//!   last confirmed it: degraded mode cannot keep a session alive forever.
//!
//! A snapshot counts only when its MAC verifies (constant time), it has not expired, it is
//! within `snapshot_max_age` (`--snapshot-max-age`, 1 h by default) of the store's last
//! confirmation (the reader's max age counts, so shortening it takes effect on cookies already
//! issued), and its session id and namespace are those of the request's session cookie and
//! this plugin: a forged, altered, expired, too old or foreign one is ignored.
//!
//! **The proxy and the backends must share the key material**: the same bytes, signing key
//! first, in `--session-snapshot-key` here and `demo-app --cookie-key` (a `session-client`
//! [`KeyRing`](session_client::cookie::KeyRing)) there. Key ids derive from the material
//! ([`CookieKey::new`](session_client::cookie::CookieKey::new)), so each side verifies what
//! the other signed; with different keys each ignores (and overwrites) the other's snapshots.
//!
//! What remains: cookies copied before a logout and replayed after the store **lost its data**
//! (another epoch, its tombstones gone with it) bring the session back, until
//! `snapshot_max_age` after the store last confirmed that snapshot: nothing is left in such a
//! store to tell that session from one it lost. Shorten `--snapshot-max-age` to shorten that
//! window (it also bounds how long an outage can be ridden out). A session deleted in the
//! store behind its user's back (`DeleteByUser`) stays usable through its snapshot during an
//! outage that begins before that user's next request, within the same bound.
//!
//! # Layout
//! - this file: the request filter, the lookup and the headers.
//! - `store`: the calls to the store, the outage rule and `Restore`.
//! - `snapshots`: the snapshot cookie read from the request and the response filter writing it.
//! - `set_cookie`: reading a backend's `Set-Cookie` lines (login, logout).
//! - `cache`: the lookup cache (entries, tickets, touch window).
//! - `invalidation`: what invalidates it: its Watch stream and the responses.

use std::sync::Arc;
use std::time::SystemTime;

use base64::Engine as _;
use http::header::HeaderName;
use http::{HeaderMap, HeaderValue};
use session_client::ClientError;
use session_client::cookie::{CookieError, SnapshotPolicy};

use crate::config::{LookupConfig, LookupFailure, header_name};
use crate::cookie::cookie_value;
use crate::filter::hygiene::strip_session_headers;
use crate::filter::{FilterContext, Filtered, Reject, RequestFilter, ResponseFilter};
use crate::metrics::ProxyMetrics;

mod cache;
mod invalidation;
mod set_cookie;
mod snapshots;
mod store;

use cache::{Cached, SessionCache, Ticket};
use invalidation::Forget;
use snapshots::{Sent, SnapshotAction, SnapshotUpdate, Snapshots};
use store::{Store, Stored};

/// Prefix of every header this plugin owns.
pub(crate) const SESSION_HEADER_PREFIX: &str = "x-session-";
/// `reason` of the 503 answered when the store is unreachable and the plugin fails closed.
pub const REJECT_LOOKUP_FAILED: &str = "lookup_failed";
/// `reason` of the 503 (with `Retry-After: 1`) answered when the store did not answer in time
/// although it answered within the outage grace (a slow store, not a lost one), and the plugin
/// fails closed.
pub const REJECT_LOOKUP_TIMED_OUT: &str = "lookup_timeout";
/// The session id, set for the backend (`demo-app --sessions proxy` reads it).
pub const SESSION_ID_HEADER: &str = "x-session-id";
/// The session's user id, set for the backend (absent for anonymous sessions).
pub const SESSION_USER_HEADER: &str = "x-session-user";
/// Prefix of the headers carrying configured attributes (`x-session-attr-NAME`, base64).
pub const SESSION_ATTR_PREFIX: &str = "x-session-attr-";
/// Set (to `1`) when the session comes from its snapshot because the store is down.
pub const SESSION_DEGRADED_HEADER: &str = "x-session-degraded";
/// [`SESSION_DEGRADED_HEADER`] as a header name.
const DEGRADED_HEADER: HeaderName = HeaderName::from_static(SESSION_DEGRADED_HEADER);
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
    /// A session header that is no header name, or one the plugin sets itself.
    #[error("session header {0:?} is not a header name, or is one the plugin sets itself")]
    SessionHeader(String),
    /// A snapshot max age of zero: no snapshot would ever be valid.
    #[error("the snapshot max age must be above zero")]
    SnapshotMaxAge,
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
    /// The session store: its client, and when it last answered.
    store: Store,
    /// Configured attribute names with their header names, built once.
    attrs: Vec<(String, HeaderName)>,
    /// The snapshot cookie, when keys are configured; shared with the response filters of
    /// requests in flight.
    snapshots: Option<Arc<Snapshots>>,
    /// `--session-header`: the request header carrying the session id too.
    session_header: Option<HeaderName>,
    /// The lookup cache (`--session-cache` above zero).
    cache: Option<Arc<SessionCache>>,
    /// The task following the cache's Watch stream, ended with the plugin.
    _watch: Option<WatchTask>,
}

/// A spawned task aborted when dropped.
#[derive(Debug)]
struct WatchTask(tokio::task::AbortHandle);

impl Drop for WatchTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl SessionLookup {
    /// The plugin for `config` (`None`: strip only). Must be called in a tokio runtime (the
    /// client connects lazily, on first use).
    pub fn new(config: Option<&LookupConfig>, metrics: ProxyMetrics) -> Result<Self, LookupError> {
        let plugin = match config {
            None => None,
            Some(config) => Some(Plugin::new(config, &metrics)?),
        };
        Ok(SessionLookup { plugin, metrics })
    }

    /// The settings it runs with (`None`: strip only).
    pub fn config(&self) -> Option<&LookupConfig> {
        self.plugin.as_ref().map(|p| &p.config)
    }

    /// Strips client-sent session headers, then (when on) adds the session's; returns the
    /// response filter that keeps the snapshot cookie up to date, when one is needed. `secure`:
    /// the client used https (the snapshot cookie is then `Secure`).
    pub async fn apply(
        &self,
        headers: &mut HeaderMap,
        secure: bool,
    ) -> Result<Option<Box<dyn ResponseFilter>>, Reject> {
        self.apply_request(headers, secure, false).await
    }

    /// [`SessionLookup::apply`]; `unsafe_method`: the request's method may write the session
    /// (the lookup cache forgets it on the response).
    async fn apply_request(
        &self,
        headers: &mut HeaderMap,
        secure: bool,
        unsafe_method: bool,
    ) -> Result<Option<Box<dyn ResponseFilter>>, Reject> {
        let Some(plugin) = &self.plugin else {
            strip_session_headers(headers, None);
            return Ok(None);
        };
        strip_session_headers(headers, plugin.session_header.as_ref());
        let id = self.request_id(plugin, headers);
        let update = match &id {
            Some((id, from_header)) => {
                self.lookup(plugin, headers, id, *from_header, secure)
                    .await?
            }
            None => None,
        };
        let update = update.or_else(|| {
            // A request carrying a snapshot cookie always gets the filter, so that a logout
            // response (clearing the session cookie) expires that cookie too.
            let snapshots = plugin.snapshots.as_ref()?;
            cookie_value(headers, &snapshots.cookie)?;
            Some(snapshots.update(SnapshotAction::Keep, true, secure))
        });
        Ok(match (&plugin.cache, id) {
            (Some(cache), Some((id, _))) => {
                Some(Box::new(Forget::new(cache, id, unsafe_method, update)))
            }
            _ => update.map(|update| Box::new(update) as Box<dyn ResponseFilter>),
        })
    }

    /// The request's session id, when it has a plausible one, and whether it came in the
    /// session header.
    fn request_id(&self, plugin: &Plugin, headers: &HeaderMap) -> Option<(String, bool)> {
        // The session header first (present and non-empty), then the cookie: the last one, as
        // the backends' cookie jar (tower-cookies) keeps it.
        let (id, from_header) = match plugin.header_id(headers) {
            Some(id) => (id, true),
            None => match cookie_value(headers, &plugin.config.cookie) {
                Some(id) => (id, false),
                None => {
                    self.metrics.lookup("no_cookie");
                    return None;
                }
            },
        };
        if !plausible_id(id) {
            self.metrics.lookup("malformed");
            tracing::debug!(
                from_header,
                "session id (cookie or header) is not a session id; forwarding without session"
            );
            return None;
        }
        Some((id.to_owned(), from_header))
    }

    /// Looks session `id` up and sets its headers; returns what to do with the snapshot cookie.
    async fn lookup(
        &self,
        plugin: &Plugin,
        headers: &mut HeaderMap,
        id: &str,
        from_header: bool,
        secure: bool,
    ) -> Result<Option<SnapshotUpdate>, Reject> {
        // The snapshot rides in cookies, for cookie-borne ids only (as session-client's layer
        // does): a request with the id in the header gets none set, and none stands in for it.
        let snapshots = plugin.snapshots.as_ref().filter(|_| !from_header);
        let sent = snapshots.map_or(Sent::Absent, |s| s.sent(headers, id, SystemTime::now()));
        let offline = matches!(&sent, Sent::Valid(snapshot) if snapshot.has_offline_changes());
        let mut ticket: Option<Ticket> = None;
        if let Some(cache) = &plugin.cache {
            if offline {
                // Offline changes go to the store (Restore), never around it.
                cache.bypass();
            } else {
                match cache.lookup(id) {
                    Cached::Hit(session) => {
                        let hit = Stored {
                            session,
                            outcome: "found",
                            keep_snapshot: false,
                        };
                        return Ok(self.found(plugin, headers, hit, snapshots, &sent, secure));
                    }
                    Cached::Miss(miss) => ticket = Some(miss),
                    Cached::Bypassed => {}
                }
            }
        }
        let resolved = match plugin.store.get(id).await {
            Ok(stored) => match &sent {
                // Changes a backend made during an outage: pushed back under the store's rules.
                Sent::Valid(snapshot) if snapshot.has_offline_changes() => {
                    plugin.store.resync(snapshot, Some(stored)).await
                }
                _ => {
                    let session = Arc::new(stored);
                    if let (Some(cache), Some(ticket)) = (&plugin.cache, ticket) {
                        cache.fill(ticket, session.clone());
                    }
                    Ok(Some(Stored {
                        session,
                        outcome: "found",
                        keep_snapshot: false,
                    }))
                }
            },
            Err(ClientError::NotFound { epoch }) => match (&sent, epoch) {
                // The store lost it (another epoch), or it was made during an outage. The store
                // has just answered: a failing Restore is an error (on_failure), never the
                // snapshot standing in for a session the store says it does not hold.
                (Sent::Valid(snapshot), Some(epoch))
                    if snapshot.epoch.is_empty() || snapshot.epoch != epoch =>
                {
                    match plugin.store.resync(snapshot, None).await {
                        Err(error) => {
                            return self.failed(plugin, headers, Sent::Absent, error, secure);
                        }
                        resolved => resolved,
                    }
                }
                // Deleted or expired in this very store (or a store that does not say its
                // epoch): never pushed back (a logout sticks).
                (Sent::Valid(_), epoch) => {
                    tracing::debug!(
                        epoch_known = epoch.is_some(),
                        "session gone from the store: snapshot dropped"
                    );
                    Ok(None)
                }
                (Sent::Absent | Sent::Invalid, _) => Ok(None),
            },
            Err(ClientError::Invalid(_)) => Ok(None),
            Err(error) => Err(error),
        };
        match resolved {
            Ok(Some(stored)) => Ok(self.found(plugin, headers, stored, snapshots, &sent, secure)),
            Ok(None) => {
                self.metrics.lookup("missing");
                Ok(snapshots.and_then(|s| s.expire(headers, secure)))
            }
            Err(error) => self.failed(plugin, headers, sent, error, secure),
        }
    }

    /// The session is found (in the store or the cache): its headers are set; returns what to
    /// do with the snapshot cookie.
    fn found(
        &self,
        plugin: &Plugin,
        headers: &mut HeaderMap,
        stored: Stored,
        snapshots: Option<&Arc<Snapshots>>,
        sent: &Sent,
        secure: bool,
    ) -> Option<SnapshotUpdate> {
        let Stored {
            session,
            outcome,
            keep_snapshot,
        } = stored;
        self.metrics.lookup(outcome);
        plugin.set_headers(headers, &session.id, &session.user_id, |name| {
            session.attrs.get(name)
        });
        if keep_snapshot {
            return None;
        }
        snapshots.and_then(|s| s.refresh(sent, headers, &session, secure))
    }

    /// The store did not answer, or failed: the snapshot stands in during an outage,
    /// `on_failure` applies otherwise.
    fn failed(
        &self,
        plugin: &Plugin,
        headers: &mut HeaderMap,
        sent: Sent,
        error: ClientError,
        secure: bool,
    ) -> Result<Option<SnapshotUpdate>, Reject> {
        let outage = plugin.store.is_outage(&error);
        if outage
            && let Some(snapshots) = &plugin.snapshots
            && let Sent::Valid(snapshot) = sent
        {
            self.metrics.lookup("snapshot");
            tracing::warn!(%error, "session store down; session served from its snapshot cookie");
            plugin.set_headers(headers, &snapshot.id, &snapshot.user_id, |name| {
                snapshot.attrs.get(name)
            });
            headers.insert(DEGRADED_HEADER, HeaderValue::from_static("1"));
            return Ok(snapshots.slide(snapshot, secure));
        }
        // A slow store that answered within the grace: an error, never the snapshot.
        let slow = error.is_timeout() && !outage;
        match (plugin.config.on_failure, slow) {
            (LookupFailure::Open, false) => {
                self.metrics.lookup("failed_open");
                tracing::warn!(%error, "session lookup failed; forwarding without session (fail-open)");
                Ok(None)
            }
            (LookupFailure::Open, true) => {
                self.metrics.lookup("timeout_open");
                tracing::warn!(%error, "session lookup timed out; forwarding without session (fail-open)");
                Ok(None)
            }
            (LookupFailure::Closed, false) => {
                self.metrics.lookup("failed_closed");
                tracing::warn!(%error, "session lookup failed; answering 503 (fail-closed)");
                Err(Reject::new(
                    http::StatusCode::SERVICE_UNAVAILABLE,
                    REJECT_LOOKUP_FAILED,
                ))
            }
            (LookupFailure::Closed, true) => {
                self.metrics.lookup("timeout_closed");
                tracing::warn!(%error, "session lookup timed out; answering 503 with Retry-After (fail-closed)");
                Err(Reject::new(
                    http::StatusCode::SERVICE_UNAVAILABLE,
                    REJECT_LOOKUP_TIMED_OUT,
                )
                .retry_after(1))
            }
        }
    }
}

impl RequestFilter for SessionLookup {
    fn request_filter<'a>(
        &'a self,
        head: &'a mut http::request::Parts,
        ctx: &'a FilterContext,
    ) -> Filtered<'a> {
        if self.plugin.is_none() {
            // Off: stripping is all there is, done now, without a future to allocate.
            strip_session_headers(&mut head.headers, None);
            return Filtered::pass();
        }
        // Methods that may write the session (not GET, HEAD, OPTIONS, TRACE): the lookup
        // cache forgets it on the response.
        let unsafe_method = !head.method.is_safe();
        Filtered::later(self.apply_request(&mut head.headers, ctx.https(), unsafe_method))
    }
}

impl Plugin {
    fn new(config: &LookupConfig, metrics: &ProxyMetrics) -> Result<Self, LookupError> {
        if config.cookie.trim().is_empty() {
            return Err(LookupError::CookieName);
        }
        let session_header = config
            .session_header
            .as_deref()
            .map(|name| {
                header_name(name)
                    .ok()
                    .filter(|header| !is_plugin_header(header.as_str()))
                    .ok_or_else(|| LookupError::SessionHeader(name.to_owned()))
            })
            .transpose()?;
        let attrs = config
            .attrs
            .iter()
            .map(|name| {
                header_name(&format!("{SESSION_ATTR_PREFIX}{name}"))
                    .map(|header| (name.clone(), header))
                    .map_err(|_| LookupError::AttrName(name.clone()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let snapshots = if config.snapshot_keys.is_empty() {
            None
        } else {
            Some(Arc::new(Snapshots::new(config)?))
        };
        let store = Store::new(config)?;
        let (cache, watch) = if config.cache == 0 {
            (None, None)
        } else {
            let cache = Arc::new(SessionCache::new(
                config.cache,
                &config.cookie,
                session_header.clone(),
                metrics.clone(),
            ));
            let task = tokio::spawn(invalidation::follow(cache.clone(), store.client().clone()));
            (Some(cache), Some(WatchTask(task.abort_handle())))
        };
        Ok(Plugin {
            config: config.clone(),
            store,
            attrs,
            snapshots,
            session_header,
            cache,
            _watch: watch,
        })
    }

    /// The session id in the request's session header, when configured, present and not
    /// empty. A value that is not text comes back as `"\0"`, never a plausible id, so that it
    /// counts as malformed rather than absent.
    fn header_id<'h>(&self, headers: &'h HeaderMap) -> Option<&'h str> {
        let value = headers.get(self.session_header.as_ref()?)?;
        if value.as_bytes().trim_ascii().is_empty() {
            return None;
        }
        Some(value.to_str().map_or("\0", str::trim))
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
            headers.insert(HeaderName::from_static(SESSION_ID_HEADER), id);
        }
        if !user_id.is_empty() {
            match HeaderValue::from_bytes(user_id.as_bytes()) {
                Ok(user) => {
                    headers.insert(HeaderName::from_static(SESSION_USER_HEADER), user);
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

/// Whether `name` (lower case) is one of the headers this plugin sets for the backends.
pub(crate) fn is_plugin_header(name: &str) -> bool {
    // In any spelling: a backend that folds `_` into `-` reads `x_session_user` as the other.
    let name = name.to_ascii_lowercase().replace('_', "-");
    [
        SESSION_ID_HEADER,
        SESSION_USER_HEADER,
        SESSION_DEGRADED_HEADER,
    ]
    .contains(&name.as_str())
        || name.starts_with(SESSION_ATTR_PREFIX)
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
        headers.insert("x_session_user", HeaderValue::from_static("admin"));
        headers.insert("x-sessionless", HeaderValue::from_static("kept"));
        lookup.apply(&mut headers, false).await.unwrap();
        assert!(headers.get("x_session_user").is_none());
        assert!(headers.get("x-session-user").is_none());
        assert!(headers.get("x-session-attr-role").is_none());
        assert_eq!(headers.get("x-sessionless").unwrap(), "kept");
    }

    #[test]
    fn session_cookie_is_found_among_others() {
        let mut headers = HeaderMap::new();
        headers.append(COOKIE, HeaderValue::from_static("a=1; sid=abc_DEF-123"));
        headers.append(COOKIE, HeaderValue::from_static("sid=second"));
        // The last `sid`, as the backends' cookie jar (tower-cookies) keeps it.
        let find = |name| cookie_value(&headers, name);
        assert_eq!(find("sid"), Some("second"));
        assert_eq!(find("a"), Some("1"));
        assert_eq!(find("missing"), None);
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
