//! The typed gRPC client of the session server.
//!
//! One [`SessionClient`] holds one tonic `Channel` (HTTP/2, multiplexed) per session server, so
//! clones share the connections. Several session servers over one store are one logical store:
//! each call goes to the less busy of two healthy ones, an unreachable one is ejected and probed
//! back with `grpc.health.v1` (see [`crate::endpoints`]). The namespace and the auth token are set
//! once in [`ClientConfig`]. Every call is bounded by a timeout; idempotent calls (get, touch,
//! delete, list, delete-by-user, restore, and update with `expected_version`) that find a server
//! unreachable are tried once more at once on another server, then retried with exponential
//! backoff; writes that are not idempotent (create, update without `expected_version`,
//! regenerate) are never replayed, except on another server when the first could not even be
//! connected to (the call was never sent).
//!
//! The endpoint's scheme decides the transport, and nothing else does: `https://` is always
//! TLS ([`ClientConfig::tls`], the system's roots when it is `None`), `http://` is cleartext
//! and refuses TLS settings, any other scheme is refused.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use session_proto::v1;
use session_proto::v1::session_store_client::SessionStoreClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::endpoints::{EndpointState, Endpoints, Member};
use crate::tls::ClientTls;

/// Where and how to reach the session server. Its `Debug` output never shows the token.
#[derive(Clone)]
pub struct ClientConfig {
    /// The session servers, one logical store: each `https://host:port` (TLS) or
    /// `http://host:port` (cleartext). A host name that resolves to several addresses is one
    /// server per address, re-resolved every `resolve_interval`.
    pub endpoints: Vec<String>,
    /// TLS settings of an `https://` endpoint: the CA bundle its certificate must chain to and
    /// the client identity for mTLS. `None` with `https://`: the system's roots, no client
    /// certificate. Given with an `http://` endpoint, it is a configuration error.
    pub tls: Option<ClientTls>,
    /// Application namespace for every call (empty: `default`).
    pub namespace: String,
    /// Bearer token, when the server requires one.
    pub auth_token: Option<String>,
    /// Bound on one call, including waiting for a connection.
    pub timeout: Duration,
    /// Bound on establishing the connection.
    pub connect_timeout: Duration,
    /// Extra tries of an idempotent call that found the server unavailable.
    pub retries: u32,
    /// Wait before the first retry; doubles each time.
    pub backoff: Duration,
    /// How often the host names of `endpoints` are resolved again.
    pub resolve_interval: Duration,
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("endpoints", &self.endpoints)
            .field("tls", &self.tls)
            .field("namespace", &self.namespace)
            .field("auth_token", &self.auth_token.as_ref().map(|_| "<hidden>"))
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("retries", &self.retries)
            .field("backoff", &self.backoff)
            .field("resolve_interval", &self.resolve_interval)
            .finish()
    }
}

impl ClientConfig {
    /// Settings for the session servers `endpoints`: one URL, or several comma-separated
    /// (`http://a:50051,http://b:50051`). Defaults: namespace `default`, no token, 1 s per call,
    /// 2 retries from 25 ms, names resolved again every 30 s; for `https://` endpoints, the
    /// system's roots.
    pub fn new(endpoints: impl AsRef<str>) -> Self {
        ClientConfig {
            endpoints: split_endpoints(endpoints.as_ref()),
            tls: None,
            namespace: String::new(),
            auth_token: None,
            timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_millis(500),
            retries: 2,
            backoff: Duration::from_millis(25),
            resolve_interval: Duration::from_secs(30),
        }
    }

    /// Checks everything short of connecting, as [`SessionClient::connect_lazy`] does: at
    /// least one endpoint, each `http://` or `https://` with a host, TLS settings only with
    /// `https://`, their PEM holds what it should, the client key fits its certificate, an
    /// `https://` endpoint without a CA bundle finds system roots, the token is ASCII. A binary
    /// calls it to refuse a bad configuration at start.
    pub fn validate(&self) -> Result<(), ClientError> {
        if self.endpoints.is_empty() {
            return Err(ClientError::Config(
                "no session server endpoint given".into(),
            ));
        }
        for url in &self.endpoints {
            self.endpoint_for(url, None)?;
        }
        self.auth().map(|_| ())
    }

    /// The `authorization` value of every call.
    fn auth(&self) -> Result<Option<MetadataValue<Ascii>>, ClientError> {
        match &self.auth_token {
            Some(token) => Ok(Some(
                MetadataValue::try_from(format!("Bearer {token}"))
                    .map_err(|_| ClientError::Config("auth token is not valid ASCII".into()))?,
            )),
            None => Ok(None),
        }
    }

    /// The tonic endpoint of one session server `url` (TLS set up for `https://`). `named` is
    /// the host and URL a resolved address stands for: TLS verifies that host's certificate and
    /// requests name it, not the address.
    pub(crate) fn endpoint_for(
        &self,
        url: &str,
        named: Option<(&str, &http::Uri)>,
    ) -> Result<Endpoint, ClientError> {
        let transport = self.transport(url)?;
        let mut endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|e| ClientError::Config(format!("bad endpoint {url:?}: {e}")))?;
        if let Some((_, origin)) = named {
            endpoint = endpoint.origin(origin.clone());
        }
        if transport == Transport::Tls {
            let tls = self.tls.clone().unwrap_or_default();
            let mut tls_config = tls.tonic_config(self.connect_timeout);
            if let Some((host, _)) = named {
                tls_config = tls_config.domain_name(host);
            }
            endpoint = endpoint.tls_config(tls_config).map_err(|e| {
                let roots = if tls.ca_pem.is_some() {
                    "the given CA bundle"
                } else {
                    "the system's roots, as no CA bundle is given"
                };
                let identity = if tls.identity.is_some() {
                    ", presenting the client certificate"
                } else {
                    ""
                };
                ClientError::Config(format!(
                    "cannot set up TLS for {url:?} (trusting {roots}{identity}): {}",
                    error_chain(&e)
                ))
            })?;
        }
        // No channel-wide `timeout`: tonic fails a call past it as CANCELLED, which would read as
        // an outage; every call is bounded by the client's own timer instead (`TimedOut`).
        Ok(endpoint
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10)))
    }

    /// The transport the endpoint's scheme asks for, once the scheme, the host and the TLS
    /// settings' PEM are checked.
    fn transport(&self, url: &str) -> Result<Transport, ClientError> {
        let uri: http::Uri = url
            .parse()
            .map_err(|e| ClientError::Config(format!("bad endpoint {url:?}: {e}")))?;
        let transport = match uri.scheme_str() {
            Some("https") => Transport::Tls,
            Some("http") if self.tls.is_some() => {
                return Err(ClientError::Config(format!(
                    "TLS settings (CA bundle or client certificate) are given for the cleartext \
                     endpoint {url:?}: use an https:// URL for TLS, or drop the TLS settings"
                )));
            }
            Some("http") => Transport::Cleartext,
            _ => {
                return Err(ClientError::Config(format!(
                    "endpoint {url:?} must be https://host:port (TLS) or http://host:port \
                     (cleartext)"
                )));
            }
        };
        if uri.host().is_none_or(str::is_empty) {
            return Err(ClientError::Config(format!("endpoint {url:?} has no host")));
        }
        if let Some(tls) = &self.tls {
            tls.check()?;
        }
        Ok(transport)
    }
}

/// How the client reaches the server, decided by the endpoint's scheme alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    /// `http://`: cleartext HTTP/2.
    Cleartext,
    /// `https://`: TLS, always.
    Tls,
}

/// Why a call failed, told apart the way callers decide on it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// No such live session. `epoch` is the store's current epoch as the server read it with
    /// this answer (metadata `stickless-epoch`; `None` from a server that does not send it): a
    /// snapshot of the same epoch stands for a session that was deleted or expired, one of
    /// another epoch for a session the store lost (see `Restore` in `session.proto`).
    #[error("session not found")]
    NotFound {
        /// The store's epoch, when the server said it.
        epoch: Option<String>,
    },
    /// Compare-and-set lost: the stored version moved on.
    #[error("version conflict: {0}")]
    Conflict(String),
    /// A restore was refused because the session was deleted (logout), or is otherwise not
    /// restorable.
    #[error("session cannot be restored: {0}")]
    Refused(String),
    /// The server or its store cannot be reached (connection refused or broken, UNAVAILABLE).
    /// Retryable, and what the cookie fallback stands in for.
    #[error("session store unavailable: {0}")]
    Unavailable(String),
    /// The server or its store did not answer in time (the client's timeout, or
    /// DEADLINE_EXCEEDED). Retryable; a slow store is not a lost one, so the fallback treats it
    /// as an outage only once the store has been silent for its outage grace.
    #[error("session store timed out: {0}")]
    TimedOut(String),
    /// The request was malformed (bad id, too large, bad ttl).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The auth token is missing or wrong.
    #[error("not authenticated: {0}")]
    Unauthenticated(String),
    /// The token is known but its scope does not cover the call (another namespace, or a
    /// write with a read-only token): a deployment error, never retried.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// Anything else the server said.
    #[error("session server error {code:?}: {message}")]
    Other {
        /// The gRPC code.
        code: Code,
        /// The server's message.
        message: String,
    },
    /// The endpoint or token could not be used at all.
    #[error("client configuration: {0}")]
    Config(String),
}

impl ClientError {
    /// Whether the store could not be reached (the case the cookie fallback covers).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, ClientError::Unavailable(_))
    }

    /// Whether the call timed out.
    pub fn is_timeout(&self) -> bool {
        matches!(self, ClientError::TimedOut(_))
    }

    /// Whether trying again may succeed: unreachable or timed out.
    pub fn is_retryable(&self) -> bool {
        self.is_unavailable() || self.is_timeout()
    }
}

impl From<Status> for ClientError {
    fn from(status: Status) -> Self {
        // tonic's transport failures ("transport error") keep the cause (a TLS alert, a reset)
        // in the source chain: say it.
        let message = with_causes(
            status.message().to_owned(),
            std::error::Error::source(&status),
        );
        match status.code() {
            Code::NotFound => ClientError::NotFound {
                epoch: status
                    .metadata()
                    .get(EPOCH_METADATA)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned),
            },
            Code::Aborted => ClientError::Conflict(message),
            Code::FailedPrecondition | Code::AlreadyExists => ClientError::Refused(message),
            // tonic reports a connection that broke mid-call (the server died, a reset) as
            // UNKNOWN "transport error"; the session server itself never answers UNKNOWN.
            // tonic's own deadline (a channel `timeout`) ends a call as CANCELLED "Timeout
            // expired": slow, not unreachable.
            Code::Cancelled if message.contains("Timeout expired") => {
                ClientError::TimedOut(message)
            }
            Code::Unavailable | Code::Cancelled | Code::Unknown => {
                ClientError::Unavailable(message)
            }
            Code::DeadlineExceeded => ClientError::TimedOut(message),
            Code::InvalidArgument | Code::OutOfRange => ClientError::Invalid(message),
            Code::Unauthenticated => ClientError::Unauthenticated(message),
            Code::PermissionDenied => ClientError::PermissionDenied(message),
            code => ClientError::Other { code, message },
        }
    }
}

/// A session as the server returned it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionData {
    /// Server-made id.
    pub id: String,
    /// Namespace.
    pub namespace: String,
    /// Owner, or empty.
    pub user_id: String,
    /// Attributes.
    pub attrs: HashMap<String, Vec<u8>>,
    /// Bumped by every write.
    pub version: u64,
    /// First creation.
    pub created_at: SystemTime,
    /// Expiry unless touched or written.
    pub expires_at: SystemTime,
    /// Sliding ttl.
    pub ttl: Duration,
    /// The epoch of the store that holds it (see `Restore` in `session.proto`); empty for a
    /// session made during an outage, or from a server without epochs.
    pub epoch: String,
    /// The write id of the write that made this version ([`Patch::write_id`]); empty when that
    /// write gave none, or from a server without write ids.
    pub write_id: String,
    /// When the session ends whatever its activity (its absolute lifetime); `None`: never.
    pub ends_at: Option<SystemTime>,
}

impl From<v1::Session> for SessionData {
    fn from(s: v1::Session) -> Self {
        let time = |t: Option<prost_types::Timestamp>| {
            t.and_then(|t| SystemTime::try_from(t).ok())
                .unwrap_or(SystemTime::UNIX_EPOCH)
        };
        SessionData {
            id: s.id,
            namespace: s.namespace,
            user_id: s.user_id,
            attrs: s.attrs,
            version: s.version,
            created_at: time(s.created_at),
            expires_at: time(s.expires_at),
            ttl: s
                .ttl
                .and_then(|d| Duration::try_from(d).ok())
                .unwrap_or_default(),
            epoch: s.epoch,
            write_id: s.write_id,
            ends_at: s.ends_at.and_then(|t| SystemTime::try_from(t).ok()),
        }
    }
}

/// A fresh write id ([`Patch::write_id`]): 128 random bits, base64url (22 characters). Empty
/// if the system random source fails (the write then carries none).
pub fn new_write_id() -> String {
    use base64::Engine as _;
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; 16];
    match ring::rand::SystemRandom::new().fill(&mut bytes) {
        Ok(()) => base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes),
        Err(_) => String::new(),
    }
}

/// The response metadata key of a NOT_FOUND answer that carries the store's epoch.
pub const EPOCH_METADATA: &str = "stickless-epoch";

/// Sessions asked for in each page when [`SessionClient::list_by_user`] reads them all: the
/// most a server gives in one page, so a user's sessions take the fewest calls.
const LIST_ALL_PAGE_SIZE: u32 = 1000;

/// One page of a user's sessions ([`SessionClient::list_by_user_page`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionPage {
    /// The page's sessions, ordered by id.
    pub sessions: Vec<SessionData>,
    /// What to pass for the next page; `None` when this page is the last.
    pub next_page_token: Option<String>,
}

/// What [`SessionClient::restore`] sends: a snapshot's session and what changed offline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreRequest {
    /// The session as the snapshot holds it now (offline changes included): a store of
    /// another epoch recreates it from its id, user, attributes, creation time and ttl.
    pub session: SessionData,
    /// The epoch of the store the snapshot last agreed with; empty for a session made during
    /// an outage.
    pub epoch: String,
    /// The last version that store confirmed.
    pub base_version: u64,
    /// Attributes written offline (values as the snapshot holds them).
    pub set: HashMap<String, Vec<u8>>,
    /// Attribute keys removed offline.
    pub remove: Vec<String>,
    /// The user set offline, if it changed.
    pub user_id: Option<String>,
    /// This restore's write id: the same on every try of the same snapshot, so that a restore
    /// whose answer was lost is recognised as the holder's own when sent again (empty: none).
    pub write_id: String,
    /// The holder's writes that may have been applied after `base_version` with their answers
    /// lost: a version one of them made counts as the holder's base (see `Restore` in
    /// `session.proto`).
    pub own_write_ids: Vec<String>,
}

impl RestoreRequest {
    /// Whether the snapshot holds changes the store has not seen.
    pub fn has_changes(&self) -> bool {
        !self.set.is_empty() || !self.remove.is_empty() || self.user_id.is_some()
    }
}

/// What [`SessionClient::create_with`] creates.
#[derive(Debug, Clone, Default)]
pub struct NewSession {
    /// Owner, or empty for an anonymous session.
    pub user_id: String,
    /// Initial attributes.
    pub attrs: HashMap<String, Vec<u8>>,
    /// Sliding ttl (`None`: the server's default).
    pub ttl: Option<Duration>,
    /// Absolute lifetime from creation: the session ends at `created_at + max_lifetime`
    /// whatever its activity ([`SessionData::ends_at`]); the server's `--max-lifetime` caps it.
    pub max_lifetime: Option<Duration>,
}

/// An attribute-level patch for [`SessionClient::update`].
#[derive(Debug, Clone, Default)]
pub struct Patch {
    /// Attributes to write.
    pub set: HashMap<String, Vec<u8>>,
    /// Attribute keys to delete.
    pub remove: Vec<String>,
    /// Apply only at this version (compare-and-set).
    pub expected_version: Option<u64>,
    /// New owner (empty: anonymous).
    pub user_id: Option<String>,
    /// New sliding ttl.
    pub ttl: Option<Duration>,
    /// An id for this write, stored as the new version's [`SessionData::write_id`], so that a
    /// caller whose answer was lost can tell whether it was applied ([`new_write_id`]). A
    /// compare-and-set without one gets a fresh one.
    pub write_id: Option<String>,
    /// New absolute lifetime, counted from the session's creation (see
    /// [`NewSession::max_lifetime`]).
    pub max_lifetime: Option<Duration>,
}

impl Patch {
    /// Whether `session` holds what this patch writes (values set, keys removed, the user).
    fn applied_to(&self, session: &SessionData) -> bool {
        self.set
            .iter()
            .all(|(key, value)| session.attrs.get(key) == Some(value))
            && self
                .remove
                .iter()
                .all(|key| !session.attrs.contains_key(key))
            && self
                .user_id
                .as_ref()
                .is_none_or(|user| &session.user_id == user)
    }

    /// Whether the patch changes nothing.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
            && self.remove.is_empty()
            && self.user_id.is_none()
            && self.ttl.is_none()
            && self.max_lifetime.is_none()
    }
}

/// The typed client. Cheap to clone: clones share the connections.
#[derive(Debug, Clone)]
pub struct SessionClient {
    /// The session servers and their connections.
    pub(crate) endpoints: Arc<Endpoints>,
    /// Settings.
    config: Arc<ClientConfig>,
    /// `Bearer <token>`, ready to attach.
    auth: Option<MetadataValue<Ascii>>,
}

/// Whether a call may be sent again after a failure that may have reached the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Replay {
    /// Idempotent: retried (once at once on another server, then with backoff).
    Safe,
    /// Not idempotent: sent again only when it never left the client (no connection).
    Unsent,
}

/// Comma-separated session server URLs, trimmed (and without a trailing `/`), empty items
/// dropped: what [`ClientConfig::new`] and the binaries' `--session-server` lists take.
pub fn split_endpoints(text: &str) -> Vec<String> {
    text.split(',')
        .map(|url| url.trim().trim_end_matches('/').to_owned())
        .filter(|url| !url.is_empty())
        .collect()
}

/// Whether a status says the call never reached a server: tonic could not make the connection
/// (its connector's `ConnectError`, refused or timed out, TLS handshake included, is in the
/// status's source chain). A status a server sent has no source, whatever its message says (a
/// server's own "store unavailable: Connection refused" is an answer: the call reached it).
fn never_sent(status: &Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        if error.downcast_ref::<tonic::ConnectError>().is_some() {
            return true;
        }
        source = error.source();
    }
    false
}

/// An error and its sources, `: `-separated (tonic's transport errors say little at the top).
fn error_chain(error: &dyn std::error::Error) -> String {
    with_causes(error.to_string(), error.source())
}

/// `text` followed by what each error of the chain from `source` adds to it (many errors
/// repeat their source's text, which is not said twice).
fn with_causes(mut text: String, mut source: Option<&dyn std::error::Error>) -> String {
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if cause_text.contains(&text) {
            text = cause_text;
        } else if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn duration(d: Duration) -> Option<prost_types::Duration> {
    prost_types::Duration::try_from(d).ok()
}

/// One call of the generated client: a fresh client over the chosen server's channel, and a
/// fresh request, per attempt.
macro_rules! rpc {
    ($self:ident, $replay:expr, $method:ident, $message:ident) => {
        $self
            .call($replay, |channel| {
                let mut client = SessionStoreClient::new(channel);
                let request = $self.request($message.clone());
                async move { client.$method(request).await }
            })
            .await
    };
}

impl SessionClient {
    /// A client that connects on first use (and reconnects after failures), so a backend starts
    /// even while the session servers are down. Refuses what [`ClientConfig::validate`]
    /// refuses, saying why. Host names are resolved in the background (when called within a
    /// tokio runtime, as tonic's channels require anyway).
    pub fn connect_lazy(config: ClientConfig) -> Result<Self, ClientError> {
        config.validate()?;
        let auth = config.auth()?;
        let config = Arc::new(config);
        Ok(SessionClient {
            endpoints: Arc::new(Endpoints::new(config.clone())?),
            config,
            auth,
        })
    }

    /// How each session server looks from this client: healthy or ejected, calls in flight,
    /// calls answered.
    pub fn endpoints(&self) -> Vec<EndpointState> {
        self.endpoints.states()
    }

    /// The namespace every call uses.
    pub fn namespace(&self) -> &str {
        &self.config.namespace
    }

    pub(crate) fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.config.timeout);
        if let Some(auth) = &self.auth {
            request.metadata_mut().insert("authorization", auth.clone());
        }
        request
    }

    /// Runs one call within the timeout on the server [`Endpoints::pick`] chooses. A server
    /// that cannot be reached is ejected; the call is then tried once at once on another one
    /// (when `replay` allows it), then retried with backoff (idempotent calls, `retries`
    /// times), each try preferring a server not tried yet.
    async fn call<T, F, Fut>(&self, replay: Replay, attempt: F) -> Result<T, ClientError>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.call_noting(replay, &mut false, attempt).await
    }

    /// [`SessionClient::call`], setting `unknown` when a try failed after it may have reached
    /// a server (so a later try's answer may be about a state that try already changed).
    async fn call_noting<T, F, Fut>(
        &self,
        replay: Replay,
        unknown: &mut bool,
        mut attempt: F,
    ) -> Result<T, ClientError>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let retries = match replay {
            Replay::Safe => self.config.retries,
            Replay::Unsent => 0,
        };
        let mut wait = self.config.backoff;
        let mut tried: Vec<Arc<Member>> = Vec::new();
        let mut failover = true;
        let mut retried = 0;
        loop {
            let member = self.endpoints.pick(&tried);
            let in_flight = member.start();
            let result = tokio::time::timeout(self.config.timeout, attempt(member.channel())).await;
            drop(in_flight);
            let (error, sent) = match result {
                Ok(Ok(response)) => {
                    self.endpoints.answered(&member);
                    return Ok(response.into_inner());
                }
                Ok(Err(status)) => {
                    let sent = !never_sent(&status);
                    (ClientError::from(status), sent)
                }
                Err(_) => (
                    ClientError::TimedOut(format!("no answer within {:?}", self.config.timeout)),
                    true,
                ),
            };
            *unknown |= sent && error.is_retryable();
            if error.is_unavailable() {
                self.endpoints.eject(&member, &error);
            } else if !error.is_timeout() {
                self.endpoints.answered(&member);
            }
            if !error.is_retryable() || (replay == Replay::Unsent && sent) {
                return Err(error);
            }
            tracing::debug!(endpoint = member.label(), %error, "session call failed");
            tried.push(member);
            if failover && error.is_unavailable() && self.endpoints.has_untried(&tried) {
                failover = false;
                continue;
            }
            if retried >= retries {
                return Err(error);
            }
            retried += 1;
            tokio::time::sleep(wait).await;
            wait = wait.saturating_mul(2);
        }
    }

    /// Creates a session.
    pub async fn create(
        &self,
        user_id: &str,
        attrs: HashMap<String, Vec<u8>>,
        ttl: Option<Duration>,
    ) -> Result<SessionData, ClientError> {
        self.create_with(NewSession {
            user_id: user_id.to_owned(),
            attrs,
            ttl,
            max_lifetime: None,
        })
        .await
    }

    /// Creates a session with every option of [`NewSession`] (an absolute lifetime, say).
    pub async fn create_with(&self, new: NewSession) -> Result<SessionData, ClientError> {
        let message = v1::CreateRequest {
            namespace: self.config.namespace.clone(),
            user_id: new.user_id,
            attrs: new.attrs,
            ttl: new.ttl.and_then(duration),
            max_lifetime: new.max_lifetime.and_then(duration),
        };
        let session = rpc!(self, Replay::Unsent, create, message)?;
        Ok(session.into())
    }

    /// Reads a session; with `touch`, also slides its expiry.
    pub async fn get(&self, id: &str, touch: bool) -> Result<SessionData, ClientError> {
        self.get_with(id, touch, false).await
    }

    /// [`SessionClient::get`] read from the store itself, past the session server's own cache
    /// (`GetRequest.bypass_cache`, the Redis near cache of `--cache-capacity`): for a caller
    /// that caches the answer itself, so that a read in the near cache's staleness window is
    /// not kept for longer.
    pub async fn get_uncached(&self, id: &str, touch: bool) -> Result<SessionData, ClientError> {
        self.get_with(id, touch, true).await
    }

    async fn get_with(
        &self,
        id: &str,
        touch: bool,
        bypass_cache: bool,
    ) -> Result<SessionData, ClientError> {
        let message = v1::GetRequest {
            namespace: self.config.namespace.clone(),
            id: id.to_owned(),
            touch,
            bypass_cache,
        };
        let session = rpc!(self, Replay::Safe, get, message)?;
        Ok(session.into())
    }

    /// Applies an attribute-level patch.
    ///
    /// A compare-and-set update (`expected_version`) is sent again when a try may not have
    /// reached the store; a replay answered ABORTED after a try whose outcome is unknown (the
    /// server died, or lost its store, after the write and before the answer) reads the session:
    /// when it carries this write's id (from a server without write ids: when it is at
    /// `expected_version + 1` with the patch's values), the first try was applied and that
    /// session is the answer, never a conflict the caller would retry into a second
    /// copy of its change.
    pub async fn update(&self, id: &str, patch: Patch) -> Result<SessionData, ClientError> {
        // Compare-and-set is safe to send again: applied once, a replay finds the version moved.
        let replay = if patch.expected_version.is_some() {
            Replay::Safe
        } else {
            Replay::Unsent
        };
        let write_id = match (&patch.write_id, patch.expected_version) {
            (Some(write_id), _) => write_id.clone(),
            (None, Some(_)) => new_write_id(),
            (None, None) => String::new(),
        };
        let message = v1::UpdateRequest {
            namespace: self.config.namespace.clone(),
            id: id.to_owned(),
            set: patch.set.clone(),
            remove: patch.remove.clone(),
            expected_version: patch.expected_version,
            user_id: patch.user_id.clone(),
            ttl: patch.ttl.and_then(duration),
            write_id: write_id.clone(),
            max_lifetime: patch.max_lifetime.and_then(duration),
        };
        let mut unknown = false;
        let result = self
            .call_noting(replay, &mut unknown, |channel| {
                let mut client = SessionStoreClient::new(channel);
                let request = self.request(message.clone());
                async move { client.update(request).await }
            })
            .await;
        match (result, patch.expected_version) {
            (Ok(session), _) => Ok(session.into()),
            (Err(ClientError::Conflict(reason)), Some(expected)) if unknown => {
                // Its own write id on the stored session says so; a server without write ids
                // leaves the version and the values to tell.
                let ours = |stored: &SessionData| {
                    if stored.write_id.is_empty() {
                        stored.version == expected + 1 && patch.applied_to(stored)
                    } else {
                        !write_id.is_empty() && stored.write_id == write_id
                    }
                };
                match self.get(id, false).await {
                    Ok(stored) if ours(&stored) => {
                        tracing::debug!(
                            version = stored.version,
                            "a compare-and-set whose answer was lost had been applied"
                        );
                        Ok(stored)
                    }
                    _ => Err(ClientError::Conflict(reason)),
                }
            }
            (Err(error), _) => Err(error),
        }
    }

    /// Slides a session's expiry (optionally to a new ttl).
    pub async fn touch(&self, id: &str, ttl: Option<Duration>) -> Result<SessionData, ClientError> {
        let message = v1::TouchRequest {
            namespace: self.config.namespace.clone(),
            id: id.to_owned(),
            ttl: ttl.and_then(duration),
        };
        let session = rpc!(self, Replay::Safe, touch, message)?;
        Ok(session.into())
    }

    /// Moves a session to a new id (call on login).
    pub async fn regenerate(&self, id: &str) -> Result<SessionData, ClientError> {
        let message = v1::RegenerateRequest {
            namespace: self.config.namespace.clone(),
            id: id.to_owned(),
        };
        let session = rpc!(self, Replay::Unsent, regenerate, message)?;
        Ok(session.into())
    }

    /// Deletes a session; false when there was none.
    pub async fn delete(&self, id: &str) -> Result<bool, ClientError> {
        let message = v1::DeleteRequest {
            namespace: self.config.namespace.clone(),
            id: id.to_owned(),
        };
        let reply = rpc!(self, Replay::Safe, delete, message)?;
        Ok(reply.deleted)
    }

    /// The live sessions of a user, all of them, ordered by id: reads page after page (see
    /// [`SessionClient::list_by_user_page`] to read one at a time). Sessions made or deleted
    /// meanwhile may or may not show; none shows twice.
    pub async fn list_by_user(&self, user_id: &str) -> Result<Vec<SessionData>, ClientError> {
        let mut sessions = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .list_by_user_page(user_id, LIST_ALL_PAGE_SIZE, token.as_deref())
                .await?;
            sessions.extend(page.sessions);
            match page.next_page_token {
                None => return Ok(sessions),
                // A server that hands back the token it was given would be read for ever.
                Some(next) if token.as_deref() == Some(next.as_str()) => {
                    return Err(ClientError::Other {
                        code: Code::Internal,
                        message: "ListByUser gave the same page token twice".into(),
                    });
                }
                Some(next) => token = Some(next),
            }
        }
    }

    /// One page of a user's live sessions, ordered by id: at most `page_size` (0 means the
    /// server's default, 100; the server gives at most 1000), starting after the page whose
    /// `next_page_token` is `page_token` (`None`: the first page). A token the server did not
    /// make is [`ClientError::Invalid`].
    pub async fn list_by_user_page(
        &self,
        user_id: &str,
        page_size: u32,
        page_token: Option<&str>,
    ) -> Result<SessionPage, ClientError> {
        let message = v1::ListByUserRequest {
            namespace: self.config.namespace.clone(),
            user_id: user_id.to_owned(),
            page_size,
            page_token: page_token.unwrap_or_default().to_owned(),
        };
        let reply = rpc!(self, Replay::Safe, list_by_user, message)?;
        Ok(SessionPage {
            sessions: reply.sessions.into_iter().map(SessionData::from).collect(),
            next_page_token: Some(reply.next_page_token).filter(|token| !token.is_empty()),
        })
    }

    /// Deletes every session of a user; returns how many.
    pub async fn delete_by_user(&self, user_id: &str) -> Result<u64, ClientError> {
        let message = v1::DeleteByUserRequest {
            namespace: self.config.namespace.clone(),
            user_id: user_id.to_owned(),
        };
        let reply = rpc!(self, Replay::Safe, delete_by_user, message)?;
        Ok(reply.deleted)
    }

    /// Brings the store in step with a snapshot (see `Restore` in `session.proto`): the
    /// stored session after the offline changes were applied (or it was recreated in a store
    /// that lost its data); [`ClientError::Refused`] when the session was deleted or expired;
    /// [`ClientError::Conflict`] when the store holds another version (the store wins: adopt
    /// it with [`SessionClient::get`]).
    pub async fn restore(&self, request: RestoreRequest) -> Result<SessionData, ClientError> {
        let session = request.session;
        let message = v1::RestoreRequest {
            namespace: self.config.namespace.clone(),
            session: Some(v1::Session {
                id: session.id,
                namespace: session.namespace,
                user_id: session.user_id,
                attrs: session.attrs,
                version: session.version,
                created_at: Some(session.created_at.into()),
                expires_at: Some(session.expires_at.into()),
                ttl: duration(session.ttl),
                epoch: session.epoch,
                write_id: String::new(),
                ends_at: None,
            }),
            epoch: request.epoch,
            base_version: request.base_version,
            set: request.set,
            remove: request.remove,
            user_id: request.user_id,
            write_id: request.write_id,
            own_write_ids: request.own_write_ids,
        };
        let session = rpc!(self, Replay::Safe, restore, message)?;
        Ok(session.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_the_errors_callers_decide_on() {
        let cases = [
            (Code::NotFound, ClientError::NotFound { epoch: None }),
            (Code::DeadlineExceeded, ClientError::TimedOut("m".into())),
            (Code::Cancelled, ClientError::Unavailable("m".into())),
            (Code::Aborted, ClientError::Conflict("m".into())),
            (Code::FailedPrecondition, ClientError::Refused("m".into())),
            (Code::Unavailable, ClientError::Unavailable("m".into())),
            (Code::InvalidArgument, ClientError::Invalid("m".into())),
            (
                Code::Unauthenticated,
                ClientError::Unauthenticated("m".into()),
            ),
            // A scoped token used outside its scope is told apart from a missing token.
            (
                Code::PermissionDenied,
                ClientError::PermissionDenied("m".into()),
            ),
        ];
        for (code, expected) in cases {
            assert_eq!(
                ClientError::from(Status::new(code, "m")),
                expected,
                "{code:?}"
            );
        }
        assert!(!ClientError::PermissionDenied("m".into()).is_unavailable());
        assert!(ClientError::TimedOut("m".into()).is_retryable());
        assert!(!ClientError::TimedOut("m".into()).is_unavailable());
        assert_eq!(
            ClientError::from(Status::cancelled("Timeout expired")),
            ClientError::TimedOut("Timeout expired".into())
        );
        let mut status = Status::new(Code::NotFound, "gone");
        status
            .metadata_mut()
            .insert(EPOCH_METADATA, "e1".parse().unwrap());
        assert_eq!(
            ClientError::from(status),
            ClientError::NotFound {
                epoch: Some("e1".into())
            }
        );
    }

    #[test]
    fn debug_output_never_shows_the_token() {
        let mut config = ClientConfig::new("http://127.0.0.1:1");
        config.auth_token = Some("s3cret-token".into());
        let shown = format!("{config:?}");
        assert!(!shown.contains("s3cret-token"), "{shown}");
        assert!(shown.contains("<hidden>"), "{shown}");
    }
}
