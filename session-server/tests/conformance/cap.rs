//! The per-user session cap (`--max-sessions-per-user`, `--on-session-cap`), Spring Security's
//! `maximumSessions`: a session that joins a user at the cap (Create, Restore, an Update that
//! gives it the user) evicts the user's oldest session, with its DELETED event, or is refused
//! with RESOURCE_EXHAUSTED and nothing written; other users and anonymous sessions are never
//! touched; and a burst of parallel logins of one user never leaves more than the cap.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use futures::StreamExt as _;
use session_proto::v1::session_event::Kind;
use session_proto::v1::*;
use session_server::config::{OnCap, Settings};
use tonic::Code;

use crate::calls::*;
use crate::restore::{restore_code, restore_of};
use crate::support::harness::Backend;
use crate::support::ids::new_id;

/// The namespace of every session here.
const NS: &str = "cap";
/// How long one event may take to arrive: generous, for a loaded machine.
const EVENT_WITHIN: Duration = Duration::from_secs(20);
/// Parallel creates of one user in the bursts.
const BURST: usize = 20;
/// An epoch no store has: a Restore of it recreates the session.
const OTHER_EPOCH: &str = "AAAAAAAAAAAAAAAAAAAAAA";

/// Default settings with a cap of `max` sessions that does `on_cap`.
fn capped(max: u32, on_cap: OnCap) -> Settings {
    Settings {
        max_sessions_per_user: max,
        on_session_cap: on_cap,
        ..Settings::default()
    }
}

/// The ids of `user`'s live sessions in [`NS`], as ListByUser gives them.
async fn ids_of(c: &mut Client, user: &str) -> BTreeSet<String> {
    c.list_by_user(ListByUserRequest {
        namespace: NS.into(),
        user_id: user.into(),
        ..Default::default()
    })
    .await
    .expect("list_by_user")
    .into_inner()
    .sessions
    .into_iter()
    .map(|s| s.id)
    .collect()
}

/// Ids as a set, to compare with [`ids_of`].
fn set_of<'a>(ids: impl IntoIterator<Item = &'a str>) -> BTreeSet<String> {
    ids.into_iter().map(str::to_owned).collect()
}

/// `n` sessions of `user`, each created after the one before: a short pause between them, as
/// Redis keeps creation times to the millisecond (ties are broken by id, which a test cannot
/// choose).
async fn create_in_turn(c: &mut Client, user: &str, n: usize) -> Vec<Session> {
    let mut sessions = Vec::with_capacity(n);
    for _ in 0..n {
        tokio::time::sleep(Duration::from_millis(5)).await;
        sessions.push(create(c, NS, user, &[], None).await);
    }
    tokio::time::sleep(Duration::from_millis(5)).await;
    sessions
}

/// A session the store never had (another epoch's), of `user`, created `age` ago.
fn lost_session(user: &str, age: Duration) -> Session {
    Session {
        id: new_id(),
        namespace: NS.into(),
        user_id: user.into(),
        attrs: attrs(&[("cart", "1")]),
        version: 4,
        ttl: ttl(Duration::from_secs(600)),
        created_at: Some((SystemTime::now() - age).into()),
        ..Default::default()
    }
}

/// Waits for the events of `stream` until `wanted` (kind, id) have all been seen.
async fn await_events(
    stream: &mut tonic::Streaming<SessionEvent>,
    wanted: &[(Kind, &str)],
) -> Vec<SessionEvent> {
    let mut seen = Vec::new();
    let missing = |seen: &[SessionEvent]| {
        wanted
            .iter()
            .any(|(kind, id)| !seen.iter().any(|e| e.kind() == *kind && e.id == *id))
    };
    while missing(&seen) {
        let event = tokio::time::timeout(EVENT_WITHIN, stream.next())
            .await
            .unwrap_or_else(|_| panic!("no event among {wanted:?} within {EVENT_WITHIN:?}"))
            .expect("the stream goes on")
            .expect("an event");
        seen.push(event);
    }
    seen
}

/// Evict-oldest at the cap: a new session of the user makes the oldest go (NOT_FOUND, with a
/// DELETED event naming the user), the newest stay; another user's sessions and anonymous
/// ones, however many, are never counted or evicted.
pub async fn evict_oldest_keeps_the_newest_and_sends_deleted(backend: Backend) {
    let settings = capped(3, OnCap::EvictOldest);
    let Some((_server, mut c)) = start_with(backend, "cap_evict", settings).await else {
        return;
    };
    let mut events = c
        .watch(WatchRequest {
            namespace: NS.into(),
            user_id: "ann".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let ann = create_in_turn(&mut c, "ann", 3).await;
    // The subscription is in place once the first CREATED shows (Redis delivers by pub/sub).
    await_events(&mut events, &[(Kind::Created, ann[0].id.as_str())]).await;
    let bob = create_in_turn(&mut c, "bob", 3).await;
    let mut anonymous = Vec::new();
    for _ in 0..5 {
        anonymous.push(create(&mut c, NS, "", &[], None).await.id);
    }
    assert_eq!(
        ids_of(&mut c, "ann").await,
        set_of(ann.iter().map(|s| s.id.as_str())),
        "at the cap, nothing evicted yet"
    );

    let newest = create(&mut c, NS, "ann", &[("k", "v")], None).await;
    assert_eq!(
        ids_of(&mut c, "ann").await,
        set_of([ann[1].id.as_str(), ann[2].id.as_str(), newest.id.as_str()]),
        "the oldest made room"
    );
    assert_eq!(
        get(&mut c, NS, &ann[0].id).await.unwrap_err().code(),
        Code::NotFound
    );
    let seen = await_events(
        &mut events,
        &[
            (Kind::Deleted, ann[0].id.as_str()),
            (Kind::Created, newest.id.as_str()),
        ],
    )
    .await;
    let deleted = seen
        .iter()
        .find(|e| e.kind() == Kind::Deleted)
        .expect("a DELETED event");
    assert_eq!(
        (deleted.id.as_str(), deleted.user_id.as_str()),
        (ann[0].id.as_str(), "ann")
    );
    assert_eq!(
        seen.iter().filter(|e| e.kind() == Kind::Deleted).count(),
        1,
        "one eviction: {seen:?}"
    );
    assert_eq!(
        ids_of(&mut c, "bob").await,
        set_of(bob.iter().map(|s| s.id.as_str())),
        "another user is untouched"
    );
    for id in &anonymous {
        assert!(
            get(&mut c, NS, id).await.is_ok(),
            "anonymous sessions are never capped"
        );
    }
    // The evicted id is a tombstone, as after a Delete: its snapshot cannot bring it back.
    let evicted = Session {
        id: ann[0].id.clone(),
        ..lost_session("ann", Duration::from_secs(60))
    };
    assert_eq!(
        restore_code(&mut c, restore_of(&evicted, OTHER_EPOCH, 1)).await,
        Code::FailedPrecondition
    );
}

/// Refuse at the cap: a Create, an Update giving an anonymous session the user, and a Restore
/// recreating one of the user's are RESOURCE_EXHAUSTED and write nothing; the user's own
/// sessions stay writable (an Update naming its own owner is no new session), other users and
/// anonymous sessions go on, and a logout makes room again.
pub async fn refuse_is_resource_exhausted_and_writes_nothing(backend: Backend) {
    let settings = capped(2, OnCap::Refuse);
    let Some((server, mut c)) = start_with(backend, "cap_refuse", settings).await else {
        return;
    };
    let ann = create_in_turn(&mut c, "ann", 2).await;
    let ann_ids = set_of(ann.iter().map(|s| s.id.as_str()));

    let refused = c
        .create(CreateRequest {
            namespace: NS.into(),
            user_id: "ann".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("max-sessions-per-user"),
        "says why: {}",
        refused.message()
    );
    assert_eq!(ids_of(&mut c, "ann").await, ann_ids, "nothing written");

    let anonymous = create(&mut c, NS, "", &[], None).await;
    let mut to_ann = set(NS, &anonymous.id, &[("cart", "2")]);
    to_ann.user_id = Some("ann".into());
    let refused = c.update(to_ann).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    let unchanged = get(&mut c, NS, &anonymous.id).await.unwrap();
    assert_eq!(
        (
            unchanged.user_id.as_str(),
            unchanged.version,
            unchanged.attrs
        ),
        ("", 1, attrs(&[])),
        "the refused update wrote nothing"
    );

    let lost = lost_session("ann", Duration::from_secs(60));
    assert_eq!(
        restore_code(&mut c, restore_of(&lost, OTHER_EPOCH, 4)).await,
        Code::ResourceExhausted
    );
    assert_eq!(
        get(&mut c, NS, &lost.id).await.unwrap_err().code(),
        Code::NotFound,
        "the refused restore wrote nothing"
    );
    assert_eq!(ids_of(&mut c, "ann").await, ann_ids);

    let mut own = set(NS, &ann[0].id, &[("cart", "3")]);
    own.user_id = Some("ann".into());
    let own = c
        .update(own)
        .await
        .expect("a session of the user stays writable");
    assert_eq!(own.into_inner().version, 2);
    create(&mut c, NS, "bob", &[], None).await;
    create(&mut c, NS, "", &[], None).await;
    assert_eq!(server.metrics.session_caps("refused"), 3);

    let gone = c
        .delete(DeleteRequest {
            namespace: NS.into(),
            id: ann[1].id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(gone.deleted);
    let again = create(&mut c, NS, "ann", &[], None).await;
    assert_eq!(
        ids_of(&mut c, "ann").await,
        set_of([ann[0].id.as_str(), again.id.as_str()]),
        "a logout makes room"
    );
}

/// An Update that gives a session (anonymous or another user's) a user at the cap evicts that
/// user's oldest session; the moved session keeps its data, and its old owner loses it.
pub async fn moving_a_session_to_a_user_at_the_cap_evicts_the_oldest(backend: Backend) {
    let settings = capped(2, OnCap::EvictOldest);
    let Some((_server, mut c)) = start_with(backend, "cap_move", settings).await else {
        return;
    };
    let ann = create_in_turn(&mut c, "ann", 2).await;
    let anonymous = create(&mut c, NS, "", &[("cart", "1")], None).await;
    let mut login = set(NS, &anonymous.id, &[("seen", "1")]);
    login.user_id = Some("ann".into());
    let moved = c.update(login).await.unwrap().into_inner();
    assert_eq!(
        (moved.user_id.as_str(), moved.attrs),
        ("ann", attrs(&[("cart", "1"), ("seen", "1")]))
    );
    assert_eq!(
        ids_of(&mut c, "ann").await,
        set_of([ann[1].id.as_str(), anonymous.id.as_str()])
    );
    assert_eq!(
        get(&mut c, NS, &ann[0].id).await.unwrap_err().code(),
        Code::NotFound
    );

    let bob = create(&mut c, NS, "bob", &[], None).await;
    let mut to_ann = set(NS, &bob.id, &[]);
    to_ann.user_id = Some("ann".into());
    c.update(to_ann).await.unwrap();
    assert_eq!(
        ids_of(&mut c, "ann").await,
        set_of([anonymous.id.as_str(), bob.id.as_str()])
    );
    assert!(ids_of(&mut c, "bob").await.is_empty(), "bob lost it");
}

/// A Restore that recreates a session of a user at the cap (another epoch) evicts the user's
/// oldest session, as a Create does; an anonymous one is not capped.
pub async fn restore_with_a_user_is_capped(backend: Backend) {
    let settings = capped(1, OnCap::EvictOldest);
    let Some((_server, mut c)) = start_with(backend, "cap_restore", settings).await else {
        return;
    };
    let ann = create(&mut c, NS, "ann", &[], None).await;
    // Created before the session already there, and still the one kept: the newcomer wins.
    let lost = lost_session("ann", Duration::from_secs(3600));
    let restored = c
        .restore(restore_of(&lost, OTHER_EPOCH, 4))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (restored.id.as_str(), restored.version),
        (lost.id.as_str(), 1)
    );
    assert_eq!(ids_of(&mut c, "ann").await, set_of([lost.id.as_str()]));
    assert_eq!(
        get(&mut c, NS, &ann.id).await.unwrap_err().code(),
        Code::NotFound
    );
    let anonymous = lost_session("", Duration::from_secs(60));
    c.restore(restore_of(&anonymous, OTHER_EPOCH, 4))
        .await
        .expect("an anonymous session is not capped");
    assert!(get(&mut c, NS, &lost.id).await.is_ok());
}

/// [`BURST`] parallel creates of one user with a cap of 3 and evict-oldest all succeed, and
/// leave exactly 3 live sessions: no two took the place of one eviction.
pub async fn a_burst_of_creates_never_leaves_a_user_over_the_cap(backend: Backend) {
    let settings = capped(3, OnCap::EvictOldest);
    let Some((_server, c)) = start_with(backend, "cap_burst", settings).await else {
        return;
    };
    let results = burst(&c, "ann").await;
    let created: BTreeSet<String> = results
        .into_iter()
        .map(|r| r.expect("every create succeeds under evict-oldest").id)
        .collect();
    assert_eq!(created.len(), BURST);
    let live = ids_of(&mut c.clone(), "ann").await;
    assert_eq!(live.len(), 3, "exactly the cap is left: {live:?}");
    assert!(live.is_subset(&created));
}

/// [`BURST`] parallel creates of one user with a cap of 3 and refuse: exactly 3 succeed, the
/// rest are RESOURCE_EXHAUSTED, and the 3 are the user's sessions.
pub async fn a_burst_under_refuse_admits_exactly_the_cap(backend: Backend) {
    let settings = capped(3, OnCap::Refuse);
    let Some((_server, c)) = start_with(backend, "cap_burst_refuse", settings).await else {
        return;
    };
    let (mut admitted, mut refused) = (BTreeSet::new(), 0);
    for result in burst(&c, "ann").await {
        match result {
            Ok(session) => {
                admitted.insert(session.id);
            }
            Err(status) if status.code() == Code::ResourceExhausted => refused += 1,
            Err(status) => panic!("unexpected {status:?}"),
        }
    }
    assert_eq!((admitted.len(), refused), (3, BURST - 3));
    assert_eq!(ids_of(&mut c.clone(), "ann").await, admitted);
}

/// [`BURST`] creates of `user` at once (concurrent calls on the client's connection).
async fn burst(c: &Client, user: &str) -> Vec<Result<Session, tonic::Status>> {
    let calls = (0..BURST).map(|_| {
        let mut c = c.clone();
        let user = user.to_owned();
        tokio::spawn(async move {
            c.create(CreateRequest {
                namespace: NS.into(),
                user_id: user,
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner())
        })
    });
    futures::future::join_all(calls)
        .await
        .into_iter()
        .map(|joined| joined.expect("the call task"))
        .collect()
}
