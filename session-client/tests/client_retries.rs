//! README: `SessionClient` "retries with backoff for idempotent calls only". Checked against a
//! real gRPC server (the session server's service behind a front that answers UNAVAILABLE to
//! the first calls of a method and counts every call that reaches it): idempotent calls (Get,
//! Touch, Delete, ListByUser, DeleteByUser, Restore) are retried and succeed; Create, Update and
//! Regenerate reach the server exactly once and their UNAVAILABLE is surfaced.

mod support;

use std::collections::HashMap;

use session_client::{
    ClientConfig, ClientError, Patch, RestoreRequest, SessionClient, SessionData,
};
use support::counting_server::{CountingServer, Method};

/// Extra tries of an idempotent call in the default configuration.
fn retries() -> u32 {
    ClientConfig::new("http://127.0.0.1:1").retries
}

fn attrs(pairs: &[(&str, &str)]) -> HashMap<String, Vec<u8>> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.as_bytes().to_vec()))
        .collect()
}

/// A session of `user` made without faults.
async fn session_of(client: &SessionClient, user: &str) -> SessionData {
    client
        .create(user, attrs(&[("k", "v")]), None)
        .await
        .expect("create without faults")
}

/// Makes the client call of `method` about `session`, checking the answer when it succeeds.
async fn call(
    method: Method,
    client: &SessionClient,
    session: &SessionData,
) -> Result<(), ClientError> {
    match method {
        Method::Get => {
            let got = client.get(&session.id, true).await?;
            assert_eq!(got.attrs, session.attrs, "Get returned the stored session");
        }
        Method::Touch => {
            let touched = client.touch(&session.id, None).await?;
            assert_eq!(touched.version, session.version, "Touch keeps the version");
        }
        Method::Delete => assert!(client.delete(&session.id).await?, "Delete deleted it"),
        Method::ListByUser => {
            let listed = client.list_by_user(&session.user_id).await?;
            assert_eq!(listed.len(), 1, "ListByUser found the session");
        }
        Method::DeleteByUser => {
            let deleted = client.delete_by_user(&session.user_id).await?;
            assert_eq!(deleted, 1, "DeleteByUser deleted the session");
        }
        Method::Restore => {
            // Same epoch, the stored version as the base, no offline changes: the stored
            // session comes back unchanged.
            let restored = client
                .restore(RestoreRequest {
                    session: session.clone(),
                    epoch: session.epoch.clone(),
                    base_version: session.version,
                    set: Default::default(),
                    remove: Vec::new(),
                    user_id: None,
                    own_write_ids: Default::default(),
                    write_id: Default::default(),
                })
                .await?;
            assert_eq!(restored.id, session.id, "Restore answered with the session");
        }
        other => panic!("{other:?} is not an idempotent call of the client"),
    }
    Ok(())
}

const IDEMPOTENT: [Method; 6] = [
    Method::Get,
    Method::Touch,
    Method::Delete,
    Method::ListByUser,
    Method::DeleteByUser,
    Method::Restore,
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_calls_are_retried_through_unavailable_and_succeed() {
    let server = CountingServer::start().await;
    let client = server.client();
    for method in IDEMPOTENT {
        let session = session_of(&client, &format!("retry-{method:?}")).await;
        server.reset();
        server.fail_next(method, retries());
        call(method, &client, &session)
            .await
            .unwrap_or_else(|e| panic!("{method:?} failed despite retries: {e}"));
        assert_eq!(
            server.calls(),
            vec![method; retries() as usize + 1],
            "{method:?}: each failed try retried, nothing else sent"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_calls_give_up_with_unavailable_after_their_retries() {
    let server = CountingServer::start().await;
    let client = server.client();
    for method in IDEMPOTENT {
        let session = session_of(&client, &format!("give-up-{method:?}")).await;
        server.reset();
        server.fail_next(method, retries() + 1);
        let outcome = call(method, &client, &session).await;
        assert!(
            matches!(outcome, Err(ClientError::Unavailable(_))),
            "{method:?}: {outcome:?}"
        );
        assert_eq!(
            server.count(method),
            retries() as usize + 1,
            "{method:?}: one try and {} retries, no more",
            retries()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_is_sent_once_and_its_unavailable_surfaced() {
    let server = CountingServer::start().await;
    let client = server.client();
    server.fail_next(Method::Create, 1);
    let outcome = client.create("once", attrs(&[("k", "v")]), None).await;
    assert!(
        matches!(outcome, Err(ClientError::Unavailable(_))),
        "{outcome:?}"
    );
    assert_eq!(server.calls(), [Method::Create], "exactly one Create sent");
    // The server was up all along: a retry would have made the session.
    assert!(client.list_by_user("once").await.unwrap().is_empty());
    client.create("once", HashMap::new(), None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_without_expected_version_is_sent_once_and_its_unavailable_surfaced() {
    let server = CountingServer::start().await;
    let client = server.client();
    let session = session_of(&client, "update-once").await;
    server.reset();
    server.fail_next(Method::Update, 1);
    let patch = Patch {
        set: attrs(&[("k", "changed")]),
        ..Patch::default()
    };
    let outcome = client.update(&session.id, patch.clone()).await;
    assert!(
        matches!(outcome, Err(ClientError::Unavailable(_))),
        "{outcome:?}"
    );
    assert_eq!(server.calls(), [Method::Update], "exactly one Update sent");
    let stored = client.get(&session.id, false).await.unwrap();
    assert_eq!(
        (stored.attrs, stored.version),
        (session.attrs.clone(), session.version),
        "nothing was applied"
    );
    let updated = client.update(&session.id, patch).await.unwrap();
    assert_eq!(updated.attrs["k"], b"changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regenerate_is_sent_once_and_its_unavailable_surfaced() {
    let server = CountingServer::start().await;
    let client = server.client();
    let session = session_of(&client, "regenerate-once").await;
    server.reset();
    server.fail_next(Method::Regenerate, 1);
    let outcome = client.regenerate(&session.id).await;
    assert!(
        matches!(outcome, Err(ClientError::Unavailable(_))),
        "{outcome:?}"
    );
    assert_eq!(
        server.calls(),
        [Method::Regenerate],
        "exactly one Regenerate sent"
    );
    // The old id still lives: nothing moved it.
    assert_eq!(client.get(&session.id, false).await.unwrap().id, session.id);
    let moved = client.regenerate(&session.id).await.unwrap();
    assert_ne!(moved.id, session.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_other_than_unavailable_are_not_retried() {
    let server = CountingServer::start().await;
    let client = server.client();
    let unknown = "A".repeat(32);
    let missing = client.get(&unknown, false).await.map(|s| s.id);
    assert!(
        matches!(missing, Err(ClientError::NotFound { epoch: Some(_) })),
        "NOT_FOUND with the store's epoch: {missing:?}"
    );
    let empty_user = client.list_by_user("").await;
    assert!(
        matches!(empty_user, Err(ClientError::Invalid(_))),
        "{empty_user:?}"
    );
    assert_eq!(
        server.calls(),
        [Method::Get, Method::ListByUser],
        "NOT_FOUND and INVALID_ARGUMENT are answers, not outages: one call each"
    );
}
