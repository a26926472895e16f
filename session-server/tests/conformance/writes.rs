//! Writes: attribute patches from concurrent writers merge, a stale compare-and-set is
//! ABORTED and writes nothing, and compare-and-set increments racing from two clients lose
//! nothing.

use tonic::Code;

use crate::calls::*;
use crate::support::cas;
use crate::support::harness::Backend;

/// Patches merge key by key: removes and sets in one patch, and two writers on their own keys
/// at the same time without compare-and-set both win, each write bumping the version once.
pub async fn attribute_patches_merge(backend: Backend) {
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

/// An update whose `expected_version` is stale is ABORTED and writes nothing; with the current
/// version it goes through.
pub async fn cas_conflict_is_aborted(backend: Backend) {
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

/// 2 clients × 500 increments of one counter with compare-and-set and retry on ABORTED end at
/// exactly 1000 (version 1001), and the clients did conflict: the server answered ABORTED at
/// least once, and counted every ABORTED the clients got.
pub async fn cas_counter_reaches_exactly_1000(backend: Backend) {
    let Some((server, mut c)) = start(backend, "cas_counter").await else {
        return;
    };
    let s = create(&mut c, "", "", &[(cas::COUNTER, "0")], None).await;
    let clients = vec![server.client().await, server.client().await];
    let conflicts = cas::race(clients, "", &s.id, 500).await;
    let total: u64 = conflicts.iter().sum();
    assert!(
        total >= 1,
        "no compare-and-set conflict, so nothing raced: {conflicts:?}"
    );
    let end = get(&mut c, "", &s.id).await.unwrap();
    assert_eq!(cas::counter(&end), 1000, "conflicts seen: {conflicts:?}");
    assert_eq!(end.version, 1001, "one version per increment");
    assert_eq!(server.metrics.calls("Update", Code::Ok), 1000);
    assert_eq!(
        server.metrics.calls("Update", Code::Aborted),
        total,
        "every conflict was an ABORTED answer"
    );
}
