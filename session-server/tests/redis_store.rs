//! Behaviour only the Redis store has: its key layout and record formats, undecodable records,
//! the user index, expiry notifications, its epoch key, and surviving a Redis that is down or
//! restarts. What every store must
//! do is in the conformance suite.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;
use session_server::config::Settings;
use session_server::store::redis::{RecordFormat, RedisConfig, RedisStore};
use session_server::store::{EventKind, NewSession, Patch, SessionEvent, SessionStore, StoreError};
use support::harness;
use support::ids::new_id;
use support::outage::fails_as_outage;
use support::ports::RefusedPort;
use support::redis_record;
use support::services;
use support::wait::{events_ready, eventually, eventually_ok, next_event, update_until_heard};

const NS: &str = "shop";

/// The timeout of every store here: long enough that no call to a Redis that is up runs into
/// it on a loaded machine, short enough that the outage tests wait it out cheaply.
const TIMEOUT: Duration = Duration::from_secs(2);

/// How long an event may take to arrive, or a restarted Redis to answer again: generous, for a
/// loaded machine; both normally take milliseconds.
const WITHIN: Duration = Duration::from_secs(30);

/// A store on `url` with a private prefix, and a raw connection to look behind it.
struct Fixture {
    store: RedisStore,
    raw: MultiplexedConnection,
    prefix: String,
}

impl Fixture {
    async fn new(test: &str, url: &str, max_session_bytes: usize) -> Fixture {
        Fixture::with_timeout(test, url, max_session_bytes, TIMEOUT).await
    }

    /// A second store on the same keys, writing records in `format`.
    fn store_writing(&self, url: &str, format: RecordFormat) -> RedisStore {
        let mut config = harness::redis_config(url, "unused", &Settings::default());
        config.key_prefix = self.prefix.clone();
        config.record_format = format;
        RedisStore::new(config).expect("store")
    }

    /// A fixture whose store calls may take up to `timeout`.
    async fn with_timeout(
        test: &str,
        url: &str,
        max_session_bytes: usize,
        timeout: Duration,
    ) -> Fixture {
        let settings = Settings {
            max_session_bytes,
            store_timeout: timeout,
            ..Settings::default()
        };
        let config = harness::redis_config(url, test, &settings);
        let prefix = config.key_prefix.clone();
        let store = RedisStore::new(config).expect("store");
        let raw = redis::Client::open(url)
            .expect("url")
            .get_multiplexed_async_connection()
            .await
            .expect("raw connection");
        Fixture { store, raw, prefix }
    }

    fn session_key(&self, id: &str) -> String {
        format!("{}:{NS}:s:{{{id}}}", self.prefix)
    }

    fn user_key(&self, user: &str) -> String {
        format!("{}:{NS}:u:{{{user}}}", self.prefix)
    }

    /// The record at `key` as the fields of its format-1 hash, whichever format it is in
    /// (`fmt` says which), decoded by Redis's own MessagePack; a string that is no packed record
    /// is `{"raw": value}`.
    async fn hash(&mut self, key: &str) -> HashMap<String, Vec<u8>> {
        redis_record::fields(&mut self.raw, key).await
    }

    /// The redis type of `key`: `hash` for format 1, `string` for format 2.
    async fn kind(&mut self, key: &str) -> String {
        redis::cmd("TYPE")
            .arg(key)
            .query_async(&mut self.raw)
            .await
            .expect("TYPE")
    }

    /// Gives the record at `key` another user, in its own format, as if behind the store's back.
    async fn set_user(&mut self, key: &str, user: &str) {
        let () = redis::Script::new(
            "if redis.call('TYPE', KEYS[1])['ok'] == 'hash' then \
               redis.call('HSET', KEYS[1], 'user', ARGV[1]) return end \
             local r = cmsgpack.unpack(redis.call('GET', KEYS[1])) r[2] = ARGV[1] \
             redis.call('SET', KEYS[1], cmsgpack.pack(r), 'KEEPTTL')",
        )
        .key(key)
        .arg(user)
        .invoke_async(&mut self.raw)
        .await
        .expect("set user");
    }

    async fn pttl(&mut self, key: &str) -> i64 {
        self.raw.pttl(key).await.expect("PTTL")
    }

    async fn members(&mut self, key: &str) -> Vec<String> {
        let mut ids: Vec<String> = self.raw.smembers(key).await.expect("SMEMBERS");
        ids.sort();
        ids
    }

    /// Deletes every key of this test.
    async fn cleanup(mut self) {
        let keys: Vec<String> = self
            .raw
            .keys(format!("{}:*", self.prefix))
            .await
            .expect("KEYS");
        if !keys.is_empty() {
            let _: () = self.raw.del(keys).await.expect("DEL");
        }
    }
}

const MINUTE: Duration = Duration::from_secs(60);

fn session(user: &str, attrs: &[(&str, &[u8])], ttl: Duration) -> NewSession {
    NewSession {
        id: new_id(),
        namespace: NS.to_string(),
        user_id: user.to_string(),
        attrs: attrs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_vec()))
            .collect(),
        ttl,
    }
}

#[tokio::test]
async fn keys_carry_prefix_namespace_and_hash_tag() {
    let Some(url) = services::redis_url("keys_carry_prefix_namespace_and_hash_tag") else {
        return;
    };
    let mut fx = Fixture::new("layout", &url, 1024).await;
    let new = session("alice", &[("cart", b"3 apples")], Duration::from_secs(60));
    let record = fx.store.create(new.clone()).await.expect("create");

    let hash = fx.hash(&fx.session_key(&new.id)).await;
    assert_eq!(fx.kind(&fx.session_key(&new.id)).await, "string");
    assert_eq!(hash.get("fmt").map(Vec::as_slice), Some(&b"2"[..]));
    assert_eq!(hash.get("user").map(Vec::as_slice), Some(&b"alice"[..]));
    assert_eq!(hash.get("ver").map(Vec::as_slice), Some(&b"1"[..]));
    assert_eq!(hash.get("ttl").map(Vec::as_slice), Some(&b"60000"[..]));
    assert_eq!(
        hash.get("a:cart").map(Vec::as_slice),
        Some(&b"3 apples"[..])
    );
    assert!(hash.contains_key("created"));
    let pttl = fx.pttl(&fx.session_key(&new.id)).await;
    // Set to 60 s by the create, read a call later (which a loaded machine may delay).
    assert!((50_000..=60_000).contains(&pttl), "session PTTL {pttl}");
    let expires_in = record
        .expires_at
        .duration_since(record.created_at)
        .expect("after");
    assert!(
        expires_in >= Duration::from_secs(59),
        "expires_at follows PTTL: {expires_in:?}"
    );

    assert_eq!(
        fx.members(&fx.user_key("alice")).await,
        vec![new.id.clone()]
    );
    let index_pttl = fx.pttl(&fx.user_key("alice")).await;
    assert!(
        index_pttl >= pttl,
        "index lives at least as long: {index_pttl} < {pttl}"
    );
    fx.cleanup().await;
}

#[tokio::test]
async fn undecodable_record_is_not_found_and_left_alone() {
    let Some(url) = services::redis_url("undecodable_record_is_not_found_and_left_alone") else {
        return;
    };
    let mut fx = Fixture::new("corrupt", &url, 1024).await;
    let cases: [&[(&str, &str)]; 3] = [
        &[
            ("fmt", "9"),
            ("user", ""),
            ("ver", "1"),
            ("created", "1"),
            ("ttl", "60000"),
        ],
        &[
            ("fmt", "1"),
            ("user", ""),
            ("ver", "garbage"),
            ("created", "1"),
            ("ttl", "60000"),
        ],
        &[("user", "bob"), ("a:x", "y")],
    ];
    // Format-2 strings that are no record: not MessagePack, an unknown format, too few
    // elements, an attribute key without its value, a bad number, truncated.
    let packed = |elements: &[&str]| {
        let mut out = vec![0x90 | elements.len() as u8];
        for e in elements {
            out.push(0xa0 | e.len() as u8);
            out.extend_from_slice(e.as_bytes());
        }
        out
    };
    let good = packed(&["2", "bob", "1", "1", "0", "60000", "", "x", "y"]);
    let strings: Vec<Vec<u8>> = vec![
        b"text".to_vec(),
        packed(&["3", "bob", "1", "1", "0", "60000", ""]),
        packed(&["2", "bob", "1"]),
        packed(&["2", "bob", "1", "1", "0", "60000", "", "x"]),
        packed(&["2", "bob", "one", "1", "0", "60000", ""]),
        good[..good.len() - 1].to_vec(),
    ];
    let hashes = cases.iter().map(|fields| format!("hash {fields:?}"));
    let texts = strings.iter().map(|bytes| format!("string {bytes:?}"));
    for (n, what) in hashes.chain(texts).enumerate() {
        let id = new_id();
        let key = fx.session_key(&id);
        match cases.get(n) {
            Some(fields) => fx.raw.hset_multiple(&key, fields).await.expect("HSET"),
            None => fx
                .raw
                .set(&key, &strings[n - cases.len()])
                .await
                .expect("SET"),
        }
        let _: () = fx.raw.pexpire(&key, 60_000).await.expect("PEXPIRE");
        let before = fx.hash(&key).await;
        let fields = &what;

        let got = fx.store.get(NS, &id, true).await;
        assert!(
            matches!(got, Err(StoreError::NotFound)),
            "{fields:?}: get gave {got:?}"
        );
        let patch = Patch {
            set: [("k".into(), b"v".to_vec())].into(),
            ..Patch::default()
        };
        let updated = fx.store.update(NS, &id, patch).await;
        assert!(
            matches!(updated, Err(StoreError::NotFound)),
            "{fields:?}: {updated:?}"
        );
        let touched = fx.store.touch(NS, &id, Some(Duration::from_secs(5))).await;
        assert!(
            matches!(touched, Err(StoreError::NotFound)),
            "{fields:?}: {touched:?}"
        );
        let moved = fx.store.regenerate(NS, &id, &new_id()).await;
        assert!(
            matches!(moved, Err(StoreError::NotFound)),
            "{fields:?}: {moved:?}"
        );
        assert!(
            !fx.store.delete(NS, &id).await.expect("delete"),
            "{fields:?}"
        );
        let mut taken = session("", &[], Duration::from_secs(5));
        taken.id = id.clone();
        assert!(matches!(
            fx.store.create(taken).await,
            Err(StoreError::IdTaken)
        ));

        assert_eq!(fx.hash(&key).await, before, "{fields:?}: never overwritten");
        assert!(fx.pttl(&key).await > 55_000, "{fields:?}: expiry untouched");
    }

    // Neither a string nor a hash.
    let id = new_id();
    let key = fx.session_key(&id);
    let _: () = fx.raw.sadd(&key, "text").await.expect("SADD");
    assert!(matches!(
        fx.store.get(NS, &id, false).await,
        Err(StoreError::NotFound)
    ));
    assert!(!fx.store.delete(NS, &id).await.expect("delete"));
    fx.cleanup().await;
}

#[tokio::test]
async fn touch_slides_expiry_and_writes_only_the_ttl() {
    let Some(url) = services::redis_url("touch_slides_expiry_and_writes_only_the_ttl") else {
        return;
    };
    let mut fx = Fixture::new("touch", &url, 1024).await;
    let new = session("carol", &[("a", b"1")], Duration::from_secs(30));
    fx.store.create(new.clone()).await.expect("create");
    let key = fx.session_key(&new.id);
    let before = fx.hash(&key).await;

    let touched = fx
        .store
        .touch(NS, &new.id, Some(Duration::from_secs(120)))
        .await
        .expect("touch");
    assert_eq!(touched.version, 1);
    assert_eq!(touched.ttl, Duration::from_secs(120));
    assert!(fx.pttl(&key).await > 110_000);
    let mut expected = before.clone();
    expected.insert("ttl".into(), b"120000".to_vec());
    assert_eq!(fx.hash(&key).await, expected, "only the ttl field changed");
    assert!(
        fx.pttl(&fx.user_key("carol")).await > 110_000,
        "index outlives the session"
    );

    // Without a ttl, and a touching get, the stored ttl is reused and nothing is written.
    let _: () = fx.raw.pexpire(&key, 10_000).await.expect("PEXPIRE");
    fx.store.touch(NS, &new.id, None).await.expect("touch");
    assert!(fx.pttl(&key).await > 110_000);
    let _: () = fx.raw.pexpire(&key, 10_000).await.expect("PEXPIRE");
    let read = fx.store.get(NS, &new.id, true).await.expect("get");
    assert_eq!(read.version, 1);
    assert!(fx.pttl(&key).await > 110_000);
    let _: () = fx.raw.pexpire(&key, 10_000).await.expect("PEXPIRE");
    fx.store.get(NS, &new.id, false).await.expect("get");
    assert!(fx.pttl(&key).await <= 10_000, "a plain get does not slide");
    assert_eq!(fx.hash(&key).await, expected);
    fx.cleanup().await;
}

#[tokio::test]
async fn both_record_formats_are_read_and_a_write_moves_a_record_to_the_written_one() {
    let Some(url) = services::redis_url(
        "both_record_formats_are_read_and_a_write_moves_a_record_to_the_written_one",
    ) else {
        return;
    };
    let mut fx = Fixture::new("formats", &url, 1024).await;
    // An older server (format 1) wrote these sessions, during a rolling upgrade.
    let old = fx.store_writing(&url, RecordFormat::Hash);
    let new = session(
        "dana",
        &[("cart", b"2 pears"), ("bin", &[0, 255, 10])],
        MINUTE,
    );
    let written = old.create(new.clone()).await.expect("create");
    let other = session("dana", &[("x", b"1")], MINUTE);
    old.create(other.clone()).await.expect("create");
    let key = fx.session_key(&new.id);
    assert_eq!(fx.kind(&key).await, "hash");
    assert_eq!(
        fx.hash(&key).await.get("fmt").map(Vec::as_slice),
        Some(&b"1"[..])
    );

    // This server reads them as they are, without writing.
    let read = fx.store.get(NS, &new.id, false).await.expect("get");
    assert_eq!(read.attrs, written.attrs);
    assert_eq!((read.version, read.created_at), (1, written.created_at));
    assert_eq!(fx.kind(&key).await, "hash", "a plain read writes nothing");
    let listed = fx.store.list_by_user(NS, "dana").await.expect("list");
    assert_eq!(listed.len(), 2);

    // Its first write stores the record in format 2, nothing lost.
    let patch = Patch {
        set: [("note".into(), b"n".to_vec())].into(),
        expected_version: Some(1),
        ..Patch::default()
    };
    let updated = fx.store.update(NS, &new.id, patch).await.expect("update");
    assert_eq!(updated.version, 2);
    assert_eq!(fx.kind(&key).await, "string");
    let again = fx.store.get(NS, &new.id, false).await.expect("get");
    assert_eq!(again.attrs.len(), 3);
    assert_eq!(again.attrs.get("bin"), Some(&vec![0, 255, 10]));
    assert_eq!(again.created_at, written.created_at);
    // A touch is a write too.
    fx.store.touch(NS, &other.id, None).await.expect("touch");
    assert_eq!(fx.kind(&fx.session_key(&other.id)).await, "string");

    // And the older format's writer reads format 2 and writes its own again.
    let back = old
        .get(NS, &new.id, false)
        .await
        .expect("old reads format 2");
    assert_eq!(back.attrs, again.attrs);
    let patch = Patch {
        remove: vec!["note".into()],
        expected_version: Some(2),
        ..Patch::default()
    };
    assert_eq!(
        old.update(NS, &new.id, patch)
            .await
            .expect("update")
            .version,
        3
    );
    assert_eq!(fx.kind(&key).await, "hash");
    assert_eq!(
        fx.store.get(NS, &new.id, false).await.expect("get").attrs,
        written.attrs
    );
    drop(old);
    fx.cleanup().await;
}

#[tokio::test]
async fn a_record_flipping_between_formats_is_never_read_as_absent() {
    // During a rolling upgrade both formats are written: a plain read that tries one format,
    // then the other, may find the record rewritten in the first between its tries.
    let Some(url) =
        services::redis_url("a_record_flipping_between_formats_is_never_read_as_absent")
    else {
        return;
    };
    let fx = Fixture::new("flip", &url, 1024).await;
    let old = fx.store_writing(&url, RecordFormat::Hash);
    let packed = fx.store_writing(&url, RecordFormat::Packed);
    let new = session("erin", &[("cart", b"1")], MINUTE);
    old.create(new.clone()).await.expect("create");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flipper = {
        let (id, stop) = (new.id.clone(), stop.clone());
        tokio::spawn(async move {
            let mut flips = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                old.touch(NS, &id, None).await.expect("touch");
                packed.touch(NS, &id, None).await.expect("touch");
                flips += 2;
            }
            flips
        })
    };
    let mut absent = 0;
    for _ in 0..2000 {
        if matches!(
            fx.store.get(NS, &new.id, false).await,
            Err(StoreError::NotFound)
        ) {
            absent += 1;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let flips = flipper.await.expect("flipper");
    assert!(flips > 100, "the record flipped only {flips} times");
    assert_eq!(absent, 0, "reads of a live session answered NOT_FOUND");
    fx.cleanup().await;
}

#[tokio::test]
async fn merged_patch_over_the_limit_is_too_large_and_writes_nothing() {
    let Some(url) =
        services::redis_url("merged_patch_over_the_limit_is_too_large_and_writes_nothing")
    else {
        return;
    };
    let mut fx = Fixture::new("limit", &url, 100).await;
    // 1 + 59 = 60 bytes of 100.
    let new = session("", &[("a", &[b'x'; 59])], Duration::from_secs(60));
    fx.store.create(new.clone()).await.expect("create");
    let key = fx.session_key(&new.id);
    let before = fx.hash(&key).await;

    // Alone 50 bytes would fit; merged it is 110.
    let patch = Patch {
        set: [("b".into(), vec![b'y'; 49])].into(),
        ..Patch::default()
    };
    match fx.store.update(NS, &new.id, patch).await {
        Err(StoreError::TooLarge {
            size: 110,
            limit: 100,
        }) => {}
        other => panic!("expected TooLarge 110/100, got {other:?}"),
    }
    assert_eq!(fx.hash(&key).await, before, "nothing written");

    // Removing `a` in the same patch makes room.
    let patch = Patch {
        set: [("b".into(), vec![b'y'; 49])].into(),
        remove: vec!["a".into()],
        ..Patch::default()
    };
    let record = fx
        .store
        .update(NS, &new.id, patch)
        .await
        .expect("fits once merged");
    assert_eq!(record.version, 2);
    assert_eq!(record.attrs.keys().collect::<Vec<_>>(), vec!["b"]);

    let too_big = session("", &[("c", &[b'z'; 100])], Duration::from_secs(60));
    assert!(matches!(
        fx.store.create(too_big.clone()).await,
        Err(StoreError::TooLarge { .. })
    ));
    assert!(
        fx.hash(&fx.session_key(&too_big.id)).await.is_empty(),
        "create wrote nothing"
    );
    fx.cleanup().await;
}

#[tokio::test]
async fn thousands_of_attributes_fit_through_the_scripts() {
    // Lua's unpack() has a stack limit; the scripts write fields in chunks.
    let Some(url) = services::redis_url("thousands_of_attributes_fit_through_the_scripts") else {
        return;
    };
    // Capacity, not speed: a debug build on a loaded machine takes a while with 6000 fields.
    let mut fx = Fixture::with_timeout("many", &url, 1 << 20, Duration::from_secs(10)).await;
    let keys: Vec<String> = (0..5000).map(|i| format!("k{i}")).collect();
    let mut new = session("", &[], Duration::from_secs(60));
    new.attrs = keys.iter().map(|k| (k.clone(), b"v".to_vec())).collect();
    fx.store.create(new.clone()).await.expect("create");
    let patch = Patch {
        set: (0..5000)
            .map(|i| (format!("n{i}"), b"w".to_vec()))
            .collect(),
        remove: keys[..4000].to_vec(),
        ..Patch::default()
    };
    let record = fx.store.update(NS, &new.id, patch).await.expect("update");
    assert_eq!(record.attrs.len(), 6000);
    assert_eq!(fx.hash(&fx.session_key(&new.id)).await.len(), 6000 + 5);
    let moved = fx
        .store
        .regenerate(NS, &new.id, &new_id())
        .await
        .expect("regenerate");
    assert_eq!(moved.attrs, record.attrs);
    fx.cleanup().await;
}

#[tokio::test]
async fn stale_user_index_entries_are_skipped_and_removed() {
    let Some(url) = services::redis_url("stale_user_index_entries_are_skipped_and_removed") else {
        return;
    };
    let mut fx = Fixture::new("index", &url, 1024).await;
    let ttl = Duration::from_secs(60);
    let live = session("dave", &[], ttl);
    let expired = session("dave", &[], ttl);
    let handed_over = session("dave", &[], ttl);
    for new in [&live, &expired, &handed_over] {
        fx.store.create(new.clone()).await.expect("create");
    }
    // As if it expired, and as if an owner change crashed before fixing the old index.
    let _: () = fx.raw.del(fx.session_key(&expired.id)).await.expect("DEL");
    fx.set_user(&fx.session_key(&handed_over.id), "erin").await;
    let _: () = fx
        .raw
        .sadd(fx.user_key("dave"), "never-existed")
        .await
        .expect("SADD");

    let listed = fx.store.list_by_user(NS, "dave").await.expect("list");
    assert_eq!(
        listed.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        vec![live.id.as_str()]
    );
    assert_eq!(
        fx.members(&fx.user_key("dave")).await,
        vec![live.id.clone()],
        "cleaned"
    );

    let _: () = fx
        .raw
        .sadd(fx.user_key("dave"), &handed_over.id)
        .await
        .expect("SADD");
    assert_eq!(
        fx.store
            .delete_by_user(NS, "dave")
            .await
            .expect("delete_by_user"),
        1
    );
    let survivor = fx
        .store
        .get(NS, &handed_over.id, false)
        .await
        .expect("erin's session kept");
    assert_eq!(survivor.user_id, "erin");
    assert!(fx.members(&fx.user_key("dave")).await.is_empty());
    fx.cleanup().await;
}

#[tokio::test]
async fn owner_change_and_regenerate_move_the_index_entry() {
    let Some(url) = services::redis_url("owner_change_and_regenerate_move_the_index_entry") else {
        return;
    };
    let mut fx = Fixture::new("moves", &url, 1024).await;
    // The subscriber connects in the background: events published before it is up are lost.
    events_ready(&fx.store).await;
    let mut events = fx.store.subscribe();
    let new = session("", &[("k", b"v")], Duration::from_secs(60));
    fx.store.create(new.clone()).await.expect("create");
    let login = Patch {
        user_id: Some("frank".into()),
        ..Patch::default()
    };
    fx.store.update(NS, &new.id, login).await.expect("login");
    assert_eq!(
        fx.members(&fx.user_key("frank")).await,
        vec![new.id.clone()]
    );

    let new_id = new_id();
    let moved = fx
        .store
        .regenerate(NS, &new.id, &new_id)
        .await
        .expect("regenerate");
    assert_eq!((moved.version, moved.user_id.as_str()), (3, "frank"));
    assert_eq!(
        fx.members(&fx.user_key("frank")).await,
        vec![new_id.clone()]
    );
    assert!(
        fx.hash(&fx.session_key(&new.id)).await.is_empty(),
        "old id gone"
    );

    let ours = |e: &SessionEvent| e.namespace == NS && (e.id == new.id || e.id == new_id);
    let mut seen = Vec::new();
    for _ in 0..4 {
        let event = next_event(&mut events, WITHIN, ours).await.expect("event");
        seen.push((event.kind, event.id == new_id, event.version));
    }
    assert_eq!(
        seen,
        vec![
            (EventKind::Created, false, 1),
            (EventKind::Updated, false, 2),
            (EventKind::Created, true, 3),
            (EventKind::Deleted, false, 3),
        ]
    );

    let logout = Patch {
        user_id: Some(String::new()),
        ..Patch::default()
    };
    fx.store.update(NS, &new_id, logout).await.expect("logout");
    assert!(fx.members(&fx.user_key("frank")).await.is_empty());
    fx.cleanup().await;
}

#[tokio::test]
async fn expiry_becomes_an_expired_event_when_notifications_are_on() {
    let test = "expiry_becomes_an_expired_event_when_notifications_are_on";
    let Some(binary) = services::redis_server_binary(test) else {
        return;
    };
    let server = services::OwnRedis::start(binary);
    let mut fx = Fixture::new("expired", &server.url(), 1024).await;
    let _: () = redis::cmd("CONFIG")
        .arg(&["SET", "notify-keyspace-events", "Ex"])
        .query_async(&mut fx.raw)
        .await
        .expect("CONFIG SET");
    // The subscription must be up before anything can expire.
    events_ready(&fx.store).await;
    let mut events = fx.store.subscribe();

    let short = session("gina", &[], Duration::from_millis(50));
    fx.store.create(short.clone()).await.expect("create");
    let expired = next_event(&mut events, WITHIN, |e| {
        e.kind == EventKind::Expired && e.id == short.id
    })
    .await
    .expect("expired event");
    assert_eq!(expired.namespace, NS);
    assert_eq!((expired.user_id.as_str(), expired.version), ("", 0));
    drop(server);
}

#[tokio::test]
async fn the_epoch_key_is_shared_and_made_again_when_lost() {
    let Some(url) = services::redis_url("the_epoch_key_is_shared_and_made_again_when_lost") else {
        return;
    };
    let mut fx = Fixture::new("epoch", &url, 1024).await;
    let config = harness::redis_config(&url, "epoch", &Settings::default());
    let other = RedisStore::new(RedisConfig {
        key_prefix: fx.prefix.clone(),
        ..config
    })
    .expect("store");
    let epoch = fx.store.current_epoch().await.expect("epoch");
    assert_eq!(epoch.len(), 22);
    assert_eq!(
        other.current_epoch().await.expect("epoch"),
        epoch,
        "one per prefix"
    );
    assert_eq!(fx.store.epoch(), epoch, "remembered");
    let key = format!("{}:epoch", fx.prefix);
    let stored: String = fx.raw.get(&key).await.expect("GET");
    assert_eq!(stored, *epoch);
    assert_eq!(fx.pttl(&key).await, -1, "no expiry");

    // Lost (a flush, an eviction): the next fresh read makes a new one...
    let _: () = fx.raw.del(&key).await.expect("DEL");
    let new = fx.store.current_epoch().await.expect("epoch");
    assert_ne!(new, epoch);
    let stored: String = fx.raw.get(&key).await.expect("GET");
    assert_eq!(stored, *new);
    // ...and a store that does not ask still learns it within its refresh interval.
    let (other, new) = (&other, &new);
    eventually("the other store's cached epoch", WITHIN, || async move {
        (other.epoch() == *new).then_some(())
    })
    .await;
    fx.cleanup().await;
}

#[tokio::test]
async fn a_store_that_never_reached_redis_has_no_epoch_and_answers_nothing() {
    let refused = RefusedPort::new();
    let store = store_on(&refused.addr().to_string());
    fails_as_outage("current_epoch", TIMEOUT, store.current_epoch()).await;
    assert_eq!(&*store.epoch(), "", "never a made-up epoch");
}

fn store_on(addr: &str) -> RedisStore {
    let mut config = RedisConfig::new(format!("redis://{addr}"), 1024);
    config.timeout = TIMEOUT;
    RedisStore::new(config).expect("starts without redis")
}

#[tokio::test]
async fn dead_redis_gives_unavailable_within_the_timeout() {
    let refused = RefusedPort::new();
    let store = store_on(&refused.addr().to_string());
    fails_as_outage("get", TIMEOUT, store.get(NS, &new_id(), false)).await;
    let create = store.create(session("", &[], Duration::from_secs(5)));
    fails_as_outage("create", TIMEOUT, create).await;
    fails_as_outage("list_by_user", TIMEOUT, store.list_by_user(NS, "hank")).await;
}

#[tokio::test]
async fn silent_redis_gives_an_outage_within_the_timeout() {
    // Accepts connections (the kernel does) and never answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let store = store_on(&listener.local_addr().expect("addr").to_string());
    fails_as_outage("get", TIMEOUT, store.get(NS, &new_id(), true)).await;
    fails_as_outage("delete", TIMEOUT, store.delete(NS, &new_id())).await;
}

#[tokio::test]
async fn malformed_url_is_the_only_construction_error() {
    assert!(RedisStore::new(RedisConfig::new("not a url", 1024)).is_err());
    assert!(RedisStore::new(RedisConfig::new("redis://127.0.0.1:1/3", 1024)).is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_and_events_recover_after_redis_restarts() {
    let test = "calls_and_events_recover_after_redis_restarts";
    let Some(binary) = services::redis_server_binary(test) else {
        return;
    };
    let mut server = services::OwnRedis::start(binary);
    let fx = Fixture::new("restart", &server.url(), 1024).await;
    events_ready(&fx.store).await;
    let old_epoch = fx.store.current_epoch().await.expect("epoch");
    let mut events = fx.store.subscribe();
    let before = fx
        .store
        .create(session("ivy", &[], Duration::from_secs(60)))
        .await
        .expect("up");
    next_event(&mut events, WITHIN, |e| e.id == before.id)
        .await
        .expect("event");

    server.stop();
    let down = fx.store.get(NS, &before.id, false);
    fails_as_outage("get while down", TIMEOUT, down).await;

    server.restart(); // empty: it kept nothing, and forgot the scripts
    let store = &fx.store;
    let after = eventually_ok("create after restart", WITHIN, || {
        store.create(session("ivy", &[], Duration::from_secs(60)))
    })
    .await;
    assert_eq!(
        store.get(NS, &after.id, false).await.expect("get").version,
        1
    );
    // An empty Redis is a new epoch.
    let new_epoch = store.current_epoch().await.expect("epoch");
    assert_ne!(
        new_epoch, old_epoch,
        "a restarted empty Redis kept its epoch"
    );
    assert_eq!(store.epoch(), new_epoch);

    // The subscriber reconnects on its own backoff: write until one of its events comes back.
    let when = "of the restart";
    update_until_heard(store, &mut events, NS, &after.id, WITHIN, when).await;
}
