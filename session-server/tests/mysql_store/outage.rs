//! A MySQL that cannot be reached, freezes, or goes away and comes back: calls fail as an
//! outage within the store's timeout, and the same store recovers. Over gRPC an outage is
//! UNAVAILABLE or DEADLINE_EXCEEDED: the connection pool retries a refused connection until
//! the store's timeout, so a database that went away and one that stopped answering look the
//! same to the store.

use std::sync::Arc;
use std::time::Duration;

use session_proto::v1::{CreateRequest, GetRequest};
use session_server::config::Settings;
use session_server::store::mysql::MysqlStore;
use session_server::store::{SessionStore, StoreError};

use super::{NS, RECOVERY_WITHIN, session, set};
use crate::support::harness::TestServer;
use crate::support::mysql::{self as mysql, OwnMariadb};
use crate::support::outage::{fails_as_outage, fails_within, is_outage_status};
use crate::support::ports::RefusedPort;
use crate::support::wait::eventually_ok;

/// The store timeout of the outage tests: long enough that no call of a store that is up
/// runs into it on a loaded machine, short enough that waiting it out several times is cheap.
const OUTAGE_TIMEOUT: Duration = Duration::from_secs(2);

/// A private MariaDB, settings with `timeout`, and a store on them; `None` when skipped.
async fn own_mariadb(test: &str, timeout: Duration) -> Option<(OwnMariadb, Settings, MysqlStore)> {
    let db = OwnMariadb::start(test).await?;
    let settings = Settings {
        store_timeout: timeout,
        ..Settings::default()
    };
    let config = mysql::test_config(&db.url(), "sessions", &settings);
    let store = MysqlStore::connect(config).await.expect("connect");
    Some((db, settings, store))
}

#[tokio::test]
async fn unreachable_or_silent_database_fails_connect_as_unavailable_within_the_timeout() {
    // The first refuses connections; the second accepts them (the kernel does) and never
    // answers.
    let refused = RefusedPort::new();
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let silent = silent.local_addr().expect("address");
    for addr in [refused.addr().to_string(), silent.to_string()] {
        let timeout = Duration::from_millis(500);
        let settings = Settings {
            store_timeout: timeout,
            ..Settings::default()
        };
        let url = format!("mysql://root@{addr}/test");
        let config = mysql::test_config(&url, "sessions", &settings);
        let unavailable = |e: &StoreError| matches!(e, StoreError::Unavailable(_));
        fails_within(&addr, timeout, MysqlStore::connect(config), unavailable).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_is_unavailable_and_the_same_store_recovers() {
    let timeout = OUTAGE_TIMEOUT;
    let Some((mut db, _, store)) = own_mariadb("mysql_outage_recovers", timeout).await else {
        return;
    };
    let before = store
        .create(session("uma", Duration::from_secs(600)))
        .await
        .unwrap();

    // Frozen: connections open, no answers.
    db.pause();
    fails_as_outage(
        "get while frozen",
        timeout,
        store.get(NS, &before.id, false),
    )
    .await;
    fails_as_outage("list while frozen", timeout, store.list_by_user(NS, "uma")).await;
    db.resume();
    eventually_ok("get after thaw", RECOVERY_WITHIN, || {
        store.get(NS, &before.id, false)
    })
    .await;

    // Gone.
    db.stop();
    fails_as_outage("get", timeout, store.get(NS, &before.id, false)).await;
    fails_as_outage(
        "update",
        timeout,
        store.update(NS, &before.id, set("a", "1")),
    )
    .await;
    fails_as_outage("create", timeout, store.create(session("uma", timeout))).await;
    fails_as_outage("list_by_user", timeout, store.list_by_user(NS, "uma")).await;

    db.restart().await;
    let back = eventually_ok("get after restart", RECOVERY_WITHIN, || {
        store.get(NS, &before.id, false)
    })
    .await;
    assert_eq!(back, before, "the committed session survived the crash");
    let updated = store.update(NS, &before.id, set("a", "1")).await.unwrap();
    assert_eq!(updated.version, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_answers_an_outage_while_mysql_is_down_then_recovers() {
    let timeout = OUTAGE_TIMEOUT;
    let Some((mut db, settings, store)) = own_mariadb("grpc_mysql_outage", timeout).await else {
        return;
    };
    let server = TestServer::start(settings, Arc::new(store)).await;
    let mut client = server.client().await;
    let created = client
        .create(CreateRequest {
            user_id: "vera".into(),
            ..CreateRequest::default()
        })
        .await
        .expect("create while up")
        .into_inner();
    let get = GetRequest {
        namespace: String::new(),
        id: created.id.clone(),
        touch: true,
        bypass_cache: false,
    };

    db.stop();
    let get_while_down = client.get(get.clone());
    fails_within("get while down", timeout, get_while_down, is_outage_status).await;

    db.restart().await;
    let back = eventually_ok("get after restart", RECOVERY_WITHIN, || {
        let mut client = client.clone();
        let get = get.clone();
        async move { client.get(get).await }
    })
    .await
    .into_inner();
    assert_eq!((back.id, back.user_id), (created.id, "vera".to_owned()));
}
