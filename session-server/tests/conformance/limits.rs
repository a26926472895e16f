//! What the server refuses: sessions over the size limit, and malformed ids, namespaces,
//! attributes and users; a refused call writes nothing.

use session_proto::v1::*;
use session_server::config::Settings;
use tonic::Code;

use crate::calls::*;
use crate::support::harness::Backend;

/// A create or patch whose merged attributes pass `--max-session-bytes` is INVALID_ARGUMENT and
/// stores nothing; a replaced value counts at its new size.
pub async fn oversized_session_is_refused_and_nothing_stored(backend: Backend) {
    let settings = Settings {
        max_session_bytes: 1024,
        ..Settings::default()
    };
    let Some((_server, mut c)) = start_with(backend, "oversized_session", settings).await else {
        return;
    };
    let big = "x".repeat(1024);
    let err = c
        .create(CreateRequest {
            user_id: "gina".into(),
            attrs: attrs(&[("k", &big)]),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    let listed = c
        .list_by_user(ListByUserRequest {
            namespace: "".into(),
            user_id: "gina".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.sessions.is_empty(), "nothing stored");

    // Each patch is small, but the merged session would pass the limit.
    let s = create(&mut c, "", "", &[("a", &"y".repeat(600))], None).await;
    let err = c
        .update(set("", &s.id, &[("b", &"z".repeat(600))]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    let kept = get(&mut c, "", &s.id).await.unwrap();
    assert_eq!(
        (kept.version, kept.attrs.len()),
        (1, 1),
        "the session is untouched"
    );
    // Replacing a value counts the new size only.
    let ok = c
        .update(set("", &s.id, &[("a", &"w".repeat(1000))]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.version, 2);
}

/// Malformed ids, namespaces, patches and users are INVALID_ARGUMENT, and write nothing.
pub async fn malformed_input_is_invalid_argument(backend: Backend) {
    let Some((_server, mut c)) = start(backend, "malformed_input").await else {
        return;
    };
    let s = create(&mut c, "", "", &[], None).await;
    for bad_id in [
        "",
        "short",
        "../../etc/passwd",
        &"x".repeat(31),
        &format!("{}*", &s.id[..31]),
    ] {
        let err = get(&mut c, "", bad_id).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "id {bad_id:?}");
        let err = c
            .delete(DeleteRequest {
                namespace: "".into(),
                id: bad_id.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "id {bad_id:?}");
    }
    for bad_ns in ["a b", "x:y", "{tag}", &"n".repeat(65)] {
        let err = get(&mut c, bad_ns, &s.id).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "namespace {bad_ns:?}");
    }
    let unknown_but_well_formed = "A".repeat(32);
    assert_eq!(
        get(&mut c, "", &unknown_but_well_formed)
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    let mut both = set("", &s.id, &[("k", "v")]);
    both.remove = vec!["k".into()];
    assert_eq!(
        c.update(both).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let empty_key = set("", &s.id, &[("", "v")]);
    assert_eq!(
        c.update(empty_key).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let long_user = CreateRequest {
        user_id: "u".repeat(257),
        ..Default::default()
    };
    assert_eq!(
        c.create(long_user).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        get(&mut c, "", &s.id).await.unwrap().version,
        1,
        "nothing was written"
    );
}
