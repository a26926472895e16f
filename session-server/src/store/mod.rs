//! The storage side of the session server: one [`SessionStore`] trait, one file per adapter.
//!
//! The gRPC service validates input (ids, namespaces, sizes of single fields), resolves TTLs
//! against the server's default and maximum, and makes new ids; a store only keeps records. A
//! store still enforces the total attribute size itself, because only the store sees the merged
//! result of a patch atomically.
//!
//! The network stores are cargo features of this crate, both on by default: [`redis`]
//! (`redis-store`: Redis and Redis Cluster) and [`mysql`] (`mysql-store`: MySQL and MariaDB).
//! [`memory`] is always built. [`cap`] is the per-user session cap (`--max-sessions-per-user`)
//! that every store keeps in its writes, each in its own way (see the stores' docs).
//!
//! # Epochs and Restore
//! Every store has an epoch ([`SessionStore::epoch`]): 128 random bits made once with the
//! store's data ([`crate::id::new_epoch`]), kept where the data is (the memory store's process,
//! a key in Redis, a row in MySQL), so a store that lost its data (a memory store restarted, a
//! Redis flushed or replaced, the MySQL epoch row gone) has a new one. Every session the server
//! returns carries it, and NOT_FOUND answers carry it read fresh
//! ([`SessionStore::current_epoch`]), so a client holding a snapshot can tell a session that was
//! deleted or expired (same epoch) from one the store lost (another epoch).
//!
//! The service applies Restore's rules (see `session.proto`) with two store calls:
//! [`SessionStore::current_epoch`], read fresh, then either [`SessionStore::update`] with
//! `expected_version = base_version` (same epoch: absent or a tombstone refuses, another
//! version conflicts) or [`SessionStore::restore`] (another or no epoch: create at version 1
//! unless the id is live or a tombstone). The epoch read and the write are not one atomic step:
//! a store can lose its data in between. That only ever errs toward refusing: a same-epoch
//! restore then finds no session (FAILED_PRECONDITION: the user logs in again), and a restore
//! of another epoch recreates the session in the new data, which is what it would have done a
//! moment later anyway. Nothing can make a store's new epoch equal an old one, so a deleted
//! session is never recreated by a snapshot of the epoch it was deleted in. (A network store
//! learns that its data was lost at its next epoch read: sessions it returns in the seconds
//! between carry the old epoch, see the Redis store's `epoch` module.) Versions stay bounded:
//! the patch bumps the stored version by one, and a recreation starts at 1.

pub mod cap;
pub mod memory;
#[cfg(feature = "mysql-store")]
pub mod mysql;
#[cfg(feature = "redis-store")]
pub mod redis;

/// A URL with any credentials (`user:password@`) replaced by `***@`, for logs and `Debug`.
/// Comma-separated lists (cluster seeds) are redacted entry by entry; see [`redact_one_url`]
/// for a URL whose query may hold commas.
pub fn redact_url(url: &str) -> String {
    url.split(',')
        .map(redact_one_url)
        .collect::<Vec<_>>()
        .join(",")
}

/// One URL with any credentials (`user:password@`) replaced by `***@`; the path and query
/// (`?ssl-mode=verify_ca&ssl-ca=/etc/ca.pem`) are kept as they are.
pub fn redact_one_url(url: &str) -> String {
    // A cluster seed may come without a scheme (`user:pw@h2:2`), and still carry credentials.
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (format!("{scheme}://"), rest),
        None => (String::new(), url),
    };
    // The authority ends at the path, the query or the fragment: an `@` past it (a file name
    // in the query, say) is no credential.
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..end];
    match authority.rfind('@') {
        Some(at) => format!("{scheme}***@{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::broadcast;

/// How many events a watcher may fall behind before it is cut off (it then gets
/// RESOURCE_EXHAUSTED and must re-read). Large enough for bursts such as a DeleteByUser of a user
/// with many sessions, small enough that a stuck watcher costs little memory.
pub const EVENT_BUFFER: usize = 4096;

/// One stored session, as every store returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    /// Server-made id (see [`crate::id`]).
    pub id: String,
    /// Namespace the session lives in (already defaulted, never empty).
    pub namespace: String,
    /// Owner, or empty for an anonymous session.
    pub user_id: String,
    /// Application data.
    pub attrs: HashMap<String, Vec<u8>>,
    /// Bumped by every write; 1 after create.
    pub version: u64,
    /// When the session was first created.
    pub created_at: SystemTime,
    /// When it expires unless touched or written before.
    pub expires_at: SystemTime,
    /// The sliding time-to-live applied by touches and writes.
    pub ttl: Duration,
}

/// Everything a store needs to create a session.
#[derive(Debug, Clone)]
pub struct NewSession {
    /// Fresh id made by the service.
    pub id: String,
    /// Namespace (already defaulted).
    pub namespace: String,
    /// Owner, or empty.
    pub user_id: String,
    /// Initial attributes.
    pub attrs: HashMap<String, Vec<u8>>,
    /// Sliding time-to-live, already clamped by the service.
    pub ttl: Duration,
}

/// An attribute-level patch: what `Update` asks of a store.
#[derive(Debug, Clone, Default)]
pub struct Patch {
    /// Attributes to add or replace.
    pub set: HashMap<String, Vec<u8>>,
    /// Attribute keys to delete.
    pub remove: Vec<String>,
    /// Compare-and-set: apply only if the stored version equals this.
    pub expected_version: Option<u64>,
    /// New owner, when present (empty string: anonymous).
    pub user_id: Option<String>,
    /// New sliding ttl, when present (already clamped).
    pub ttl: Option<Duration>,
}

/// What happened to a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// Created (also the new id of a regenerate).
    Created,
    /// Attributes, user or ttl written.
    Updated,
    /// Deleted (also the old id of a regenerate).
    Deleted,
    /// Reached its expiry.
    Expired,
    /// Not a session's event: the store's event feed was lost or came back (a network store's
    /// subscription), so events may have been missed. The service ends every Watch stream
    /// with UNAVAILABLE on it, and the clients subscribe again (`session-client`'s
    /// `WatchStream` announces the gap); never sent to a client as an event.
    Gap,
}

/// One session event, as stores broadcast it to watchers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionEvent {
    /// What happened.
    pub kind: EventKind,
    /// Namespace of the session.
    pub namespace: String,
    /// Session id.
    pub id: String,
    /// Session owner (empty when unknown, as for expiry seen only by key name).
    pub user_id: String,
    /// Version after the event (0 when unknown).
    pub version: u64,
    /// When the store applied it.
    pub at: SystemTime,
}

/// Why a store call failed. The service maps each to a gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No live session with that id (NOT_FOUND).
    #[error("session not found")]
    NotFound,
    /// Compare-and-set failed, or a restore found the id live (ABORTED).
    #[error("version conflict: expected {expected}, stored {actual}")]
    Conflict {
        /// The version the caller expected.
        expected: u64,
        /// The version actually stored.
        actual: u64,
    },
    /// The id was deleted less than one ttl ago, so it may not be restored (FAILED_PRECONDITION).
    #[error("session was deleted and cannot be restored")]
    Deleted,
    /// The id is already taken (create only; the service retries with a new id).
    #[error("session id already exists")]
    IdTaken,
    /// The merged attributes would exceed the size limit (INVALID_ARGUMENT); nothing was stored.
    #[error("session attributes would take {size} bytes, over the limit of {limit}")]
    TooLarge {
        /// Size the write would have produced.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The session would join a user who already has `max` live sessions in its namespace,
    /// and the cap refuses rather than evicts (RESOURCE_EXHAUSTED); nothing was written. See
    /// [`cap`].
    #[error(
        "the user already has {max} live sessions in this namespace, the most allowed \
         (max-sessions-per-user): end one of them first"
    )]
    SessionCap {
        /// The cap (`--max-sessions-per-user`).
        max: u32,
    },
    /// The backend could not be reached or answered with an I/O error (UNAVAILABLE).
    #[error("session store unavailable: {0}")]
    Unavailable(String),
    /// The backend did not answer within the configured timeout (DEADLINE_EXCEEDED: a slow
    /// store is not an unreachable one, and a write that timed out may have been applied).
    #[error("session store did not answer within {0:?}")]
    Timeout(Duration),
    /// Anything else: a bug or an unexpected answer (INTERNAL).
    #[error("session store failed: {0}")]
    Internal(String),
}

/// Result of a store call.
pub type StoreResult<T> = Result<T, StoreError>;

/// A place to keep sessions. Implementations must be safe to call concurrently from many tasks;
/// every write is atomic per session (a patch never interleaves with another write of the same
/// session) and broadcasts its event in the order it was applied.
#[tonic::async_trait]
pub trait SessionStore: Send + Sync + 'static {
    /// Short name for logs and metrics ("memory", "redis").
    fn kind(&self) -> &'static str;

    /// The store's epoch as last read, without I/O: what the service puts in every session it
    /// returns. A store guarantees it is known (not empty) once any call has succeeded, and
    /// refreshes it in the background where its data can be lost under it (Redis), so a new
    /// epoch shows within seconds.
    fn epoch(&self) -> Arc<str>;

    /// The store's epoch read from the store now (and remembered for [`Self::epoch`]); where
    /// the epoch is missing (the data was lost), a new one is made first. Used on the paths
    /// where a stale epoch would decide wrong: Restore and NOT_FOUND answers.
    async fn current_epoch(&self) -> StoreResult<Arc<str>>;

    /// Stores a new session (version 1). [`StoreError::IdTaken`] if the id exists,
    /// [`StoreError::TooLarge`] if the attributes exceed the limit. A session with a user is
    /// subject to the store's session cap ([`cap`]): the user's oldest sessions are deleted
    /// first, or [`StoreError::SessionCap`].
    async fn create(&self, new: NewSession) -> StoreResult<SessionRecord>;

    /// Reads a live session; with `touch`, also slides its expiry by its own ttl (one expiry
    /// update, version unchanged).
    async fn get(&self, namespace: &str, id: &str, touch: bool) -> StoreResult<SessionRecord>;

    /// Reads a live session from the store itself, never from a cache this server keeps of it
    /// (the Redis store's near cache), without sliding its expiry. Stores without a cache:
    /// [`SessionStore::get`].
    async fn get_uncached(&self, namespace: &str, id: &str) -> StoreResult<SessionRecord> {
        self.get(namespace, id, false).await
    }

    /// Applies an attribute-level patch atomically, bumps the version and slides the expiry.
    /// A patch that gives the session another (non-empty) user is subject to the session cap
    /// as a create is ([`cap`]).
    async fn update(&self, namespace: &str, id: &str, patch: Patch) -> StoreResult<SessionRecord>;

    /// Slides the expiry to now + ttl (the given one becomes the session's ttl), version
    /// unchanged.
    async fn touch(
        &self,
        namespace: &str,
        id: &str,
        ttl: Option<Duration>,
    ) -> StoreResult<SessionRecord>;

    /// Moves the session to `new_id` (data and created_at kept, version bumped, expiry slid)
    /// and deletes `old_id`.
    async fn regenerate(
        &self,
        namespace: &str,
        old_id: &str,
        new_id: &str,
    ) -> StoreResult<SessionRecord>;

    /// Deletes a session; false when there was no live one.
    async fn delete(&self, namespace: &str, id: &str) -> StoreResult<bool>;

    /// The live sessions of one user.
    async fn list_by_user(&self, namespace: &str, user_id: &str)
    -> StoreResult<Vec<SessionRecord>>;

    /// Deletes every session of one user; returns how many were deleted.
    async fn delete_by_user(&self, namespace: &str, user_id: &str) -> StoreResult<u64>;

    /// Recreates a session a store of another epoch held, from a client's snapshot: `record`
    /// is stored under its id at version 1 (its `version` and `expires_at` are ignored; it
    /// expires now + ttl; its `created_at` is kept), with a CREATED event, unless the id holds a
    /// live session ([`StoreError::Conflict`] with that session's version: restored already)
    /// or a tombstone ([`StoreError::Deleted`]: deleted less than one ttl ago). An expired
    /// session not yet removed counts as absent. Deletes (delete, delete-by-user, the old id of
    /// regenerate) leave the tombstone for one ttl so that this check can be made. A record
    /// with a user is subject to the session cap as a create is ([`cap`]).
    async fn restore(&self, record: SessionRecord) -> StoreResult<SessionRecord>;

    /// A receiver of every event of every namespace from now on, in the order applied.
    fn subscribe(&self) -> broadcast::Receiver<SessionEvent>;

    /// How many sessions are live, when the store can tell cheaply (memory store only).
    fn live_sessions(&self) -> Option<u64> {
        None
    }

    /// How many sessions this store instance has deleted to keep users under their session
    /// cap ([`cap::OnCap::EvictOldest`]) since it was made.
    fn session_cap_evictions(&self) -> u64 {
        0
    }

    /// What the store's near cache did so far (Redis with `--cache-capacity`); `None` without
    /// one.
    fn near_cache_stats(&self) -> Option<NearCacheStats> {
        None
    }
}

/// The counts of a store's near cache (see [`SessionStore::near_cache_stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NearCacheStats {
    /// Plain reads answered from the cache.
    pub hits: u64,
    /// Plain reads that went to the store while the cache was usable.
    pub misses: u64,
    /// Plain reads that went to the store because the cache's invalidation feed was down.
    pub bypasses: u64,
    /// Entries removed because their session was written, expired or flushed, or the feed was
    /// lost.
    pub invalidations: u64,
    /// Entries held now.
    pub entries: u64,
    /// Whether the invalidation feed is up (the cache is in use).
    pub up: bool,
}

/// A fresh epoch for a store ([`crate::id::new_epoch`]); a failed random source is
/// [`StoreError::Internal`].
pub(crate) fn fresh_epoch() -> StoreResult<Arc<str>> {
    crate::id::new_epoch()
        .map(Arc::from)
        .map_err(|_| StoreError::Internal("the system random source failed".into()))
}

/// The last epoch a network store read, for [`SessionStore::epoch`]: empty until the first read.
#[cfg(any(feature = "redis-store", feature = "mysql-store"))]
#[derive(Debug, Default)]
pub(crate) struct EpochCell(parking_lot::RwLock<Arc<str>>);

#[cfg(any(feature = "redis-store", feature = "mysql-store"))]
impl EpochCell {
    /// The epoch last remembered (empty before the first).
    pub(crate) fn get(&self) -> Arc<str> {
        Arc::clone(&self.0.read())
    }

    /// Remembers `epoch`, logging when it changed from a known one (the store lost its data).
    pub(crate) fn set(&self, store: &str, epoch: &Arc<str>) {
        let mut cached = self.0.write();
        if **cached != **epoch {
            if !cached.is_empty() {
                tracing::warn!(
                    store,
                    old = %cached,
                    new = %epoch,
                    "the session store has a new epoch: it lost its data"
                );
            }
            *cached = Arc::clone(epoch);
        }
    }
}

/// Total size of a set of attributes: the sum of key and value lengths. The one definition of
/// "session size" that every store enforces against `--max-session-bytes` (the Redis scripts
/// count the same way). The server's own attributes (keys starting with NUL: the write id, the
/// absolute lifetime's end) are not counted: a caller's session may use the whole limit.
pub fn attrs_size<'a>(attrs: impl IntoIterator<Item = (&'a String, &'a Vec<u8>)>) -> usize {
    attrs
        .into_iter()
        .map(|(k, v)| attr_size(k.as_bytes(), v))
        .sum()
}

/// One attribute's part of [`attrs_size`]: 0 for the server's own (a key starting with NUL).
pub fn attr_size(key: &[u8], value: &[u8]) -> usize {
    if key.first() == Some(&0) {
        0
    } else {
        key.len() + value.len()
    }
}

#[cfg(test)]
mod tests {
    use super::{redact_one_url, redact_url};

    #[test]
    fn urls_lose_their_credentials_in_logs() {
        assert_eq!(
            redact_url("mysql://root:pw@db:3306/test"),
            "mysql://***@db:3306/test"
        );
        assert_eq!(
            redact_url("mysql://root@127.0.0.1/test"),
            "mysql://***@127.0.0.1/test"
        );
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert_eq!(
            redact_one_url("mysql://u:pw@db/test?ssl-mode=verify_ca&ssl-ca=/etc/a,b@c/ca.pem"),
            "mysql://***@db/test?ssl-mode=verify_ca&ssl-ca=/etc/a,b@c/ca.pem"
        );
        assert_eq!(
            redact_one_url("mysql://db?ssl-ca=certs@x/ca.pem"),
            "mysql://db?ssl-ca=certs@x/ca.pem"
        );
    }
}
