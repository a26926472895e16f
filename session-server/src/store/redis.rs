//! The Redis store: one hash per session, its TTL kept by Redis, one Lua script per operation;
//! on one server or on a Redis Cluster. Built only with the `redis-store` feature of this crate
//! (on by default).
//!
//! # Key layout
//! - `{prefix}:{ns}:s:{<id>}`: the session record, expiring with its ttl: `user`, `ver`,
//!   `created` (unix ms, and `created_ns`, the nanoseconds of a restored snapshot's time),
//!   `ttl` (ms), `op` (cluster only: the id of the last write call, see below) and the
//!   attributes. Two formats, both always read (`common.lua` has the details): **format 2**
//!   (written by default), one string, a MessagePack array of strings, so a `Get` is one `GET`
//!   of one small value pipelined with its `PTTL`; and **format 1**, the first release's, a
//!   hash with a field per item (`fmt` = `"1"`, `a:<key>` per attribute), whose
//!   `HGETALL` reply cost the server more to parse than the rest of a `Get`. Writes use
//!   [`RedisConfig::record_format`] (`--redis-record-format`), so a record moves to it on its
//!   next write; a rolling upgrade from a release that reads only format 1 runs the new
//!   servers with format 1 until no old one is left, since an old server takes a format-2
//!   record for an undecodable one (absent, never overwritten).
//! - `{prefix}:{ns}:t:{<id>}`: the tombstone a delete leaves for one ttl of the session: restore
//!   refuses to bring the id back while it lives.
//! - `{prefix}:{ns}:u:{<user>}`: set of the ids of one user's sessions. Kept alive at least as
//!   long as its longest-lived member; may hold ids of sessions that are gone or changed owner,
//!   which readers skip and remove.
//! - `{prefix}:{ns}:c:{<user>}`: on a cluster, the lease a write holds while it makes a session
//!   join a user under the session cap (see `cap`); lives at most the store timeout.
//! - `{prefix}:epoch`: the store's epoch (see `epoch`), a string with no expiry made by the
//!   first store that reads it; a Redis that lost it (flushed, replaced) gets a new one.
//! - `{prefix}:events`: pub/sub channel of the events, published by the scripts themselves so
//!   their order is the order of the writes. Expiries come from Redis' keyspace notifications
//!   (`__keyevent@<db>__:expired`) when its `notify-keyspace-events` includes `Ex`.
//!
//! The braces are Redis Cluster hash tags: a session and its tombstone share the slot of the
//! id, a user's index lives in the slot of the user. A script touches only the keys of one id
//! (`KEYS[1]` routes it), so every script runs in one slot; the one exception is the session
//! cap on one server, where create, update and restore also count and evict the user's
//! other sessions in the same script (see `cap`). Regenerate spans two sessions: it
//! writes the new one before it deletes the old one (only at the version it copied), so a
//! crash in between leaves both (the new one unknown to anyone, and expiring) and never loses
//! data; if the old one was written or deleted meanwhile, the copy is deleted again and the
//! call fails with a conflict or not found. Index entries are added before a create,
//! regenerate or restore and removed after the session is gone, so a crash there leaves at
//! most a stale entry (an owner change adds the new owner's entry right after its script). A
//! record this code cannot decode (another `fmt`, a bad number) is logged and treated as
//! absent, and never overwritten.
//!
//! # Restore
//! The service reads the epoch key fresh, then runs either `update.lua` with the snapshot's
//! base version as the expected one (same epoch) or `restore.lua` (another or no epoch:
//! recreate at version 1 unless the id is live or has a tombstone). These are two steps, on a
//! cluster on two masters; the store docs ([`crate::store`]) say why a flush between them only
//! makes a restore refuse. The epoch check is not repeated inside the script, on one server
//! either: it would not change what a race can do.
//!
//! # Redis Cluster
//! With [`RedisConfig::cluster`], `url` lists seed nodes and commands go through one
//! `redis::cluster_async::ClusterConnection` (see `connection` for why not a pool of them): it
//! learns the slot map from the seeds, sends every command to the master of its key's slot,
//! follows MOVED and ASK, refreshes the slot map and reconnects when a node dies or a replica
//! is promoted, and retries (briefly, with short waits) while a slot has no master. No command
//! spans slots: the reads and deletes behind ListByUser and DeleteByUser are one script call
//! per session, run concurrently, each to its own node. Scripts go by SHA and, on NOSCRIPT
//! (a promoted replica never saw them), by text to the same node.
//!
//! A master dying makes the calls on its slots (or on all, while the cluster reports
//! CLUSTERDOWN) fail with [`StoreError::Unavailable`] or [`StoreError::Timeout`] within the
//! timeout, until a replica takes over (about the cluster's `cluster-node-timeout` plus a
//! second); they never answer wrong data. The client resends a command whose connection broke,
//! even one the dead master had run: each write call carries a unique `op` id, and a script
//! that finds its own op already applied (in the hash, or in the tombstone of a delete)
//! answers as the write it made instead of "taken", "conflict" or "not found". What Redis
//! itself loses is not covered: its replication is asynchronous, so a write acknowledged in the
//! instant before its master dies may not have reached the replica that takes over.
//!
//! A Watch stream on a cluster sees every CREATED, UPDATED and DELETED, each session's in
//! write order (its writes all publish from one master, and the cluster bus keeps their
//! order), but events of sessions on different masters may interleave differently from the
//! order of the writes. EXPIRED events come from a subscription on every master (when their
//! `notify-keyspace-events` include `Ex`). Events published while the subscriber moves off a
//! dead node or subscribes a newly promoted master (at most about a second) are lost, as with
//! any pub/sub reconnect.
//!
//! # Redis Sentinel
//! With [`RedisConfig::sentinel_master`], `url` lists sentinels and the store is the one-server
//! store above, scripts, events, epoch and session cap alike, on whichever server the sentinels
//! name as the primary: every connect of a lane, and of the event subscriber, asks them (see
//! `sentinel`) and checks with `ROLE` that the server is a master. When the primary dies, calls
//! fail with [`StoreError::Unavailable`] (or [`StoreError::Timeout`]) until the sentinels have
//! promoted a replica (their `down-after-milliseconds` plus the election, a few seconds), then
//! reach the new primary without a restart. A lane never writes to a replica: a write there
//! answers `READONLY`, which is Unavailable and makes the lane reconnect through the sentinels
//! (a demoted primary's clients are also disconnected by the sentinels themselves). Plain
//! reads on a lane that still reaches a server being demoted could answer in that instant, as
//! with any Sentinel client. Replication is asynchronous, so a write acknowledged just before
//! the primary dies may be missing on the replica that takes over (as on a cluster); unlike a
//! cluster's client, the lanes never resend a command, so no op ids are needed. The events
//! subscription moves with the primary: events published while it reconnects are lost.
//!
//! # Layout
//! - this file: [`RedisStore`], the [`SessionStore`] methods and the calls of the scripts;
//! - `redis/*.lua`: the scripts, with the helpers of `common.lua` prepended to each; `script`:
//!   how they are sent;
//! - `connection`: the standalone pool or the cluster connection, and error mapping;
//!   `sentinel`: finding the primary through the sentinels;
//! - `codec`: key names, decoding of script replies and of published events;
//! - `config`: [`RedisConfig`]; `events`: the subscriber task (`events/cluster.rs` on a
//!   cluster, with `topology` reading `CLUSTER NODES`); `user_index`: the per-user sets;
//!   `regenerate`: the move to a new id; `restore`: recreating a session from a client's
//!   snapshot; `epoch`: the epoch key, read and refreshed; `cap`: the per-user session cap,
//!   in the write's script on one server and under a per-user lease on a cluster (with its
//!   bounds);
//! - `near_cache`: the optional cache of decoded sessions that plain reads use
//!   (`RedisConfig::cache_capacity`), and `tracking`: the RESP3 `CLIENT TRACKING` connection
//!   whose invalidation pushes keep it exact. Every write of this file drops its sessions'
//!   entries before it is sent and after its reply (`forgetting`); not on a cluster.

mod cap;
mod codec;
mod config;
mod connection;
mod epoch;
mod events;
mod near_cache;
mod regenerate;
mod restore;
mod script;
mod sentinel;
mod topology;
mod tracking;
mod user_index;

pub use self::codec::RecordFormat;
pub use self::config::RedisConfig;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ::redis::{RedisError, Value};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use self::codec::Reply;
use self::connection::{Connection, Connections, redis_error};
use self::epoch::Epoch;
use self::near_cache::{Lookup, NearCache};
use self::script::{OpIds, Scripts};
use self::tracking::Tracking;
use super::cap::Evictions;
use super::{
    EVENT_BUFFER, NearCacheStats, NewSession, Patch, SessionEvent, SessionRecord, SessionStore,
    StoreError, StoreResult,
};

/// A [`SessionStore`] on Redis: one server (at a fixed URL or found through Sentinel) or a
/// Cluster.
pub struct RedisStore {
    /// Where commands and scripts go: a pool (standalone; broken connections fail the recycle
    /// PING and are replaced) or the cluster connection (which repairs itself).
    connections: Connections,
    /// The settings it was built with.
    config: RedisConfig,
    /// The Lua scripts (sent by SHA, by text on NOSCRIPT, e.g. after a restart or failover).
    scripts: Scripts,
    /// Unique ids of write calls, so a write retried by the cluster client is recognised.
    ops: OpIds,
    /// Events decoded by the subscriber task, for [`SessionStore::subscribe`].
    events: broadcast::Sender<SessionEvent>,
    /// The subscriber task, aborted on drop.
    subscriber: JoinHandle<()>,
    /// The store's epoch: the last one read, and how to read it again.
    epoch: Arc<Epoch>,
    /// The task that reads the epoch again every few seconds, aborted on drop.
    epoch_refresh: JoinHandle<()>,
    /// Sessions evicted for the session cap so far (see `cap`).
    evicted: Evictions,
    /// The near cache (`cache_capacity` above 0) and its tracking connection (see
    /// `near_cache`, `tracking`).
    near: Option<Near>,
}

/// A store's near cache, the tracking that keeps it exact, and the tracking task (aborted on
/// drop).
struct Near {
    cache: Arc<NearCache>,
    tracking: Arc<Tracking>,
    task: JoinHandle<()>,
}

impl RedisStore {
    /// Builds the pool and starts the event subscriber. Does not connect: a store pointed at a
    /// Redis that is down starts, its calls fail with [`StoreError::Unavailable`] or
    /// [`StoreError::Timeout`], and it recovers when Redis comes up. Only a malformed URL is an
    /// error. Must be called inside a tokio runtime.
    pub fn new(config: RedisConfig) -> StoreResult<Self> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|e| {
            StoreError::Internal(format!("the redis store needs a tokio runtime: {e}"))
        })?;
        let bad_url = |e: RedisError| StoreError::Internal(format!("invalid redis url: {e}"));
        let connections = Connections::new(&config).map_err(bad_url)?;
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let subscriber = events::Subscriber::new(&config, events.clone())
            .map_err(bad_url)?
            .spawn(&runtime);
        let epoch = Arc::new(Epoch::new(
            &config.key_prefix,
            kind_of(&config),
            config.timeout,
        ));
        let epoch_refresh = Epoch::spawn_refresh(&epoch, connections.clone(), &runtime);
        let near = match config.cache_capacity {
            0 => None,
            _ if config.cluster => {
                return Err(StoreError::Internal(
                    "the near cache (cache-capacity) is not available on a redis cluster: \
                     every master would need its own tracking connection, followed through \
                     failovers and resharding"
                        .into(),
                ));
            }
            capacity => {
                let cache = Arc::new(NearCache::new(capacity));
                let tracking = Arc::new(Tracking::new(&config, cache.clone()).map_err(bad_url)?);
                let task = tracking.spawn(&runtime);
                Some(Near {
                    cache,
                    tracking,
                    task,
                })
            }
        };
        Ok(RedisStore {
            scripts: Scripts::load(config.record_format),
            connections,
            ops: OpIds::new(config.cluster)?,
            config,

            events,
            subscriber,
            epoch,
            epoch_refresh,
            evicted: Evictions::default(),
            near,
        })
    }

    /// Drops the near cache's entries of `ids` now and again when the guard goes (after the
    /// write's reply, or when the call is dropped), so that no read begun before the write
    /// fills the cache with what it read (see `near_cache`).
    fn forgetting(&self, namespace: &str, ids: &[&str]) -> Forget<'_> {
        let keys = match &self.near {
            Some(_) => ids
                .iter()
                .map(|id| self.session_key(namespace, id))
                .collect(),
            None => Vec::new(),
        };
        let forget = Forget { store: self, keys };
        forget.now();
        forget
    }

    /// Runs a write that may evict other sessions of its user for the session cap (inside its
    /// script, so their ids are unknown here); when it did, waits until the tracking connection
    /// has handled their invalidations, so this server never answers an evicted session from
    /// its cache after the write's reply.
    async fn capped_write<T>(&self, write: impl Future<Output = StoreResult<T>>) -> StoreResult<T> {
        let Some(near) = &self.near else {
            return write.await;
        };
        let before = self.evicted.get();
        let result = write.await;
        if self.evicted.get() != before {
            near.tracking.barrier().await;
        }
        result
    }

    /// Runs `call` within the configured timeout; a Redis timeout inside it reports the
    /// store's timeout too.
    async fn within<T>(&self, call: impl Future<Output = StoreResult<T>>) -> StoreResult<T> {
        let timeout = self.config.timeout;
        match tokio::time::timeout(timeout, call).await {
            Ok(Err(StoreError::Timeout(_))) | Err(_) => Err(StoreError::Timeout(timeout)),
            Ok(result) => result,
        }
    }

    /// Runs one store call within the configured timeout, once the store's epoch is known (read
    /// first if it is not yet), so that whatever the call returns can carry it.
    async fn bounded<T>(&self, call: impl Future<Output = StoreResult<T>>) -> StoreResult<T> {
        self.within(async {
            self.epoch.known(&self.connections).await?;
            call.await
        })
        .await
    }

    /// A connection for one call (a pooled one is PINGed first); failures are Unavailable.
    async fn conn(&self) -> StoreResult<Connection> {
        self.connections.get().await
    }

    fn session_key(&self, namespace: &str, id: &str) -> String {
        codec::session_key(&self.config.key_prefix, namespace, id)
    }

    fn user_key(&self, namespace: &str, user: &str) -> String {
        codec::user_key(&self.config.key_prefix, namespace, user)
    }

    fn channel(&self) -> String {
        codec::events_channel(&self.config.key_prefix)
    }

    /// Reads one session: with `touch`, `get.lua` also slides its expiry; without, a plain
    /// `PTTL` + `GET` pipeline (`PTTL` + `HGETALL` for a record of format 1).
    async fn read(
        &self,
        conn: &mut Connection,
        namespace: &str,
        id: &str,
        touch: bool,
    ) -> StoreResult<Reply> {
        let key = self.session_key(namespace, id);
        if touch {
            let reply = self.scripts.get.key(key).invoke_async(conn).await;
            return self.parse(reply);
        }
        // Nothing to write: two plain commands in one round trip cost Redis far less than a
        // script. decode_record checks the fields as strictly as the scripts do. The format
        // this server writes is tried; WRONGTYPE means the other one (or not a session at
        // all), read then by `read.lua` in one atomic step, since another server may rewrite
        // the record in the other format between two plain tries (a rolling upgrade).
        let command = match self.config.record_format {
            RecordFormat::Packed => "GET",
            RecordFormat::Hash => "HGETALL",
        };
        match self.read_plain(conn, &key, command).await? {
            Err(error) if error.code() == "WRONGTYPE" => {
                let reply = self.scripts.read.key(key).invoke_async(conn).await;
                self.parse(reply)
            }
            Err(error) => Err(redis_error(error.into())),
            Ok(reply) => Ok(reply),
        }
    }

    /// `PTTL` and `command` (`GET` or `HGETALL`) of `key` in one round trip. The inner `Err` is
    /// `command`'s own error (WRONGTYPE for a record of the other format).
    async fn read_plain(
        &self,
        conn: &mut Connection,
        key: &str,
        command: &str,
    ) -> StoreResult<Result<Reply, ::redis::ServerError>> {
        // An error of a command is kept as a value, not failing the pipeline.
        let reply: Vec<Value> = ::redis::pipe()
            .ignore_errors()
            .cmd("PTTL")
            .arg(key)
            .cmd(command)
            .arg(key)
            .query_async(conn)
            .await
            .map_err(redis_error)?;
        Ok(match <[Value; 2]>::try_from(reply) {
            // Absent, or deleted between the two commands.
            Ok([Value::Int(-2), _] | [_, Value::Nil]) => Ok(Reply::NotFound),
            Ok([_, Value::Array(flat)]) if flat.is_empty() => Ok(Reply::NotFound),
            Ok([pttl, record @ (Value::BulkString(_) | Value::Array(_))]) => {
                Ok(Reply::Ok(vec![pttl, record]))
            }
            // WRONGTYPE: the caller decides.
            Ok([_, Value::ServerError(error)]) if error.code() == "WRONGTYPE" => Err(error),
            // LOADING, MASTERDOWN and the like: sorted as any other command's error.
            Ok([Value::ServerError(error), _] | [_, Value::ServerError(error)]) => {
                return Err(redis_error(error.into()));
            }
            other => {
                return Err(StoreError::Internal(format!(
                    "unexpected PTTL/{command} reply {other:?}"
                )));
            }
        })
    }

    /// Runs `delete.lua` on one session.
    async fn remove(
        &self,
        conn: &mut Connection,
        namespace: &str,
        id: &str,
        only: DeleteIf<'_>,
    ) -> StoreResult<Reply> {
        // Also the deletes of DeleteByUser, whose ids are known only here.
        let _forget = self.forgetting(namespace, &[id]);
        let number = |n: Option<u64>| n.map(|v| v.to_string()).unwrap_or_default();
        let prefix = &self.config.key_prefix;
        let reply = self
            .scripts
            .delete
            .key(self.session_key(namespace, id))
            .key(codec::tombstone_key(prefix, namespace, id))
            .arg(self.channel())
            .arg(namespace)
            .arg(id)
            .arg(now_ms())
            .arg(number(only.version))
            .arg(if only.owner.is_some() { "1" } else { "0" })
            .arg(only.owner.unwrap_or_default())
            .arg(number(only.event_version))
            .arg(self.ops.next())
            .arg(self.tombstone_ms())
            .invoke_async(conn)
            .await;
        self.parse(reply)
    }

    fn parse(&self, reply: Result<Value, RedisError>) -> StoreResult<Reply> {
        codec::parse_reply(reply.map_err(redis_error)?).map_err(StoreError::Internal)
    }

    /// The record of an `Ok` session reply; `Err(NotFound)` (logged) if it does not decode.
    fn record(
        &self,
        namespace: &str,
        id: &str,
        now: u64,
        values: &[Value],
    ) -> StoreResult<SessionRecord> {
        codec::decode_record(namespace, id, now, values)
            .map_err(|reason| self.corrupt(namespace, id, &reason))
    }

    /// Logs an undecodable record and gives the error it is treated as.
    fn corrupt(&self, namespace: &str, id: &str, reason: &str) -> StoreError {
        self.warn_corrupt(namespace, id, reason);
        StoreError::NotFound
    }

    fn warn_corrupt(&self, namespace: &str, id: &str, reason: &str) {
        let key = self.session_key(namespace, id);
        tracing::warn!(%key, %reason, "undecodable session record in redis, treated as absent");
    }

    /// The values of an `Ok` reply, or the error the reply stands for.
    fn expect_ok(&self, reply: Reply, namespace: &str, id: &str) -> StoreResult<Vec<Value>> {
        match reply {
            Reply::Ok(values) => Ok(values),
            Reply::NotFound | Reply::Mismatch => Err(StoreError::NotFound),
            Reply::Corrupt(reason) => Err(self.corrupt(namespace, id, &reason)),
            Reply::Taken => Err(StoreError::IdTaken),
            Reply::Deleted => Err(StoreError::Deleted),
            Reply::Conflict(actual) => Err(StoreError::Internal(format!(
                "unexpected version conflict at {actual}"
            ))),
            Reply::TooLarge(size) => Err(StoreError::TooLarge {
                size,
                limit: self.config.max_session_bytes,
            }),
            Reply::Capped => Err(StoreError::SessionCap {
                max: self.config.session_cap.max,
            }),
        }
    }

    /// Runs `create.lua`: stores `record` (user, attrs, version, created, ttl) under `id`,
    /// under the session cap when `capped` (see `cap`).
    #[allow(clippy::too_many_arguments)]
    async fn insert(
        &self,
        conn: &mut Connection,
        namespace: &str,
        id: &str,
        record: &SessionRecord,
        limit: usize,
        now: u64,
        capped: bool,
    ) -> StoreResult<SessionRecord> {
        let mut call = self.scripts.create.key(self.session_key(namespace, id));
        if capped && let Some(cap) = self.cap_arg(namespace, &record.user_id, record.ttl) {
            call.arg(cap);
        }
        call.arg(self.channel())
            .arg(namespace)
            .arg(id)
            .arg(now)
            .arg(codec::ttl_ms(record.ttl))
            .arg(limit)
            .arg(&record.user_id)
            .arg(codec::unix_ms(record.created_at))
            .arg(record.version)
            .arg(self.ops.next())
            .arg(codec::sub_ms_nanos(record.created_at));
        for (key, value) in &record.attrs {
            call.arg(key).arg(value.as_slice());
        }
        let reply = self.parse(call.invoke_async(conn).await)?;
        let values = self.expect_ok(reply, namespace, id)?;
        self.count_evicted(values.get(2));
        self.record(namespace, id, now, &values)
    }

    /// Reads a session, sliding its expiry as asked; after a slide, keeps the user's index
    /// alive as long as the session.
    async fn read_sliding(
        &self,
        namespace: &str,
        id: &str,
        slide: Slide,
    ) -> StoreResult<SessionRecord> {
        let mut conn = self.conn().await?;
        let now = now_ms();
        let reply = match slide {
            Slide::Keep => self.read(&mut conn, namespace, id, false).await?,
            Slide::Stored => self.read(&mut conn, namespace, id, true).await?,
            Slide::To(ttl) => {
                let reply = self
                    .scripts
                    .touch
                    .key(self.session_key(namespace, id))
                    .arg(codec::ttl_ms(ttl))
                    .invoke_async(&mut conn)
                    .await;
                self.parse(reply)?
            }
        };
        let record = self.record(namespace, id, now, &self.expect_ok(reply, namespace, id)?)?;
        if !matches!(slide, Slide::Keep) {
            self.index_add(&mut conn, namespace, &record.user_id, id, record.ttl)
                .await?;
        }
        Ok(record)
    }
}

/// The conditions of a delete, and what its event reports.
#[derive(Debug, Default, Clone, Copy)]
struct DeleteIf<'a> {
    /// Only if the stored version is this one (else a conflict).
    version: Option<u64>,
    /// Only if the session belongs to this user (else a mismatch).
    owner: Option<&'a str>,
    /// Version for the DELETED event instead of the stored one.
    event_version: Option<u64>,
}

/// How a read moves the session's expiry.
#[derive(Debug, Clone, Copy)]
enum Slide {
    /// Not at all (a plain get).
    Keep,
    /// To now + its stored ttl (get with touch, touch without ttl).
    Stored,
    /// To now + this ttl, which becomes its stored ttl (touch with ttl).
    To(Duration),
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("config", &self.config)
            .field("connections", &self.connections)
            .finish_non_exhaustive()
    }
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        self.subscriber.abort();
        self.epoch_refresh.abort();
        if let Some(near) = &self.near {
            near.task.abort();
        }
    }
}

/// The near cache keys of one write, invalidated when made and when dropped.
struct Forget<'a> {
    store: &'a RedisStore,
    keys: Vec<String>,
}

impl Forget<'_> {
    fn now(&self) {
        if let Some(near) = &self.store.near {
            for key in &self.keys {
                near.cache.invalidate(key.as_bytes());
            }
        }
    }
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.now();
    }
}

/// The store's name for logs and metrics: its `--store` name.
fn kind_of(config: &RedisConfig) -> &'static str {
    if config.cluster {
        "redis-cluster"
    } else if config.sentinel_master.is_some() {
        "redis-sentinel"
    } else {
        "redis"
    }
}

#[tonic::async_trait]
impl SessionStore for RedisStore {
    fn kind(&self) -> &'static str {
        kind_of(&self.config)
    }

    fn epoch(&self) -> Arc<str> {
        self.epoch.cached()
    }

    async fn current_epoch(&self) -> StoreResult<Arc<str>> {
        self.within(self.epoch.read(&self.connections)).await
    }

    async fn create(&self, new: NewSession) -> StoreResult<SessionRecord> {
        let (namespace, user, id) = (new.namespace.clone(), new.user_id.clone(), new.id.clone());
        let _forget = self.forgetting(&namespace, &[&id]);
        let write = async {
            let mut conn = self.conn().await?;
            let now = now_ms();
            // Index first: a crash after it leaves a stale index entry (skipped by readers),
            // never a session its user cannot list.
            self.index_add(&mut conn, &new.namespace, &new.user_id, &new.id, new.ttl)
                .await?;
            let record = SessionRecord {
                id: new.id.clone(),
                namespace: new.namespace.clone(),
                user_id: new.user_id,
                attrs: new.attrs,
                version: 1,
                created_at: SystemTime::UNIX_EPOCH + Duration::from_millis(now),
                expires_at: SystemTime::UNIX_EPOCH,
                ttl: new.ttl,
            };
            let limit = self.config.max_session_bytes;
            self.insert(
                &mut conn,
                &new.namespace,
                &new.id,
                &record,
                limit,
                now,
                true,
            )
            .await
        };
        let joins = async { Ok(true) };
        self.capped_write(self.bounded(self.capped(&namespace, &user, &id, joins, write)))
            .await
    }

    async fn get(&self, namespace: &str, id: &str, touch: bool) -> StoreResult<SessionRecord> {
        let near = match &self.near {
            Some(near) if !touch => near,
            _ => {
                let slid: &[&str] = if touch { &[id] } else { &[] };
                let _forget = self.forgetting(namespace, slid);
                let slide = if touch { Slide::Stored } else { Slide::Keep };
                return self.bounded(self.read_sliding(namespace, id, slide)).await;
            }
        };
        let key = self.session_key(namespace, id);
        let ticket = match near.cache.lookup(&key, SystemTime::now()) {
            Lookup::Hit(record) => return Ok(record),
            Lookup::Miss(ticket) => Some(ticket),
            Lookup::Bypass => None,
        };
        let record = self
            .bounded(self.read_sliding(namespace, id, Slide::Keep))
            .await?;
        if let Some(ticket) = ticket {
            near.cache.fill(&key, ticket, record.clone());
        }
        Ok(record)
    }

    async fn get_uncached(&self, namespace: &str, id: &str) -> StoreResult<SessionRecord> {
        self.bounded(self.read_sliding(namespace, id, Slide::Keep))
            .await
    }

    async fn update(&self, namespace: &str, id: &str, patch: Patch) -> StoreResult<SessionRecord> {
        let _forget = self.forgetting(namespace, &[id]);
        let user = patch.user_id.as_deref().unwrap_or_default();
        let write = async {
            let mut conn = self.conn().await?;
            let now = now_ms();
            let mut call = self.scripts.update.key(self.session_key(namespace, id));
            if let Some(cap) = self.cap_arg(namespace, user, patch.ttl.unwrap_or_default()) {
                call.arg(cap);
            }
            call.arg(self.channel())
                .arg(namespace)
                .arg(id)
                .arg(now)
                .arg(self.config.max_session_bytes)
                .arg(
                    patch
                        .expected_version
                        .map(|v| v.to_string())
                        .unwrap_or_default(),
                )
                .arg(if patch.user_id.is_some() { "1" } else { "0" })
                .arg(patch.user_id.as_deref().unwrap_or_default())
                .arg(
                    patch
                        .ttl
                        .map(|t| codec::ttl_ms(t).to_string())
                        .unwrap_or_default(),
                )
                .arg(patch.set.len())
                .arg(self.ops.next());
            for (key, value) in &patch.set {
                call.arg(key).arg(value.as_slice());
            }
            for key in &patch.remove {
                call.arg(key);
            }
            let values = match self.parse(call.invoke_async(&mut conn).await)? {
                Reply::Conflict(actual) => {
                    let expected = patch.expected_version.unwrap_or_default();
                    return Err(StoreError::Conflict { expected, actual });
                }
                reply => self.expect_ok(reply, namespace, id)?,
            };
            let record = self.record(namespace, id, now, &values)?;
            let old_user = values.get(2).and_then(codec::text).unwrap_or_default();
            self.count_evicted(values.get(3));
            self.index_add(&mut conn, namespace, &record.user_id, id, record.ttl)
                .await?;
            if old_user != record.user_id {
                self.index_remove(&mut conn, namespace, &old_user, &[id])
                    .await?;
            }
            Ok(record)
        };
        let joins = self.update_joins(namespace, id, user, &patch);
        self.capped_write(self.bounded(self.capped(namespace, user, id, joins, write)))
            .await
    }

    async fn touch(
        &self,
        namespace: &str,
        id: &str,
        ttl: Option<Duration>,
    ) -> StoreResult<SessionRecord> {
        let _forget = self.forgetting(namespace, &[id]);
        let slide = ttl.map_or(Slide::Stored, Slide::To);
        self.bounded(self.read_sliding(namespace, id, slide)).await
    }

    async fn regenerate(
        &self,
        namespace: &str,
        old_id: &str,
        new_id: &str,
    ) -> StoreResult<SessionRecord> {
        let _forget = self.forgetting(namespace, &[old_id, new_id]);
        self.bounded(self.regenerate_in(namespace, old_id, new_id))
            .await
    }

    async fn delete(&self, namespace: &str, id: &str) -> StoreResult<bool> {
        let _forget = self.forgetting(namespace, &[id]);
        self.bounded(async {
            let mut conn = self.conn().await?;
            match self
                .remove(&mut conn, namespace, id, DeleteIf::default())
                .await?
            {
                Reply::Ok(values) => {
                    let user = values.first().and_then(codec::text).unwrap_or_default();
                    self.index_remove(&mut conn, namespace, &user, &[id])
                        .await?;
                    Ok(true)
                }
                Reply::Corrupt(reason) => {
                    self.warn_corrupt(namespace, id, &reason);
                    Ok(false)
                }
                Reply::NotFound => Ok(false),
                other => Err(StoreError::Internal(format!(
                    "unexpected delete reply {other:?}"
                ))),
            }
        })
        .await
    }

    async fn list_by_user(
        &self,
        namespace: &str,
        user_id: &str,
    ) -> StoreResult<Vec<SessionRecord>> {
        self.bounded(async { self.user_sessions(namespace, user_id).await })
            .await
    }

    async fn delete_by_user(&self, namespace: &str, user_id: &str) -> StoreResult<u64> {
        self.bounded(async { self.delete_user_sessions(namespace, user_id).await })
            .await
    }

    async fn restore(&self, record: SessionRecord) -> StoreResult<SessionRecord> {
        let (namespace, id) = (record.namespace.clone(), record.id.clone());
        let _forget = self.forgetting(&namespace, &[&id]);
        self.capped_write(self.bounded(self.restore_in(record)))
            .await
    }

    fn subscribe(&self) -> broadcast::Receiver<SessionEvent> {
        self.events.subscribe()
    }

    fn session_cap_evictions(&self) -> u64 {
        self.evicted.get()
    }

    fn near_cache_stats(&self) -> Option<NearCacheStats> {
        self.near.as_ref().map(|near| near.cache.stats())
    }
}

/// Unix milliseconds now, as passed to the scripts (they never read Redis' clock).
fn now_ms() -> u64 {
    codec::unix_ms(SystemTime::now())
}
