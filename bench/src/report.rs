//! One row of results per (mode, scenario): made from the users' reports, printed as Markdown
//! (the full table, one line per run, and the summary, one line per mode and one column per
//! scenario), written as JSON.
//!
//! What a user feels comes first: the share of *users* the site sent back to its login page at
//! least once, and the share who lost a cart item it had acknowledged. The share of *requests*
//! answered "please log in" comes second: it hides how many people were hit (one loss per user
//! is a small share of requests, yet every user had to log in again).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::scenarios::Scenario;
use crate::users::UserReport;

/// The measures of one (mode, scenario) run. Serialised as the `--json` array's elements.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    /// Routing mode name.
    pub mode: String,
    /// Scenario name.
    pub scenario: String,
    /// Simulated users.
    pub users: u64,
    /// Share of the users (0..=1) sent back to the login page at least once: the site forgot
    /// them although they were logged in.
    pub users_sent_to_login: f64,
    /// Share of the users (0..=1) who lost at least one cart item acknowledged with a 200.
    pub users_lost_writes: f64,
    /// Requests made (logins included).
    pub requests: u64,
    /// Share of a logged-in user's requests answered as if the user were not logged in
    /// (0..=1).
    pub session_loss: f64,
    /// Cart items acknowledged with a 200 and missing at the end.
    pub lost_writes: u64,
    /// Busiest backend's answers over the mean per backend (1 = even; N = all on one of N).
    pub load_max_over_mean: f64,
    /// Jain's fairness index of answers per backend (1 = even, 1/N = all on one).
    pub jain: f64,
    /// Median latency, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile latency, milliseconds.
    pub p99_ms: f64,
    /// Requests per second over the run.
    pub rps: f64,
    /// 5xx answers and failed requests.
    pub errors: u64,
}

impl Row {
    /// Aggregates the users of one run. `backends`: every backend configured during the run
    /// (one that served nothing counts as a zero); `elapsed`: how long the load ran.
    pub fn from_reports(
        mode: &str,
        scenario: &str,
        reports: &[UserReport],
        backends: &[String],
        elapsed: Duration,
    ) -> Row {
        let sum = |f: fn(&UserReport) -> u64| reports.iter().map(f).sum::<u64>();
        let requests = sum(|r| r.requests);
        let session_requests = sum(|r| r.session_requests);
        let losses = sum(|r| r.session_losses);
        let lost_writes = sum(lost_items);
        let users = reports.len() as u64;
        let share = |hit: fn(&UserReport) -> bool| {
            ratio(
                reports.iter().filter(|r| hit(r)).count() as f64,
                users as f64,
            )
        };
        let mut served: HashMap<&str, u64> = backends.iter().map(|b| (b.as_str(), 0)).collect();
        for report in reports {
            for (backend, count) in &report.served {
                *served.entry(backend.as_str()).or_default() += count;
            }
        }
        let loads: Vec<f64> = served.values().map(|&n| n as f64).collect();
        let mut latency =
            Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds");
        for report in reports {
            // Same bounds everywhere, so adding cannot fail.
            let _ = latency.add(&report.latency);
        }
        let ms = |q: f64| {
            if latency.is_empty() {
                0.0
            } else {
                latency.value_at_quantile(q) as f64 / 1000.0
            }
        };
        Row {
            mode: mode.to_owned(),
            scenario: scenario.to_owned(),
            users,
            users_sent_to_login: share(|r| r.session_losses > 0),
            users_lost_writes: share(|r| lost_items(r) > 0),
            requests,
            session_loss: ratio(losses as f64, session_requests as f64),
            lost_writes,
            load_max_over_mean: max_over_mean(&loads),
            jain: jain(&loads),
            p50_ms: ms(0.5),
            p99_ms: ms(0.99),
            rps: ratio(requests as f64, elapsed.as_secs_f64()),
            errors: sum(|r| r.errors),
        }
    }
}

/// Acknowledged items of one user missing at the end. A cart that could not be read counts all
/// of them as lost: the user cannot see them either.
fn lost_items(report: &UserReport) -> u64 {
    report.missing.unwrap_or(report.acked.len() as u64)
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

/// The largest load over the mean load (0 when nothing was served).
pub fn max_over_mean(loads: &[f64]) -> f64 {
    let total: f64 = loads.iter().sum();
    let max = loads.iter().copied().fold(0.0, f64::max);
    ratio(max, total / loads.len().max(1) as f64)
}

/// Jain's fairness index, (Σx)² / (n·Σx²): 1 when even, 1/n when one takes all (1 when
/// nothing was served).
pub fn jain(loads: &[f64]) -> f64 {
    let total: f64 = loads.iter().sum();
    let squares: f64 = loads.iter().map(|x| x * x).sum();
    if squares == 0.0 {
        1.0
    } else {
        total * total / (loads.len() as f64 * squares)
    }
}

/// The rows as a Markdown table, one line per run, every measure.
pub fn markdown(rows: &[Row]) -> String {
    let mut out = String::from(
        "| mode | scenario | users sent to login | users lost items | requests | session loss \
         | lost writes | load max/mean | Jain | p50 ms | p99 ms | req/s | errors |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {:.0}% | {:.0}% | {} | {:.1}% | {} | {:.2} | {:.3} | {:.1} | {:.1} | \
             {:.0} | {} |",
            r.mode,
            r.scenario,
            r.users_sent_to_login * 100.0,
            r.users_lost_writes * 100.0,
            r.requests,
            r.session_loss * 100.0,
            r.lost_writes,
            r.load_max_over_mean,
            r.jain,
            r.p50_ms,
            r.p99_ms,
            r.rps,
            r.errors
        );
    }
    out
}

/// What a cell of [`summary`] says, as a line to print above it.
pub const SUMMARY_LEGEND: &str = "Each cell: users sent back to the login page at least once \
     / a logged-in user's requests answered \"please log in\" / acknowledged cart items lost \
     (middle-proxy also: busiest backend's load over the mean).";

/// The rows as the summary table: one line per mode, one column per scenario (in the order
/// they first appear), each cell `35% users / 0.4% req / 73 items` (see [`SUMMARY_LEGEND`]);
/// `middle-proxy` cells add the load spread, what that scenario is about. A pair without a
/// row is `–`.
pub fn summary(rows: &[Row]) -> String {
    let mut modes: Vec<&str> = Vec::new();
    let mut scenarios: Vec<&str> = Vec::new();
    for r in rows {
        if !modes.contains(&r.mode.as_str()) {
            modes.push(&r.mode);
        }
        if !scenarios.contains(&r.scenario.as_str()) {
            scenarios.push(&r.scenario);
        }
    }
    let mut out = String::from("| mode \\ scenario |");
    for scenario in &scenarios {
        let _ = write!(out, " {scenario} |");
    }
    out.push_str("\n|---|");
    out.push_str(&"---:|".repeat(scenarios.len()));
    out.push('\n');
    for mode in &modes {
        let _ = write!(out, "| `{mode}` |");
        for scenario in &scenarios {
            let cell = rows
                .iter()
                .find(|r| r.mode == *mode && r.scenario == *scenario)
                .map_or_else(|| "–".to_owned(), summary_cell);
            let _ = write!(out, " {cell} |");
        }
        out.push('\n');
    }
    out
}

/// One cell of [`summary`].
fn summary_cell(r: &Row) -> String {
    let mut cell = format!(
        "{:.0}% users / {:.1}% req / {} items",
        r.users_sent_to_login * 100.0,
        r.session_loss * 100.0,
        r.lost_writes
    );
    if r.scenario == Scenario::MiddleProxy.name() {
        let _ = write!(cell, " (load {:.2}×)", r.load_max_over_mean);
    }
    cell
}

/// The rows as a JSON array (pretty-printed).
pub fn json(rows: &[Row]) -> String {
    serde_json::to_string_pretty(rows).unwrap_or_else(|_| "[]".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn even_load_is_fair_and_one_backend_taking_all_is_not() {
        assert_eq!(jain(&[5.0, 5.0, 5.0]), 1.0);
        assert_eq!(max_over_mean(&[5.0, 5.0, 5.0]), 1.0);
        assert!((jain(&[9.0, 0.0, 0.0]) - 1.0 / 3.0).abs() < 1e-9);
        assert_eq!(max_over_mean(&[9.0, 0.0, 0.0]), 3.0);
        assert_eq!(jain(&[0.0, 0.0]), 1.0);
    }

    /// A user's report: `losses` times forgotten, `acked` items acknowledged, `missing` of
    /// them gone at the end (`None`: the final cart read failed).
    fn user(losses: u64, acked: usize, missing: Option<u64>) -> UserReport {
        let mut latency = Histogram::new_with_bounds(1, 60_000_000, 3).unwrap();
        latency.record(2_000).unwrap();
        UserReport {
            requests: 10,
            session_requests: 8,
            session_losses: losses,
            errors: 1,
            acked: (0..acked).map(|i| format!("i{i}")).collect(),
            missing,
            served: [("s1".to_owned(), 9)].into(),
            latency,
        }
    }

    fn backends() -> [String; 3] {
        ["s1".to_owned(), "s2".to_owned(), "s3".to_owned()]
    }

    #[test]
    fn rows_aggregate_users_and_count_idle_backends() {
        let u = user(2, 2, Some(1));
        let row = Row::from_reports(
            "m",
            "s",
            &[u.clone(), u],
            &backends(),
            Duration::from_secs(2),
        );
        assert_eq!(row.users, 2);
        assert_eq!(row.requests, 20);
        assert_eq!(row.session_loss, 0.25);
        assert_eq!(row.lost_writes, 2);
        assert_eq!(row.load_max_over_mean, 3.0);
        assert_eq!(row.rps, 10.0);
        assert_eq!(row.errors, 2);
        assert!((row.p50_ms - 2.0).abs() < 0.01);
        let json = json(std::slice::from_ref(&row));
        for key in [
            "mode",
            "users",
            "users_sent_to_login",
            "users_lost_writes",
            "session_loss",
            "load_max_over_mean",
            "p99_ms",
            "rps",
        ] {
            assert!(
                json.contains(&format!("\"{key}\"")),
                "{key} missing from {json}"
            );
        }
    }

    /// One user forgotten ten times weighs as much as one forgotten once: the user shares
    /// count people, the request share counts requests.
    #[test]
    fn user_shares_count_people_hit_at_least_once_not_how_often() {
        let reports = [
            user(10, 3, Some(0)), // forgotten often, lost nothing
            user(1, 3, Some(2)),  // forgotten once, lost two items
            user(0, 3, Some(0)),  // untouched
            user(0, 3, None),     // its cart could not be read: all three count as lost
            user(0, 0, None),     // acknowledged nothing: nothing to lose
        ];
        let row = Row::from_reports("m", "s", &reports, &backends(), Duration::from_secs(1));
        assert_eq!(row.users, 5);
        assert_eq!(row.users_sent_to_login, 2.0 / 5.0);
        assert_eq!(row.users_lost_writes, 2.0 / 5.0);
        assert_eq!(row.lost_writes, 5);
        assert_eq!(row.session_loss, 11.0 / 40.0);
        let nobody = Row::from_reports("m", "s", &[], &backends(), Duration::from_secs(1));
        assert_eq!(
            (nobody.users_sent_to_login, nobody.users_lost_writes),
            (0.0, 0.0)
        );
    }

    #[test]
    fn the_summary_puts_users_first_one_line_per_mode_one_column_per_scenario() {
        let mut rows = Vec::new();
        for (mode, losses) in [("rr-local", 3), ("rr-store", 0)] {
            for scenario in ["steady", "middle-proxy"] {
                let reports = [user(losses, 4, Some(losses)), user(0, 4, Some(0))];
                rows.push(Row::from_reports(
                    mode,
                    scenario,
                    &reports,
                    &backends(),
                    Duration::from_secs(1),
                ));
            }
        }
        rows.pop(); // rr-store / middle-proxy not run
        let table = summary(&rows);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[0], "| mode \\ scenario | steady | middle-proxy |");
        assert_eq!(lines[1], "|---|---:|---:|");
        assert_eq!(
            lines[2],
            "| `rr-local` | 50% users / 18.8% req / 3 items | \
             50% users / 18.8% req / 3 items (load 3.00×) |"
        );
        assert_eq!(
            lines[3],
            "| `rr-store` | 0% users / 0.0% req / 0 items | – |"
        );
        assert_eq!(lines.len(), 4);
        let full = markdown(&rows);
        assert!(
            full.lines()
                .nth(2)
                .unwrap()
                .starts_with("| rr-local | steady | 50% | 50% | 20 |"),
            "{full}"
        );
    }
}
