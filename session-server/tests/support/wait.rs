//! Waiting in tests without sleeping for a guessed time: polling until something holds (or the
//! test fails at a deadline the caller names), and waiting for a store's events on its
//! broadcast receiver.

use std::fmt::Display;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use session_server::store::{NewSession, Patch, SessionEvent, SessionStore};
use tokio::sync::broadcast;

/// How long the `eventually` helpers pause between attempts.
const RETRY_EVERY: Duration = Duration::from_millis(50);

/// How long [`update_until_heard`] listens for the event of each write before writing again.
const LISTEN_PER_WRITE: Duration = Duration::from_millis(300);

/// Tries `attempt` until it succeeds and gives its value; fails the test, with `what` and the
/// last error, once `within` has passed.
pub async fn eventually_ok<T, E: Display, F>(
    what: &str,
    within: Duration,
    mut attempt: impl FnMut() -> F,
) -> T
where
    F: Future<Output = Result<T, E>>,
{
    let deadline = Instant::now() + within;
    loop {
        match attempt().await {
            Ok(value) => return value,
            Err(error) => assert!(
                Instant::now() < deadline,
                "{what}: not within {within:?} (last: {error})"
            ),
        }
        tokio::time::sleep(RETRY_EVERY).await;
    }
}

/// Tries `attempt` until it gives `Some` and gives its value; fails the test, with `what`, once
/// `within` has passed. For a condition, have `attempt` give `condition.then_some(())`.
pub async fn eventually<T, F>(what: &str, within: Duration, mut attempt: impl FnMut() -> F) -> T
where
    F: Future<Output = Option<T>>,
{
    eventually_ok(what, within, || {
        let attempt = attempt();
        async move { attempt.await.ok_or("nothing yet") }
    })
    .await
}

/// The next event that satisfies `wanted`, within `wait`; `None` when none came (or the store
/// closed its events). Events a slow receiver missed are passed over, as any unwanted one is.
pub async fn next_event(
    events: &mut broadcast::Receiver<SessionEvent>,
    wait: Duration,
    wanted: impl Fn(&SessionEvent) -> bool,
) -> Option<SessionEvent> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(event)) if wanted(&event) => return Some(event),
            Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => {}
            Ok(Err(broadcast::error::RecvError::Closed)) | Err(_) => return None,
        }
    }
}

/// Updates session `id` in `namespace` of `store` (setting attribute `n`) until `events` brings
/// back the event of one of those updates, failing the test after `within`: how a test sees
/// that a store's event subscription, which reconnects on its own, is back. `when` ends the
/// failure message ("no events within 10s of the restart").
pub async fn update_until_heard(
    store: &dyn SessionStore,
    events: &mut broadcast::Receiver<SessionEvent>,
    namespace: &str,
    id: &str,
    within: Duration,
    when: &str,
) {
    let deadline = Instant::now() + within;
    loop {
        let patch = Patch {
            set: [("n".into(), b"1".to_vec())].into(),
            ..Patch::default()
        };
        let updated = store.update(namespace, id, patch).await.expect("update");
        let wanted = |e: &SessionEvent| e.id == updated.id && e.version == updated.version;
        if next_event(events, LISTEN_PER_WRITE, wanted).await.is_some() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no events within {within:?} {when}"
        );
    }
}

/// How long [`events_ready`] waits for a store's events: far more than a subscription takes
/// to come up, so a loaded machine never fails it.
const EVENTS_READY_WITHIN: Duration = Duration::from_secs(30);

/// Waits until a store's events arrive: writes a probe session until its CREATED event comes.
pub async fn events_ready(store: &dyn SessionStore) {
    static PROBE: AtomicU64 = AtomicU64::new(0);
    let mut events = store.subscribe();
    let deadline = Instant::now() + EVENTS_READY_WITHIN;
    while Instant::now() < deadline {
        let id = format!("probe{:0>27}", PROBE.fetch_add(1, Ordering::Relaxed));
        let probe = NewSession {
            id: id.clone(),
            namespace: "events-probe".into(),
            user_id: String::new(),
            attrs: Default::default(),
            ttl: Duration::from_secs(30),
        };
        if store.create(probe).await.is_ok() {
            let heard = next_event(&mut events, Duration::from_millis(300), |e| e.id == id).await;
            let _ = store.delete("events-probe", &id).await;
            if heard.is_some() {
                return;
            }
        } else {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    panic!("the store's events did not come within {EVENTS_READY_WITHIN:?}");
}
