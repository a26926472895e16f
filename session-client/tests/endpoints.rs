//! Several session servers behind one client (README: "Several session servers"): an
//! unreachable server is ejected and calls go on through the other; an idempotent call that
//! finds a server unavailable is tried once at once on another (also with no retries
//! configured); a write that is not idempotent goes to another server only when it never left
//! the client (the first could not be connected to), never after a server said UNAVAILABLE.
//!
//! Real gRPC servers (the session server's service behind a front that counts the calls that
//! reach it and can answer UNAVAILABLE; each over its own memory store), and a port nobody
//! listens on.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use session_client::{ClientConfig, ClientError, Patch, SessionClient};
use session_server::config::Settings;
use session_server::store::memory::MemoryStore;
use support::counting_server::{CountingServer, Method};

/// An address where nothing listens: a port the OS gave and took back.
fn dead_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}

/// A client of `urls` with generous timeouts and `retries` extra tries.
fn client(urls: &[String], retries: u32) -> SessionClient {
    let mut config = ClientConfig::new(urls.join(","));
    config.timeout = Duration::from_secs(20);
    config.connect_timeout = Duration::from_secs(5);
    config.retries = retries;
    SessionClient::connect_lazy(config).expect("valid endpoints")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_go_to_the_server_that_is_up_when_the_other_cannot_be_connected_to() {
    let server = CountingServer::start().await;
    let dead = dead_url();
    // No retries: only the never-sent rule lets a create move to the other server.
    let client = client(&[dead.clone(), server.url()], 0);
    for n in 0..20 {
        client
            .create(&format!("u{n}"), HashMap::new(), None)
            .await
            .unwrap_or_else(|e| panic!("create {n}: {e}"));
    }
    assert_eq!(server.count(Method::Create), 20, "each create made once");
    let states = client.endpoints();
    let dead_state = states.iter().find(|s| s.label == dead).expect("member");
    assert!(
        !dead_state.healthy,
        "the dead server is ejected: {states:?}"
    );
    assert_eq!(dead_state.answered, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_call_answered_unavailable_is_tried_once_on_the_other_server() {
    let a = CountingServer::start().await;
    let b = CountingServer::start().await;
    let client = client(&[a.url(), b.url()], 0);
    a.fail_next(Method::Get, 1000);
    b.fail_next(Method::Get, 1000);
    // Both unavailable: one try on each, then the error (no retries configured).
    let outcome = client.get(&"A".repeat(32), false).await;
    assert!(
        matches!(outcome, Err(ClientError::Unavailable(_))),
        "{outcome:?}"
    );
    assert_eq!(
        (a.count(Method::Get), b.count(Method::Get)),
        (1, 1),
        "one try on each server"
    );
    let c = CountingServer::start().await;
    let d = CountingServer::start().await;
    let client = self::client(&[c.url(), d.url()], 0);
    c.fail_next(Method::Get, 1000);
    // Whichever server the call goes to first, it ends with an answer from d.
    for _ in 0..10 {
        let outcome = client.get(&"A".repeat(32), false).await;
        assert!(
            matches!(outcome, Err(ClientError::NotFound { .. })),
            "{outcome:?}"
        );
    }
    assert_eq!(d.count(Method::Get), 10, "every call answered by d");
    // Compare-and-set is idempotent: it moves on too (two servers over one store here, so the
    // session is found whichever server made it).
    let store = Arc::new(MemoryStore::new(Settings::default().max_session_bytes));
    let e = CountingServer::start_on(store.clone()).await;
    let f = CountingServer::start_on(store).await;
    let client = self::client(&[e.url(), f.url()], 0);
    let session = client.create("cas", HashMap::new(), None).await.unwrap();
    e.fail_next(Method::Update, 1000);
    for n in 0..5u64 {
        let patch = Patch {
            set: HashMap::from([("k".to_owned(), n.to_string().into_bytes())]),
            expected_version: Some(session.version + n),
            ..Patch::default()
        };
        client.update(&session.id, patch).await.expect("CAS update");
    }
    assert_eq!(f.count(Method::Update), 5, "every update applied by f");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_a_server_answered_unavailable_is_not_sent_to_another() {
    let a = CountingServer::start().await;
    let b = CountingServer::start().await;
    let client = client(&[a.url(), b.url()], 2);
    a.fail_next(Method::Create, 1000);
    b.fail_next(Method::Create, 1000);
    a.fail_next(Method::Update, 1000);
    b.fail_next(Method::Update, 1000);
    let outcome = client.create("once", HashMap::new(), None).await;
    assert!(
        matches!(outcome, Err(ClientError::Unavailable(_))),
        "{outcome:?}"
    );
    assert_eq!(
        a.count(Method::Create) + b.count(Method::Create),
        1,
        "a create that reached a server is never sent again"
    );
    let patch = Patch {
        set: HashMap::from([("k".to_owned(), b"v".to_vec())]),
        ..Patch::default()
    };
    let outcome = client.update(&"A".repeat(32), patch).await;
    assert!(
        matches!(outcome, Err(ClientError::Unavailable(_))),
        "{outcome:?}"
    );
    assert_eq!(
        a.count(Method::Update) + b.count(Method::Update),
        1,
        "an update without expected_version that reached a server is never sent again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_spread_over_healthy_servers() {
    let a = CountingServer::start().await;
    let b = CountingServer::start().await;
    let client = client(&[a.url(), b.url()], 0);
    for _ in 0..200 {
        let _ = client.get(&"A".repeat(32), false).await;
    }
    let (ca, cb) = (a.count(Method::Get), b.count(Method::Get));
    assert_eq!(ca + cb, 200);
    // Sequential calls leave both idle, so each draw is a coin toss between them.
    assert!(ca >= 40 && cb >= 40, "{ca} / {cb}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compare_and_set_applied_before_its_reply_was_lost_is_not_a_conflict() {
    // Two servers over one store; a's answer to the update is lost after the store applied it.
    let store = Arc::new(MemoryStore::new(Settings::default().max_session_bytes));
    let a = CountingServer::start_on(store.clone()).await;
    let b = CountingServer::start_on(store).await;
    let client = client(&[a.url(), b.url()], 0);
    let session = client.create("u", HashMap::new(), None).await.unwrap();
    a.lose_reply_next(Method::Update, 1000);
    b.lose_reply_next(Method::Update, 1000);
    let cas = |n: &str, version| Patch {
        set: HashMap::from([("n".to_owned(), n.as_bytes().to_vec())]),
        expected_version: Some(version),
        ..Patch::default()
    };
    // Applied on the first server, replayed on the other, ABORTED there: the client reads the
    // session, finds its own write, and answers with it.
    let updated = client
        .update(&session.id, cas("1", session.version))
        .await
        .expect("the applied write is not a conflict");
    assert_eq!(updated.version, session.version + 1);
    assert_eq!(updated.attrs["n"], b"1");
    assert_eq!(
        a.count(Method::Update) + b.count(Method::Update),
        2,
        "sent, then replayed once"
    );
    // A real conflict stays one: another writer's version with other values.
    let stale = client.update(&session.id, cas("2", session.version)).await;
    assert!(matches!(stale, Err(ClientError::Conflict(_))), "{stale:?}");
}

#[test]
fn endpoint_lists_are_checked_whole() {
    let config = ClientConfig::new("http://a:1, http://b:2/ ,");
    assert_eq!(config.endpoints, ["http://a:1", "http://b:2"]);
    assert!(
        ClientConfig::new("http://a:1,ftp://b:2")
            .validate()
            .is_err()
    );
    assert!(ClientConfig::new(",").validate().is_err());
}
