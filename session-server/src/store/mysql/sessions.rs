//! What each store call runs against the database, and the events it sends.
//!
//! Writes that send an event take their sessions' stripe locks (`locks`) first, run one
//! transaction (retried on deadlock), and send the event before letting go of the locks. Each
//! attempt reads the clock afresh; every statement compares `expires_ms` with it. Deletes leave
//! a tombstone for one ttl (see `restore`).

use std::time::{Duration, SystemTime};

use sqlx::mysql::{MySql, MySqlConnection, MySqlRow};
use sqlx::{Row as _, Transaction};

use super::Inner;
use super::cap::{CapCheck, Capped, begin_locking, settle};
use super::codec::{
    StoredRow, encode_attrs, expiry_ms, from_unix_ms, from_unix_ns, ttl_ms, unix_ms, unix_ns,
};
use super::error::{Failure, is_duplicate_key, retrying};
use super::statements::{fixed, one_off};
use crate::store::{
    EventKind, NewSession, Patch, SessionRecord, StoreError, StoreResult, attrs_size,
};

/// Most sessions one DeleteByUser transaction deletes (and stripe locks it holds at once), so a
/// user with very many sessions is logged out in several short transactions.
const DELETE_BY_USER_CHUNK: usize = 100;

/// A row to insert.
pub(super) struct NewRow<'a> {
    /// Namespace of the session.
    pub(super) namespace: &'a str,
    /// Its id.
    pub(super) id: &'a str,
    /// Owner, or empty.
    pub(super) user_id: &'a str,
    /// Encoded attributes.
    pub(super) attrs: &'a [u8],
    /// Version to store.
    pub(super) version: u64,
    /// Creation time, unix ns.
    pub(super) created_ns: i64,
    /// Expiry, unix ms.
    pub(super) expires_ms: i64,
    /// Sliding ttl in ms.
    pub(super) ttl_ms: u64,
}

/// Now, in unix ms of this server's clock.
pub(super) fn now_ms() -> i64 {
    unix_ms(SystemTime::now())
}

/// The live session a select found, or NotFound (also for an undecodable row).
pub(super) fn found(
    row: Option<MySqlRow>,
    namespace: &str,
    id: &str,
) -> Result<SessionRecord, Failure> {
    let row = row.ok_or(Failure::Store(StoreError::NotFound))?;
    StoredRow::from_row(&row)?
        .record(namespace, id)
        .ok_or(Failure::Store(StoreError::NotFound))
}

/// Commits `tx` when `result` is a success, rolls it back otherwise, so a refused write (not
/// found, conflict, too large) lets go of its row lock at once. A rollback that fails (the
/// connection is gone) is left to the pool, which drops such a connection.
pub(super) async fn finish<T>(
    tx: Transaction<'_, MySql>,
    result: Result<T, Failure>,
) -> Result<T, Failure> {
    match result {
        Ok(value) => {
            tx.commit().await?;
            Ok(value)
        }
        Err(e) => {
            let _ = tx.rollback().await;
            Err(e)
        }
    }
}

fn next_version(version: u64) -> Result<u64, Failure> {
    version
        .checked_add(1)
        .ok_or_else(|| StoreError::Internal("session version overflow".into()).into())
}

impl Inner {
    pub(super) async fn create(&self, new: NewSession) -> StoreResult<SessionRecord> {
        self.check_size(attrs_size(&new.attrs))?;
        let blob = encode_attrs(&new.attrs).map_err(StoreError::Internal)?;
        let ttl = ttl_ms(new.ttl);
        let clock = SystemTime::now();
        let now = unix_ms(clock);
        let row = NewRow {
            namespace: &new.namespace,
            id: &new.id,
            user_id: &new.user_id,
            attrs: &blob,
            version: 1,
            created_ns: unix_ns(clock),
            expires_ms: expiry_ms(now, ttl),
            ttl_ms: ttl,
        };
        let capped = if self.config.session_cap.applies_to(&new.user_id) {
            let admitted = self
                .under_cap(&new.namespace, &new.user_id, &new.id, |stripes, force| {
                    self.create_capped(&row, stripes, force, now)
                })
                .await?;
            let at = SystemTime::now();
            self.emit_evicted(&new.namespace, &new.user_id, &admitted, at);
            Some(admitted)
        } else {
            None
        };
        let _order = match &capped {
            Some(_) => Vec::new(),
            None => self.locks.lock(&new.namespace, &[new.id.as_str()]).await,
        };
        let replaced = match &capped {
            Some(admitted) => admitted.value,
            None => {
                retrying(|| async {
                    let mut conn = self.pool.acquire().await?;
                    self.insert_row(&mut conn, &row, now).await
                })
                .await?
            }
        };
        let at = SystemTime::now();
        if replaced {
            self.emit(EventKind::Expired, &new.namespace, &new.id, "", 0, at);
        }
        self.emit(
            EventKind::Created,
            &new.namespace,
            &new.id,
            &new.user_id,
            1,
            at,
        );
        let (created_ns, expires_ms) = (row.created_ns, row.expires_ms);
        Ok(SessionRecord {
            id: new.id,
            namespace: new.namespace,
            user_id: new.user_id,
            attrs: new.attrs,
            version: 1,
            created_at: from_unix_ns(created_ns),
            expires_at: from_unix_ms(expires_ms),
            ttl: Duration::from_millis(ttl),
        })
    }

    /// A create under the session cap: in one transaction, the admission (see `cap`) and the
    /// insert. Returns whether an expired session held the id.
    async fn create_capped(
        &self,
        row: &NewRow<'_>,
        stripes: Vec<String>,
        force: bool,
        now: i64,
    ) -> StoreResult<Capped<bool>> {
        retrying(|| async {
            let mut conn = self.pool.acquire().await?;
            let mut tx = begin_locking(&mut conn).await?;
            let check = CapCheck {
                user: row.user_id,
                id: row.id,
                stripes: &stripes,
                force,
            };
            let written = async {
                match self
                    .admit_locked(&mut tx, row.namespace, &check, now)
                    .await?
                {
                    Err(unheld) => Ok(Capped::Relock(unheld)),
                    Ok(victims) => {
                        let replaced = self.insert_row(&mut tx, row, now).await?;
                        Ok(Capped::Done(replaced, victims))
                    }
                }
            }
            .await;
            settle(tx, written).await
        })
        .await
    }

    /// Inserts `row`. When its id is taken by an expired row (not yet reaped), that row is
    /// deleted and the insert tried once more; returns whether it was an expired session (not a
    /// tombstone). A live session or tombstone with the id is [`StoreError::IdTaken`].
    pub(super) async fn insert_row(
        &self,
        conn: &mut MySqlConnection,
        row: &NewRow<'_>,
        now_ms: i64,
    ) -> Result<bool, Failure> {
        let (mut retried, mut replaced) = (false, false);
        loop {
            let inserted = fixed(&self.sql.insert)
                .bind(row.namespace)
                .bind(row.id)
                .bind(row.user_id)
                .bind(row.attrs)
                .bind(row.version)
                .bind(row.created_ns)
                .bind(row.expires_ms)
                .bind(row.ttl_ms)
                .execute(&mut *conn)
                .await;
            match inserted {
                Ok(_) => return Ok(replaced),
                Err(e) if is_duplicate_key(&e) && !retried => {
                    retried = true;
                    for tombstone in [false, true] {
                        let gone = fixed(&self.sql.delete_expired)
                            .bind(row.namespace)
                            .bind(row.id)
                            .bind(now_ms)
                            .bind(tombstone)
                            .execute(&mut *conn)
                            .await?
                            .rows_affected();
                        if gone > 0 {
                            replaced = !tombstone;
                            break;
                        }
                        if tombstone {
                            return Err(StoreError::IdTaken.into());
                        }
                    }
                }
                Err(e) if is_duplicate_key(&e) => return Err(StoreError::IdTaken.into()),
                Err(e) => return Err(e.into()),
            }
        }
    }

    pub(super) async fn get(&self, namespace: &str, id: &str) -> StoreResult<SessionRecord> {
        retrying(|| async {
            let row = fixed(&self.sql.select)
                .bind(namespace)
                .bind(id)
                .bind(now_ms())
                .fetch_optional(&self.pool)
                .await?;
            found(row, namespace, id)
        })
        .await
    }

    /// Slides the expiry (one `UPDATE` of `expires_ms` and maybe `ttl_ms`), then reads the
    /// session back. No event, version unchanged.
    pub(super) async fn touch(
        &self,
        namespace: &str,
        id: &str,
        ttl: Option<Duration>,
    ) -> StoreResult<SessionRecord> {
        let ttl = ttl.map(ttl_ms);
        retrying(|| async {
            let now = now_ms();
            let mut conn = self.pool.acquire().await?;
            let touched = fixed(&self.sql.touch)
                .bind(now)
                .bind(ttl)
                .bind(ttl)
                .bind(namespace)
                .bind(id)
                .bind(now)
                .execute(&mut *conn)
                .await?
                .rows_affected();
            if touched == 0 {
                return Err(StoreError::NotFound.into());
            }
            let row = fixed(&self.sql.select)
                .bind(namespace)
                .bind(id)
                .bind(now)
                .fetch_optional(&mut *conn)
                .await?;
            found(row, namespace, id)
        })
        .await
    }

    pub(super) async fn update(
        &self,
        namespace: &str,
        id: &str,
        patch: &Patch,
    ) -> StoreResult<SessionRecord> {
        let cap = self.config.session_cap;
        if let Some(user) = patch.user_id.as_deref().filter(|u| cap.applies_to(u)) {
            let admitted = self
                .under_cap(namespace, user, id, |stripes, force| {
                    self.update_capped(namespace, id, patch, user, stripes, force)
                })
                .await?;
            let at = SystemTime::now();
            self.emit_evicted(namespace, user, &admitted, at);
            let record = admitted.value;
            self.emit(
                EventKind::Updated,
                namespace,
                id,
                &record.user_id,
                record.version,
                at,
            );
            return Ok(record);
        }
        let _order = self.locks.lock(namespace, &[id]).await;
        let record = retrying(|| async {
            let mut tx = self.pool.begin().await?;
            let patched = self.patch_locked(&mut tx, namespace, id, patch, None).await;
            finish(tx, patched).await
        })
        .await?;
        let Capped::Done(record, _) = record else {
            return Err(StoreError::Internal(
                "mysql: uncapped patch relocked".into(),
            ));
        };
        let at = SystemTime::now();
        self.emit(
            EventKind::Updated,
            namespace,
            id,
            &record.user_id,
            record.version,
            at,
        );
        Ok(record)
    }

    /// An update that gives the session `user` under the session cap: one attempt of
    /// [`Self::patch_locked`] with the admission, in a REPEATABLE READ transaction.
    async fn update_capped(
        &self,
        namespace: &str,
        id: &str,
        patch: &Patch,
        user: &str,
        stripes: Vec<String>,
        force: bool,
    ) -> StoreResult<Capped<SessionRecord>> {
        retrying(|| async {
            let mut conn = self.pool.acquire().await?;
            let mut tx = begin_locking(&mut conn).await?;
            let check = CapCheck {
                user,
                id,
                stripes: &stripes,
                force,
            };
            let patched = self
                .patch_locked(&mut tx, namespace, id, patch, Some(&check))
                .await;
            settle(tx, patched).await
        })
        .await
    }

    /// One attempt of a patch in transaction `tx`: lock the row, check the version, merge
    /// (removals first, then sets), check the size, admit the session to its new user under
    /// `cap` (if any, and if the user changes), write back at the version read plus one.
    async fn patch_locked(
        &self,
        tx: &mut MySqlConnection,
        namespace: &str,
        id: &str,
        patch: &Patch,
        cap: Option<&CapCheck<'_>>,
    ) -> Result<Capped<SessionRecord>, Failure> {
        let now = now_ms();
        let row = fixed(&self.sql.select_for_update)
            .bind(namespace)
            .bind(id)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
        let mut record = found(row, namespace, id)?;
        if let Some(expected) = patch.expected_version
            && expected != record.version
        {
            return Err(StoreError::Conflict {
                expected,
                actual: record.version,
            }
            .into());
        }
        for name in &patch.remove {
            record.attrs.remove(name);
        }
        for (name, value) in &patch.set {
            record.attrs.insert(name.clone(), value.clone());
        }
        self.check_size(attrs_size(&record.attrs))?;
        let blob = encode_attrs(&record.attrs).map_err(StoreError::Internal)?;
        let joins = patch.user_id.as_ref().is_some_and(|u| *u != record.user_id);
        let victims = match cap {
            Some(check) if joins => match self.admit_locked(tx, namespace, check, now).await? {
                Err(unheld) => return Ok(Capped::Relock(unheld)),
                Ok(victims) => victims,
            },
            _ => Vec::new(),
        };
        if let Some(user_id) = &patch.user_id {
            record.user_id.clone_from(user_id);
        }
        let ttl = patch.ttl.map_or(ttl_ms(record.ttl), ttl_ms);
        let expires = expiry_ms(now, ttl);
        let read_version = record.version;
        record.version = next_version(read_version)?;
        let written = fixed(&self.sql.update)
            .bind(&record.user_id)
            .bind(blob.as_slice())
            .bind(record.version)
            .bind(expires)
            .bind(ttl)
            .bind(namespace)
            .bind(id)
            .bind(read_version)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if written != 1 {
            // Every writer locks the row first, so this cannot happen; say so if it does.
            return Err(StoreError::Internal(format!(
                "mysql: session row changed under its lock ({written} rows written)"
            ))
            .into());
        }
        record.expires_at = from_unix_ms(expires);
        record.ttl = Duration::from_millis(ttl);
        Ok(Capped::Done(record, victims))
    }

    pub(super) async fn regenerate(
        &self,
        namespace: &str,
        old_id: &str,
        new_id: &str,
    ) -> StoreResult<SessionRecord> {
        let _order = self.locks.lock(namespace, &[old_id, new_id]).await;
        let (record, replaced) = retrying(|| async {
            let mut tx = self.pool.begin().await?;
            let moved = self.move_locked(&mut tx, namespace, old_id, new_id).await;
            finish(tx, moved).await
        })
        .await?;
        let (user_id, version, at) = (&record.user_id, record.version, SystemTime::now());
        if replaced {
            self.emit(EventKind::Expired, namespace, new_id, "", 0, at);
        }
        self.emit(EventKind::Created, namespace, new_id, user_id, version, at);
        self.emit(EventKind::Deleted, namespace, old_id, user_id, version, at);
        Ok(record)
    }

    /// One attempt of a regenerate in transaction `tx`: lock the old row, insert its copy (same
    /// attribute blob and created_at, version + 1, expiry slid) under the new id, make the old
    /// row a tombstone. Returns the session and whether an expired one held the new id.
    async fn move_locked(
        &self,
        tx: &mut MySqlConnection,
        namespace: &str,
        old_id: &str,
        new_id: &str,
    ) -> Result<(SessionRecord, bool), Failure> {
        let now = now_ms();
        let row = fixed(&self.sql.select_for_update)
            .bind(namespace)
            .bind(old_id)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(Failure::Store(StoreError::NotFound))?;
        let stored = StoredRow::from_row(&row)?;
        let mut record = stored
            .record(namespace, new_id)
            .ok_or(Failure::Store(StoreError::NotFound))?;
        let copy = NewRow {
            namespace,
            id: new_id,
            user_id: &stored.user_id,
            attrs: &stored.attrs,
            version: next_version(stored.version)?,
            created_ns: stored.created_ns,
            expires_ms: expiry_ms(now, stored.ttl_ms),
            ttl_ms: stored.ttl_ms,
        };
        let replaced = self.insert_row(tx, &copy, now).await?;
        fixed(&self.sql.bury)
            .bind(now)
            .bind(namespace)
            .bind(old_id)
            .execute(&mut *tx)
            .await?;
        record.version = copy.version;
        record.expires_at = from_unix_ms(copy.expires_ms);
        Ok((record, replaced))
    }

    pub(super) async fn delete(&self, namespace: &str, id: &str) -> StoreResult<bool> {
        let _order = self.locks.lock(namespace, &[id]).await;
        let deleted = retrying(|| async {
            let now = now_ms();
            let mut tx = self.pool.begin().await?;
            let Some(row) = fixed(&self.sql.owner_for_update)
                .bind(namespace)
                .bind(id)
                .bind(now)
                .fetch_optional(&mut *tx)
                .await?
            else {
                tx.rollback().await?;
                return Ok(None);
            };
            let owner: (String, u64) = (row.try_get("user_id")?, row.try_get("version")?);
            fixed(&self.sql.bury)
                .bind(now)
                .bind(namespace)
                .bind(id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(Some(owner))
        })
        .await?;
        let Some((user_id, version)) = deleted else {
            // Missing, or expired and not yet reaped: nothing live was deleted.
            return Ok(false);
        };
        let at = SystemTime::now();
        self.emit(EventKind::Deleted, namespace, id, &user_id, version, at);
        Ok(true)
    }

    pub(super) async fn list_by_user(
        &self,
        namespace: &str,
        user_id: &str,
    ) -> StoreResult<Vec<SessionRecord>> {
        retrying(|| async {
            let rows = fixed(&self.sql.list_by_user)
                .bind(namespace)
                .bind(user_id)
                .bind(now_ms())
                .fetch_all(&self.pool)
                .await?;
            let mut sessions = Vec::with_capacity(rows.len());
            for row in &rows {
                let id: String = row.try_get("id")?;
                // An undecodable row was logged by `record` and is skipped.
                if let Some(record) = StoredRow::from_row(row)?.record(namespace, &id) {
                    sessions.push(record);
                }
            }
            Ok(sessions)
        })
        .await
    }

    /// Deletes the sessions the user has now, in chunks of [`DELETE_BY_USER_CHUNK`], each
    /// checked again (still live, still the user's) under its row lock.
    pub(super) async fn delete_by_user(&self, namespace: &str, user_id: &str) -> StoreResult<u64> {
        let ids: Vec<String> = retrying(|| async {
            let rows = fixed(&self.sql.ids_by_user)
                .bind(namespace)
                .bind(user_id)
                .bind(now_ms())
                .fetch_all(&self.pool)
                .await?;
            let ids: Result<Vec<String>, sqlx::Error> =
                rows.iter().map(|row| row.try_get("id")).collect();
            Ok(ids?)
        })
        .await?;
        let mut deleted = 0;
        for chunk in ids.chunks(DELETE_BY_USER_CHUNK) {
            let chunk: Vec<&str> = chunk.iter().map(String::as_str).collect();
            let _order = self.locks.lock(namespace, &chunk).await;
            let gone = retrying(|| self.delete_owned(namespace, user_id, &chunk)).await?;
            let at = SystemTime::now();
            for (id, version) in &gone {
                self.emit(EventKind::Deleted, namespace, id, user_id, *version, at);
            }
            deleted += gone.len() as u64;
        }
        Ok(deleted)
    }

    /// Turns those of `ids` that are live and owned by `user_id` into tombstones; returns their
    /// ids and versions.
    async fn delete_owned(
        &self,
        namespace: &str,
        user_id: &str,
        ids: &[&str],
    ) -> Result<Vec<(String, u64)>, Failure> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        let mut select = one_off(self.sql.owned_for_update(ids.len()))
            .bind(namespace)
            .bind(user_id)
            .bind(now);
        for id in ids {
            select = select.bind(*id);
        }
        let rows = select.fetch_all(&mut *tx).await?;
        let owned: Result<Vec<(String, u64)>, sqlx::Error> = rows
            .iter()
            .map(|row| Ok((row.try_get("id")?, row.try_get("version")?)))
            .collect();
        let owned = owned?;
        if owned.is_empty() {
            tx.rollback().await?;
            return Ok(owned);
        }
        let mut bury = one_off(self.sql.bury_ids(owned.len()))
            .bind(now)
            .bind(namespace);
        for (id, _) in &owned {
            bury = bury.bind(id.as_str());
        }
        bury.execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(owned)
    }
}
