//! The comparison's claims, checked on a short run rather than only printed: each test reads
//! the rows of one shared run (30 (mode, scenario) pairs, 13 users × 2 s each, memory store),
//! made once by whichever test gets there first; every run has a directory of its own (its
//! logs), removed when the run succeeds and kept, and named in the error, when it fails.
//!
//! `session-server-dies` and `store-failover` start Redis processes of their own
//! (`redis-server`): without it their pairs are left out of the shared run and their tests
//! skip, or fail under `STICKLESS_REQUIRE_SERVICES=1`.
//!
//! The assertions are meant to hold on a loaded 2-core machine (debug binaries beside another
//! build and `stress-ng --cpu 2`), where each request may take ten times as long: the shared
//! store's zero losses are deterministic; the losses of the other modes are asserted as
//! "some" or with a bound far from what they measure, never as rates that need many samples.
//!
//! The binaries come from `target/<profile>/` (`cargo test --workspace` builds them; otherwise
//! the harness runs `cargo build` for them first).

mod support;

use std::sync::OnceLock;
use std::time::Duration;

use bench::{Binaries, Mode, Row, RunSettings, Scenario, StoreChoice};

/// Users per run: enough that every backend has several of them. Prime to the 3 and 4
/// backends of the scenarios, so that users who happen to take turns in a fixed order never
/// land on the same round-robin backend each turn (12 would, and `rr-local` would look
/// sticky).
const USERS: usize = 13;
/// Length of one run: the scenarios act at 15–65% of it, so a loaded machine still leaves the
/// users most of a second after each change.
const DURATION: Duration = Duration::from_millis(2000);
/// Fewest requests of a run that counts as having run at all: a few per user (about ten
/// times fewer than an idle machine makes).
const MIN_REQUESTS: u64 = 3 * USERS as u64;

/// The modes that keep sessions in the shared store.
const STORE_MODES: [Mode; 3] = [Mode::RrStore, Mode::RrStoreFallback, Mode::ProxyLookup];

/// Whether `scenario` can run here: the ones that start a Redis of their own need
/// `redis-server`.
fn runnable(scenario: Scenario) -> bool {
    !scenario.needs_redis_server(&StoreChoice::Memory)
        || bench::cluster::redis::redis_server().is_ok()
}

/// Whether `test`, about `scenario`, can run; applies the skip rule when it cannot.
fn can_run(test: &str, scenario: Scenario) -> bool {
    if let Err(why) = bench::cluster::redis::redis_server()
        && !runnable(scenario)
    {
        support::skip_or_fail(test, &format!("{scenario} needs redis-server: {why}"));
        return false;
    }
    true
}

/// The pairs the claims need.
fn pairs() -> Vec<(Mode, Scenario)> {
    let mut pairs = vec![
        (Mode::RrLocal, Scenario::Steady),
        (Mode::IpHash, Scenario::MiddleProxy),
        (Mode::IpHash, Scenario::BackendDies),
        (Mode::StickyCookie, Scenario::BackendDies),
    ];
    for mode in STORE_MODES {
        for scenario in Scenario::ALL {
            // proxy-lookup's store outage has its own test below.
            if (mode, scenario) != (Mode::ProxyLookup, Scenario::StoreOutage) && runnable(scenario)
            {
                pairs.push((mode, scenario));
            }
        }
    }
    pairs
}

/// Runs `pairs` one after the other (the machine has two cores: runs in parallel would
/// measure each other), in a directory of their own.
fn run(pairs: &[(Mode, Scenario)]) -> Result<Vec<Row>, String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let bins = Binaries::locate().map_err(|e| e.to_string())?;
    let dir = tempfile::Builder::new()
        .prefix("stickless-claims-")
        .tempdir()
        .map_err(|e| format!("creating a directory for the run: {e}"))?;
    let settings = RunSettings::new(bins, dir.path().to_owned(), USERS, DURATION);
    let rows = runtime.block_on(async {
        let mut rows = Vec::new();
        for (index, &(mode, scenario)) in pairs.iter().enumerate() {
            rows.push(bench::run_one(&settings, mode, scenario, index).await?);
        }
        Ok::<_, bench::RunError>(rows)
    });
    match rows {
        Ok(rows) => {
            // The logs are only worth keeping when a run failed: `dir` is removed on drop.
            eprintln!("{}", bench::report::markdown(&rows));
            Ok(rows)
        }
        Err(error) => Err(format!("{error} (all logs in {})", dir.keep().display())),
    }
}

/// The shared run's rows.
fn rows() -> &'static [Row] {
    static ROWS: OnceLock<Result<Vec<Row>, String>> = OnceLock::new();
    match ROWS.get_or_init(|| run(&pairs())) {
        Ok(rows) => rows,
        Err(error) => panic!("the comparison run failed: {error}"),
    }
}

fn row(mode: Mode, scenario: Scenario) -> &'static Row {
    rows()
        .iter()
        .find(|r| r.mode == mode.name() && r.scenario == scenario.name())
        .unwrap_or_else(|| panic!("no row for {mode} / {scenario}"))
}

/// The failures among `scenarios` of the store modes: any user sent to log in, any request
/// answered "please log in", any acknowledged item lost.
fn store_mode_losses(scenarios: &[Scenario]) -> Vec<String> {
    let mut failures = Vec::new();
    for mode in STORE_MODES {
        for &scenario in scenarios {
            let r = row(mode, scenario);
            assert!(
                r.requests >= MIN_REQUESTS,
                "{mode} / {scenario} barely ran: {r:?}"
            );
            if r.users_sent_to_login != 0.0 || r.session_loss != 0.0 || r.lost_writes != 0 {
                failures.push(format!(
                    "{mode} / {scenario}: {:.0}% of users sent to log in, session loss {:.2}%, \
                     {} lost writes ({:.0}% of users)",
                    r.users_sent_to_login * 100.0,
                    r.session_loss * 100.0,
                    r.lost_writes,
                    r.users_lost_writes * 100.0
                ));
            }
        }
    }
    failures
}

#[test]
fn shared_store_modes_lose_no_session_and_no_write_when_backends_come_and_go() {
    let scenarios: Vec<Scenario> = Scenario::ALL
        .into_iter()
        .filter(|s| s.session_tier() == bench::cluster::SessionTier::One)
        .filter(|s| *s != Scenario::StoreOutage)
        .collect();
    let failures = store_mode_losses(&scenarios);
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Two session servers on one store (a private Redis here), both given to every backend and to
/// the proxy: when one dies, the clients go on with the other. No user is sent to log in and no
/// acknowledged item is lost, in every store mode: a write the dying server applied without
/// answering is recognised by its write id (README, "A write left in doubt").
#[test]
fn two_session_servers_lose_no_session_and_no_write_when_one_dies() {
    if !can_run(
        "two_session_servers_lose_no_session_and_no_write_when_one_dies",
        Scenario::SessionServerDies,
    ) {
        return;
    }
    let mut failures = Vec::new();
    for mode in STORE_MODES {
        let r = row(mode, Scenario::SessionServerDies);
        assert!(r.requests >= MIN_REQUESTS, "{mode} barely ran: {r:?}");
        if r.users_sent_to_login != 0.0 || r.session_loss != 0.0 {
            failures.push(format!("{mode}: users sent to log in: {r:?}"));
        }
        if r.lost_writes != 0 {
            failures.push(format!("{mode}: {} lost writes: {r:?}", r.lost_writes));
        }
        // The survivor answers: at most the request a user had in flight at the kill fails.
        // (With the dead server alone, `rr-store` answers 503 to every request from then on.)
        if r.errors > USERS as u64 {
            failures.push(format!(
                "{mode}: {} errors with a session server left",
                r.errors
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// The Redis primary dies and Sentinel promotes the replica: the session servers follow the
/// Sentinel to the new primary. No store mode sends a user to log in or loses an acknowledged
/// item: the plain shared store answers 503 until the promotion; the fallback modes serve the
/// failover from snapshots and push the offline changes back after it, also over a write the
/// dying primary applied without answering (its write id makes it the snapshot's own base).
#[test]
fn a_redis_failover_loses_no_session_and_no_acknowledged_write() {
    if !can_run(
        "a_redis_failover_loses_no_session_and_no_acknowledged_write",
        Scenario::StoreFailover,
    ) {
        return;
    }
    let mut failures = Vec::new();
    for mode in STORE_MODES {
        let r = row(mode, Scenario::StoreFailover);
        assert!(r.requests >= MIN_REQUESTS, "{mode} barely ran: {r:?}");
        if (r.users_sent_to_login, r.session_loss, r.lost_writes) != (0.0, 0.0, 0) {
            failures.push(format!("{mode}: {r:?}"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn cookie_fallback_loses_nothing_when_the_store_goes_down_and_comes_back_empty() {
    let r = row(Mode::RrStoreFallback, Scenario::StoreOutage);
    assert!(r.requests >= MIN_REQUESTS, "barely ran: {r:?}");
    assert_eq!((r.session_loss, r.lost_writes), (0.0, 0), "{r:?}");
    // Without the fallback the same outage loses the carts (the memory store restarts empty,
    // and every cart is read once it is back): whatever was acknowledged before the outage.
    let plain = row(Mode::RrStore, Scenario::StoreOutage);
    assert!(plain.lost_writes > 0, "{plain:?}");
}

#[test]
fn round_robin_with_sessions_in_each_backend_loses_most_sessions() {
    let r = row(Mode::RrLocal, Scenario::Steady);
    assert!(r.requests >= MIN_REQUESTS, "barely ran: {r:?}");
    // Two requests in three land on a backend that never saw the login (measured: ~67%).
    assert!(r.session_loss > 0.4, "{r:?}");
    assert!(r.lost_writes > 0, "{r:?}");
    // And it hits nearly everyone: a user who makes a few requests is all but sure to meet
    // another backend (measured: every user).
    assert!(r.users_sent_to_login > 0.5, "{r:?}");
}

#[test]
fn ip_hash_sends_every_user_behind_a_middle_proxy_to_one_backend() {
    let r = row(Mode::IpHash, Scenario::MiddleProxy);
    assert!(r.requests >= MIN_REQUESTS, "barely ran: {r:?}");
    // All on one of three: max/mean = 3, Jain's index 1/3, whatever the load.
    assert!(r.load_max_over_mean > 2.5, "{r:?}");
    assert!(r.jain < 0.4, "{r:?}");
}

#[test]
fn ip_hash_and_sticky_cookies_lose_the_dead_backends_users() {
    for mode in [Mode::IpHash, Mode::StickyCookie] {
        let r = row(mode, Scenario::BackendDies);
        // About a third of the users are on s2 when it dies: each loses its session on its
        // next request, and the items it had acknowledged.
        assert!(r.session_loss > 0.0, "{r:?}");
        assert!(r.lost_writes > 0, "{r:?}");
        assert!(r.users_sent_to_login > 0.0, "{r:?}");
        assert!(r.users_lost_writes > 0.0, "{r:?}");
    }
}

/// The store goes away and comes back empty (memory store): the proxy serves sessions from the
/// signed snapshots meanwhile and pushes them back with `Restore` once the store answers again;
/// the demo app refreshes the snapshot after its own writes, so no acknowledged item is lost.
#[test]
fn proxy_lookup_with_snapshots_loses_nothing_when_the_store_goes_down() {
    let bins = Binaries::locate().unwrap_or_else(|e| panic!("{e}"));
    assert!(
        bins.proxy_snapshot_key,
        "session-proxy has no --session-snapshot-key"
    );
    let rows = run(&[(Mode::ProxyLookup, Scenario::StoreOutage)]).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        rows[0].requests >= MIN_REQUESTS,
        "barely ran: {:?}",
        rows[0]
    );
    assert_eq!(
        (rows[0].session_loss, rows[0].lost_writes),
        (0.0, 0),
        "{:?}",
        rows[0]
    );
}
