//! Watch: the events of a namespace (or of one user in it), in write order, and nothing of
//! another namespace.

use std::time::Duration;

use futures::StreamExt as _;
use session_proto::v1::session_event::Kind;
use session_proto::v1::*;

use crate::calls::*;
use crate::support::harness::Backend;

/// How long one event may take to arrive: generous, for a loaded machine; events normally
/// come within milliseconds.
const EVENT_WITHIN: Duration = Duration::from_secs(20);

/// A watcher of the namespace and one of a user in it see CREATED, every UPDATED, and DELETED,
/// in write order with their versions; a touch is no event; another namespace's events never
/// show.
pub async fn watch_delivers_events_in_order(backend: Backend) {
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
    let first = tokio::time::timeout(EVENT_WITHIN, all.next())
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
            let event = tokio::time::timeout(EVENT_WITHIN, stream.next())
                .await
                .expect("an event within EVENT_WITHIN")
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
