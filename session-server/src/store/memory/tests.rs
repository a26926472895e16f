//! Unit tests of the memory store: reaping, lazy rescheduling, tombstones.

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

fn id(i: usize) -> String {
    format!("{i:0>32}")
}

/// A store whose reaper never runs by itself: tests call `reap`.
fn manual_store() -> MemoryStore {
    MemoryStore::with_reap_interval(1024, Duration::from_secs(3600))
}

/// Entries (sessions and tombstones) and index elements over all shards.
fn held(store: &MemoryStore) -> (usize, usize) {
    store
        .inner
        .shards
        .iter()
        .fold((0, 0), |(entries, index), shard| {
            let shard = shard.read();
            (entries + shard.len(), index + shard.index_len())
        })
}

/// Kinds of the events received so far.
fn drain(events: &mut broadcast::Receiver<SessionEvent>) -> Vec<EventKind> {
    std::iter::from_fn(|| events.try_recv().ok())
        .map(|e| e.kind)
        .collect()
}

fn ttl_patch(ttl: Duration) -> Patch {
    Patch {
        ttl: Some(ttl),
        ..Patch::default()
    }
}

#[tokio::test]
async fn reaper_frees_expired_sessions_and_reports_them() {
    let store = MemoryStore::with_reap_interval(1024, Duration::from_millis(10));
    let mut events = store.subscribe();
    let ttl = Duration::from_millis(300);
    let asked = Instant::now();
    store
        .create(new_session(&"a".repeat(32), "u", ttl))
        .await
        .unwrap();
    let live = store.live_sessions();
    // Before its deadline no reaper can have freed it; after, one may have.
    if Instant::now() < asked + ttl {
        assert_eq!(live, Some(1));
    }
    assert_eq!(events.recv().await.unwrap().kind, EventKind::Created);
    // Generous, for a loaded machine: the reaper runs every 10 ms.
    let expired = tokio::time::timeout(Duration::from_secs(30), events.recv())
        .await
        .expect("EXPIRED within 30s")
        .unwrap();
    assert!(
        Instant::now() >= asked + ttl,
        "reaped before its ttl passed"
    );
    assert_eq!(expired.kind, EventKind::Expired);
    assert_eq!(expired.user_id, "u");
    assert_eq!(store.live_sessions(), Some(0));
    assert!(
        store.inner.users.ids("default", "u").is_empty(),
        "user index cleaned"
    );
    assert_eq!(held(&store), (0, 0), "entry and index element freed");
}

#[tokio::test]
async fn reaper_batches_a_mass_expiry() {
    let store = manual_store();
    let ttl = Duration::from_millis(1);
    for i in 0..(SHARDS * REAP_BATCH / 8) {
        store.create(new_session(&id(i), "", ttl)).await.unwrap();
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
    let store = manual_store();
    let id = "b".repeat(32);
    let ttl = Duration::from_millis(1);
    store.create(new_session(&id, "u", ttl)).await.unwrap();
    // Time passes at least this much: the session is expired, not yet reaped (the reaper of a
    // manual store never runs).
    tokio::time::sleep(5 * ttl).await;
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

#[tokio::test]
async fn a_session_kept_alive_by_gets_is_not_reaped_at_its_first_deadline() {
    let store = manual_store();
    let mut events = store.subscribe();
    // Long, so the touching get below comes well within it on any machine; reaps are given
    // their time, nothing waits for it.
    let ttl = Duration::from_secs(60);
    store.create(new_session(&id(1), "u", ttl)).await.unwrap();
    let created = Instant::now();
    // At least this long passes before the touch, so it moves the deadline by as much.
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Slides the deadline to at least created + ttl + 100 ms, under the read lock only.
    store.get("default", &id(1), true).await.unwrap();

    // Past the first deadline (at most created + ttl): the index element is due, the session
    // is not.
    store.inner.reap(created + ttl + Duration::from_millis(10));
    assert_eq!(store.live_sessions(), Some(1));
    assert_eq!(held(&store), (1, 1), "indexed again, once");
    assert_eq!(drain(&mut events), [EventKind::Created], "no EXPIRED");
    store.get("default", &id(1), false).await.unwrap();

    store.inner.reap(Instant::now() + 2 * ttl);
    assert_eq!(store.live_sessions(), Some(0));
    assert_eq!(drain(&mut events), [EventKind::Expired]);
    assert_eq!(held(&store), (0, 0));
}

#[tokio::test]
async fn sessions_slid_many_times_are_reaped_once_they_stop() {
    let store = manual_store();
    let mut events = store.subscribe();
    let n = 200;
    // Sliding all of them takes microseconds; the ttl leaves a loaded machine a second of
    // stall between two passes before a session would expire under the test.
    let ttl = Duration::from_millis(1200);
    for i in 0..n {
        store.create(new_session(&id(i), "u", ttl)).await.unwrap();
    }
    // Over two ttls of slides, with the reaper running between them.
    let until = Instant::now() + 2 * ttl + Duration::from_millis(200);
    while Instant::now() < until {
        for i in 0..n {
            store.get("default", &id(i), true).await.unwrap();
        }
        store.inner.reap(Instant::now());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(store.live_sessions(), Some(n as u64));
    assert_eq!(held(&store), (n, n), "one index element each, no growth");
    assert_eq!(drain(&mut events).len(), n, "only the CREATED events");

    store.inner.reap(Instant::now() + 2 * ttl);
    assert_eq!(store.live_sessions(), Some(0));
    assert_eq!(held(&store), (0, 0));
    let expired = drain(&mut events);
    assert_eq!(expired.len(), n);
    assert!(expired.iter().all(|kind| *kind == EventKind::Expired));
    assert!(store.list_by_user("default", "u").await.unwrap().is_empty());
}

#[tokio::test]
async fn a_ttl_shortened_by_update_expires_on_time() {
    let store = manual_store();
    let mut events = store.subscribe();
    store
        .create(new_session(&id(1), "u", Duration::from_secs(3600)))
        .await
        .unwrap();
    store
        .create(new_session(&id(2), "u", Duration::from_secs(3600)))
        .await
        .unwrap();
    let shortened = Instant::now();
    let updated = store
        .update("default", &id(1), ttl_patch(Duration::from_millis(10)))
        .await
        .unwrap();
    assert_eq!(updated.ttl, Duration::from_millis(10));
    let touched = store
        .touch("default", &id(2), Some(Duration::from_millis(10)))
        .await
        .unwrap();
    assert_eq!(touched.ttl, Duration::from_millis(10));

    store.inner.reap(shortened + Duration::from_secs(1));
    assert_eq!(
        store.live_sessions(),
        Some(0),
        "expired, not kept for an hour"
    );
    let kinds = drain(&mut events);
    assert_eq!(
        kinds.iter().filter(|k| **k == EventKind::Expired).count(),
        2
    );
    assert_eq!(held(&store).0, 0);
}

#[tokio::test]
async fn a_stale_index_element_does_not_expire_the_next_session_in_its_slot() {
    let store = manual_store();
    store
        .create(new_session(&id(1), "", Duration::from_secs(3600)))
        .await
        .unwrap();
    // Leaves a stale element at +1 h, then frees the slot.
    store
        .update("default", &id(1), ttl_patch(Duration::from_millis(1)))
        .await
        .unwrap();
    let start = Instant::now();
    store.inner.reap(start + Duration::from_secs(1));
    assert_eq!(store.live_sessions(), Some(0));
    // The same key lands in the same shard, and reuses the freed slot.
    store
        .create(new_session(&id(1), "", Duration::from_secs(7200)))
        .await
        .unwrap();
    assert_eq!(
        held(&store),
        (1, 2),
        "the session, its element, the stale one"
    );
    store.inner.reap(start + Duration::from_secs(5400));
    assert_eq!(store.live_sessions(), Some(1), "stale element skipped");
    assert_eq!(held(&store), (1, 1));
    store.get("default", &id(1), false).await.unwrap();
    store.inner.reap(start + Duration::from_secs(9000));
    assert_eq!(store.live_sessions(), Some(0));
    assert_eq!(held(&store), (0, 0));
}

#[tokio::test]
async fn a_deleted_session_stays_unrestorable_for_one_ttl_then_vanishes_silently() {
    let store = manual_store();
    let created = store
        .create(new_session(&id(1), "u", Duration::from_secs(60)))
        .await
        .unwrap();
    let mut events = store.subscribe();
    assert!(store.delete("default", &id(1)).await.unwrap());
    assert!(matches!(
        store.restore(created.clone()).await,
        Err(StoreError::Deleted)
    ));
    assert!(matches!(
        store
            .create(new_session(&id(1), "u", Duration::from_secs(60)))
            .await,
        Err(StoreError::IdTaken)
    ));
    store.inner.reap(Instant::now() + Duration::from_secs(120));
    assert_eq!(drain(&mut events), [EventKind::Deleted], "no EXPIRED");
    assert_eq!(held(&store), (0, 0), "tombstone gone");
    let snapshot = SessionRecord {
        version: 9,
        ..created.clone()
    };
    let restored = store.restore(snapshot).await.unwrap();
    assert_eq!(restored.version, 1, "recreated at version 1");
    assert_eq!(restored.attrs, created.attrs);
    assert_eq!(restored.created_at, created.created_at);
    assert_eq!(store.live_sessions(), Some(1));
    assert_eq!(drain(&mut events), [EventKind::Created]);
}

#[tokio::test]
async fn restore_conflicts_with_a_live_session_and_replaces_an_expired_one() {
    let store = manual_store();
    let created = store
        .create(new_session(&id(1), "u", Duration::from_secs(60)))
        .await
        .unwrap();
    store
        .update("default", &id(1), ttl_patch(Duration::from_secs(60)))
        .await
        .unwrap();
    let mut events = store.subscribe();
    assert!(matches!(
        store.restore(created.clone()).await,
        Err(StoreError::Conflict { actual: 2, .. })
    ));
    assert_eq!(
        store.get("default", &id(1), false).await.unwrap().version,
        2
    );
    // Expired, not reaped yet: absent, so the snapshot recreates it (and it is reaped once,
    // as the session it replaced).
    store
        .update("default", &id(1), ttl_patch(Duration::from_millis(1)))
        .await
        .unwrap();
    while store.get("default", &id(1), false).await.is_ok() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let restored = store.restore(created.clone()).await.unwrap();
    assert_eq!((restored.version, restored.attrs), (1, created.attrs));
    assert_eq!(store.live_sessions(), Some(1));
    assert_eq!(
        store.list_by_user("default", "u").await.unwrap().len(),
        1,
        "indexed once"
    );
    assert_eq!(
        drain(&mut events),
        [EventKind::Updated, EventKind::Expired, EventKind::Created]
    );
    store.inner.reap(Instant::now() + Duration::from_secs(1));
    assert_eq!(
        store.live_sessions(),
        Some(1),
        "the recreated session stays"
    );
}

#[tokio::test]
async fn every_store_has_its_own_epoch_for_life() {
    let (a, b) = (manual_store(), manual_store());
    assert_eq!(a.epoch().len(), crate::id::EPOCH_LEN);
    assert_ne!(a.epoch(), b.epoch(), "a restarted store has a new epoch");
    assert_eq!(a.current_epoch().await.unwrap(), a.epoch());
}

#[tokio::test]
async fn updates_merge_attributes_and_keep_the_size_limit() {
    let store = MemoryStore::with_reap_interval(10, Duration::from_secs(3600));
    store
        .create(new_session(&id(1), "u", Duration::from_secs(60)))
        .await
        .unwrap();
    let patch = Patch {
        set: HashMap::from([
            ("a".to_owned(), b"1".to_vec()),
            ("k".to_owned(), b"2".to_vec()),
        ]),
        remove: vec!["k".to_owned(), "gone".to_owned()],
        user_id: Some("w".to_owned()),
        ..Patch::default()
    };
    let updated = store.update("default", &id(1), patch).await.unwrap();
    let expected = HashMap::from([
        ("a".to_owned(), b"1".to_vec()),
        ("k".to_owned(), b"2".to_vec()),
    ]);
    assert_eq!(updated.attrs, expected);
    assert_eq!((updated.version, updated.user_id.as_str()), (2, "w"));
    let read = store.get("default", &id(1), false).await.unwrap();
    assert_eq!(
        SessionRecord {
            expires_at: updated.expires_at,
            ..read
        },
        updated,
        "stored as returned"
    );
    assert_eq!(store.list_by_user("default", "w").await.unwrap().len(), 1);
    assert!(store.list_by_user("default", "u").await.unwrap().is_empty());

    let too_big = Patch {
        set: HashMap::from([("b".to_owned(), b"1234567".to_vec())]),
        ..Patch::default()
    };
    assert!(matches!(
        store.update("default", &id(1), too_big).await,
        Err(StoreError::TooLarge {
            size: 12,
            limit: 10
        })
    ));
    let shrink = Patch {
        set: HashMap::from([("b".to_owned(), b"1234567".to_vec())]),
        remove: vec!["a".to_owned(), "k".to_owned()],
        ..Patch::default()
    };
    let shrunk = store.update("default", &id(1), shrink).await.unwrap();
    assert_eq!(shrunk.attrs.len(), 1);
}

#[tokio::test]
async fn regenerate_moves_the_session_and_buries_the_old_id() {
    let store = manual_store();
    let old = store
        .create(new_session(&id(1), "u", Duration::from_secs(60)))
        .await
        .unwrap();
    for i in 2..40 {
        // Across shards and within one.
        let new = store
            .regenerate("default", &id(i - 1), &id(i))
            .await
            .unwrap();
        assert_eq!(
            (new.attrs.clone(), new.created_at),
            (old.attrs.clone(), old.created_at)
        );
        assert_eq!(new.version, i as u64);
        assert!(matches!(
            store.get("default", &id(i - 1), false).await,
            Err(StoreError::NotFound)
        ));
    }
    assert_eq!(store.live_sessions(), Some(1));
    let listed = store.list_by_user("default", "u").await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, id(39));
    assert_eq!(held(&store).0, 39, "38 tombstones and the session");
}

#[test]
fn an_entry_takes_48_bytes_in_its_slab() {
    assert_eq!(std::mem::size_of::<Option<Entry>>(), 48);
}

#[test]
fn a_slid_entry_is_indexed_again_at_its_real_deadline() {
    let hasher = DefaultHashBuilder::default();
    let mut shard = Shard::new(hasher.clone());
    let head = Head {
        namespace: "default",
        id: "x",
        user_id: "",
        created_at: SystemTime::now(),
        deleted: false,
    };
    let hash = key_hash(&hasher, b"default", b"x");
    let packed = Packed::new(&head, std::iter::empty());
    shard.insert(hash, Entry::new(packed, 1, 100, 100)).unwrap();
    let entry = shard.get(hash, "default", "x").unwrap();
    assert_eq!(entry.slide(50), 150);
    assert_eq!(entry.slide(40), 150, "a late slide never moves it back");

    assert!(matches!(shard.reap_next(99), Reaped::NotDue));
    assert!(matches!(shard.reap_next(120), Reaped::Kept));
    assert!(matches!(shard.reap_next(120), Reaped::NotDue));
    assert_eq!(shard.index_len(), 1);
    assert!(matches!(shard.reap_next(150), Reaped::Gone(_)));
    assert_eq!((shard.len(), shard.index_len()), (0, 0));
    assert!(shard.find(hash, "default", "x").is_none());
}
