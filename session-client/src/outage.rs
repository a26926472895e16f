//! Telling a store that is down from one that is slow: the one rule every user of the snapshot
//! fallback follows (the layer, the proxy's lookup plugin, `demo-app --sessions proxy`).
//!
//! An unreachable store (connection refused or broken, UNAVAILABLE) is down at once. A call that
//! timed out is a slow store, an error worth a retry (503 with `Retry-After`), unless the store
//! has not answered anything for longer than the outage grace: then it is down too, and the
//! snapshot may stand in. Trusting the snapshot on the first timeout would let an overloaded
//! store push every backend into degraded mode, where changes made meanwhile can be dropped
//! (the store wins on recovery).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::client::ClientError;

/// When the store last answered, and how long it may be silent before timeouts count as an
/// outage. Shared by every request of one backend (cheap atomics).
#[derive(Debug)]
pub struct OutageGrace {
    /// The grace, in ms.
    grace_ms: u64,
    /// The monotonic origin `last_answer_ms` counts from (the wall clock may jump).
    origin: Instant,
    /// When the store last answered (ms since `origin`); creation counts as an answer, so a
    /// store slow at start-up is not taken for a lost one.
    last_answer_ms: AtomicU64,
}

impl OutageGrace {
    /// A judge with `grace`, counting from now.
    pub fn new(grace: Duration) -> Self {
        OutageGrace {
            grace_ms: u64::try_from(grace.as_millis()).unwrap_or(u64::MAX),
            origin: Instant::now(),
            last_answer_ms: AtomicU64::new(0),
        }
    }

    /// Milliseconds since `origin`, on the monotonic clock.
    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The store answered (anything: a session, NOT_FOUND, a conflict).
    pub fn answered(&self) {
        self.last_answer_ms
            .store(self.elapsed_ms(), Ordering::Relaxed);
    }

    /// Notes the outcome of a call: every outcome but an unreachable or timed-out store (and a
    /// client that could not even be set up) is an answer.
    pub fn note<T>(&self, result: &Result<T, ClientError>) {
        match result {
            Err(error) if error.is_retryable() => {}
            Err(ClientError::Config(_)) => {}
            _ => self.answered(),
        }
    }

    /// Whether `error` means the store is down, so a snapshot may stand in: unreachable, or
    /// timed out while the store has not answered for longer than the grace.
    pub fn is_outage(&self, error: &ClientError) -> bool {
        if error.is_unavailable() {
            return true;
        }
        if !error.is_timeout() {
            return false;
        }
        let last = self.last_answer_ms.load(Ordering::Relaxed);
        self.elapsed_ms().saturating_sub(last) > self.grace_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An origin 10 s back, as if the judge had been made then.
    fn ten_seconds_ago() -> Instant {
        Instant::now()
            .checked_sub(Duration::from_secs(10))
            .expect("the monotonic clock is past 10 s")
    }

    #[test]
    fn unreachable_is_an_outage_at_once_a_timeout_only_past_the_grace() {
        let judge = OutageGrace::new(Duration::from_secs(3600));
        let timeout = ClientError::TimedOut("slow".into());
        assert!(judge.is_outage(&ClientError::Unavailable("refused".into())));
        assert!(!judge.is_outage(&timeout), "within the grace of creation");
        assert!(!judge.is_outage(&ClientError::NotFound { epoch: None }));
        assert!(!judge.is_outage(&ClientError::Conflict("moved".into())));

        let mut quick = OutageGrace::new(Duration::ZERO);
        quick.origin = ten_seconds_ago();
        assert!(quick.is_outage(&timeout), "silent past the grace");
        quick.note(&Ok::<(), ClientError>(()));
        quick.last_answer_ms.fetch_sub(1, Ordering::Relaxed);
        assert!(quick.is_outage(&timeout), "1 ms past a zero grace");
    }

    #[test]
    fn only_answers_move_the_last_answer() {
        let mut judge = OutageGrace::new(Duration::from_secs(1));
        judge.origin = ten_seconds_ago();
        judge.last_answer_ms.store(7, Ordering::Relaxed);
        judge.note(&Err::<(), _>(ClientError::TimedOut("t".into())));
        judge.note(&Err::<(), _>(ClientError::Unavailable("u".into())));
        judge.note(&Err::<(), _>(ClientError::Config("c".into())));
        assert_eq!(judge.last_answer_ms.load(Ordering::Relaxed), 7);
        judge.note(&Err::<(), _>(ClientError::NotFound { epoch: None }));
        assert!(judge.last_answer_ms.load(Ordering::Relaxed) > 7);
    }
}
