//! Simulated users. Each one is its own HTTP client with its own cookie jar and its own
//! client address, sent as `X-Forwarded-For` (the proxy trusts the harness as a forwarding
//! proxy, so `ip-hash` sees many clients while everything stays on loopback).
//!
//! A user logs in under a unique name, then alternates `GET /me` and `POST /cart/add` with
//! think time, until the run's deadline (which a scenario may push back while it runs) or its
//! request budget is used up. It counts:
//! - a **session loss** each time the site forgets it although it was logged in: `/me`
//!   answered 401, or `/cart/add` answered from a new session (a fresh `sid` cookie, or a cart
//!   without the items this session already acknowledged). Like a real user it then logs in
//!   again;
//! - **errors**: 5xx answers and failed connections (not losses: the site said "try again",
//!   it did not forget anyone);
//! - every cart item acknowledged with a 200, checked at the end against `GET /cart`
//!   ([`verify`]): acknowledged items that are missing are **lost writes**.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::time::Duration;

use hdrhistogram::Histogram;
use reqwest::StatusCode;
use tokio::sync::watch;
use tokio::time::Instant;

/// Most items a user keeps in one session's cart: the demo refuses more than 100.
const CART_LIMIT: usize = 90;
/// Bound on one request: far above any healthy answer, short enough not to stall a run.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// Tries of the final cart read, and the pause between them (a front may be reconfiguring).
const VERIFY_TRIES: usize = 20;
/// See [`VERIFY_TRIES`].
const VERIFY_PAUSE: Duration = Duration::from_millis(100);

/// How simulated users' client addresses are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Addressing {
    /// Each user its own address, each in its own /24 (ip-hash looks at three octets).
    Distinct,
    /// Every user behind one middle proxy: one address for all.
    OneProxy,
    /// Users behind this many NAT addresses (user `i` behind address `i % n`).
    Nat(u8),
}

impl Addressing {
    /// The address of user `user`.
    pub fn address(self, user: usize) -> Ipv4Addr {
        match self {
            Addressing::Distinct => {
                let n = u32::try_from(user).unwrap_or(u32::MAX) % (200 * 250);
                Ipv4Addr::new(10, 1 + (n / 250) as u8, (n % 250) as u8, 7)
            }
            Addressing::OneProxy => Ipv4Addr::new(10, 250, 0, 1),
            Addressing::Nat(n) => Ipv4Addr::new(10, 240, (user % usize::from(n.max(1))) as u8, 1),
        }
    }
}

/// The load of one run.
#[derive(Debug, Clone)]
pub struct LoadSettings {
    /// Number of simulated users.
    pub users: usize,
    /// Most requests one user makes.
    pub max_requests: usize,
    /// Mean pause between two requests of one user (jittered ±50%).
    pub think: Duration,
    /// Their client addresses.
    pub addressing: Addressing,
    /// Makes user names unique across runs (`<tag>-u<i>`).
    pub tag: String,
}

/// What one user saw.
#[derive(Debug, Clone)]
pub struct UserReport {
    /// Requests made (logins included, the final cart read not).
    pub requests: u64,
    /// Requests made while logged in (`/me`, `/cart/add`): the ones that can lose a session.
    pub session_requests: u64,
    /// Times the site forgot this logged-in user.
    pub session_losses: u64,
    /// 5xx answers and failed requests.
    pub errors: u64,
    /// Cart items acknowledged with a 200.
    pub acked: Vec<String>,
    /// Acknowledged items missing from the final cart (`None`: the cart could not be read).
    pub missing: Option<u64>,
    /// Answers per backend (`x-served-by`).
    pub served: HashMap<String, u64>,
    /// Latency of every answered request, in microseconds.
    pub latency: Histogram<u64>,
}

/// One user during a run.
#[derive(Debug)]
pub struct SimUser {
    /// Unique login name.
    name: String,
    /// Sent as `X-Forwarded-For`.
    address: String,
    /// Its own connection pool and cookie jar.
    client: reqwest::Client,
    /// Logged in, as far as the user knows.
    logged_in: bool,
    /// Items acknowledged in the current session.
    session_items: HashSet<String>,
    /// Counter of item names.
    next_item: u64,
    /// Jitter source.
    rng: SplitMix,
    /// When the run's load began (for log lines).
    started: Instant,
    /// What it saw.
    report: UserReport,
}

/// An answer as the user sees it.
struct Answer {
    status: StatusCode,
    new_sid: bool,
    body: Vec<u8>,
}

impl SimUser {
    /// User `index` of a run.
    fn new(index: usize, settings: &LoadSettings) -> Result<SimUser, reqwest::Error> {
        let client = reqwest::Client::builder()
            .cookie_store(true)
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(Duration::from_secs(1))
            .build()?;
        // 1 µs to 60 s at 3 significant digits: constant, valid bounds.
        let latency = Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds");
        Ok(SimUser {
            name: format!("{}-u{index}", settings.tag),
            address: settings.addressing.address(index).to_string(),
            client,
            logged_in: false,
            session_items: HashSet::new(),
            next_item: 0,
            rng: SplitMix(0x5eed ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
            started: Instant::now(),
            report: UserReport {
                requests: 0,
                session_requests: 0,
                session_losses: 0,
                errors: 0,
                acked: Vec::new(),
                missing: None,
                served: HashMap::new(),
                latency,
            },
        })
    }

    /// Sends one request; `None` for a failed one (counted as an error).
    async fn send(&mut self, request: reqwest::RequestBuilder) -> Option<Answer> {
        let started = Instant::now();
        let result = request
            .header("x-forwarded-for", &self.address)
            .send()
            .await;
        let response = match result {
            Ok(response) => response,
            Err(error) => {
                tracing::debug!(user = %self.name, %error, "request failed");
                self.report.errors += 1;
                return None;
            }
        };
        let status = response.status();
        if let Some(backend) = response
            .headers()
            .get("x-served-by")
            .and_then(|v| v.to_str().ok())
        {
            *self.report.served.entry(backend.to_owned()).or_default() += 1;
        }
        let new_sid = response
            .headers()
            .get_all(reqwest::header::SET_COOKIE)
            .iter()
            .any(|v| v.as_bytes().starts_with(b"sid="));
        let body = match response.bytes().await {
            Ok(body) => body.to_vec(),
            Err(_) => {
                self.report.errors += 1;
                return None;
            }
        };
        let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let _ = self.report.latency.record(micros.max(1));
        if status.is_server_error() {
            self.report.errors += 1;
        }
        Some(Answer {
            status,
            new_sid,
            body,
        })
    }

    async fn login(&mut self, base: &str) {
        let request = self
            .client
            .post(format!("{base}/login"))
            .form(&[("user", self.name.as_str())]);
        if let Some(answer) = self.send(request).await
            && answer.status == StatusCode::OK
        {
            self.logged_in = true;
            self.session_items.clear();
        }
    }

    async fn me(&mut self, base: &str) {
        self.report.session_requests += 1;
        let request = self.client.get(format!("{base}/me"));
        if let Some(answer) = self.send(request).await
            && answer.status == StatusCode::UNAUTHORIZED
        {
            self.lost("GET /me answered 401");
        }
    }

    async fn add_to_cart(&mut self, base: &str) {
        self.report.session_requests += 1;
        self.next_item += 1;
        let item = format!("i{}", self.next_item);
        let request = self
            .client
            .post(format!("{base}/cart/add"))
            .form(&[("item", item.as_str())]);
        let Some(answer) = self.send(request).await else {
            return;
        };
        if answer.status != StatusCode::OK {
            return;
        }
        self.report.acked.push(item.clone());
        let items = cart_items(&answer.body).unwrap_or_default();
        let kept_all = self.session_items.iter().all(|i| items.contains(i));
        if answer.new_sid {
            self.lost("POST /cart/add answered from a new session");
        } else if !kept_all {
            self.lost("POST /cart/add answered with a cart missing acknowledged items");
        } else {
            self.session_items.insert(item);
        }
    }

    /// The site forgot this user: count it; the user will log in again.
    fn lost(&mut self, how: &str) {
        tracing::debug!(
            user = %self.name,
            at = ?self.started.elapsed(),
            how,
            "session lost"
        );
        self.report.session_losses += 1;
        self.logged_in = false;
    }

    /// Requests until the deadline (read before each request) or the budget is spent.
    async fn run(
        mut self,
        base: String,
        settings: LoadSettings,
        deadline: watch::Receiver<Instant>,
    ) -> SimUser {
        self.started = Instant::now();
        // Spread the users' first requests over one think time, so they do not march in step.
        let first = settings.think.mul_f64(self.rng.unit());
        tokio::time::sleep(first).await;
        while Instant::now() < *deadline.borrow()
            && self.report.requests < settings.max_requests as u64
        {
            self.report.requests += 1;
            if !self.logged_in {
                self.login(&base).await;
            } else if self.rng.unit() < 0.5 && self.session_items.len() < CART_LIMIT {
                self.add_to_cart(&base).await;
            } else {
                self.me(&base).await;
            }
            let think = settings.think.mul_f64(0.5 + self.rng.unit());
            tokio::time::sleep(think).await;
        }
        self
    }

    /// Reads the cart and counts acknowledged items missing from it.
    async fn verify(mut self, base: &str) -> UserReport {
        for _ in 0..VERIFY_TRIES {
            let request = self
                .client
                .get(format!("{base}/cart"))
                .header("x-forwarded-for", &self.address);
            if let Ok(response) = request.send().await
                && response.status() == StatusCode::OK
                && let Ok(body) = response.bytes().await
                && let Some(items) = cart_items(&body)
            {
                let missing = self.report.acked.iter().filter(|i| !items.contains(*i));
                self.report.missing = Some(missing.count() as u64);
                return self.report;
            }
            tokio::time::sleep(VERIFY_PAUSE).await;
        }
        tracing::warn!(user = %self.name, "final cart read failed; its writes are not checked");
        self.report
    }
}

/// The items of a `{"items": [...]}` answer.
fn cart_items(body: &[u8]) -> Option<HashSet<String>> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let items = value.get("items")?.as_array()?;
    Some(
        items
            .iter()
            .filter_map(|i| i.as_str().map(str::to_owned))
            .collect(),
    )
}

/// Runs `settings.users` users against `base` until `deadline` (which may be moved while they
/// run) or their budget is spent; returns them for [`verify`].
pub async fn drive(
    base: &str,
    settings: &LoadSettings,
    deadline: watch::Receiver<Instant>,
) -> Result<Vec<SimUser>, reqwest::Error> {
    let mut tasks = Vec::with_capacity(settings.users);
    for index in 0..settings.users {
        let user = SimUser::new(index, settings)?;
        tasks.push(tokio::spawn(user.run(
            base.to_owned(),
            settings.clone(),
            deadline.clone(),
        )));
    }
    let mut users = Vec::with_capacity(tasks.len());
    for task in futures::future::join_all(tasks).await {
        match task {
            Ok(user) => users.push(user),
            Err(error) => tracing::error!(%error, "a simulated user panicked"),
        }
    }
    Ok(users)
}

/// Reads every user's cart (all at once) and returns what each saw.
pub async fn verify(base: &str, users: Vec<SimUser>) -> Vec<UserReport> {
    futures::future::join_all(users.into_iter().map(|user| user.verify(base))).await
}

/// A small, fast, seedable generator (SplitMix64): enough for jitter, no dependency.
#[derive(Debug)]
struct SplitMix(u64);

impl SplitMix {
    /// A number in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_addresses_differ_in_their_first_three_octets() {
        let prefixes: HashSet<[u8; 3]> = (0..1000)
            .map(|i| {
                let o = Addressing::Distinct.address(i).octets();
                [o[0], o[1], o[2]]
            })
            .collect();
        assert_eq!(prefixes.len(), 1000);
    }

    #[test]
    fn nat_puts_users_behind_n_addresses() {
        let addrs: HashSet<Ipv4Addr> = (0..50).map(|i| Addressing::Nat(4).address(i)).collect();
        assert_eq!(addrs.len(), 4);
        let one: HashSet<Ipv4Addr> = (0..50).map(|i| Addressing::OneProxy.address(i)).collect();
        assert_eq!(one.len(), 1);
    }

    #[test]
    fn jitter_stays_in_the_unit_interval() {
        let mut rng = SplitMix(7);
        assert!(
            (0..10_000)
                .map(|_| rng.unit())
                .all(|x| (0.0..1.0).contains(&x))
        );
    }
}
