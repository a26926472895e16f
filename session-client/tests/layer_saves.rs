//! README: `SessionLayer` "loads lazily, saves once per response only when something changed,
//! as an attribute-level patch". Counted at the gRPC level, on a real session server behind a
//! counting front: what reaches the server is the honest measure.

mod support;

use std::collections::{BTreeSet, HashMap};

use http::StatusCode;
use session_client::{FallbackMode, SessionConfig, SessionLayer};
use support::app::{app, codec, send};
use support::counting_server::{CountingServer, Method};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_only_reads_sends_no_write() {
    let server = CountingServer::start().await;
    let client = server.client();
    let stored = client
        .create(
            "reader",
            HashMap::from([("a".into(), b"\"x\"".to_vec())]),
            None,
        )
        .await
        .unwrap();
    let app = app(SessionLayer::new(client.clone()));
    server.reset();

    let reply = send(&app, "GET", "/read", &[("sid", &stored.id)]).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(
        (reply.body["user"].as_str(), reply.body["a"].as_str()),
        (Some("reader"), Some("x"))
    );
    assert_eq!(server.calls(), [Method::Get], "one load, no save");
    assert!(
        reply.raw_cookies.is_empty(),
        "no cookie rewritten: {:?}",
        reply.raw_cookies
    );
    assert_eq!(
        client.get(&stored.id, false).await.unwrap().version,
        stored.version
    );

    // Without a session, reading makes none.
    server.reset();
    let reply = send(&app, "GET", "/read", &[]).await;
    assert_eq!(
        (reply.status, reply.body["user"].is_null()),
        (StatusCode::OK, true)
    );
    assert_eq!(
        server.calls(),
        Vec::<Method>::new(),
        "no session to load, nothing to save"
    );
    assert!(reply.raw_cookies.is_empty(), "{:?}", reply.raw_cookies);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_only_reads_sends_no_write_with_the_cookie_fallback_on() {
    let server = CountingServer::start().await;
    let config = SessionConfig {
        fallback: FallbackMode::OnOutage,
        ..SessionConfig::default()
    };
    let key = [5u8; 32];
    let app = app(SessionLayer::with_config(
        server.client(),
        Some(codec(&[key])),
        config,
    ));
    let login = send(&app, "POST", "/login", &[]).await;
    assert_eq!(login.status, StatusCode::OK);
    let (sid, snap) = (login.value("sid"), login.value("sid_snap"));
    server.reset();

    let reply = send(&app, "GET", "/read", &[("sid", &sid), ("sid_snap", &snap)]).await;
    assert_eq!(reply.body["user"], "ann");
    assert_eq!(server.calls(), [Method::Get], "one load, no save");
    assert!(
        reply.raw_cookies.is_empty(),
        "a fresh snapshot is not rewritten: {:?}",
        reply.raw_cookies
    );
}

/// The keys of a patch or of new attributes, and their JSON values as text.
fn keys_and_values(attrs: &HashMap<String, Vec<u8>>) -> BTreeSet<(String, String)> {
    attrs
        .iter()
        .map(|(k, v)| (k.clone(), String::from_utf8(v.clone()).unwrap()))
        .collect()
}

fn both_keys() -> BTreeSet<(String, String)> {
    BTreeSet::from([
        ("a".to_owned(), "\"one\"".to_owned()),
        ("b".to_owned(), "\"two\"".to_owned()),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_inserts_into_a_stored_session_are_saved_as_exactly_one_patch() {
    let server = CountingServer::start().await;
    let client = server.client();
    let stored = client
        .create(
            "writer",
            HashMap::from([("kept".into(), b"1".to_vec())]),
            None,
        )
        .await
        .unwrap();
    let app = app(SessionLayer::new(client.clone()));
    server.reset();

    let reply = send(&app, "POST", "/write-two", &[("sid", &stored.id)]).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(
        server.calls(),
        [Method::Get, Method::Update],
        "one load, one save"
    );
    let updates = server.updates();
    let patch = &updates[0];
    assert_eq!(patch.id, stored.id);
    assert_eq!(
        keys_and_values(&patch.set),
        both_keys(),
        "both keys in the one patch"
    );
    assert!(patch.remove.is_empty(), "{:?}", patch.remove);
    assert_eq!(
        (patch.user_id.as_deref(), patch.ttl, patch.expected_version),
        (None, None, None),
        "only the attributes that changed"
    );
    let after = client.get(&stored.id, false).await.unwrap();
    assert_eq!(after.version, stored.version + 1, "one write");
    assert_eq!(after.attrs["kept"], b"1", "a patch, not a rewrite");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_inserts_without_a_session_create_it_in_exactly_one_call() {
    let server = CountingServer::start().await;
    let app = app(SessionLayer::new(server.client()));

    let reply = send(&app, "POST", "/write-two", &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(server.calls(), [Method::Create], "one save, no load");
    let creates = server.creates();
    assert_eq!(keys_and_values(&creates[0].attrs), both_keys());
    let sid = reply.value("sid");
    assert_eq!(server.client().get(&sid, false).await.unwrap().version, 1);
}
