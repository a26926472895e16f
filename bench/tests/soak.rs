//! The soak (issue 13) in small: a cluster of the project's own binaries (session server with
//! scoped tokens, two `demo-app --sessions proxy`, `session-proxy` with the lookup plugin)
//! under 2 s of honest traffic, then 2 s of the same traffic beside 20 slowloris connections,
//! 5 slow uploaders and 50 watchers against a limit of 20. The proxy's slow-client limits are
//! set to 1 s so that the attackers are cut within the phase.
//!
//! It asserts what must hold whatever the machine's speed: no backend marked down, honest
//! errors under 1%, and that every attacker really ran (connections opened, cut, refused).
//! Nothing here needs a service from outside; the binaries come from `target/<profile>/`
//! (built first when missing).

use std::time::Duration;

use bench::Binaries;
use bench::soak::{self, SoakSettings};

/// The Watch flood's limit, below its 50 watchers.
const WATCH_LIMIT: usize = 20;

#[test]
fn hostile_clients_cost_honest_users_under_one_percent_and_take_no_backend_down() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let bins = Binaries::locate().unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::Builder::new()
        .prefix("stickless-soak-test-")
        .tempdir()
        .expect("a directory for the logs");
    let mut settings = SoakSettings::new(bins, dir.path().to_owned());
    settings.baseline = Duration::from_secs(2);
    settings.attack = Duration::from_secs(2);
    settings.concurrency = 4;
    settings.slowloris = 20;
    settings.slowloris_interval = Duration::from_millis(200);
    settings.slow_uploaders = 5;
    settings.upload_interval = Duration::from_millis(200);
    settings.watchers = 50;
    settings.watch_connections = 2;
    settings.max_watchers_per_namespace = WATCH_LIMIT;
    settings.header_read_timeout = Duration::from_secs(1);
    settings.body_read_timeout = Duration::from_secs(1);

    let report = match runtime.block_on(soak::run(&settings)) {
        Ok(report) => report,
        Err(error) => panic!("{error} (logs in {})", dir.keep().display()),
    };
    let markdown = report.markdown();
    eprintln!("{markdown}");

    let mut problems = report.failures();
    let mut check = |holds: bool, what: &str| {
        if !holds {
            problems.push(what.to_owned());
        }
    };
    check(
        report.backends_seen_down.is_empty() && report.backends_down_at_end.is_empty(),
        "a backend was marked down",
    );
    check(
        report.baseline.requests > 0 && report.attack.requests > 0,
        "the honest users made no request in a phase",
    );
    check(
        report.attack.error_rate < 0.01,
        "honest errors under attack reached 1%",
    );
    check(
        report.slowloris.opened >= 20,
        "fewer slowloris connections were opened than asked for",
    );
    check(
        report.slowloris.cut >= 1,
        "no slowloris connection was cut by --header-read-timeout",
    );
    check(
        report.uploads.opened >= 5,
        "fewer slow uploads were started than asked for",
    );
    check(
        report.uploads.answered_408 + report.uploads.cut_without_answer >= 1,
        "no slow upload was ended by the proxy",
    );
    check(
        report.watch.refused >= 1,
        "no Watch was refused although 50 watchers met a limit of 20",
    );
    check(
        report.watch.peak_open <= WATCH_LIMIT,
        "more Watch streams were open at once than the limit",
    );
    if !problems.is_empty() {
        panic!(
            "{}\n{markdown}\n(logs in {})",
            problems.join("\n"),
            dir.keep().display()
        );
    }
}
