//! One row of results per (mode, scenario): made from the users' reports, printed as a
//! Markdown table, written as JSON.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::users::UserReport;

/// The measures of one (mode, scenario) run. Serialised as the `--json` array's elements.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    /// Routing mode name.
    pub mode: String,
    /// Scenario name.
    pub scenario: String,
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
        // A cart that could not be read at the end counts all its acknowledged items as lost:
        // the user cannot see them either.
        let lost_writes = sum(|r| r.missing.unwrap_or(r.acked.len() as u64));
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

/// The rows as a Markdown table.
pub fn markdown(rows: &[Row]) -> String {
    let mut out = String::from(
        "| mode | scenario | requests | session loss | lost writes | load max/mean | Jain | \
         p50 ms | p99 ms | req/s | errors |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.1}% | {} | {:.2} | {:.3} | {:.1} | {:.1} | {:.0} | {} |",
            r.mode,
            r.scenario,
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

    #[test]
    fn rows_aggregate_users_and_count_idle_backends() {
        let mut latency = Histogram::new_with_bounds(1, 60_000_000, 3).unwrap();
        latency.record(2_000).unwrap();
        let user = UserReport {
            requests: 10,
            session_requests: 8,
            session_losses: 2,
            errors: 1,
            acked: vec!["i1".into(), "i2".into()],
            missing: Some(1),
            served: [("s1".to_owned(), 9)].into(),
            latency,
        };
        let backends = ["s1".to_owned(), "s2".to_owned(), "s3".to_owned()];
        let row = Row::from_reports(
            "m",
            "s",
            &[user.clone(), user],
            &backends,
            Duration::from_secs(2),
        );
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
            "session_loss",
            "load_max_over_mean",
            "p99_ms",
            "rps",
        ] {
            assert!(json.contains(key), "{key} missing from {json}");
        }
    }
}
