//! Write order inside this process: a write holds its session's stripe lock from before its
//! transaction until after its event is sent, so the events of one session leave in the order
//! their commits happened (a commit and its send are otherwise two steps another writer could
//! get between). MySQL's row locks order the writes themselves, across servers too.

use std::hash::{BuildHasher, RandomState};

use tokio::sync::{Mutex, MutexGuard};

/// Number of stripes. Far more than the writes a pool of connections can run at once, so two
/// sessions rarely share one, for the price of a few KiB.
const STRIPES: usize = 256;

/// Stripe locks, chosen by a hash of namespace and id.
#[derive(Debug)]
pub(super) struct WriteLocks {
    /// One async mutex per stripe.
    stripes: Box<[Mutex<()>]>,
    /// Hash seed for the stripe choice.
    hasher: RandomState,
}

impl WriteLocks {
    /// All stripes free.
    pub(super) fn new() -> Self {
        WriteLocks {
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            hasher: RandomState::new(),
        }
    }

    /// Locks the stripes of the sessions `ids` of `namespace`. Stripes are taken in index order
    /// (each once), so two callers locking overlapping sets never deadlock. Callers lock before
    /// they take a connection, and hold no database lock while they wait here.
    pub(super) async fn lock(&self, namespace: &str, ids: &[&str]) -> Vec<MutexGuard<'_, ()>> {
        let mut indexes: Vec<usize> = ids
            .iter()
            .map(|id| (self.hasher.hash_one((namespace, id)) as usize) % STRIPES)
            .collect();
        indexes.sort_unstable();
        indexes.dedup();
        let mut guards = Vec::with_capacity(indexes.len());
        for index in indexes {
            if let Some(stripe) = self.stripes.get(index) {
                guards.push(stripe.lock().await);
            }
        }
        guards
    }
}
