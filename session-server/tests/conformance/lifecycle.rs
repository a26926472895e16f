//! A session's life: created, read and deleted; regenerated under a new id; kept apart by
//! namespace.

use session_proto::v1::*;
use tonic::Code;

use crate::calls::*;
use crate::support::harness::Backend;

/// A created session (empty namespace: `default`, version 1, a 32-character id) reads back as
/// written; delete removes it and says so once.
pub async fn create_get_delete(backend: Backend) {
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

/// Regenerate gives the same data under a new id (user index included); the old id is gone.
pub async fn regenerate_moves_data_and_kills_old_id(backend: Backend) {
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
            ..Default::default()
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

/// No call in one namespace reads, changes, lists or deletes another namespace's sessions.
pub async fn namespaces_are_isolated(backend: Backend) {
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
            ..Default::default()
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
