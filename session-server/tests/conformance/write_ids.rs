//! Write ids: a write's caller-given id is kept with the version it made (`Session.write_id`),
//! so a writer whose answer was lost (the server or the store went away after applying it) can
//! recognise its own write; a Restore rebases onto a version its holder's own write made, and
//! still loses to any other writer's change.

use std::time::Duration;

use session_proto::v1::*;
use tonic::Code;

use crate::calls::*;
use crate::restore::{restore_code, restore_of};
use crate::support::harness::Backend;

/// An update that sets `pairs` under write id `write_id`.
fn set_as(id: &str, write_id: &str, pairs: &[(&str, &str)]) -> UpdateRequest {
    UpdateRequest {
        write_id: write_id.into(),
        ..set("", id, pairs)
    }
}

/// The write id comes back with the version it made, on every read, and never as an attribute;
/// a write without one clears it; a touch keeps it; keys starting with NUL are reserved and
/// write ids are bounded.
pub async fn write_ids_are_kept_with_the_version_they_made(backend: Backend) {
    let Some((_server, mut c)) = start(backend, "write_ids_kept").await else {
        return;
    };
    let s = create(&mut c, "", "wes", &[("a", "1")], None).await;
    assert_eq!(s.write_id, "", "a create carries none");
    let written = c
        .update(set_as(&s.id, "w-1", &[("b", "2")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((written.version, written.write_id.as_str()), (2, "w-1"));
    assert_eq!(
        written.attrs,
        attrs(&[("a", "1"), ("b", "2")]),
        "not an attribute"
    );
    let read = get(&mut c, "", &s.id).await.unwrap();
    assert_eq!(
        (read.write_id.as_str(), &read.attrs),
        ("w-1", &written.attrs)
    );
    let touched = c
        .touch(TouchRequest {
            id: s.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(touched.write_id, "w-1", "a touch makes no version");
    let listed = c
        .list_by_user(ListByUserRequest {
            user_id: "wes".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.sessions[0].write_id, "w-1");
    assert_eq!(listed.sessions[0].attrs, written.attrs);

    let plain = c
        .update(set("", &s.id, &[("c", "3")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (plain.version, plain.write_id.as_str()),
        (3, ""),
        "a write without an id leaves no older write's id on its version"
    );

    let refused =
        |r: Result<tonic::Response<Session>, tonic::Status>| r.err().map(|status| status.code());
    assert_eq!(
        refused(c.update(set("", &s.id, &[("\0write_id", "forged")])).await),
        Some(Code::InvalidArgument),
        "the reserved attribute cannot be written"
    );
    assert_eq!(
        refused(
            c.update(UpdateRequest {
                remove: vec!["\0x".into()],
                ..set("", &s.id, &[])
            })
            .await
        ),
        Some(Code::InvalidArgument)
    );
    assert_eq!(
        refused(
            c.update(set_as(&s.id, &"w".repeat(65), &[("d", "4")]))
                .await
        ),
        Some(Code::InvalidArgument),
        "write ids are at most 64 bytes"
    );
    assert_eq!(
        refused(c.update(set_as(&s.id, "w\n", &[("d", "4")])).await),
        Some(Code::InvalidArgument)
    );
    assert_eq!(
        get(&mut c, "", &s.id).await.unwrap().version,
        3,
        "nothing written"
    );
}

/// Same epoch: the holder's write at the base was applied and its answer lost, so the store
/// is one version past the snapshot's base. A Restore naming that write among its own rebases
/// the offline changes onto it (nothing dropped); sent again (its own answer lost), it is
/// recognised by its own write id.
pub async fn restore_rebases_onto_its_own_write_whose_answer_was_lost(backend: Backend) {
    let Some((server, mut c)) = start(backend, "restore_rebases").await else {
        return;
    };
    let s = create(&mut c, "", "", &[("cart", "[]")], None).await;
    // The write whose answer was lost: applied at version 1.
    let lost = c
        .update(set_as(&s.id, "w-lost", &[("cart", "[a]")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(lost.version, 2);
    // The snapshot holds it as an offline change on top of version 1, then one more item.
    let request = RestoreRequest {
        set: attrs(&[("cart", "[a,b]")]),
        write_id: "r.3".into(),
        own_write_ids: vec!["w-lost".into()],
        ..restore_of(&s, &s.epoch, 1)
    };
    let restored = c.restore(request.clone()).await.unwrap().into_inner();
    assert_eq!(
        (restored.version, restored.write_id.as_str()),
        (3, "r.3"),
        "applied on top of the holder's own version"
    );
    assert_eq!(restored.attrs, attrs(&[("cart", "[a,b]")]));
    assert_eq!(server.metrics.restores("rebased"), 1);

    // The restore's answer lost too: the same request again finds it applied, writes nothing.
    let again = c.restore(request).await.unwrap().into_inner();
    assert_eq!(
        (again.version, &again.attrs, again.write_id.as_str()),
        (3, &attrs(&[("cart", "[a,b]")]), "r.3"),
        "nothing written twice"
    );

    // A later snapshot of the same outage (one item more) goes on top.
    let later = RestoreRequest {
        set: attrs(&[("cart", "[a,b,c]")]),
        write_id: "r.4".into(),
        own_write_ids: vec!["w-lost".into()],
        ..restore_of(&s, &s.epoch, 1)
    };
    let newer = c.restore(later).await.unwrap().into_inner();
    assert_eq!((newer.version, newer.write_id.as_str()), (4, "r.4"));
    // An older snapshot of it (a request that was still on its way) never rolls it back.
    let older = RestoreRequest {
        set: attrs(&[("cart", "[a]")]),
        write_id: "r.2".into(),
        own_write_ids: vec!["w-lost".into()],
        ..restore_of(&s, &s.epoch, 1)
    };
    assert_eq!(restore_code(&mut c, older).await, Code::Aborted);
    // Nor does a sibling of the same sequence with other changes (another tab).
    let sibling = RestoreRequest {
        set: attrs(&[("cart", "[a,b,x]")]),
        write_id: "r.4".into(),
        ..restore_of(&s, &s.epoch, 1)
    };
    assert_eq!(restore_code(&mut c, sibling).await, Code::Aborted);
    let stored = get(&mut c, "", &s.id).await.unwrap();
    assert_eq!(
        (stored.version, &stored.attrs),
        (4, &attrs(&[("cart", "[a,b,c]")]))
    );

    // Without offline changes, the holder's own version is simply its session.
    let unchanged = c
        .restore(RestoreRequest {
            write_id: "r.4".into(),
            ..restore_of(&s, &s.epoch, 1)
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unchanged.version, 4, "nothing written");
}

/// An unsure write counts as the holder's base only at exactly `base_version + 1`: a write it
/// sent without compare-and-set may have landed on top of another writer's version, whose
/// change the offline values (made from the older base) would undo.
pub async fn an_unsure_write_is_the_base_only_right_after_it(backend: Backend) {
    let Some((_server, mut c)) = start(backend, "unsure_write_right_after_base").await else {
        return;
    };
    let s = create(&mut c, "", "", &[("cart", "[A]")], None).await;
    // Another tab checks out (version 2), then the holder's blind write lands (version 3).
    c.update(set("", &s.id, &[("cart", "[]"), ("order", "1")]))
        .await
        .unwrap();
    c.update(set_as(&s.id, "w-blind", &[("wish", "1")]))
        .await
        .unwrap();
    let stale = RestoreRequest {
        set: attrs(&[("wish", "1"), ("cart", "[A,C]")]),
        write_id: "r.3".into(),
        own_write_ids: vec!["w-blind".into()],
        ..restore_of(&s, &s.epoch, 1)
    };
    assert_eq!(restore_code(&mut c, stale).await, Code::Aborted);
    let stored = get(&mut c, "", &s.id).await.unwrap();
    assert_eq!(
        stored.attrs.get("cart").map(Vec::as_slice),
        Some(&b"[]"[..])
    );
}

/// The rebase is only ever onto the holder's own last write: a version another writer made
/// after it (with another write id, or none) wins as before (ABORTED, nothing applied).
pub async fn restore_still_loses_to_another_writers_change(backend: Backend) {
    let Some((_server, mut c)) = start(backend, "restore_loses_to_others").await else {
        return;
    };
    let s = create(&mut c, "", "", &[("role", "admin")], None).await;
    let request = RestoreRequest {
        set: attrs(&[("cart", "[a]")]),
        write_id: "r-mine".into(),
        own_write_ids: vec!["w-mine".into()],
        ..restore_of(&s, &s.epoch, 1)
    };
    c.update(set_as(&s.id, "w-mine", &[("cart", "[a]")]))
        .await
        .unwrap();
    // An administrator's change after it, without a write id.
    c.update(UpdateRequest {
        remove: vec!["role".into()],
        ..set("", &s.id, &[])
    })
    .await
    .unwrap();
    assert_eq!(restore_code(&mut c, request.clone()).await, Code::Aborted);
    // And with another write id.
    c.update(set_as(&s.id, "w-theirs", &[("x", "1")]))
        .await
        .unwrap();
    assert_eq!(restore_code(&mut c, request).await, Code::Aborted);
    let stored = get(&mut c, "", &s.id).await.unwrap();
    assert_eq!(stored.version, 4, "nothing applied");
    assert!(!stored.attrs.contains_key("role"), "the removal stands");
}

/// Another epoch: a recreation whose answer was lost is found under the request's write id,
/// and the offline changes made since go on top of it instead of being dropped.
pub async fn restore_of_another_epoch_rebases_onto_its_own_recreation(backend: Backend) {
    let Some((_server, mut c)) = start(backend, "restore_recreation_rebases").await else {
        return;
    };
    let lost = Session {
        id: crate::support::ids::new_id(),
        namespace: "default".into(),
        attrs: attrs(&[("cart", "[a]")]),
        version: 1,
        ttl: ttl(Duration::from_secs(600)),
        ..Default::default()
    };
    let first = RestoreRequest {
        set: attrs(&[("cart", "[a]")]),
        write_id: "r-made.1".into(),
        ..restore_of(&lost, "", 0)
    };
    let made = c.restore(first).await.unwrap().into_inner();
    assert_eq!((made.version, made.write_id.as_str()), (1, "r-made.1"));
    // One more offline change before the answer was seen: the same snapshot, one item more.
    let later = Session {
        attrs: attrs(&[("cart", "[a,b]")]),
        ..lost.clone()
    };
    let second = RestoreRequest {
        set: attrs(&[("cart", "[a,b]")]),
        write_id: "r-made.2".into(),
        ..restore_of(&later, "", 0)
    };
    let rebased = c.restore(second.clone()).await.unwrap().into_inner();
    assert_eq!(
        (rebased.version, &rebased.attrs),
        (2, &attrs(&[("cart", "[a,b]")]))
    );
    // Without its write id it is somebody else's recreation: the store wins.
    let foreign = RestoreRequest {
        write_id: "r-other.3".into(),
        ..second
    };
    assert_eq!(restore_code(&mut c, foreign).await, Code::Aborted);
}

/// The server's own attributes (the write id, the lifetime's end) never count toward
/// `--max-session-bytes`: a session at exactly the limit still takes writes with a write id,
/// and a recreation with one, as it would without.
pub async fn reserved_attributes_do_not_count_toward_the_size_limit(backend: Backend) {
    let settings = session_server::config::Settings {
        max_session_bytes: 100,
        max_lifetime: Some(Duration::from_secs(3600)),
        ..session_server::config::Settings::default()
    };
    let Some((_server, mut c)) = start_with(backend, "reserved_attrs_unsized", settings).await
    else {
        return;
    };
    let full = "x".repeat(99); // key "k" + 99 bytes: exactly the limit
    let s = create(&mut c, "", "", &[("k", &full)], None).await;
    assert!(s.ends_at.is_some(), "the lifetime's end is kept too");
    let written = c
        .update(set_as(&s.id, &"w".repeat(64), &[("k", &full)]))
        .await
        .expect("a write id does not push a full session over the limit")
        .into_inner();
    assert_eq!(written.write_id.len(), 64);
    // One byte more of the caller's own is still refused.
    let over = c
        .update(set_as(&s.id, "w2", &[("k", &"x".repeat(100))]))
        .await
        .expect_err("over the limit");
    assert_eq!(over.code(), Code::InvalidArgument);
    // A recreation (another epoch) at the limit, with a write id.
    let lost = Session {
        id: crate::support::ids::new_id(),
        namespace: "default".into(),
        attrs: attrs(&[("k", &full)]),
        version: 1,
        ttl: ttl(Duration::from_secs(600)),
        ..Default::default()
    };
    let made = c
        .restore(RestoreRequest {
            set: attrs(&[("k", &full)]),
            write_id: "r.1".into(),
            ..restore_of(&lost, "", 0)
        })
        .await
        .expect("recreated at the limit")
        .into_inner();
    assert_eq!(made.write_id, "r.1");
}
