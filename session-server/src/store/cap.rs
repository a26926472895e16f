//! The per-user session cap (`--max-sessions-per-user`, `--on-session-cap`): Spring Security's
//! `maximumSessions` (with `maxSessionsPreventsLogin` as [`OnCap::Refuse`]), kept by the store.
//!
//! A session *joins* a user when it is created with that user (Create, or a Restore that
//! recreates it), or when a write gives it that user (an Update or a same-epoch Restore whose
//! patch sets `user_id` to someone other than its owner). When the user already has
//! [`SessionCap::max`] live sessions in the namespace, the store either deletes the oldest of
//! them (by creation time, then id) as a Delete would, with its DELETED event and tombstone,
//! before the new one joins ([`OnCap::EvictOldest`]), or refuses the write with
//! [`StoreError::SessionCap`] and writes nothing ([`OnCap::Refuse`]). Anonymous sessions are
//! never capped; Regenerate keeps the session's user and count. A cap lowered since sessions
//! were made trims a user to it at the next session that joins (evicting several).
//!
//! How each store makes the count, the eviction and the write one step is in its module docs:
//! the memory store under a per-user lock, Redis standalone in the write's own Lua script,
//! Redis Cluster under a per-user lease (the user's keys and the session's are in different
//! slots), MySQL in the write's transaction with the user's rows locked.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use serde::Deserialize;

use super::{StoreError, StoreResult};
use crate::config::Settings;

/// What a store does when a session would join a user who is at the cap.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnCap {
    /// Delete the user's oldest sessions (by creation time, then id) to make room, as Spring
    /// Security's `maximumSessions` expires the least recently used one.
    #[default]
    EvictOldest,
    /// Refuse the new one (RESOURCE_EXHAUSTED), as `maxSessionsPreventsLogin(true)` does.
    Refuse,
}

impl OnCap {
    /// The name `--on-session-cap` takes.
    pub fn name(self) -> &'static str {
        match self {
            OnCap::EvictOldest => "evict-oldest",
            OnCap::Refuse => "refuse",
        }
    }
}

/// The per-user session cap a store is built with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionCap {
    /// Most live sessions one user may have in one namespace; 0 means no cap.
    pub max: u32,
    /// What happens to the session past the cap.
    pub on_cap: OnCap,
}

impl SessionCap {
    /// No cap (the default).
    pub const UNLIMITED: SessionCap = SessionCap {
        max: 0,
        on_cap: OnCap::EvictOldest,
    };

    /// The cap `settings` ask for (`max_sessions_per_user`, `on_session_cap`).
    pub fn from_settings(settings: &Settings) -> SessionCap {
        SessionCap {
            max: settings.max_sessions_per_user,
            on_cap: settings.on_session_cap,
        }
    }

    /// Whether a session joining `user_id` is capped: a cap is set and the user is not empty.
    pub fn applies_to(&self, user_id: &str) -> bool {
        self.max > 0 && !user_id.is_empty()
    }

    /// What to do with a user's other live sessions, `live`, before one more joins: the ones
    /// to evict, oldest first (`created_at`, then id, as `key` gives them), or
    /// [`StoreError::SessionCap`] when the cap refuses. Empty when there is room.
    pub fn victims<T>(
        &self,
        mut live: Vec<T>,
        key: impl Fn(&T) -> (SystemTime, &str),
    ) -> StoreResult<Vec<T>> {
        let max = usize::try_from(self.max).unwrap_or(usize::MAX);
        if max == 0 || live.len() < max {
            return Ok(Vec::new());
        }
        if self.on_cap == OnCap::Refuse {
            return Err(StoreError::SessionCap { max: self.max });
        }
        live.sort_by(|a, b| key(a).cmp(&key(b)));
        live.truncate(live.len() + 1 - max);
        Ok(live)
    }
}

/// Sessions a store evicted for the cap so far, for `stickless_session_cap_total`.
#[derive(Debug, Default)]
pub(crate) struct Evictions(AtomicU64);

impl Evictions {
    /// Counts `n` more.
    pub(crate) fn add(&self, n: usize) {
        if n > 0 {
            self.0
                .fetch_add(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
        }
    }

    /// How many so far.
    pub(crate) fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn at(ms: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
    }

    fn key(s: &(SystemTime, String)) -> (SystemTime, &str) {
        (s.0, s.1.as_str())
    }

    #[test]
    fn the_oldest_go_first_ties_by_id_and_enough_to_make_room() {
        let cap = SessionCap {
            max: 2,
            on_cap: OnCap::EvictOldest,
        };
        let live = vec![
            (at(3), "c".to_owned()),
            (at(1), "b".to_owned()),
            (at(1), "a".to_owned()),
            (at(2), "d".to_owned()),
        ];
        let victims = cap.victims(live, key).unwrap();
        let ids: Vec<&str> = victims.iter().map(|v| v.1.as_str()).collect();
        assert_eq!(
            ids,
            ["a", "b", "d"],
            "4 live, cap 2: three go, oldest first"
        );
        assert!(
            cap.victims(vec![(at(1), "a".to_owned())], key)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn refuse_and_unlimited() {
        let refuse = SessionCap {
            max: 1,
            on_cap: OnCap::Refuse,
        };
        let one = vec![(at(1), "a".to_owned())];
        assert!(matches!(
            refuse.victims(one.clone(), key),
            Err(StoreError::SessionCap { max: 1 })
        ));
        assert!(refuse.victims(Vec::new(), key).unwrap().is_empty());
        assert!(SessionCap::UNLIMITED.victims(one, key).unwrap().is_empty());
        assert!(!SessionCap::UNLIMITED.applies_to("u"));
        assert!(!refuse.applies_to(""));
        assert!(refuse.applies_to("u"));
    }
}
