//! Offline changes in a snapshot cookie, as any backend sharing the key writes them during an
//! outage (`session-client`'s layer, `demo-app --sessions proxy`), meet the store again through
//! the lookup plugin: pushed with `Restore` as one patch when the store still holds their base
//! version, dropped when the store moved on (the store wins), never pushed for a session the
//! store deleted. A real session server (memory store) and a backend echoing the headers.

mod support;

use std::collections::HashMap;
use std::time::SystemTime;

use base64::Engine as _;
use http::StatusCode;
use proxy_plugin::config::LookupFailure;
use session_client::cookie::{DEFAULT_SNAPSHOT_MAX_AGE, Snapshot, SnapshotPolicy};
use session_client::{Patch, SessionData};
use support::lookup::{NAMESPACE, Stack, attrs, codec};

/// The key material the proxy and the "backends" share.
const KEY: [u8; 32] = [0x5a; 32];

/// A snapshot of `session` as the store confirmed it, then changed offline: cart `[1,2,3]`,
/// `theme` removed, the user renamed; signed with [`KEY`].
fn changed_offline(session: &SessionData) -> (Snapshot, String) {
    let mut snapshot = Snapshot::confirmed(
        session,
        NAMESPACE,
        SystemTime::now(),
        DEFAULT_SNAPSHOT_MAX_AGE,
    );
    let set = HashMap::from([("cart".to_owned(), b"[1,2,3]".to_vec())]);
    snapshot.record_offline(&set, &["theme".to_owned()], Some("alice@new"));
    let value = codec(&KEY).encode(&snapshot).expect("encode");
    (snapshot, value)
}

/// Alice's session with a `theme` too, as the store holds it.
async fn with_theme(stack: &Stack) -> SessionData {
    let patch = Patch {
        set: attrs(&[("theme", b"dark")]),
        ..Patch::default()
    };
    stack.store.update(&stack.session.id, patch).await.unwrap()
}

#[tokio::test]
async fn offline_changes_are_pushed_back_as_one_patch_when_the_store_holds_their_base() {
    let stack = Stack::start(LookupFailure::Closed, None, &[&KEY]).await;
    let base = with_theme(&stack).await;
    let (_, value) = changed_offline(&base);
    let id = &base.id;

    let reply = stack.get("/", &format!("sid={id}; sid_snap={value}")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("x-session-user"), Some("alice@new"));
    let cart = base64::engine::general_purpose::STANDARD.encode(b"[1,2,3]");
    assert_eq!(reply.header("x-session-attr-cart"), Some(cart.as_str()));
    assert_eq!(reply.header("x-session-degraded"), None);

    let stored = stack.store.get(id, false).await.unwrap();
    assert_eq!(stored.version, base.version + 1, "one patch");
    assert_eq!(stored.user_id, "alice@new");
    assert_eq!(stored.attrs["cart"], b"[1,2,3]");
    assert!(!stored.attrs.contains_key("theme"));
    assert_eq!(stack.lookups("restored"), 1);
    // The snapshot is re-issued as the store confirmed it: nothing offline any more.
    let reissued = codec(&KEY)
        .decode(&reply.snapshot().expect("re-issued"))
        .unwrap();
    assert!(!reissued.has_offline_changes(), "{reissued:?}");
    assert_eq!(
        (reissued.version, reissued.base_version),
        (stored.version, stored.version)
    );

    // Sent again (a stale copy), it is recognised as applied already (its write id is on the
    // stored version): nothing is written twice.
    let reply = stack.get("/", &format!("sid={id}; sid_snap={value}")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        (stack.lookups("restored"), stack.lookups("conflict")),
        (2, 0)
    );
    let again = stack.store.get(id, false).await.unwrap();
    assert_eq!(again.version, stored.version, "applied once");
}

#[tokio::test]
async fn offline_changes_are_dropped_when_the_store_changed_the_session_meanwhile() {
    let stack = Stack::start(LookupFailure::Closed, None, &[&KEY]).await;
    let base = with_theme(&stack).await;
    let (_, value) = changed_offline(&base);
    let id = &base.id;
    // An administrator's change in the store, on the other side of the partition.
    let patch = Patch {
        set: attrs(&[("role", b"support")]),
        ..Patch::default()
    };
    let admin = stack.store.update(id, patch).await.unwrap();

    let reply = stack.get("/", &format!("sid={id}; sid_snap={value}")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.header("x-session-user"),
        Some("alice"),
        "the stored session is served"
    );
    let cart = base64::engine::general_purpose::STANDARD.encode(b"[1,2]");
    assert_eq!(reply.header("x-session-attr-cart"), Some(cart.as_str()));
    let stored = stack.store.get(id, false).await.unwrap();
    assert_eq!(
        stored,
        SessionData {
            expires_at: stored.expires_at,
            ..admin
        },
        "nothing applied"
    );
    assert_eq!(stack.lookups("conflict"), 1);
    assert_eq!(stack.lookups("restored"), 0);
    let adopted = codec(&KEY)
        .decode(&reply.snapshot().expect("re-issued"))
        .unwrap();
    assert!(!adopted.has_offline_changes());
    assert_eq!(
        adopted.attrs.get("role").map(Vec::as_slice),
        Some(&b"support"[..])
    );
    let text = stack.proxy.proxy.render_metrics();
    assert!(
        text.contains("proxy_session_lookups_total{outcome=\"conflict\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn offline_changes_of_a_deleted_session_are_never_pushed() {
    let stack = Stack::start(LookupFailure::Closed, None, &[&KEY]).await;
    let base = with_theme(&stack).await;
    let (_, value) = changed_offline(&base);
    let id = &base.id;
    assert!(stack.store.delete(id).await.unwrap(), "logged out");

    let reply = stack.get("/", &format!("sid={id}; sid_snap={value}")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.seen.is_empty(), "{:?}", reply.seen);
    let line = reply.snapshot_line().expect("expired");
    assert!(
        line.starts_with("sid_snap=;") && line.contains("Max-Age=0"),
        "{line}"
    );
    let sessions = stack.sessions.as_ref().expect("store up");
    assert_eq!(sessions.restore_calls(), 0);
    assert_eq!(stack.lookups("missing"), 1);
}
