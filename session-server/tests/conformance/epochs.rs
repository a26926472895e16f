//! Epochs: every session a store returns carries its epoch, NOT_FOUND answers carry it read
//! fresh, a snapshot of another epoch (or of none) recreates an absent session at version 1,
//! and a store that lost its data has a new epoch, so its lost sessions can be restored while
//! deleted ones stay deleted.

use std::time::{Duration, SystemTime};

use session_proto::v1::*;
use session_server::config::Settings;
use tonic::Code;

use crate::calls::*;
use crate::restore::{restore_code, restore_of};
use crate::support::harness::{Backend, TestServer};

/// The response metadata of a NOT_FOUND that names the store's epoch (session-client's
/// `EPOCH_METADATA`).
const EPOCH_METADATA: &str = "stickless-epoch";

/// The epoch a NOT_FOUND answer carries.
fn epoch_of(status: &tonic::Status) -> String {
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    status
        .metadata()
        .get(EPOCH_METADATA)
        .unwrap_or_else(|| panic!("NOT_FOUND without {EPOCH_METADATA}: {status:?}"))
        .to_str()
        .unwrap()
        .to_owned()
}

/// Every call that returns a session gives the same non-empty epoch, and every NOT_FOUND of a
/// session lookup (Get, Update, Touch, Regenerate) carries that epoch in `stickless-epoch`.
pub async fn every_answer_carries_the_store_epoch(backend: Backend) {
    let Some((_server, mut c)) = start(backend, "epoch_everywhere").await else {
        return;
    };
    let created = create(&mut c, "", "eve", &[], None).await;
    let epoch = created.epoch.clone();
    assert_eq!(epoch.len(), 22, "{epoch:?}");
    let updated = c.update(set("", &created.id, &[("a", "1")])).await.unwrap();
    let touched = c
        .touch(TouchRequest {
            namespace: "".into(),
            id: created.id.clone(),
            ttl: None,
        })
        .await
        .unwrap();
    let read = get(&mut c, "", &created.id).await.unwrap();
    let listed = c
        .list_by_user(ListByUserRequest {
            namespace: "".into(),
            user_id: "eve".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let moved = c
        .regenerate(RegenerateRequest {
            namespace: "".into(),
            id: created.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut epochs = vec![
        updated.into_inner().epoch,
        touched.into_inner().epoch,
        read.epoch,
        moved.epoch,
    ];
    epochs.extend(listed.sessions.into_iter().map(|s| s.epoch));
    assert_eq!(epochs.len(), 5);
    assert!(epochs.iter().all(|e| *e == epoch), "{epoch} vs {epochs:?}");
    assert_eq!(create(&mut c, "other", "", &[], None).await.epoch, epoch);

    let missing = created.id.clone();
    let not_found = [
        get(&mut c, "", &missing).await.unwrap_err(),
        c.update(set("", &missing, &[("a", "2")]))
            .await
            .unwrap_err(),
        c.touch(TouchRequest {
            namespace: "".into(),
            id: missing.clone(),
            ttl: None,
        })
        .await
        .unwrap_err(),
        c.regenerate(RegenerateRequest {
            namespace: "".into(),
            id: missing.clone(),
        })
        .await
        .unwrap_err(),
    ];
    for status in &not_found {
        assert_eq!(epoch_of(status), epoch);
    }
}

/// Another epoch, or none (a session made during an outage), id absent and no tombstone: the
/// session is recreated from the snapshot at version 1 (id, user, attrs, created_at, ttl; the
/// request's version and offline changes ignored), in the store's epoch. A second Restore
/// finds it present: ABORTED, the store wins.
pub async fn restore_of_another_epoch_recreates_an_absent_session_at_version_1(backend: Backend) {
    let Some((server, mut c)) = start(backend, "restore_other_epoch").await else {
        return;
    };
    let epoch = create(&mut c, "", "", &[], None).await.epoch;
    let created_at = Some((SystemTime::now() - Duration::from_secs(5)).into());
    let lost = Session {
        id: crate::support::ids::new_id(),
        namespace: "default".into(),
        user_id: "ivy".into(),
        attrs: attrs(&[("cart", "3")]),
        version: 7,
        ttl: ttl(Duration::from_secs(600)),
        created_at,
        ..Default::default()
    };
    let other_epoch = "AAAAAAAAAAAAAAAAAAAAAA";
    let request = RestoreRequest {
        set: attrs(&[("cart", "3")]),
        ..restore_of(&lost, other_epoch, 7)
    };
    let restored = c.restore(request.clone()).await.unwrap().into_inner();
    assert_eq!(
        (
            restored.id.as_str(),
            restored.version,
            restored.user_id.as_str()
        ),
        (lost.id.as_str(), 1, "ivy")
    );
    assert_eq!(restored.attrs, lost.attrs);
    assert_eq!(restored.created_at, lost.created_at, "created_at kept");
    assert_eq!(restored.ttl, lost.ttl);
    assert_eq!(restored.epoch, epoch, "in the store's epoch");
    assert!(
        expires_in(&restored) > Duration::from_secs(590),
        "expiry is now + ttl"
    );
    let listed = c
        .list_by_user(ListByUserRequest {
            namespace: "".into(),
            user_id: "ivy".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.sessions.len(), 1, "indexed under its user");
    // Restored already (a parallel request, a retry): the store wins.
    assert_eq!(restore_code(&mut c, request).await, Code::Aborted);
    c.update(set("", &lost.id, &[("more", "1")])).await.unwrap();
    assert_eq!(
        get(&mut c, "", &lost.id).await.unwrap().version,
        2,
        "writes go on from version 1"
    );

    // No epoch: made during an outage, seen by no store.
    let offline = Session {
        id: crate::support::ids::new_id(),
        ..lost.clone()
    };
    let made = c
        .restore(restore_of(&offline, "", 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((made.version, made.attrs), (1, offline.attrs.clone()));
    assert_eq!(
        restore_code(&mut c, restore_of(&offline, "", 0)).await,
        Code::Aborted
    );
    assert_eq!(
        (
            server.metrics.restores("recreated"),
            server.metrics.restores("conflict")
        ),
        (2, 2)
    );
}

/// A tombstone refuses in every epoch: an id deleted, logged out everywhere or regenerated away
/// less than one ttl ago is FAILED_PRECONDITION for a snapshot of another epoch or of none too.
pub async fn restore_of_a_deleted_session_is_refused_in_every_epoch(backend: Backend) {
    let Some((_server, mut c)) = start(backend, "restore_deleted").await else {
        return;
    };
    let a = create(&mut c, "", "jo", &[("k", "v")], None).await;
    c.delete(DeleteRequest {
        namespace: "".into(),
        id: a.id.clone(),
    })
    .await
    .unwrap();
    let b = create(&mut c, "", "jo", &[], None).await;
    c.delete_by_user(DeleteByUserRequest {
        namespace: "".into(),
        user_id: "jo".into(),
    })
    .await
    .unwrap();
    let d = create(&mut c, "", "", &[], None).await;
    let moved = c
        .regenerate(RegenerateRequest {
            namespace: "".into(),
            id: d.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    for s in [&a, &b, &d] {
        for epoch in ["AAAAAAAAAAAAAAAAAAAAAA", ""] {
            assert_eq!(
                restore_code(&mut c, restore_of(s, epoch, s.version)).await,
                Code::FailedPrecondition,
                "{} restored with epoch {epoch:?}",
                s.id
            );
        }
        assert_eq!(
            get(&mut c, "", &s.id).await.unwrap_err().code(),
            Code::NotFound
        );
    }
    assert!(get(&mut c, "", &moved.id).await.is_ok());
}

/// A store that lost its data (a memory store restarted; a Redis, a Redis Cluster or a MySQL
/// table emptied with its epoch) has a new epoch: NOT_FOUND says so at once, a snapshot of the
/// old epoch recreates its session at version 1, and sessions made afterwards carry the new
/// epoch.
pub async fn a_store_that_lost_its_data_has_a_new_epoch(backend: Backend) {
    let test = "epoch_after_loss";
    let Some((server, mut c)) = start(backend, test).await else {
        return;
    };
    let s = create(&mut c, "", "lou", &[("cart", "2")], None).await;
    let old = s.epoch.clone();
    let (_server, mut c) = match backend {
        // A memory store loses its data with its process: a new server, a new store.
        Backend::Memory => {
            drop(server);
            let server = TestServer::on(backend, test, Settings::default())
                .await
                .expect("memory store");
            let client = server.client().await;
            (server, client)
        }
        _ => {
            server.lose_data().await;
            (server, c)
        }
    };
    let new = epoch_of(&get(&mut c, "", &s.id).await.unwrap_err());
    assert_ne!(new, old, "a store that lost its data keeps its epoch");
    assert_eq!(new.len(), 22);

    // The snapshot agreed with the old epoch at version 1, and changed the cart since.
    let snapshot = RestoreRequest {
        set: attrs(&[("cart", "5")]),
        ..restore_of(
            &Session {
                version: 2,
                attrs: attrs(&[("cart", "5")]),
                ..s.clone()
            },
            &old,
            1,
        )
    };
    let restored = c.restore(snapshot).await.unwrap().into_inner();
    assert_eq!(
        (
            restored.version,
            restored.epoch.as_str(),
            restored.user_id.as_str()
        ),
        (1, new.as_str(), "lou")
    );
    assert_eq!(restored.attrs, attrs(&[("cart", "5")]));
    assert_eq!(create(&mut c, "", "", &[], None).await.epoch, new);
    // From now on it is a session of the new epoch like any other: its logout sticks.
    c.delete(DeleteRequest {
        namespace: "".into(),
        id: s.id.clone(),
    })
    .await
    .unwrap();
    assert_eq!(
        restore_code(&mut c, restore_of(&restored, &new, 1)).await,
        Code::FailedPrecondition
    );
}
