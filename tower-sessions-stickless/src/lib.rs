//! A [`tower_sessions::SessionStore`] backed by a Stickless session server: an application on
//! `tower-sessions` (or `axum-login`, which builds on it) moves its sessions to Stickless by
//! changing the store it hands to `SessionManagerLayer`:
//!
//! ```no_run
//! use session_client::{ClientConfig, SessionClient};
//! use tower_sessions::SessionManagerLayer;
//! use tower_sessions_stickless::SticklessStore;
//!
//! # fn build() -> Result<(), Box<dyn std::error::Error>> {
//! // Was: let store = tower_sessions::MemoryStore::default();
//! let store = SticklessStore::new(SessionClient::connect_lazy(ClientConfig::new("http://127.0.0.1:50051"))?);
//! let layer = SessionManagerLayer::new(store);
//! # let _ = layer; Ok(()) }
//! ```
//!
//! Built for `tower-sessions` 0.14 (`tower-sessions-core` 0.14's trait), the line `axum-login`
//! 0.18 uses.
//!
//! # How a record is kept
//! - `Record.data`: one Stickless attribute per key, its value's JSON bytes. A key must be 1 to
//!   256 bytes (the server's rule), and the session's total size is capped by the server
//!   (64 KiB by default); a record that breaks either is refused on save
//!   ([`session_store::Error::Backend`]). One attribute, [`EXPIRY_ATTRIBUTE`], is the store's
//!   own and may not be used as a data key ([`session_store::Error::Encode`]).
//! - `Record.expiry_date`: the session's sliding ttl is set to `expiry_date - now` at each
//!   save, so the server expires it at `expiry_date` and deletes it then (Stickless sessions
//!   expire by themselves: no deletion task is needed). The exact date is also kept in
//!   [`EXPIRY_ATTRIBUTE`], so that a loaded record equals the saved one; when the server clamped
//!   the ttl to its maximum, the earlier date the server will expire it at is what `load` gives.
//!   A record saved with an expiry date in the past is deleted.
//! - `Record.id`: `tower-sessions` makes its ids (random `i128`) and puts them in its cookie,
//!   while Stickless ids are 192 bits in 32 base64url characters, normally made by the server.
//!   The store maps one onto the other with no lookup: the Stickless id is the base64url of the
//!   id's 16 bytes (little endian) followed by 8 zero bytes ([`stickless_id`]). `create` makes
//!   the session under that id with the server's `Restore` call, the one call that creates a
//!   session under an id the caller chooses (as a snapshot from no store, empty epoch): it
//!   refuses when the id exists (ABORTED) or was deleted less than a ttl ago (a tombstone,
//!   FAILED_PRECONDITION), and `create` then draws a new `Id`, which `tower-sessions` allows on
//!   collision. So ids stay `tower-sessions`' own (128 random bits, as with every
//!   `tower-sessions` store), cookies need no change, `load`/`save`/`delete` are one or two calls,
//!   and nothing extra is stored. The alternative (server-made ids, the `tower-sessions` id in
//!   an attribute) would need an index from the one to the other that the server does not have.
//!   The token of the client needs `rw` rights (Restore is a write).
//!
//! Sessions made through this store are ordinary Stickless sessions (anonymous: `user_id` is
//! empty): `session-client`'s `SessionClient::watch` sees their events.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use session_client::{ClientError, Patch, RestoreRequest, SessionClient, SessionData};
use tower_sessions::cookie::time::OffsetDateTime;
use tower_sessions::session::{Id, Record};
use tower_sessions::session_store::{self, SessionStore};

/// The attribute that keeps a record's exact `expiry_date` (unix nanoseconds, decimal); not a
/// data key.
pub const EXPIRY_ATTRIBUTE: &str = "tower-sessions.expiry";

/// How often `create` draws a new id after a collision before giving up (a collision of 128
/// random bits is already all but impossible).
const CREATE_TRIES: usize = 8;
/// How often `save` tries again when another save changed the session between its read and its
/// write.
const SAVE_TRIES: usize = 8;

/// A `tower-sessions` store over a Stickless session server (see the crate doc for the mapping).
/// Cheap to clone: clones share the client's connections.
#[derive(Debug, Clone)]
pub struct SticklessStore {
    client: SessionClient,
}

impl SticklessStore {
    /// A store that keeps sessions through `client` (in the client's namespace).
    pub fn new(client: SessionClient) -> Self {
        SticklessStore { client }
    }

    /// The client the store uses.
    pub fn client(&self) -> &SessionClient {
        &self.client
    }
}

/// The Stickless id of a `tower-sessions` id: base64url (no padding) of its 16 bytes, little
/// endian, and 8 zero bytes: 32 characters, a well-formed Stickless id.
pub fn stickless_id(id: &Id) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut bytes = [0u8; 24];
    bytes[..16].copy_from_slice(&id.0.to_le_bytes());
    let mut out = String::with_capacity(32);
    for chunk in bytes.chunks(3) {
        let n = (u32::from(chunk[0]) << 16) | (u32::from(chunk[1]) << 8) | u32::from(chunk[2]);
        for shift in [18, 12, 6, 0] {
            out.push(char::from(ALPHABET[((n >> shift) & 63) as usize]));
        }
    }
    out
}

fn backend(error: ClientError) -> session_store::Error {
    session_store::Error::Backend(error.to_string())
}

/// The record's data as attributes, with its exact expiry.
fn encode(record: &Record) -> session_store::Result<HashMap<String, Vec<u8>>> {
    let mut attrs = HashMap::with_capacity(record.data.len() + 1);
    for (key, value) in &record.data {
        if key == EXPIRY_ATTRIBUTE {
            return Err(session_store::Error::Encode(format!(
                "{EXPIRY_ATTRIBUTE:?} is kept by the Stickless store and cannot be a data key"
            )));
        }
        let bytes = serde_json::to_vec(value)
            .map_err(|e| session_store::Error::Encode(format!("{key:?}: {e}")))?;
        attrs.insert(key.clone(), bytes);
    }
    attrs.insert(
        EXPIRY_ATTRIBUTE.to_owned(),
        record
            .expiry_date
            .unix_timestamp_nanos()
            .to_string()
            .into_bytes(),
    );
    Ok(attrs)
}

/// The record a stored session holds.
fn decode(id: Id, session: SessionData) -> session_store::Result<Record> {
    let mut data = HashMap::with_capacity(session.attrs.len());
    let mut exact = None;
    for (key, bytes) in session.attrs {
        if key == EXPIRY_ATTRIBUTE {
            exact = std::str::from_utf8(&bytes)
                .ok()
                .and_then(|text| text.parse::<i128>().ok())
                .and_then(|nanos| OffsetDateTime::from_unix_timestamp_nanos(nanos).ok());
            continue;
        }
        let value = serde_json::from_slice(&bytes)
            .map_err(|e| session_store::Error::Decode(format!("{key:?}: {e}")))?;
        data.insert(key, value);
    }
    let server = OffsetDateTime::from(session.expires_at);
    // The server's own date wins when it is clearly earlier (a clamped ttl).
    let expiry_date = match exact {
        Some(exact) if server + Duration::from_secs(1) >= exact => exact,
        _ => server,
    };
    Ok(Record {
        id,
        data,
        expiry_date,
    })
}

/// `expiry - now`, or `None` when the date has passed.
fn ttl_until(expiry: OffsetDateTime) -> Option<Duration> {
    SystemTime::from(expiry)
        .duration_since(SystemTime::now())
        .ok()
        .filter(|ttl| !ttl.is_zero())
}

impl SticklessStore {
    /// Makes the session under the record's id; `Ok(false)` when the id is taken (or was
    /// deleted less than a ttl ago).
    async fn create_under_id(
        &self,
        record: &Record,
        attrs: HashMap<String, Vec<u8>>,
        ttl: Duration,
    ) -> session_store::Result<bool> {
        let now = SystemTime::now();
        let request = RestoreRequest {
            session: SessionData {
                id: stickless_id(&record.id),
                namespace: self.client.namespace().to_owned(),
                user_id: String::new(),
                attrs,
                version: 1,
                created_at: now,
                expires_at: now + ttl,
                ttl,
                epoch: String::new(),
                write_id: String::new(),
                ends_at: None,
            },
            epoch: String::new(),
            base_version: 0,
            set: HashMap::new(),
            remove: Vec::new(),
            user_id: None,
            // A lineage of its own: a try whose answer was lost is recognised as this create
            // when the client sends it again, not taken for a collision.
            write_id: format!("{}.1", session_client::new_write_id()),
            own_write_ids: Vec::new(),
        };
        match self.client.restore(request).await {
            Ok(_) => Ok(true),
            Err(ClientError::Conflict(_) | ClientError::Refused(_)) => Ok(false),
            Err(error) => Err(backend(error)),
        }
    }
}

#[async_trait]
impl SessionStore for SticklessStore {
    async fn create(&self, record: &mut Record) -> session_store::Result<()> {
        let attrs = encode(record)?;
        let Some(ttl) = ttl_until(record.expiry_date) else {
            // Expired already: nothing to keep (a load would not return it anyway).
            return Ok(());
        };
        for _ in 0..CREATE_TRIES {
            if self.create_under_id(record, attrs.clone(), ttl).await? {
                return Ok(());
            }
            tracing::debug!("session id taken; drawing another");
            record.id = Id::default();
        }
        Err(session_store::Error::Backend(format!(
            "no free session id after {CREATE_TRIES} tries"
        )))
    }

    async fn save(&self, record: &Record) -> session_store::Result<()> {
        let attrs = encode(record)?;
        let id = stickless_id(&record.id);
        let Some(ttl) = ttl_until(record.expiry_date) else {
            return self.delete(&record.id).await;
        };
        for _ in 0..SAVE_TRIES {
            let stored = match self.client.get(&id, false).await {
                Ok(stored) => stored,
                Err(ClientError::NotFound { .. }) => {
                    // Saved without a create, or expired meanwhile: make it under its id.
                    if self.create_under_id(record, attrs.clone(), ttl).await? {
                        return Ok(());
                    }
                    // Made by someone else meanwhile (overwrite it), or deleted just now
                    // (a tombstone: a logged-out session is never brought back).
                    match self.client.get(&id, false).await {
                        Ok(stored) => stored,
                        Err(ClientError::NotFound { .. }) => {
                            return Err(session_store::Error::Backend(
                                "the session was deleted and cannot be saved again".into(),
                            ));
                        }
                        Err(error) => return Err(backend(error)),
                    }
                }
                Err(error) => return Err(backend(error)),
            };
            let remove = stored
                .attrs
                .keys()
                .filter(|key| !attrs.contains_key(*key))
                .cloned()
                .collect();
            let patch = Patch {
                set: attrs.clone(),
                remove,
                expected_version: Some(stored.version),
                ttl: Some(ttl),
                ..Patch::default()
            };
            match self.client.update(&id, patch).await {
                Ok(_) => return Ok(()),
                // Another save got in between, or it expired: read again.
                Err(ClientError::Conflict(_) | ClientError::NotFound { .. }) => continue,
                Err(error) => return Err(backend(error)),
            }
        }
        Err(session_store::Error::Backend(format!(
            "the session kept changing under {SAVE_TRIES} saves"
        )))
    }

    async fn load(&self, id: &Id) -> session_store::Result<Option<Record>> {
        match self.client.get(&stickless_id(id), false).await {
            Ok(session) => {
                let record = decode(*id, session)?;
                Ok((record.expiry_date > OffsetDateTime::now_utc()).then_some(record))
            }
            Err(ClientError::NotFound { .. }) => Ok(None),
            Err(error) => Err(backend(error)),
        }
    }

    async fn delete(&self, id: &Id) -> session_store::Result<()> {
        self.client
            .delete(&stickless_id(id))
            .await
            .map(drop)
            .map_err(backend)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_map_to_well_formed_stickless_ids_one_to_one() {
        for n in [0i128, 1, -1, i128::MAX, i128::MIN, 0x0123_4567_89ab_cdef] {
            let id = stickless_id(&Id(n));
            assert_eq!(id.len(), 32, "{id}");
            assert!(
                id.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
                "{id}"
            );
        }
        assert_ne!(stickless_id(&Id(1)), stickless_id(&Id(256)));
        assert_eq!(stickless_id(&Id(0)), "A".repeat(32));
        assert_eq!(&stickless_id(&Id(-1))[..21], "_".repeat(21));
    }
}
