//! The user index: listing where a user is logged in, and logging them out everywhere.

use session_proto::v1::*;
use tonic::Code;

use crate::calls::*;
use crate::support::harness::Backend;

/// ListByUser finds every session of a user (one moved to them too); DeleteByUser logs them
/// out everywhere and leaves other users alone; an empty user is INVALID_ARGUMENT.
pub async fn user_index_lists_and_deletes_all(backend: Backend) {
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
                    ..Default::default()
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
            ..Default::default()
        })
        .await;
    assert_eq!(err.unwrap_err().code(), Code::InvalidArgument);
}
