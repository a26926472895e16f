//! The Redis store's near cache (`--cache-capacity`): a hit is answered without Redis, a write
//! through another store (another server) is invalidated by Redis' push, a write through the
//! same store is never followed by the old version, a flush and an expiry invalidate, and a lost
//! tracking connection empties the cache and bypasses it until tracking is back. The same store
//! runs the whole conformance suite (`conformance::redis_near_cache::*`) and the two-server
//! compare-and-set race (`two_servers::redis_near_cache::*`).

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use session_server::config::Settings;
use session_server::metrics::Metrics;
use session_server::store::redis::{RedisConfig, RedisStore};
use session_server::store::{NewSession, Patch, SessionStore, StoreError};
use support::harness;
use support::ids::new_id;
use support::services::{self, OwnRedis};
use support::wait::eventually;

const NS: &str = "nc";

/// How long an invalidation push may take to arrive: it normally takes well under a
/// millisecond; the brief's bound.
const PUSH_WITHIN: Duration = Duration::from_secs(2);

/// How long tracking may take to come back after its connection or Redis did: generous, for a
/// loaded machine.
const BACK_WITHIN: Duration = Duration::from_secs(15);

fn config(url: &str, test: &str, capacity: usize) -> RedisConfig {
    let mut config = harness::redis_config(url, test, &Settings::default());
    config.cache_capacity = capacity;
    config
}

/// A store with a near cache whose tracking is on.
async fn cached_store(config: &RedisConfig) -> RedisStore {
    let store = RedisStore::new(config.clone()).expect("store");
    harness::near_cache_up(&store).await;
    store
}

async fn raw(url: &str) -> MultiplexedConnection {
    redis::Client::open(url)
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("raw connection")
}

async fn create(store: &dyn SessionStore, ttl: Duration) -> String {
    let id = new_id();
    store
        .create(NewSession {
            id: id.clone(),
            namespace: NS.into(),
            user_id: String::new(),
            attrs: HashMap::from([("k".to_owned(), b"v1".to_vec())]),
            ttl,
        })
        .await
        .expect("create");
    id
}

async fn set(store: &dyn SessionStore, id: &str, value: &str) -> u64 {
    let patch = Patch {
        set: HashMap::from([("k".to_owned(), value.as_bytes().to_vec())]),
        ..Patch::default()
    };
    store.update(NS, id, patch).await.expect("update").version
}

async fn version(store: &dyn SessionStore, id: &str) -> Result<u64, StoreError> {
    store.get(NS, id, false).await.map(|r| r.version)
}

fn stats(store: &dyn SessionStore) -> session_server::store::NearCacheStats {
    store.near_cache_stats().expect("a near cache")
}

/// Reads `id` until a read is a hit: the write that made it may have its own invalidation
/// arrive after the first read's fill, and drop it.
async fn cached(store: &dyn SessionStore, id: &str) {
    eventually("the session cached", PUSH_WITHIN, || async {
        let hits = stats(store).hits;
        version(store, id).await.ok()?;
        version(store, id).await.ok()?;
        (stats(store).hits > hits).then_some(())
    })
    .await;
}

/// The shared Redis, or `None` (skipped).
fn shared_redis(test: &str) -> Option<String> {
    services::redis_url(test)
}

/// A Redis of the test's own (for what would disturb other tests on the shared one: pauses,
/// flushes, kills, restarts), or `None` (skipped).
fn own_redis(test: &str) -> Option<OwnRedis> {
    services::redis_server_binary(test).map(OwnRedis::start)
}

/// A second read is a hit (counted, in the metrics too), and it is answered while Redis
/// answers nobody (`CLIENT PAUSE ALL`), which a read of Redis could not be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hit_is_answered_without_redis() {
    let test = "a_hit_is_answered_without_redis";
    let Some(redis) = own_redis(test) else {
        return;
    };
    let config = config(&redis.url(), test, 100);
    let store = cached_store(&config).await;
    let id = create(&store, Duration::from_secs(60)).await;
    cached(&store, &id).await;
    assert_eq!(stats(&store).entries, 1, "the read filled the cache");
    let before = stats(&store);

    let mut raw = raw(&redis.url()).await;
    redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(3000)
        .arg("ALL")
        .query_async::<()>(&mut raw)
        .await
        .expect("pause");
    let started = Instant::now();
    let hit = store.get(NS, &id, false).await.expect("a hit");
    let took = started.elapsed();
    assert_eq!(hit.version, 1);
    assert_eq!(hit.attrs.get("k").map(Vec::as_slice), Some(&b"v1"[..]));
    assert!(
        took < Duration::from_millis(500),
        "a hit waited {took:?} for a paused Redis"
    );
    let unknown = tokio::time::timeout(Duration::from_millis(500), version(&store, "nope")).await;
    assert!(unknown.is_err(), "a miss must wait for the paused Redis");
    // GetRequest.bypass_cache (a caller with its own cache) reads Redis, never the cache.
    let bypass =
        tokio::time::timeout(Duration::from_millis(500), store.get_uncached(NS, &id)).await;
    assert!(
        bypass.is_err(),
        "a read past the cache must wait for the paused Redis"
    );
    let counted = stats(&store);
    assert_eq!(
        (counted.hits, counted.misses),
        (before.hits + 1, before.misses + 1),
        "{counted:?}"
    );
    assert_eq!(
        counted.entries, 1,
        "a miss for an unknown id inserts nothing"
    );

    let metrics = Metrics::new();
    let text = metrics.render(&store);
    let hits = format!(
        "stickless_near_cache_total{{outcome=\"hit\"}} {}",
        counted.hits
    );
    assert!(text.contains(&hits), "{text}");
    assert_eq!(metrics.near_cache("miss"), counted.misses);
}

/// A write through another store on the same keys (another server) reaches this store's cache
/// through Redis' invalidation within the push bound: updates, touches and deletes alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_another_server_is_invalidated() {
    let test = "a_write_through_another_server_is_invalidated";
    let Some(url) = shared_redis(test) else {
        return;
    };
    let cached = config(&url, test, 100);
    let store = cached_store(&cached).await;
    let mut plain = cached.clone();
    plain.cache_capacity = 0;
    let other = RedisStore::new(plain).expect("store");
    let id = create(&other, Duration::from_secs(60)).await;

    for round in 0..20 {
        let now = version(&store, &id).await.expect("read");
        assert_eq!(version(&store, &id).await.expect("hit"), now);
        let written = set(&other, &id, &format!("v{round}")).await;
        eventually("the other server's update", PUSH_WITHIN, || async {
            (version(&store, &id).await.ok() == Some(written)).then_some(())
        })
        .await;
    }
    let before = store.get(NS, &id, false).await.expect("read").expires_at;
    // A touch changes no version, only the expiry: it is a write of the key all the same.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let touched = other.touch(NS, &id, None).await.expect("touch").expires_at;
    assert!(touched > before);
    eventually("the other server's touch", PUSH_WITHIN, || async {
        let read = store.get(NS, &id, false).await.ok()?;
        (read.expires_at >= touched - Duration::from_millis(5)).then_some(())
    })
    .await;
    assert!(other.delete(NS, &id).await.expect("delete"));
    eventually("the other server's delete", PUSH_WITHIN, || async {
        matches!(version(&store, &id).await, Err(StoreError::NotFound)).then_some(())
    })
    .await;
    assert!(stats(&store).invalidations >= 20, "{:?}", stats(&store));
}

/// A write through this store is never followed, on this store, by a read of the version
/// before it: the write invalidates locally before it is sent and after its reply, whatever
/// the push does. Also for regenerate, delete and delete-by-user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_after_a_write_on_the_same_server_see_it() {
    let test = "reads_after_a_write_on_the_same_server_see_it";
    let Some(url) = shared_redis(test) else {
        return;
    };
    let store = cached_store(&config(&url, test, 1000)).await;
    let id = create(&store, Duration::from_secs(60)).await;
    for round in 0..200 {
        version(&store, &id).await.expect("read");
        let written = set(&store, &id, &format!("v{round}")).await;
        assert_eq!(version(&store, &id).await.expect("read"), written);
    }
    version(&store, &id).await.expect("read");
    version(&store, &id).await.expect("hit");
    assert!(stats(&store).hits >= 1);

    let new_id = new_id();
    store
        .regenerate(NS, &id, &new_id)
        .await
        .expect("regenerate");
    assert!(matches!(
        version(&store, &id).await,
        Err(StoreError::NotFound)
    ));
    version(&store, &new_id).await.expect("read");
    assert!(store.delete(NS, &new_id).await.expect("delete"));
    assert!(matches!(
        version(&store, &new_id).await,
        Err(StoreError::NotFound)
    ));

    let owned = new_id_for_user(&store, "ann").await;
    version(&store, &owned).await.expect("read");
    version(&store, &owned).await.expect("hit");
    assert_eq!(store.delete_by_user(NS, "ann").await.expect("delete"), 1);
    assert!(matches!(
        version(&store, &owned).await,
        Err(StoreError::NotFound)
    ));
}

async fn new_id_for_user(store: &dyn SessionStore, user: &str) -> String {
    let id = new_id();
    store
        .create(NewSession {
            id: id.clone(),
            namespace: NS.into(),
            user_id: user.into(),
            attrs: HashMap::new(),
            ttl: Duration::from_secs(60),
        })
        .await
        .expect("create");
    id
}

/// A FLUSHALL (Redis' null invalidation) empties the cache; a session past its expiry is
/// never answered from it, and one whose expiry another client shortens goes with the push.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_and_an_expiry_invalidate() {
    let test = "a_flush_and_an_expiry_invalidate";
    let Some(redis) = own_redis(test) else {
        return;
    };
    let config = config(&redis.url(), test, 100);
    let store = cached_store(&config).await;
    let mut raw = raw(&redis.url()).await;

    let id = create(&store, Duration::from_secs(60)).await;
    version(&store, &id).await.expect("read");
    version(&store, &id).await.expect("hit");
    redis::cmd("FLUSHALL")
        .query_async::<()>(&mut raw)
        .await
        .expect("flushall");
    eventually("the flush", PUSH_WITHIN, || async {
        matches!(version(&store, &id).await, Err(StoreError::NotFound)).then_some(())
    })
    .await;

    let short = create(&store, Duration::from_millis(400)).await;
    version(&store, &short).await.expect("read");
    assert_eq!(stats(&store).entries, 1);
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert!(matches!(
        version(&store, &short).await,
        Err(StoreError::NotFound)
    ));

    let shortened = create(&store, Duration::from_secs(60)).await;
    version(&store, &shortened).await.expect("read");
    let key = format!("{}:{NS}:s:{{{shortened}}}", config.key_prefix);
    redis::cmd("PEXPIRE")
        .arg(&key)
        .arg(1)
        .query_async::<()>(&mut raw)
        .await
        .expect("pexpire");
    eventually("the shortened expiry", PUSH_WITHIN, || async {
        matches!(version(&store, &shortened).await, Err(StoreError::NotFound)).then_some(())
    })
    .await;
}

/// Killing the tracking connection empties the cache: a write made right after the kill (whose
/// push nobody hears) is read at once, not the cached version before it. Tracking comes back
/// by itself and the cache serves again. With Redis down, every read bypasses the cache
/// (counted), and after Redis is back, it is used again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_tracking_connection_empties_and_bypasses_until_back() {
    let test = "a_lost_tracking_connection_empties_and_bypasses";
    let Some(mut redis) = own_redis(test) else {
        return;
    };
    let config = config(&redis.url(), test, 100);
    let store = cached_store(&config).await;
    let mut plain = config.clone();
    plain.cache_capacity = 0;
    let other = RedisStore::new(plain).expect("store");
    let mut raw = raw(&redis.url()).await;

    let id = create(&store, Duration::from_secs(60)).await;
    version(&store, &id).await.expect("read");
    assert_eq!(version(&store, &id).await.expect("hit"), 1);
    // The tracking connection: the one client with the tracking flag `t`.
    let clients: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut raw)
        .await
        .expect("client list");
    let tracking: Vec<&str> = clients
        .lines()
        .filter(|line| {
            line.split(' ').any(|field| {
                field
                    .strip_prefix("flags=")
                    .is_some_and(|f| f.contains('t'))
            })
        })
        .filter_map(|line| line.split(' ').find_map(|f| f.strip_prefix("id=")))
        .collect();
    assert_eq!(tracking.len(), 1, "{clients}");
    redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(tracking[0])
        .query_async::<()>(&mut raw)
        .await
        .expect("client kill");
    eventually("the cache emptied", PUSH_WITHIN, || async {
        (stats(&store).entries == 0).then_some(())
    })
    .await;
    let written = set(&other, &id, "after the kill").await;
    assert_eq!(
        version(&store, &id).await.expect("read"),
        written,
        "served a version from before the lost connection"
    );
    eventually("tracking back", BACK_WITHIN, || async {
        stats(&store).up.then_some(())
    })
    .await;
    cached(&store, &id).await;
    assert_eq!(version(&store, &id).await.expect("hit"), written);

    redis.stop();
    eventually("tracking down", BACK_WITHIN, || async {
        (!stats(&store).up).then_some(())
    })
    .await;
    assert_eq!(stats(&store).entries, 0, "emptied when tracking went");
    let bypasses = stats(&store).bypasses;
    assert!(version(&store, &id).await.is_err(), "Redis is down");
    assert_eq!(stats(&store).bypasses, bypasses + 1);

    redis.restart();
    harness::near_cache_up(&store).await;
    let id = eventually("a create on the restarted redis", BACK_WITHIN, || async {
        let id = new_id();
        let new = NewSession {
            id: id.clone(),
            namespace: NS.into(),
            user_id: String::new(),
            attrs: HashMap::new(),
            ttl: Duration::from_secs(60),
        };
        store.create(new).await.ok().map(|_| id)
    })
    .await;
    cached(&store, &id).await;
}

/// Many concurrent plain reads of sessions another store keeps writing: once a write is
/// acknowledged and its push had time to arrive, no read of this store returns an older
/// version (the fill race: a read that began before a write never fills after its push).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reads_never_keep_a_version_older_than_a_pushed_write() {
    let test = "concurrent_reads_never_keep_an_older_version";
    let Some(url) = shared_redis(test) else {
        return;
    };
    let cached = config(&url, test, 1000);
    let store = std::sync::Arc::new(cached_store(&cached).await);
    let mut plain = cached.clone();
    plain.cache_capacity = 0;
    let other = RedisStore::new(plain).expect("store");
    let ids: Vec<String> = {
        let mut ids = Vec::new();
        for _ in 0..4 {
            ids.push(create(&other, Duration::from_secs(60)).await);
        }
        ids
    };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..8)
        .map(|n| {
            let (store, ids, stop) = (store.clone(), ids.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = version(store.as_ref(), &ids[n % ids.len()]).await;
                    // A hit never waits: give the writer's calls their turn.
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    for round in 0..100 {
        for id in &ids {
            let written = set(&other, id, &format!("v{round}")).await;
            let deadline = Instant::now() + PUSH_WITHIN;
            loop {
                let read = version(store.as_ref(), id).await;
                if matches!(read, Ok(v) if v == written) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "round {round}: wrote {written}, still read {read:?} after {PUSH_WITHIN:?}; \
                     {:?}",
                    stats(store.as_ref())
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for reader in readers {
        reader.await.expect("reader");
    }
    // Settled: every session reads at its last version, from the cache or not.
    tokio::time::sleep(Duration::from_millis(100)).await;
    for id in &ids {
        let stored = other.get(NS, id, false).await.expect("read").version;
        assert_eq!(version(store.as_ref(), id).await.expect("read"), stored);
        assert_eq!(version(store.as_ref(), id).await.expect("read"), stored);
    }
    assert!(
        stats(store.as_ref()).hits > 0,
        "{:?}",
        stats(store.as_ref())
    );
}

/// A cluster store refuses a near cache when made (config validation refuses the flags first).
#[tokio::test]
async fn a_cluster_store_refuses_a_near_cache() {
    let mut config = RedisConfig::new("redis://127.0.0.1:1,127.0.0.1:2", 1024);
    config.cluster = true;
    config.cache_capacity = 10;
    match RedisStore::new(config) {
        Err(StoreError::Internal(message)) => assert!(message.contains("cluster"), "{message}"),
        other => panic!("{other:?}"),
    }
}
