//! Restore: a session a backend kept in its signed cookie during an outage comes back, never
//! over a newer version, and never for an id deleted (logged out) less than one ttl ago.

use std::time::{Duration, SystemTime};

use session_proto::v1::*;
use tonic::Code;

use crate::calls::*;
use crate::support::harness::Backend;

/// A Restore of `s` as a backend's cookie snapshot at `version` with `pairs`.
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

/// A lost session is restored as given (indexed, expiring now + ttl); an older snapshot never
/// overwrites the store, a newer one replaces it.
pub async fn restore_brings_back_a_lost_session_and_respects_newer_versions(backend: Backend) {
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

/// Restore is FAILED_PRECONDITION for an id deleted, logged out everywhere, or regenerated away.
pub async fn restore_of_a_deleted_session_is_refused(backend: Backend) {
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
