//! The memory store's side of the per-user session cap (see [`crate::store::cap`]).
//!
//! A write that makes a session join a user (create, restore, an update giving it a new owner)
//! first takes the user's *admission lock*, one of [`STRIPES`] mutexes chosen by a hash of
//! `(namespace, user)`, and holds it to the end of the write. Under it the write counts the
//! user's live sessions (through the user index, each checked under its shard's read lock) and
//! picks the oldest to evict; then it write-locks its own shard and those of the victims, in
//! index order, checks its own preconditions (id taken, version, size...), deletes the victims
//! (tombstone, DELETED, as a Delete does) and writes. Every path that adds an id to a user's
//! index holds that user's admission lock while the cap is on (Regenerate too, whose old and
//! new id would otherwise be missed by a count made between its two index updates), so a count
//! made under the lock stays true until the write: no window where the user has one session
//! too many, and two writes never evict the same victim and both join. Deletes and expiry only
//! shrink a count, so they need no admission lock.
//!
//! Lock order: admission lock, then shard locks (in index order), then the user index's own
//! mutex; nothing takes an admission lock while it holds a shard lock.

use std::hash::{BuildHasher, RandomState};
use std::time::SystemTime;

use parking_lot::{Mutex, MutexGuard, RwLockWriteGuard};

use super::shard::Shard;
use super::{Inner, MemoryStore, SHARDS};
use crate::store::cap::{Evictions, SessionCap};
use crate::store::{StoreError, StoreResult};

/// Number of admission lock stripes: as many as shards, so that two users rarely share one.
const STRIPES: usize = SHARDS;

/// The session cap of a memory store, with its admission locks and eviction count.
#[derive(Debug)]
pub(super) struct CapState {
    /// The cap the store was built with.
    pub(super) limit: SessionCap,
    /// Admission locks, chosen by a hash of `(namespace, user)`.
    stripes: Box<[Mutex<()>]>,
    /// Hash seed for the stripe choice.
    hasher: RandomState,
    /// Sessions evicted so far (`stickless_session_cap_total{action="evicted"}`).
    pub(super) evicted: Evictions,
}

impl CapState {
    /// A cap of `limit` with free admission locks.
    pub(super) fn new(limit: SessionCap) -> Self {
        CapState {
            limit,
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            hasher: RandomState::new(),
            evicted: Evictions::default(),
        }
    }

    /// The admission lock of `user` in `namespace`, when the cap applies to the user (`None`
    /// otherwise: no cap, or an anonymous session).
    pub(super) fn lock(&self, namespace: &str, user: &str) -> Option<MutexGuard<'_, ()>> {
        if !self.limit.applies_to(user) {
            return None;
        }
        let index = (self.hasher.hash_one((namespace, user)) as usize) % STRIPES;
        self.stripes.get(index).map(Mutex::lock)
    }
}

/// A session to evict, found by the admission.
#[derive(Debug)]
pub(super) struct Victim {
    /// Its id.
    id: String,
    /// Its key hash (which picks its shard).
    hash: u64,
    /// When it was created (the eviction order, with the id).
    created_at: SystemTime,
}

/// What an admission decided: the user's lock held to the end of the write, and the sessions
/// to evict before the joining one is written.
#[derive(Debug, Default)]
pub(super) struct Admission<'a> {
    /// The user's admission lock (`None`: the write is not capped).
    _lock: Option<MutexGuard<'a, ()>>,
    /// The user whose sessions are evicted.
    user: String,
    /// The sessions to evict, oldest first.
    victims: Vec<Victim>,
}

/// Write guards on a set of shards, taken in index order.
pub(super) struct LockedShards<'a> {
    /// `(shard index, guard)`, sorted by index.
    guards: Vec<(usize, RwLockWriteGuard<'a, Shard>)>,
}

impl LockedShards<'_> {
    /// The locked shard of `index` (one of those asked for).
    pub(super) fn get(&mut self, index: usize) -> Option<&mut Shard> {
        let at = self.guards.binary_search_by_key(&index, |(i, _)| *i).ok()?;
        self.guards.get_mut(at).map(|(_, guard)| &mut **guard)
    }
}

impl Inner {
    /// Admits a session `id` joining `user` in `namespace` under `cap`: takes the user's
    /// admission lock and picks the victims among the user's other live sessions, or refuses
    /// ([`StoreError::SessionCap`]). Nothing is evicted yet (see
    /// [`Self::evict`]). If `id` itself is already a live session of `user`, nothing joins
    /// and nothing is evicted. Call it holding no shard lock.
    pub(super) fn admit<'a>(
        &self,
        cap: &'a CapState,
        namespace: &str,
        user: &str,
        id: &str,
    ) -> StoreResult<Admission<'a>> {
        let Some(lock) = cap.lock(namespace, user) else {
            return Ok(Admission::default());
        };
        let now = self.now();
        let mut live = Vec::new();
        let ids = self.users.ids(namespace, user);
        let owned_live = |hash: u64, session: &str| {
            let shard = self.shard(hash).read();
            shard
                .get(hash, namespace, session)
                .filter(|e| e.is_live(now) && e.packed.user_id() == user)
                .map(|e| e.packed.created_at())
        };
        for other in ids {
            let hash = self.hash(namespace, &other);
            if other == id {
                if owned_live(hash, id).is_some() {
                    // Already the user's: this write does not add to the count.
                    return Ok(Admission {
                        _lock: Some(lock),
                        ..Admission::default()
                    });
                }
                continue;
            }
            if let Some(created_at) = owned_live(hash, &other) {
                live.push(Victim {
                    id: other,
                    hash,
                    created_at,
                });
            }
        }
        let victims = cap
            .limit
            .victims(live, |v: &Victim| (v.created_at, v.id.as_str()))?;
        Ok(Admission {
            _lock: Some(lock),
            user: user.to_owned(),
            victims,
        })
    }

    /// Write-locks the shard of `hash` and those of the admission's victims, in index order.
    pub(super) fn lock_shards(&self, hash: u64, admission: &Admission<'_>) -> LockedShards<'_> {
        let own = self.shard_index(hash);
        if admission.victims.is_empty() {
            return LockedShards {
                guards: vec![(own, self.shards[own].write())],
            };
        }
        let mut indexes: Vec<usize> = std::iter::once(own)
            .chain(admission.victims.iter().map(|v| self.shard_index(v.hash)))
            .collect();
        indexes.sort_unstable();
        indexes.dedup();
        LockedShards {
            guards: indexes
                .into_iter()
                .map(|i| (i, self.shards[i].write()))
                .collect(),
        }
    }

    /// Deletes the admission's victims that are still live and the user's (a victim deleted,
    /// expired or moved to another user since has made room by itself), as a Delete does.
    /// Their shards must be in `locked`. Returns how many it deleted.
    pub(super) fn evict(
        &self,
        locked: &mut LockedShards<'_>,
        namespace: &str,
        admission: &Admission<'_>,
        now: u64,
    ) -> usize {
        let mut evicted = 0;
        for victim in &admission.victims {
            let Some(shard) = locked.get(self.shard_index(victim.hash)) else {
                continue;
            };
            let owned = shard
                .get(victim.hash, namespace, &victim.id)
                .is_some_and(|e| e.is_live(now) && e.packed.user_id() == admission.user);
            if owned && self.delete_locked(shard, victim.hash, namespace, &victim.id, now) {
                evicted += 1;
            }
        }
        evicted
    }
}

impl LockedShards<'_> {
    /// The locked shard of the key hash `hash` in `inner`; [`StoreError::Internal`]
    /// if it was not locked (a bug).
    pub(super) fn of(&mut self, inner: &Inner, hash: u64) -> StoreResult<&mut Shard> {
        self.get(inner.shard_index(hash))
            .ok_or_else(|| StoreError::Internal("memory store: shard not locked".to_owned()))
    }
}

impl MemoryStore {
    /// The owner of the live session `id`, if there is one.
    pub(super) fn owner(&self, namespace: &str, id: &str) -> Option<String> {
        let inner = &self.inner;
        let (now, hash) = (inner.now(), inner.hash(namespace, id));
        let shard = inner.shard(hash).read();
        shard
            .get(hash, namespace, id)
            .filter(|e| e.is_live(now))
            .map(|e| e.packed.user_id().to_owned())
    }

    /// Admits the session `id` joining `user` (see `admission`); a refusal for a session that
    /// is not there is [`StoreError::NotFound`], as the write would have answered.
    pub(super) fn admit_existing(
        &self,
        namespace: &str,
        user: &str,
        id: &str,
    ) -> StoreResult<Admission<'_>> {
        match self.inner.admit(&self.cap, namespace, user, id) {
            Err(refused @ StoreError::SessionCap { .. }) => match self.owner(namespace, id) {
                Some(_) => Err(refused),
                None => Err(StoreError::NotFound),
            },
            admitted => admitted,
        }
    }
}
