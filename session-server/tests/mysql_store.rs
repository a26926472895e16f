//! The MySQL store beyond the conformance suite: schema migration, the epoch row, expiry before
//! and by the reaper, tombstones, rows it cannot decode, writers in two servers on one table,
//! and (in
//! `mysql_store/outage.rs`) a database that cannot be reached, goes away and comes back.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use session_server::config::Settings;
use session_server::store::mysql::{
    EPOCHS_TABLE, MIGRATIONS_TABLE, MysqlConfig, MysqlStore, REAP_BATCHES_PER_TICK, SCHEMA_VERSION,
};
use session_server::store::{
    EventKind, NewSession, Patch, SessionEvent, SessionRecord, SessionStore, StoreError,
};
use sqlx::mysql::MySqlConnection;
use sqlx::{AssertSqlSafe, Connection as _};
use support::ids::new_id;
use support::mysql::{self as mysql, DropTables};
use support::wait::eventually;
use tokio::sync::broadcast;

const NS: &str = "mysqltest";

/// How long a store that is back may take to answer again: generous, for a loaded machine.
const RECOVERY_WITHIN: Duration = Duration::from_secs(30);

/// A store on a table of the test's own, with `edit` applied to the test settings; the guard
/// drops the table.
async fn fixture(
    test: &str,
    edit: impl FnOnce(&mut MysqlConfig),
) -> Option<(MysqlStore, DropTables, String)> {
    let url = mysql::mysql_url(test).await?;
    let table = mysql::unique_table(test);
    let guard = DropTables::new(&url, &table);
    let mut config = mysql::test_config(&url, &table, &Settings::default());
    edit(&mut config);
    let store = MysqlStore::connect(config).await.expect("connect");
    Some((store, guard, table))
}

fn session(user: &str, ttl: Duration) -> NewSession {
    NewSession {
        id: new_id(),
        namespace: NS.to_owned(),
        user_id: user.to_owned(),
        attrs: HashMap::from([("k".to_owned(), b"v".to_vec())]),
        ttl,
    }
}

fn set(key: &str, value: &str) -> Patch {
    Patch {
        set: HashMap::from([(key.to_owned(), value.as_bytes().to_vec())]),
        ..Patch::default()
    }
}

fn now_ms() -> i64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    i64::try_from(since.as_millis()).unwrap()
}

/// A row written by hand: `(namespace, id, user_id, attrs as hex, expires_ms)`.
fn row_values(id: &str, user: &str, attrs_hex: &str, expires_ms: i64) -> String {
    format!("('{NS}', '{id}', '{user}', X'{attrs_hex}', 1, 0, {expires_ms}, 60000)")
}

fn insert_rows(table: &str, rows: &[String]) -> String {
    format!(
        "INSERT INTO `{table}` (namespace, id, user_id, attrs, version, created_ns, expires_ms, \
         ttl_ms) VALUES {}",
        rows.join(", ")
    )
}

/// How many rows `table` holds, expired or not.
async fn count_rows(url: &str, table: &str) -> i64 {
    let mut conn = MySqlConnection::connect(url).await.expect("connect");
    sqlx::query_scalar(AssertSqlSafe(format!("SELECT COUNT(*) FROM `{table}`")))
        .fetch_one(&mut conn)
        .await
        .expect("count")
}

/// Sleeps until the wall clock is past `at` (by a few milliseconds, past any rounding).
async fn sleep_past(at: SystemTime) {
    let past = at + Duration::from_millis(5);
    while let Ok(left) = past.duration_since(SystemTime::now()) {
        tokio::time::sleep(left).await;
    }
}

/// Every event already sent, without waiting for more.
fn drain(events: &mut broadcast::Receiver<SessionEvent>) -> Vec<SessionEvent> {
    let mut seen = Vec::new();
    while let Ok(event) = events.try_recv() {
        seen.push(event);
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_is_idempotent_and_recorded() {
    let test = "migration_is_idempotent";
    let Some((first, mut guard, table)) = fixture(test, |_| {}).await else {
        return;
    };
    let url = mysql::MYSQL_URL;
    let kept = first
        .create(session("mia", Duration::from_secs(60)))
        .await
        .unwrap();
    // Connecting again to a migrated table changes nothing and loses nothing.
    let config = mysql::test_config(url, &table, &Settings::default());
    let second = MysqlStore::connect(config).await.expect("second connect");
    assert_eq!(second.get(NS, &kept.id, false).await.unwrap(), kept);

    // Two servers starting at once on a new table: one creates it, both come up.
    let fresh = mysql::unique_table(test);
    guard.also(&fresh);
    let config = mysql::test_config(url, &fresh, &Settings::default());
    let (a, b) = tokio::join!(
        MysqlStore::connect(config.clone()),
        MysqlStore::connect(config)
    );
    let (a, b) = (a.expect("first of two"), b.expect("second of two"));
    let made = a
        .create(session("", Duration::from_secs(60)))
        .await
        .unwrap();
    assert_eq!(b.get(NS, &made.id, false).await.unwrap().id, made.id);

    let mut conn = MySqlConnection::connect(url).await.expect("connect");
    for name in [&table, &fresh] {
        let versions: Vec<u32> = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT version FROM `{MIGRATIONS_TABLE}` WHERE table_name = ? ORDER BY version"
        )))
        .bind(name.as_str())
        .fetch_all(&mut conn)
        .await
        .expect("read the migration record");
        assert_eq!(versions, (1..=SCHEMA_VERSION).collect::<Vec<_>>(), "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_epoch_row_is_shared_and_made_again_when_deleted() {
    let Some((store, _guard, table)) = fixture("epoch_row", |_| {}).await else {
        return;
    };
    let url = mysql::MYSQL_URL;
    let epoch = store.epoch();
    assert_eq!(epoch.len(), 22, "read at start-up");
    let config = mysql::test_config(url, &table, &Settings::default());
    let second = MysqlStore::connect(config).await.expect("second connect");
    assert_eq!(second.epoch(), epoch, "one epoch per table");
    let mut conn = MySqlConnection::connect(url).await.expect("connect");
    let select = format!("SELECT epoch FROM `{EPOCHS_TABLE}` WHERE table_name = ?");
    let stored: String = sqlx::query_scalar(AssertSqlSafe(select.clone()))
        .bind(&table)
        .fetch_one(&mut conn)
        .await
        .expect("the epoch row");
    assert_eq!(stored, *epoch);

    // The row is gone (the database recreated, or deleted by hand): a fresh read makes a new
    // one, and the other server learns it within its refresh interval.
    mysql::execute(url, &[mysql::forget_epoch(&table)]).await;
    let new = store.current_epoch().await.expect("epoch");
    assert_ne!(new, epoch);
    let stored: String = sqlx::query_scalar(AssertSqlSafe(select))
        .bind(&table)
        .fetch_one(&mut conn)
        .await
        .expect("the epoch row");
    assert_eq!(stored, *new);
    let (second, new) = (&second, &new);
    eventually(
        "the other store's cached epoch",
        RECOVERY_WITHIN,
        || async move { (second.epoch() == *new).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn invalid_table_names_and_urls_are_refused() {
    for table in [
        "",
        "a-b",
        "x`y",
        &"t".repeat(65),
        MIGRATIONS_TABLE,
        EPOCHS_TABLE,
    ] {
        let config = mysql::test_config(mysql::MYSQL_URL, table, &Settings::default());
        let refused = MysqlStore::connect(config).await;
        assert!(
            matches!(refused, Err(StoreError::Internal(_))),
            "table {table:?}: {refused:?}"
        );
    }
    // Built by hand, past `MysqlConfig::from_settings`' own check of the URL.
    for url in [
        "postgres://root@127.0.0.1/test",
        "mysql://root@127.0.0.1:notaport/test",
        // sqlx would ignore a parameter it does not know: a misspelt ssl-mode is refused.
        "mysql://root@127.0.0.1/test?ssl_mode=required",
        "mysql://root@127.0.0.1/test?ssl-mode=required&ssl-ca=/etc/ca.pem",
    ] {
        let refused = MysqlStore::connect(MysqlConfig::new(url, 1024)).await;
        assert!(
            matches!(refused, Err(StoreError::Internal(_))),
            "{url}: {refused:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_row_is_never_returned_before_the_reaper_runs() {
    let test = "expired_row_before_reaper";
    let Some((store, _guard, table)) =
        fixture(test, |c| c.reap_interval = Duration::from_secs(3600)).await
    else {
        return;
    };
    let short = session("nora", Duration::from_millis(50));
    let id = short.id.clone();
    let created = store.create(short.clone()).await.unwrap();
    sleep_past(created.expires_at).await;

    let not_found = |r: Result<_, StoreError>| matches!(r, Err(StoreError::NotFound));
    assert!(not_found(store.get(NS, &id, false).await.map(drop)));
    assert!(not_found(store.get(NS, &id, true).await.map(drop)));
    assert!(not_found(store.touch(NS, &id, None).await.map(drop)));
    assert!(not_found(
        store.update(NS, &id, set("a", "1")).await.map(drop)
    ));
    assert!(not_found(
        store.regenerate(NS, &id, &new_id()).await.map(drop)
    ));
    assert!(!store.delete(NS, &id).await.unwrap());
    assert!(store.list_by_user(NS, "nora").await.unwrap().is_empty());
    assert_eq!(store.delete_by_user(NS, "nora").await.unwrap(), 0);
    assert_eq!(
        count_rows(mysql::MYSQL_URL, &table).await,
        1,
        "the row is still there"
    );

    // The expired row does not block its id either.
    let mut again = short;
    again.user_id = "olga".into();
    again.ttl = Duration::from_secs(60);
    assert_eq!(store.create(again).await.unwrap().version, 1);
    assert_eq!(store.get(NS, &id, false).await.unwrap().user_id, "olga");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reaper_deletes_in_bounded_batches_and_reports_each_expiry() {
    let test = "reaper_bounded_batches";
    let Some((store, _guard, table)) = fixture(test, |c| {
        c.reap_interval = Duration::from_secs(3600);
        c.reap_batch = 100;
    })
    .await
    else {
        return;
    };
    let url = mysql::MYSQL_URL;
    let past = now_ms() - 1000;
    let mut statements = Vec::new();
    for chunk in 0..6 {
        let rows: Vec<String> = (0..500)
            .map(|i| row_values(&format!("{:0>32}", chunk * 500 + i), "pat", "01", past))
            .collect();
        statements.push(insert_rows(&table, &rows));
    }
    mysql::execute(url, &statements).await;
    let live = store
        .create(session("pat", Duration::from_secs(60)))
        .await
        .unwrap();
    let mut events = store.subscribe();

    let bound = u64::from(REAP_BATCHES_PER_TICK) * 100;
    let started = Instant::now();
    assert_eq!(
        store.reap_now().await.unwrap(),
        bound,
        "one turn stops at its bound"
    );
    let turn = started.elapsed();
    assert_eq!(count_rows(url, &table).await, 3001 - bound as i64);
    let mut total = bound;
    loop {
        let reaped = store.reap_now().await.unwrap();
        assert!(reaped <= bound);
        total += reaped;
        if reaped == 0 {
            break;
        }
    }
    assert_eq!(total, 3000);
    assert_eq!(
        count_rows(url, &table).await,
        1,
        "only the live session is left"
    );
    assert!(store.get(NS, &live.id, false).await.is_ok());

    let seen = drain(&mut events);
    assert_eq!(seen.len(), 3000, "one EXPIRED per reaped row");
    assert!(seen.iter().all(|e| e.kind == EventKind::Expired
        && e.namespace == NS
        && e.user_id == "pat"
        && e.version == 0));
    eprintln!("one reaper turn of {bound} rows took {turn:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_reaper_sends_expired_with_the_owner() {
    let Some((store, _guard, table)) = fixture("background_reaper", |_| {}).await else {
        return;
    };
    let mut events = store.subscribe();
    let short = store
        .create(session("quinn", Duration::from_millis(100)))
        .await
        .unwrap();
    let expired = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match events.recv().await {
                Ok(e) if e.kind == EventKind::Expired => return e,
                Ok(_) => {}
                Err(e) => panic!("events: {e}"),
            }
        }
    })
    .await
    .expect("EXPIRED within 30s");
    assert_eq!(
        (expired.id.as_str(), expired.user_id.as_str()),
        (short.id.as_str(), "quinn")
    );
    assert_eq!(count_rows(mysql::MYSQL_URL, &table).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_sessions_leave_a_tombstone_for_one_ttl_reaped_silently() {
    let Some((store, _guard, table)) = fixture("tombstones", |c| {
        c.reap_interval = Duration::from_secs(3600)
    })
    .await
    else {
        return;
    };
    // The tombstones live one ttl: long enough for the checks right after the deletes to run
    // inside it however loaded the machine; the end of it is waited for, not slept past.
    let ttl = Duration::from_secs(8);
    let (a, b) = (session("wes", ttl), session("wes", ttl));
    let a = store.create(a).await.unwrap();
    store.create(b.clone()).await.unwrap();
    let mut events = store.subscribe();
    assert!(store.delete(NS, &a.id).await.unwrap());
    let b_deleted = SystemTime::now();
    assert_eq!(store.delete_by_user(NS, "wes").await.unwrap(), 1);
    assert!(matches!(
        store.create(b.clone()).await,
        Err(StoreError::IdTaken)
    ));
    assert!(matches!(
        store.restore(a.clone()).await,
        Err(StoreError::Deleted)
    ));
    assert!(store.list_by_user(NS, "wes").await.unwrap().is_empty());
    assert!(matches!(
        store.get(NS, &a.id, false).await,
        Err(StoreError::NotFound)
    ));
    assert!(
        !store.delete(NS, &a.id).await.unwrap(),
        "a tombstone is not deleted again"
    );
    assert_eq!(
        count_rows(mysql::MYSQL_URL, &table).await,
        2,
        "two tombstones"
    );

    // A tombstone holds the id for its whole ttl, and no longer, reaped or not.
    let free_by = b_deleted + ttl + RECOVERY_WITHIN;
    loop {
        match store.create(b.clone()).await {
            Ok(record) => {
                assert_eq!(record.version, 1);
                // 100 ms for the store's millisecond rounding.
                assert!(
                    SystemTime::now() + Duration::from_millis(100) >= b_deleted + ttl,
                    "the id was free again before one ttl passed"
                );
                break;
            }
            Err(StoreError::IdTaken) => assert!(
                SystemTime::now() < free_by,
                "the id was still taken {RECOVERY_WITHIN:?} after its tombstone's ttl"
            ),
            Err(e) => panic!("create over a tombstone: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // ...and the reaper removes the other one without an event.
    assert_eq!(store.reap_now().await.unwrap(), 1);
    assert_eq!(count_rows(mysql::MYSQL_URL, &table).await, 1);
    let kinds: Vec<EventKind> = drain(&mut events).iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        vec![EventKind::Deleted, EventKind::Deleted, EventKind::Created],
        "no EXPIRED for tombstones"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_attributes_are_not_found_not_internal() {
    let Some((store, _guard, table)) = fixture("undecodable_row", |_| {}).await else {
        return;
    };
    let later = now_ms() + 60_000;
    let (garbage, other_format) = (new_id(), new_id());
    mysql::execute(
        mysql::MYSQL_URL,
        &[insert_rows(
            &table,
            &[
                row_values(&garbage, "rita", "99ffff", later),
                row_values(&other_format, "rita", "0200000000", later),
            ],
        )],
    )
    .await;
    let good = store
        .create(session("rita", Duration::from_secs(60)))
        .await
        .unwrap();
    for id in [&garbage, &other_format] {
        let not_found = |r: Result<_, StoreError>| matches!(r, Err(StoreError::NotFound));
        assert!(not_found(store.get(NS, id, false).await.map(drop)), "{id}");
        assert!(not_found(store.get(NS, id, true).await.map(drop)));
        assert!(not_found(
            store.update(NS, id, set("a", "1")).await.map(drop)
        ));
        assert!(not_found(
            store.regenerate(NS, id, &new_id()).await.map(drop)
        ));
    }
    // Nor does a Restore overwrite them: a row is there, so the store wins.
    let snapshot = SessionRecord {
        id: other_format.clone(),
        ..good.clone()
    };
    assert!(matches!(
        store.restore(snapshot).await,
        Err(StoreError::Conflict { .. })
    ));
    let listed = store.list_by_user(NS, "rita").await.unwrap();
    assert_eq!(
        listed,
        vec![good],
        "unreadable rows are skipped, not an error"
    );
    // A logout still removes them (say, rows of a newer version during a rolling upgrade).
    assert!(store.delete(NS, &garbage).await.unwrap());
    assert_eq!(store.delete_by_user(NS, "rita").await.unwrap(), 2);
    assert!(store.list_by_user(NS, "rita").await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_and_users_are_case_sensitive() {
    let Some((store, _guard, _table)) = fixture("case_sensitive", |_| {}).await else {
        return;
    };
    let mut lower = session("sam", Duration::from_secs(60));
    lower.id = "a".repeat(32);
    let mut upper = session("Sam", Duration::from_secs(60));
    upper.id = "A".repeat(32);
    store.create(lower).await.unwrap();
    store
        .create(upper)
        .await
        .expect("'A…' is another id than 'a…'");
    let users = |s: Vec<session_server::store::SessionRecord>| {
        s.into_iter().map(|r| r.id).collect::<Vec<_>>()
    };
    assert_eq!(
        users(store.list_by_user(NS, "sam").await.unwrap()),
        vec!["a".repeat(32)]
    );
    assert_eq!(
        users(store.list_by_user(NS, "Sam").await.unwrap()),
        vec!["A".repeat(32)]
    );
}

/// Two servers on one table: the database's row locks (not this process's) keep concurrent
/// patches and compare-and-set increments of one session whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_in_two_servers_on_one_table_lose_nothing() {
    let Some((a, _guard, table)) = fixture("two_servers_one_table", |_| {}).await else {
        return;
    };
    let b = MysqlStore::connect(mysql::test_config(
        mysql::MYSQL_URL,
        &table,
        &Settings::default(),
    ))
    .await
    .expect("second server");
    let (a, b): (Arc<dyn SessionStore>, Arc<dyn SessionStore>) = (Arc::new(a), Arc::new(b));
    let s = a
        .create(session("", Duration::from_secs(60)))
        .await
        .unwrap();

    let mut writers = Vec::new();
    for (side, store) in [("left", a.clone()), ("right", b.clone())] {
        let id = s.id.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..50 {
                store
                    .update(NS, &id, set(&format!("{side}-{i}"), side))
                    .await
                    .unwrap();
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    let merged = b.get(NS, &s.id, false).await.unwrap();
    assert_eq!((merged.attrs.len(), merged.version), (101, 101));

    let mut counters = Vec::new();
    for store in [a.clone(), b.clone()] {
        let id = s.id.clone();
        counters.push(tokio::spawn(async move {
            for _ in 0..100 {
                loop {
                    let cur = store.get(NS, &id, false).await.unwrap();
                    let n: u64 = cur
                        .attrs
                        .get("n")
                        .map_or(0, |v| String::from_utf8_lossy(v).parse().unwrap());
                    let mut patch = set("n", &(n + 1).to_string());
                    patch.expected_version = Some(cur.version);
                    match store.update(NS, &id, patch).await {
                        Ok(_) => break,
                        Err(StoreError::Conflict { .. }) => {}
                        Err(e) => panic!("{e}"),
                    }
                }
            }
        }));
    }
    for c in counters {
        c.await.unwrap();
    }
    let end = a.get(NS, &s.id, false).await.unwrap();
    assert_eq!(
        (end.attrs["n"].as_slice(), end.version),
        (b"200".as_slice(), 301)
    );
}

#[path = "mysql_store/outage.rs"]
mod outage;
