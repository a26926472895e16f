//! Backends: where requests go, with the live state every part of the proxy shares (weight,
//! requests in flight, health).
//!
//! A [`Backend`] is created from its config and lives as long as some request, balancer or
//! health checker holds it; a reload builds new ones (carrying over nothing but the name).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::tls::BackendTls;

/// One upstream server.
#[derive(Debug)]
pub struct Backend {
    /// Position in the backend list (stable for the life of this list).
    pub index: usize,
    /// Name used in logs, the admin API and sticky cookies (defaults to `host:port`).
    pub name: String,
    /// `host:port` to connect to.
    pub authority: String,
    /// How to dial it over TLS, for an `https://` backend; `None`: cleartext HTTP.
    tls: Option<BackendTls>,
    /// Relative weight (0 takes no new traffic); changeable at run time.
    weight: AtomicU32,
    /// Requests in flight to it (least-conn reads it).
    active: AtomicUsize,
    /// Requests it has answered.
    served: AtomicU64,
    /// Whether health checks and passive marking consider it up.
    up: AtomicBool,
    /// Recent failures for passive marking (`max_fails` within `fail_timeout`).
    failures: Mutex<Vec<Instant>>,
}

impl Backend {
    /// A backend, up, with the given weight.
    pub fn new(
        index: usize,
        name: impl Into<String>,
        authority: impl Into<String>,
        weight: u32,
    ) -> Self {
        Backend {
            index,
            name: name.into(),
            authority: authority.into(),
            tls: None,
            weight: AtomicU32::new(weight),
            active: AtomicUsize::new(0),
            served: AtomicU64::new(0),
            up: AtomicBool::new(true),
            failures: Mutex::new(Vec::new()),
        }
    }

    /// The same backend dialled over TLS (an `https://` backend): its connections and its
    /// health checks.
    pub fn with_tls(mut self, tls: BackendTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// How to dial it over TLS; `None` for a cleartext backend.
    pub fn tls(&self) -> Option<&BackendTls> {
        self.tls.as_ref()
    }

    /// Current weight.
    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    /// Changes the weight (admin API).
    pub fn set_weight(&self, weight: u32) {
        self.weight.store(weight, Ordering::Relaxed);
    }

    /// Requests in flight.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Requests answered so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Whether it may get traffic: up and with a non-zero weight.
    pub fn is_usable(&self) -> bool {
        self.is_up() && self.weight() > 0
    }

    /// Whether health checking considers it up.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Marks it up or down (health checks); returns whether that changed anything.
    pub fn set_up(&self, up: bool) -> bool {
        let was = self.up.swap(up, Ordering::Relaxed);
        if up {
            self.failures.lock().clear();
        }
        was != up
    }

    /// Counts a request as in flight until the guard drops.
    pub fn start_request(&self) -> ActiveGuard<'_> {
        self.request_started();
        ActiveGuard { backend: self }
    }

    /// Counts a request as in flight; [`Backend::request_finished`] ends it. For owners that
    /// cannot hold a borrowing [`ActiveGuard`] (the proxy's response body holds an `Arc`).
    pub(crate) fn request_started(&self) {
        self.active.fetch_add(1, Ordering::Relaxed);
    }

    /// Ends what [`Backend::request_started`] began: no longer in flight, one more served.
    pub(crate) fn request_finished(&self) {
        self.active.fetch_sub(1, Ordering::Relaxed);
        self.served.fetch_add(1, Ordering::Relaxed);
    }

    /// Passive health: records a failure (connect error, timeout); marks the backend down
    /// when `max_fails` happened within `fail_timeout`. Returns true when it went down now.
    pub fn report_failure(&self, max_fails: u32, fail_timeout: Duration) -> bool {
        if max_fails == 0 {
            return false;
        }
        let now = Instant::now();
        let mut failures = self.failures.lock();
        failures.retain(|t| now.duration_since(*t) < fail_timeout);
        failures.push(now);
        if failures.len() >= max_fails as usize {
            failures.clear();
            drop(failures);
            return self.set_up(false);
        }
        false
    }
}

/// Keeps a request counted in [`Backend::active`]; counts it as served when dropped.
#[derive(Debug)]
pub struct ActiveGuard<'a> {
    /// The backend serving the request.
    backend: &'a Backend,
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.backend.request_finished();
    }
}

/// A backend name with its `%XX` escapes decoded, as names travel in sticky cookies and admin
/// URLs; `None` for a malformed escape or a name that is not UTF-8.
pub fn decode_name(encoded: &str) -> Option<String> {
    let bytes = encoded.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passive_marking_needs_max_fails_within_the_window() {
        let b = Backend::new(0, "b", "127.0.0.1:1", 1);
        assert!(!b.report_failure(3, Duration::from_secs(10)));
        assert!(!b.report_failure(3, Duration::from_secs(10)));
        assert!(
            b.report_failure(3, Duration::from_secs(10)),
            "third failure marks it down"
        );
        assert!(!b.is_usable());
        assert!(b.set_up(true));
        assert!(b.is_usable());
        assert!(
            !b.report_failure(0, Duration::from_secs(10)),
            "max_fails 0 disables marking"
        );
    }

    #[test]
    fn names_are_percent_decoded() {
        assert_eq!(
            decode_name("10.0.0.1%3A8080").as_deref(),
            Some("10.0.0.1:8080")
        );
        assert_eq!(decode_name("s1").as_deref(), Some("s1"));
        assert_eq!(decode_name("bad%4"), None);
        assert_eq!(decode_name("%FF"), None);
    }

    #[test]
    fn active_requests_are_counted_until_done() {
        let b = Backend::new(0, "b", "127.0.0.1:1", 1);
        let guard = b.start_request();
        assert_eq!(b.active(), 1);
        drop(guard);
        assert_eq!((b.active(), b.served()), (0, 1));
    }
}
