//! The per-user session cap on MySQL (see [`crate::store::cap`]).
//!
//! A write that makes a session join a user runs in one REPEATABLE READ transaction (set for
//! that transaction, whatever the server's default) that, after its own checks, selects the
//! user's rows `FOR UPDATE` through the `(namespace, user_id)` index: InnoDB then locks every
//! row of the user and the gap after them, so a concurrent write that would add a session to
//! the user (an insert, or an update moving one in) waits for the commit, even when the user
//! had no session yet. The count, the evictions (the oldest rows by `created_ns`, then id,
//! turned into tombstones as a Delete does) and the write commit together: the user never has
//! one session too many, and two writes never share one eviction, whichever servers they run
//! on. Two first sessions of a new user on two servers at once lock the same empty gap and
//! deadlock on their inserts; MySQL rolls one back and the store retries it, which then sees
//! the other's row.
//!
//! Inside one server, writes for one user take turns on a stripe lock of the user (so the
//! database sees no such deadlocks from one server), and hold the stripe locks of the
//! sessions they evict until their DELETED events are sent, as every write does for its own
//! session (see `locks`). The victims are guessed by a plain read before the transaction; if
//! the locked read picks others, the transaction rolls back and runs again with their stripes.

use std::future::Future;
use std::time::SystemTime;

use sqlx::mysql::{MySql, MySqlConnection};
use sqlx::{Connection as _, Row as _, Transaction};
use tokio::sync::MutexGuard;

use super::Inner;
use super::codec::from_unix_ns;
use super::error::{Failure, retrying};
use super::statements::{fixed, one_off};
use crate::store::cap::OnCap;
use crate::store::{EventKind, StoreError, StoreResult};

/// Tries with the stripes of more victims before the write goes ahead without them (they
/// only order events inside this process; the row locks keep the count right regardless).
const RELOCK_ROUNDS: usize = 3;

/// A session the cap evicts.
#[derive(Debug)]
pub(super) struct Victim {
    /// Its id.
    id: String,
    /// Its version, for the DELETED event.
    version: u64,
}

/// What one attempt of a capped write did.
pub(super) enum Capped<T> {
    /// Written (and committed), with the sessions it evicted.
    Done(T, Vec<Victim>),
    /// Rolled back: it would evict sessions whose stripe locks it does not hold (all of the
    /// victims named).
    Relock(Vec<String>),
}

/// The admission a capped write makes inside its transaction.
pub(super) struct CapCheck<'a> {
    /// The user the session joins.
    pub(super) user: &'a str,
    /// The joining session, not counted.
    pub(super) id: &'a str,
    /// Sessions whose stripe locks the write holds.
    pub(super) stripes: &'a [String],
    /// Evict even sessions whose stripes it does not hold (the last round).
    pub(super) force: bool,
}

/// A capped write done: its result, what it evicted, and the stripe locks to hold until the
/// events are sent.
pub(super) struct Admitted<'a, T> {
    /// The write's result.
    pub(super) value: T,
    /// The sessions evicted.
    victims: Vec<Victim>,
    /// The stripe locks of the session and its victims.
    _order: Vec<MutexGuard<'a, ()>>,
    /// The user's stripe lock.
    _user: Vec<MutexGuard<'a, ()>>,
}

/// Begins a REPEATABLE READ transaction on `conn`, whatever the server's default: the
/// admission's locking read relies on gap locks, which READ COMMITTED does not take.
pub(super) async fn begin_locking(
    conn: &mut MySqlConnection,
) -> Result<Transaction<'_, MySql>, Failure> {
    sqlx::raw_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *conn)
        .await?;
    Ok(conn.begin().await?)
}

/// Commits `tx` when the attempt wrote, rolls it back otherwise (a relock, a refusal, an
/// error), so locks are let go at once.
pub(super) async fn settle<T>(
    tx: Transaction<'_, MySql>,
    result: Result<Capped<T>, Failure>,
) -> Result<Capped<T>, Failure> {
    match result {
        Ok(done @ Capped::Done(..)) => {
            tx.commit().await?;
            Ok(done)
        }
        other => {
            let _ = tx.rollback().await;
            other
        }
    }
}

impl Inner {
    /// Runs a write that makes the session `id` join `user` under the session cap: takes the
    /// user's stripe lock, guesses the victims, locks their stripes and the session's, and
    /// runs `attempt` (one whole transaction, retried on deadlocks by the caller's
    /// `retrying`, given the ids whose stripes are held and whether to evict regardless),
    /// again with more stripes while it asks for them.
    pub(super) async fn under_cap<T, F, Fut>(
        &self,
        namespace: &str,
        user: &str,
        id: &str,
        mut attempt: F,
    ) -> StoreResult<Admitted<'_, T>>
    where
        F: FnMut(Vec<String>, bool) -> Fut,
        Fut: Future<Output = StoreResult<Capped<T>>>,
    {
        let user_lock = self.user_locks.lock(namespace, &[user]).await;
        let mut known = self.likely_victims(namespace, user, id).await?;
        for round in 1..=RELOCK_ROUNDS {
            let ids: Vec<&str> = known
                .iter()
                .map(String::as_str)
                .chain(std::iter::once(id))
                .collect();
            let order = self.locks.lock(namespace, &ids).await;
            match attempt(known.clone(), round == RELOCK_ROUNDS).await? {
                Capped::Done(value, victims) => {
                    self.evicted.add(victims.len());
                    return Ok(Admitted {
                        value,
                        victims,
                        _order: order,
                        _user: user_lock,
                    });
                }
                Capped::Relock(more) => {
                    drop(order);
                    for more in more {
                        if !known.contains(&more) {
                            known.push(more);
                        }
                    }
                }
            }
        }
        Err(StoreError::Internal(
            "mysql: session cap admission did not settle".into(),
        ))
    }

    /// The sessions a session joining `user` would evict now, by a plain read (a guess: the
    /// locked read decides).
    async fn likely_victims(
        &self,
        namespace: &str,
        user: &str,
        id: &str,
    ) -> StoreResult<Vec<String>> {
        let cap = self.config.session_cap;
        if cap.on_cap == OnCap::Refuse {
            return Ok(Vec::new());
        }
        let live = retrying(|| async {
            let rows = fixed(&self.sql.ages_by_user)
                .bind(namespace)
                .bind(user)
                .bind(super::sessions::now_ms())
                .fetch_all(&self.pool)
                .await?;
            let mut live = Vec::with_capacity(rows.len());
            for row in &rows {
                let other: String = row.try_get("id")?;
                if other != id {
                    live.push((from_unix_ns(row.try_get("created_ns")?), other));
                }
            }
            Ok(live)
        })
        .await?;
        let victims = cap.victims(live, |(created, id)| (*created, id.as_str()))?;
        Ok(victims.into_iter().map(|(_, id)| id).collect())
    }

    /// The admission, in the write's transaction `tx` at `now`: locks the user's rows (and
    /// the gap after them), and gives the sessions to evict, oldest first, or
    /// [`StoreError::SessionCap`], or (`Err`) the victims whose stripes are not held.
    pub(super) async fn admit_locked(
        &self,
        tx: &mut MySqlConnection,
        namespace: &str,
        check: &CapCheck<'_>,
        now: i64,
    ) -> Result<Result<Vec<Victim>, Vec<String>>, Failure> {
        let rows = fixed(&self.sql.ages_by_user_for_update)
            .bind(namespace)
            .bind(check.user)
            .bind(now)
            .fetch_all(&mut *tx)
            .await?;
        let mut live = Vec::with_capacity(rows.len());
        for row in &rows {
            let id: String = row.try_get("id")?;
            if id != check.id {
                let created: SystemTime = from_unix_ns(row.try_get("created_ns")?);
                live.push((
                    created,
                    Victim {
                        id,
                        version: row.try_get("version")?,
                    },
                ));
            }
        }
        let victims = self
            .config
            .session_cap
            .victims(live, |(created, v)| (*created, v.id.as_str()))?;
        let unheld: Vec<String> = victims
            .iter()
            .filter(|(_, v)| !check.stripes.contains(&v.id))
            .map(|(_, v)| v.id.clone())
            .collect();
        if !check.force && !unheld.is_empty() {
            return Ok(Err(unheld));
        }
        let victims: Vec<Victim> = victims.into_iter().map(|(_, v)| v).collect();
        if !victims.is_empty() {
            let mut bury = one_off(self.sql.bury_ids(victims.len()))
                .bind(now)
                .bind(namespace);
            for victim in &victims {
                bury = bury.bind(victim.id.as_str());
            }
            bury.execute(&mut *tx).await?;
        }
        Ok(Ok(victims))
    }

    /// Sends the DELETED events of a capped write's evictions (before its own event).
    pub(super) fn emit_evicted<T>(
        &self,
        namespace: &str,
        user: &str,
        admitted: &Admitted<'_, T>,
        at: SystemTime,
    ) {
        for victim in &admitted.victims {
            self.emit(
                EventKind::Deleted,
                namespace,
                &victim.id,
                user,
                victim.version,
                at,
            );
        }
    }
}
