//! README: the snapshot cookie's "key ring: first key signs, all verify", rotated `[old]` →
//! `[new, old]` → `[new]` through `SessionLayer`: a snapshot made under `[old]` is accepted
//! under `[new, old]` and re-issued signed by `new`; under `[new]` a snapshot signed by `old`
//! only is refused (no fallback session), while the re-issued one is served.
//!
//! The snapshot only matters when the store cannot answer for the session, so each step runs
//! with the store down (the gRPC front answers every Get UNAVAILABLE) or empty (restarted).

mod support;

use http::StatusCode;
use session_client::{FallbackMode, SessionClient, SessionConfig, SessionLayer};
use support::app::{Reply, app, codec, key_id, kid_of, send};
use support::counting_server::{CountingServer, Method};

const OLD: [u8; 32] = [1; 32];
const NEW: [u8; 32] = [2; 32];

/// The demo app behind a layer whose snapshot key ring is `ring` (signing key first).
fn app_with(client: SessionClient, ring: &[[u8; 32]]) -> axum::Router {
    let config = SessionConfig {
        fallback: FallbackMode::OnOutage,
        ..SessionConfig::default()
    };
    app(SessionLayer::with_config(client, Some(codec(ring)), config))
}

/// Logs in under `[old]`: the session id and its snapshot, signed by `old`.
async fn log_in_under_old(server: &CountingServer) -> (String, String) {
    let app = app_with(server.client(), &[OLD]);
    let login = send(&app, "POST", "/login", &[]).await;
    assert_eq!(login.status, StatusCode::OK, "{:?}", login.body);
    let (sid, snap) = (login.value("sid"), login.value("sid_snap"));
    assert_eq!(kid_of(&snap), key_id(&OLD), "signed by old: {snap}");
    (sid, snap)
}

async fn read(app: &axum::Router, sid: &str, snap: &str) -> Reply {
    send(app, "GET", "/read", &[("sid", sid), ("sid_snap", snap)]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_during_an_outage_accepts_old_then_reissues_with_new_then_refuses_old() {
    let server = CountingServer::start().await;
    let (sid, old_snap) = log_in_under_old(&server).await;
    // The store goes away: every read of the session fails UNAVAILABLE.
    server.fail_next(Method::Get, u32::MAX);

    // [new, old]: the old snapshot is accepted and re-issued signed by new.
    let both = app_with(server.client(), &[NEW, OLD]);
    let reply = read(&both, &sid, &old_snap).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(
        (
            reply.body["user"].as_str(),
            reply.body["degraded"].as_bool()
        ),
        (Some("ann"), Some(true)),
        "served from the old-key snapshot"
    );
    let reissued = reply.value("sid_snap");
    assert_eq!(
        kid_of(&reissued),
        key_id(&NEW),
        "re-issued by new: {reissued}"
    );
    let by_new_alone = codec(&[NEW])
        .decode(&reissued)
        .expect("verifies with new alone");
    assert_eq!(
        (by_new_alone.id, by_new_alone.user_id),
        (sid.clone(), "ann".into())
    );

    // [new]: old's snapshot is refused, so there is no session to fall back on (503, never a
    // silent logout); the re-issued one still serves the user.
    let new_only = app_with(server.client(), &[NEW]);
    let refused = read(&new_only, &sid, &old_snap).await;
    assert_eq!(
        refused.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "a snapshot signed by a retired key was trusted: {:?}",
        refused.body
    );
    let served = read(&new_only, &sid, &reissued).await;
    assert_eq!(served.status, StatusCode::OK, "{:?}", served.body);
    assert_eq!(
        (
            served.body["user"].as_str(),
            served.body["degraded"].as_bool()
        ),
        (Some("ann"), Some(true))
    );
    assert_eq!(
        server.count(Method::Restore),
        0,
        "the store was down throughout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_rotation_a_store_that_lost_the_session_is_restored_only_from_a_trusted_key() {
    let first = CountingServer::start().await;
    let (sid, old_snap) = log_in_under_old(&first).await;

    // [new, old] over a store that came back empty: old's snapshot is pushed back.
    let empty = CountingServer::start().await;
    let both = app_with(empty.client(), &[NEW, OLD]);
    let reply = read(&both, &sid, &old_snap).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(
        (
            reply.body["user"].as_str(),
            reply.body["degraded"].as_bool()
        ),
        (Some("ann"), Some(false))
    );
    assert_eq!(empty.calls(), [Method::Get, Method::Restore]);
    assert_eq!(
        empty.client().get(&sid, false).await.unwrap().user_id,
        "ann"
    );

    // [new] over another empty store: old's snapshot is treated as absent.
    let empty = CountingServer::start().await;
    let new_only = app_with(empty.client(), &[NEW]);
    let reply = read(&new_only, &sid, &old_snap).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert!(reply.body["user"].is_null(), "{:?}", reply.body);
    assert_eq!(
        empty.calls(),
        [Method::Get],
        "nothing restored from an untrusted snapshot"
    );
    let cleared = reply
        .cookie("sid")
        .expect("the stale session cookie is cleared");
    assert_eq!(cleared.value(), "");
}
