//! Requests in flight per client (nginx `limit_conn`, HAProxy `sc0_conn_cur`): a count per
//! client key, taken by an [`InFlightSlot`] and given back when the slot is dropped.
//!
//! A key is in the map only while one of its requests is in flight, so the map holds at most
//! as many keys as there are requests in flight (each of which costs far more than its entry),
//! and a flood of distinct addresses leaves nothing behind; its capacity is given back as it
//! empties.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

use parking_lot::Mutex;

use super::ClientKey;

/// Shards of the map, each with its own lock, so that clients do not wait on each other.
const SHARDS: usize = 16;

/// A shard keeps this much capacity however empty it gets, so a busy one does not shrink and
/// regrow all the time.
const MIN_CAPACITY: usize = 256;

/// The counts of requests in flight, by client.
#[derive(Debug)]
pub(crate) struct InFlightCounts {
    /// Count by key (never 0: a key whose last request ended is removed).
    shards: Box<[Mutex<HashMap<ClientKey, u32>>]>,
    /// Picks a key's shard; seeded at random, so clients cannot choose to share one.
    hasher: RandomState,
}

/// One request in flight of one client; its count goes down when this is dropped.
#[derive(Debug)]
pub(crate) struct InFlightSlot {
    /// The counts it is taken from.
    counts: Arc<InFlightCounts>,
    /// Its client.
    key: ClientKey,
}

impl InFlightCounts {
    /// No request in flight.
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(InFlightCounts {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
        })
    }

    /// A slot for one more request of `key`, unless it has `max` in flight already.
    pub(crate) fn acquire(self: &Arc<Self>, key: ClientKey, max: u32) -> Option<InFlightSlot> {
        let mut shard = self.shard(&key).lock();
        let count = shard.entry(key).or_insert(0);
        if *count >= max {
            if *count == 0 {
                shard.remove(&key);
            }
            return None;
        }
        *count += 1;
        drop(shard);
        Some(InFlightSlot {
            counts: self.clone(),
            key,
        })
    }

    /// Requests of `key` in flight now.
    #[cfg(test)]
    pub(crate) fn count(&self, key: &ClientKey) -> u32 {
        self.shard(key).lock().get(key).copied().unwrap_or(0)
    }

    /// Clients with a request in flight now.
    #[cfg(test)]
    pub(crate) fn clients(&self) -> usize {
        self.shards.iter().map(|shard| shard.lock().len()).sum()
    }

    fn shard(&self, key: &ClientKey) -> &Mutex<HashMap<ClientKey, u32>> {
        // The modulo of a u64 by 16 fits any usize.
        let index = (self.hasher.hash_one(key) % SHARDS as u64) as usize;
        &self.shards[index]
    }

    fn release(&self, key: &ClientKey) {
        let mut shard = self.shard(key).lock();
        let Some(count) = shard.get_mut(key) else {
            return;
        };
        *count = count.saturating_sub(1);
        if *count == 0 {
            shard.remove(key);
            let capacity = shard.capacity();
            if capacity > MIN_CAPACITY && shard.len() < capacity / 4 {
                let keep = (shard.len() * 2).max(MIN_CAPACITY);
                shard.shrink_to(keep);
            }
        }
    }
}

impl Drop for InFlightSlot {
    fn drop(&mut self) {
        self.counts.release(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    fn key(ip: &str) -> ClientKey {
        ClientKey::of(ip.parse::<IpAddr>().unwrap())
    }

    #[test]
    fn a_client_gets_at_most_max_slots_and_each_dropped_one_is_free_again() {
        let counts = InFlightCounts::new();
        let (a, b) = (key("192.0.2.1"), key("192.0.2.2"));
        let first = counts.acquire(a, 2).expect("first slot");
        let second = counts.acquire(a, 2).expect("second slot");
        assert!(counts.acquire(a, 2).is_none(), "a third one over max 2");
        assert_eq!(counts.count(&a), 2);
        let other = counts
            .acquire(b, 2)
            .expect("another client is not affected");
        drop(first);
        assert_eq!(counts.count(&a), 1);
        let third = counts.acquire(a, 2).expect("a slot is free again");
        drop((second, third, other));
        assert_eq!(counts.count(&a), 0);
        assert_eq!(counts.clients(), 0, "keys without a request are removed");
    }

    #[test]
    fn a_flood_of_distinct_clients_leaves_no_key_and_little_capacity_behind() {
        let counts = InFlightCounts::new();
        let slots: Vec<InFlightSlot> = (0..50_000u32)
            .map(|n| {
                let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + n));
                counts.acquire(ClientKey::of(ip), 1).expect("one slot each")
            })
            .collect();
        assert_eq!(counts.clients(), 50_000);
        drop(slots);
        assert_eq!(counts.clients(), 0);
        let capacity: usize = counts.shards.iter().map(|s| s.lock().capacity()).sum();
        assert!(
            capacity <= SHARDS * MIN_CAPACITY * 2,
            "capacity {capacity} kept after the flood"
        );
    }

    #[test]
    fn max_zero_refuses_and_keeps_no_key() {
        let counts = InFlightCounts::new();
        assert!(counts.acquire(key("192.0.2.1"), 0).is_none());
        assert_eq!(counts.clients(), 0);
    }
}
