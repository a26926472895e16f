//! The primary of a Sentinel deployment dies (SIGKILL) under load, behind the gRPC server:
//! every call either succeeds with the right data or fails as an outage (UNAVAILABLE, or
//! DEADLINE_EXCEEDED), the store follows the promoted replica without a restart, every session
//! acknowledged and replicated before the kill is there after it, and watchers hear writes
//! again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use session_proto::v1::session_store_client::SessionStoreClient;
use session_proto::v1::{CreateRequest, GetRequest, UpdateRequest};
use session_server::store::SessionStore;
use session_server::store::redis::RedisStore;
use tokio::sync::Mutex;
use tonic::transport::Channel;

use crate::deployment::Deployment;
use crate::support::harness::TestServer;
use crate::support::outage::is_outage_status;
use crate::support::wait::{events_ready, eventually, update_until_heard};

/// How long the store may take to serve again once the sentinel has promoted the replica.
const FOLLOW_WITHIN: Duration = Duration::from_secs(10);

/// Bound on the promotion itself (the sentinel's `down-after-milliseconds` of 1 s plus its
/// failover, seconds), and on events coming back: generous, for a loaded machine.
const PHASE_WITHIN: Duration = Duration::from_secs(30);

/// Concurrent writers.
const WRITERS: usize = 3;

type Client = SessionStoreClient<Channel>;

/// What the writers saw, shared.
#[derive(Debug, Default)]
struct Tally {
    /// Sessions created (acknowledged), with the value written, in order.
    created: Vec<(String, String)>,
    /// Calls answered as an outage.
    outages: u64,
    /// Anything else: another code, or wrong data.
    wrong: Vec<String>,
}

fn get_request(id: &str) -> GetRequest {
    GetRequest {
        namespace: String::new(),
        id: id.to_string(),
        touch: false,
        bypass_cache: false,
    }
}

/// Creates a session, reads it back, updates it at its version and reads it again, until
/// `stop`; counts the rounds that fully succeeded in `oks`.
async fn write(
    writer: usize,
    mut client: Client,
    stop: Arc<AtomicBool>,
    oks: Arc<AtomicU64>,
    tally: Arc<Mutex<Tally>>,
) {
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let value = format!("writer{writer}-{i}");
        let failed = |what: &str, status: tonic::Status| {
            let tally = tally.clone();
            let what = what.to_string();
            async move {
                let mut tally = tally.lock().await;
                if is_outage_status(&status) {
                    tally.outages += 1;
                } else {
                    tally.wrong.push(format!("{what}: {status}"));
                }
            }
        };
        let request = CreateRequest {
            attrs: [("v".to_string(), value.clone().into_bytes())].into(),
            ..CreateRequest::default()
        };
        let created = match client.create(request).await {
            Ok(reply) => reply.into_inner(),
            Err(status) => {
                failed("create", status).await;
                continue;
            }
        };
        tally
            .lock()
            .await
            .created
            .push((created.id.clone(), value.clone()));
        match client.get(get_request(&created.id)).await {
            Ok(reply) if reply.get_ref().attrs.get("v") == Some(&value.clone().into_bytes()) => {}
            Ok(reply) => {
                let wrong = format!("read back {:?}", reply.into_inner());
                tally.lock().await.wrong.push(wrong);
                continue;
            }
            Err(status) => {
                failed("read back", status).await;
                continue;
            }
        }
        let update = UpdateRequest {
            id: created.id.clone(),
            set: [("w".to_string(), b"2".to_vec())].into(),
            expected_version: Some(1),
            ..UpdateRequest::default()
        };
        match client.update(update).await {
            Ok(reply) if reply.get_ref().version == 2 => {}
            Ok(reply) => {
                let wrong = format!("update answered {:?}", reply.into_inner());
                tally.lock().await.wrong.push(wrong);
                continue;
            }
            Err(status) => {
                failed("update", status).await;
                continue;
            }
        }
        oks.fetch_add(1, Ordering::Relaxed);
    }
}

/// Waits (up to `within`) until `oks` counts at least `by` more than `from`.
async fn progress(what: &str, oks: &AtomicU64, from: u64, by: u64, within: Duration) {
    let enough = || std::future::ready((oks.load(Ordering::Relaxed) >= from + by).then_some(()));
    eventually(what, within, enough).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_killed_under_load_is_followed_with_outages_at_worst_and_replicated_writes_kept() {
    let test =
        "primary_killed_under_load_is_followed_with_outages_at_worst_and_replicated_writes_kept";
    let Some(mut deployment) = Deployment::start(test).await else {
        return;
    };
    let settings = super::settings();
    let store = Arc::new(RedisStore::new(deployment.config(test, &settings)).expect("store"));
    events_ready(store.as_ref()).await;
    let server = TestServer::start(settings, store.clone()).await;

    let stop = Arc::new(AtomicBool::new(false));
    let oks = Arc::new(AtomicU64::new(0));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        writers.push(tokio::spawn(write(
            writer,
            server.client().await,
            stop.clone(),
            oks.clone(),
            tally.clone(),
        )));
    }
    progress("writes before the kill", &oks, 0, 30, PHASE_WITHIN).await;

    // Everything acknowledged so far is on the replica before the primary dies.
    let replicated = tally.lock().await.created.clone();
    deployment.wait_until_replicated().await;
    let killed_at = Instant::now();
    deployment.kill_primary();
    assert!(
        deployment.wait_until_promoted(PHASE_WITHIN).await,
        "the sentinel did not promote the replica within {PHASE_WITHIN:?}"
    );
    let promoted = killed_at.elapsed();
    let from = oks.load(Ordering::Relaxed);
    progress("writes after the promotion", &oks, from, 30, FOLLOW_WITHIN).await;
    let followed = killed_at.elapsed();
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.await.expect("writer");
    }
    let tally = tally.lock().await;
    eprintln!(
        "sentinel failover: promoted after {promoted:?}, writes going again after {followed:?}; \
         {} sessions acknowledged ({} before the kill), {} outages",
        tally.created.len(),
        replicated.len(),
        tally.outages
    );
    assert!(tally.wrong.is_empty(), "{:?}", tally.wrong);
    assert!(tally.outages > 0, "the primary died, yet no call failed");

    // Every session replicated before the kill is there, with what was written; every other
    // acknowledged one is there or (asynchronous replication) lost, never different.
    let mut client = server.client().await;
    let mut lost = 0;
    for (index, (id, value)) in tally.created.iter().enumerate() {
        match client.get(get_request(id)).await {
            Ok(read) => assert_eq!(
                read.get_ref().attrs.get("v"),
                Some(&value.clone().into_bytes()),
                "{id}"
            ),
            Err(status) if index >= replicated.len() && status.code() == tonic::Code::NotFound => {
                lost += 1;
            }
            Err(status) => panic!(
                "session {id} (acknowledged before the kill: {}): {status}",
                index < replicated.len()
            ),
        }
    }
    eprintln!("{lost} sessions acknowledged after the sync point were lost");

    // The store writes to the promoted replica, and watchers hear writes again.
    let mut events = store.subscribe();
    let (id, _) = tally.created.last().expect("sessions").clone();
    update_until_heard(
        store.as_ref(),
        &mut events,
        "default",
        &id,
        PHASE_WITHIN,
        "after the failover",
    )
    .await;
}
