//! `SessionClient::list_by_user` reads every page of ListByUser (at most 1000 sessions each),
//! and `list_by_user_page` reads one: against the real session service behind the counting
//! front, which shows how many calls each took.

mod support;

use std::collections::HashMap;

use session_client::ClientError;
use support::counting_server::{CountingServer, Method};

/// More sessions than the server gives in one page.
const SESSIONS: usize = 1003;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_by_user_reads_every_page_and_list_by_user_page_one() {
    let server = CountingServer::start().await;
    let client = server.client();
    let mut made = Vec::with_capacity(SESSIONS);
    for _ in 0..SESSIONS {
        let session = client.create("pager", HashMap::new(), None).await;
        made.push(session.expect("create").id);
    }
    made.sort();

    server.reset();
    let all = client.list_by_user("pager").await.expect("every page");
    let ids: Vec<String> = all.into_iter().map(|s| s.id).collect();
    assert_eq!(ids, made, "every session once, in id order");
    assert_eq!(server.count(Method::ListByUser), 2, "pages of 1000");

    let mut pages = Vec::new();
    let mut token = None;
    loop {
        let page = client
            .list_by_user_page("pager", 400, token.as_deref())
            .await
            .expect("a page");
        pages.push(page.sessions.len());
        token = page.next_page_token;
        if token.is_none() {
            break;
        }
    }
    assert_eq!(pages, [400, 400, SESSIONS - 800]);

    let bad = client
        .list_by_user_page("pager", 10, Some("not a token"))
        .await;
    assert!(matches!(bad, Err(ClientError::Invalid(_))), "{bad:?}");
}
