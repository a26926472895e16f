//! Two session servers on one store, as README promises for Redis and Redis Cluster ("many
//! session servers on one Redis"): compare-and-set increments split across the two servers
//! lose nothing, and a Watch on one server sees the other server's writes in write order.
//!
//! Each server has a store of its own (its own connections and event subscription) on the
//! same keys and events channel, as two processes would. MySQL servers sharing a table see
//! only their own events; their shared writes are in `mysql_store.rs`.

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use session_proto::v1::session_event::Kind;
use session_proto::v1::session_store_client::SessionStoreClient;
use session_proto::v1::{
    CreateRequest, DeleteRequest, GetRequest, Session, SessionEvent, TouchRequest, UpdateRequest,
    WatchRequest,
};
use session_server::config::Settings;
use session_server::store::redis::{RedisConfig, RedisStore};
use support::cas;
use support::cluster::RedisCluster;
use support::harness::{self, Guard, TestServer};
use support::services;
use support::wait::events_ready;
use tonic::Code;
use tonic::Streaming;
use tonic::transport::Channel;

type Client = SessionStoreClient<Channel>;

/// The namespace the Watch tests write in.
const NS: &str = "w";

/// How long one event may take to arrive: generous, for a loaded machine; events normally
/// come within milliseconds.
const EVENT_WITHIN: Duration = Duration::from_secs(20);

/// Which store the two servers share.
#[derive(Debug, Clone, Copy)]
enum Shared {
    /// The shared Redis on 127.0.0.1:6379, under a key prefix of the test's own.
    Redis,
    /// The same, each server with a near cache (`--cache-capacity`).
    RedisNearCache,
    /// A 3-master Redis Cluster the test starts itself.
    RedisCluster,
}

/// Two servers on one store. Fields drop in order: the servers before what their store needs.
struct TwoServers {
    /// Server 1.
    one: TestServer,
    /// Server 2.
    two: TestServer,
    /// The cluster's processes, if any.
    _shared: Guard,
}

/// Two servers on `shared`, each hearing the shared events channel before it starts; `None`
/// when the store is skipped.
async fn two_servers(shared: Shared, test: &str) -> Option<TwoServers> {
    let settings = Settings::default();
    let (config, guard): (RedisConfig, Guard) = match shared {
        Shared::Redis => {
            let url = services::redis_url(test)?;
            (harness::redis_config(&url, test, &settings), Box::new(()))
        }
        Shared::RedisNearCache => {
            let url = services::redis_url(test)?;
            let mut config = harness::redis_config(&url, test, &settings);
            config.cache_capacity = harness::NEAR_CACHE_CAPACITY;
            (config, Box::new(()))
        }
        Shared::RedisCluster => {
            let cluster = RedisCluster::start(test, 3, 0).await?;
            (cluster.config(test, &settings), Box::new(cluster))
        }
    };
    let mut servers = Vec::new();
    for _ in 0..2 {
        let store = RedisStore::new(config.clone()).expect("valid store settings");
        events_ready(&store).await;
        if config.cache_capacity > 0 {
            harness::near_cache_up(&store).await;
        }
        servers.push(TestServer::start(settings.clone(), Arc::new(store)).await);
    }
    let two = servers.pop().expect("two servers");
    let one = servers.pop().expect("two servers");
    Some(TwoServers {
        one,
        two,
        _shared: guard,
    })
}

/// 2 clients × 500 compare-and-set increments of one counter, client A through server 1 and
/// client B through server 2, retried on ABORTED: the counter ends at exactly 1000 (read
/// through the other server), each server applied its client's 500, and they did conflict.
async fn cas_increments_split_across_two_servers_lose_nothing(shared: Shared) {
    let test = "cas_increments_split_across_two_servers";
    let Some(servers) = two_servers(shared, test).await else {
        return;
    };
    let mut one = servers.one.client().await;
    let create = CreateRequest {
        attrs: [(cas::COUNTER.to_owned(), b"0".to_vec())].into(),
        ..CreateRequest::default()
    };
    let counter = one.create(create).await.expect("create").into_inner();
    let clients = vec![servers.one.client().await, servers.two.client().await];
    let conflicts = cas::race(clients, "", &counter.id, 500).await;
    assert!(
        conflicts.iter().sum::<u64>() >= 1,
        "no compare-and-set conflict, so nothing raced: {conflicts:?}"
    );

    let read = GetRequest {
        namespace: String::new(),
        id: counter.id.clone(),
        touch: false,
        bypass_cache: false,
    };
    let end = servers.two.client().await.get(read).await.expect("get");
    let end = end.into_inner();
    assert_eq!(cas::counter(&end), 1000, "conflicts seen: {conflicts:?}");
    assert_eq!(end.version, 1001, "one version per increment");
    for (server, conflicts) in [(&servers.one, conflicts[0]), (&servers.two, conflicts[1])] {
        assert_eq!(server.metrics.calls("Update", Code::Ok), 500);
        assert_eq!(server.metrics.calls("Update", Code::Aborted), conflicts);
    }
}

/// A Watch opened on server 1 sees CREATED, every UPDATED and DELETED of a session written
/// through server 2, in write order (versions increasing, none missing, a touch no event);
/// and with both servers writing one session at once, every version once, in order.
async fn watch_on_one_server_sees_the_other_servers_writes_in_order(shared: Shared) {
    let test = "watch_sees_the_other_servers_writes";
    let Some(servers) = two_servers(shared, test).await else {
        return;
    };
    let mut one = servers.one.client().await;
    let mut two = servers.two.client().await;
    let watch = WatchRequest {
        namespace: NS.into(),
        user_id: String::new(),
    };
    let mut events = one.watch(watch).await.expect("watch").into_inner();
    wait_until_live(&mut two, &mut events).await;

    let s = create(&mut two, "erin").await;
    for i in 0..5 {
        update(&mut two, &s.id, &format!("i{i}")).await;
    }
    let touch = TouchRequest {
        namespace: NS.into(),
        id: s.id.clone(),
        ttl: None,
    };
    two.touch(touch).await.expect("touch");
    let delete = DeleteRequest {
        namespace: NS.into(),
        id: s.id.clone(),
    };
    assert!(
        two.delete(delete)
            .await
            .expect("delete")
            .into_inner()
            .deleted
    );
    let seen = events_of(&mut events, &s.id, 7).await;
    assert!(
        seen.iter()
            .all(|e| e.namespace == NS && e.user_id == "erin")
    );
    let kinds: Vec<(Kind, u64)> = seen.iter().map(|e| (e.kind(), e.version)).collect();
    let mut expected = vec![(Kind::Created, 1)];
    expected.extend((2..=6).map(|version| (Kind::Updated, version)));
    expected.push((Kind::Deleted, 6));
    assert_eq!(
        kinds, expected,
        "server 2's writes, as server 1's watcher saw them"
    );

    // Both servers writing one session at once: still every version once, in order.
    let t = create(&mut two, "").await;
    let writers: Vec<_> = [("one", one.clone()), ("two", two.clone())]
        .into_iter()
        .map(|(name, mut client)| {
            let id = t.id.clone();
            tokio::spawn(async move {
                for i in 0..25 {
                    update(&mut client, &id, &format!("{name}-{i}")).await;
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.expect("writer");
    }
    let seen = events_of(&mut events, &t.id, 51).await;
    let kinds: Vec<(Kind, u64)> = seen.iter().map(|e| (e.kind(), e.version)).collect();
    let mut expected = vec![(Kind::Created, 1)];
    expected.extend((2..=51).map(|version| (Kind::Updated, version)));
    assert_eq!(kinds, expected, "writes through both servers, in order");
}

/// Creates a session in [`NS`] for `user`.
async fn create(client: &mut Client, user: &str) -> Session {
    let request = CreateRequest {
        namespace: NS.into(),
        user_id: user.into(),
        ..CreateRequest::default()
    };
    client.create(request).await.expect("create").into_inner()
}

/// Sets attribute `key` of session `id` in [`NS`] (no compare-and-set).
async fn update(client: &mut Client, id: &str, key: &str) {
    let request = UpdateRequest {
        namespace: NS.into(),
        id: id.into(),
        set: [(key.to_owned(), b"1".to_vec())].into(),
        ..UpdateRequest::default()
    };
    client.update(request).await.expect("update");
}

/// Creates probe sessions through `writer` until the CREATED event of one arrives on `events`:
/// then the watch hears writes made through the other server.
async fn wait_until_live(writer: &mut Client, events: &mut Streaming<SessionEvent>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut probes = HashSet::new();
    loop {
        probes.insert(create(writer, "probe").await.id);
        let listen = tokio::time::Instant::now() + Duration::from_secs(1);
        while let Ok(next) = tokio::time::timeout_at(listen, events.next()).await {
            let event = next.expect("the watch stream open").expect("no error");
            if probes.contains(&event.id) {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no probe's event reached the other server's watcher within 30s"
        );
    }
}

/// The next `count` events of session `id` on `events` (others passed over), each within
/// [`EVENT_WITHIN`].
async fn events_of(
    events: &mut Streaming<SessionEvent>,
    id: &str,
    count: usize,
) -> Vec<SessionEvent> {
    let mut seen = Vec::new();
    while seen.len() < count {
        let event = tokio::time::timeout(EVENT_WITHIN, events.next())
            .await
            .unwrap_or_else(|_| panic!("no event within {EVENT_WITHIN:?}; so far {seen:?}"))
            .expect("the watch stream open")
            .expect("no error");
        if event.id == id {
            seen.push(event);
        }
    }
    seen
}

mod redis {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cas_increments_split_across_two_servers_lose_nothing() {
        super::cas_increments_split_across_two_servers_lose_nothing(super::Shared::Redis).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn watch_on_one_server_sees_the_other_servers_writes_in_order() {
        super::watch_on_one_server_sees_the_other_servers_writes_in_order(super::Shared::Redis)
            .await;
    }
}

mod redis_near_cache {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cas_increments_split_across_two_servers_lose_nothing() {
        let shared = super::Shared::RedisNearCache;
        super::cas_increments_split_across_two_servers_lose_nothing(shared).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn watch_on_one_server_sees_the_other_servers_writes_in_order() {
        let shared = super::Shared::RedisNearCache;
        super::watch_on_one_server_sees_the_other_servers_writes_in_order(shared).await;
    }
}

mod redis_cluster {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cas_increments_split_across_two_servers_lose_nothing() {
        super::cas_increments_split_across_two_servers_lose_nothing(super::Shared::RedisCluster)
            .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn watch_on_one_server_sees_the_other_servers_writes_in_order() {
        let shared = super::Shared::RedisCluster;
        super::watch_on_one_server_sees_the_other_servers_writes_in_order(shared).await;
    }
}
