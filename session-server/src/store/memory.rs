//! The in-memory store: the embedded default, nothing to set up, nothing kept across restarts.
//!
//! Sessions live in [`SHARDS`] shards, each a `RwLock` over a map and an expiry index ordered by
//! deadline. Reads of different sessions rarely share a lock, and readers never wait on expiry
//! work for long: a background reaper takes one shard's lock at a time and removes at most
//! [`REAP_BATCH`] expired sessions per turn. Expiry is also checked on every read, so an expired
//! session is never returned even before the reaper gets to it.
//!
//! A per-user index (sharded the same way) serves `ListByUser`/`DeleteByUser`. It is updated
//! while the session's shard lock is held, so it never disagrees with the sessions for long;
//! readers still verify each indexed session, which makes any leftover entry harmless.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use parking_lot::{Mutex, RwLock, RwLockWriteGuard};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use super::{
    EVENT_BUFFER, EventKind, NewSession, Patch, SessionEvent, SessionRecord, SessionStore,
    StoreError, StoreResult, attrs_size,
};

/// Number of shards. A power of two well above the core count keeps lock contention negligible
/// on the machines we target while costing a few KiB of empty maps.
pub const SHARDS: usize = 64;

/// Most sessions the reaper removes from one shard per turn, so that a mass expiry never holds a
/// shard's write lock for more than a few hundred microseconds.
pub const REAP_BATCH: usize = 1024;

/// How often the reaper runs by default. Expiry precision for reads does not depend on it (reads
/// check deadlines themselves); it only bounds how late memory is freed and EXPIRED is sent.
pub const DEFAULT_REAP_INTERVAL: Duration = Duration::from_millis(100);

/// A session's place in the store: namespace and id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Key {
    /// Namespace (already defaulted).
    namespace: String,
    /// Session id.
    id: String,
}

impl Key {
    fn new(namespace: &str, id: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            id: id.to_owned(),
        }
    }
}

/// One stored session.
#[derive(Debug, Clone)]
struct Entry {
    /// Owner, or empty.
    user_id: String,
    /// Application data.
    attrs: HashMap<String, Vec<u8>>,
    /// Cached [`attrs_size`] of `attrs`, so patches check the limit without a full scan.
    size: usize,
    /// Bumped by every write.
    version: u64,
    /// First creation time (kept across regenerate).
    created_at: SystemTime,
    /// Sliding time-to-live.
    ttl: Duration,
    /// Monotonic expiry deadline; the expiry index holds `(deadline, key)` for it.
    deadline: Instant,
    /// A tombstone: the session was deleted, and the entry (data dropped) stays for one ttl so
    /// that `restore` can refuse to bring it back.
    deleted: bool,
}

impl Entry {
    fn is_live(&self, now: Instant) -> bool {
        !self.deleted && self.deadline > now
    }

    /// Turns the entry into a tombstone for one ttl from `now`, returning what it held.
    fn bury(&mut self, now: Instant) -> Entry {
        let tombstone = Entry {
            user_id: String::new(),
            attrs: HashMap::new(),
            size: 0,
            version: self.version,
            created_at: self.created_at,
            ttl: self.ttl,
            deadline: now + self.ttl,
            deleted: true,
        };
        std::mem::replace(self, tombstone)
    }

    fn record(&self, key: &Key, now: Instant) -> SessionRecord {
        SessionRecord {
            id: key.id.clone(),
            namespace: key.namespace.clone(),
            user_id: self.user_id.clone(),
            attrs: self.attrs.clone(),
            version: self.version,
            created_at: self.created_at,
            expires_at: SystemTime::now() + self.deadline.saturating_duration_since(now),
            ttl: self.ttl,
        }
    }
}

/// One shard: its sessions and their expiry order.
#[derive(Debug, Default)]
struct Shard {
    /// The sessions of this shard.
    sessions: HashMap<Key, Entry>,
    /// `(deadline, key)` of every session, soonest first, for the reaper.
    expiry: BTreeSet<(Instant, Key)>,
}

impl Shard {
    /// The live entry under `key`, or NotFound.
    fn live_mut(&mut self, key: &Key, now: Instant) -> StoreResult<&mut Entry> {
        self.sessions
            .get_mut(key)
            .filter(|e| e.is_live(now))
            .ok_or(StoreError::NotFound)
    }

    /// Moves `key`'s deadline in the expiry index.
    fn reschedule(&mut self, key: &Key, old: Instant, new: Instant) {
        if old != new {
            self.expiry.remove(&(old, key.clone()));
            self.expiry.insert((new, key.clone()));
        }
    }

    fn insert(&mut self, key: Key, entry: Entry) {
        self.expiry.insert((entry.deadline, key.clone()));
        self.sessions.insert(key, entry);
    }

    fn remove(&mut self, key: &Key) -> Option<Entry> {
        let entry = self.sessions.remove(key)?;
        self.expiry.remove(&(entry.deadline, key.clone()));
        Some(entry)
    }
}

/// Ids of each user's sessions, keyed by `(namespace, user_id)`.
type UserShard = HashMap<(String, String), HashSet<String>>;

/// State shared by the store handle and its reaper task.
#[derive(Debug)]
struct Inner {
    /// Session shards, chosen by a hash of the key.
    shards: Box<[RwLock<Shard>]>,
    /// Per-user index shards, chosen by a hash of `(namespace, user_id)`.
    users: Box<[Mutex<UserShard>]>,
    /// Hash seed for shard choice.
    hasher: RandomState,
    /// Events to watchers.
    events: broadcast::Sender<SessionEvent>,
    /// The `--max-session-bytes` limit.
    max_session_bytes: usize,
    /// Sessions stored (including expired ones not yet reaped).
    live: AtomicU64,
}

/// The in-memory [`SessionStore`]. Dropping it stops its reaper.
#[derive(Debug)]
pub struct MemoryStore {
    /// Shared state.
    inner: Arc<Inner>,
    /// The background reaper, aborted on drop.
    reaper: JoinHandle<()>,
}

impl MemoryStore {
    /// A store with the default reaper interval. Must be called inside a tokio runtime.
    pub fn new(max_session_bytes: usize) -> Self {
        Self::with_reap_interval(max_session_bytes, DEFAULT_REAP_INTERVAL)
    }

    /// A store whose reaper runs every `interval`. Must be called inside a tokio runtime.
    pub fn with_reap_interval(max_session_bytes: usize, interval: Duration) -> Self {
        let inner = Arc::new(Inner {
            shards: (0..SHARDS).map(|_| RwLock::new(Shard::default())).collect(),
            users: (0..SHARDS).map(|_| Mutex::new(UserShard::new())).collect(),
            hasher: RandomState::new(),
            events: broadcast::channel(EVENT_BUFFER).0,
            max_session_bytes,
            live: AtomicU64::new(0),
        });
        let weak = Arc::downgrade(&inner);
        let reaper = tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                inner.reap(Instant::now());
            }
        });
        Self { inner, reaper }
    }
}

impl Drop for MemoryStore {
    fn drop(&mut self) {
        self.reaper.abort();
    }
}

impl Inner {
    fn shard_index(&self, key: &Key) -> usize {
        (self.hasher.hash_one(key) as usize) % SHARDS
    }

    fn shard(&self, key: &Key) -> RwLockWriteGuard<'_, Shard> {
        self.shards[self.shard_index(key)].write()
    }

    fn user_shard(&self, namespace: &str, user_id: &str) -> &Mutex<UserShard> {
        &self.users[(self.hasher.hash_one((namespace, user_id)) as usize) % SHARDS]
    }

    fn index_add(&self, namespace: &str, user_id: &str, id: &str) {
        if user_id.is_empty() {
            return;
        }
        self.user_shard(namespace, user_id)
            .lock()
            .entry((namespace.to_owned(), user_id.to_owned()))
            .or_default()
            .insert(id.to_owned());
    }

    fn index_remove(&self, namespace: &str, user_id: &str, id: &str) {
        if user_id.is_empty() {
            return;
        }
        let mut users = self.user_shard(namespace, user_id).lock();
        let user_key = (namespace.to_owned(), user_id.to_owned());
        if let Some(ids) = users.get_mut(&user_key) {
            ids.remove(id);
            if ids.is_empty() {
                users.remove(&user_key);
            }
        }
    }

    fn index_ids(&self, namespace: &str, user_id: &str) -> Vec<String> {
        self.user_shard(namespace, user_id)
            .lock()
            .get(&(namespace.to_owned(), user_id.to_owned()))
            .map(|ids| ids.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Sends an event; called with the session's shard lock held so events keep write order.
    fn emit(&self, kind: EventKind, key: &Key, user_id: &str, version: u64) {
        // No receiver is not an error: nobody is watching.
        let _ = self.events.send(SessionEvent {
            kind,
            namespace: key.namespace.clone(),
            id: key.id.clone(),
            user_id: user_id.to_owned(),
            version,
            at: SystemTime::now(),
        });
    }

    /// Deletes a live session under its held shard lock: leaves a tombstone for one ttl, drops
    /// its index entry, sends DELETED. Returns what it held.
    fn delete_locked(&self, shard: &mut Shard, key: &Key, now: Instant) -> Option<Entry> {
        let entry = shard.sessions.get_mut(key).filter(|e| e.is_live(now))?;
        let old_deadline = entry.deadline;
        let gone = entry.bury(now);
        let new_deadline = entry.deadline;
        shard.reschedule(key, old_deadline, new_deadline);
        self.live.fetch_sub(1, Ordering::Relaxed);
        self.index_remove(&key.namespace, &gone.user_id, &key.id);
        self.emit(EventKind::Deleted, key, &gone.user_id, gone.version);
        Some(gone)
    }

    /// Drops an entry whose deadline passed: a session (index entry and EXPIRED event) or a
    /// tombstone (silently).
    fn expire_locked(&self, shard: &mut Shard, key: &Key) {
        let Some(entry) = shard.remove(key) else {
            return;
        };
        if entry.deleted {
            return;
        }
        self.live.fetch_sub(1, Ordering::Relaxed);
        self.index_remove(&key.namespace, &entry.user_id, &key.id);
        self.emit(EventKind::Expired, key, &entry.user_id, 0);
    }

    /// One reaper turn: each shard in turn, at most [`REAP_BATCH`] expired sessions each.
    fn reap(&self, now: Instant) {
        for shard in self.shards.iter() {
            // Peek under the read lock first, so idle shards never take the write lock.
            let due = shard
                .read()
                .expiry
                .first()
                .is_some_and(|(deadline, _)| *deadline <= now);
            if !due {
                continue;
            }
            let mut shard = shard.write();
            for _ in 0..REAP_BATCH {
                let key = match shard.expiry.first() {
                    Some((deadline, key)) if *deadline <= now => key.clone(),
                    _ => break,
                };
                self.expire_locked(&mut shard, &key);
            }
        }
    }

    fn check_size(&self, size: usize) -> StoreResult<()> {
        if size > self.max_session_bytes {
            return Err(StoreError::TooLarge {
                size,
                limit: self.max_session_bytes,
            });
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl SessionStore for MemoryStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn create(&self, new: NewSession) -> StoreResult<SessionRecord> {
        let inner = &self.inner;
        let size = attrs_size(&new.attrs);
        inner.check_size(size)?;
        let key = Key::new(&new.namespace, &new.id);
        let now = Instant::now();
        let mut shard = inner.shard(&key);
        if shard.sessions.contains_key(&key) {
            return Err(StoreError::IdTaken);
        }
        let entry = Entry {
            user_id: new.user_id,
            attrs: new.attrs,
            size,
            version: 1,
            created_at: SystemTime::now(),
            ttl: new.ttl,
            deadline: now + new.ttl,
            deleted: false,
        };
        let record = entry.record(&key, now);
        inner.index_add(&key.namespace, &entry.user_id, &key.id);
        inner.emit(EventKind::Created, &key, &entry.user_id, 1);
        shard.insert(key, entry);
        inner.live.fetch_add(1, Ordering::Relaxed);
        Ok(record)
    }

    async fn get(&self, namespace: &str, id: &str, touch: bool) -> StoreResult<SessionRecord> {
        if touch {
            return self.touch(namespace, id, None).await;
        }
        let key = Key::new(namespace, id);
        let now = Instant::now();
        let shard = self.inner.shards[self.inner.shard_index(&key)].read();
        shard
            .sessions
            .get(&key)
            .filter(|e| e.is_live(now))
            .map(|e| e.record(&key, now))
            .ok_or(StoreError::NotFound)
    }

    async fn update(&self, namespace: &str, id: &str, patch: Patch) -> StoreResult<SessionRecord> {
        let inner = &self.inner;
        let key = Key::new(namespace, id);
        let now = Instant::now();
        let mut shard = inner.shard(&key);
        let entry = shard.live_mut(&key, now)?;
        if let Some(expected) = patch.expected_version
            && expected != entry.version
        {
            return Err(StoreError::Conflict {
                expected,
                actual: entry.version,
            });
        }
        // Size of the merged result, computed before anything changes.
        // A key both set and removed ends up set; a key removed twice is removed once.
        let removed: HashSet<&String> = patch
            .remove
            .iter()
            .filter(|name| !patch.set.contains_key(*name))
            .collect();
        let mut size = entry.size;
        for name in &removed {
            if let Some(old) = entry.attrs.get(*name) {
                size -= name.len() + old.len();
            }
        }
        for (name, value) in &patch.set {
            if let Some(old) = entry.attrs.get(name) {
                size -= name.len() + old.len();
            }
            size += name.len() + value.len();
        }
        inner.check_size(size)?;

        for name in removed {
            entry.attrs.remove(name);
        }
        entry.attrs.extend(patch.set);
        entry.size = size;
        entry.version += 1;
        let old_user = match patch.user_id {
            Some(user) if user != entry.user_id => {
                Some(std::mem::replace(&mut entry.user_id, user))
            }
            _ => None,
        };
        if let Some(ttl) = patch.ttl {
            entry.ttl = ttl;
        }
        let old_deadline = entry.deadline;
        entry.deadline = now + entry.ttl;
        let (new_deadline, user_id, version) =
            (entry.deadline, entry.user_id.clone(), entry.version);
        let record = entry.record(&key, now);
        shard.reschedule(&key, old_deadline, new_deadline);
        if let Some(old_user) = old_user {
            inner.index_remove(namespace, &old_user, id);
            inner.index_add(namespace, &user_id, id);
        }
        inner.emit(EventKind::Updated, &key, &user_id, version);
        Ok(record)
    }

    async fn touch(
        &self,
        namespace: &str,
        id: &str,
        ttl: Option<Duration>,
    ) -> StoreResult<SessionRecord> {
        let key = Key::new(namespace, id);
        let now = Instant::now();
        let mut shard = self.inner.shard(&key);
        let entry = shard.live_mut(&key, now)?;
        if let Some(ttl) = ttl {
            entry.ttl = ttl;
        }
        let old_deadline = entry.deadline;
        entry.deadline = now + entry.ttl;
        let new_deadline = entry.deadline;
        let record = entry.record(&key, now);
        shard.reschedule(&key, old_deadline, new_deadline);
        Ok(record)
    }

    async fn regenerate(
        &self,
        namespace: &str,
        old_id: &str,
        new_id: &str,
    ) -> StoreResult<SessionRecord> {
        let inner = &self.inner;
        let old_key = Key::new(namespace, old_id);
        let new_key = Key::new(namespace, new_id);
        let now = Instant::now();
        let (old_index, new_index) = (inner.shard_index(&old_key), inner.shard_index(&new_key));
        // Both shards locked (in index order, so two regenerates never deadlock) for the whole
        // move: nobody sees the session under both ids, or under neither.
        let (mut first, mut second) = match old_index.cmp(&new_index) {
            std::cmp::Ordering::Equal => (inner.shards[old_index].write(), None),
            std::cmp::Ordering::Less => {
                let a = inner.shards[old_index].write();
                (a, Some(inner.shards[new_index].write()))
            }
            std::cmp::Ordering::Greater => {
                let b = inner.shards[new_index].write();
                (inner.shards[old_index].write(), Some(b))
            }
        };
        let old_shard: &mut Shard = &mut first;
        old_shard.live_mut(&old_key, now)?;
        let new_taken = match second.as_deref() {
            Some(new_shard) => new_shard.sessions.contains_key(&new_key),
            None => old_shard.sessions.contains_key(&new_key),
        };
        if new_taken {
            return Err(StoreError::IdTaken);
        }
        let Some(old_entry) = old_shard.sessions.get_mut(&old_key) else {
            return Err(StoreError::NotFound);
        };
        // The old id becomes a tombstone: its snapshot cookies can never restore it.
        let old_deadline = old_entry.deadline;
        let mut entry = old_entry.bury(now);
        let buried_deadline = old_entry.deadline;
        old_shard.reschedule(&old_key, old_deadline, buried_deadline);
        inner.index_remove(namespace, &entry.user_id, old_id);
        entry.version += 1;
        entry.deadline = now + entry.ttl;
        let record = entry.record(&new_key, now);
        inner.index_add(namespace, &entry.user_id, new_id);
        inner.emit(EventKind::Created, &new_key, &entry.user_id, entry.version);
        inner.emit(EventKind::Deleted, &old_key, &entry.user_id, entry.version);
        match second.as_deref_mut() {
            Some(new_shard) => new_shard.insert(new_key, entry),
            None => old_shard.insert(new_key, entry),
        }
        Ok(record)
    }

    async fn delete(&self, namespace: &str, id: &str) -> StoreResult<bool> {
        let key = Key::new(namespace, id);
        let now = Instant::now();
        let mut shard = self.inner.shard(&key);
        // Missing, a tombstone, or expired and not yet reaped (the reaper sends EXPIRED for it):
        // nothing live to delete.
        Ok(self.inner.delete_locked(&mut shard, &key, now).is_some())
    }

    async fn list_by_user(
        &self,
        namespace: &str,
        user_id: &str,
    ) -> StoreResult<Vec<SessionRecord>> {
        let mut sessions = Vec::new();
        for id in self.inner.index_ids(namespace, user_id) {
            match self.get(namespace, &id, false).await {
                Ok(record) if record.user_id == user_id => sessions.push(record),
                Ok(_) | Err(StoreError::NotFound) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(sessions)
    }

    async fn delete_by_user(&self, namespace: &str, user_id: &str) -> StoreResult<u64> {
        let mut deleted = 0;
        for id in self.inner.index_ids(namespace, user_id) {
            let key = Key::new(namespace, &id);
            let now = Instant::now();
            let mut shard = self.inner.shard(&key);
            let owned = shard
                .live_mut(&key, now)
                .is_ok_and(|e| e.user_id == user_id);
            if owned && self.inner.delete_locked(&mut shard, &key, now).is_some() {
                deleted += 1;
            }
        }
        Ok(deleted)
    }

    async fn restore(&self, record: SessionRecord) -> StoreResult<SessionRecord> {
        let inner = &self.inner;
        let size = attrs_size(&record.attrs);
        inner.check_size(size)?;
        let key = Key::new(&record.namespace, &record.id);
        let now = Instant::now();
        let mut shard = inner.shard(&key);
        let existing = shard.sessions.get(&key).filter(|e| e.deadline > now);
        match existing {
            Some(e) if e.deleted => return Err(StoreError::Deleted),
            Some(e) if e.version >= record.version => return Ok(e.record(&key, now)),
            _ => {}
        }
        let entry = Entry {
            user_id: record.user_id,
            attrs: record.attrs,
            size,
            version: record.version,
            created_at: record.created_at,
            ttl: record.ttl,
            deadline: now + record.ttl,
            deleted: false,
        };
        let restored = entry.record(&key, now);
        let kind = match shard.remove(&key) {
            Some(old) if old.is_live(now) => {
                inner.index_remove(&key.namespace, &old.user_id, &key.id);
                EventKind::Updated
            }
            Some(old) => {
                // An expired, unreaped session: it is replaced, so it is gone for good.
                if !old.deleted {
                    inner.live.fetch_sub(1, Ordering::Relaxed);
                    inner.index_remove(&key.namespace, &old.user_id, &key.id);
                }
                inner.live.fetch_add(1, Ordering::Relaxed);
                EventKind::Created
            }
            None => {
                inner.live.fetch_add(1, Ordering::Relaxed);
                EventKind::Created
            }
        };
        inner.index_add(&key.namespace, &entry.user_id, &key.id);
        inner.emit(kind, &key, &entry.user_id, entry.version);
        shard.insert(key, entry);
        Ok(restored)
    }

    fn subscribe(&self) -> broadcast::Receiver<SessionEvent> {
        self.inner.events.subscribe()
    }

    fn live_sessions(&self) -> Option<u64> {
        Some(self.inner.live.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_session(id: &str, user: &str, ttl: Duration) -> NewSession {
        NewSession {
            id: id.to_owned(),
            namespace: "default".to_owned(),
            user_id: user.to_owned(),
            attrs: HashMap::from([("k".to_owned(), b"v".to_vec())]),
            ttl,
        }
    }

    #[tokio::test]
    async fn reaper_frees_expired_sessions_and_reports_them() {
        let store = MemoryStore::with_reap_interval(1024, Duration::from_millis(10));
        let mut events = store.subscribe();
        store
            .create(new_session(&"a".repeat(32), "u", Duration::from_millis(30)))
            .await
            .unwrap();
        assert_eq!(store.live_sessions(), Some(1));
        assert_eq!(events.recv().await.unwrap().kind, EventKind::Created);
        let expired = tokio::time::timeout(Duration::from_secs(5), events.recv())
            .await
            .expect("EXPIRED within 5s")
            .unwrap();
        assert_eq!(expired.kind, EventKind::Expired);
        assert_eq!(expired.user_id, "u");
        assert_eq!(store.live_sessions(), Some(0));
        assert!(
            store.inner.index_ids("default", "u").is_empty(),
            "user index cleaned"
        );
    }

    #[tokio::test]
    async fn reaper_batches_a_mass_expiry() {
        let store = MemoryStore::with_reap_interval(1024, Duration::from_secs(3600));
        let ttl = Duration::from_millis(1);
        for i in 0..(SHARDS * REAP_BATCH / 8) {
            store
                .create(new_session(&format!("{i:0>32}"), "", ttl))
                .await
                .unwrap();
        }
        let total = store.live_sessions().unwrap();
        let later = Instant::now() + Duration::from_millis(5);
        store.inner.reap(later);
        assert_eq!(
            store.live_sessions(),
            Some(0),
            "all {total} reaped in one turn"
        );
    }

    #[tokio::test]
    async fn expired_but_unreaped_session_is_never_returned() {
        let store = MemoryStore::with_reap_interval(1024, Duration::from_secs(3600));
        let id = "b".repeat(32);
        store
            .create(new_session(&id, "u", Duration::from_millis(1)))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(matches!(
            store.get("default", &id, false).await,
            Err(StoreError::NotFound)
        ));
        assert!(matches!(
            store.get("default", &id, true).await,
            Err(StoreError::NotFound)
        ));
        assert!(store.list_by_user("default", "u").await.unwrap().is_empty());
        assert!(!store.delete("default", &id).await.unwrap());
    }
}
