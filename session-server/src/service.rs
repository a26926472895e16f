//! The tonic `session.v1.SessionStore` service: input validation, TTL policy, id making, error
//! mapping to gRPC codes, metrics and logs. Storage itself is the [`SessionStore`]'s job.
//!
//! Codes: NOT_FOUND (missing or expired), INVALID_ARGUMENT (malformed id, namespace, user, key,
//! ttl, or a session over the size limit), ABORTED (compare-and-set conflict; a Restore the
//! store wins), FAILED_PRECONDITION (a Restore of a session deleted or expired in the store's
//! epoch), UNAVAILABLE (store unreachable), DEADLINE_EXCEEDED (store silent past its timeout;
//! a call past `--call-timeout` gets it from the server's deadline, `deadline.rs`),
//! RESOURCE_EXHAUSTED (a watcher fell behind; a Watch on a namespace that has its most
//! watchers, see `watchers`; a session past the user's session cap under
//! `--on-session-cap refuse`, see [`crate::store::cap`]), INTERNAL (a bug), PERMISSION_DENIED
//! (the call's token may not reach the namespace, or is read-only and the method writes: see
//! `admit`).
//! UNAUTHENTICATED comes before the service, from the token check.
//!
//! # Epochs
//! Every session returned carries the store's epoch ([`SessionStore::epoch`]). A NOT_FOUND
//! from a session lookup (Get, Update, Touch, Regenerate) carries the epoch read fresh from the
//! store ([`SessionStore::current_epoch`]) in the response metadata [`EPOCH_METADATA`], or no
//! epoch if that read fails. Restore reads it fresh too and applies the rules of
//! `session.proto` (see `restore`): the same epoch patches the stored session at the base
//! version through [`SessionStore::update`] (absent or deleted: FAILED_PRECONDITION; another
//! version: ABORTED), another or no epoch recreates it at version 1 through
//! [`SessionStore::restore`] (present: ABORTED; a tombstone: FAILED_PRECONDITION).

mod lifetime;
mod page;
mod restore;
mod watchers;

pub use lifetime::{ENDS_AT_ATTR, TouchGranularity};
pub use page::{DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE};

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::{Stream, StreamExt as _};
use session_proto::v1;
use session_proto::v1::session_store_server::SessionStore as SessionStoreApi;
use tokio::sync::watch;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tonic::metadata::MetadataValue;
use tonic::{Code, Request, Response, Status};

use crate::auth::{Access, Scope};
use crate::id::{self, IdGenerator};
use crate::metrics::Metrics;
use crate::store::{
    EventKind, NewSession, Patch, SessionEvent, SessionRecord, SessionStore, StoreError,
    StoreResult, attrs_size,
};

/// The response metadata of a NOT_FOUND answer that carries the store's current epoch (the same
/// name as session-client's `EPOCH_METADATA`).
pub const EPOCH_METADATA: &str = "stickless-epoch";

/// Namespace used when a request leaves it empty.
pub const DEFAULT_NAMESPACE: &str = "default";
/// Longest namespace: it is part of every store key.
pub const MAX_NAMESPACE_LEN: usize = 64;
/// Longest user id, in bytes: it is part of the user-index key.
pub const MAX_USER_ID_LEN: usize = 256;
/// Longest attribute key, in bytes.
pub const MAX_ATTR_KEY_LEN: usize = 256;
/// Longest write id (`UpdateRequest.write_id`, `RestoreRequest.write_id`), in bytes.
pub const MAX_WRITE_ID_LEN: usize = 64;
/// Most `RestoreRequest.own_write_ids`.
pub const MAX_OWN_WRITE_IDS: usize = 8;
/// The attribute a session's write id (`Session.write_id`) is kept in: with the attributes,
/// so that every store writes it atomically with the patch that made the version, with no
/// schema or record format of its own. Attribute keys starting with NUL are reserved for it
/// (INVALID_ARGUMENT); it never leaves the server as an attribute (see [`to_proto`]), and it
/// does not count toward `--max-session-bytes` ([`crate::store::attrs_size`]).
pub const WRITE_ID_ATTR: &str = "\0write_id";
/// Tries at making a fresh id before giving up; a collision of 192 random bits means the random
/// source is broken, so more tries would not help.
const ID_TRIES: usize = 3;

/// The TTL and size policy the service applies before a store sees a request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Ttl of sessions created without one.
    pub default_ttl: Duration,
    /// Largest ttl; longer requested ones are clamped to it.
    pub max_ttl: Duration,
    /// Cap on a session's attributes (keys plus values) in bytes.
    pub max_session_bytes: usize,
}

/// The gRPC service over one store.
#[derive(Clone)]
pub struct SessionService {
    /// Where sessions live.
    store: Arc<dyn SessionStore>,
    /// Source of new session ids.
    ids: IdGenerator,
    /// TTL and size policy.
    limits: Limits,
    /// Call counters and latency.
    metrics: Metrics,
    /// Flips to true at shutdown, ending Watch streams so graceful shutdown can finish.
    shutdown: watch::Receiver<bool>,
    /// Watch streams open per namespace, and the most one may have.
    watchers: Arc<watchers::Watchers>,
    /// The server's absolute lifetime of sessions (`--max-lifetime`), if any.
    max_lifetime: Option<Duration>,
    /// Least expiry move a touch writes (`--touch-granularity`).
    granularity: TouchGranularity,
}

impl SessionService {
    /// A service over `store`. Watch streams end when `shutdown` turns true.
    pub fn new(
        store: Arc<dyn SessionStore>,
        limits: Limits,
        metrics: Metrics,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            store,
            ids: IdGenerator::new(),
            limits,
            metrics,
            shutdown,
            watchers: watchers::Watchers::new(
                crate::config::DEFAULT_MAX_WATCHERS_PER_NAMESPACE,
                crate::config::DEFAULT_MAX_WATCHERS,
            ),
            max_lifetime: None,
            granularity: TouchGranularity::AUTO,
        }
    }

    /// The same service with an absolute lifetime for every session (`--max-lifetime`; `None`:
    /// only per-session ones) and a touch granularity (`--touch-granularity`); see
    /// [`lifetime`](self::lifetime).
    pub fn with_lifetimes(
        mut self,
        max_lifetime: Option<Duration>,
        granularity: TouchGranularity,
    ) -> Self {
        self.max_lifetime = max_lifetime;
        self.granularity = granularity;
        self
    }

    /// Get (`touch` false) or a touch with the session's own ttl (Get with touch, Touch
    /// without a ttl): read first (from the store itself with `uncached`, see
    /// `GetRequest.bypass_cache`), and written only when the slide moves the expiry by at
    /// least the granularity (counted in `stickless_touches_total`).
    async fn get_or_touch(
        &self,
        namespace: &str,
        id: &str,
        touch: bool,
        new_ttl: Option<Duration>,
        uncached: bool,
    ) -> StoreResult<SessionRecord> {
        let read = if uncached {
            self.store.get_uncached(namespace, id).await?
        } else {
            self.store.get(namespace, id, false).await?
        };
        let read = lifetime::alive(read)?;
        if !touch {
            return Ok(read);
        }
        let same_ttl = new_ttl.is_none_or(|ttl| ttl == read.ttl);
        if same_ttl && lifetime::touch_is_skippable(&read, self.granularity, SystemTime::now()) {
            self.metrics.touch("skipped");
            return Ok(read);
        }
        let written = match new_ttl {
            Some(ttl) => self.store.touch(namespace, id, Some(ttl)).await?,
            None => self.store.get(namespace, id, true).await?,
        };
        self.metrics.touch("written");
        lifetime::alive(written)
    }

    /// The same service with at most `max` Watch streams open at once on one namespace
    /// (`--max-watchers-per-namespace`); past it a Watch is RESOURCE_EXHAUSTED. Without it,
    /// [`crate::config::DEFAULT_MAX_WATCHERS_PER_NAMESPACE`].
    pub fn with_max_watchers_per_namespace(self, max: usize) -> Self {
        self.with_max_watchers(max, crate::config::DEFAULT_MAX_WATCHERS)
    }

    /// The same service with at most `per_namespace` Watch streams open at once on one
    /// namespace (`--max-watchers-per-namespace`) and `total` over all namespaces
    /// (`--max-watchers`); past either a Watch is RESOURCE_EXHAUSTED.
    pub fn with_max_watchers(mut self, per_namespace: usize, total: usize) -> Self {
        self.watchers = watchers::Watchers::new(per_namespace, total);
        self
    }

    /// Runs one call, recording its code and latency, and logging failures that are the
    /// server's (UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL) at warn level and the client's at
    /// debug level.
    async fn observed<T>(
        &self,
        method: &'static str,
        call: impl Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        let start = Instant::now();
        let result = call.await;
        let code = result.as_ref().map_or_else(Status::code, |_| Code::Ok);
        self.metrics.observe_call(method, code, start.elapsed());
        if let Err(status) = &result {
            if matches!(
                code,
                Code::Unavailable | Code::DeadlineExceeded | Code::Internal
            ) {
                tracing::warn!(method, code = ?code, message = status.message(), "call failed");
            } else {
                tracing::debug!(method, code = ?code, message = status.message(), "call refused");
            }
        }
        result
    }

    /// Maps a store failure to its gRPC status, counting the store's own failures.
    fn status(&self, error: StoreError) -> Status {
        let kind = match &error {
            StoreError::NotFound => return Status::not_found(error.to_string()),
            StoreError::Conflict { .. } => return Status::aborted(error.to_string()),
            StoreError::TooLarge { .. } => return Status::invalid_argument(error.to_string()),
            StoreError::Deleted => return Status::failed_precondition(error.to_string()),
            StoreError::SessionCap { .. } => {
                self.metrics.session_cap("refused");
                return Status::resource_exhausted(error.to_string());
            }
            StoreError::Unavailable(_) => "unavailable",
            StoreError::Timeout(_) => "timeout",
            StoreError::IdTaken | StoreError::Internal(_) => "internal",
        };
        self.metrics.store_error(self.store.kind(), kind);
        match error {
            StoreError::Unavailable(_) => Status::unavailable(error.to_string()),
            StoreError::Timeout(_) => Status::deadline_exceeded(error.to_string()),
            _ => Status::internal(error.to_string()),
        }
    }

    /// Like [`Self::status`], and a NOT_FOUND carries the store's current epoch, read fresh, in
    /// [`EPOCH_METADATA`] (none when that read fails: the client then cannot tell a lost
    /// session from a deleted one, and does not restore).
    async fn failure(&self, error: StoreError) -> Status {
        if !matches!(error, StoreError::NotFound) {
            return self.status(error);
        }
        let mut status = Status::not_found(error.to_string());
        match self.store.current_epoch().await {
            Ok(epoch) => match MetadataValue::try_from(&*epoch) {
                Ok(value) => {
                    status.metadata_mut().insert(EPOCH_METADATA, value);
                }
                Err(_) => tracing::warn!(%epoch, "the store's epoch is not valid metadata"),
            },
            Err(error) => {
                tracing::debug!(%error, "NOT_FOUND sent without the store's epoch");
            }
        }
        status
    }

    /// The wire form of a stored session, with the store's epoch.
    fn session(&self, record: SessionRecord) -> v1::Session {
        to_proto(record, &self.store.epoch())
    }

    /// The answer of a call that returns one session.
    async fn answer(
        &self,
        result: StoreResult<SessionRecord>,
    ) -> Result<Response<v1::Session>, Status> {
        match result {
            Ok(record) => Ok(Response::new(self.session(record))),
            Err(error) => Err(self.failure(error).await),
        }
    }

    /// Checks the parts of a patch (Update, and a Restore's offline changes): keys and size of
    /// `set`, keys of `remove` and none in both, the new user.
    fn check_patch(
        &self,
        set: &HashMap<String, Vec<u8>>,
        remove: &[String],
        user_id: Option<&str>,
    ) -> Result<(), Status> {
        self.check_size(set)?;
        for key in remove {
            check_attr_key(key)?;
            if set.contains_key(key) {
                return Err(Status::invalid_argument(format!(
                    "attribute {key:?} is both set and removed"
                )));
            }
        }
        if let Some(user) = user_id {
            check_user(user)?;
        }
        Ok(())
    }

    fn new_id(&self) -> Result<String, Status> {
        self.ids
            .generate()
            .map_err(|_| Status::internal("the system random source failed"))
    }

    /// A requested ttl resolved against the policy: absent means `None`, above max is clamped.
    fn ttl(&self, requested: Option<prost_types::Duration>) -> Result<Option<Duration>, Status> {
        let Some(requested) = requested else {
            return Ok(None);
        };
        let ttl = Duration::try_from(requested)
            .map_err(|_| Status::invalid_argument("ttl must be a positive duration"))?;
        if ttl.is_zero() {
            return Err(Status::invalid_argument("ttl must be above zero"));
        }
        Ok(Some(ttl.min(self.limits.max_ttl)))
    }

    fn check_size(&self, attrs: &HashMap<String, Vec<u8>>) -> Result<(), Status> {
        for key in attrs.keys() {
            check_attr_key(key)?;
        }
        let size = attrs_size(attrs);
        if size > self.limits.max_session_bytes {
            return Err(self.status(StoreError::TooLarge {
                size,
                limit: self.limits.max_session_bytes,
            }));
        }
        Ok(())
    }
}

/// Whether `name` is a namespace as written out: 1 to 64 of `[A-Za-z0-9_.-]`, since it
/// becomes part of store keys.
pub fn is_valid_namespace(name: &str) -> bool {
    let allowed = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-');
    (1..=MAX_NAMESPACE_LEN).contains(&name.len()) && name.bytes().all(allowed)
}

/// The namespace to use: empty means [`DEFAULT_NAMESPACE`]; otherwise it must be valid
/// ([`is_valid_namespace`]).
pub fn namespace(requested: &str) -> Result<String, Status> {
    if requested.is_empty() {
        return Ok(DEFAULT_NAMESPACE.to_owned());
    }
    if !is_valid_namespace(requested) {
        return Err(Status::invalid_argument(format!(
            "namespace must be 1 to {MAX_NAMESPACE_LEN} characters of [A-Za-z0-9_.-]"
        )));
    }
    Ok(requested.to_owned())
}

/// The message of `request` and its namespace (resolved by [`namespace`]), once the call's
/// token may use `method`, which needs `access`, there. The token check put the token's
/// [`Scope`] in the request's extensions; a request without one was admitted unscoped (no
/// token is configured). Checked before the rest of the message, so a token outside its scope
/// learns nothing about what else it got wrong.
fn admit<T>(
    request: Request<T>,
    method: &str,
    access: Access,
    namespace_of: impl FnOnce(&T) -> &str,
) -> Result<(T, String), Status> {
    let namespace = namespace(namespace_of(request.get_ref()))?;
    if let Some(scope) = request.extensions().get::<Scope>() {
        scope.check(method, access, &namespace)?;
    }
    Ok((request.into_inner(), namespace))
}

fn check_id(id: &str) -> Result<(), Status> {
    if id::is_valid(id) {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "malformed session id: expected {} base64url characters",
            id::ID_LEN
        )))
    }
}

fn check_user(user_id: &str) -> Result<(), Status> {
    if user_id.len() > MAX_USER_ID_LEN || user_id.contains(char::is_control) {
        return Err(Status::invalid_argument(format!(
            "user_id must be at most {MAX_USER_ID_LEN} bytes without control characters"
        )));
    }
    Ok(())
}

/// A user id that must name someone (ListByUser, DeleteByUser).
fn check_named_user(user_id: &str) -> Result<(), Status> {
    check_user(user_id)?;
    if user_id.is_empty() {
        return Err(Status::invalid_argument("user_id must not be empty"));
    }
    Ok(())
}

fn check_attr_key(key: &str) -> Result<(), Status> {
    if key.is_empty() || key.len() > MAX_ATTR_KEY_LEN {
        return Err(Status::invalid_argument(format!(
            "attribute keys must be 1 to {MAX_ATTR_KEY_LEN} bytes"
        )));
    }
    if key.starts_with('\0') {
        return Err(Status::invalid_argument(
            "attribute keys starting with NUL are reserved for the server",
        ));
    }
    Ok(())
}

fn check_write_id(write_id: &str) -> Result<(), Status> {
    if write_id.len() > MAX_WRITE_ID_LEN || write_id.contains(char::is_control) {
        return Err(Status::invalid_argument(format!(
            "write_id must be at most {MAX_WRITE_ID_LEN} bytes without control characters"
        )));
    }
    Ok(())
}

/// Stamps a patch with the write id of the version it makes ([`WRITE_ID_ATTR`]): written when
/// the caller gave one, removed otherwise (a later write without one must not leave an older
/// write's id on the version it makes).
fn stamp(set: &mut HashMap<String, Vec<u8>>, remove: &mut Vec<String>, write_id: &str) {
    if write_id.is_empty() {
        remove.push(WRITE_ID_ATTR.to_owned());
    } else {
        set.insert(WRITE_ID_ATTR.to_owned(), write_id.as_bytes().to_vec());
    }
}

/// The write id a stored session carries ([`WRITE_ID_ATTR`]; empty when none).
fn write_id_of(record: &SessionRecord) -> &str {
    record
        .attrs
        .get(WRITE_ID_ATTR)
        .and_then(|id| std::str::from_utf8(id).ok())
        .unwrap_or("")
}

/// The wire form of a stored session, in a store of epoch `epoch`.
pub fn to_proto(mut record: SessionRecord, epoch: &str) -> v1::Session {
    let write_id = record
        .attrs
        .remove(WRITE_ID_ATTR)
        .and_then(|id| String::from_utf8(id).ok())
        .unwrap_or_default();
    let ends_at = lifetime::ends_at_of(&record);
    record.attrs.remove(ENDS_AT_ATTR);
    let expires_at = match ends_at {
        Some(ends_at) => record.expires_at.min(ends_at),
        None => record.expires_at,
    };
    v1::Session {
        write_id,
        id: record.id,
        namespace: record.namespace,
        user_id: record.user_id,
        attrs: record.attrs,
        version: record.version,
        created_at: Some(record.created_at.into()),
        expires_at: Some(expires_at.into()),
        ttl: prost_types::Duration::try_from(record.ttl).ok(),
        epoch: epoch.to_owned(),
        ends_at: ends_at.map(Into::into),
    }
}

fn event_to_proto(event: SessionEvent) -> v1::SessionEvent {
    let kind = match event.kind {
        EventKind::Created => v1::session_event::Kind::Created,
        EventKind::Updated => v1::session_event::Kind::Updated,
        EventKind::Deleted => v1::session_event::Kind::Deleted,
        EventKind::Expired => v1::session_event::Kind::Expired,
        // Ends the stream before it is ever converted (see `watch`).
        EventKind::Gap => v1::session_event::Kind::Unspecified,
    };
    v1::SessionEvent {
        kind: kind.into(),
        id: event.id,
        user_id: event.user_id,
        version: event.version,
        at: Some(event.at.into()),
        namespace: event.namespace,
    }
}

/// The stream type of Watch.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<v1::SessionEvent, Status>> + Send>>;

#[tonic::async_trait]
impl SessionStoreApi for SessionService {
    async fn create(
        &self,
        request: Request<v1::CreateRequest>,
    ) -> Result<Response<v1::Session>, Status> {
        self.observed("Create", async {
            let (req, namespace) = admit(request, "Create", Access::Write, |r| &r.namespace)?;
            check_user(&req.user_id)?;
            self.check_size(&req.attrs)?;
            let ttl = self
                .ttl(req.ttl)?
                .unwrap_or(self.limits.default_ttl.min(self.limits.max_ttl));
            let mut attrs = req.attrs;
            if let Some(lifetime) = lifetime::resolve(req.max_lifetime, self.max_lifetime)? {
                let ends_at = SystemTime::now() + lifetime;
                attrs.insert(ENDS_AT_ATTR.to_owned(), lifetime::encode_ends_at(ends_at));
            }
            let mut new = NewSession {
                id: String::new(),
                namespace,
                user_id: req.user_id,
                attrs,
                ttl,
            };
            for _ in 0..ID_TRIES {
                new.id = self.new_id()?;
                match self.store.create(new.clone()).await {
                    Err(StoreError::IdTaken) => continue,
                    result => return self.answer(result).await,
                }
            }
            Err(self.status(StoreError::IdTaken))
        })
        .await
    }

    async fn get(&self, request: Request<v1::GetRequest>) -> Result<Response<v1::Session>, Status> {
        self.observed("Get", async {
            let (req, namespace) = admit(request, "Get", Access::Read, |r| &r.namespace)?;
            check_id(&req.id)?;
            self.answer(
                self.get_or_touch(&namespace, &req.id, req.touch, None, req.bypass_cache)
                    .await,
            )
            .await
        })
        .await
    }

    async fn update(
        &self,
        request: Request<v1::UpdateRequest>,
    ) -> Result<Response<v1::Session>, Status> {
        self.observed("Update", async {
            let (req, namespace) = admit(request, "Update", Access::Write, |r| &r.namespace)?;
            check_id(&req.id)?;
            self.check_patch(&req.set, &req.remove, req.user_id.as_deref())?;
            check_write_id(&req.write_id)?;
            let (mut set, mut remove) = (req.set, req.remove);
            stamp(&mut set, &mut remove, &req.write_id);
            if req.max_lifetime.is_some() {
                // counted from created_at, which only a read tells (a session past its end
                // is NOT_FOUND here already)
                let lifetime = lifetime::resolve(req.max_lifetime, self.max_lifetime)?;
                let stored = self
                    .store
                    .get(&namespace, &req.id, false)
                    .await
                    .and_then(lifetime::alive);
                let stored = match stored {
                    Ok(stored) => stored,
                    Err(error) => return Err(self.failure(error).await),
                };
                if let Some(lifetime) = lifetime {
                    let ends_at = stored.created_at + lifetime;
                    set.insert(ENDS_AT_ATTR.to_owned(), lifetime::encode_ends_at(ends_at));
                }
            }
            let patch = Patch {
                set,
                remove,
                expected_version: req.expected_version,
                user_id: req.user_id,
                ttl: self.ttl(req.ttl)?,
            };
            let updated = self.store.update(&namespace, &req.id, patch).await;
            self.answer(updated.and_then(lifetime::alive)).await
        })
        .await
    }

    async fn touch(
        &self,
        request: Request<v1::TouchRequest>,
    ) -> Result<Response<v1::Session>, Status> {
        self.observed("Touch", async {
            let (req, namespace) = admit(request, "Touch", Access::Write, |r| &r.namespace)?;
            check_id(&req.id)?;
            let ttl = self.ttl(req.ttl)?;
            self.answer(
                self.get_or_touch(&namespace, &req.id, true, ttl, false)
                    .await,
            )
            .await
        })
        .await
    }

    async fn regenerate(
        &self,
        request: Request<v1::RegenerateRequest>,
    ) -> Result<Response<v1::Session>, Status> {
        self.observed("Regenerate", async {
            let (req, namespace) = admit(request, "Regenerate", Access::Write, |r| &r.namespace)?;
            check_id(&req.id)?;
            for _ in 0..ID_TRIES {
                let new_id = self.new_id()?;
                match self.store.regenerate(&namespace, &req.id, &new_id).await {
                    Err(StoreError::IdTaken) => continue,
                    result => return self.answer(result.and_then(lifetime::alive)).await,
                }
            }
            Err(self.status(StoreError::IdTaken))
        })
        .await
    }

    async fn delete(
        &self,
        request: Request<v1::DeleteRequest>,
    ) -> Result<Response<v1::DeleteResponse>, Status> {
        self.observed("Delete", async {
            let (req, namespace) = admit(request, "Delete", Access::Write, |r| &r.namespace)?;
            check_id(&req.id)?;
            let deleted = self
                .store
                .delete(&namespace, &req.id)
                .await
                .map_err(|e| self.status(e))?;
            Ok(Response::new(v1::DeleteResponse { deleted }))
        })
        .await
    }

    async fn list_by_user(
        &self,
        request: Request<v1::ListByUserRequest>,
    ) -> Result<Response<v1::ListByUserResponse>, Status> {
        self.observed("ListByUser", async {
            let (req, namespace) = admit(request, "ListByUser", Access::Read, |r| &r.namespace)?;
            check_named_user(&req.user_id)?;
            let size = page::page_size(req.page_size);
            let after = page::start_after(&req.page_token)?;
            let records = self
                .store
                .list_by_user(&namespace, &req.user_id)
                .await
                .map_err(|e| self.status(e))?;
            let now = SystemTime::now();
            let records = records
                .into_iter()
                .filter_map(|r| lifetime::alive_at(r, now).ok())
                .collect();
            let (records, next_page_token) = page::page(records, after.as_deref(), size);
            Ok(Response::new(v1::ListByUserResponse {
                sessions: records.into_iter().map(|r| self.session(r)).collect(),
                next_page_token,
            }))
        })
        .await
    }

    async fn delete_by_user(
        &self,
        request: Request<v1::DeleteByUserRequest>,
    ) -> Result<Response<v1::DeleteByUserResponse>, Status> {
        self.observed("DeleteByUser", async {
            let (req, namespace) = admit(request, "DeleteByUser", Access::Write, |r| &r.namespace)?;
            check_named_user(&req.user_id)?;
            let deleted = self
                .store
                .delete_by_user(&namespace, &req.user_id)
                .await
                .map_err(|e| self.status(e))?;
            Ok(Response::new(v1::DeleteByUserResponse { deleted }))
        })
        .await
    }

    async fn restore(
        &self,
        request: Request<v1::RestoreRequest>,
    ) -> Result<Response<v1::Session>, Status> {
        self.observed("Restore", async {
            let (req, namespace) = admit(request, "Restore", Access::Write, |r| &r.namespace)?;
            self.restore_call(req, namespace).await
        })
        .await
    }

    type WatchStream = EventStream;

    async fn watch(
        &self,
        request: Request<v1::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.observed("Watch", async {
            let (req, namespace) = admit(request, "Watch", Access::Read, |r| &r.namespace)?;
            check_user(&req.user_id)?;
            // Counted until the stream ends, whoever ends it.
            let open = self.watchers.admit(&namespace, &self.metrics)?;
            let user = req.user_id;
            let mut shutdown = self.shutdown.clone();
            let stopped = async move {
                // An error means the server is gone, which is a stop too.
                let _ = shutdown.wait_for(|stop| *stop).await;
            };
            let events = BroadcastStream::new(self.store.subscribe())
                .filter_map(move |item| {
                    let out = match item {
                        Ok(event) if event.kind == EventKind::Gap => {
                            Some(Err(Status::unavailable(
                                "the store's event feed was interrupted: events may have been \
                                 missed; re-read and watch again",
                            )))
                        }
                        Ok(event)
                            if event.namespace == namespace
                                && (user.is_empty() || event.user_id == user) =>
                        {
                            Some(Ok(event_to_proto(event)))
                        }
                        Ok(_) => None,
                        Err(BroadcastStreamRecvError::Lagged(missed)) => {
                            Some(Err(Status::resource_exhausted(format!(
                                "watcher fell {missed} events behind; re-read and watch again"
                            ))))
                        }
                    };
                    std::future::ready(out)
                })
                // Nothing after an error: the client must re-read.
                .scan(false, |failed, item| {
                    let keep = !*failed;
                    *failed |= item.is_err();
                    std::future::ready(keep.then_some(item))
                })
                .take_until(Box::pin(stopped))
                // The stream owns its place under the limit: tonic drops the stream when it
                // ends or the client goes, and the place with it.
                .map(move |item| {
                    let _open = &open;
                    item
                });
            Ok(Response::new(Box::pin(events) as EventStream))
        })
        .await
    }
}
