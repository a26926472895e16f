//! One shard of the memory store: a slab of entries, a hash table of slots, an expiry heap.
//!
//! Entries live in a slab (`Vec` of slots, with a free list) and are named by their `u32` slot
//! everywhere else: the hash table holds only slots (4 bytes each, keys compared through the
//! entry's packed bytes) and the expiry index holds `(deadline, slot)` pairs (16 bytes), so a
//! session's key is stored once.
//!
//! The expiry index is rescheduled lazily. It keeps the invariant "the indexed deadline is never
//! later than the real one": moving a deadline later (every sliding read or write) only stores
//! the new deadline in the entry, and the reaper, finding the entry's indexed deadline due, puts
//! it back with its real deadline instead of expiring it. Only a deadline moved earlier (a write
//! that shortens the ttl) adds an index element at once. Index elements are never removed out of
//! order: one whose slot no longer holds an entry indexed at that deadline is stale and skipped
//! when it comes due.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use hashbrown::{DefaultHashBuilder, HashTable};

use super::packed::{Packed, attrs_map};
use crate::store::{SessionRecord, StoreError, StoreResult};

/// One stored session (or tombstone). 48 bytes, next to its packed bytes.
#[derive(Debug)]
pub(super) struct Entry {
    /// Namespace, id, owner, creation time, tombstone flag and attributes.
    pub(super) packed: Packed,
    /// Bumped by every write.
    pub(super) version: u64,
    /// Sliding time-to-live in nanoseconds (a ttl beyond 584 years saturates).
    pub(super) ttl: u64,
    /// The real expiry deadline, in nanoseconds since the store's start. Atomic so that a
    /// sliding read moves it later under the shard's read lock; it only moves earlier under the
    /// write lock.
    deadline: AtomicU64,
    /// The deadline under which the expiry index holds this slot; never later than `deadline`.
    indexed: u64,
}

impl Entry {
    /// An entry due at `deadline` (not yet in any index).
    pub(super) fn new(packed: Packed, version: u64, ttl: u64, deadline: u64) -> Self {
        Self {
            packed,
            version,
            ttl,
            deadline: AtomicU64::new(deadline),
            indexed: deadline,
        }
    }

    /// The real expiry deadline.
    pub(super) fn deadline(&self) -> u64 {
        self.deadline.load(Ordering::Relaxed)
    }

    /// A session (not a tombstone) whose deadline has not passed.
    pub(super) fn is_live(&self, now: u64) -> bool {
        !self.packed.is_deleted() && self.deadline() > now
    }

    /// The record of this entry, which is `id` in `namespace`, expiring at `deadline`.
    pub(super) fn record(
        &self,
        namespace: &str,
        id: &str,
        deadline: u64,
        now: u64,
    ) -> SessionRecord {
        let (user_id, attrs) = self.packed.owner_and_attrs();
        let left = Duration::from_nanos(deadline.saturating_sub(now));
        let wall = SystemTime::now();
        SessionRecord {
            id: id.to_owned(),
            namespace: namespace.to_owned(),
            user_id: user_id.to_owned(),
            attrs: attrs_map(attrs),
            version: self.version,
            created_at: self.packed.created_at(),
            expires_at: wall.checked_add(left).unwrap_or(wall),
            ttl: Duration::from_nanos(self.ttl),
        }
    }

    /// Slides the deadline to `now + ttl` (never back: concurrent slides keep the latest) and
    /// returns it. Needs only a shared borrow, so reads slide under the shard's read lock; the
    /// expiry index is left alone, as moving a deadline later keeps its invariant.
    pub(super) fn slide(&self, now: u64) -> u64 {
        let deadline = now.saturating_add(self.ttl);
        self.deadline
            .fetch_max(deadline, Ordering::Relaxed)
            .max(deadline)
    }
}

/// A session's entry and its shard's expiry index, borrowed together for a write.
#[derive(Debug)]
pub(super) struct EntryMut<'a> {
    /// The entry's slot.
    slot: u32,
    /// The entry.
    pub(super) entry: &'a mut Entry,
    /// The shard's expiry index, for deadlines moved earlier.
    expiry: &'a mut BinaryHeap<Reverse<(u64, u32)>>,
}

impl EntryMut<'_> {
    /// Sets the real deadline, indexing it at once if it is earlier than the indexed one.
    pub(super) fn set_deadline(&mut self, deadline: u64) {
        *self.entry.deadline.get_mut() = deadline;
        if deadline < self.entry.indexed {
            self.entry.indexed = deadline;
            self.expiry.push(Reverse((deadline, self.slot)));
        }
    }

    /// Turns the session into a tombstone kept for one ttl from `now`; returns its packed data.
    pub(super) fn bury(&mut self, now: u64) -> Packed {
        let tombstone = self.entry.packed.tombstone();
        self.set_deadline(now.saturating_add(self.entry.ttl));
        std::mem::replace(&mut self.entry.packed, tombstone)
    }
}

/// What one reaper step found.
#[derive(Debug)]
pub(super) enum Reaped {
    /// Nothing in the index is due.
    NotDue,
    /// A due index element was stale, or its session had slid later and was indexed again.
    Kept,
    /// This entry reached its deadline and was removed.
    Gone(Packed),
}

/// One shard: its sessions and their expiry order.
#[derive(Debug)]
pub(super) struct Shard {
    /// The store's hash seed, to rehash slots when the table grows and to find a reaped slot.
    hasher: DefaultHashBuilder,
    /// Slots of this shard's entries, by [`key_hash`].
    table: HashTable<u32>,
    /// The entries; `None` marks a free slot.
    slots: Vec<Option<Entry>>,
    /// Free slots, reused before the slab grows.
    free: Vec<u32>,
    /// `(deadline, slot)`, soonest first: at least one element per entry, at its `indexed`
    /// deadline, plus stale ones left by earlier reschedules.
    expiry: BinaryHeap<Reverse<(u64, u32)>>,
}

/// Hash of a session key, the same whether computed from a lookup's strings or from an entry's
/// packed bytes. The store picks the shard from it too.
pub(super) fn key_hash(hasher: &DefaultHashBuilder, namespace: &[u8], id: &[u8]) -> u64 {
    hasher.hash_one((namespace, id))
}

impl Shard {
    /// An empty shard hashing with the store's `hasher`.
    pub(super) fn new(hasher: DefaultHashBuilder) -> Self {
        Self {
            hasher,
            table: HashTable::new(),
            slots: Vec::new(),
            free: Vec::new(),
            expiry: BinaryHeap::new(),
        }
    }

    /// The slot of the entry (session or tombstone) under `namespace`/`id`, whose hash is `hash`.
    pub(super) fn find(&self, hash: u64, namespace: &str, id: &str) -> Option<u32> {
        let slots = &self.slots;
        self.table
            .find(hash, |&slot| {
                entry_at(slots, slot).is_some_and(|e| e.packed.is_key(namespace, id))
            })
            .copied()
    }

    /// The entry in `slot`.
    pub(super) fn entry(&self, slot: u32) -> Option<&Entry> {
        entry_at(&self.slots, slot)
    }

    /// The entry in `slot`, for a write.
    pub(super) fn entry_mut(&mut self, slot: u32) -> Option<EntryMut<'_>> {
        let entry = self.slots.get_mut(slot as usize)?.as_mut()?;
        Some(EntryMut {
            slot,
            entry,
            expiry: &mut self.expiry,
        })
    }

    /// The entry under `namespace`/`id`, whatever its state.
    pub(super) fn get(&self, hash: u64, namespace: &str, id: &str) -> Option<&Entry> {
        self.entry(self.find(hash, namespace, id)?)
    }

    /// The live session under `namespace`/`id`, for a write.
    pub(super) fn live_mut(
        &mut self,
        hash: u64,
        namespace: &str,
        id: &str,
        now: u64,
    ) -> Option<EntryMut<'_>> {
        let slot = self.find(hash, namespace, id)?;
        self.entry_mut(slot).filter(|e| e.entry.is_live(now))
    }

    /// Adds an entry whose key is not in the shard yet, indexed at its deadline.
    pub(super) fn insert(&mut self, hash: u64, entry: Entry) -> StoreResult<()> {
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                let slot = u32::try_from(self.slots.len())
                    .map_err(|_| StoreError::Internal("memory store shard is full".to_owned()))?;
                self.slots.push(None);
                slot
            }
        };
        self.expiry.push(Reverse((entry.indexed, slot)));
        if let Some(place) = self.slots.get_mut(slot as usize) {
            *place = Some(entry);
        }
        let (slots, hasher) = (&self.slots, &self.hasher);
        self.table.insert_unique(hash, slot, |&slot| {
            entry_at(slots, slot).map_or(0, |e| {
                let (namespace, id) = e.packed.key();
                key_hash(hasher, namespace, id)
            })
        });
        Ok(())
    }

    /// Whether the soonest index element is due at `now`.
    pub(super) fn is_due(&self, now: u64) -> bool {
        self.expiry
            .peek()
            .is_some_and(|Reverse((deadline, _))| *deadline <= now)
    }

    /// One reaper step: takes the soonest index element if due, and expires its entry, indexes
    /// it again at its real deadline, or drops the element as stale.
    pub(super) fn reap_next(&mut self, now: u64) -> Reaped {
        let Some(&Reverse((due, slot))) = self.expiry.peek() else {
            return Reaped::NotDue;
        };
        if due > now {
            return Reaped::NotDue;
        }
        self.expiry.pop();
        let Some(entry) = self.slots.get_mut(slot as usize).and_then(Option::as_mut) else {
            return Reaped::Kept;
        };
        if entry.indexed != due {
            return Reaped::Kept;
        }
        let deadline = *entry.deadline.get_mut();
        if deadline > now {
            entry.indexed = deadline;
            self.expiry.push(Reverse((deadline, slot)));
            return Reaped::Kept;
        }
        match self.remove(slot) {
            Some(entry) => Reaped::Gone(entry.packed),
            None => Reaped::Kept,
        }
    }

    /// Removes the entry in `slot` from the table and the slab (its index elements go stale).
    fn remove(&mut self, slot: u32) -> Option<Entry> {
        let entry = self.slots.get_mut(slot as usize)?.take()?;
        let (namespace, id) = entry.packed.key();
        if let Ok(found) = self
            .table
            .find_entry(key_hash(&self.hasher, namespace, id), |&s| s == slot)
        {
            found.remove();
        }
        self.free.push(slot);
        Some(entry)
    }

    /// Entries held (sessions and tombstones), for tests.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.table.len()
    }

    /// Index elements held (current and stale), for tests.
    #[cfg(test)]
    pub(super) fn index_len(&self) -> usize {
        self.expiry.len()
    }
}

fn entry_at(slots: &[Option<Entry>], slot: u32) -> Option<&Entry> {
    slots.get(slot as usize)?.as_ref()
}
