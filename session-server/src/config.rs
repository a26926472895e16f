//! Configuration: command-line flags with environment-variable twins (clap), and an optional
//! TOML file (`--config`) whose unknown keys are an error.
//!
//! Precedence: flag or environment variable, then the file, then the built-in default.
//! [`Settings::resolve`] takes the parsed flags and the file's text as arguments, so tests inject
//! values instead of touching the process environment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use serde::Deserialize;

pub use crate::store::cap::OnCap;

/// Default listen address: loopback only, so a fresh start exposes nothing to the network.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
/// Default sliding ttl of a session.
pub const DEFAULT_TTL: Duration = Duration::from_secs(30 * 60);
/// Default maximum ttl a client may ask for.
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// Default cap on a session's attributes (sum of key and value lengths).
pub const DEFAULT_MAX_SESSION_BYTES: usize = 64 * 1024;
/// Highest `--max-session-bytes` accepted: gRPC messages, Redis values and memory all suffer
/// beyond this, and sessions that large belong in a database of their own.
pub const MAX_SESSION_BYTES_CEILING: usize = 16 * 1024 * 1024;
/// Highest `--cache-capacity`: a hundred million sessions would take tens of gigabytes.
pub const MAX_CACHE_CAPACITY: usize = 10_000_000;
/// Default bound on one store call, pool wait included.
pub const DEFAULT_STORE_TIMEOUT: Duration = Duration::from_secs(2);
/// Default time in-flight calls get to finish after SIGINT/SIGTERM.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Most gRPC serving threads (`--serve-threads`): far more than any machine has cores.
pub const MAX_SERVE_THREADS: usize = 1024;
/// Default HTTP/2 streams (calls) one connection may have open at once: twice nginx's
/// `http2_max_concurrent_streams` (128), since a backend multiplexes all its calls and Watch
/// streams over one connection.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 256;
/// Default client connections open at once, TLS handshakes under way included: nginx's
/// `worker_connections` order of magnitude, far below the usual 64k file descriptor limit.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default Watch streams open at once on one namespace: each costs a task and a broadcast
/// receiver, and a deployment needs a handful per backend.
pub const DEFAULT_MAX_WATCHERS_PER_NAMESPACE: usize = 1000;
/// Default Watch streams open at once over all namespaces, so that many namespaces cannot
/// get round `--max-watchers-per-namespace`.
pub const DEFAULT_MAX_WATCHERS: usize = 10_000;
/// Default bound on a new connection's TLS handshake and on the wait for its first bytes (the
/// HTTP/2 preface): a client that connects and stays silent gives its place back after it.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = crate::tls::HANDSHAKE_TIMEOUT;
/// Default deadline of one call (every method but Watch): five times the default store timeout,
/// so a Restore's several store calls fit, and a stuck call still ends.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time between two checks of the store by the health service (see `health.rs`): an
/// outage shows as NOT_SERVING, and a return as SERVING, within about this plus the store
/// timeout.
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(1);

/// A secret setting (a bearer token): its text for the code that uses it ([`std::ops::Deref`]
/// to `str`), and a `Debug` that says a value is set without ever showing it, so settings can
/// be logged or printed in a panic without leaking the token.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl std::ops::Deref for Secret {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Secret {
    fn from(text: &str) -> Self {
        Secret(text.to_owned())
    }
}

impl From<String> for Secret {
    fn from(text: String) -> Self {
        Secret(text)
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(Secret(text.to_owned()))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<hidden>")
    }
}

/// Which store keeps the sessions. Every kind can be named in any build; one whose cargo
/// feature ([`StoreKind::feature`]) was off is refused by config validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StoreKind {
    /// In-process, sharded; nothing to set up, nothing survives a restart.
    Memory,
    /// One Redis server (`--redis-url`).
    Redis,
    /// A Redis Cluster (`--redis-url` lists seed nodes, comma-separated).
    RedisCluster,
    /// One Redis primary found through Redis Sentinel (`--redis-url` lists the sentinels,
    /// comma-separated; `--redis-sentinel-master` names the master they monitor).
    RedisSentinel,
    /// MySQL or MariaDB (`--mysql-url`); durable, schema migrated at start-up.
    Mysql,
}

impl StoreKind {
    /// The name `--store` takes.
    pub fn name(self) -> &'static str {
        match self {
            StoreKind::Memory => "memory",
            StoreKind::Redis => "redis",
            StoreKind::RedisCluster => "redis-cluster",
            StoreKind::RedisSentinel => "redis-sentinel",
            StoreKind::Mysql => "mysql",
        }
    }

    /// The cargo feature of session-server that builds this store (`None`: always built).
    pub fn feature(self) -> Option<&'static str> {
        match self {
            StoreKind::Memory => None,
            StoreKind::Redis | StoreKind::RedisCluster | StoreKind::RedisSentinel => {
                Some("redis-store")
            }
            StoreKind::Mysql => Some("mysql-store"),
        }
    }

    /// Whether this build has the store.
    pub fn is_built(self) -> bool {
        match self {
            StoreKind::Memory => true,
            StoreKind::Redis | StoreKind::RedisCluster | StoreKind::RedisSentinel => {
                cfg!(feature = "redis-store")
            }
            StoreKind::Mysql => cfg!(feature = "mysql-store"),
        }
    }
}

impl std::fmt::Display for StoreKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Command-line flags; each has an environment-variable twin. Unset ones fall back to the file,
/// then to the defaults.
#[derive(Debug, Clone, Default, Parser)]
#[command(
    name = "session-server",
    version,
    about = "Stickless gRPC session server"
)]
pub struct Cli {
    /// TOML file with the same settings (snake_case keys); unknown keys are an error.
    #[arg(long, env = "STICKLESS_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to serve gRPC on [default: 127.0.0.1:50051].
    #[arg(long, env = "STICKLESS_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Session store [default: memory].
    #[arg(long, env = "STICKLESS_STORE")]
    pub store: Option<StoreKind>,
    /// Redis URL for `--store redis`; for `redis-cluster` the seed nodes, for `redis-sentinel`
    /// the sentinels, comma-separated [default: redis://127.0.0.1:6379].
    #[arg(long, env = "STICKLESS_REDIS_URL")]
    pub redis_url: Option<String>,
    /// Name of the master the sentinels monitor (`sentinel monitor NAME ...`), for
    /// `--store redis-sentinel` (required there, refused with any other store).
    #[arg(long, env = "STICKLESS_REDIS_SENTINEL_MASTER")]
    pub redis_sentinel_master: Option<String>,
    /// PEM CA certificates trusted for a `rediss://` `--redis-url`, instead of the system's
    /// root certificates [default: the system's].
    #[arg(long, env = "STICKLESS_REDIS_CA")]
    pub redis_ca: Option<PathBuf>,
    /// MySQL/MariaDB URL for `--store mysql` [default: mysql://root@127.0.0.1:3306/test].
    #[arg(long, env = "STICKLESS_MYSQL_URL")]
    pub mysql_url: Option<String>,
    /// Table that holds the sessions (one per deployment) [default: stickless_sessions].
    #[arg(long, env = "STICKLESS_MYSQL_TABLE")]
    pub mysql_table: Option<String>,
    /// Most pooled MySQL connections [default: 16].
    #[arg(long, env = "STICKLESS_MYSQL_POOL_SIZE")]
    pub mysql_pool_size: Option<u32>,
    /// How often the MySQL reaper deletes expired rows [default: 1s].
    #[arg(long, env = "STICKLESS_MYSQL_REAP_INTERVAL", value_parser = parse_duration)]
    pub mysql_reap_interval: Option<Duration>,
    /// Most expired rows one reaper statement deletes (at most 10 statements a turn) [default: 500].
    #[arg(long, env = "STICKLESS_MYSQL_REAP_BATCH")]
    pub mysql_reap_batch: Option<u32>,
    /// Prefix of every Redis key [default: stickless].
    #[arg(long, env = "STICKLESS_REDIS_PREFIX")]
    pub redis_prefix: Option<String>,
    /// Redis connections shared by all calls, each multiplexed [default: 32].
    #[arg(long, env = "STICKLESS_REDIS_POOL_SIZE")]
    pub redis_pool_size: Option<usize>,
    /// Format the Redis store writes session records in: 2 (one packed value, read with one
    /// GET) or 1 (one hash, the format of releases before it; both are always read). Use 1
    /// during a rolling upgrade from such a release, until no such server is left [default: 2].
    #[arg(long, env = "STICKLESS_REDIS_RECORD_FORMAT", value_parser = clap::value_parser!(u8).range(1..=2))]
    pub redis_record_format: Option<u8>,
    /// Bound on one store call; past it the call fails with DEADLINE_EXCEEDED [default: 2s].
    #[arg(long, env = "STICKLESS_STORE_TIMEOUT", value_parser = parse_duration)]
    pub store_timeout: Option<Duration>,
    /// Sliding ttl of sessions created without one [default: 30m].
    #[arg(long, env = "STICKLESS_DEFAULT_TTL", value_parser = parse_duration)]
    pub default_ttl: Option<Duration>,
    /// Largest ttl; longer requested ttls are clamped to it [default: 24h].
    #[arg(long, env = "STICKLESS_MAX_TTL", value_parser = parse_duration)]
    pub max_ttl: Option<Duration>,
    /// Cap on a session's attributes, keys plus values, in bytes [default: 65536].
    #[arg(long, env = "STICKLESS_MAX_SESSION_BYTES")]
    pub max_session_bytes: Option<usize>,
    /// Most live sessions one user may have in a namespace, as Spring Security's
    /// `maximumSessions`; 0 means no cap [default: 0].
    #[arg(long, env = "STICKLESS_MAX_SESSIONS_PER_USER")]
    pub max_sessions_per_user: Option<u32>,
    /// Absolute lifetime of every session from its creation (OWASP): no touch or write keeps a
    /// session past `created_at` + this; a per-session `max_lifetime` is capped by it
    /// [default: none].
    #[arg(long, env = "STICKLESS_MAX_LIFETIME", value_parser = parse_duration)]
    pub max_lifetime: Option<Duration>,
    /// A touch (Touch, Get with touch) that would move a session's expiry by less than this is
    /// not written; `0` writes every touch [default: auto, the larger of 1s and 1% of the
    /// session's ttl].
    #[arg(long, env = "STICKLESS_TOUCH_GRANULARITY", value_parser = parse_duration)]
    pub touch_granularity: Option<Duration>,
    /// Sessions the Redis store's near cache keeps in this server's memory, kept exact by
    /// Redis' client-side caching (invalidation pushes); plain reads (Get, with touch inside
    /// --touch-granularity) of a cached session skip Redis. 0 turns it off. Store redis and
    /// redis-sentinel only [default: 0].
    #[arg(long, env = "STICKLESS_CACHE_CAPACITY")]
    pub cache_capacity: Option<usize>,
    /// What a session past `--max-sessions-per-user` does: `evict-oldest` deletes the user's
    /// oldest session, `refuse` fails it with RESOURCE_EXHAUSTED [default: evict-oldest].
    #[arg(long, env = "STICKLESS_ON_SESSION_CAP")]
    pub on_session_cap: Option<OnCap>,
    /// Bearer token every SessionStore call must carry (`authorization: Bearer <token>`),
    /// allowed in every namespace, read-write; adds to `--auth-token-file`'s tokens.
    #[arg(long, env = "STICKLESS_AUTH_TOKEN", hide_env_values = true)]
    pub auth_token: Option<Secret>,
    /// File of scoped tokens, one a line: `TOKEN NAMESPACES RIGHTS`, e.g. `app-secret demo,shop
    /// rw` (`TOKEN` or `sha256:<hex>` of it; `NAMESPACES` a comma list or `*`; `RIGHTS` `rw` or
    /// `ro`: Get, ListByUser and Watch only); `#` starts a comment.
    #[arg(long, env = "STICKLESS_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,
    /// Serve on a non-loopback `--listen` address without authentication (no token, no token
    /// file, no `--tls-client-ca`), which is refused otherwise.
    #[arg(
        long,
        env = "STICKLESS_ALLOW_UNAUTHENTICATED",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub allow_unauthenticated: bool,
    /// Log format [default: text].
    #[arg(long, env = "STICKLESS_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Address to serve Prometheus metrics on (`GET /metrics`); off when unset.
    #[arg(long, env = "STICKLESS_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Time in-flight calls get to finish after SIGINT/SIGTERM [default: 30s].
    #[arg(long, env = "STICKLESS_SHUTDOWN_GRACE", value_parser = parse_duration)]
    pub shutdown_grace: Option<Duration>,
    /// Threads serving gRPC connections, each a single-threaded runtime that keeps its
    /// connections; 1 serves them all on the main (work-stealing) runtime [default: the number
    /// of CPUs with the memory store, 1 with Redis or MySQL].
    #[arg(long, env = "STICKLESS_SERVE_THREADS")]
    pub serve_threads: Option<usize>,
    /// HTTP/2 streams (calls) one connection may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS);
    /// a client's further calls wait for a free one [default: 256].
    #[arg(long, env = "STICKLESS_MAX_CONCURRENT_STREAMS")]
    pub max_concurrent_streams: Option<u32>,
    /// Client connections open at once, TLS handshakes under way included; past it a new
    /// connection is closed at once [default: 10000].
    #[arg(long, env = "STICKLESS_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Watch streams open at once on one namespace; past it a Watch is RESOURCE_EXHAUSTED
    /// [default: 1000].
    #[arg(long, env = "STICKLESS_MAX_WATCHERS_PER_NAMESPACE")]
    pub max_watchers_per_namespace: Option<usize>,
    /// Watch streams open at once over all namespaces; past it a Watch is RESOURCE_EXHAUSTED
    /// [default: 10000].
    #[arg(long, env = "STICKLESS_MAX_WATCHERS")]
    pub max_watchers: Option<usize>,
    /// Longest a new connection may take over its TLS handshake and then to send its first
    /// bytes (the HTTP/2 preface); past it the connection is closed [default: 10s].
    #[arg(long, env = "STICKLESS_HANDSHAKE_TIMEOUT", value_parser = parse_duration)]
    pub handshake_timeout: Option<Duration>,
    /// Deadline of every call but Watch (a shorter `grpc-timeout` of the caller wins); past it
    /// the call ends with DEADLINE_EXCEEDED [default: 10s].
    #[arg(long, env = "STICKLESS_CALL_TIMEOUT", value_parser = parse_duration)]
    pub call_timeout: Option<Duration>,
    /// Time between two background checks of the store (a cheap read, bounded by the store
    /// timeout) that set `grpc.health.v1` to SERVING or NOT_SERVING [default: 1s].
    #[arg(long, env = "STICKLESS_HEALTH_INTERVAL", value_parser = parse_duration)]
    pub health_interval: Option<Duration>,
    /// PEM certificate chain for gRPC over TLS (with `--tls-key`); re-read on SIGHUP
    /// [default: plaintext].
    #[arg(long, env = "STICKLESS_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `--tls-cert`; re-read on SIGHUP.
    #[arg(long, env = "STICKLESS_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates: clients must present a certificate signed by one (mTLS); re-read on
    /// SIGHUP [default: no client certificate asked].
    #[arg(long, env = "STICKLESS_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
}

/// The TOML file: the same settings as the flags, snake_case, every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    store: Option<StoreKind>,
    redis_url: Option<String>,
    redis_sentinel_master: Option<String>,
    redis_ca: Option<PathBuf>,
    redis_prefix: Option<String>,
    redis_pool_size: Option<usize>,
    redis_record_format: Option<u8>,
    mysql_url: Option<String>,
    mysql_table: Option<String>,
    mysql_pool_size: Option<u32>,
    #[serde(default, with = "humantime_serde_opt")]
    mysql_reap_interval: Option<Duration>,
    mysql_reap_batch: Option<u32>,
    #[serde(default, with = "humantime_serde_opt")]
    store_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    default_ttl: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    max_ttl: Option<Duration>,
    max_session_bytes: Option<usize>,
    max_sessions_per_user: Option<u32>,
    #[serde(default, with = "humantime_serde_opt")]
    max_lifetime: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    touch_granularity: Option<Duration>,
    cache_capacity: Option<usize>,
    on_session_cap: Option<OnCap>,
    auth_token: Option<Secret>,
    auth_token_file: Option<PathBuf>,
    allow_unauthenticated: Option<bool>,
    log_format: Option<LogFormat>,
    metrics_listen: Option<SocketAddr>,
    #[serde(default, with = "humantime_serde_opt")]
    shutdown_grace: Option<Duration>,
    serve_threads: Option<usize>,
    max_concurrent_streams: Option<u32>,
    max_connections: Option<usize>,
    max_watchers_per_namespace: Option<usize>,
    max_watchers: Option<usize>,
    #[serde(default, with = "humantime_serde_opt")]
    handshake_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    call_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    health_interval: Option<Duration>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_client_ca: Option<PathBuf>,
}

/// Durations in the file are strings such as "30m" or "1h 30m", as on the command line.
mod humantime_serde_opt {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        let text = String::deserialize(d)?;
        super::parse_duration(&text)
            .map(Some)
            .map_err(serde::de::Error::custom)
    }
}

/// Parses "500ms", "30s", "30m", "1h 30m" (humantime syntax).
fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("bad duration {text:?}: {e}"))
}

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown keys or bad values (the message names the line).
    #[error("invalid config file: {0}")]
    Parse(#[from] toml::de::Error),
    /// A value is out of range.
    #[error("invalid setting: {0}")]
    Invalid(String),
    /// The auth token file cannot be read or has a malformed line (named by number; the
    /// message never quotes it).
    #[error(transparent)]
    TokenFile(#[from] crate::auth::TokenFileError),
    /// `--store` names a store this build left out (its cargo feature was off).
    #[error(
        "--store {0}: this session-server was built without the {feature} feature (rebuild \
         with `--features {feature}`, or use another store)",
        feature = .0.feature().unwrap_or("default")
    )]
    StoreNotBuilt(StoreKind),
    /// A non-loopback listen address with no authentication and no explicit opt-out.
    #[error(
        "refusing to serve on {listen} without authentication (not a loopback address): set \
         --auth-token-file PATH (or --auth-token, or --tls-client-ca), or pass \
         --allow-unauthenticated to serve anyone who can connect"
    )]
    Unauthenticated {
        /// The listen address.
        listen: SocketAddr,
    },
}

/// The settings the server runs with, every value resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Which store.
    pub store: StoreKind,
    /// Redis URL (used with `store = redis`), or seed nodes (`store = redis-cluster`), or
    /// sentinels (`store = redis-sentinel`).
    pub redis_url: String,
    /// The master the sentinels monitor (`store = redis-sentinel` only).
    pub redis_sentinel_master: Option<String>,
    /// PEM CA certificates trusted for a `rediss://` Redis URL instead of the system's roots.
    pub redis_ca: Option<PathBuf>,
    /// MySQL URL (used with `store = mysql`).
    pub mysql_url: String,
    /// MySQL table of the sessions.
    pub mysql_table: String,
    /// Most pooled MySQL connections.
    pub mysql_pool_size: u32,
    /// How often the MySQL reaper runs.
    pub mysql_reap_interval: Duration,
    /// Most rows one reaper statement deletes.
    pub mysql_reap_batch: u32,
    /// Prefix of every Redis key.
    pub redis_prefix: String,
    /// Most pooled Redis connections.
    pub redis_pool_size: usize,
    /// The Redis record format writes use: 1 (hash) or 2 (packed).
    pub redis_record_format: u8,
    /// Bound on one store call.
    pub store_timeout: Duration,
    /// Ttl of sessions created without one.
    pub default_ttl: Duration,
    /// Largest ttl; longer ones are clamped.
    pub max_ttl: Duration,
    /// Cap on a session's attributes in bytes.
    pub max_session_bytes: usize,
    /// Most live sessions of one user in a namespace (0: no cap); see [`crate::store::cap`].
    pub max_sessions_per_user: u32,
    /// What a session past `max_sessions_per_user` does.
    pub on_session_cap: OnCap,
    /// Absolute lifetime of every session from its creation, if any (`--max-lifetime`).
    pub max_lifetime: Option<Duration>,
    /// Least expiry move a touch writes (`--touch-granularity`); `None` is auto: the larger of
    /// 1 s and 1% of the session's ttl, see [`crate::service::TouchGranularity`].
    pub touch_granularity: Option<Duration>,
    /// Sessions the Redis store's near cache holds (`--cache-capacity`); 0: none.
    pub cache_capacity: usize,
    /// Bearer token accepted on SessionStore calls in every namespace, read-write, if any.
    pub auth_token: Option<Secret>,
    /// File of scoped tokens, if any (read when the settings are resolved).
    pub auth_token_file: Option<PathBuf>,
    /// The tokens of `auth_token_file`, as read when the settings were resolved.
    pub auth_file_tokens: Vec<crate::auth::ScopedToken>,
    /// Serve on a non-loopback address without authentication.
    pub allow_unauthenticated: bool,
    /// Log format.
    pub log_format: LogFormat,
    /// Prometheus listen address, if any.
    pub metrics_listen: Option<SocketAddr>,
    /// Time in-flight calls get at shutdown.
    pub shutdown_grace: Duration,
    /// Threads serving gRPC connections as set (1: the main runtime serves them); `None`: see
    /// [`Settings::serve_threads`].
    pub serve_threads: Option<usize>,
    /// HTTP/2 streams one connection may have open at once.
    pub max_concurrent_streams: u32,
    /// Client connections open at once, TLS handshakes under way included.
    pub max_connections: usize,
    /// Watch streams open at once on one namespace.
    pub max_watchers_per_namespace: usize,
    /// Watch streams open at once over all namespaces.
    pub max_watchers: usize,
    /// Bound on a new connection's TLS handshake and on the wait for its first bytes.
    pub handshake_timeout: Duration,
    /// Deadline of every call but Watch.
    pub call_timeout: Duration,
    /// Time between two background checks of the store by the health service.
    pub health_interval: Duration,
    /// PEM certificate chain of the gRPC listener; with `tls_key`, gRPC is served over TLS.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates that must have signed every client's certificate (mTLS), if any.
    pub tls_client_ca: Option<PathBuf>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings::resolve(Cli::default(), None).expect("built-in defaults are valid")
    }
}

impl Settings {
    /// Reads the file named by `--config` (if any) and resolves everything.
    pub fn load(cli: Cli) -> Result<Settings, ConfigError> {
        let text = match &cli.config {
            Some(path) => {
                Some(
                    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                        path: path.clone(),
                        source,
                    })?,
                )
            }
            None => None,
        };
        Settings::resolve(cli, text.as_deref())
    }

    /// Merges flags over the file's text over the defaults, then checks the ranges.
    pub fn resolve(cli: Cli, file_text: Option<&str>) -> Result<Settings, ConfigError> {
        let file: FileConfig = match file_text {
            Some(text) => toml::from_str(text)?,
            None => FileConfig::default(),
        };
        let auth_token_file = cli.auth_token_file.or(file.auth_token_file);
        let auth_file_tokens = match &auth_token_file {
            Some(path) => crate::auth::read_token_file(path)?,
            None => Vec::new(),
        };
        let settings = Settings {
            listen: cli
                .listen
                .or(file.listen)
                .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("valid default address")),
            store: cli.store.or(file.store).unwrap_or(StoreKind::Memory),
            redis_url: cli
                .redis_url
                .or(file.redis_url)
                .unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned()),
            redis_sentinel_master: cli.redis_sentinel_master.or(file.redis_sentinel_master),
            redis_ca: cli.redis_ca.or(file.redis_ca),
            mysql_url: cli
                .mysql_url
                .or(file.mysql_url)
                .unwrap_or_else(|| "mysql://root@127.0.0.1:3306/test".to_owned()),
            mysql_table: cli
                .mysql_table
                .or(file.mysql_table)
                .unwrap_or_else(|| "stickless_sessions".to_owned()),
            mysql_pool_size: cli.mysql_pool_size.or(file.mysql_pool_size).unwrap_or(16),
            mysql_reap_interval: cli
                .mysql_reap_interval
                .or(file.mysql_reap_interval)
                .unwrap_or(Duration::from_secs(1)),
            mysql_reap_batch: cli
                .mysql_reap_batch
                .or(file.mysql_reap_batch)
                .unwrap_or(500),
            redis_prefix: cli
                .redis_prefix
                .or(file.redis_prefix)
                .unwrap_or_else(|| "stickless".to_owned()),
            redis_pool_size: cli.redis_pool_size.or(file.redis_pool_size).unwrap_or(32),
            redis_record_format: cli
                .redis_record_format
                .or(file.redis_record_format)
                .unwrap_or(2),
            store_timeout: cli
                .store_timeout
                .or(file.store_timeout)
                .unwrap_or(DEFAULT_STORE_TIMEOUT),
            default_ttl: cli.default_ttl.or(file.default_ttl).unwrap_or(DEFAULT_TTL),
            max_ttl: cli.max_ttl.or(file.max_ttl).unwrap_or(DEFAULT_MAX_TTL),
            max_session_bytes: cli
                .max_session_bytes
                .or(file.max_session_bytes)
                .unwrap_or(DEFAULT_MAX_SESSION_BYTES),
            max_sessions_per_user: cli
                .max_sessions_per_user
                .or(file.max_sessions_per_user)
                .unwrap_or(0),
            on_session_cap: cli
                .on_session_cap
                .or(file.on_session_cap)
                .unwrap_or_default(),
            max_lifetime: cli.max_lifetime.or(file.max_lifetime),
            touch_granularity: cli.touch_granularity.or(file.touch_granularity),
            cache_capacity: cli.cache_capacity.or(file.cache_capacity).unwrap_or(0),
            auth_token: cli.auth_token.or(file.auth_token),
            auth_token_file,
            auth_file_tokens,
            allow_unauthenticated: cli.allow_unauthenticated
                || file.allow_unauthenticated.unwrap_or(false),
            log_format: cli
                .log_format
                .or(file.log_format)
                .unwrap_or(LogFormat::Text),
            metrics_listen: cli.metrics_listen.or(file.metrics_listen),
            shutdown_grace: cli
                .shutdown_grace
                .or(file.shutdown_grace)
                .unwrap_or(DEFAULT_SHUTDOWN_GRACE),
            serve_threads: cli.serve_threads.or(file.serve_threads),
            max_concurrent_streams: cli
                .max_concurrent_streams
                .or(file.max_concurrent_streams)
                .unwrap_or(DEFAULT_MAX_CONCURRENT_STREAMS),
            max_connections: cli
                .max_connections
                .or(file.max_connections)
                .unwrap_or(DEFAULT_MAX_CONNECTIONS),
            max_watchers_per_namespace: cli
                .max_watchers_per_namespace
                .or(file.max_watchers_per_namespace)
                .unwrap_or(DEFAULT_MAX_WATCHERS_PER_NAMESPACE),
            max_watchers: cli
                .max_watchers
                .or(file.max_watchers)
                .unwrap_or(DEFAULT_MAX_WATCHERS),
            handshake_timeout: cli
                .handshake_timeout
                .or(file.handshake_timeout)
                .unwrap_or(DEFAULT_HANDSHAKE_TIMEOUT),
            call_timeout: cli
                .call_timeout
                .or(file.call_timeout)
                .unwrap_or(DEFAULT_CALL_TIMEOUT),
            health_interval: cli
                .health_interval
                .or(file.health_interval)
                .unwrap_or(DEFAULT_HEALTH_INTERVAL),
            tls_cert: cli.tls_cert.or(file.tls_cert),
            tls_key: cli.tls_key.or(file.tls_key),
            tls_client_ca: cli.tls_client_ca.or(file.tls_client_ca),
        };
        settings.validate()?;
        Ok(settings)
    }

    /// Threads to serve gRPC connections on: as set, else one per CPU for the memory store and
    /// for Redis with a near cache (`--cache-capacity`: most reads never leave the serving
    /// thread, measured 2x faster than on the main runtime), and 1 (the main runtime) for Redis
    /// and MySQL. With Redis, serving threads measured no faster
    /// (its connections are made on the main runtime, one more hop per call) though with a
    /// shorter tail (BENCHMARKS.md); MySQL connections would live on whichever serving thread
    /// first opened them.
    pub fn serve_threads(&self) -> usize {
        self.serve_threads.unwrap_or_else(|| {
            let serves_from_memory = match self.store {
                StoreKind::Memory => true,
                StoreKind::Redis | StoreKind::RedisSentinel => self.cache_capacity > 0,
                StoreKind::RedisCluster | StoreKind::Mysql => false,
            };
            if serves_from_memory {
                std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
            } else {
                1
            }
        })
    }

    /// Whether serving on `listen` would break "authenticated by default": the address is not
    /// loopback, no credential is in use (a token, a token file's tokens - not its name - or a
    /// TLS client CA) and `allow_unauthenticated` is off. Config validation asks it about
    /// `listen`, the server about the address it really bound.
    pub fn refuses_unauthenticated(&self, listen: SocketAddr) -> bool {
        let authenticated = self.auth_token.is_some()
            || !self.auth_file_tokens.is_empty()
            || self.tls_client_ca.is_some();
        !listen.ip().to_canonical().is_loopback() && !authenticated && !self.allow_unauthenticated
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |msg: String| Err(ConfigError::Invalid(msg));
        if !self.store.is_built() {
            return Err(ConfigError::StoreNotBuilt(self.store));
        }
        if self.default_ttl.is_zero() || self.max_ttl.is_zero() {
            return invalid("default-ttl and max-ttl must be above zero".into());
        }
        if self.default_ttl > self.max_ttl {
            return invalid(format!(
                "default-ttl ({:?}) is above max-ttl ({:?})",
                self.default_ttl, self.max_ttl
            ));
        }
        if self.max_lifetime.is_some_and(|lifetime| lifetime.is_zero()) {
            return invalid("max-lifetime must be above zero (leave it out for none)".into());
        }
        if self.max_session_bytes == 0 || self.max_session_bytes > MAX_SESSION_BYTES_CEILING {
            return invalid(format!(
                "max-session-bytes must be 1..={MAX_SESSION_BYTES_CEILING}, got {}",
                self.max_session_bytes
            ));
        }
        if self.store_timeout.is_zero() {
            return invalid("store-timeout must be above zero".into());
        }
        if let Some(threads) = self.serve_threads
            && (threads == 0 || threads > MAX_SERVE_THREADS)
        {
            return invalid(format!(
                "serve-threads must be 1 to {MAX_SERVE_THREADS}, not {threads}"
            ));
        }
        if self.max_concurrent_streams == 0
            || self.max_connections == 0
            || self.max_watchers_per_namespace == 0
            || self.max_watchers == 0
        {
            return invalid(
                "max-concurrent-streams, max-connections, max-watchers-per-namespace and \
                 max-watchers must be at least 1"
                    .into(),
            );
        }
        if self.call_timeout.is_zero() {
            return invalid("call-timeout must be above zero".into());
        }
        if self.health_interval.is_zero() {
            return invalid("health-interval must be above zero".into());
        }
        if self.handshake_timeout.is_zero() {
            return invalid("handshake-timeout must be above zero".into());
        }
        if self.redis_pool_size == 0 {
            return invalid("redis-pool-size must be at least 1".into());
        }
        if self.cache_capacity > MAX_CACHE_CAPACITY {
            return invalid(format!(
                "cache-capacity must be at most {MAX_CACHE_CAPACITY}, got {}",
                self.cache_capacity
            ));
        }
        match self.store {
            _ if self.cache_capacity == 0 => {}
            StoreKind::Redis | StoreKind::RedisSentinel => {}
            StoreKind::RedisCluster => {
                return invalid(
                    "cache-capacity is not available with store redis-cluster: the near cache \
                     is kept exact by one tracking connection to the one primary, and a \
                     cluster's writes land on every master (use 0)"
                        .into(),
                );
            }
            other => {
                return invalid(format!(
                    "cache-capacity is for store redis and redis-sentinel (store is {other}): \
                     the memory store needs no cache, and mysql has none (use 0)"
                ));
            }
        }
        let table_ok = |t: &str| {
            (1..=64).contains(&t.len()) && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        };
        if !table_ok(&self.mysql_table) {
            return invalid("mysql-table must be 1 to 64 characters of [A-Za-z0-9_]".into());
        }
        if self.mysql_reap_interval.is_zero() || self.mysql_reap_batch == 0 {
            return invalid("mysql-reap-interval and mysql-reap-batch must be above zero".into());
        }
        if self.mysql_pool_size == 0 {
            return invalid("mysql-pool-size must be at least 1".into());
        }
        // Unknown parameters, an `ssl-ca` that would be ignored, unreadable TLS files: exit 2
        // here rather than a failed start (or a cleartext connection) later.
        #[cfg(feature = "mysql-store")]
        if self.store == StoreKind::Mysql
            && let Err(msg) = crate::store::mysql::check_url(&self.mysql_url)
        {
            return invalid(msg);
        }
        match (self.store, &self.redis_sentinel_master) {
            (StoreKind::RedisSentinel, None) => {
                return invalid(
                    "store redis-sentinel needs redis-sentinel-master: the name the sentinels \
                     monitor the primary under (`sentinel monitor NAME ...`)"
                        .into(),
                );
            }
            (StoreKind::RedisSentinel, Some(name))
                if name.is_empty()
                    || name.contains(|c: char| c.is_whitespace() || c.is_control()) =>
            {
                return invalid(format!(
                    "redis-sentinel-master must be a non-empty name without spaces, got {name:?}"
                ));
            }
            (StoreKind::RedisSentinel, Some(_)) | (_, None) => {}
            (other, Some(_)) => {
                return invalid(format!(
                    "redis-sentinel-master is only for store redis-sentinel (store is {other}): \
                     use --store redis-sentinel, or drop redis-sentinel-master"
                ));
            }
        }
        if self.store == StoreKind::RedisSentinel
            && self
                .redis_url
                .split(',')
                .all(|entry| entry.trim().is_empty())
        {
            return invalid("store redis-sentinel needs redis-url to list the sentinels".into());
        }
        if let Some(ca) = &self.redis_ca
            && matches!(
                self.store,
                StoreKind::Redis | StoreKind::RedisCluster | StoreKind::RedisSentinel
            )
        {
            // A CA only makes sense for TLS; never connect in cleartext when one was given.
            let cleartext = |seed: &str| seed.contains("://") && !seed.starts_with("rediss://");
            if !self.redis_url.trim().starts_with("rediss://")
                || self.redis_url.split(',').map(str::trim).any(cleartext)
            {
                return invalid(
                    "redis-ca is set but redis-url is not rediss://: use a rediss:// URL for \
                     Redis over TLS"
                        .into(),
                );
            }
            let certs = std::fs::read(ca)
                .map_err(|e| e.to_string())
                .and_then(|pem| {
                    use rustls::pki_types::{CertificateDer, pem::PemObject};
                    CertificateDer::pem_slice_iter(&pem)
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| e.to_string())
                });
            match certs {
                Ok(certs) if !certs.is_empty() => {}
                Ok(_) => {
                    return invalid(format!("redis-ca {}: no PEM certificate", ca.display()));
                }
                Err(e) => return invalid(format!("cannot read redis-ca {}: {e}", ca.display())),
            }
        }
        if self.redis_prefix.is_empty() || self.redis_prefix.contains(['{', '}']) {
            return invalid("redis-prefix must be non-empty and free of '{' and '}'".into());
        }
        if self.auth_token.as_deref().is_some_and(str::is_empty) {
            return invalid("auth-token, when set, must not be empty".into());
        }
        if let Some(flag) = &self.auth_token {
            let flag = crate::auth::ScopedToken::new(flag, crate::auth::Scope::unrestricted());
            if self.auth_file_tokens.iter().any(|t| t.same_token(&flag)) {
                return invalid("auth-token is also in the auth token file: give it once".into());
            }
        }
        // Authenticated by default: anyone who can reach a public address could otherwise
        // create a session for any user, or watch every session id as it is made.
        if self.refuses_unauthenticated(self.listen) {
            return Err(ConfigError::Unauthenticated {
                listen: self.listen,
            });
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return invalid("tls-cert and tls-key go together: set both or neither".into());
        }
        if self.tls_client_ca.is_some() && self.tls_cert.is_none() {
            return invalid("tls-client-ca needs tls-cert and tls-key (mTLS is TLS)".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("session-server").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn debug_of_the_settings_never_shows_the_auth_token() {
        let parsed = cli(&["--auth-token", "s3cret-server-token"]);
        assert!(!format!("{parsed:?}").contains("s3cret"), "{parsed:?}");
        let file = "auth_token = \"s3cret-file-token\"\n";
        let settings = Settings::resolve(parsed, Some(file)).unwrap();
        assert_eq!(settings.auth_token.as_deref(), Some("s3cret-server-token"));
        let shown = format!("{settings:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("<hidden>"), "{shown}");
        let from_file = Settings::resolve(Cli::default(), Some(file)).unwrap();
        assert_eq!(from_file.auth_token.as_deref(), Some("s3cret-file-token"));
        assert!(!format!("{from_file:?}").contains("s3cret"));
    }

    #[test]
    fn defaults_serve_memory_on_loopback() {
        let s = Settings::resolve(Cli::default(), None).unwrap();
        assert_eq!(s.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(s.store, StoreKind::Memory);
        assert_eq!(s.max_session_bytes, 64 * 1024);
        assert_eq!(s.auth_token, None);
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(
            s.serve_threads(),
            cpus,
            "memory store: a serving thread per CPU"
        );
        // (Built by hand: a build without a store's feature refuses `--store` of it.)
        let redis = Settings {
            store: StoreKind::Redis,
            ..Settings::default()
        };
        assert_eq!(redis.serve_threads(), 1, "Redis: the main runtime");
        let mysql = Settings {
            store: StoreKind::Mysql,
            ..Settings::default()
        };
        assert_eq!(mysql.serve_threads(), 1, "MySQL: the main runtime");
        let file = Settings::resolve(Cli::default(), Some("serve_threads = 4")).unwrap();
        assert_eq!(file.serve_threads(), 4);
    }

    #[test]
    fn lifetime_and_touch_granularity_come_from_flags_or_file() {
        let defaults = Settings::default();
        assert_eq!(
            defaults.max_lifetime, None,
            "no absolute lifetime by default"
        );
        assert_eq!(
            defaults.touch_granularity, None,
            "auto granularity by default"
        );
        let file = "max_lifetime = \"8h\"\ntouch_granularity = \"0s\"\n";
        let s = Settings::resolve(Cli::default(), Some(file)).unwrap();
        assert_eq!(s.max_lifetime, Some(Duration::from_secs(8 * 3600)));
        assert_eq!(s.touch_granularity, Some(Duration::ZERO));
        let flags = cli(&["--max-lifetime", "12h", "--touch-granularity", "5s"]);
        let s = Settings::resolve(flags, Some(file)).unwrap();
        assert_eq!(s.max_lifetime, Some(Duration::from_secs(12 * 3600)));
        assert_eq!(s.touch_granularity, Some(Duration::from_secs(5)));
        assert!(Settings::resolve(cli(&["--max-lifetime", "0s"]), None).is_err());
    }

    #[test]
    fn cache_capacity_is_off_by_default_and_only_for_one_redis() {
        assert_eq!(Settings::default().cache_capacity, 0);
        let s = Settings::resolve(
            Cli::default(),
            Some("store = \"redis\"\ncache_capacity = 500\n"),
        )
        .unwrap();
        assert_eq!(s.cache_capacity, 500);
        let flags = cli(&["--store", "redis", "--cache-capacity", "7"]);
        assert_eq!(Settings::resolve(flags, None).unwrap().cache_capacity, 7);
        for store in ["redis-cluster", "memory"] {
            let flags = cli(&["--store", store, "--cache-capacity", "10"]);
            let error = Settings::resolve(flags, None).unwrap_err().to_string();
            assert!(error.contains("cache-capacity"), "{store}: {error}");
        }
        let flags = cli(&["--store", "redis-cluster", "--cache-capacity", "0"]);
        assert!(Settings::resolve(flags, None).is_ok());
        let huge = (MAX_CACHE_CAPACITY + 1).to_string();
        let flags = cli(&["--store", "redis", "--cache-capacity", huge.as_str()]);
        assert!(Settings::resolve(flags, None).is_err());
    }

    #[test]
    fn flags_win_over_file_and_file_over_defaults() {
        let file = "log_format = \"json\"\ndefault_ttl = \"10m\"\nmax_ttl = \"2h\"\n";
        let s = Settings::resolve(cli(&["--default-ttl", "5m"]), Some(file)).unwrap();
        assert_eq!(s.log_format, LogFormat::Json);
        assert_eq!(s.default_ttl, Duration::from_secs(300));
        assert_eq!(s.max_ttl, Duration::from_secs(7200));
    }

    #[test]
    fn resource_limits_come_from_flags_env_or_file_and_refuse_zero() {
        let s = Settings::default();
        assert_eq!(s.max_concurrent_streams, DEFAULT_MAX_CONCURRENT_STREAMS);
        assert_eq!(s.max_connections, DEFAULT_MAX_CONNECTIONS);
        assert_eq!(
            s.max_watchers_per_namespace,
            DEFAULT_MAX_WATCHERS_PER_NAMESPACE
        );
        assert_eq!(s.call_timeout, DEFAULT_CALL_TIMEOUT);
        assert_eq!(s.max_watchers, DEFAULT_MAX_WATCHERS);
        assert_eq!(s.handshake_timeout, DEFAULT_HANDSHAKE_TIMEOUT);
        let file = "max_concurrent_streams = 8\nmax_connections = 20\n\
                    max_watchers_per_namespace = 3\ncall_timeout = \"250ms\"\n\
                    max_watchers = 7\nhandshake_timeout = \"2s\"\n";
        let s = Settings::resolve(Cli::default(), Some(file)).unwrap();
        assert_eq!(
            (s.max_concurrent_streams, s.max_connections),
            (8, 20),
            "from the file"
        );
        assert_eq!(s.max_watchers_per_namespace, 3);
        assert_eq!(s.call_timeout, Duration::from_millis(250));
        assert_eq!(s.max_watchers, 7);
        assert_eq!(s.handshake_timeout, Duration::from_secs(2));
        let flags = cli(&[
            "--max-concurrent-streams",
            "16",
            "--max-connections",
            "40",
            "--max-watchers-per-namespace",
            "5",
            "--call-timeout",
            "2s",
            "--max-watchers",
            "9",
            "--handshake-timeout",
            "500ms",
        ]);
        let s = Settings::resolve(flags, Some(file)).unwrap();
        assert_eq!((s.max_concurrent_streams, s.max_connections), (16, 40));
        assert_eq!(s.max_watchers_per_namespace, 5);
        assert_eq!(s.call_timeout, Duration::from_secs(2));
        assert_eq!(s.max_watchers, 9);
        assert_eq!(s.handshake_timeout, Duration::from_millis(500));
        for zero in [
            "--max-concurrent-streams",
            "--max-connections",
            "--max-watchers-per-namespace",
            "--max-watchers",
        ] {
            assert!(
                Settings::resolve(cli(&[zero, "0"]), None).is_err(),
                "{zero} 0"
            );
        }
        assert!(Settings::resolve(cli(&["--call-timeout", "0s"]), None).is_err());
        assert!(Settings::resolve(cli(&["--handshake-timeout", "0s"]), None).is_err());
    }

    #[test]
    fn unknown_file_key_is_an_error_naming_it() {
        let err = Settings::resolve(
            Cli::default(),
            Some("listen = \"127.0.0.1:1\"\nlisten_port = 5\n"),
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("listen_port"), "{msg}");
        assert!(msg.contains("line 2"), "{msg}");
    }

    #[test]
    fn out_of_range_values_are_refused() {
        for args in [
            &["--default-ttl", "2h", "--max-ttl", "1h"][..],
            &["--max-session-bytes", "0"][..],
            &["--auth-token", ""][..],
            &["--store-timeout", "0s"][..],
            &["--mysql-table", "sessions; DROP TABLE x"][..],
            &["--serve-threads", "0"][..],
            &["--serve-threads", "1025"][..],
        ] {
            assert!(
                Settings::resolve(cli(args), None).is_err(),
                "{args:?} accepted"
            );
        }
        assert!(Settings::resolve(Cli::default(), Some("default_ttl = \"soon\"")).is_err());
        assert!(Cli::try_parse_from(["session-server", "--store", "mongo"]).is_err());
    }

    #[test]
    fn a_store_left_out_of_the_build_is_a_config_error_naming_its_feature() {
        for kind in [StoreKind::Redis, StoreKind::RedisCluster, StoreKind::Mysql] {
            let result = Settings::resolve(cli(&["--store", kind.name()]), None);
            if kind.is_built() {
                assert!(result.is_ok(), "{kind}: {result:?}");
            } else {
                let msg = result.unwrap_err().to_string();
                let feature = kind.feature().unwrap();
                assert!(
                    msg.contains(&format!("built without the {feature} feature")),
                    "{kind}: {msg}"
                );
            }
        }
    }

    #[cfg(feature = "mysql-store")]
    #[test]
    fn a_mysql_url_with_unknown_or_contradicting_parameters_is_refused() {
        for url in [
            "mysql://root@127.0.0.1/test?ssl_mode=required",
            "mysql://root@127.0.0.1/test?ssl-mode=required&ssl-ca=/etc/ca.pem",
            "mysql://root@127.0.0.1/test?ssl-mode=verify_ca&ssl-ca=/nonexistent/ca.pem",
        ] {
            let err = Settings::resolve(cli(&["--store", "mysql", "--mysql-url", url]), None)
                .expect_err(url);
            assert!(matches!(err, ConfigError::Invalid(_)), "{url}: {err}");
        }
        let tls = "mysql://root@127.0.0.1/test?ssl-mode=required";
        assert!(Settings::resolve(cli(&["--store", "mysql", "--mysql-url", tls]), None).is_ok());
        // Only the store in use is checked.
        let unused = cli(&["--mysql-url", "mysql://db/test?charset=latin1"]);
        assert!(Settings::resolve(unused, None).is_ok());
    }

    #[test]
    fn a_public_listen_address_needs_authentication_or_the_opt_out() {
        for listen in ["0.0.0.0:50051", "[::]:50051", "192.0.2.7:50051"] {
            let err = Settings::resolve(cli(&["--listen", listen]), None).unwrap_err();
            assert!(
                matches!(err, ConfigError::Unauthenticated { .. }),
                "{listen}: {err}"
            );
            for fix in [
                &["--allow-unauthenticated"][..],
                &["--auth-token", "t0ken"][..],
            ] {
                let args = [&["--listen", listen][..], fix].concat();
                assert!(Settings::resolve(cli(&args), None).is_ok(), "{args:?}");
            }
            let file = format!("listen = \"{listen}\"\nallow_unauthenticated = true\n");
            assert!(
                Settings::resolve(Cli::default(), Some(&file))
                    .unwrap()
                    .allow_unauthenticated
            );
            // mTLS authenticates too (checked without reading the files).
            let mtls = Settings {
                listen: listen.parse().unwrap(),
                tls_cert: Some("cert.pem".into()),
                tls_key: Some("key.pem".into()),
                tls_client_ca: Some("ca.pem".into()),
                ..Settings::default()
            };
            assert!(mtls.validate().is_ok(), "{listen} with mTLS");
        }
        for loopback in [
            "127.0.0.1:0",
            "127.0.0.2:0",
            "[::1]:0",
            "[::ffff:127.0.0.1]:0",
        ] {
            assert!(
                Settings::resolve(cli(&["--listen", loopback]), None).is_ok(),
                "{loopback}"
            );
        }
    }
}
