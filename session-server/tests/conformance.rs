//! The conformance suite: the same test bodies, through the real gRPC server, for every store.
//!
//! Each body takes a [`Backend`]; the `conformance!` macro at the bottom instantiates every body
//! once per store (`memory::…`, `redis::…`). A store whose service is missing is skipped with a
//! printed reason, or fails under `STICKLESS_REQUIRE_SERVICES=1`.

mod support;

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use futures::StreamExt as _;
use session_proto::v1::session_event::Kind;
use session_proto::v1::session_store_client::SessionStoreClient;
use session_proto::v1::*;
use session_server::config::Settings;
use support::harness::{Backend, TestServer};
use support::wait::eventually;
use tonic::Code;
use tonic::transport::Channel;

type Client = SessionStoreClient<Channel>;

fn attrs(pairs: &[(&str, &str)]) -> HashMap<String, Vec<u8>> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .collect()
}

fn ttl(d: Duration) -> Option<prost_types::Duration> {
    Some(d.try_into().unwrap())
}

fn expires_in(session: &Session) -> Duration {
    let at = SystemTime::try_from(session.expires_at.unwrap()).unwrap();
    at.duration_since(SystemTime::now()).unwrap_or_default()
}

async fn create(
    client: &mut Client,
    ns: &str,
    user: &str,
    pairs: &[(&str, &str)],
    t: Option<Duration>,
) -> Session {
    client
        .create(CreateRequest {
            namespace: ns.into(),
            user_id: user.into(),
            attrs: attrs(pairs),
            ttl: t.and_then(ttl),
        })
        .await
        .expect("create")
        .into_inner()
}

async fn get(client: &mut Client, ns: &str, id: &str) -> Result<Session, tonic::Status> {
    client
        .get(GetRequest {
            namespace: ns.into(),
            id: id.into(),
            touch: false,
        })
        .await
        .map(|r| r.into_inner())
}

fn set(ns: &str, id: &str, pairs: &[(&str, &str)]) -> UpdateRequest {
    UpdateRequest {
        namespace: ns.into(),
        id: id.into(),
        set: attrs(pairs),
        ..Default::default()
    }
}

async fn start(backend: Backend, test: &str) -> Option<(TestServer, Client)> {
    start_with(backend, test, Settings::default()).await
}

async fn start_with(
    backend: Backend,
    test: &str,
    settings: Settings,
) -> Option<(TestServer, Client)> {
    let server = TestServer::on(backend, test, settings).await?;
    let client = server.client().await;
    Some((server, client))
}

async fn create_get_delete(backend: Backend) {
    let Some((_server, mut c)) = start(backend, "create_get_delete").await else {
        return;
    };
    let created = create(&mut c, "", "alice", &[("cart", "[1,2]")], None).await;
    assert_eq!(
        created.namespace, "default",
        "empty namespace means default"
    );
    assert_eq!(created.version, 1);
    assert_eq!(created.id.len(), 32);
    assert!(created.created_at.is_some() && created.expires_at.is_some());

    let got = get(&mut c, "default", &created.id).await.unwrap();
    assert_eq!(got.user_id, "alice");
    assert_eq!(got.attrs, attrs(&[("cart", "[1,2]")]));
    assert_eq!(got.version, 1);

    let deleted = c
        .delete(DeleteRequest {
            namespace: "".into(),
            id: created.id.clone(),
        })
        .await
        .unwrap();
    assert!(deleted.into_inner().deleted);
    assert_eq!(
        get(&mut c, "", &created.id).await.unwrap_err().code(),
        Code::NotFound
    );
    let again = c
        .delete(DeleteRequest {
            namespace: "".into(),
            id: created.id.clone(),
        })
        .await
        .unwrap();
    assert!(!again.into_inner().deleted, "second delete finds nothing");
}

async fn expiry_after_ttl(backend: Backend) {
    let Some((_server, mut c)) = start(backend, "expiry_after_ttl").await else {
        return;
    };
    let s = create(
        &mut c,
        "",
        "",
        &[("k", "v")],
        Some(Duration::from_millis(300)),
    )
    .await;
    assert!(
        get(&mut c, "", &s.id).await.is_ok(),
        "alive right after create"
    );
    let what = "the session gone after its 300ms ttl";
    eventually(what, Duration::from_secs(5), || {
        let mut c = c.clone();
        let id = s.id.clone();
        async move {
            let gone = get(&mut c, "", &id)
                .await
                .is_err_and(|e| e.code() == Code::NotFound);
            gone.then_some(())
        }
    })
    .await;
    let touch = c
        .touch(TouchRequest {
            namespace: "".into(),
            id: s.id.clone(),
            ttl: None,
        })
        .await;
    assert_eq!(
        touch.unwrap_err().code(),
        Code::NotFound,
        "an expired session cannot be revived"
    );
}

async fn touch_slides_expiry(backend: Backend) {
    let Some((_server, mut c)) = start(backend, "touch_slides_expiry").await else {
        return;
    };
    let life = Duration::from_millis(1500);
    let s = create(&mut c, "", "", &[], Some(life)).await;
    // Keep it alive for well past its ttl, alternating Touch and Get{touch}.
    for round in 0..8 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let touched = if round % 2 == 0 {
            c.touch(TouchRequest {
                namespace: "".into(),
                id: s.id.clone(),
                ttl: None,
            })
            .await
        } else {
            c.get(GetRequest {
                namespace: "".into(),
                id: s.id.clone(),
                touch: true,
            })
            .await
        }
        .unwrap_or_else(|e| panic!("round {round}: session expired despite touches: {e}"))
        .into_inner();
        assert_eq!(touched.version, 1, "touching is not a write");
        assert!(
            expires_in(&touched) > Duration::from_millis(1000),
            "expiry moved forward"
        );
    }
    // A plain Get does not slide: without touches it now expires.
    eventually(
        "expiry once touches stopped",
        Duration::from_secs(6),
        || {
            let mut c = c.clone();
            let id = s.id.clone();
            async move { get(&mut c, "", &id).await.is_err().then_some(()) }
        },
    )
    .await;
}

async fn update_slides_expiry_and_can_change_ttl(backend: Backend) {
    let Some((_server, mut c)) = start(backend, "update_slides_expiry").await else {
        return;
    };
    let s = create(&mut c, "", "", &[], Some(Duration::from_secs(60))).await;
    let mut req = set("", &s.id, &[("a", "1")]);
    req.ttl = ttl(Duration::from_secs(600));
    let updated = c.update(req).await.unwrap().into_inner();
    assert_eq!(updated.ttl, ttl(Duration::from_secs(600)));
    assert!(expires_in(&updated) > Duration::from_secs(590));
    let touched = c
        .touch(TouchRequest {
            namespace: "".into(),
            id: s.id.clone(),
            ttl: ttl(Duration::from_secs(120)),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(expires_in(&touched) <= Duration::from_secs(120));
    assert_eq!(
        get(&mut c, "", &s.id).await.unwrap().ttl,
        ttl(Duration::from_secs(120)),
        "touch ttl sticks"
    );
}

async fn max_ttl_is_clamped(backend: Backend) {
    let settings = Settings {
        max_ttl: Duration::from_secs(60),
        default_ttl: Duration::from_secs(30),
        ..Settings::default()
    };
    let Some((_server, mut c)) = start_with(backend, "max_ttl_is_clamped", settings).await else {
        return;
    };
    let s = create(&mut c, "", "", &[], Some(Duration::from_secs(86_400 * 365))).await;
    assert_eq!(
        s.ttl,
        ttl(Duration::from_secs(60)),
        "a year is clamped to max-ttl"
    );
    assert!(expires_in(&s) <= Duration::from_secs(60));
    let d = create(&mut c, "", "", &[], None).await;
    assert_eq!(
        d.ttl,
        ttl(Duration::from_secs(30)),
        "no ttl means default-ttl"
    );
    let touched = c
        .touch(TouchRequest {
            namespace: "".into(),
            id: s.id.clone(),
            ttl: ttl(Duration::from_secs(7200)),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        touched.ttl,
        ttl(Duration::from_secs(60)),
        "touch clamps too"
    );
    for bad in [Duration::ZERO] {
        let err = c
            .create(CreateRequest {
                ttl: ttl(bad),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
    }
    let negative = prost_types::Duration {
        seconds: -5,
        nanos: 0,
    };
    let err = c
        .create(CreateRequest {
            ttl: Some(negative),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

async fn regenerate_moves_data_and_kills_old_id(backend: Backend) {
    let Some((_server, mut c)) = start(backend, "regenerate").await else {
        return;
    };
    let old = create(&mut c, "shop", "bob", &[("cart", "x")], None).await;
    let new = c
        .regenerate(RegenerateRequest {
            namespace: "shop".into(),
            id: old.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(new.id, old.id);
    assert_eq!(new.attrs, old.attrs);
    assert_eq!(new.user_id, "bob");
    assert_eq!(new.created_at, old.created_at, "created_at survives");
    assert!(new.version > old.version);
    assert_eq!(
        get(&mut c, "shop", &old.id).await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(get(&mut c, "shop", &new.id).await.unwrap().attrs, old.attrs);
    let listed = c
        .list_by_user(ListByUserRequest {
            namespace: "shop".into(),
            user_id: "bob".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<_> = listed.sessions.iter().map(|s| s.id.clone()).collect();
    assert_eq!(
        ids,
        vec![new.id.clone()],
        "the user index follows the new id"
    );
    let err = c
        .regenerate(RegenerateRequest {
            namespace: "shop".into(),
            id: old.id,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

async fn attribute_patches_merge(backend: Backend) {
    let Some((server, mut c)) = start(backend, "attribute_patches_merge").await else {
        return;
    };
    let s = create(&mut c, "", "", &[("keep", "1"), ("drop", "2")], None).await;
    let mut req = set("", &s.id, &[("new", "3")]);
    req.remove = vec!["drop".into(), "absent".into()];
    let patched = c.update(req).await.unwrap().into_inner();
    assert_eq!(patched.attrs, attrs(&[("keep", "1"), ("new", "3")]));
    assert_eq!(patched.version, 2);

    // Two writers, each on its own keys, at the same time, without compare-and-set: both win.
    let mut writers = Vec::new();
    for side in ["left", "right"] {
        let id = s.id.clone();
        let mut c = server.client().await;
        writers.push(tokio::spawn(async move {
            for i in 0..50 {
                let key = format!("{side}-{i}");
                c.update(set("", &id, &[(key.as_str(), side)]))
                    .await
                    .unwrap();
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    let merged = get(&mut c, "", &s.id).await.unwrap();
    for side in ["left", "right"] {
        for i in 0..50 {
            assert_eq!(
                merged.attrs.get(&format!("{side}-{i}")).map(Vec::as_slice),
                Some(side.as_bytes())
            );
        }
    }
    assert_eq!(merged.attrs.len(), 102);
    assert_eq!(merged.version, 102, "every write bumped the version once");
}

async fn cas_conflict_is_aborted(backend: Backend) {
    let Some((_server, mut c)) = start(backend, "cas_conflict_is_aborted").await else {
        return;
    };
    let s = create(&mut c, "", "", &[("n", "0")], None).await;
    let mut first = set("", &s.id, &[("n", "1")]);
    first.expected_version = Some(1);
    assert_eq!(
        c.update(first.clone()).await.unwrap().into_inner().version,
        2
    );
    let err = c.update(first).await.unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err}");
    assert_eq!(
        get(&mut c, "", &s.id).await.unwrap().attrs,
        attrs(&[("n", "1")]),
        "the loser wrote nothing"
    );
    let mut retry = set("", &s.id, &[("n", "2")]);
    retry.expected_version = Some(2);
    assert_eq!(c.update(retry).await.unwrap().into_inner().version, 3);
}

async fn user_index_lists_and_deletes_all(backend: Backend) {
    let Some((_server, mut c)) = start(backend, "user_index").await else {
        return;
    };
    let mut carol = Vec::new();
    for _ in 0..3 {
        carol.push(create(&mut c, "", "carol", &[], None).await.id);
    }
    let dave = create(&mut c, "", "dave", &[], None).await.id;
    let anon = create(&mut c, "", "", &[], None).await.id;
    // Moving a session to another user moves it in the index.
    let mut to_carol = set("", &anon, &[]);
    to_carol.user_id = Some("carol".into());
    c.update(to_carol).await.unwrap();
    carol.push(anon);

    let list = |c: &mut Client, user: &str| {
        let mut c = c.clone();
        let user = user.to_string();
        async move {
            let mut ids: Vec<String> = c
                .list_by_user(ListByUserRequest {
                    namespace: "".into(),
                    user_id: user,
                })
                .await
                .unwrap()
                .into_inner()
                .sessions
                .into_iter()
                .map(|s| s.id)
                .collect();
            ids.sort();
            ids
        }
    };
    carol.sort();
    assert_eq!(list(&mut c, "carol").await, carol);
    assert_eq!(list(&mut c, "dave").await, vec![dave.clone()]);

    let deleted = c
        .delete_by_user(DeleteByUserRequest {
            namespace: "".into(),
            user_id: "carol".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .deleted;
    assert_eq!(deleted, 4);
    assert!(list(&mut c, "carol").await.is_empty());
    for id in &carol {
        assert_eq!(
            get(&mut c, "", id).await.unwrap_err().code(),
            Code::NotFound
        );
    }
    assert!(
        get(&mut c, "", &dave).await.is_ok(),
        "other users keep their sessions"
    );
    let err = c
        .list_by_user(ListByUserRequest {
            namespace: "".into(),
            user_id: "".into(),
        })
        .await;
    assert_eq!(err.unwrap_err().code(), Code::InvalidArgument);
}

async fn watch_delivers_events_in_order(backend: Backend) {
    let Some((_server, mut c)) = start(backend, "watch_in_order").await else {
        return;
    };
    let mut all = c
        .watch(WatchRequest {
            namespace: "w".into(),
            user_id: "".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut erin_only = c
        .watch(WatchRequest {
            namespace: "w".into(),
            user_id: "erin".into(),
        })
        .await
        .unwrap()
        .into_inner();
    // Stores that deliver events asynchronously (Redis pub/sub) need the subscription in place;
    // a first event seen on the stream proves it.
    let probe = create(&mut c, "w", "probe", &[], None).await;
    let first = tokio::time::timeout(Duration::from_secs(5), all.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        (first.kind(), first.id.as_str()),
        (Kind::Created, probe.id.as_str())
    );

    let s = create(&mut c, "w", "erin", &[], None).await;
    let other_ns = create(&mut c, "elsewhere", "erin", &[], None).await;
    for i in 0..5 {
        c.update(set("w", &s.id, &[("i", &i.to_string())]))
            .await
            .unwrap();
    }
    c.touch(TouchRequest {
        namespace: "w".into(),
        id: s.id.clone(),
        ttl: None,
    })
    .await
    .unwrap();
    c.delete(DeleteRequest {
        namespace: "w".into(),
        id: s.id.clone(),
    })
    .await
    .unwrap();

    let mut expected = vec![(Kind::Created, 1)];
    expected.extend((2..=6).map(|v| (Kind::Updated, v)));
    expected.push((Kind::Deleted, 6));
    for stream in [&mut all, &mut erin_only] {
        let mut seen = Vec::new();
        while seen.len() < expected.len() {
            let event = tokio::time::timeout(Duration::from_secs(5), stream.next())
                .await
                .expect("event within 5s")
                .expect("stream open")
                .expect("no error");
            assert_ne!(event.id, other_ns.id, "another namespace's event leaked");
            assert_eq!(event.namespace, "w");
            assert_eq!(event.id, s.id, "only erin's session after the probe");
            assert_eq!(event.user_id, "erin");
            seen.push((event.kind(), event.version));
        }
        assert_eq!(seen, expected);
    }
}

async fn namespaces_are_isolated(backend: Backend) {
    let Some((_server, mut c)) = start(backend, "namespaces_isolated").await else {
        return;
    };
    let a = create(&mut c, "app-a", "frank", &[("x", "a")], None).await;
    create(&mut c, "app-b", "frank", &[("x", "b")], None).await;
    assert_eq!(
        get(&mut c, "app-b", &a.id).await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(
        get(&mut c, "", &a.id).await.unwrap_err().code(),
        Code::NotFound
    );
    let err = c
        .update(set("app-b", &a.id, &[("x", "stolen")]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let gone = c
        .delete(DeleteRequest {
            namespace: "app-b".into(),
            id: a.id.clone(),
        })
        .await
        .unwrap();
    assert!(!gone.into_inner().deleted);
    let listed = c
        .list_by_user(ListByUserRequest {
            namespace: "app-a".into(),
            user_id: "frank".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .sessions;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].attrs, attrs(&[("x", "a")]));
    let deleted = c
        .delete_by_user(DeleteByUserRequest {
            namespace: "app-b".into(),
            user_id: "frank".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .deleted;
    assert_eq!(deleted, 1);
    assert_eq!(
        get(&mut c, "app-a", &a.id).await.unwrap().attrs,
        attrs(&[("x", "a")])
    );
}

async fn oversized_session_is_refused_and_nothing_stored(backend: Backend) {
    let settings = Settings {
        max_session_bytes: 1024,
        ..Settings::default()
    };
    let Some((_server, mut c)) = start_with(backend, "oversized_session", settings).await else {
        return;
    };
    let big = "x".repeat(1024);
    let err = c
        .create(CreateRequest {
            user_id: "gina".into(),
            attrs: attrs(&[("k", &big)]),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    let listed = c
        .list_by_user(ListByUserRequest {
            namespace: "".into(),
            user_id: "gina".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.sessions.is_empty(), "nothing stored");

    // Each patch is small, but the merged session would pass the limit.
    let s = create(&mut c, "", "", &[("a", &"y".repeat(600))], None).await;
    let err = c
        .update(set("", &s.id, &[("b", &"z".repeat(600))]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    let kept = get(&mut c, "", &s.id).await.unwrap();
    assert_eq!(
        (kept.version, kept.attrs.len()),
        (1, 1),
        "the session is untouched"
    );
    // Replacing a value counts the new size only.
    let ok = c
        .update(set("", &s.id, &[("a", &"w".repeat(1000))]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.version, 2);
}

async fn malformed_input_is_invalid_argument(backend: Backend) {
    let Some((_server, mut c)) = start(backend, "malformed_input").await else {
        return;
    };
    let s = create(&mut c, "", "", &[], None).await;
    for bad_id in [
        "",
        "short",
        "../../etc/passwd",
        &"x".repeat(31),
        &format!("{}*", &s.id[..31]),
    ] {
        let err = get(&mut c, "", bad_id).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "id {bad_id:?}");
        let err = c
            .delete(DeleteRequest {
                namespace: "".into(),
                id: bad_id.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "id {bad_id:?}");
    }
    for bad_ns in ["a b", "x:y", "{tag}", &"n".repeat(65)] {
        let err = get(&mut c, bad_ns, &s.id).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "namespace {bad_ns:?}");
    }
    let unknown_but_well_formed = "A".repeat(32);
    assert_eq!(
        get(&mut c, "", &unknown_but_well_formed)
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    let mut both = set("", &s.id, &[("k", "v")]);
    both.remove = vec!["k".into()];
    assert_eq!(
        c.update(both).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let empty_key = set("", &s.id, &[("", "v")]);
    assert_eq!(
        c.update(empty_key).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let long_user = CreateRequest {
        user_id: "u".repeat(257),
        ..Default::default()
    };
    assert_eq!(
        c.create(long_user).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        get(&mut c, "", &s.id).await.unwrap().version,
        1,
        "nothing was written"
    );
}

/// 2 clients × 500 increments of one counter with compare-and-set and retry end at exactly 1000.
async fn cas_counter_reaches_exactly_1000(backend: Backend) {
    let Some((server, mut c)) = start(backend, "cas_counter").await else {
        return;
    };
    let s = create(&mut c, "", "", &[("n", "0")], None).await;
    let mut workers = Vec::new();
    for _ in 0..2 {
        let id = s.id.clone();
        let mut c = server.client().await;
        workers.push(tokio::spawn(async move {
            let mut conflicts = 0u32;
            for _ in 0..500 {
                loop {
                    let cur = get(&mut c, "", &id).await.expect("get");
                    let n: u64 = String::from_utf8(cur.attrs["n"].clone())
                        .unwrap()
                        .parse()
                        .unwrap();
                    let mut req = set("", &id, &[("n", &(n + 1).to_string())]);
                    req.expected_version = Some(cur.version);
                    match c.update(req).await {
                        Ok(_) => break,
                        Err(e) if e.code() == Code::Aborted => conflicts += 1,
                        Err(e) => panic!("unexpected error: {e}"),
                    }
                }
            }
            conflicts
        }));
    }
    let conflicts: Vec<u32> = futures::future::join_all(workers)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let end = get(&mut c, "", &s.id).await.unwrap();
    assert_eq!(
        end.attrs["n"],
        b"1000".to_vec(),
        "conflicts seen: {conflicts:?}"
    );
    assert_eq!(end.version, 1001);
    assert!(server.metrics.calls("Update", Code::Ok) == 1000);
}

fn snapshot_of(s: &Session, version: u64, pairs: &[(&str, &str)]) -> RestoreRequest {
    RestoreRequest {
        namespace: s.namespace.clone(),
        session: Some(Session {
            version,
            attrs: attrs(pairs),
            expires_at: None,
            ..s.clone()
        }),
    }
}

async fn restore_brings_back_a_lost_session_and_respects_newer_versions(backend: Backend) {
    let Some((_server, mut c)) = start(backend, "restore_versions").await else {
        return;
    };
    // A session the store never saw (made by a backend during an outage): created as given.
    let lost = Session {
        id: "R".repeat(32),
        namespace: "default".into(),
        user_id: "ivy".into(),
        ttl: ttl(Duration::from_secs(600)),
        created_at: Some((SystemTime::now() - Duration::from_secs(5)).into()),
        ..Default::default()
    };
    let restored = c
        .restore(snapshot_of(&lost, 4, &[("cart", "3")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (restored.id.as_str(), restored.version),
        (lost.id.as_str(), 4)
    );
    assert_eq!(restored.attrs, attrs(&[("cart", "3")]));
    assert_eq!(restored.created_at, lost.created_at, "created_at kept");
    assert!(
        expires_in(&restored) > Duration::from_secs(590),
        "expiry is now + ttl"
    );
    let listed = c
        .list_by_user(ListByUserRequest {
            namespace: "".into(),
            user_id: "ivy".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.sessions.len(), 1, "indexed under its user");

    // An older snapshot never overwrites what the store has.
    let stale = c
        .restore(snapshot_of(&lost, 3, &[("cart", "old")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (stale.version, stale.attrs.clone()),
        (4, attrs(&[("cart", "3")]))
    );
    // A newer one (changes made while the store was down) replaces it.
    let newer = c
        .restore(snapshot_of(&lost, 6, &[("cart", "5")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (newer.version, newer.attrs.clone()),
        (6, attrs(&[("cart", "5")]))
    );
    assert_eq!(
        get(&mut c, "", &lost.id).await.unwrap().attrs,
        attrs(&[("cart", "5")])
    );
    c.update(set("", &lost.id, &[("more", "1")])).await.unwrap();
    assert_eq!(
        get(&mut c, "", &lost.id).await.unwrap().version,
        7,
        "writes go on from there"
    );

    let bad = RestoreRequest {
        namespace: "".into(),
        session: Some(Session {
            id: "bad".into(),
            ..lost
        }),
    };
    assert_eq!(
        c.restore(bad).await.unwrap_err().code(),
        Code::InvalidArgument
    );
}

async fn restore_of_a_deleted_session_is_refused(backend: Backend) {
    let Some((_server, mut c)) = start(backend, "restore_deleted").await else {
        return;
    };
    let refused = |r: Result<tonic::Response<Session>, tonic::Status>| {
        r.map(|_| ()).unwrap_err().code() == Code::FailedPrecondition
    };
    // Logout.
    let a = create(&mut c, "", "jo", &[("k", "v")], None).await;
    c.delete(DeleteRequest {
        namespace: "".into(),
        id: a.id.clone(),
    })
    .await
    .unwrap();
    assert!(
        refused(c.restore(snapshot_of(&a, a.version + 5, &[])).await),
        "deleted id restored"
    );
    // Log out everywhere.
    let b = create(&mut c, "", "jo", &[], None).await;
    c.delete_by_user(DeleteByUserRequest {
        namespace: "".into(),
        user_id: "jo".into(),
    })
    .await
    .unwrap();
    assert!(refused(c.restore(snapshot_of(&b, b.version, &[])).await));
    // The old id of a regenerate (fixation defence holds against replayed cookies too).
    let d = create(&mut c, "", "", &[], None).await;
    let moved = c
        .regenerate(RegenerateRequest {
            namespace: "".into(),
            id: d.id.clone(),
        })
        .await
        .unwrap();
    assert!(refused(c.restore(snapshot_of(&d, d.version, &[])).await));
    assert!(get(&mut c, "", &moved.into_inner().id).await.is_ok());
    // Deleted ids stay unreadable.
    assert_eq!(
        get(&mut c, "", &a.id).await.unwrap_err().code(),
        Code::NotFound
    );
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::Memory).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::Redis).await;
                }
            )*
        }
        mod redis_cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::RedisCluster).await;
                }
            )*
        }
        mod mysql {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::Mysql).await;
                }
            )*
        }
    };
}

conformance!(
    create_get_delete,
    expiry_after_ttl,
    touch_slides_expiry,
    update_slides_expiry_and_can_change_ttl,
    max_ttl_is_clamped,
    regenerate_moves_data_and_kills_old_id,
    attribute_patches_merge,
    cas_conflict_is_aborted,
    user_index_lists_and_deletes_all,
    watch_delivers_events_in_order,
    namespaces_are_isolated,
    oversized_session_is_refused_and_nothing_stored,
    malformed_input_is_invalid_argument,
    cas_counter_reaches_exactly_1000,
    restore_brings_back_a_lost_session_and_respects_newer_versions,
    restore_of_a_deleted_session_is_refused,
);
