//! The memory store's per-user index: the session ids each user owns, for `ListByUser` and
//! `DeleteByUser`.
//!
//! Sharded like the sessions, by a hash of `(namespace, user_id)`. The store updates it while
//! holding the session's shard lock, so it never disagrees with the sessions for long; readers
//! still verify each indexed session, which makes any leftover id harmless. Anonymous sessions
//! (empty user id) are not indexed.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, RandomState};

use parking_lot::Mutex;

use super::SHARDS;

/// Session ids by user id, by namespace: nested so that lookups by `&str` allocate nothing.
type Owners = HashMap<String, HashMap<String, HashSet<String>>>;

/// Session ids of each `(namespace, user_id)`.
#[derive(Debug)]
pub(super) struct UserIndex {
    /// Index shards, chosen by a hash of `(namespace, user_id)`.
    shards: Box<[Mutex<Owners>]>,
    /// Hash seed for shard choice.
    hasher: RandomState,
}

impl UserIndex {
    /// An empty index.
    pub(super) fn new(hasher: RandomState) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(Owners::new())).collect(),
            hasher,
        }
    }

    fn shard(&self, namespace: &str, user_id: &str) -> &Mutex<Owners> {
        let hash = self.hasher.hash_one((namespace, user_id));
        &self.shards[(hash as usize) % SHARDS]
    }

    /// Records that `user_id` owns `id`.
    pub(super) fn add(&self, namespace: &str, user_id: &str, id: &str) {
        if user_id.is_empty() {
            return;
        }
        let mut owners = self.shard(namespace, user_id).lock();
        // Look up before inserting, so that known users cost no allocation.
        if !owners.contains_key(namespace) {
            owners.insert(namespace.to_owned(), HashMap::new());
        }
        let Some(users) = owners.get_mut(namespace) else {
            return;
        };
        if !users.contains_key(user_id) {
            users.insert(user_id.to_owned(), HashSet::new());
        }
        let Some(ids) = users.get_mut(user_id) else {
            return;
        };
        ids.insert(id.to_owned());
    }

    /// Forgets that `user_id` owns `id`.
    pub(super) fn remove(&self, namespace: &str, user_id: &str, id: &str) {
        if user_id.is_empty() {
            return;
        }
        let mut owners = self.shard(namespace, user_id).lock();
        let Some(users) = owners.get_mut(namespace) else {
            return;
        };
        if let Some(ids) = users.get_mut(user_id) {
            ids.remove(id);
            if ids.is_empty() {
                users.remove(user_id);
            }
        }
        if users.is_empty() {
            owners.remove(namespace);
        }
    }

    /// The ids `user_id` owns (some may have expired or moved since).
    pub(super) fn ids(&self, namespace: &str, user_id: &str) -> Vec<String> {
        self.shard(namespace, user_id)
            .lock()
            .get(namespace)
            .and_then(|users| users.get(user_id))
            .map(|ids| ids.iter().cloned().collect())
            .unwrap_or_default()
    }
}
