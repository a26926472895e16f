//! A master of a Redis Cluster dies under load, behind the gRPC server: every call either
//! succeeds with the right data or fails as an outage (UNAVAILABLE, or DEADLINE_EXCEEDED for
//! a node that stopped answering), calls succeed again once a replica
//! took over, no acknowledged write is lost, and watchers hear writes again.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use session_proto::v1::session_store_client::SessionStoreClient;
use session_proto::v1::{CreateRequest, GetRequest, UpdateRequest, WatchRequest};
use session_server::config::Settings;
use session_server::store::redis::RedisStore;
use tonic::transport::Channel;

use super::session_key;
use crate::support::cluster::RedisCluster;
use crate::support::harness::TestServer;
use crate::support::outage::is_outage_status;
use crate::support::wait::{events_ready, eventually};

/// What a worker of the failover test saw.
#[derive(Debug, Default)]
struct Tally {
    /// Calls answered OK (with the right data).
    ok: u64,
    /// Calls answered as an outage (UNAVAILABLE or DEADLINE_EXCEEDED).
    unavailable: u64,
    /// Writes answered OK.
    acked: u64,
    /// Writes answered as an outage: applied or not, nobody knows.
    unknown: u64,
    /// Anything else: another code, or wrong data.
    wrong: Vec<String>,
    /// Sessions created (acknowledged), with the value written.
    created: Vec<(String, String)>,
}

impl Tally {
    /// Counts a failed call: an outage is the one acceptable failure.
    fn failed(&mut self, what: &str, status: &tonic::Status, write: bool) {
        if is_outage_status(status) {
            self.unavailable += 1;
            if write {
                self.unknown += 1;
            }
        } else {
            self.wrong.push(format!("{what}: {status}"));
        }
    }
}

type Client = SessionStoreClient<Channel>;

/// Bound on each phase (a replica taking over, workers making progress again, events coming
/// back): far more than each takes (seconds), so a loaded machine never fails it, while a
/// failover that never completes does.
const PHASE_WITHIN: Duration = Duration::from_secs(30);

fn get_request(id: &str) -> GetRequest {
    GetRequest {
        namespace: String::new(),
        id: id.to_string(),
        touch: false,
        bypass_cache: false,
    }
}

fn number(attrs: &HashMap<String, Vec<u8>>, key: &str) -> Option<u64> {
    std::str::from_utf8(attrs.get(key)?).ok()?.parse().ok()
}

/// Compare-and-set increments of `n` in one session, until `stop`. The invariant every answer
/// must keep: `n == version - 1` (every write bumps both).
async fn count(
    mut client: Client,
    id: String,
    stop: Arc<AtomicBool>,
    oks: Arc<AtomicU64>,
) -> Tally {
    let mut tally = Tally::default();
    while !stop.load(Ordering::Relaxed) {
        let current = match client.get(get_request(&id)).await {
            Ok(reply) => reply.into_inner(),
            Err(status) => {
                tally.failed("get", &status, false);
                continue;
            }
        };
        let n = number(&current.attrs, "n");
        if n != Some(current.version - 1) {
            tally
                .wrong
                .push(format!("read n={n:?} at version {}", current.version));
            continue;
        }
        tally.ok += 1;
        let next = current.version; // n + 1
        let update = UpdateRequest {
            id: id.clone(),
            set: [("n".to_string(), next.to_string().into_bytes())].into(),
            expected_version: Some(current.version),
            ..UpdateRequest::default()
        };
        match client.update(update).await {
            Ok(reply) => {
                let written = reply.into_inner();
                if written.version != current.version + 1
                    || number(&written.attrs, "n") != Some(next)
                {
                    tally.wrong.push(format!("update answered {written:?}"));
                }
                tally.ok += 1;
                tally.acked += 1;
                oks.fetch_add(1, Ordering::Relaxed);
            }
            Err(status) => tally.failed("update", &status, true),
        }
    }
    tally
}

/// Creates sessions and reads each back, until `stop`.
async fn create_and_read(mut client: Client, stop: Arc<AtomicBool>, oks: Arc<AtomicU64>) -> Tally {
    let mut tally = Tally::default();
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let value = format!("value-{i}");
        let request = CreateRequest {
            user_id: "ola".into(),
            attrs: [("v".to_string(), value.clone().into_bytes())].into(),
            ..CreateRequest::default()
        };
        let created = match client.create(request).await {
            Ok(reply) => reply.into_inner(),
            Err(status) => {
                tally.failed("create", &status, true);
                continue;
            }
        };
        tally.ok += 1;
        tally.acked += 1;
        tally.created.push((created.id.clone(), value.clone()));
        match client.get(get_request(&created.id)).await {
            Ok(reply) if reply.get_ref().attrs.get("v") == Some(&value.clone().into_bytes()) => {
                tally.ok += 1;
                oks.fetch_add(1, Ordering::Relaxed);
            }
            Ok(reply) => tally
                .wrong
                .push(format!("read back {:?}", reply.into_inner())),
            Err(status) => tally.failed("read back", &status, false),
        }
    }
    tally
}

/// Waits (up to [`PHASE_WITHIN`]) until `oks` counts at least `by` more than `from`.
async fn progress(what: &str, oks: &AtomicU64, from: u64, by: u64) {
    let enough = || std::future::ready((oks.load(Ordering::Relaxed) >= from + by).then_some(()));
    eventually(what, PHASE_WITHIN, enough).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_failover_answers_unavailable_at_worst_and_keeps_acknowledged_writes() {
    let test = "master_failover_answers_unavailable_at_worst_and_keeps_acknowledged_writes";
    let Some(mut cluster) = RedisCluster::start(test, 3, 1).await else {
        return;
    };
    let settings = Settings {
        store_timeout: Duration::from_secs(1),
        ..Settings::default()
    };
    let config = cluster.config(test, &settings);
    let prefix = config.key_prefix.clone();
    let store = Arc::new(RedisStore::new(config).expect("store"));
    events_ready(store.as_ref()).await;
    let server = TestServer::start(settings, store.clone()).await;
    let mut client = server.client().await;

    // The victim: the master with the lowest port, which is also where the store's event
    // subscription starts, so events have to move too.
    let masters = cluster.masters().await;
    let victim = masters
        .iter()
        .map(|(port, _)| *port)
        .min()
        .expect("masters");
    // A counter on the victim, so the increments run into the failover. A third of the ids
    // land there: 100 tries fail only if the victim serves no slot at all.
    let mut tries = 0..100;
    let counter = loop {
        assert!(
            tries.next().is_some(),
            "no session landed on master {victim}"
        );
        let request = CreateRequest {
            attrs: [("n".to_string(), b"0".to_vec())].into(),
            ..CreateRequest::default()
        };
        let created = client.create(request).await.expect("create").into_inner();
        let slot = cluster
            .slot(&session_key(&prefix, "default", &created.id))
            .await;
        if cluster.master_of_slot(slot).await == victim {
            break created.id;
        }
    };
    let mut watch = client
        .watch(WatchRequest::default())
        .await
        .expect("watch")
        .into_inner();
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let mut watching = server.client().await;
    let watcher = tokio::spawn(async move {
        // The server ends a watch with UNAVAILABLE when its event feed moves off the dead
        // node (events may have been missed there): a watcher subscribes again, as
        // session-client's WatchStream does.
        loop {
            while let Some(Ok(event)) = watch.next().await {
                let _ = seen_tx.send((event.id, event.version));
            }
            loop {
                match watching.watch(WatchRequest::default()).await {
                    Ok(stream) => {
                        watch = stream.into_inner();
                        break;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        }
    });

    let stop = Arc::new(AtomicBool::new(false));
    let (count_oks, create_oks) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let counting = tokio::spawn(count(
        server.client().await,
        counter.clone(),
        stop.clone(),
        count_oks.clone(),
    ));
    let creating = tokio::spawn(create_and_read(
        server.client().await,
        stop.clone(),
        create_oks.clone(),
    ));
    progress("increments before the kill", &count_oks, 0, 20).await;
    progress("creates before the kill", &create_oks, 0, 20).await;

    let killed_at = Instant::now();
    cluster.kill(victim);
    assert!(
        cluster.wait_until_ready(PHASE_WITHIN).await,
        "no replica took over within {PHASE_WITHIN:?}"
    );
    let promoted = killed_at.elapsed();
    let (counts, creates) = (
        count_oks.load(Ordering::Relaxed),
        create_oks.load(Ordering::Relaxed),
    );
    progress("increments resuming", &count_oks, counts, 20).await;
    progress("creates resuming", &create_oks, creates, 20).await;
    let resumed = killed_at.elapsed();
    stop.store(true, Ordering::Relaxed);
    let counted = counting.await.expect("counter worker");
    let made = creating.await.expect("create worker");
    eprintln!(
        "failover: promoted after {promoted:?}, both workers going again after {resumed:?}; \
         counter {:?} ok/unavailable/acked/unknown, creates {:?}",
        (
            counted.ok,
            counted.unavailable,
            counted.acked,
            counted.unknown
        ),
        (made.ok, made.unavailable, made.acked, made.unknown),
    );
    assert!(counted.wrong.is_empty(), "counter: {:?}", counted.wrong);
    assert!(made.wrong.is_empty(), "creates: {:?}", made.wrong);
    assert!(
        counted.unavailable > 0,
        "the counter's master died, yet no call failed"
    );

    // Every acknowledged increment is there; one whose answer was lost may or may not be.
    // (Redis replicates asynchronously, so a write acknowledged in the very instant of the kill
    // could in principle miss the replica; on loopback the master sends the reply and the
    // replication stream in the same pass of its event loop, so that window is microseconds.)
    let end = client
        .get(get_request(&counter))
        .await
        .expect("counter")
        .into_inner();
    let n = number(&end.attrs, "n").expect("n");
    assert_eq!(n, end.version - 1);
    assert!(
        (counted.acked..=counted.acked + counted.unknown).contains(&n),
        "n = {n}, acknowledged {}, unknown {}",
        counted.acked,
        counted.unknown
    );
    // Every acknowledged session is there, with what was written.
    for (id, value) in &made.created {
        let read = client
            .get(get_request(id))
            .await
            .expect("acknowledged session")
            .into_inner();
        assert_eq!(
            read.attrs.get("v"),
            Some(&value.clone().into_bytes()),
            "{id}"
        );
    }

    // Watchers hear writes again: the event subscription moved off the dead node (and the
    // watcher, told of the gap, subscribed again).
    let deadline = Instant::now() + PHASE_WITHIN;
    'heard: loop {
        assert!(
            Instant::now() < deadline,
            "no events within {PHASE_WITHIN:?} after the failover"
        );
        let update = UpdateRequest {
            id: counter.clone(),
            set: [("after".to_string(), b"1".to_vec())].into(),
            ..UpdateRequest::default()
        };
        let version = client
            .update(update)
            .await
            .expect("update")
            .into_inner()
            .version;
        let wait = tokio::time::Instant::now() + Duration::from_millis(500);
        while let Ok(Some((id, seen_version))) = tokio::time::timeout_at(wait, seen.recv()).await {
            if id == counter && seen_version == version {
                break 'heard;
            }
        }
    }
    watcher.abort();
}
