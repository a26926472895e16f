//! Rotating the session-lookup plugin's snapshot keys the way an operator does, through
//! `--session-snapshot-key` (signing key first): `[old]`, then `[new, old]`, then `[new]`. No
//! user is logged out by a step, and a retired key stops being honoured.

mod support;

use clap::Parser as _;
use http::StatusCode;
use proxy_plugin::config::{Cli, LookupConfig, LookupFailure, resolve};
use session_client::Patch;
use session_client::cookie::CookieError;
use support::lookup::{NAMESPACE, Stack, attrs, codec, key_id};

/// The key in use before the rotation.
const OLD: [u8; 32] = [0x0d; 32];
/// The key rotated in.
const NEW: [u8; 32] = [0x4e; 32];

/// The plugin settings the proxy's flags give for `keys` (each `--session-snapshot-key`, in
/// hex), fail-closed so that a refused snapshot shows as a 503 while the store is down.
fn by_flags(stack: &Stack, keys: &[&[u8]]) -> LookupConfig {
    let mut args: Vec<String> = [
        "session-proxy",
        "--backend",
        "http://127.0.0.1:1",
        "--session-lookup",
        &stack.session_url,
        "--session-namespace",
        NAMESPACE,
        "--session-attr",
        "cart",
        "--session-fail",
        "closed",
    ]
    .map(str::to_owned)
    .to_vec();
    for key in keys {
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        args.extend(["--session-snapshot-key".to_owned(), hex]);
    }
    let cli = Cli::try_parse_from(&args).expect("flags");
    resolve(cli, None)
        .expect("config")
        .lookup
        .expect("lookup on")
}

/// The key id a snapshot cookie value names (`v2.<kid>.<body>`).
fn kid(value: &str) -> &str {
    value
        .strip_prefix("v2.")
        .and_then(|rest| rest.split_once('.'))
        .map(|(kid, _)| kid)
        .unwrap_or_else(|| panic!("not a v2 snapshot: {value}"))
}

#[tokio::test]
async fn snapshot_keys_rotate_from_old_through_new_and_old_to_new_without_a_logout() {
    let mut stack = Stack::start(LookupFailure::Closed, None, &[&OLD]).await;
    stack.reload_lookup(by_flags(&stack, &[&OLD]));
    let id = stack.session.id.clone();

    // [old]: the snapshot is made under old.
    let under_old = stack.first_snapshot().await;
    assert_eq!(kid(&under_old), key_id(&OLD));

    // [new, old], store up: the old snapshot's session is served, and its snapshot is
    // re-issued under new at once (same version, young: only the key is out of date), so the
    // old key can be dropped without waiting for a change or half a ttl.
    stack.reload_lookup(by_flags(&stack, &[&NEW, &OLD]));
    let reply = stack
        .get("/", &format!("sid={id}; sid_snap={under_old}"))
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("x-session-user"), Some("alice"));
    let reissued = reply.snapshot().expect("re-issued under the signing key");
    assert_eq!(kid(&reissued), key_id(&NEW));
    // A snapshot already under new, same version and young, is left alone.
    let reply = stack
        .get("/", &format!("sid={id}; sid_snap={reissued}"))
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.snapshot(),
        None,
        "a current snapshot is not rewritten"
    );
    // The next snapshot the proxy writes because the session changed is under new too.
    let patch = Patch {
        set: attrs(&[("cart", b"[1,2,3]")]),
        ..Patch::default()
    };
    stack.store.update(&id, patch).await.expect("update");
    let reply = stack
        .get("/", &format!("sid={id}; sid_snap={under_old}"))
        .await;
    assert_eq!(reply.header("x-session-user"), Some("alice"));
    let under_new = reply.snapshot().expect("re-issued for the new version");
    assert_eq!(kid(&under_new), key_id(&NEW));
    assert_eq!(
        codec(&NEW).decode(&under_new).unwrap().attrs["cart"],
        b"[1,2,3]"
    );
    assert!(matches!(
        codec(&OLD).decode(&under_new),
        Err(CookieError::UnknownKey)
    ));

    // [new, old], store down: snapshots under either key stand in for the session.
    stack.store_down().await;
    for (snapshot, cart) in [(&under_old, "WzEsMl0="), (&under_new, "WzEsMiwzXQ==")] {
        let reply = stack
            .get("/", &format!("sid={id}; sid_snap={snapshot}"))
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{snapshot}");
        assert_eq!(reply.header("x-session-degraded"), Some("1"));
        assert_eq!(reply.header("x-session-user"), Some("alice"));
        assert_eq!(reply.header("x-session-attr-cart"), Some(cart));
    }

    // [new], store down: the retired key's snapshot is refused, the new one still honoured.
    stack.reload_lookup(by_flags(&stack, &[&NEW]));
    let reply = stack
        .get("/", &format!("sid={id}; sid_snap={under_old}"))
        .await;
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "old key retired"
    );
    let reply = stack
        .get("/", &format!("sid={id}; sid_snap={under_new}"))
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("x-session-degraded"), Some("1"));
    assert_eq!(reply.header("x-session-user"), Some("alice"));
}
