//! The near cache (`--cache-capacity`): decoded sessions of recent plain reads
//! (`get(.., touch = false)`, which Get with touch also starts with, see
//! `service/lifetime.rs`), kept exact by Redis itself through client-side caching
//! (`tracking`): Redis tells this server every key any client writes, expires or evicts, and the
//! entry goes.
//!
//! # What may be in it
//! Only sessions a read found: a read of an unknown id inserts nothing, so random ids cannot
//! fill it. An entry is served only while its `expires_at` (the read's `now` + `PTTL`) is in the
//! future and tracking is up. It holds at most `capacity` entries, in up to 1024 shards (each a
//! mutex over a `hashbrown::HashTable` of slots), each shard with its share of the capacity and a
//! CLOCK hand for eviction (a slot used since the hand last passed gets one more turn).
//!
//! # The fill race
//! A read takes a [`Ticket`] before it asks Redis: the generation of its key's shard and the
//! tracking state. Every invalidation (a push from Redis, a write of this server) bumps the
//! generation of the key's shard under the shard's lock, and the tracking state changes on every
//! loss and return of the tracking connection. The read's answer is inserted only if both are
//! unchanged, under the same lock: an invalidation that arrives between the read's ticket and its
//! insert (for a write Redis ran after the read) makes the insert a no-op, one that arrives after
//! it removes the entry. So an entry never outlives the arrival of the invalidation of a write
//! that Redis ran after the entry's read.
//!
//! # Tracking state
//! One counter: even while tracking is down (no hits, no fills: every read goes to Redis and
//! counts as a bypass), odd while it is up; each change adds one, so a ticket taken before a
//! loss never fills after the return. Going down empties the cache (after the state change, so
//! no fill slips in behind the emptying).

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use hashbrown::{DefaultHashBuilder, HashTable};
use parking_lot::Mutex;

use crate::store::{NearCacheStats, SessionRecord};

/// Most shards (and so generation stripes): enough that concurrent calls rarely share one.
const MAX_SHARDS: usize = 1024;

/// The near cache of one Redis store.
pub(crate) struct NearCache {
    /// The shards; a key's shard is picked by its hash.
    shards: Box<[Mutex<Shard>]>,
    /// `shards.len() - 1` (a power of two minus one).
    mask: usize,
    /// Hashes keys, for the shard and the shard's table.
    hasher: DefaultHashBuilder,
    /// Tracking state: even is down, odd is up; +1 per change (see the module docs).
    state: AtomicU64,
    /// Reads that went to Redis because tracking was down.
    bypasses: AtomicU64,
    /// Entries removed because their key was written, expired or flushed.
    invalidations: AtomicU64,
}

/// What a look-up found.
pub(crate) enum Lookup {
    /// A live entry: the record to answer.
    Hit(SessionRecord),
    /// No live entry: read Redis, then [`NearCache::fill`] with this ticket.
    Miss(Ticket),
    /// Tracking is down: read Redis and insert nothing.
    Bypass,
}

/// Taken before a read of Redis; an insert with it succeeds only if nothing invalidated the
/// key's shard and tracking did not change since.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ticket {
    /// The key's hash.
    hash: u64,
    /// The shard's generation when taken.
    generation: u64,
    /// The tracking state when taken (odd: up).
    state: u64,
}

/// One shard: a table of slot numbers over a slab of slots.
struct Shard {
    /// Bumped by every invalidation of a key of this shard (and by a clear).
    generation: u64,
    /// Slot numbers of the live entries, by key.
    table: HashTable<u32>,
    /// The entries; `None` is a free slot (listed in `free`).
    slots: Vec<Option<Entry>>,
    /// Free slot numbers.
    free: Vec<u32>,
    /// Most entries.
    capacity: usize,
    /// The CLOCK hand: the next slot looked at for eviction.
    hand: usize,
    /// Reads of this shard's keys answered from the cache (counted under the lock the read
    /// holds anyway, so concurrent hits never contend on one counter).
    hits: u64,
    /// Reads of this shard's keys that went to Redis with tracking up.
    misses: u64,
}

/// A cached session.
struct Entry {
    /// Its Redis key.
    key: Box<str>,
    /// The key's hash.
    hash: u64,
    /// The session as read (cloned under the shard's lock on a hit: no shared reference
    /// count for concurrent hits of one session to contend on).
    record: SessionRecord,
    /// Used since the CLOCK hand last passed.
    referenced: bool,
}

impl NearCache {
    /// An empty cache of at most `capacity` entries (at least 1), tracking down.
    pub(crate) fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        // A power of two, at most the capacity, so that every shard holds at least one entry
        // and the shares add up to exactly `capacity`.
        let shards = if capacity >= MAX_SHARDS {
            MAX_SHARDS
        } else {
            1 << (usize::BITS - 1 - capacity.leading_zeros())
        };
        let shards = (0..shards)
            .map(|i| {
                let share = capacity / shards + usize::from(i < capacity % shards);
                Mutex::new(Shard {
                    generation: 0,
                    table: HashTable::new(),
                    slots: Vec::new(),
                    free: Vec::new(),
                    capacity: share,
                    hand: 0,
                    hits: 0,
                    misses: 0,
                })
            })
            .collect::<Box<[_]>>();
        NearCache {
            mask: shards.len() - 1,
            shards,
            hasher: DefaultHashBuilder::default(),
            state: AtomicU64::new(0),
            bypasses: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
        }
    }

    fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    fn shard(&self, hash: u64) -> &Mutex<Shard> {
        // The table uses the low bits and the top seven; the shard takes bits from the middle.
        &self.shards[(hash >> 32) as usize & self.mask]
    }

    /// The live entry of `key` at `now`, or a ticket to fill it after reading Redis, or
    /// [`Lookup::Bypass`] while tracking is down.
    pub(crate) fn lookup(&self, key: &str, now: SystemTime) -> Lookup {
        let state = self.state.load(Ordering::Acquire);
        if state.is_multiple_of(2) {
            self.bypasses.fetch_add(1, Ordering::Relaxed);
            return Lookup::Bypass;
        }
        let hash = self.hash(key.as_bytes());
        let found = {
            let mut shard = self.shard(hash).lock();
            let found = shard.find(hash, key.as_bytes()).and_then(|index| {
                let entry = shard.slots[index].as_mut()?;
                if entry.record.expires_at > now {
                    entry.referenced = true;
                    Some(Ok(entry.record.clone()))
                } else {
                    Some(Err(index))
                }
            });
            match found {
                Some(Ok(record)) => {
                    shard.hits += 1;
                    Ok(record)
                }
                Some(Err(index)) => {
                    // Expired here: Redis drops it (and says so) on its own clock.
                    shard.remove_slot(index);
                    shard.misses += 1;
                    Err(shard.generation)
                }
                None => {
                    shard.misses += 1;
                    Err(shard.generation)
                }
            }
        };
        match found {
            Ok(record) => Lookup::Hit(record),
            Err(generation) => Lookup::Miss(Ticket {
                hash,
                generation,
                state,
            }),
        }
    }

    /// Inserts what the read of `ticket` found under `key`, unless the key's shard was
    /// invalidated or tracking changed since the ticket (see the module docs).
    pub(crate) fn fill(&self, key: &str, ticket: Ticket, record: SessionRecord) {
        let mut shard = self.shard(ticket.hash).lock();
        // Read under the shard's lock: a loss of tracking changes the state before it empties
        // the shards, so either this sees the change or the emptying comes after the insert.
        if shard.generation != ticket.generation
            || self.state.load(Ordering::Acquire) != ticket.state
        {
            return;
        }
        shard.insert(key, ticket.hash, record);
    }

    /// Removes `key`'s entry and bumps its shard's generation, so no read begun before fills.
    pub(crate) fn invalidate(&self, key: &[u8]) {
        let hash = self.hash(key);
        let removed = {
            let mut shard = self.shard(hash).lock();
            shard.generation += 1;
            shard
                .find(hash, key)
                .map(|index| shard.remove_slot(index))
                .is_some()
        };
        if removed {
            self.invalidations.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Empties every shard, bumping every generation (a FLUSHALL, a lost tracking connection).
    pub(crate) fn clear(&self) {
        let mut removed = 0;
        for shard in &self.shards {
            let mut shard = shard.lock();
            shard.generation += 1;
            removed += shard.table.len() as u64;
            shard.table.clear();
            shard.slots.clear();
            shard.free.clear();
            shard.hand = 0;
        }
        self.invalidations.fetch_add(removed, Ordering::Relaxed);
    }

    /// Tracking is confirmed on a new connection: hits and fills from now on.
    pub(crate) fn mark_up(&self) {
        let _ = self
            .state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                s.is_multiple_of(2).then_some(s + 1)
            });
    }

    /// Tracking is lost (or its connection is being replaced): no hits and no fills until
    /// [`Self::mark_up`], and the cache emptied.
    pub(crate) fn mark_down(&self) {
        let _ = self
            .state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                (!s.is_multiple_of(2)).then_some(s + 1)
            });
        self.clear();
    }

    /// Whether tracking is up (hits and fills allowed).
    pub(crate) fn is_up(&self) -> bool {
        !self.state.load(Ordering::Acquire).is_multiple_of(2)
    }

    /// The counts so far, and the entries held now.
    pub(crate) fn stats(&self) -> NearCacheStats {
        let mut stats = NearCacheStats {
            bypasses: self.bypasses.load(Ordering::Relaxed),
            invalidations: self.invalidations.load(Ordering::Relaxed),
            up: self.is_up(),
            ..NearCacheStats::default()
        };
        for shard in &self.shards {
            let shard = shard.lock();
            stats.hits += shard.hits;
            stats.misses += shard.misses;
            stats.entries += shard.table.len() as u64;
        }
        stats
    }
}

impl std::fmt::Debug for NearCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NearCache")
            .field("shards", &self.shards.len())
            .field("up", &self.is_up())
            .finish_non_exhaustive()
    }
}

impl Shard {
    /// The slot of `key`'s entry.
    fn find(&self, hash: u64, key: &[u8]) -> Option<usize> {
        let slots = &self.slots;
        self.table
            .find(hash, |&i| {
                slots[i as usize]
                    .as_ref()
                    .is_some_and(|e| e.key.as_bytes() == key)
            })
            .map(|&i| i as usize)
    }

    /// Frees slot `index` (which holds an entry) and drops its table row.
    fn remove_slot(&mut self, index: usize) {
        let Some(entry) = self.slots[index].take() else {
            return;
        };
        if let Ok(row) = self.table.find_entry(entry.hash, |&i| i as usize == index) {
            row.remove();
        }
        self.free.push(index as u32);
    }

    /// Inserts or replaces `key`'s entry, evicting one when the shard is full.
    fn insert(&mut self, key: &str, hash: u64, record: SessionRecord) {
        if let Some(index) = self.find(hash, key.as_bytes()) {
            if let Some(entry) = self.slots[index].as_mut() {
                entry.record = record;
                entry.referenced = true;
            }
            return;
        }
        let index = if let Some(index) = self.free.pop() {
            index as usize
        } else if self.slots.len() < self.capacity {
            self.slots.push(None);
            self.slots.len() - 1
        } else {
            self.evict()
        };
        self.slots[index] = Some(Entry {
            key: key.into(),
            hash,
            record,
            referenced: false,
        });
        let slots = &self.slots;
        self.table.insert_unique(hash, index as u32, |&i| {
            slots[i as usize].as_ref().map_or(0, |e| e.hash)
        });
    }

    /// Frees the first slot the CLOCK hand finds unused since its last pass (every slot is
    /// full: no free slot and at capacity), and gives its number.
    fn evict(&mut self) -> usize {
        loop {
            let index = self.hand;
            self.hand = (self.hand + 1) % self.slots.len();
            match self.slots[index].as_mut() {
                Some(entry) if entry.referenced => entry.referenced = false,
                Some(_) => {
                    self.remove_slot(index);
                    // remove_slot listed it as free; it is taken at once.
                    self.free.pop();
                    return index;
                }
                None => return index,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::time::Duration;

    fn record(id: &str, version: u64, expires_in: Duration) -> SessionRecord {
        let now = SystemTime::now();
        SessionRecord {
            id: id.into(),
            namespace: "ns".into(),
            user_id: String::new(),
            attrs: HashMap::new(),
            version,
            created_at: now,
            expires_at: now + expires_in,
            ttl: Duration::from_secs(60),
        }
    }

    fn ticket(cache: &NearCache, key: &str) -> Ticket {
        match cache.lookup(key, SystemTime::now()) {
            Lookup::Miss(ticket) => ticket,
            Lookup::Hit(_) => panic!("{key}: a hit, not a miss"),
            Lookup::Bypass => panic!("{key}: bypassed"),
        }
    }

    fn hit(cache: &NearCache, key: &str) -> Option<u64> {
        match cache.lookup(key, SystemTime::now()) {
            Lookup::Hit(record) => Some(record.version),
            _ => None,
        }
    }

    const MINUTE: Duration = Duration::from_secs(60);

    #[test]
    fn a_fill_is_served_until_invalidated() {
        let cache = NearCache::new(100);
        cache.mark_up();
        let t = ticket(&cache, "k");
        cache.fill("k", t, record("a", 3, MINUTE));
        assert_eq!(hit(&cache, "k"), Some(3));
        cache.invalidate(b"k");
        assert_eq!(hit(&cache, "k"), None);
        let stats = cache.stats();
        assert_eq!((stats.hits, stats.misses, stats.invalidations), (1, 2, 1));
    }

    #[test]
    fn an_invalidation_between_ticket_and_fill_wins() {
        let cache = NearCache::new(100);
        cache.mark_up();
        let t = ticket(&cache, "k");
        cache.invalidate(b"k");
        cache.fill("k", t, record("a", 1, MINUTE));
        assert_eq!(hit(&cache, "k"), None, "the fill read before the write");
    }

    #[test]
    fn losing_tracking_empties_bypasses_and_voids_old_tickets() {
        let cache = NearCache::new(100);
        cache.mark_up();
        let t = ticket(&cache, "k");
        cache.fill("k", t, record("a", 1, MINUTE));
        let before_loss = ticket(&cache, "other");
        cache.mark_down();
        assert!(matches!(
            cache.lookup("k", SystemTime::now()),
            Lookup::Bypass
        ));
        cache.mark_up();
        assert_eq!(hit(&cache, "k"), None, "emptied");
        cache.fill("other", before_loss, record("b", 1, MINUTE));
        assert_eq!(hit(&cache, "other"), None, "ticket from before the loss");
        assert_eq!(cache.stats().bypasses, 1);
    }

    #[test]
    fn an_expired_entry_is_a_miss() {
        let cache = NearCache::new(100);
        cache.mark_up();
        let t = ticket(&cache, "k");
        cache.fill("k", t, record("a", 1, Duration::from_millis(1)));
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(hit(&cache, "k"), None);
        assert_eq!(cache.stats().entries, 0);
    }

    #[test]
    fn misses_insert_nothing_and_size_stays_bounded() {
        let cache = NearCache::new(50);
        cache.mark_up();
        for i in 0..10_000 {
            let _ = cache.lookup(&format!("unknown{i}"), SystemTime::now());
        }
        assert_eq!(cache.stats().entries, 0);
        for i in 0..10_000 {
            let key = format!("k{i}");
            let t = ticket(&cache, &key);
            cache.fill(&key, t, record("a", 1, MINUTE));
            assert!(cache.stats().entries <= 50);
        }
        assert_eq!(cache.stats().entries, 50);
        for capacity in [1, 3, 1000, 1025, 5000] {
            let cache = NearCache::new(capacity);
            let shares: usize = cache.shards.iter().map(|s| s.lock().capacity).sum();
            assert_eq!(shares, capacity);
            assert!(cache.shards.iter().all(|s| s.lock().capacity >= 1));
        }
    }

    #[test]
    fn clock_evicts_an_unused_entry_before_a_used_one() {
        let mut shard = Shard {
            generation: 0,
            table: HashTable::new(),
            slots: Vec::new(),
            free: Vec::new(),
            capacity: 2,
            hand: 0,
            hits: 0,
            misses: 0,
        };
        let record = record("x", 1, MINUTE);
        let hasher = DefaultHashBuilder::default();
        let hash = |key: &str| hasher.hash_one(key.as_bytes());
        shard.insert("a", hash("a"), record.clone());
        shard.insert("b", hash("b"), record.clone());
        // "a" used (as a hit marks it), "b" not.
        let a = shard.find(hash("a"), b"a").expect("a held");
        shard.slots[a].as_mut().expect("a").referenced = true;
        shard.insert("c", hash("c"), record);
        assert!(shard.find(hash("a"), b"a").is_some(), "used: kept");
        assert!(shard.find(hash("b"), b"b").is_none(), "unused: evicted");
        assert!(shard.find(hash("c"), b"c").is_some());
        assert_eq!(shard.table.len(), 2);
    }
}
