//! Behaviour only a Redis Cluster shows: the keys of a session in one slot and sessions spread
//! over the masters, the user index across slots, scripts on nodes that never saw them, expiry
//! events from every master, a cluster that is down, and a master dying under load. What every
//! store must do is in the conformance suite (`redis_cluster::…` there).

mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use session_server::config::{Settings, StoreKind};
use session_server::store::redis::{RedisConfig, RedisStore};
use session_server::store::{
    EventKind, NewSession, Patch, SessionRecord, SessionStore, StoreError,
};
use support::cluster::RedisCluster;
use support::ids::new_id;
use support::outage::fails_as_outage;
use support::ports::RefusedPort;
use support::redis_record;
use support::wait::{events_ready, eventually_ok, next_event, update_until_heard};

const NS: &str = "shop";

/// How long a cluster that is back may take to serve again, or its events to come back:
/// generous, for a loaded machine.
const RECOVERY_WITHIN: Duration = Duration::from_secs(30);

fn session_key(prefix: &str, namespace: &str, id: &str) -> String {
    format!("{prefix}:{namespace}:s:{{{id}}}")
}

fn session(user: &str, ttl: Duration) -> NewSession {
    NewSession {
        id: new_id(),
        namespace: NS.to_string(),
        user_id: user.to_string(),
        attrs: [("cart".to_string(), b"2 pears".to_vec())].into(),
        ttl,
    }
}

/// A cluster store with a known prefix, and that prefix.
fn store_on(cluster: &RedisCluster, test: &str, timeout: Duration) -> (RedisStore, String) {
    let settings = Settings {
        store_timeout: timeout,
        ..Settings::default()
    };
    let config = cluster.config(test, &settings);
    let prefix = config.key_prefix.clone();
    (RedisStore::new(config).expect("store"), prefix)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_of_a_session_share_a_slot_and_sessions_spread_over_masters() {
    let test = "keys_of_a_session_share_a_slot_and_sessions_spread_over_masters";
    let Some(cluster) = RedisCluster::start(test, 3, 0).await else {
        return;
    };
    let (store, prefix) = store_on(&cluster, test, Duration::from_secs(2));
    let mut masters = HashSet::new();
    for i in 0..24 {
        let new = session(&format!("user{}", i % 3), Duration::from_secs(60));
        store.create(new.clone()).await.expect("create");
        let key = session_key(&prefix, NS, &new.id);
        let slot = cluster.slot(&key).await;
        assert_eq!(
            slot,
            cluster.slot(&format!("{{{}}}", new.id)).await,
            "hash tag"
        );
        let tombstone = format!("{prefix}:{NS}:t:{{{}}}", new.id);
        assert_eq!(cluster.slot(&tombstone).await, slot, "tombstone beside it");
        let index = format!("{prefix}:{NS}:u:{{{}}}", new.user_id);
        let user_slot = cluster.slot(&format!("{{{}}}", new.user_id)).await;
        assert_eq!(
            cluster.slot(&index).await,
            user_slot,
            "index in the user's slot"
        );

        // The script ran on the master of the slot: the hash is there.
        let master = cluster.master_of_slot(slot).await;
        let mut node = cluster.node(master).await;
        let fields = redis_record::fields(&mut node, &key).await;
        assert_eq!(fields.get("user"), Some(&new.user_id.as_bytes().to_vec()));
        masters.insert(master);

        if i == 0 {
            // A delete leaves its tombstone, for one ttl, on the same node.
            assert!(store.delete(NS, &new.id).await.expect("delete"));
            let exists: bool = node.exists(&tombstone).await.expect("EXISTS");
            assert!(exists, "tombstone on the session's node");
            let pttl: i64 = node.pttl(&tombstone).await.expect("PTTL");
            assert!((55_000..=60_000).contains(&pttl), "tombstone PTTL {pttl}");
        }
    }
    assert_eq!(masters.len(), 3, "24 sessions spread over all 3 masters");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_and_delete_by_user_reach_sessions_on_every_master() {
    let test = "list_and_delete_by_user_reach_sessions_on_every_master";
    let Some(cluster) = RedisCluster::start(test, 3, 0).await else {
        return;
    };
    let (store, prefix) = store_on(&cluster, test, Duration::from_secs(2));
    let ttl = Duration::from_secs(60);
    let mut ann = Vec::new();
    let mut masters = HashSet::new();
    for _ in 0..12 {
        let new = session("ann", ttl);
        store.create(new.clone()).await.expect("create");
        let slot = cluster.slot(&session_key(&prefix, NS, &new.id)).await;
        masters.insert(cluster.master_of_slot(slot).await);
        ann.push(new.id);
    }
    assert!(
        masters.len() >= 2,
        "ann's sessions span masters: {masters:?}"
    );
    let bob = session("bob", ttl);
    store.create(bob.clone()).await.expect("create");

    let ids = |records: Vec<SessionRecord>| {
        let mut ids: Vec<String> = records.into_iter().map(|r| r.id).collect();
        ids.sort();
        ids
    };
    ann.sort();
    assert_eq!(ids(store.list_by_user(NS, "ann").await.expect("list")), ann);

    // One of ann's sessions changes hands: both indexes follow, across slots.
    let handed = ann.pop().expect("twelve");
    let to_bob = Patch {
        user_id: Some("bob".into()),
        ..Patch::default()
    };
    store.update(NS, &handed, to_bob).await.expect("update");
    assert_eq!(ids(store.list_by_user(NS, "ann").await.expect("list")), ann);
    let mut bobs = vec![bob.id.clone(), handed.clone()];
    bobs.sort();
    assert_eq!(
        ids(store.list_by_user(NS, "bob").await.expect("list")),
        bobs
    );

    assert_eq!(store.delete_by_user(NS, "ann").await.expect("delete"), 11);
    assert!(
        store
            .list_by_user(NS, "ann")
            .await
            .expect("list")
            .is_empty()
    );
    for id in &ann {
        assert!(matches!(
            store.get(NS, id, false).await,
            Err(StoreError::NotFound)
        ));
    }
    assert_eq!(store.list_by_user(NS, "bob").await.expect("list").len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_run_on_nodes_that_lost_them() {
    // As on a replica promoted by a failover, which never saw its old master's scripts.
    let test = "scripts_run_on_nodes_that_lost_them";
    let Some(cluster) = RedisCluster::start(test, 3, 0).await else {
        return;
    };
    let (store, _) = store_on(&cluster, test, Duration::from_secs(2));
    let first = store
        .create(session("cy", Duration::from_secs(60)))
        .await
        .expect("create");
    for (port, _) in cluster.masters().await {
        let mut node = cluster.node(port).await;
        let _: () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut node)
            .await
            .expect("SCRIPT FLUSH");
    }
    let read = store.get(NS, &first.id, true).await.expect("get");
    assert_eq!(read.attrs, first.attrs);
    let patch = Patch {
        set: [("k".into(), b"v".to_vec())].into(),
        expected_version: Some(1),
        ..Patch::default()
    };
    assert_eq!(
        store
            .update(NS, &first.id, patch)
            .await
            .expect("update")
            .version,
        2
    );
    store
        .create(session("cy", Duration::from_secs(60)))
        .await
        .expect("create");
    assert_eq!(store.list_by_user(NS, "cy").await.expect("list").len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_events_come_from_every_master() {
    let test = "expiry_events_come_from_every_master";
    let Some(cluster) = RedisCluster::start(test, 3, 0).await else {
        return;
    };
    let (store, prefix) = store_on(&cluster, test, Duration::from_secs(2));
    let mut events = store.subscribe();
    events_ready(&store).await;
    let masters: HashSet<u16> = cluster
        .masters()
        .await
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    let mut heard = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    // Short sessions until one on each master has expired and been heard. The expiry
    // subscriptions come up shortly after the events one, so early expiries may go unheard.
    while heard != masters {
        assert!(
            Instant::now() < deadline,
            "expiries heard only from {heard:?} of {masters:?}"
        );
        let new = session("", Duration::from_millis(100));
        store.create(new.clone()).await.expect("create");
        let slot = cluster.slot(&session_key(&prefix, NS, &new.id)).await;
        let master = cluster.master_of_slot(slot).await;
        if heard.contains(&master) {
            continue;
        }
        let expired = next_event(&mut events, Duration::from_secs(2), |e| {
            e.kind == EventKind::Expired && e.id == new.id
        })
        .await;
        if let Some(event) = expired {
            assert_eq!((event.namespace.as_str(), event.version), (NS, 0));
            heard.insert(master);
        }
    }
}

#[tokio::test]
async fn dead_cluster_gives_unavailable_within_the_timeout() {
    let refused = [RefusedPort::new(), RefusedPort::new()];
    let url = format!("redis://{},{}", refused[0].addr(), refused[1].addr());
    let timeout = Duration::from_millis(500);
    let settings = Settings {
        store: StoreKind::RedisCluster,
        redis_url: url,
        store_timeout: timeout,
        ..Settings::default()
    };
    let config = RedisConfig::from_settings(&settings).expect("cluster store settings");
    let store = RedisStore::new(config).expect("starts without a cluster");
    fails_as_outage("get", timeout, store.get(NS, &new_id(), false)).await;
    let create = store.create(session("", Duration::from_secs(5)));
    fails_as_outage("create", timeout, create).await;
    fails_as_outage("list_by_user", timeout, store.list_by_user(NS, "dan")).await;
    fails_as_outage("delete", timeout, store.delete(NS, &new_id())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_and_events_recover_after_the_whole_cluster_restarts() {
    // Also what a server started before its cluster goes through: no node answers at first.
    let test = "calls_and_events_recover_after_the_whole_cluster_restarts";
    let Some(mut cluster) = RedisCluster::start(test, 3, 0).await else {
        return;
    };
    // No call to the cluster while it is up may run into it, however loaded the machine.
    let timeout = Duration::from_secs(2);
    let (store, _) = store_on(&cluster, test, timeout);
    let mut events = store.subscribe();
    events_ready(&store).await;
    let before = store
        .create(session("ivy", Duration::from_secs(60)))
        .await
        .expect("up");
    for port in cluster.ports() {
        cluster.kill(port);
    }
    let get = store.get(NS, &before.id, false);
    fails_as_outage("get while down", timeout, get).await;
    let create = store.create(session("ivy", Duration::from_secs(60)));
    fails_as_outage("create while down", timeout, create).await;

    for port in cluster.ports() {
        cluster.restart(port).await; // empty: it kept nothing, and forgot the scripts
    }
    assert!(
        cluster.wait_until_ready(Duration::from_secs(60)).await,
        "cluster back"
    );
    let after = eventually_ok("create after restart", RECOVERY_WITHIN, || {
        store.create(session("ivy", Duration::from_secs(60)))
    })
    .await;
    assert_eq!(
        store.get(NS, &after.id, false).await.expect("get").version,
        1
    );
    assert!(matches!(
        store.get(NS, &before.id, false).await,
        Err(StoreError::NotFound)
    ));

    // The subscriber finds the nodes again: write until one of its events comes back.
    let when = "of the restart";
    update_until_heard(&store, &mut events, NS, &after.id, RECOVERY_WITHIN, when).await;
}

/// Runs one of the store's scripts by its text on `node`, and gives the reply's status.
async fn run_script(
    node: &mut redis::aio::MultiplexedConnection,
    script: &str,
    keys: &[&str],
    args: &[&str],
) -> String {
    let helpers = include_str!("../src/store/redis/common.lua");
    let reply: redis::Value = redis::cmd("EVAL")
        .arg(format!("local WRITE_FORMAT = '2'\n{helpers}\n{script}"))
        .arg(keys.len())
        .arg(keys)
        .arg(args)
        .query_async(node)
        .await
        .expect("EVAL");
    match reply {
        redis::Value::Array(items) => match items.first() {
            Some(redis::Value::BulkString(status)) => String::from_utf8_lossy(status).into(),
            other => panic!("status {other:?}"),
        },
        other => panic!("reply {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_resent_after_a_lost_reply_is_applied_once() {
    // The cluster client resends a command whose connection broke, even if the node had run it
    // (it died before answering). Each write call carries a unique op id; this resends the same
    // script call, as that retry would, straight to the node.
    let test = "a_write_resent_after_a_lost_reply_is_applied_once";
    let Some(cluster) = RedisCluster::start(test, 3, 0).await else {
        return;
    };
    let (store, prefix) = store_on(&cluster, test, Duration::from_secs(2));
    let created = store
        .create(session("eve", Duration::from_secs(60)))
        .await
        .expect("create");
    let key = session_key(&prefix, NS, &created.id);
    let tombstone = format!("{prefix}:{NS}:t:{{{}}}", created.id);
    let mut node = cluster
        .node(cluster.master_of_slot(cluster.slot(&key).await).await)
        .await;
    let channel = format!("{prefix}:events");
    let id = created.id.as_str();

    // Update: compare-and-set at version 1, op "u1", twice; then with another op.
    let update = include_str!("../src/store/redis/update.lua");
    let cas = |op: &'static str| {
        let args = [
            channel.as_str(),
            NS,
            id,
            "1",
            "65536",
            "1",
            "0",
            "",
            "",
            "1",
            op,
            "n",
            "1",
        ];
        args.map(String::from)
    };
    for _ in 0..2 {
        let args = cas("u1");
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_eq!(run_script(&mut node, update, &[&key], &args).await, "ok");
    }
    let version = redis_record::field(&mut node, &key, "ver").await;
    assert_eq!(version.as_deref(), Some(&b"2"[..]), "applied once");
    let args = cas("u2");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_eq!(
        run_script(&mut node, update, &[&key], &args).await,
        "conflict",
        "another call at the old version is still a conflict"
    );

    // Delete: the resent call finds its own tombstone and answers as the delete it made.
    let delete = include_str!("../src/store/redis/delete.lua");
    let args = |op| [channel.as_str(), NS, id, "1", "", "0", "", "", op, "4000"];
    for _ in 0..2 {
        assert_eq!(
            run_script(&mut node, delete, &[&key, &tombstone], &args("d1")).await,
            "ok"
        );
    }
    assert_eq!(
        run_script(&mut node, delete, &[&key, &tombstone], &args("d2")).await,
        "notfound"
    );
    let pttl: i64 = node.pttl(&tombstone).await.expect("PTTL");
    assert!(pttl > 55_000, "the tombstone lives one session ttl: {pttl}");

    // Create: the resent call finds the session it wrote, not a taken id.
    let create = include_str!("../src/store/redis/create.lua");
    let fresh = new_id();
    let fresh_key = session_key(&prefix, NS, &fresh);
    let mut node = cluster
        .node(cluster.master_of_slot(cluster.slot(&fresh_key).await).await)
        .await;
    let args = |op| {
        [
            channel.as_str(),
            NS,
            fresh.as_str(),
            "1",
            "60000",
            "65536",
            "",
            "1",
            "1",
            op,
            "0",
        ]
    };
    for _ in 0..2 {
        assert_eq!(
            run_script(&mut node, create, &[&fresh_key], &args("c1")).await,
            "ok"
        );
    }
    assert_eq!(
        run_script(&mut node, create, &[&fresh_key], &args("c2")).await,
        "taken"
    );
}

#[path = "redis_cluster/failover.rs"]
mod failover;
