//! Restore in the store's own epoch: the offline changes of a snapshot are applied once, at
//! the version the store last confirmed, and never over a change the store made since; a
//! session deleted or expired in this epoch is never brought back. And a Restore's input is
//! checked as an Update's.

use std::time::Duration;

use futures::StreamExt as _;
use session_proto::v1::session_event::Kind;
use session_proto::v1::*;
use tonic::Code;

use crate::calls::*;
use crate::support::harness::Backend;

/// How long one event may take to arrive: generous, for a loaded machine.
const EVENT_WITHIN: Duration = Duration::from_secs(20);

/// A Restore of `s` as a snapshot holds it, which last agreed with the store of `epoch` at
/// `base`, with no offline changes (add them with struct update syntax).
pub fn restore_of(s: &Session, epoch: &str, base: u64) -> RestoreRequest {
    RestoreRequest {
        namespace: s.namespace.clone(),
        session: Some(Session {
            expires_at: None,
            ..s.clone()
        }),
        epoch: epoch.into(),
        base_version: base,
        ..Default::default()
    }
}

/// The code a Restore answered with (OK when it succeeded).
pub async fn restore_code(c: &mut Client, request: RestoreRequest) -> Code {
    match c.restore(request).await {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

/// Same epoch, stored version == base version: the offline changes (set, remove, user) are one
/// patch (version bumped once, expiry slid, one UPDATED event); a Restore without changes
/// returns the stored session unchanged; and a repeated Restore at the old base is ABORTED.
pub async fn restore_in_the_same_epoch_applies_offline_changes_once(backend: Backend) {
    let Some((server, mut c)) = start(backend, "restore_applies").await else {
        return;
    };
    let s = create(&mut c, "", "ann", &[("keep", "1"), ("gone", "2")], None).await;
    let s = c
        .update(set("", &s.id, &[("cart", "1")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.version, 2);
    let mut events = c.watch(WatchRequest::default()).await.unwrap().into_inner();

    let offline = RestoreRequest {
        set: attrs(&[("cart", "3"), ("new", "x")]),
        remove: vec!["gone".into()],
        user_id: Some("ann2".into()),
        ..restore_of(&s, &s.epoch, 2)
    };
    let restored = c.restore(offline.clone()).await.unwrap().into_inner();
    assert_eq!(restored.version, 3, "one patch, one version");
    assert_eq!(
        restored.attrs,
        attrs(&[("keep", "1"), ("cart", "3"), ("new", "x")])
    );
    assert_eq!(
        (restored.user_id.as_str(), restored.epoch.as_str()),
        ("ann2", s.epoch.as_str())
    );
    assert_eq!(restored.created_at, s.created_at, "created_at kept");
    assert!(
        expires_at(&restored) >= expires_at(&s),
        "expiry slid, never moved back"
    );
    let stored = get(&mut c, "", &s.id).await.unwrap();
    assert_eq!((stored.version, &stored.attrs), (3, &restored.attrs));
    let listed = c
        .list_by_user(ListByUserRequest {
            namespace: "".into(),
            user_id: "ann2".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.sessions.len(), 1, "indexed under its new user");
    // Events of the writes before the Watch may still be on their way (Redis pub/sub): the
    // first one past version 2 is the Restore's.
    let event = loop {
        let event = tokio::time::timeout(EVENT_WITHIN, events.next())
            .await
            .expect("an event")
            .unwrap()
            .unwrap();
        if event.version > 2 {
            break event;
        }
    };
    assert_eq!(
        (event.kind(), event.id.as_str(), event.version),
        (Kind::Updated, s.id.as_str(), 3)
    );

    // The same Restore again (a retry, a second backend): the store moved past its base.
    assert_eq!(restore_code(&mut c, offline).await, Code::Aborted);
    assert_eq!(
        get(&mut c, "", &s.id).await.unwrap().version,
        3,
        "nothing applied"
    );

    // No offline changes, base stored: the session as it is, nothing written.
    let unchanged = c
        .restore(restore_of(&restored, &s.epoch, 3))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unchanged.version, 3);
    assert_eq!(unchanged.attrs, restored.attrs);
    // No offline changes at an older base: the store wins all the same.
    assert_eq!(
        restore_code(&mut c, restore_of(&restored, &s.epoch, 2)).await,
        Code::Aborted
    );
    let metrics = &server.metrics;
    assert_eq!(
        (
            metrics.restores("applied"),
            metrics.restores("unchanged"),
            metrics.restores("conflict")
        ),
        (1, 1, 2)
    );
}

/// Same epoch, stored version != base version: the store wins. An administrator removes bob's
/// role while bob's backend runs on its snapshot; the snapshot's Restore (its role still set,
/// and a higher local version) is ABORTED and the role stays removed.
pub async fn restore_never_undoes_a_change_the_store_made_since_the_base(backend: Backend) {
    let Some((_server, mut c)) = start(backend, "restore_store_wins").await else {
        return;
    };
    let bob = create(&mut c, "", "bob", &[("role", "admin")], None).await;
    // The administrator demotes bob (version 2) while his backend cannot reach the store.
    c.update(UpdateRequest {
        namespace: "".into(),
        id: bob.id.clone(),
        remove: vec!["role".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    // Bob's snapshot: base 1, three offline writes, the role still in its attributes.
    let snapshot = RestoreRequest {
        set: attrs(&[("role", "admin"), ("cart", "9")]),
        ..restore_of(
            &Session {
                version: 4,
                attrs: attrs(&[("role", "admin"), ("cart", "9")]),
                ..bob.clone()
            },
            &bob.epoch,
            1,
        )
    };
    assert_eq!(restore_code(&mut c, snapshot).await, Code::Aborted);
    let stored = get(&mut c, "", &bob.id).await.unwrap();
    assert_eq!(stored.version, 2, "nothing applied");
    assert!(
        stored.attrs.is_empty(),
        "role still removed: {:?}",
        stored.attrs
    );
}

/// Same epoch, id absent: deleted (Delete, DeleteByUser, the old id of Regenerate) or expired
/// and its tombstone gone. FAILED_PRECONDITION with or without offline changes, and nothing
/// is stored.
pub async fn restore_in_the_same_epoch_never_brings_back_a_missing_session(backend: Backend) {
    let Some((server, mut c)) = start(backend, "restore_same_epoch_absent").await else {
        return;
    };
    let refused = |code: Code| code == Code::FailedPrecondition;
    // Logout.
    let a = create(&mut c, "", "jo", &[("k", "v")], None).await;
    c.delete(DeleteRequest {
        namespace: "".into(),
        id: a.id.clone(),
    })
    .await
    .unwrap();
    let with_changes = RestoreRequest {
        set: attrs(&[("k", "w")]),
        ..restore_of(&a, &a.epoch, a.version)
    };
    assert!(refused(restore_code(&mut c, with_changes).await));
    assert!(refused(
        restore_code(&mut c, restore_of(&a, &a.epoch, a.version)).await
    ));
    // Log out everywhere.
    let b = create(&mut c, "", "jo", &[], None).await;
    c.delete_by_user(DeleteByUserRequest {
        namespace: "".into(),
        user_id: "jo".into(),
    })
    .await
    .unwrap();
    assert!(refused(
        restore_code(&mut c, restore_of(&b, &b.epoch, b.version)).await
    ));
    // The old id of a regenerate.
    let d = create(&mut c, "", "", &[], None).await;
    c.regenerate(RegenerateRequest {
        namespace: "".into(),
        id: d.id.clone(),
    })
    .await
    .unwrap();
    assert!(refused(
        restore_code(&mut c, restore_of(&d, &d.epoch, d.version)).await
    ));
    // An id this epoch does not hold at all (expired, its tombstone gone): same answer.
    let gone = Session {
        id: crate::support::ids::new_id(),
        ..a.clone()
    };
    assert!(refused(
        restore_code(&mut c, restore_of(&gone, &a.epoch, 3)).await
    ));
    for id in [&a.id, &b.id, &d.id, &gone.id] {
        assert_eq!(
            get(&mut c, "", id).await.unwrap_err().code(),
            Code::NotFound,
            "nothing stored"
        );
    }
    assert_eq!(server.metrics.restores("refused"), 5);
}

/// A Restore's input is checked as an Update's and a Create's: a session and a well-formed id
/// are required, a key both set and removed, an oversized change or a bad user is
/// INVALID_ARGUMENT, and nothing is stored.
pub async fn restore_input_is_checked(backend: Backend) {
    let Some((_server, mut c)) = start(backend, "restore_input").await else {
        return;
    };
    let s = create(&mut c, "", "", &[("a", "1")], None).await;
    let invalid = [
        RestoreRequest {
            session: None,
            ..restore_of(&s, &s.epoch, 1)
        },
        restore_of(
            &Session {
                id: "bad".into(),
                ..s.clone()
            },
            "",
            0,
        ),
        RestoreRequest {
            set: attrs(&[("a", "2")]),
            remove: vec!["a".into()],
            ..restore_of(&s, &s.epoch, 1)
        },
        RestoreRequest {
            set: attrs(&[("big", &"x".repeat(65 * 1024))]),
            ..restore_of(&s, &s.epoch, 1)
        },
        RestoreRequest {
            remove: vec!["".into()],
            ..restore_of(&s, &s.epoch, 1)
        },
        RestoreRequest {
            user_id: Some("\n".into()),
            ..restore_of(&s, &s.epoch, 1)
        },
        restore_of(
            &Session {
                id: crate::support::ids::new_id(),
                attrs: attrs(&[("big", &"x".repeat(65 * 1024))]),
                ..s.clone()
            },
            "",
            0,
        ),
    ];
    for (i, request) in invalid.into_iter().enumerate() {
        assert_eq!(
            restore_code(&mut c, request).await,
            Code::InvalidArgument,
            "request {i}"
        );
    }
    let stored = get(&mut c, "", &s.id).await.unwrap();
    assert_eq!(
        (stored.version, stored.attrs),
        (1, s.attrs),
        "nothing stored"
    );
}
