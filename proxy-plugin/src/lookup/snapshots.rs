//! The snapshot-cookie side of the lookup plugin: reading the request's snapshot cookie, and
//! the response filter that sets it (a snapshot of the session as the store confirmed it, or
//! as it stands in during an outage), expires it (the session is gone, or the response is a
//! logout), or leaves it alone. Every rule about what a snapshot holds and when it is due is
//! `session-client`'s one policy ([`SnapshotPolicy`]); this file only decides which of them
//! applies to a request and writes the cookie.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::header::SET_COOKIE;
use http::{HeaderMap, HeaderValue};
use session_client::SessionData;
use session_client::cookie::{
    CookieCodec, CookieKey, Encryption, KeyRing, Snapshot, SnapshotPolicy, fits_in_cookie, unix_ms,
};

use super::LookupError;
use super::set_cookie::{clears_cookie, sets_cookie};
use crate::config::LookupConfig;
use crate::cookie::cookie_value;
use crate::filter::ResponseFilter;

/// The snapshot-cookie settings of an enabled plugin, shared with the response filters of
/// requests in flight.
#[derive(Debug)]
pub(super) struct Snapshots {
    /// Signs (and seals) with the first key, verifies with every key.
    codec: CookieCodec,
    /// Name of the snapshot cookie.
    pub(super) cookie: String,
    /// Name of the session cookie: a response setting it changed the session, so its snapshot
    /// is left to the next request.
    session_cookie: String,
    /// `--session-header`: a response carrying it empty is a logout, one carrying a new id a
    /// new session, as for the session cookie.
    session_header: Option<http::header::HeaderName>,
    /// Namespace written into snapshots and required of them.
    namespace: String,
    /// How long past the store's last confirmation a snapshot may stand in: written snapshots
    /// expire by then, older ones are refused.
    max_age: Duration,
}

/// A request's snapshot cookie, as far as the session it names is concerned.
pub(super) enum Sent {
    /// No snapshot cookie.
    Absent,
    /// One that is not a valid snapshot of this session (forged, altered, expired, past the
    /// max age, another session or namespace, an unknown key).
    Invalid,
    /// A valid snapshot of this session.
    Valid(Box<Snapshot>),
}

/// The plugin's response filter for one request: the snapshot cookie to set, or to expire.
#[derive(Debug)]
pub(super) struct SnapshotUpdate {
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
pub(super) enum SnapshotAction {
    /// Nothing: the request's snapshot is fine (or holds offline changes not yet pushed).
    Keep,
    /// Sets a snapshot of this session (issued-at set when encoded).
    Set(Box<Snapshot>),
    /// Expires the client's.
    Expire,
}

impl Snapshots {
    pub(super) fn new(config: &LookupConfig) -> Result<Self, LookupError> {
        let cookie = config.snapshot_cookie.trim();
        if cookie.is_empty() || cookie == config.cookie.trim() {
            return Err(LookupError::SnapshotCookie);
        }
        if config.snapshot_max_age.is_zero() {
            return Err(LookupError::SnapshotMaxAge);
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
            session_header: config
                .session_header
                .as_deref()
                .and_then(|name| http::header::HeaderName::from_bytes(name.as_bytes()).ok()),
            namespace: config.namespace.clone(),
            max_age: config.snapshot_max_age,
        })
    }

    /// The request's snapshot cookie, checked against session `id` at `now`.
    pub(super) fn sent(&self, headers: &HeaderMap, id: &str, now: SystemTime) -> Sent {
        let Some(value) = cookie_value(headers, &self.cookie) else {
            return Sent::Absent;
        };
        match self
            .codec
            .decode_for(value, id, &self.namespace, self.max_age, now)
        {
            Some(snapshot) => Sent::Valid(Box::new(snapshot)),
            None => Sent::Invalid,
        }
    }

    /// Whether the request's snapshot cookie is signed with the current signing key (so one
    /// signed by a key rotating out is re-issued at once, not only at half its life).
    fn sent_is_current(&self, headers: &HeaderMap) -> bool {
        cookie_value(headers, &self.cookie).is_some_and(|value| self.codec.is_current(value))
    }

    /// The store answered with `session`: a snapshot confirmed by it, unless the request's is
    /// up to date (same session, epoch and version, no offline changes, more than half its life
    /// left, signed with the current key). `secure`: the request came over TLS.
    pub(super) fn refresh(
        self: &Arc<Self>,
        sent: &Sent,
        headers: &HeaderMap,
        session: &SessionData,
        secure: bool,
    ) -> Option<SnapshotUpdate> {
        let now = SystemTime::now();
        let sent = match sent {
            Sent::Valid(old)
                if old.is_up_to_date(session, now) && self.sent_is_current(headers) =>
            {
                return None;
            }
            Sent::Absent => false,
            Sent::Invalid | Sent::Valid(_) => true,
        };
        let snapshot = Snapshot::confirmed(session, &self.namespace, now, self.max_age);
        Some(self.update(SnapshotAction::Set(Box::new(snapshot)), sent, secure))
    }

    /// The store is down and `snapshot` stands in: its expiry slides as the store's would,
    /// never past the max age after the store's last confirmation, and is written out once
    /// past half its life (and only when that moves it).
    pub(super) fn slide(
        self: &Arc<Self>,
        mut snapshot: Box<Snapshot>,
        secure: bool,
    ) -> Option<SnapshotUpdate> {
        let now = SystemTime::now();
        if snapshot.is_fresh(snapshot.ttl().min(self.max_age), now) {
            return None;
        }
        let before = snapshot.expires_at_ms;
        snapshot.slide_offline(now, self.max_age);
        if snapshot.expires_at_ms <= before {
            return None;
        }
        Some(self.update(SnapshotAction::Set(snapshot), true, secure))
    }

    /// The session is gone: the client's snapshot cookie, if any, is expired.
    pub(super) fn expire(
        self: &Arc<Self>,
        headers: &HeaderMap,
        secure: bool,
    ) -> Option<SnapshotUpdate> {
        cookie_value(headers, &self.cookie)?;
        Some(self.update(SnapshotAction::Expire, true, secure))
    }

    /// The response filter doing `action`.
    pub(super) fn update(
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
        self.respond(head);
    }
}

impl SnapshotUpdate {
    /// The response filter's work, also run by the lookup cache's filter after its own.
    pub(super) fn respond(self, head: &mut http::response::Parts) {
        let snapshots = &self.snapshots;
        let name = &snapshots.cookie;
        if sets_cookie(&head.headers, name) {
            // The backend keeps (or expires) the snapshot itself.
            return;
        }
        let secure = if self.secure { "; Secure" } else { "" };
        let expired = || format!("{name}=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax{secure}");
        let session_cookie = &snapshots.session_cookie;
        // The session header's last value in the response: empty is a logout, anything else a
        // new id.
        let header = snapshots
            .session_header
            .as_ref()
            .and_then(|name| head.headers.get_all(name).iter().next_back())
            .map(|value| value.as_bytes().trim_ascii().is_empty());
        let cookie = if clears_cookie(&head.headers, session_cookie, SystemTime::now())
            || header == Some(true)
        {
            // A logout: the snapshot goes with the session cookie (or header), so no browser
            // keeps a snapshot of a session its user ended.
            expired()
        } else if sets_cookie(&head.headers, session_cookie) || header == Some(false) {
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
