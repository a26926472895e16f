//! Regenerate on the memory store: the session moved to its new id with both shards
//! write-locked at once, so nobody sees it under both ids or under neither; under a session cap,
//! with its owner's admission lock held too (see `admission`).

use super::MemoryStore;
use super::packed::{Head, Packed};
use super::shard::{Entry, Shard};
use crate::store::{EventKind, SessionRecord, StoreError, StoreResult};

/// Tries of a Regenerate under a session cap whose session changes owner between the read of
/// its owner and the move (each such change is a write that itself took an admission lock).
const REGENERATE_TRIES: usize = 3;

impl MemoryStore {
    /// Regenerate: the move, under the owner's admission lock when a cap is set (so that no
    /// admission counts the user's sessions between the move's two index updates).
    pub(super) fn regenerate_in(
        &self,
        namespace: &str,
        old_id: &str,
        new_id: &str,
    ) -> StoreResult<SessionRecord> {
        if self.cap.limit.max == 0 {
            return self.move_session(namespace, old_id, new_id, None);
        }
        for _ in 0..REGENERATE_TRIES {
            let owner = self.owner(namespace, old_id).ok_or(StoreError::NotFound)?;
            let _admission = self.cap.lock(namespace, &owner);
            match self.move_session(namespace, old_id, new_id, Some(&owner)) {
                // It changed owner since: lock the new one's instead.
                Err(StoreError::Conflict { .. }) => continue,
                result => return result,
            }
        }
        Err(StoreError::Unavailable(
            "memory store: the session kept changing owner during a regenerate".to_owned(),
        ))
    }

    /// Regenerate's move of `old_id` to `new_id`, both shards write-locked at once. With
    /// `owner`, only if the session still belongs to it ([`StoreError::Conflict`] otherwise,
    /// nothing done).
    fn move_session(
        &self,
        namespace: &str,
        old_id: &str,
        new_id: &str,
        owner: Option<&str>,
    ) -> StoreResult<SessionRecord> {
        let inner = &self.inner;
        let now = inner.now();
        let (old_hash, new_hash) = (inner.hash(namespace, old_id), inner.hash(namespace, new_id));
        let (old_index, new_index) = (inner.shard_index(old_hash), inner.shard_index(new_hash));
        // Both shards locked (in index order, so two regenerates never deadlock) for the whole
        // move: nobody sees the session under both ids, or under neither.
        let (mut first, mut second) = match old_index.cmp(&new_index) {
            std::cmp::Ordering::Equal => (inner.shards[old_index].write(), None),
            std::cmp::Ordering::Less => {
                let a = inner.shards[old_index].write();
                (a, Some(inner.shards[new_index].write()))
            }
            std::cmp::Ordering::Greater => {
                let b = inner.shards[new_index].write();
                (inner.shards[old_index].write(), Some(b))
            }
        };
        let old_shard: &mut Shard = &mut first;
        let old_slot = old_shard
            .find(old_hash, namespace, old_id)
            .filter(|&slot| old_shard.entry(slot).is_some_and(|e| e.is_live(now)))
            .ok_or(StoreError::NotFound)?;
        let new_taken = match second.as_deref() {
            Some(new_shard) => new_shard.find(new_hash, namespace, new_id).is_some(),
            None => old_shard.find(new_hash, namespace, new_id).is_some(),
        };
        if new_taken {
            return Err(StoreError::IdTaken);
        }
        let Some(old) = old_shard.entry(old_slot) else {
            return Err(StoreError::NotFound);
        };
        if owner.is_some_and(|owner| owner != old.packed.user_id()) {
            return Err(StoreError::Conflict {
                expected: old.version,
                actual: old.version,
            });
        }
        let head = Head {
            id: new_id,
            ..old.packed.head()
        };
        let deadline = now.saturating_add(old.ttl);
        let moved = Entry::new(
            Packed::new(&head, old.packed.attrs()),
            old.version.wrapping_add(1),
            old.ttl,
            deadline,
        );
        let record = moved.record(namespace, new_id, deadline, now);
        match second.as_deref_mut() {
            Some(new_shard) => new_shard.insert(new_hash, moved)?,
            None => old_shard.insert(new_hash, moved)?,
        }
        // The old id becomes a tombstone: its snapshot cookies can never restore it.
        if let Some(mut old) = old_shard.entry_mut(old_slot) {
            old.bury(now);
        }
        let (user_id, version) = (&record.user_id, record.version);
        inner.users.remove(namespace, user_id, old_id);
        inner.users.add(namespace, user_id, new_id);
        inner.emit(EventKind::Created, namespace, new_id, user_id, version);
        inner.emit(EventKind::Deleted, namespace, old_id, user_id, version);
        Ok(record)
    }
}
