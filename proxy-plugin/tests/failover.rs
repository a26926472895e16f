//! Backends failing under the proxy, end to end on loopback: a dead backend is taken out of
//! rotation by the active check or by passive marking (`max_fails` within `fail_timeout`) with
//! no GET failing meanwhile, passive marking tries it again after `fail_timeout`, and a POST is
//! never replayed while a GET is retried.
//!
//! Assertions count requests or order events instead of timing them where they can, and put
//! generous upper bounds on what only time decides, so that a loaded machine passes them.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;
use proxy_plugin::backend::Backend;
use proxy_plugin::config::HealthCheckKind;
use proxy_plugin::metrics::RejectReason;
use support::backend::{Behaviour, TestBackend};
use support::proxy::{TestProxy, client, config};

/// Bound on what only time decides (a probe interval, a `fail_timeout` passing): never reached
/// by a passing test.
const PATIENCE: Duration = Duration::from_secs(30);

/// Three echo backends, `a`, `b` and `c`.
async fn three() -> (TestBackend, TestBackend, TestBackend) {
    (
        TestBackend::start("a", Behaviour::Echo).await,
        TestBackend::start("b", Behaviour::Echo).await,
        TestBackend::start("c", Behaviour::Echo).await,
    )
}

/// `GET /` through `proxy`, which must answer 200.
async fn get_ok(http: &reqwest::Client, proxy: &TestProxy, what: &str) {
    let response = http.get(proxy.url("/")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK, "{what}");
}

/// Sends rounds of three GETs (each answered 200, round-robin gives `b` one of each three)
/// for at least `at_least` and 10 rounds, checking `b` is never marked down; the rounds sent.
async fn while_alive(
    http: &reqwest::Client,
    proxy: &TestProxy,
    b: &Backend,
    at_least: Duration,
) -> usize {
    let until = Instant::now() + at_least;
    let mut rounds = 0;
    while rounds < 10 || Instant::now() < until {
        for _ in 0..3 {
            get_ok(http, proxy, "backends alive").await;
        }
        rounds += 1;
        assert!(b.is_up(), "b marked down while alive, round {rounds}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    rounds
}

/// GETs (each answered 200) until `b` is marked down, at most `limit` of them and
/// [`PATIENCE`]; returns how many were sent and when the last one started (`b` went down
/// after that instant).
async fn until_down(
    http: &reqwest::Client,
    proxy: &TestProxy,
    b: &Backend,
    limit: usize,
) -> (usize, Instant) {
    let deadline = Instant::now() + PATIENCE;
    let mut sent = 0;
    loop {
        let started = Instant::now();
        get_ok(http, proxy, &format!("GET {sent} after b died")).await;
        sent += 1;
        if !b.is_up() {
            return (sent, started);
        }
        assert!(sent < limit, "b still up after {sent} GETs since its death");
        assert!(
            Instant::now() < deadline,
            "b still up {PATIENCE:?} after its death"
        );
    }
}

#[tokio::test]
async fn killed_backend_is_taken_out_by_the_active_check_without_a_failed_get() {
    let (a, b, c) = three().await;
    let mut cfg = config(&[&a, &b, &c]);
    cfg.health.kind = HealthCheckKind::Tcp;
    cfg.health.interval = Duration::from_millis(100);
    // A live backend's probe never runs out of time, however loaded the machine; a dead one's
    // fails at once (connection refused).
    cfg.health.timeout = Duration::from_secs(5);
    cfg.health.fall = 2;
    cfg.health.max_fails = 0; // only the active check may take b down
    let proxy = TestProxy::start(cfg).await;
    let http = client();
    let b_entry: Arc<Backend> = proxy.proxy.backends()[1].clone();

    // Alive through at least ten probe intervals: never marked down, its share served.
    let rounds = while_alive(&http, &proxy, &b_entry, Duration::from_secs(1)).await;
    assert_eq!((a.hits(), b.hits(), c.hits()), (rounds, rounds, rounds));

    b.kill();
    // Time alone decides when the probe runs: no bound on the count, only on the time.
    until_down(&http, &proxy, &b_entry, usize::MAX).await;
    let (before_a, before_c) = (a.hits(), c.hits());
    for _ in 0..20 {
        get_ok(&http, &proxy, "b marked down").await;
    }
    assert_eq!(
        a.hits() + c.hits(),
        before_a + before_c + 20,
        "a and c take everything, each request once"
    );
    assert_eq!(proxy.proxy.metrics().rejects(RejectReason::BadGateway), 0);
}

#[tokio::test]
async fn passive_marking_takes_a_dead_backend_out_and_tries_it_again_after_fail_timeout() {
    let (a, b, c) = three().await;
    let mut cfg = config(&[&a, &b, &c]); // no active check: passive marking alone
    cfg.health.max_fails = 2;
    // Long enough that two failed tries always fall within it, whatever the load.
    let fail_timeout = Duration::from_secs(5);
    cfg.health.fail_timeout = fail_timeout;
    let proxy = TestProxy::start(cfg).await;
    let http = client();
    let b_entry: Arc<Backend> = proxy.proxy.backends()[1].clone();

    let rounds = while_alive(&http, &proxy, &b_entry, Duration::ZERO).await;
    assert_eq!(b.hits(), rounds);

    b.kill();
    // Round-robin offers b at least once in every few first tries, and each failed try counts:
    // max_fails (2) failures come within a bounded number of GETs, however slow they are.
    let (sent, last_started) = until_down(&http, &proxy, &b_entry, 20).await;
    assert!(
        sent >= 2,
        "down after {sent} GET(s): fewer failures than max_fails"
    );

    // Down: not tried before fail_timeout has passed since it was marked, then back.
    let deadline = Instant::now() + fail_timeout + PATIENCE;
    while !b_entry.is_up() {
        get_ok(&http, &proxy, "b down").await;
        assert!(Instant::now() < deadline, "b never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let back_after = last_started.elapsed();
    assert!(
        back_after >= fail_timeout,
        "back {back_after:?} after it was marked down"
    );

    // Tried again (it is still dead): marked down again by new failures, no GET lost.
    until_down(&http, &proxy, &b_entry, 20).await;
    assert_eq!(proxy.proxy.metrics().rejects(RejectReason::BadGateway), 0);
}

#[tokio::test]
async fn post_to_a_resetting_backend_is_not_replayed_but_get_is_retried() {
    let reset = TestBackend::start("reset", Behaviour::Reset).await;
    let good = TestBackend::start("good", Behaviour::Echo).await;
    let mut cfg = config(&[&reset, &good]);
    cfg.health.max_fails = 0; // keep the resetting backend in rotation
    let proxy = TestProxy::start(cfg).await;
    let http = client();

    let mut statuses = Vec::new();
    for _ in 0..4 {
        let response = http
            .post(proxy.url("/order"))
            .body("buy 1")
            .send()
            .await
            .unwrap();
        statuses.push(response.status());
    }
    let failed = statuses
        .iter()
        .filter(|s| **s == StatusCode::BAD_GATEWAY)
        .count();
    let ok = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    assert_eq!(failed + ok, 4, "{statuses:?}");
    assert!(
        failed >= 1,
        "some POST went to the resetting backend: {statuses:?}"
    );
    assert_eq!(
        reset.hits(),
        failed,
        "each failed POST reached the backend once"
    );
    assert_eq!(
        good.hits(),
        ok,
        "no failed POST was replayed on the good backend"
    );

    for _ in 0..4 {
        let response = http.get(proxy.url("/")).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "GETs are retried");
    }
    assert!(
        proxy
            .proxy
            .render_metrics()
            .contains("proxy_retries_total{backend=\"reset\"}")
    );
}
