//! The Lua scripts of the Redis store, the op ids of its write calls, and how scripts are sent:
//! by SHA (`EVALSHA`), and on `NOSCRIPT` by their full text (`EVAL`, which also caches them on
//! that server).
//!
//! `redis::Script` answers `NOSCRIPT` with `SCRIPT LOAD`, which a cluster connection sends to
//! *every* node it knows, so a single unreachable node (a master that just died) fails the load
//! even though the node that owns the key is fine; and a promoted replica never saw the
//! scripts its old master loaded. `EVAL` goes where `EVALSHA` went: the node of `KEYS[1]`.

use std::sync::atomic::{AtomicU64, Ordering};

use ::redis::aio::ConnectionLike;
use ::redis::{Cmd, ErrorKind, FromRedisValue, RedisResult, ServerErrorKind, ToRedisArgs};

use super::codec::RecordFormat;
use crate::store::{StoreError, StoreResult};

/// The scripts, each with the shared helpers of `common.lua` prepended.
pub(super) struct Scripts {
    /// `create.lua`: a new session (also the new id of a regenerate).
    pub(super) create: LuaScript,
    /// `get.lua`: read and slide the expiry.
    pub(super) get: LuaScript,
    /// `read.lua`: read either format in one step, writing nothing.
    pub(super) read: LuaScript,
    /// `update.lua`: attribute patch, compare-and-set, owner and ttl change.
    pub(super) update: LuaScript,
    /// `touch.lua`: slide the expiry, optionally to a new ttl.
    pub(super) touch: LuaScript,
    /// `delete.lua`: delete, optionally only at a version or for an owner; leaves a tombstone.
    pub(super) delete: LuaScript,
    /// `restore.lua`: a session recreated from a client's snapshot, unless live or deleted.
    pub(super) restore: LuaScript,
    /// `index_add.lua`: add an id to a user's index and keep the index alive.
    pub(super) index_add: LuaScript,
    /// `lease_take.lua`: take a user's session-cap lease unless another call holds it (see
    /// `cap`).
    pub(super) lease_take: LuaScript,
    /// `lease_release.lua`: end a user's session-cap lease if it is still the caller's (see
    /// `cap`).
    pub(super) lease_release: LuaScript,
}

impl Scripts {
    /// The scripts of this build, writing records in `format` (see `common.lua`).
    pub(super) fn load(format: RecordFormat) -> Self {
        let with_helpers = |body: &str| {
            LuaScript::new(format!(
                "local WRITE_FORMAT = '{}'\n{}\n{body}",
                format.lua(),
                include_str!("common.lua")
            ))
        };
        Scripts {
            create: with_helpers(include_str!("create.lua")),
            get: with_helpers(include_str!("get.lua")),
            read: with_helpers(include_str!("read.lua")),
            update: with_helpers(include_str!("update.lua")),
            touch: with_helpers(include_str!("touch.lua")),
            delete: with_helpers(include_str!("delete.lua")),
            restore: with_helpers(include_str!("restore.lua")),
            index_add: LuaScript::new(include_str!("index_add.lua").to_string()),
            lease_take: LuaScript::new(include_str!("lease_take.lua").to_string()),
            lease_release: LuaScript::new(include_str!("lease_release.lua").to_string()),
        }
    }
}

/// One script: its text and its SHA1.
pub(super) struct LuaScript {
    /// The full text, for `EVAL` after a `NOSCRIPT`.
    code: String,
    /// Hex SHA1 of the text, for `EVALSHA`.
    hash: String,
}

impl LuaScript {
    /// A script of this text (helpers, if any, already prepended).
    pub(super) fn new(code: String) -> Self {
        let hash = ::redis::Script::new(&code).get_hash().to_string();
        LuaScript { code, hash }
    }

    /// A call of this script on `key` (its `KEYS[1]`, by which a cluster routes it).
    pub(super) fn key(&self, key: impl ToRedisArgs) -> ScriptCall<'_> {
        let mut call = ScriptCall {
            script: self,
            keys: Vec::new(),
            args: Vec::new(),
        };
        key.write_redis_args(&mut call.keys);
        call
    }
}

/// A prepared call: keys and arguments of one script run.
pub(super) struct ScriptCall<'a> {
    /// The script to run.
    script: &'a LuaScript,
    /// `KEYS`: all in one hash slot (the first one routes the call).
    keys: Vec<Vec<u8>>,
    /// `ARGV`.
    args: Vec<Vec<u8>>,
}

impl ScriptCall<'_> {
    /// Adds a key (`KEYS[n]`); it must share the slot of the first.
    pub(super) fn key(&mut self, key: impl ToRedisArgs) -> &mut Self {
        key.write_redis_args(&mut self.keys);
        self
    }

    /// Adds an argument (`ARGV[n]`).
    pub(super) fn arg(&mut self, arg: impl ToRedisArgs) -> &mut Self {
        arg.write_redis_args(&mut self.args);
        self
    }

    /// Runs the script by SHA, and by text if the server does not have it.
    pub(super) async fn invoke_async<T: FromRedisValue>(
        &self,
        conn: &mut impl ConnectionLike,
    ) -> RedisResult<T> {
        match self
            .command("EVALSHA", &self.script.hash)
            .query_async(conn)
            .await
        {
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                self.command("EVAL", &self.script.code)
                    .query_async(conn)
                    .await
            }
            other => other,
        }
    }

    fn command(&self, name: &str, script: &str) -> Cmd {
        let mut cmd = ::redis::cmd(name);
        cmd.arg(script)
            .arg(self.keys.len())
            .arg(self.keys.as_slice())
            .arg(self.args.as_slice());
        cmd
    }
}

/// Unique ids of the write calls of one store, the `op` of the scripts: a write the cluster
/// client retried after its reply was lost (the node died after applying it) is then answered
/// as done instead of failing as "taken", "conflict" or "not found". Random per store, counted
/// per call. A standalone store passes none: its connections never resend a command.
#[derive(Debug)]
pub(super) struct OpIds {
    /// Random part, unique to this store instance; `None` for a standalone store.
    prefix: Option<String>,
    /// Counter of calls.
    next: AtomicU64,
}

impl OpIds {
    /// Op ids for a cluster store; none (`""`) for a standalone one.
    pub(super) fn new(cluster: bool) -> StoreResult<Self> {
        let prefix = if cluster {
            let id = crate::id::IdGenerator::new()
                .generate()
                .map_err(|_| StoreError::Internal("no random source for op ids".into()))?;
            // 16 base64 characters: 96 random bits.
            Some(id.chars().take(16).collect())
        } else {
            None
        };
        Ok(OpIds {
            prefix,
            next: AtomicU64::new(0),
        })
    }

    /// A new op id, or `""` (none).
    pub(super) fn next(&self) -> String {
        match &self.prefix {
            Some(prefix) => format!("{prefix}.{}", self.next.fetch_add(1, Ordering::Relaxed)),
            None => String::new(),
        }
    }
}
