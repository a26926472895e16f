//! The honest users of a soak: each one its own HTTP client (one keep-alive connection, its
//! own cookie jar) in a closed loop through the proxy. A user logs in, then repeats `GET /me`,
//! `POST /cart/add`, `GET /cart` [`ROUNDS`] times, logs out and starts over (the demo caps a
//! cart at 100 items).
//!
//! Every answer is expected to be a 2xx; anything else is an error, counted by kind: a
//! status (`401` is a session the proxy failed to resolve, `408`/`503`/`504` a limit that
//! fell on an honest user), `timeout` (no answer within [`REQUEST_TIMEOUT`]) or `connect`
//! (a failed connection or a cut response). A 401 sends the user back to log in. Latencies
//! are those of the answered requests, errors included.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::time::Instant;

use super::SoakError;

/// `GET /me`, `POST /cart/add`, `GET /cart` rounds of one login: 30 items, well under the
/// demo's 100.
const ROUNDS: usize = 30;
/// Bound on one request: far above any healthy answer; one that takes longer is an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// What the honest users of one phase saw.
#[derive(Debug, Clone, Serialize)]
pub struct HonestReport {
    /// Requests made (logins and logouts included).
    pub requests: u64,
    /// Requests answered with anything but a 2xx, or not answered.
    pub errors: u64,
    /// `errors / requests` (0 without requests).
    pub error_rate: f64,
    /// Errors by kind: a status code, `timeout` or `connect`.
    pub error_kinds: BTreeMap<String, u64>,
    /// Requests per second over the phase.
    pub rps: f64,
    /// Median latency, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile latency, milliseconds.
    pub p99_ms: f64,
    /// Slowest answer, milliseconds.
    pub max_ms: f64,
}

/// What one user counted.
struct Tally {
    requests: u64,
    errors: BTreeMap<String, u64>,
    /// Microseconds, 1 µs to 60 s.
    latency: Histogram<u64>,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            requests: 0,
            errors: BTreeMap::new(),
            latency: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds"),
        }
    }

    fn error(&mut self, kind: String) {
        *self.errors.entry(kind).or_default() += 1;
    }
}

/// Runs `concurrency` users against `base` for `duration`; `phase` names their logins.
pub(crate) async fn run(
    base: &str,
    concurrency: usize,
    duration: Duration,
    phase: &str,
) -> Result<HonestReport, SoakError> {
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::with_capacity(concurrency);
    for index in 0..concurrency {
        let client = reqwest::Client::builder()
            .no_proxy()
            .cookie_store(true)
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|e| SoakError::Harness(format!("building an HTTP client: {e}")))?;
        let user = User {
            name: format!("soak-{phase}-u{index}"),
            base: base.to_owned(),
            client,
            tally: Tally::new(),
        };
        tasks.push(tokio::spawn(user.run(deadline)));
    }
    let mut total = Tally::new();
    for task in tasks {
        let tally = task
            .await
            .map_err(|e| SoakError::Harness(format!("an honest user failed: {e}")))?;
        total.requests += tally.requests;
        for (kind, count) in tally.errors {
            *total.errors.entry(kind).or_default() += count;
        }
        // Same bounds on both sides: adding cannot fail.
        let _ = total.latency.add(&tally.latency);
    }
    let elapsed = started.elapsed().as_secs_f64().max(1e-9);
    let errors: u64 = total.errors.values().sum();
    let ms = |micros: u64| micros as f64 / 1000.0;
    let latency = &total.latency;
    let quantile = |q: f64| {
        if latency.is_empty() {
            0.0
        } else {
            ms(latency.value_at_quantile(q))
        }
    };
    Ok(HonestReport {
        requests: total.requests,
        errors,
        error_rate: if total.requests == 0 {
            0.0
        } else {
            errors as f64 / total.requests as f64
        },
        error_kinds: total.errors,
        rps: total.requests as f64 / elapsed,
        p50_ms: quantile(0.5),
        p99_ms: quantile(0.99),
        max_ms: if latency.is_empty() {
            0.0
        } else {
            ms(latency.max())
        },
    })
}

/// One honest user.
struct User {
    /// Its login name.
    name: String,
    /// The proxy, `http://host:port`.
    base: String,
    /// Its connection and cookie jar.
    client: reqwest::Client,
    /// What it saw.
    tally: Tally,
}

/// Whether a request was answered with a 2xx, answered otherwise, or not at all.
#[derive(PartialEq)]
enum Outcome {
    Ok,
    Unauthorized,
    Failed,
}

impl User {
    /// Logs in, shops, logs out, again, until `deadline`.
    async fn run(mut self, deadline: Instant) -> Tally {
        'login: while Instant::now() < deadline {
            let login = self
                .client
                .post(format!("{}/login", self.base))
                .form(&[("user", self.name.as_str())]);
            if self.send(login).await != Outcome::Ok {
                continue;
            }
            for round in 0..ROUNDS {
                if Instant::now() >= deadline {
                    break 'login;
                }
                let me = self.client.get(format!("{}/me", self.base));
                let item = format!("r{round}");
                let add = self
                    .client
                    .post(format!("{}/cart/add", self.base))
                    .form(&[("item", item.as_str())]);
                let cart = self.client.get(format!("{}/cart", self.base));
                for request in [me, add, cart] {
                    if self.send(request).await == Outcome::Unauthorized {
                        continue 'login;
                    }
                }
            }
            let logout = self.client.post(format!("{}/logout", self.base));
            self.send(logout).await;
        }
        self.tally
    }

    /// Sends one request, reads its body, counts it.
    async fn send(&mut self, request: reqwest::RequestBuilder) -> Outcome {
        self.tally.requests += 1;
        let sent = Instant::now();
        let result = async {
            let response = request.send().await?;
            let status = response.status();
            response.bytes().await?;
            Ok::<_, reqwest::Error>(status)
        }
        .await;
        let micros = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
        match result {
            Ok(status) => {
                let _ = self.tally.latency.record(micros.max(1));
                if status.is_success() {
                    return Outcome::Ok;
                }
                self.tally.error(status.as_u16().to_string());
                if status == reqwest::StatusCode::UNAUTHORIZED {
                    Outcome::Unauthorized
                } else {
                    Outcome::Failed
                }
            }
            Err(error) => {
                tracing::debug!(user = %self.name, %error, "honest request failed");
                let kind = if error.is_timeout() {
                    "timeout"
                } else {
                    "connect"
                };
                self.tally.error(kind.to_owned());
                // A failed connection is tried again at once by the next request; a short
                // pause keeps a proxy that refuses everything from being hammered.
                tokio::time::sleep(Duration::from_millis(10)).await;
                Outcome::Failed
            }
        }
    }
}
