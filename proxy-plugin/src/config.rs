//! The proxy's configuration: command-line flags with environment-variable twins (clap), and an
//! optional TOML file (`--config`) whose unknown keys are an error naming the key and its line.
//!
//! Precedence: flag or environment variable, then the file, then the built-in default (backends
//! given as flags replace the file's whole list). [`resolve`] takes the parsed flags and the
//! file's text as arguments, so tests inject values and `SIGHUP` re-resolves the same flags
//! over a fresh read of the file.
//!
//! Every value is checked where it is read, with one parser per kind of value shared by flags
//! and file: a bad flag is refused naming the flag, a bad file value naming its line. Checks
//! that involve several settings run last, in [`resolve`].
//!
//! ```toml
//! listen = "0.0.0.0:8080"
//! admin_listen = "127.0.0.1:8081"
//! # admin_token_file = "/etc/stickless/admin-token"   # or admin_token; needed off loopback
//! balance = "cookie-hash:sid"      # or round-robin, least-conn, ip-hash, sticky-cookie, ...
//! hash_type = "consistent"         # map (default) or consistent
//! trusted_proxies = ["10.0.0.0/8"]
//! # allow_underscore_headers = true   # forward header names with `_` (dropped by default)
//! # backend_ca = "/etc/stickless/backend-ca.pem"   # for https:// backends; system roots otherwise
//!
//! [[backend]]
//! url = "http://127.0.0.1:9001"
//! weight = 2
//! name = "s1"
//!
//! [tls]               # HTTPS on listen (ALPN h2, http/1.1); both files re-read on SIGHUP
//! cert = "/etc/stickless/proxy.pem"
//! key = "/etc/stickless/proxy.key"
//!
//! [health]            # check, interval, timeout, rise, fall, max_fails, fail_timeout
//! check = "http:/healthz"
//!
//! [limits]            # header_read_timeout, max_header_bytes, max_body_bytes, connect_timeout,
//! max_tries = 3       # response_timeout, max_connections, max_tries, retry_buffer_bytes,
//! min_upload_rate = "1k"  # body_read_timeout, send_timeout, idle_timeout
//! # max_conns_per_ip = 20   # per client address; also rate_per_ip = "10/s", burst = 20
//!
//! [sticky]            # for balance = "sticky-cookie"
//! cookie = "stickless_backend"
//! key = "<64 hex digits or base64 of 32+ bytes>"
//!
//! [session_lookup]    # url turns the plugin on
//! url = "http://127.0.0.1:50051"
//! attrs = ["cart"]    # also namespace, cookie, on_failure, timeout, auth_token
//! # header = "x-session-token"   # the session id in a request header too (no cookie needed)
//! snapshot_keys = ["<hex or base64 of 32+ bytes>"]  # outage fallback; also snapshot_cookie
//! snapshot_max_age = "1h"   # how long past the store's last word a snapshot may stand in
//! outage_grace = "5s"       # a timeout within this of the store's last answer is no outage
//! # cache = 10000           # lookup cache of N sessions, kept exact by a Watch stream (0: off)
//! # ca = "/etc/stickless/ca.pem"   # for an https:// url; also client_cert, client_key (mTLS)
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use ipnet::IpNet;

use crate::balance::{BalanceMode, HashType, StickyConfig};

mod admin;
mod client_limits;
mod file;
mod flags;
mod lookup;
mod tls;
mod values;

pub use admin::AdminToken;
pub use client_limits::{ClientLimits, RateSetting, RequestRate};
use file::FileConfig;
pub use flags::Cli;
pub use tls::TlsConfig;
use values::Parsed;
pub(crate) use values::header_name;
pub use values::{
    AttrName, CookieName, LookupUrl, Namespace, SecretArg, SessionHeader, SnapshotKey, StickyKey,
    Token,
};

/// Default client-facing address: loopback only, so a fresh start exposes nothing.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Default name of the sticky-cookie balancer's cookie.
pub const DEFAULT_STICKY_COOKIE: &str = "stickless_backend";
/// Shortest sticky-cookie key: 256 bits, the HMAC-SHA256 output size.
pub const MIN_STICKY_KEY_BYTES: usize = 32;
/// Highest backend weight in the configuration (nginx caps at 1000 as well); 0 is only for
/// the admin API, to drain a backend at run time.
pub const MAX_WEIGHT: u32 = 1000;
/// Smallest `max_header_bytes`: hyper's read buffer cannot be smaller, and ordinary browser
/// requests with a few cookies need about that much.
pub const MIN_HEADER_BYTES: u64 = 8 * 1024;
/// Default name of the cookie holding the session id (the session-lookup plugin).
pub const DEFAULT_SESSION_COOKIE: &str = "sid";
/// Default session namespace (what the session server calls an empty one).
pub const DEFAULT_SESSION_NAMESPACE: &str = "default";
/// Default attributes forwarded as `x-session-attr-NAME`: `cart`, the one `demo-app --sessions
/// proxy` reads, so that the demo behind the lookup works with both sides' defaults (a session
/// without it gets no such header). `--session-attr` / `attrs` replace the list.
pub const DEFAULT_SESSION_ATTRS: &[&str] = &["cart"];
/// Default bound on one session lookup: a slow store must not hold every request for long.
pub const DEFAULT_LOOKUP_TIMEOUT: Duration = Duration::from_millis(500);
/// Default name of the signed session snapshot cookie (`session-client`'s default too).
pub const DEFAULT_SNAPSHOT_COOKIE: &str = "sid_snap";
/// Default limit of a snapshot past the store's last confirmation (`session-client`'s default
/// too): see [`LookupConfig::snapshot_max_age`].
pub const DEFAULT_SNAPSHOT_MAX_AGE: Duration = session_client::cookie::DEFAULT_SNAPSHOT_MAX_AGE;
/// Largest `--session-cache`: a bound on the memory a typo can claim (a million sessions of a
/// few hundred bytes each is a few hundred MiB).
pub const MAX_SESSION_CACHE: usize = 1_000_000;
/// Default outage grace (`session-client`'s default): see [`LookupConfig::outage_grace`].
pub const DEFAULT_OUTAGE_GRACE: Duration = session_client::layer::DEFAULT_OUTAGE_GRACE;

/// One backend as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    /// Name (defaults to `host:port`).
    pub name: String,
    /// `host:port` to connect to (from an `http://host:port` URL).
    pub authority: String,
    /// Relative weight.
    pub weight: u32,
    /// An `https://` backend: always dialled over TLS, its certificate verified for the host
    /// of `authority` (against `backend_ca`, else the system's roots).
    pub tls: bool,
}

/// Active health checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthCheckKind {
    /// No active checks (passive marking only).
    Off,
    /// A TCP connect.
    Tcp,
    /// `GET <path>` expecting a 2xx.
    Http(String),
}

/// Health checking settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    /// Active check kind.
    pub kind: HealthCheckKind,
    /// Time between checks of one backend.
    pub interval: Duration,
    /// Bound on one check.
    pub timeout: Duration,
    /// Consecutive successes that bring a down backend up.
    pub rise: u32,
    /// Consecutive failures that take an up backend down.
    pub fall: u32,
    /// Passive: failures within `fail_timeout` that take a backend down (0: off).
    pub max_fails: u32,
    /// Passive window, and how long a passively marked backend stays down before it is tried
    /// again (when no active check brings it back sooner).
    pub fail_timeout: Duration,
}

impl Default for HealthConfig {
    /// TCP checks every 2 s (1 s bound), up after 2 successes, down after 3 failures; passive:
    /// one failure marks a backend down for 10 s (nginx's `max_fails=1 fail_timeout=10s`).
    fn default() -> Self {
        HealthConfig {
            kind: HealthCheckKind::Tcp,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
            max_fails: 1,
            fail_timeout: Duration::from_secs(10),
        }
    }
}

/// What the session-lookup plugin does when the session store is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupFailure {
    /// Forward the request without session headers.
    Open,
    /// Answer 503.
    Closed,
}

/// The session-lookup plugin's settings. Its `Debug` shows whether a token is set, never the
/// token.
#[derive(Clone, PartialEq, Eq)]
pub struct LookupConfig {
    /// Session server URLs (`http://host:port`), several servers over one store.
    pub session_servers: Vec<String>,
    /// Session namespace.
    pub namespace: String,
    /// Name of the cookie holding the session id.
    pub cookie: String,
    /// Request header carrying the session id too (`--session-header`, lower case), for
    /// clients without cookies: when present and non-empty it takes precedence over the
    /// cookie, and it is forwarded to the backends. A backend's response carrying it with an
    /// empty value ends the session, as one clearing the session cookie does. `None`: cookie
    /// only.
    pub session_header: Option<String>,
    /// Attributes forwarded as `x-session-attr-NAME` (values base64, standard alphabet).
    pub attrs: Vec<String>,
    /// Behaviour when the store is unreachable.
    pub on_failure: LookupFailure,
    /// Bearer token for the session server.
    pub auth_token: Option<String>,
    /// Bound on one lookup.
    pub timeout: Duration,
    /// Keys of the signed session snapshot cookie, signing key first (the backends' cookie key
    /// material); empty: no snapshot, so an unreachable store means `on_failure`.
    pub snapshot_keys: Vec<SnapshotKey>,
    /// Name of the snapshot cookie.
    pub snapshot_cookie: String,
    /// How long past the store's last confirmation a snapshot may stand in for the session or
    /// be pushed back with `Restore` (`--snapshot-max-age`): snapshots the plugin writes expire
    /// by then, and older ones are refused whoever wrote them. The bound on a logged-out
    /// session coming back from cookies copied before the logout into a store that lost its
    /// data.
    pub snapshot_max_age: Duration,
    /// A lookup that timed out while the store answered less than this long ago is an error
    /// (503 with `Retry-After` when failing closed), not an outage: the snapshot stands in only
    /// for an unreachable store, or one silent for longer than this (`--session-outage-grace`).
    pub outage_grace: Duration,
    /// Sessions the lookup cache holds at most (`--session-cache`, `cache`); 0 (the default):
    /// no cache, every request reads the store. See `lookup/cache.rs`: entries are invalidated
    /// by a `Watch` stream of the namespace (bypassed while it is down) and by responses that
    /// end or replace the session.
    pub cache: usize,
    /// TLS settings of an `https://` session server, read from the `--session-ca` /
    /// `--session-client-cert` / `--session-client-key` files (`None`: the system's roots).
    /// Holds the files' contents, so a reload that reads changed files rebuilds the client.
    pub tls: Option<session_client::ClientTls>,
}

impl std::fmt::Debug for LookupConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LookupConfig")
            .field("session_servers", &self.session_servers)
            .field("namespace", &self.namespace)
            .field("cookie", &self.cookie)
            .field("session_header", &self.session_header)
            .field("attrs", &self.attrs)
            .field("on_failure", &self.on_failure)
            .field("auth_token", &self.auth_token.as_ref().map(|_| "<hidden>"))
            .field("timeout", &self.timeout)
            .field("snapshot_keys", &self.snapshot_keys)
            .field("snapshot_cookie", &self.snapshot_cookie)
            .field("snapshot_max_age", &self.snapshot_max_age)
            .field("outage_grace", &self.outage_grace)
            .field("cache", &self.cache)
            .field("tls", &self.tls)
            .finish()
    }
}

/// Limits and timeouts, each answered with its own status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Time a client gets to send the whole request head (408 past it).
    pub header_read_timeout: Duration,
    /// Largest request head in bytes (431 past it).
    pub max_header_bytes: usize,
    /// Largest request body in bytes (413 past it).
    pub max_body_bytes: u64,
    /// Bound on connecting to a backend (then retry or 502).
    pub connect_timeout: Duration,
    /// Bound on a backend's response head (504 past it).
    pub response_timeout: Duration,
    /// Most client connections at once (503 past it).
    pub max_connections: usize,
    /// Most backends one request tries (like nginx `proxy_next_upstream_tries`).
    pub max_tries: u32,
    /// Largest request body kept in memory so that the request can be retried on another
    /// backend; larger bodies are streamed and never replayed.
    pub retry_buffer_bytes: usize,
    /// Longest wait for the next piece of a request body (408, or the backend request ended
    /// if its response started; nginx `client_body_timeout`). Never held against a backend.
    pub body_read_timeout: Duration,
    /// Slowest request body, in bytes per second, averaged over the time the proxy waits on
    /// the client: a body may take `body_read_timeout` plus one second per this many bytes
    /// received (Apache `mod_reqtimeout` `MinRate`); 0: off. Like `body_read_timeout`.
    pub min_upload_rate: u64,
    /// Longest a client may take none of its response before the connection is cut and the
    /// backend request ended (nginx `send_timeout`).
    pub send_timeout: Duration,
    /// Longest an HTTP/1 keep-alive connection waits for its next request, and an HTTP/2
    /// connection stays without an open stream (then GOAWAY), before they are closed (nginx
    /// `keepalive_timeout`, HAProxy `timeout http-keep-alive`).
    pub idle_timeout: Duration,
}

impl Default for Limits {
    /// nginx-like: 10 s for the head, 64 KiB of head, 10 MiB of body, 2 s to connect, 30 s for
    /// the response head, 10 000 connections, 3 tries, 64 KiB of body kept for a retry; 60 s
    /// between two pieces of a body or of a response taken by the client, 75 s idle between
    /// requests; and, since bodies over 64 KiB are streamed to a backend (nginx buffers them
    /// first), Apache's minimum upload rate of 500 bytes/s.
    fn default() -> Self {
        Limits {
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            max_body_bytes: 10 * 1024 * 1024,
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(30),
            max_connections: 10_000,
            max_tries: 3,
            retry_buffer_bytes: 64 * 1024,
            body_read_timeout: Duration::from_secs(60),
            min_upload_rate: 500,
            send_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(75),
        }
    }
}

/// The whole proxy configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    /// Client-facing address.
    pub listen: SocketAddr,
    /// Admin API address (JSON of backends, Prometheus metrics), if any.
    pub admin_listen: Option<SocketAddr>,
    /// Bearer token every admin API call must carry, if any (required when `admin_listen` is
    /// not loopback).
    pub admin_token: Option<AdminToken>,
    /// The backends.
    pub backends: Vec<BackendConfig>,
    /// The balancing algorithm.
    pub balance: BalanceMode,
    /// Peers whose `X-Forwarded-For`, `Forwarded` and `X-Forwarded-Proto: https` are believed
    /// (empty: none, the default).
    pub trusted_proxies: Vec<IpNet>,
    /// Forward request headers whose names contain `_` (`--allow-underscore-headers`); off by
    /// default, like nginx's `underscores_in_headers off`. `x_session_*` spellings are dropped
    /// either way.
    pub allow_underscore_headers: bool,
    /// Per-client limits: requests in flight and request rate per client address (all off by
    /// default).
    pub client_limits: ClientLimits,
    /// Health checking.
    pub health: HealthConfig,
    /// Limits and timeouts.
    pub limits: Limits,
    /// The session-lookup plugin, if on.
    pub lookup: Option<LookupConfig>,
    /// HTTPS on `listen` (`--tls-cert`, `--tls-key`); `None`: plain HTTP.
    pub tls: Option<TlsConfig>,
    /// CA bundle (PEM) the certificates of `https://` backends must chain to (`--backend-ca`);
    /// `None`: the system's roots. Read whenever the backends are (re)built.
    pub backend_ca: Option<PathBuf>,
}

impl ProxyConfig {
    /// The one rule of what a reload cannot change: puts back into `next` (a reloaded
    /// configuration) this running configuration's settings that only a restart applies, the
    /// addresses the listeners are bound to (`listen`, `admin_listen`) and whether `listen`
    /// serves HTTPS (`tls` set or not; new certificate files of an HTTPS listener do reload).
    /// Returns the names of the settings put back, for the warning; empty when `next` applies
    /// whole.
    pub fn keep_restart_settings(&self, next: &mut ProxyConfig) -> Vec<&'static str> {
        let mut kept = Vec::new();
        if next.listen != self.listen {
            next.listen = self.listen;
            kept.push("listen");
        }
        if next.admin_listen != self.admin_listen {
            next.admin_listen = self.admin_listen;
            kept.push("admin_listen");
        }
        if next.tls.is_some() != self.tls.is_some() {
            next.tls = self.tls.clone();
            kept.push("tls");
        }
        kept
    }
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
    /// The file is not valid TOML, or has an unknown key or a bad value; the message names
    /// the line.
    #[error("invalid config file{}: {source}", file_label(path.as_deref()))]
    Parse {
        /// The file, when known.
        path: Option<PathBuf>,
        /// The parser's error (line, column, the line itself, what is wrong).
        #[source]
        source: toml::de::Error,
    },
    /// Settings that are each valid do not fit together (or a required one is missing).
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// " <path>" when the file is known, for error messages.
fn file_label(path: Option<&std::path::Path>) -> String {
    path.map(|p| format!(" {}", p.display()))
        .unwrap_or_default()
}

/// Reads the file named by `--config` (if any) and resolves everything.
pub fn load(cli: Cli) -> Result<ProxyConfig, ConfigError> {
    let Some(path) = cli.config.clone() else {
        return resolve(cli, None);
    };
    let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
        path: path.clone(),
        source,
    })?;
    resolve(cli, Some(&text)).map_err(|error| match error {
        ConfigError::Parse { source, .. } => ConfigError::Parse {
            path: Some(path),
            source,
        },
        other => other,
    })
}

/// Merges flags over the file's text over the defaults, then checks what involves several
/// settings.
pub fn resolve(cli: Cli, file_text: Option<&str>) -> Result<ProxyConfig, ConfigError> {
    let file: FileConfig = match file_text {
        Some(text) => {
            toml::from_str(text).map_err(|source| ConfigError::Parse { path: None, source })?
        }
        None => FileConfig::default(),
    };
    let invalid = |msg: String| ConfigError::Invalid(msg);
    let lookup = lookup::resolve(&cli, file.session_lookup)?;
    let tls = tls::resolve(&cli, file.tls)?;
    let client_limits = client_limits::resolve(&cli, &file.limits)?;
    let backend_ca = cli.backend_ca.clone().or(file.backend_ca);

    let backends = if cli.backends.is_empty() {
        file.backends.into_iter().map(|b| b.0).collect()
    } else {
        cli.backends
    };
    if backends.is_empty() {
        return Err(invalid(
            "no backend: give --backend http://host:port or a [[backend]] table".into(),
        ));
    }
    for (i, backend) in backends.iter().enumerate() {
        if backends[..i].iter().any(|b| b.name == backend.name) {
            return Err(invalid(format!(
                "two backends are named {:?}; give each a distinct name",
                backend.name
            )));
        }
    }

    let listen = cli
        .listen
        .or(file.listen)
        .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("valid default address"));
    let admin_listen = cli.admin_listen.or(file.admin_listen);
    // Port 0 on both is two OS-chosen ports, not one address.
    if admin_listen == Some(listen) && listen.port() != 0 {
        return Err(invalid(format!(
            "admin_listen and listen are the same address ({listen})"
        )));
    }
    let admin_token = admin::resolve(
        (cli.admin_token, cli.admin_token_file),
        (file.admin_token, file.admin_token_file),
        admin_listen,
    )?;

    let mut balance = cli
        .balance
        .or(file.balance.map(|b| b.0))
        .unwrap_or(BalanceMode::RoundRobin);
    let hash_type = cli.hash_type.or(file.hash_type.map(|h| h.0));
    let sticky = StickyConfig {
        cookie: cli
            .sticky_cookie_name
            .or(file.sticky.cookie.map(|c| c.0))
            .map_or_else(|| DEFAULT_STICKY_COOKIE.to_owned(), |c| c.0),
        key: match cli
            .sticky_key
            .map(|key| key.parse::<StickyKey>("--sticky-key (STICKLESS_PROXY_STICKY_KEY)"))
            .transpose()?
            .or(file.sticky.key.map(|k| k.0))
        {
            Some(key) => key.0,
            None if matches!(balance, BalanceMode::StickyCookie(_)) => generated_sticky_key(),
            None => Vec::new(),
        },
    };
    complete_balance(&mut balance, hash_type, sticky)?;

    let defaults = HealthConfig::default();
    let fh = file.health;
    let health = HealthConfig {
        kind: cli
            .health_check
            .or(fh.check.map(|c| c.0))
            .unwrap_or(defaults.kind),
        interval: pick(cli.health_interval, fh.interval, defaults.interval),
        timeout: pick(cli.health_timeout, fh.timeout, defaults.timeout),
        rise: cli
            .health_rise
            .or(fh.rise.map(|n| n.0))
            .unwrap_or(defaults.rise),
        fall: cli
            .health_fall
            .or(fh.fall.map(|n| n.0))
            .unwrap_or(defaults.fall),
        max_fails: cli.max_fails.or(fh.max_fails).unwrap_or(defaults.max_fails),
        fail_timeout: pick(cli.fail_timeout, fh.fail_timeout, defaults.fail_timeout),
    };

    let defaults = Limits::default();
    let fl = file.limits;
    let limits = Limits {
        header_read_timeout: pick(
            cli.header_read_timeout,
            fl.header_read_timeout,
            defaults.header_read_timeout,
        ),
        max_header_bytes: cli
            .max_header_bytes
            .or(fl.max_header_bytes.map(|b| b.0))
            .unwrap_or(defaults.max_header_bytes),
        max_body_bytes: cli
            .max_body_bytes
            .or(fl.max_body_bytes.map(|n| n.0))
            .unwrap_or(defaults.max_body_bytes),
        connect_timeout: pick(
            cli.connect_timeout,
            fl.connect_timeout,
            defaults.connect_timeout,
        ),
        response_timeout: pick(
            cli.response_timeout,
            fl.response_timeout,
            defaults.response_timeout,
        ),
        max_connections: cli
            .max_connections
            .or(fl.max_connections.map(|n| n.0))
            .unwrap_or(defaults.max_connections),
        max_tries: cli
            .max_tries
            .or(fl.max_tries.map(|n| n.0))
            .unwrap_or(defaults.max_tries),
        retry_buffer_bytes: cli
            .retry_buffer_bytes
            .or(fl.retry_buffer_bytes)
            .unwrap_or(defaults.retry_buffer_bytes),
        body_read_timeout: pick(
            cli.body_read_timeout,
            fl.body_read_timeout,
            defaults.body_read_timeout,
        ),
        min_upload_rate: cli
            .min_upload_rate
            .or(fl.min_upload_rate.map(|r| r.0))
            .unwrap_or(defaults.min_upload_rate),
        send_timeout: pick(cli.send_timeout, fl.send_timeout, defaults.send_timeout),
        idle_timeout: pick(cli.idle_timeout, fl.idle_timeout, defaults.idle_timeout),
    };

    Ok(ProxyConfig {
        listen,
        admin_listen,
        admin_token,
        backends,
        balance,
        trusted_proxies: cli
            .trusted_proxies
            .or(file
                .trusted_proxies
                .map(|nets| nets.into_iter().map(|n| n.0).collect()))
            .unwrap_or_default(),
        allow_underscore_headers: cli
            .allow_underscore_headers
            .or(file.allow_underscore_headers)
            .unwrap_or(false),
        client_limits,
        health,
        limits,
        lookup,
        tls,
        backend_ca,
    })
}

/// The flag value, else the file's, else the default.
fn pick<T>(flag: Option<T>, file: Option<Parsed<T>>, default: T) -> T {
    flag.or(file.map(|v| v.0)).unwrap_or(default)
}

/// Completes the balancing mode parsed from `--balance` with the hash type (map when unset)
/// and the sticky-cookie settings. `consistent` is refused for the modes that do not hash.
fn complete_balance(
    mode: &mut BalanceMode,
    hash_type: Option<HashType>,
    sticky: StickyConfig,
) -> Result<(), ConfigError> {
    match mode {
        BalanceMode::Source(hash)
        | BalanceMode::Uri(hash)
        | BalanceMode::UrlParam(_, hash)
        | BalanceMode::Header(_, hash)
        | BalanceMode::CookieHash(_, hash) => *hash = hash_type.unwrap_or(HashType::Map),
        _ if hash_type == Some(HashType::Consistent) => {
            return Err(ConfigError::Invalid(format!(
                "hash_type \"consistent\" applies to source, uri, url-param, header and \
                 cookie-hash, not to {} (ip-hash is always map-based; for consistent \
                 hashing of the client address use balance \"source\")",
                mode.name()
            )));
        }
        BalanceMode::StickyCookie(config) => *config = sticky,
        _ => {}
    }
    Ok(())
}

/// The key used when sticky-cookie mode has none configured: made once per process, so a
/// reload keeps every pin while a restart loses them.
fn generated_sticky_key() -> Vec<u8> {
    static KEY: OnceLock<Vec<u8>> = OnceLock::new();
    KEY.get_or_init(|| {
        let mut key = vec![0u8; MIN_STICKY_KEY_BYTES];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
            .expect("the system random generator works");
        tracing::warn!(
            "no sticky key configured (--sticky-key or [sticky] key): using a random one, so \
             sticky-cookie pins will not survive a restart"
        );
        key
    })
    .clone()
}
