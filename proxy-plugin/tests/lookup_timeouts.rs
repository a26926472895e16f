//! Timeouts are not outages: the session-lookup plugin in front of a session server that stops
//! answering (a relay that holds every byte) is a 503 with `Retry-After` (fail-closed) or a
//! request without session (fail-open) while the store answered within the outage grace, and
//! trusts the snapshot only once the store has been silent for longer; a store that cannot be
//! reached at all lets the snapshot stand in at once.

mod support;

use std::time::{Duration, Instant};

use http::StatusCode;
use proxy_plugin::config::{LookupConfig, LookupFailure};
use proxy_plugin::lookup::REJECT_LOOKUP_TIMED_OUT;
use support::lookup::{Reply, Stack, lookup_config};

/// The key material the proxy and the "backends" share.
const KEY: [u8; 32] = [0x5a; 32];
/// The plugin's bound on one lookup.
const TIMEOUT: Duration = Duration::from_millis(200);
/// The plugin's outage grace: several lookup timeouts long.
const GRACE: Duration = Duration::from_millis(1500);

/// The plugin behind a relay, with [`TIMEOUT`] and outage grace `grace`.
async fn stack(on_failure: LookupFailure, grace: Duration) -> Stack {
    Stack::start_with(None, true, |url| LookupConfig {
        timeout: TIMEOUT,
        outage_grace: grace,
        ..lookup_config(url, on_failure, &[&KEY])
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_store_is_a_503_with_retry_after_within_the_grace_then_an_outage() {
    let stack = stack(LookupFailure::Closed, GRACE).await;
    let id = stack.session.id.clone();
    let answered_before = Instant::now();
    let value = stack.first_snapshot().await;
    let cookies = format!("sid={id}; sid_snap={value}");

    stack.relay().stall();
    let hits = stack.backend.hits();
    let reply = stack.get("/", &cookies).await;
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "a slow store is not a lost one: the snapshot is not used"
    );
    assert_eq!(reply.retry_after.as_deref(), Some("1"));
    assert!(reply.set_cookies.is_empty(), "{:?}", reply.set_cookies);
    assert_eq!(stack.backend.hits(), hits, "nothing forwarded");
    assert_eq!(stack.lookups("timeout_closed"), 1);
    assert_eq!(
        stack
            .proxy
            .proxy
            .metrics()
            .rejects_with(StatusCode::SERVICE_UNAVAILABLE, REJECT_LOOKUP_TIMED_OUT),
        1
    );

    // Silent for longer than the grace: an outage, the snapshot stands in. Never before the
    // grace has passed since the store's last answer.
    let degraded = loop {
        let reply = stack.get("/", &cookies).await;
        if reply.status == StatusCode::OK {
            break reply;
        }
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            answered_before.elapsed() < GRACE * 10,
            "still no snapshot long after the grace"
        );
    };
    assert!(
        answered_before.elapsed() >= GRACE,
        "the snapshot stood in within the grace"
    );
    assert_eq!(degraded.header("x-session-degraded"), Some("1"));
    assert_eq!(degraded.header("x-session-user"), Some("alice"));

    // Answering again: the store's session, and a timeout is an error again.
    stack.relay().forward();
    let healed = Instant::now();
    let reply = loop {
        let reply = stack.get("/", &cookies).await;
        if reply.header("x-session-degraded").is_none() {
            break reply;
        }
        assert!(
            healed.elapsed() < Duration::from_secs(30),
            "the store never came back"
        );
    };
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("x-session-user"), Some("alice"));
    stack.relay().stall();
    let reply = stack.get("/", &cookies).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.retry_after.as_deref(), Some("1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_store_fail_open_forwards_without_session_not_the_snapshot() {
    let stack = stack(LookupFailure::Open, GRACE).await;
    let id = stack.session.id.clone();
    let value = stack.first_snapshot().await;

    stack.relay().stall();
    let reply = stack.get("/", &format!("sid={id}; sid_snap={value}")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.seen.is_empty(), "{:?}", reply.seen);
    assert_eq!(reply.retry_after, None);
    assert_eq!(stack.lookups("timeout_open"), 1);
    assert_eq!(stack.lookups("snapshot"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_store_lets_the_snapshot_stand_in_at_once() {
    // A grace no test run comes near.
    let grace = Duration::from_secs(600);
    let stack = stack(LookupFailure::Closed, grace).await;
    let id = stack.session.id.clone();
    let value = stack.first_snapshot().await;
    let answered = Instant::now();

    // A partition right after an answer: connections closed, well within the grace.
    stack.relay().cut();
    let reply: Reply = stack.get("/", &format!("sid={id}; sid_snap={value}")).await;
    assert!(answered.elapsed() < grace);
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("x-session-degraded"), Some("1"));
    assert_eq!(reply.header("x-session-user"), Some("alice"));
    assert_eq!(stack.lookups("snapshot"), 1);
}
