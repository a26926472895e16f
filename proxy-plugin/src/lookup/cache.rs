//! The lookup cache (`--session-cache N`, off by default): sessions the store returned, kept
//! for the next requests of the same id while a `Watch` stream of the namespace says nothing
//! changed them.
//!
//! # What is kept, and for how long
//! At most `N` sessions (16 shards, each with its share of `N` and a clock (second chance)
//! eviction), only sessions the store returned to a plain `Get`: an unknown or malformed id
//! (what a hostile client sends) never inserts anything, NOT_FOUND is not cached, and
//! neither is a session that came from `Restore`. An entry is served only while:
//! - the Watch stream is up and has delivered its start (the subscription was accepted, or
//!   its `Missed` after a resubscription): `Interrupted` empties the cache and bypasses it
//!   until the stream is back, and `Missed` (events lost) empties it again before it is used;
//!   the stream is subscribed again with a capped backoff, the cache empty and bypassed
//!   meanwhile (`invalidation.rs`);
//! - no event of the session arrived since (any kind removes it);
//! - no response of a request with that id cleared the session cookie (logout), set it or the
//!   `--session-header` to another id (login, regenerate), carried the header empty (logout),
//!   or answered a request with an unsafe method (POST, PUT, PATCH, DELETE, ...: the requests
//!   that write sessions): that client's next request reads the store, even when the event is
//!   still on its way;
//! - the session has not expired (its `expires_at`, its `ends_at`);
//! - its sliding expiry is not due (below).
//!
//! # Sliding expiry: the touch window
//! Each lookup from the store is a `Get` with touch, so a request slides the expiry; a request
//! served from the cache touches nothing. So an entry is served only within one touch window
//! of that `Get` (the instant it was sent), shortened by what the stored expiry already lags
//! behind a fresh touch (`ttl - (expires_at - now)`, when the server skipped the touch): the
//! window is the session server's default `--touch-granularity`, the larger of 1 s and 1% of
//! the session's ttl (at most half the ttl). Every request served from the cache thus finds
//! the stored expiry at least `ttl - window` ahead of it, the same bound the server's touch
//! granularity already allows for the touches it does not write: an active user's session
//! never expires because requests were served from the cache. Past the window the next request
//! reads (and touches) the store and fills the entry again: one store call per window per
//! active session. A proxy clock ahead of the server's only shortens the window; one behind
//! it may hide a touch the server skipped, so the bound is then `ttl - 2 × window` at worst.
//!
//! # Fills and invalidations racing
//! A fill takes a ticket before its `Get`: the cache's generation (bumped by every emptying)
//! and the invalidation count of the id's stripe (1024 stripes, bumped by every event or
//! response forgetting an id that maps there). The answer is inserted only if both are
//! unchanged, so a session read before an event (or a logout) is never inserted after it.
//!
//! # Exactness
//! A write through any server is seen by the proxy once its event arrives (a few milliseconds
//! on a live stream), not by a request already in flight. This needs a store whose Watch sees
//! every server's writes (memory with one server, redis, redis-cluster, redis-sentinel); with
//! several session servers over `mysql`, whose Watch sees only its own server's writes, leave
//! the cache off.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use http::HeaderMap;
use http::header::HeaderName;
use session_client::SessionData;

use super::set_cookie::{clears_cookie, set_value};
use crate::metrics::ProxyMetrics;

/// Shards of the map: enough that two worker threads rarely wait on each other.
const SHARDS: usize = 16;
/// Invalidation stripes: a fill is refused when its id's stripe saw an invalidation since its
/// ticket; more stripes, fewer fills refused for another id's event (8 KiB).
const STRIPES: usize = 1024;
/// Shortest touch window (the session server's default touch granularity: 1 s or 1% of ttl).
const MIN_TOUCH_WINDOW: Duration = Duration::from_secs(1);

/// The cache, shared by the requests and the task following the Watch stream.
#[derive(Debug)]
pub(super) struct SessionCache {
    /// The entries, by shard.
    shards: Box<[Mutex<Shard>]>,
    /// Invalidations per stripe of ids (see the module docs).
    stripes: Box<[AtomicU64]>,
    /// Bumped by every emptying (stream lost, events missed): older tickets fill nothing.
    generation: AtomicU64,
    /// The Watch stream is up and delivered its start: entries may be served and filled.
    up: AtomicBool,
    /// Picks shards and stripes (random keys: a client cannot aim at one shard).
    hasher: RandomState,
    /// Name of the session cookie (a response setting or clearing it forgets the id).
    cookie: String,
    /// `--session-header` (a response carrying it empty or with another id forgets the id).
    header: Option<HeaderName>,
    /// Hits, misses, bypasses, invalidations, evictions, emptyings; entries; stream up.
    metrics: ProxyMetrics,
}

/// One shard: a map from id to slot, the slots in clock order.
#[derive(Debug)]
struct Shard {
    /// Id to index in `slots`.
    index: HashMap<Arc<str>, usize>,
    /// The entries.
    slots: Vec<Slot>,
    /// Most entries this shard holds (the shards' bounds add up to `N`).
    capacity: usize,
    /// The clock hand: the next slot eviction looks at.
    hand: usize,
}

/// One cached session.
#[derive(Debug)]
struct Slot {
    /// Its id (also the key in the index).
    id: Arc<str>,
    /// The session as the store returned it.
    session: Arc<SessionData>,
    /// End of its touch window: served until then.
    fresh_until: Instant,
    /// Served since the clock hand last passed (a second chance).
    referenced: bool,
}

/// What the cache says about an id.
pub(super) enum Cached {
    /// Served from the cache.
    Hit(Arc<SessionData>),
    /// Not there: read the store, then [`SessionCache::fill`] with this ticket.
    Miss(Ticket),
    /// The cache is bypassed (its stream is down).
    Bypassed,
}

/// Taken before a `Get`: the answer is inserted only if nothing invalidated the id since.
#[derive(Debug)]
pub(super) struct Ticket {
    /// [`SessionCache::generation`] when taken.
    generation: u64,
    /// The id's stripe.
    stripe: usize,
    /// That stripe's invalidation count when taken.
    count: u64,
    /// When taken (before the `Get` was sent, so before its touch).
    at: Instant,
}

impl SessionCache {
    /// A cache of at most `capacity` sessions (above zero), bypassed until `follow` brings
    /// its stream up.
    pub(super) fn new(
        capacity: usize,
        cookie: &str,
        header: Option<HeaderName>,
        metrics: ProxyMetrics,
    ) -> Self {
        let shards = SHARDS.min(capacity).max(1);
        let shards = (0..shards)
            .map(|i| {
                // The shards' bounds add up to `capacity` exactly.
                let capacity = capacity / shards + usize::from(i < capacity % shards);
                Mutex::new(Shard {
                    index: HashMap::new(),
                    slots: Vec::new(),
                    capacity,
                    hand: 0,
                })
            })
            .collect();
        metrics.session_cache_up(false);
        SessionCache {
            shards,
            stripes: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
            generation: AtomicU64::new(0),
            up: AtomicBool::new(false),
            hasher: RandomState::new(),
            cookie: cookie.to_owned(),
            header,
            metrics,
        }
    }

    /// The shard and the stripe of `id`.
    fn place(&self, id: &str) -> (usize, usize) {
        let hash = self.hasher.hash_one(id);
        (
            (hash as usize) % self.shards.len(),
            ((hash >> 32) as usize) % STRIPES,
        )
    }

    /// A shard, locked (a panic while holding it left nothing half-done worth refusing).
    fn shard(&self, shard: usize) -> MutexGuard<'_, Shard> {
        self.shards[shard]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The cached session `id`, or a ticket to fill it, or `Bypassed` while the stream is down.
    pub(super) fn lookup(&self, id: &str) -> Cached {
        if !self.up.load(Ordering::Acquire) {
            self.metrics.session_cache("bypassed");
            return Cached::Bypassed;
        }
        let (shard, stripe) = self.place(id);
        let ticket = Ticket {
            generation: self.generation.load(Ordering::Acquire),
            stripe,
            count: self.stripes[stripe].load(Ordering::Acquire),
            at: Instant::now(),
        };
        let hit = {
            let mut shard = self.shard(shard);
            shard.index.get(id).copied().and_then(|i| {
                let slot = &mut shard.slots[i];
                let now = SystemTime::now();
                let live = ticket.at < slot.fresh_until
                    && now < slot.session.expires_at
                    && slot.session.ends_at.is_none_or(|end| now < end);
                slot.referenced |= live;
                live.then(|| slot.session.clone())
            })
        };
        match hit {
            Some(session) => {
                self.metrics.session_cache("hit");
                Cached::Hit(session)
            }
            None => {
                self.metrics.session_cache("miss");
                Cached::Miss(ticket)
            }
        }
    }

    /// Counts a request that does not use the cache (its snapshot holds offline changes).
    pub(super) fn bypass(&self) {
        self.metrics.session_cache("bypassed");
    }

    /// Inserts `session`, read from the store after `ticket` was taken, unless the id was
    /// invalidated or the cache emptied since, or its touch window is already over.
    pub(super) fn fill(&self, ticket: Ticket, session: Arc<SessionData>) {
        let now = SystemTime::now();
        // How far the stored expiry lags behind a touch made now (a touch the server did not
        // write, or clocks apart): the window shrinks by as much.
        let left = session.expires_at.duration_since(now).unwrap_or_default();
        let lag = session.ttl.saturating_sub(left);
        let Some(window) = touch_window(session.ttl).checked_sub(lag) else {
            return;
        };
        let fresh_until = ticket.at + window;
        if fresh_until <= Instant::now() {
            return;
        }
        let (shard, stripe) = self.place(&session.id);
        let mut shard = self.shard(shard);
        // Checked under the shard's lock: an invalidation bumps its stripe before it takes
        // that lock to remove, so it either refuses this fill or removes what it inserted.
        if !self.up.load(Ordering::Acquire)
            || self.generation.load(Ordering::Acquire) != ticket.generation
            || stripe != ticket.stripe
            || self.stripes[stripe].load(Ordering::Acquire) != ticket.count
        {
            return;
        }
        let id: Arc<str> = Arc::from(session.id.as_str());
        let slot = Slot {
            id,
            session,
            fresh_until,
            referenced: false,
        };
        match shard.insert(slot) {
            Inserted::Replaced => {}
            Inserted::Added => self.metrics.session_cache_entries(1),
            Inserted::Evicted => self.metrics.session_cache("evicted"),
        }
    }

    /// Forgets `id` and refuses the fills whose tickets came before; whether it was there.
    fn invalidate(&self, id: &str) -> bool {
        let (shard, stripe) = self.place(id);
        self.stripes[stripe].fetch_add(1, Ordering::AcqRel);
        let removed = self.shard(shard).remove(id);
        if removed {
            self.metrics.session_cache_entries(-1);
        }
        removed
    }

    /// An event of session `id`: forgotten (`invalidated` counted when it was there).
    pub(super) fn event(&self, id: &str) {
        if self.invalidate(id) {
            self.metrics.session_cache("invalidated");
        }
    }

    /// A response ended or changed session `id`, or its request may have written it:
    /// forgotten (`forgotten` counted, whether it was there or not).
    pub(super) fn forget(&self, id: &str) {
        self.invalidate(id);
        self.metrics.session_cache("forgotten");
    }

    /// The stream is lost: empty and bypassed until it is back.
    pub(super) fn suspend(&self) {
        let was_up = self.up.swap(false, Ordering::AcqRel);
        self.empty();
        if was_up {
            self.metrics.session_cache_up(false);
        }
    }

    /// The stream is up (a new subscription, or events were missed): emptied, then used.
    pub(super) fn resume(&self) {
        self.empty();
        if !self.up.swap(true, Ordering::AcqRel) {
            self.metrics.session_cache_up(true);
        }
    }

    /// Drops every entry; tickets taken before fill nothing.
    fn empty(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        let mut dropped = 0;
        for shard in 0..self.shards.len() {
            let mut shard = self.shard(shard);
            dropped += shard.slots.len();
            shard.index.clear();
            shard.slots.clear();
            shard.hand = 0;
        }
        if dropped > 0 {
            self.metrics.session_cache("cleared");
            self.metrics
                .session_cache_entries(-i64::try_from(dropped).unwrap_or(i64::MAX));
        }
    }

    /// Whether a response head ends or replaces session `id`: it clears the session cookie or
    /// sets it to another id, or carries the session header empty or with another id.
    pub(super) fn response_changes(&self, headers: &HeaderMap, id: &str) -> bool {
        let cookie = clears_cookie(headers, &self.cookie, SystemTime::now())
            || set_value(headers, &self.cookie).is_some_and(|value| value != id);
        let header = self.header.as_ref().is_some_and(|name| {
            headers
                .get_all(name)
                .iter()
                .next_back()
                .is_some_and(|value| value.as_bytes().trim_ascii() != id.as_bytes())
        });
        cookie || header
    }
}

impl Drop for SessionCache {
    fn drop(&mut self) {
        // A plugin replaced by a reload: its entries leave the gauge with it.
        let held: usize = self
            .shards
            .iter_mut()
            .map(|shard| shard.get_mut().map_or(0, |shard| shard.slots.len()))
            .sum();
        self.metrics
            .session_cache_entries(-i64::try_from(held).unwrap_or(i64::MAX));
    }
}

/// What [`Shard::insert`] did.
enum Inserted {
    /// The id was there: its entry replaced.
    Replaced,
    /// A new entry in a free place.
    Added,
    /// A new entry in place of an evicted one.
    Evicted,
}

impl Shard {
    /// Inserts `slot`, evicting one entry (clock: the first not served since the hand last
    /// passed) when full.
    fn insert(&mut self, slot: Slot) -> Inserted {
        if let Some(&i) = self.index.get(&slot.id) {
            self.slots[i] = slot;
            return Inserted::Replaced;
        }
        if self.slots.len() < self.capacity {
            self.index.insert(slot.id.clone(), self.slots.len());
            self.slots.push(slot);
            return Inserted::Added;
        }
        let len = self.slots.len();
        if len == 0 {
            return Inserted::Replaced;
        }
        // At most two turns: the first clears every second chance.
        while self.slots[self.hand % len].referenced {
            self.slots[self.hand % len].referenced = false;
            self.hand = (self.hand + 1) % len;
        }
        let at = self.hand % len;
        self.index.remove(&self.slots[at].id);
        self.index.insert(slot.id.clone(), at);
        self.slots[at] = slot;
        self.hand = (at + 1) % len;
        Inserted::Evicted
    }

    /// Removes `id`; whether it was there.
    fn remove(&mut self, id: &str) -> bool {
        let Some(at) = self.index.remove(id) else {
            return false;
        };
        self.slots.swap_remove(at);
        if let Some(moved) = self.slots.get(at) {
            self.index.insert(moved.id.clone(), at);
        }
        if self.hand >= self.slots.len() {
            self.hand = 0;
        }
        true
    }
}

/// How long after a touching `Get` an entry is served: the session server's default touch
/// granularity, the larger of 1 s and 1% of the ttl, at most half the ttl.
fn touch_window(ttl: Duration) -> Duration {
    (ttl / 100).max(MIN_TOUCH_WINDOW).min(ttl / 2)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use http::HeaderValue;

    use super::*;

    fn session(id: &str, ttl: Duration) -> Arc<SessionData> {
        let now = SystemTime::now();
        Arc::new(SessionData {
            id: id.to_owned(),
            namespace: "ns".to_owned(),
            user_id: "alice".to_owned(),
            attrs: HashMap::new(),
            version: 1,
            created_at: now,
            expires_at: now + ttl,
            ttl,
            epoch: String::new(),
            write_id: String::new(),
            ends_at: None,
        })
    }

    fn cache(capacity: usize) -> SessionCache {
        let cache = SessionCache::new(capacity, "sid", None, ProxyMetrics::new().unwrap());
        cache.resume();
        cache
    }

    fn ticket(cache: &SessionCache, id: &str) -> Ticket {
        match cache.lookup(id) {
            Cached::Miss(ticket) => ticket,
            Cached::Hit(_) => panic!("{id} is cached"),
            Cached::Bypassed => panic!("bypassed"),
        }
    }

    fn hit(cache: &SessionCache, id: &str) -> bool {
        matches!(cache.lookup(id), Cached::Hit(_))
    }

    fn len(cache: &SessionCache) -> usize {
        (0..cache.shards.len())
            .map(|s| cache.shard(s).slots.len())
            .sum()
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn a_fill_is_served_until_an_invalidation() {
        let cache = cache(10);
        let t = ticket(&cache, "a");
        cache.fill(t, session("a", HOUR));
        assert!(hit(&cache, "a"));
        cache.event("a");
        assert!(!hit(&cache, "a"));
    }

    #[test]
    fn a_fill_older_than_an_invalidation_or_an_emptying_is_refused() {
        let cache = cache(10);
        let t = ticket(&cache, "a");
        cache.event("a");
        cache.fill(t, session("a", HOUR));
        assert!(
            !hit(&cache, "a"),
            "read before the event, inserted after it"
        );
        let t = ticket(&cache, "a");
        cache.resume();
        cache.fill(t, session("a", HOUR));
        assert!(!hit(&cache, "a"), "read before the stream came back");
        let t = ticket(&cache, "a");
        cache.fill(t, session("a", HOUR));
        assert!(hit(&cache, "a"));
    }

    #[test]
    fn a_suspended_cache_is_bypassed_and_emptied() {
        let cache = cache(10);
        let t = ticket(&cache, "a");
        cache.fill(t, session("a", HOUR));
        cache.suspend();
        assert!(matches!(cache.lookup("a"), Cached::Bypassed));
        cache.resume();
        assert!(!hit(&cache, "a"), "emptied, not only bypassed");
    }

    #[test]
    fn entries_are_served_only_within_the_touch_window() {
        assert_eq!(touch_window(HOUR), Duration::from_secs(36));
        assert_eq!(
            touch_window(Duration::from_secs(30)),
            Duration::from_secs(1)
        );
        assert_eq!(
            touch_window(Duration::from_millis(600)),
            Duration::from_millis(300)
        );
        let cache = cache(10);
        // A stored expiry lagging a fresh touch by more than the window: not cached at all.
        let mut lagging = (*session("a", HOUR)).clone();
        lagging.expires_at -= Duration::from_secs(40);
        let t = ticket(&cache, "a");
        cache.fill(t, Arc::new(lagging));
        assert!(!hit(&cache, "a"));
        // A 20 ms ttl: a 10 ms window, then the store again.
        let t = ticket(&cache, "b");
        cache.fill(t, session("b", Duration::from_millis(20)));
        std::thread::sleep(Duration::from_millis(15));
        assert!(!hit(&cache, "b"));
    }

    #[test]
    fn the_size_stays_within_the_bound_and_used_entries_survive_eviction() {
        let cache = cache(40);
        for i in 0..1000 {
            let id = format!("s{i}");
            let t = ticket(&cache, &id);
            cache.fill(t, session(&id, HOUR));
            assert!(hit(&cache, "s0"), "used on every round: {i}");
            assert!(len(&cache) <= 40);
        }
        assert_eq!(len(&cache), 40);
        assert!(hit(&cache, "s0"), "a used entry keeps its second chance");
        cache.event("s999");
        assert_eq!(len(&cache), 39);
    }

    #[test]
    fn responses_ending_or_replacing_the_session_are_recognized() {
        let cache = SessionCache::new(
            4,
            "sid",
            Some(HeaderName::from_static("x-token")),
            ProxyMetrics::new().unwrap(),
        );
        let head = |lines: &[(&str, &'static str)]| {
            let mut headers = HeaderMap::new();
            for (name, value) in lines {
                headers.append(
                    HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    HeaderValue::from_static(value),
                );
            }
            headers
        };
        let changes = |lines| cache.response_changes(&head(lines), "old");
        assert!(changes(&[("set-cookie", "sid=; Path=/; Max-Age=0")]));
        assert!(changes(&[("set-cookie", "sid=new; Path=/")]));
        assert!(changes(&[("x-token", "")]));
        assert!(changes(&[("x-token", "new")]));
        assert!(!changes(&[("set-cookie", "sid=old; Path=/; Max-Age=600")]));
        assert!(!changes(&[("x-token", "old")]));
        assert!(!changes(&[("set-cookie", "theme=dark")]));
        assert!(!changes(&[]));
    }
}
