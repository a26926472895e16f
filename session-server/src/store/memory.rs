//! The in-memory store: the embedded default, nothing to set up, nothing kept across restarts.
//!
//! Sessions live in [`SHARDS`] shards chosen by a hash of `(namespace, id)`, each a `RwLock`
//! over a slab of entries, a hash table of slots and an expiry index. Reads of different
//! sessions rarely share a lock, and readers never wait on expiry work for long: a background
//! reaper takes one shard's lock at a time and handles at most [`REAP_BATCH`] due index elements
//! per turn. Expiry is also checked on every read, so an expired session is never returned even
//! before the reaper gets to it.
//!
//! # Layout
//!
//! Memory per session is what issue 7 is about, so each session is small and its key is stored
//! once:
//!
//! - `packed`: a session's namespace, id, owner, creation time and attributes in one exactly
//!   sized allocation; a record's attribute map is decoded from it only when one is returned.
//! - `shard`: a slab of 48-byte entries (packed bytes, version, ttl, deadlines as nanoseconds
//!   since the store's start), a `hashbrown::HashTable` of `u32` slots looked up by
//!   `(&str, &str)` without allocating (foldhash, randomly seeded), and a binary heap of
//!   `(deadline, slot)` for expiry. The heap is rescheduled lazily: a sliding read stores the new
//!   deadline in the entry's atomic under the shard's read lock, and the reaper puts an entry it
//!   finds slid back in the heap instead of expiring it; only a deadline moved earlier (a write
//!   shortening the ttl, a delete) is indexed at once, leaving the old element to be skipped as
//!   stale when it comes due. The heap thus holds one element per entry plus one per such
//!   write within the longest ttl.
//! - `users`: the per-user index that serves `ListByUser`/`DeleteByUser`, updated while the
//!   session's shard lock is held.
//! - `admission`: the per-user session cap ([`crate::store::cap`]): a write that makes a
//!   session join a user holds that user's admission lock while it counts the user's sessions,
//!   evicts the oldest and writes, with every shard it touches write-locked at once.
//! - `regenerate`: the move of a session to a new id, both shards write-locked at once.
//!
//! Deletes leave a tombstone (key and creation time only) for one ttl so that `restore` can
//! refuse to bring the session back.
//!
//! # Epoch
//! The store's epoch (see [`super`]) is made when the store is: nothing survives a restart, so
//! every start is a new epoch. Restore's epoch read and its write are two calls here too, but
//! the epoch of one store never changes, so nothing can come between them.

mod admission;
mod packed;
mod regenerate;
mod shard;
#[cfg(test)]
mod tests;
mod users;

use std::collections::{HashMap, HashSet};
use std::hash::RandomState;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use hashbrown::DefaultHashBuilder;
use parking_lot::RwLock;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use self::admission::{Admission, CapState};
use self::packed::{Head, Packed, text};
use self::shard::{Entry, Reaped, Shard, key_hash};
use self::users::UserIndex;
use super::cap::SessionCap;
use super::{
    EVENT_BUFFER, EventKind, NewSession, Patch, SessionEvent, SessionRecord, SessionStore,
    StoreError, StoreResult, attr_size, attrs_size,
};

/// Number of shards. A power of two well above the core count keeps lock contention negligible
/// on the machines we target while costing a few KiB of empty maps.
pub const SHARDS: usize = 64;

/// Most due index elements the reaper handles in one shard per turn, so that a mass expiry never
/// holds a shard's write lock for more than a few hundred microseconds.
pub const REAP_BATCH: usize = 1024;

/// How often the reaper runs by default. Expiry precision for reads does not depend on it (reads
/// check deadlines themselves); it only bounds how late memory is freed and EXPIRED is sent.
pub const DEFAULT_REAP_INTERVAL: Duration = Duration::from_millis(100);

/// State shared by the store handle and its reaper task.
#[derive(Debug)]
struct Inner {
    /// Session shards, chosen by bits of the key hash that the shard's own table does not use.
    shards: Box<[RwLock<Shard>]>,
    /// Who owns which sessions.
    users: UserIndex,
    /// Hash seed for keys, shared with every shard. Foldhash, randomly seeded: keys are mostly
    /// server-made random ids, and SipHash was a tenth of a Get.
    hasher: DefaultHashBuilder,
    /// Deadlines count nanoseconds from here.
    origin: Instant,
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
    /// The store's epoch, made with it (its data lives exactly as long).
    store_epoch: Arc<str>,
    /// The background reaper, aborted on drop.
    reaper: JoinHandle<()>,
    /// The per-user session cap, its admission locks and its eviction count.
    cap: CapState,
}

impl MemoryStore {
    /// A store with the default reaper interval. Must be called inside a tokio runtime.
    ///
    /// # Panics
    /// If the operating system's random source fails (no epoch, and no session id, can be made).
    pub fn new(max_session_bytes: usize) -> Self {
        Self::with_reap_interval(max_session_bytes, DEFAULT_REAP_INTERVAL)
    }

    /// A store whose reaper runs every `interval`. Must be called inside a tokio runtime.
    ///
    /// # Panics
    /// If the operating system's random source fails (no epoch, and no session id, can be made).
    pub fn with_reap_interval(max_session_bytes: usize, interval: Duration) -> Self {
        let hasher = DefaultHashBuilder::default();
        let inner = Arc::new(Inner {
            shards: (0..SHARDS)
                .map(|_| RwLock::new(Shard::new(hasher.clone())))
                .collect(),
            users: UserIndex::new(RandomState::new()),
            hasher,
            origin: Instant::now(),
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
        let store_epoch = super::fresh_epoch().expect("the system random source failed");
        Self {
            inner,
            store_epoch,
            reaper,
            cap: CapState::new(SessionCap::UNLIMITED),
        }
    }

    /// This store with a per-user session cap (none by default); see [`crate::store::cap`].
    pub fn with_session_cap(mut self, cap: SessionCap) -> Self {
        self.cap = CapState::new(cap);
        self
    }
}

impl Drop for MemoryStore {
    fn drop(&mut self) {
        self.reaper.abort();
    }
}

/// A ttl in nanoseconds, saturating (at 584 years).
fn ttl_nanos(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX)
}

impl Inner {
    /// Nanoseconds from the store's start (`origin`) to `at`.
    fn ticks(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.origin).as_nanos()).unwrap_or(u64::MAX)
    }

    fn now(&self) -> u64 {
        self.ticks(Instant::now())
    }

    fn hash(&self, namespace: &str, id: &str) -> u64 {
        key_hash(&self.hasher, namespace.as_bytes(), id.as_bytes())
    }

    /// The shard index of a key hash. Bits 32.. pick it: a shard's table uses the low bits for
    /// buckets and the top seven as tags, which would otherwise be the same across a shard.
    fn shard_index(&self, hash: u64) -> usize {
        ((hash >> 32) as usize) % SHARDS
    }

    fn shard(&self, hash: u64) -> &RwLock<Shard> {
        &self.shards[self.shard_index(hash)]
    }

    /// Sends an event; called with the session's shard lock held so events keep write order.
    fn emit(&self, kind: EventKind, namespace: &str, id: &str, user_id: &str, version: u64) {
        // No receiver is not an error: nobody is watching.
        let _ = self.events.send(SessionEvent {
            kind,
            namespace: namespace.to_owned(),
            id: id.to_owned(),
            user_id: user_id.to_owned(),
            version,
            at: SystemTime::now(),
        });
    }

    /// Deletes a live session under its held shard lock: leaves a tombstone for one ttl, drops
    /// its index entry, sends DELETED. False when there was no live session.
    fn delete_locked(&self, shard: &mut Shard, hash: u64, ns: &str, id: &str, now: u64) -> bool {
        let Some(mut live) = shard.live_mut(hash, ns, id, now) else {
            return false;
        };
        let gone = live.bury(now);
        self.live.fetch_sub(1, Ordering::Relaxed);
        self.users.remove(ns, gone.user_id(), id);
        self.emit(
            EventKind::Deleted,
            ns,
            id,
            gone.user_id(),
            live.entry.version,
        );
        true
    }

    /// One reaper turn: each shard in turn, at most [`REAP_BATCH`] due index elements each.
    /// Sessions that slid later are indexed again; the rest expire (index entry dropped, EXPIRED
    /// sent), and tombstones vanish silently.
    fn reap(&self, at: Instant) {
        let now = self.ticks(at);
        for shard in self.shards.iter() {
            // Peek under the read lock first, so idle shards never take the write lock.
            if !shard.read().is_due(now) {
                continue;
            }
            let mut shard = shard.write();
            for _ in 0..REAP_BATCH {
                let gone = match shard.reap_next(now) {
                    Reaped::NotDue => break,
                    Reaped::Kept => continue,
                    Reaped::Gone(packed) => packed,
                };
                if gone.is_deleted() {
                    continue;
                }
                let (namespace, id) = gone.key();
                let (namespace, id, user_id) = (text(namespace), text(id), gone.user_id());
                self.live.fetch_sub(1, Ordering::Relaxed);
                self.users.remove(namespace, user_id, id);
                self.emit(EventKind::Expired, namespace, id, user_id, 0);
            }
        }
    }

    /// Reads a live session, sliding its expiry when `touch`: under the shard's read lock.
    fn lookup(&self, namespace: &str, id: &str, touch: bool) -> StoreResult<SessionRecord> {
        let now = self.now();
        let hash = self.hash(namespace, id);
        let shard = self.shard(hash).read();
        let entry = shard
            .get(hash, namespace, id)
            .filter(|e| e.is_live(now))
            .ok_or(StoreError::NotFound)?;
        let deadline = if touch {
            entry.slide(now)
        } else {
            entry.deadline()
        };
        Ok(entry.record(namespace, id, deadline, now))
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

    fn epoch(&self) -> Arc<str> {
        Arc::clone(&self.store_epoch)
    }

    async fn current_epoch(&self) -> StoreResult<Arc<str>> {
        Ok(self.epoch())
    }

    async fn create(&self, new: NewSession) -> StoreResult<SessionRecord> {
        let inner = &self.inner;
        inner.check_size(attrs_size(&new.attrs))?;
        let admission = inner.admit(&self.cap, &new.namespace, &new.user_id, &new.id)?;
        let now = inner.now();
        let hash = inner.hash(&new.namespace, &new.id);
        let mut locked = inner.lock_shards(hash, &admission);
        if locked
            .of(inner, hash)?
            .find(hash, &new.namespace, &new.id)
            .is_some()
        {
            return Err(StoreError::IdTaken);
        }
        let evicted = inner.evict(&mut locked, &new.namespace, &admission, now);
        self.cap.evicted.add(evicted);
        let shard = locked.of(inner, hash)?;
        let created_at = SystemTime::now();
        let head = Head {
            namespace: &new.namespace,
            id: &new.id,
            user_id: &new.user_id,
            created_at,
            deleted: false,
        };
        let ttl = ttl_nanos(new.ttl);
        let deadline = now.saturating_add(ttl);
        let entry = Entry::new(Packed::from_map(&head, &new.attrs), 1, ttl, deadline);
        shard.insert(hash, entry)?;
        inner.live.fetch_add(1, Ordering::Relaxed);
        inner.users.add(&new.namespace, &new.user_id, &new.id);
        inner.emit(EventKind::Created, &new.namespace, &new.id, &new.user_id, 1);
        Ok(SessionRecord {
            id: new.id,
            namespace: new.namespace,
            user_id: new.user_id,
            attrs: new.attrs,
            version: 1,
            created_at,
            expires_at: created_at
                .checked_add(Duration::from_nanos(ttl))
                .unwrap_or(created_at),
            ttl: Duration::from_nanos(ttl),
        })
    }

    async fn get(&self, namespace: &str, id: &str, touch: bool) -> StoreResult<SessionRecord> {
        self.inner.lookup(namespace, id, touch)
    }

    async fn update(&self, namespace: &str, id: &str, patch: Patch) -> StoreResult<SessionRecord> {
        let inner = &self.inner;
        let admission = match patch.user_id.as_deref() {
            Some(user) => self.admit_existing(namespace, user, id)?,
            None => Admission::default(),
        };
        let now = inner.now();
        let hash = inner.hash(namespace, id);
        let mut locked = inner.lock_shards(hash, &admission);
        // Checked and merged first: a session joining a capped user evicts only once the
        // patch is known to apply.
        let (packed, mut attrs, user_id, old_user, created_at) = {
            let shard = locked.of(inner, hash)?;
            let entry = shard
                .get(hash, namespace, id)
                .filter(|e| e.is_live(now))
                .ok_or(StoreError::NotFound)?;
            if let Some(expected) = patch.expected_version
                && expected != entry.version
            {
                return Err(StoreError::Conflict {
                    expected,
                    actual: entry.version,
                });
            }
            // The merged attributes: the stored ones neither set nor removed, then the set
            // ones. A key both set and removed ends up set; a key removed twice is removed once.
            let (old_user_id, attrs) = entry.packed.owner_and_attrs();
            let removed: HashSet<&[u8]> = patch.remove.iter().map(|name| name.as_bytes()).collect();
            // Collected once: the filter hashes each name, and the merge is walked four times.
            let kept: Vec<(&[u8], &[u8])> = attrs
                .filter(|(name, _)| !removed.contains(name) && !patch.set.contains_key(text(name)))
                .collect();
            let merged = kept.iter().copied().chain(
                patch
                    .set
                    .iter()
                    .map(|(name, value)| (name.as_bytes(), value.as_slice())),
            );
            // Size of the merged result, checked before anything changes.
            inner.check_size(merged.clone().map(|(n, v)| attr_size(n, v)).sum())?;

            let user_id = patch.user_id.as_deref().unwrap_or(old_user_id);
            let old_user = (user_id != old_user_id).then(|| old_user_id.to_owned());
            let created_at = entry.packed.created_at();
            let head = Head {
                namespace,
                id,
                user_id,
                created_at,
                deleted: false,
            };
            let packed = Packed::new(&head, merged);
            // The record's map: the kept attributes decoded, the set ones moved in below.
            let mut attrs = HashMap::with_capacity(kept.len() + patch.set.len());
            attrs.extend(
                kept.into_iter()
                    .map(|(name, value)| (text(name).to_owned(), value.to_vec())),
            );
            (packed, attrs, user_id.to_owned(), old_user, created_at)
        };
        attrs.extend(patch.set);
        if old_user.is_some() {
            let evicted = inner.evict(&mut locked, namespace, &admission, now);
            self.cap.evicted.add(evicted);
        }
        let shard = locked.of(inner, hash)?;
        let mut live = shard
            .live_mut(hash, namespace, id, now)
            .ok_or(StoreError::NotFound)?;
        let entry = &mut *live.entry;
        entry.packed = packed;
        entry.version = entry.version.wrapping_add(1);
        if let Some(ttl) = patch.ttl {
            entry.ttl = ttl_nanos(ttl);
        }
        let (version, ttl) = (entry.version, entry.ttl);
        let deadline = now.saturating_add(ttl);
        live.set_deadline(deadline);
        if let Some(old_user) = old_user {
            inner.users.remove(namespace, &old_user, id);
            inner.users.add(namespace, &user_id, id);
        }
        inner.emit(EventKind::Updated, namespace, id, &user_id, version);
        let wall = SystemTime::now();
        let left = Duration::from_nanos(ttl);
        Ok(SessionRecord {
            id: id.to_owned(),
            namespace: namespace.to_owned(),
            user_id,
            attrs,
            version,
            created_at,
            expires_at: wall.checked_add(left).unwrap_or(wall),
            ttl: left,
        })
    }

    async fn touch(
        &self,
        namespace: &str,
        id: &str,
        ttl: Option<Duration>,
    ) -> StoreResult<SessionRecord> {
        let Some(ttl) = ttl else {
            // Keeping its own ttl only moves the deadline later: a read-locked slide.
            return self.inner.lookup(namespace, id, true);
        };
        let inner = &self.inner;
        let now = inner.now();
        let hash = inner.hash(namespace, id);
        let mut shard = inner.shard(hash).write();
        let mut live = shard
            .live_mut(hash, namespace, id, now)
            .ok_or(StoreError::NotFound)?;
        live.entry.ttl = ttl_nanos(ttl);
        let deadline = now.saturating_add(live.entry.ttl);
        live.set_deadline(deadline);
        Ok(live.entry.record(namespace, id, deadline, now))
    }

    async fn regenerate(
        &self,
        namespace: &str,
        old_id: &str,
        new_id: &str,
    ) -> StoreResult<SessionRecord> {
        self.regenerate_in(namespace, old_id, new_id)
    }

    async fn delete(&self, namespace: &str, id: &str) -> StoreResult<bool> {
        let inner = &self.inner;
        let now = inner.now();
        let hash = inner.hash(namespace, id);
        let mut shard = inner.shard(hash).write();
        // Missing, a tombstone, or expired and not yet reaped (the reaper sends EXPIRED for it):
        // nothing live to delete.
        Ok(inner.delete_locked(&mut shard, hash, namespace, id, now))
    }

    async fn list_by_user(
        &self,
        namespace: &str,
        user_id: &str,
    ) -> StoreResult<Vec<SessionRecord>> {
        let mut sessions = Vec::new();
        for id in self.inner.users.ids(namespace, user_id) {
            match self.inner.lookup(namespace, &id, false) {
                Ok(record) if record.user_id == user_id => sessions.push(record),
                Ok(_) | Err(StoreError::NotFound) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(sessions)
    }

    async fn delete_by_user(&self, namespace: &str, user_id: &str) -> StoreResult<u64> {
        let inner = &self.inner;
        let mut deleted = 0;
        for id in inner.users.ids(namespace, user_id) {
            let now = inner.now();
            let hash = inner.hash(namespace, &id);
            let mut shard = inner.shard(hash).write();
            let owned = shard
                .get(hash, namespace, &id)
                .is_some_and(|e| e.is_live(now) && e.packed.user_id() == user_id);
            if owned && inner.delete_locked(&mut shard, hash, namespace, &id, now) {
                deleted += 1;
            }
        }
        Ok(deleted)
    }

    async fn restore(&self, record: SessionRecord) -> StoreResult<SessionRecord> {
        let inner = &self.inner;
        inner.check_size(attrs_size(&record.attrs))?;
        let (namespace, id) = (record.namespace.as_str(), record.id.as_str());
        let hash = inner.hash(namespace, id);
        let admission = match inner.admit(&self.cap, namespace, &record.user_id, id) {
            Err(refused @ StoreError::SessionCap { .. }) => {
                // The id's own state answers first, as it would without a cap.
                restorable_slot(&inner.shard(hash).read(), hash, namespace, id, inner.now())?;
                return Err(refused);
            }
            admitted => admitted?,
        };
        let now = inner.now();
        let mut locked = inner.lock_shards(hash, &admission);
        let slot = restorable_slot(locked.of(inner, hash)?, hash, namespace, id, now)?;
        let evicted = inner.evict(&mut locked, namespace, &admission, now);
        self.cap.evicted.add(evicted);
        let shard = locked.of(inner, hash)?;
        let head = Head {
            namespace,
            id,
            user_id: &record.user_id,
            created_at: record.created_at,
            deleted: false,
        };
        let packed = Packed::from_map(&head, &record.attrs);
        let ttl = ttl_nanos(record.ttl);
        let deadline = now.saturating_add(ttl);
        match slot.and_then(|slot| shard.entry_mut(slot)) {
            // An expired session the reaper has not removed yet, or an old tombstone: gone for
            // good, its slot reused.
            Some(mut old) => {
                old.entry.version = 1;
                old.entry.ttl = ttl;
                old.set_deadline(deadline);
                let old = std::mem::replace(&mut old.entry.packed, packed);
                if !old.is_deleted() {
                    inner.users.remove(namespace, old.user_id(), id);
                    // What the reaper would have sent for it.
                    inner.emit(EventKind::Expired, namespace, id, old.user_id(), 0);
                    inner.live.fetch_sub(1, Ordering::Relaxed);
                }
            }
            None => shard.insert(hash, Entry::new(packed, 1, ttl, deadline))?,
        }
        inner.live.fetch_add(1, Ordering::Relaxed);
        inner.users.add(namespace, &record.user_id, id);
        inner.emit(EventKind::Created, namespace, id, &record.user_id, 1);
        let wall = SystemTime::now();
        let left = Duration::from_nanos(ttl);
        Ok(SessionRecord {
            version: 1,
            expires_at: wall.checked_add(left).unwrap_or(wall),
            ttl: left,
            ..record
        })
    }

    fn subscribe(&self) -> broadcast::Receiver<SessionEvent> {
        self.inner.events.subscribe()
    }

    fn live_sessions(&self) -> Option<u64> {
        Some(self.inner.live.load(Ordering::Relaxed))
    }

    fn session_cap_evictions(&self) -> u64 {
        self.cap.evicted.get()
    }
}

/// The slot a restore of `namespace`/`id` may write (`None`: a new one): refused while the id
/// holds a live session ([`StoreError::Conflict`]) or a tombstone ([`StoreError::Deleted`]).
fn restorable_slot(
    shard: &Shard,
    hash: u64,
    namespace: &str,
    id: &str,
    now: u64,
) -> StoreResult<Option<u32>> {
    let slot = shard.find(hash, namespace, id);
    if let Some(existing) = slot.and_then(|slot| shard.entry(slot))
        && existing.deadline() > now
    {
        if existing.packed.is_deleted() {
            return Err(StoreError::Deleted);
        }
        return Err(StoreError::Conflict {
            expected: 0,
            actual: existing.version,
        });
    }
    Ok(slot)
}
