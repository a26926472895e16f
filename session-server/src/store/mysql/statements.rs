//! The text of every statement, with the table name filled in once at start-up. Every read and
//! write of a session carries `deleted = 0 AND expires_ms > ?` (the server's clock), so neither
//! an expired row nor a tombstone is ever seen as a session, whether the reaper got to it or
//! not.

use std::sync::Arc;

use sqlx::mysql::{MySql, MySqlArguments};
use sqlx::query::Query;

use super::codec::ROW_COLUMNS;

/// What makes a row a live session: `(namespace, id, now)`.
const LIVE: &str = "namespace = ? AND id = ? AND deleted = 0 AND expires_ms > ?";

/// What a tombstone keeps: the version (and ttl) of the deleted session, for one ttl from
/// `now` (the first parameter of every statement using it).
const BURY: &str = "deleted = 1, user_id = '', attrs = '', expires_ms = ? + ttl_ms";

/// The statements of one session table.
#[derive(Debug)]
pub(super) struct Statements {
    /// The table name, backquoted.
    table: String,
    /// A live session: `(namespace, id, now)`.
    pub(super) select: Arc<str>,
    /// A live session, row-locked for a write: `(namespace, id, now)`.
    pub(super) select_for_update: Arc<str>,
    /// Whatever row holds an id (session, expired session or tombstone), row-locked, with its
    /// `deleted` flag: `(namespace, id)`.
    pub(super) any_for_update: Arc<str>,
    /// Owner and version of a live session, row-locked for a delete: `(namespace, id, now)`.
    pub(super) owner_for_update: Arc<str>,
    /// A new row: `(namespace, id, user_id, attrs, version, created_ns, expires_ms, ttl_ms)`.
    pub(super) insert: Arc<str>,
    /// Removes an expired row (a session if `deleted` is 0, a tombstone if 1) in the way of a
    /// create: `(namespace, id, now, deleted)`.
    pub(super) delete_expired: Arc<str>,
    /// Slides the expiry, optionally setting a new ttl first:
    /// `(now, ttl or NULL, ttl or NULL, namespace, id, now)`. It assigns `expires_ms` before
    /// `ttl_ms` and reads only the old `ttl_ms`, so it means the same under MariaDB's
    /// `SIMULTANEOUS_ASSIGNMENT` mode as under MySQL's left-to-right assignment.
    pub(super) touch: Arc<str>,
    /// Writes a patched session:
    /// `(user_id, attrs, new version, expires_ms, ttl_ms, namespace, id, old version)`.
    pub(super) update: Arc<str>,
    /// Overwrites a whole row with a live session (a restore):
    /// `(user_id, attrs, version, created_ns, expires_ms, ttl_ms, namespace, id)`.
    pub(super) replace: Arc<str>,
    /// Turns a session (whose row the transaction has locked) into a tombstone:
    /// `(now, namespace, id)`.
    pub(super) bury: Arc<str>,
    /// The live sessions of a user: `(namespace, user_id, now)`.
    pub(super) list_by_user: Arc<str>,
    /// The ids of a user's live sessions: `(namespace, user_id, now)`.
    pub(super) ids_by_user: Arc<str>,
    /// Ids and creation times of a user's live sessions, a plain read (the session cap's guess
    /// at its victims): `(namespace, user_id, now)`.
    pub(super) ages_by_user: Arc<str>,
    /// Ids, creation times and versions of a user's live sessions, with every row of the user
    /// and the gap after them locked through the `by_user` index, so that no session can join
    /// the user until the transaction ends (the session cap's count): `(namespace, user_id,
    /// now)`.
    pub(super) ages_by_user_for_update: Arc<str>,
    /// The reaper's next batch (sessions and tombstones), soonest expiry first, row-locked:
    /// `(now, limit)`.
    pub(super) reap_select: Arc<str>,
}

impl Statements {
    /// The statements of `table` (unquoted, already validated as `[A-Za-z0-9_]{1,64}`).
    pub(super) fn new(table: &str) -> Self {
        let t = format!("`{table}`");
        let text = |sql: String| Arc::<str>::from(sql);
        let by_user = "namespace = ? AND user_id = ? AND deleted = 0 AND expires_ms > ?";
        Statements {
            select: text(format!("SELECT {ROW_COLUMNS} FROM {t} WHERE {LIVE}")),
            select_for_update: text(format!(
                "SELECT {ROW_COLUMNS} FROM {t} WHERE {LIVE} FOR UPDATE"
            )),
            any_for_update: text(format!(
                "SELECT deleted, {ROW_COLUMNS} FROM {t} WHERE namespace = ? AND id = ? \
                 FOR UPDATE"
            )),
            owner_for_update: text(format!(
                "SELECT user_id, version FROM {t} WHERE {LIVE} FOR UPDATE"
            )),
            insert: text(format!(
                "INSERT INTO {t} (namespace, id, user_id, attrs, version, created_ns, \
                 expires_ms, ttl_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
            )),
            delete_expired: text(format!(
                "DELETE FROM {t} WHERE namespace = ? AND id = ? AND expires_ms <= ? \
                 AND deleted = ?"
            )),
            touch: text(format!(
                "UPDATE {t} SET expires_ms = ? + COALESCE(?, ttl_ms), \
                 ttl_ms = COALESCE(?, ttl_ms) WHERE {LIVE}"
            )),
            update: text(format!(
                "UPDATE {t} SET user_id = ?, attrs = ?, version = ?, expires_ms = ?, ttl_ms = ? \
                 WHERE namespace = ? AND id = ? AND version = ?"
            )),
            replace: text(format!(
                "UPDATE {t} SET user_id = ?, attrs = ?, version = ?, created_ns = ?, \
                 expires_ms = ?, ttl_ms = ?, deleted = 0 WHERE namespace = ? AND id = ?"
            )),
            bury: text(format!(
                "UPDATE {t} SET {BURY} WHERE namespace = ? AND id = ?"
            )),
            list_by_user: text(format!("SELECT id, {ROW_COLUMNS} FROM {t} WHERE {by_user}")),
            ids_by_user: text(format!("SELECT id FROM {t} WHERE {by_user}")),
            ages_by_user: text(format!("SELECT id, created_ns FROM {t} WHERE {by_user}")),
            ages_by_user_for_update: text(format!(
                "SELECT id, created_ns, version FROM {t} FORCE INDEX (by_user) \
                 WHERE {by_user} FOR UPDATE"
            )),
            reap_select: text(format!(
                "SELECT namespace, id, user_id, deleted FROM {t} WHERE expires_ms <= ? \
                 ORDER BY expires_ms LIMIT ? FOR UPDATE"
            )),
            table: t,
        }
    }

    /// Ids and versions of those of `n` sessions that are live and owned by a user,
    /// row-locked: `(namespace, user_id, now, id × n)`.
    pub(super) fn owned_for_update(&self, n: usize) -> String {
        format!(
            "SELECT id, version FROM {} WHERE namespace = ? AND user_id = ? AND deleted = 0 \
             AND expires_ms > ? AND id IN ({}) FOR UPDATE",
            self.table,
            placeholders(n)
        )
    }

    /// Turns `n` sessions (whose rows the transaction has locked) into tombstones:
    /// `(now, namespace, id × n)`.
    pub(super) fn bury_ids(&self, n: usize) -> String {
        format!(
            "UPDATE {} SET {BURY} WHERE namespace = ? AND id IN ({})",
            self.table,
            placeholders(n)
        )
    }

    /// Deletes `n` rows (whose rows the transaction has locked): `(namespace, id × n)`.
    pub(super) fn delete_ids(&self, n: usize) -> String {
        format!(
            "DELETE FROM {} WHERE namespace = ? AND id IN ({})",
            self.table,
            placeholders(n)
        )
    }
}

/// `?, ?, …` (`n` of them).
fn placeholders(n: usize) -> String {
    vec!["?"; n].join(", ")
}

/// A query of one of the fixed statements (cached as a prepared statement per connection).
pub(super) fn fixed<'q>(sql: &Arc<str>) -> Query<'q, MySql, MySqlArguments> {
    sqlx::query(sqlx::AssertSqlSafe(Arc::clone(sql)))
}

/// A query of a statement built for one call (an `IN` list): not kept prepared, since its text
/// varies with the length of the list.
pub(super) fn one_off<'q>(sql: String) -> Query<'q, MySql, MySqlArguments> {
    sqlx::query(sqlx::AssertSqlSafe(sql)).persistent(false)
}
