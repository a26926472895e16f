//! Compare-and-set increments racing on one counter: each client reads the session, then
//! writes `n + 1` with `expected_version` set to what it read, and retries on ABORTED. Used by
//! the conformance suite (one server) and by the tests of two servers on one store.

use std::sync::Arc;

use session_proto::v1::session_store_client::SessionStoreClient;
use session_proto::v1::{GetRequest, Session, UpdateRequest};
use tokio::sync::Barrier;
use tonic::Code;
use tonic::transport::Channel;

/// The attribute that holds the counter.
pub const COUNTER: &str = "n";

/// The counter of `session` (attribute [`COUNTER`], decimal).
pub fn counter(session: &Session) -> u64 {
    let raw = session
        .attrs
        .get(COUNTER)
        .unwrap_or_else(|| panic!("session {} has no counter", session.id));
    std::str::from_utf8(raw)
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or_else(|| panic!("counter {raw:?} is not a number"))
}

/// Runs one client per entry of `clients` (each its own connection, possibly to different
/// servers), each making `per_client` increments of session `id` in `namespace`; gives the
/// ABORTED answers each client got.
///
/// Conflicts are made certain, not left to chance: every client's first read happens before
/// any client's first write (a barrier between them), so all first writes but one are
/// conflicts; after that a client yields between its read and its write, so the others get in
/// between whenever they run.
pub async fn race(
    clients: Vec<SessionStoreClient<Channel>>,
    namespace: &str,
    id: &str,
    per_client: u64,
) -> Vec<u64> {
    let start = Arc::new(Barrier::new(clients.len()));
    let workers: Vec<_> = clients
        .into_iter()
        .map(|client| {
            let (namespace, id, start) = (namespace.to_owned(), id.to_owned(), start.clone());
            tokio::spawn(increment(client, namespace, id, per_client, start))
        })
        .collect();
    let mut conflicts = Vec::new();
    for worker in workers {
        conflicts.push(worker.await.expect("an increment worker panicked"));
    }
    conflicts
}

/// `times` compare-and-set increments through `client`, retrying each on ABORTED; the ABORTED
/// answers it got. Waits at `start` between its first read and its first write.
async fn increment(
    mut client: SessionStoreClient<Channel>,
    namespace: String,
    id: String,
    times: u64,
    start: Arc<Barrier>,
) -> u64 {
    let mut conflicts = 0;
    let mut first = true;
    for _ in 0..times {
        loop {
            let read = GetRequest {
                namespace: namespace.clone(),
                id: id.clone(),
                touch: false,
                bypass_cache: false,
            };
            let current = client.get(read).await.expect("read the counter");
            if std::mem::take(&mut first) {
                start.wait().await;
            } else {
                tokio::task::yield_now().await;
            }
            let write = UpdateRequest {
                namespace: namespace.clone(),
                id: id.clone(),
                set: [(
                    COUNTER.to_owned(),
                    (counter(current.get_ref()) + 1).to_string().into_bytes(),
                )]
                .into(),
                expected_version: Some(current.get_ref().version),
                ..UpdateRequest::default()
            };
            match client.update(write).await {
                Ok(_) => break,
                Err(status) if status.code() == Code::Aborted => conflicts += 1,
                Err(status) => panic!("increment: unexpected {status}"),
            }
        }
    }
    conflicts
}
