//! The request rate per client (nginx `limit_req rate=R burst=B nodelay`): GCRA, the generic
//! cell rate algorithm, a token bucket kept as one instant per client.
//!
//! Each client has a *theoretical arrival time* (TAT): when its bucket would be full again. A
//! request at `now` passes when `TAT - now <= burst × interval` (the bucket holds a token),
//! and moves the TAT one interval later; otherwise it is refused, and a token is free again
//! `TAT - now - burst × interval` from now. So `burst + 1` requests pass at once, then one per
//! interval, exactly nginx's count (its first request is free, then up to `burst` in excess).
//!
//! A client whose TAT is past holds a full bucket, the same as one never seen, so its entry
//! can go. The table is bounded: [`RATE_KEYS`] clients at most. Expired entries are swept from
//! a shard every [`SWEEP_EVERY`], and at once when it is full; a shard still full of clients
//! mid-burst forgets the eighth of them whose buckets are nearest full (they lose the least:
//! HAProxy stick tables, and nginx's zone, evict too rather than refuse new clients).

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use super::ClientKey;
use crate::config::RequestRate;

/// Most clients the table remembers: about 4 MiB of entries, nginx's 1 MiB zone holds about
/// 16 000 (64 bytes each); a flood of more distinct addresses evicts rather than grows.
pub(crate) const RATE_KEYS: usize = 100_000;

/// Shards of the table, each with its own lock.
const SHARDS: usize = 16;

/// How often a shard drops the entries of clients whose buckets are full again.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// The rate limit of every client.
#[derive(Debug)]
pub(crate) struct RateTable {
    /// The interval between two requests at the sustained rate, in nanoseconds.
    interval: u64,
    /// How far ahead of now a TAT may be and the next request still pass: `burst × interval`.
    tolerance: u64,
    /// The instant TATs are counted from (nanoseconds since it).
    epoch: Instant,
    /// Most entries a shard keeps.
    shard_cap: usize,
    /// The shards.
    shards: Box<[Mutex<Shard>]>,
    /// Picks a key's shard; seeded at random, so clients cannot choose to share one.
    hasher: RandomState,
}

/// One shard of a [`RateTable`].
#[derive(Debug, Default)]
struct Shard {
    /// Each client's TAT, nanoseconds since the table's epoch.
    tats: HashMap<ClientKey, u64>,
    /// When expired entries are swept next.
    next_sweep: u64,
}

impl RateTable {
    /// `rate` per client with `burst` requests at once beyond it, remembering at most
    /// `max_keys` clients.
    pub(crate) fn new(rate: RequestRate, burst: u32, max_keys: usize) -> Self {
        let interval = u64::try_from(rate.interval().as_nanos())
            .unwrap_or(u64::MAX)
            .max(1);
        RateTable {
            interval,
            tolerance: interval.saturating_mul(u64::from(burst)),
            epoch: Instant::now(),
            shard_cap: max_keys.div_ceil(SHARDS).max(8),
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
        }
    }

    /// Takes a token of `key`'s bucket now; `Err` is how long until one is free.
    pub(crate) fn check(&self, key: ClientKey) -> Result<(), Duration> {
        let now = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.check_at(key, now).map_err(Duration::from_nanos)
    }

    /// [`RateTable::check`] at `now` nanoseconds since the epoch; `Err` is the wait in
    /// nanoseconds.
    fn check_at(&self, key: ClientKey, now: u64) -> Result<(), u64> {
        let index = (self.hasher.hash_one(key) % SHARDS as u64) as usize;
        let mut shard = self.shards[index].lock();
        if now >= shard.next_sweep {
            shard.tats.retain(|_, tat| *tat > now);
            shard.next_sweep = now.saturating_add(duration_nanos(SWEEP_EVERY));
        }
        let tat = shard.tats.get(&key).copied().unwrap_or(now).max(now);
        let ahead = tat - now;
        if ahead > self.tolerance {
            return Err(ahead - self.tolerance);
        }
        let next = tat.saturating_add(self.interval);
        match shard.tats.get_mut(&key) {
            Some(entry) => *entry = next,
            None => {
                if shard.tats.len() >= self.shard_cap {
                    shard.make_room(now, self.shard_cap);
                }
                shard.tats.insert(key, next);
            }
        }
        Ok(())
    }

    /// Clients remembered now (tests).
    #[cfg(test)]
    pub(crate) fn clients(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| shard.lock().tats.len())
            .sum()
    }
}

impl Shard {
    /// Brings a full shard under `cap`: drops the clients whose buckets are full again, then,
    /// if that is not enough, the eighth of them nearest to a full bucket (one scan pays for
    /// that many new clients).
    fn make_room(&mut self, now: u64, cap: usize) {
        self.tats.retain(|_, tat| *tat > now);
        if self.tats.len() < cap {
            return;
        }
        let keep = cap - cap / 8 - 1;
        let mut tats: Vec<u64> = self.tats.values().copied().collect();
        let drop = tats.len() - keep - 1;
        let (_, threshold, _) = tats.select_nth_unstable(drop);
        let threshold = *threshold;
        self.tats.retain(|_, tat| *tat > threshold);
        self.tats.shrink_to(cap);
    }
}

/// `duration` in nanoseconds, saturated.
fn duration_nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// The `Retry-After` of a wait: whole seconds rounded up, at least 1.
pub(crate) fn retry_after_secs(wait: Duration) -> u32 {
    let secs = wait
        .as_secs()
        .saturating_add(u64::from(wait.subsec_nanos() > 0));
    u32::try_from(secs.max(1)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn key(n: u32) -> ClientKey {
        ClientKey::of(IpAddr::from(Ipv4Addr::from(n)))
    }

    #[test]
    fn burst_plus_one_pass_at_once_then_one_per_interval() {
        // 2 a second (an interval of 500 ms), burst 3.
        let table = RateTable::new(RequestRate::per_second(2), 3, 1000);
        let t0 = 100 * SEC;
        for n in 0..4 {
            assert_eq!(
                table.check_at(key(1), t0),
                Ok(()),
                "request {n} of the burst"
            );
        }
        // The bucket is empty: the next token is free in one interval.
        assert_eq!(table.check_at(key(1), t0), Err(SEC / 2));
        assert_eq!(table.check_at(key(1), t0 + SEC / 4), Err(SEC / 4));
        // A refused request takes nothing: one interval later exactly one passes.
        assert_eq!(table.check_at(key(1), t0 + SEC / 2), Ok(()));
        assert_eq!(table.check_at(key(1), t0 + SEC / 2), Err(SEC / 2));
        // Another client has its own bucket.
        assert_eq!(table.check_at(key(2), t0), Ok(()));
        // Idle for long enough, the bucket is full again, and no fuller: burst + 1.
        let later = t0 + 60 * SEC;
        for _ in 0..4 {
            assert_eq!(table.check_at(key(1), later), Ok(()));
        }
        assert!(table.check_at(key(1), later).is_err());
    }

    #[test]
    fn burst_zero_allows_one_request_per_interval() {
        let table = RateTable::new(RequestRate::per_minute(6), 0, 1000);
        let t0 = SEC;
        assert_eq!(table.check_at(key(1), t0), Ok(()));
        assert_eq!(table.check_at(key(1), t0), Err(10 * SEC));
        assert_eq!(table.check_at(key(1), t0 + 9 * SEC), Err(SEC));
        assert_eq!(table.check_at(key(1), t0 + 10 * SEC), Ok(()));
    }

    #[test]
    fn retry_after_is_whole_seconds_rounded_up_and_at_least_one() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(60)), 60);
        assert_eq!(retry_after_secs(Duration::MAX), u32::MAX);
    }

    #[test]
    fn clients_with_full_buckets_are_swept() {
        let table = RateTable::new(RequestRate::per_second(10), 0, 1000);
        for n in 0..500 {
            assert_eq!(table.check_at(key(n), SEC), Ok(()));
        }
        assert_eq!(table.clients(), 500);
        // Past the sweep time every bucket is full again: each shard drops its entries on its
        // next use.
        let later = SEC + duration_nanos(SWEEP_EVERY) + SEC;
        for n in 10_000..10_200 {
            assert_eq!(table.check_at(key(n), later), Ok(()));
        }
        assert_eq!(table.clients(), 200);
    }

    #[test]
    fn a_flood_of_distinct_clients_stays_under_the_cap() {
        // One a minute: no entry expires during the flood.
        let table = RateTable::new(RequestRate::per_minute(1), 0, 1600);
        let t0 = SEC;
        let limited = key(7);
        assert_eq!(table.check_at(limited, t0), Ok(()));
        let mut refused_meanwhile = 0;
        for n in 0..20_000u32 {
            let now = t0 + u64::from(n) * 1000;
            assert_eq!(table.check_at(key(1_000_000 + n), now), Ok(()));
            assert!(table.clients() <= 1600, "{} clients", table.clients());
            if n % 100 == 0 && table.check_at(limited, now).is_err() {
                refused_meanwhile += 1;
            }
        }
        // It was refused while it was remembered; the flood may have evicted it since (its
        // entry is among the oldest), which can only make the limit more lenient, never
        // refuse a new client.
        assert!(refused_meanwhile > 0);
        assert!(table.clients() > 1000, "eviction keeps most of the table");
    }
}
