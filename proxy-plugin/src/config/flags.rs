//! The command-line flags, each with an environment-variable twin (`STICKLESS_PROXY_*`).
//! Every one is optional here: unset ones fall back to the file, then to the defaults.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use clap::builder::{BoolishValueParser, RangedU64ValueParser};
use ipnet::IpNet;

use super::client_limits::RateSetting;
use super::values::{
    AttrName, CookieName, LookupUrl, Namespace, SecretArg, SessionHeader, byte_rate, parse_setting,
    positive, secret_arg,
};
use super::{BackendConfig, HealthCheckKind, LookupFailure, MIN_HEADER_BYTES};
use crate::balance::{BalanceMode, HashType};

/// Command-line flags; each has an environment-variable twin. Unset ones fall back to the file,
/// then to the defaults.
#[derive(Debug, Clone, Default, Parser)]
#[command(
    name = "session-proxy",
    version,
    about = "Stickless reverse proxy: every routing mode, health checks, session lookup"
)]
pub struct Cli {
    /// TOML file with the same settings (snake_case keys); unknown keys are an error. Re-read
    /// on SIGHUP.
    #[arg(long, value_name = "FILE", env = "STICKLESS_PROXY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address clients connect to [default: 127.0.0.1:8080].
    #[arg(long, value_name = "ADDR", env = "STICKLESS_PROXY_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Certificate chain (PEM, the proxy's certificate first): with --tls-key, --listen
    /// serves HTTPS only (ALPN h2 and http/1.1). Re-read on SIGHUP; a bad file is refused and
    /// the running certificate kept.
    #[arg(long, value_name = "PATH", env = "STICKLESS_PROXY_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert; both or neither. Re-read on SIGHUP.
    #[arg(long, value_name = "PATH", env = "STICKLESS_PROXY_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Admin API address (`GET /backends`, `GET /metrics`, `PUT /backends/NAME/weight`); off
    /// when unset.
    #[arg(long, value_name = "ADDR", env = "STICKLESS_PROXY_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// Bearer token every admin API call must carry (`Authorization: Bearer TOKEN`; 401
    /// without it); required when --admin-listen is not a loopback address. Admin writes also
    /// need `Content-Type: application/json` and no `Origin` header.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "STICKLESS_PROXY_ADMIN_TOKEN",
        hide_env_values = true,
        value_parser = secret_arg,
    )]
    pub admin_token: Option<SecretArg>,
    /// File holding the admin token (its first line that is not empty or a `#` comment),
    /// instead of --admin-token. Re-read on SIGHUP.
    #[arg(long, value_name = "PATH", env = "STICKLESS_PROXY_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// A backend, `http://host:port[,weight=N][,name=NAME]` (weight 1..=1000, default 1; name
    /// defaults to host:port); repeat for more. `https://host[:port]` is always dialled over
    /// TLS, its certificate verified for host (see --backend-ca). Replaces the file's
    /// backends. The environment variable takes several, separated by spaces.
    #[arg(
        long = "backend",
        value_name = "URL[,weight=N][,name=NAME]",
        env = "STICKLESS_PROXY_BACKENDS",
        value_delimiter = ' ',
        value_parser = parse_setting::<BackendConfig>
    )]
    pub backends: Vec<BackendConfig>,
    /// CA bundle (PEM) the certificates of `https://` backends must chain to [default: the
    /// system's roots]. Re-read on SIGHUP.
    #[arg(long, value_name = "PATH", env = "STICKLESS_PROXY_BACKEND_CA")]
    pub backend_ca: Option<PathBuf>,
    /// Balancing mode: round-robin, static-rr, least-conn, random, ip-hash, source, uri,
    /// url-param:NAME, header:NAME, cookie-hash:NAME, rdp-cookie:NAME, sticky-cookie
    /// [default: round-robin].
    #[arg(
        long,
        value_name = "MODE",
        env = "STICKLESS_PROXY_BALANCE",
        value_parser = parse_setting::<BalanceMode>,
    )]
    pub balance: Option<BalanceMode>,
    /// How hashing modes (source, uri, url-param, header, cookie-hash) map keys to backends:
    /// map or consistent [default: map].
    #[arg(
        long,
        value_name = "map|consistent",
        env = "STICKLESS_PROXY_HASH_TYPE",
        value_parser = parse_setting::<HashType>,
    )]
    pub hash_type: Option<HashType>,
    /// Cookie of the sticky-cookie mode [default: stickless_backend].
    #[arg(
        long,
        value_name = "NAME",
        env = "STICKLESS_PROXY_STICKY_COOKIE_NAME",
        value_parser = parse_setting::<CookieName>,
    )]
    pub sticky_cookie_name: Option<CookieName>,
    /// Key signing sticky cookies, hex or base64, at least 32 bytes. Without it a random key
    /// is made at start, so pins do not survive a restart.
    #[arg(
        long,
        value_name = "KEY",
        env = "STICKLESS_PROXY_STICKY_KEY",
        hide_env_values = true,
        value_parser = secret_arg,
    )]
    pub sticky_key: Option<SecretArg>,
    /// Peers (CIDRs or addresses, comma-separated) whose X-Forwarded-For, Forwarded and
    /// X-Forwarded-Proto: https are believed; from others X-Forwarded-For, Forwarded and
    /// X-Real-IP are replaced by the peer's address [default: none].
    #[arg(
        long,
        value_name = "CIDR,...",
        env = "STICKLESS_PROXY_TRUSTED_PROXIES",
        value_delimiter = ',',
        value_parser = parse_setting::<IpNet>,
    )]
    pub trusted_proxies: Option<Vec<IpNet>>,
    /// Forward request headers whose names contain `_` (dropped by default, like nginx's
    /// `underscores_in_headers off`); `x_session_*` spellings are dropped anyway. Takes an
    /// optional `=true|false` [default: false].
    #[arg(
        long,
        value_name = "BOOL",
        env = "STICKLESS_PROXY_ALLOW_UNDERSCORE_HEADERS",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = BoolishValueParser::new(),
    )]
    pub allow_underscore_headers: Option<bool>,
    /// Active health check: off, tcp or http:/PATH (GET expecting 2xx) [default: tcp].
    #[arg(
        long,
        value_name = "off|tcp|http:/PATH",
        env = "STICKLESS_PROXY_HEALTH_CHECK",
        value_parser = parse_setting::<HealthCheckKind>,
    )]
    pub health_check: Option<HealthCheckKind>,
    /// Time between health checks of one backend [default: 2s].
    #[arg(
        long,
        value_name = "DURATION",
        env = "STICKLESS_PROXY_HEALTH_INTERVAL",
        value_parser = parse_setting::<Duration>,
    )]
    pub health_interval: Option<Duration>,
    /// Bound on one health check [default: 1s].
    #[arg(
        long,
        value_name = "DURATION",
        env = "STICKLESS_PROXY_HEALTH_TIMEOUT",
        value_parser = parse_setting::<Duration>,
    )]
    pub health_timeout: Option<Duration>,
    /// Consecutive passed checks that bring a backend up [default: 2].
    #[arg(
        long,
        value_name = "N",
        env = "STICKLESS_PROXY_HEALTH_RISE",
        value_parser = positive::<u32>(),
    )]
    pub health_rise: Option<u32>,
    /// Consecutive failed checks that take a backend down [default: 3].
    #[arg(
        long,
        value_name = "N",
        env = "STICKLESS_PROXY_HEALTH_FALL",
        value_parser = positive::<u32>(),
    )]
    pub health_fall: Option<u32>,
    /// Failed requests within --fail-timeout that take a backend down; 0: off [default: 1].
    #[arg(long, value_name = "N", env = "STICKLESS_PROXY_MAX_FAILS")]
    pub max_fails: Option<u32>,
    /// Window of --max-fails, and how long a backend it took down rests [default: 10s].
    #[arg(
        long,
        value_name = "DURATION",
        env = "STICKLESS_PROXY_FAIL_TIMEOUT",
        value_parser = parse_setting::<Duration>,
    )]
    pub fail_timeout: Option<Duration>,
    /// Time a client gets to send a request head (408 past it) [default: 10s].
    #[arg(
        long,
        value_name = "DURATION",
        env = "STICKLESS_PROXY_HEADER_READ_TIMEOUT",
        value_parser = parse_setting::<Duration>,
    )]
    pub header_read_timeout: Option<Duration>,
    /// Largest request head in bytes, at least 8192 (431 past it) [default: 65536].
    #[arg(
        long,
        value_name = "BYTES",
        env = "STICKLESS_PROXY_MAX_HEADER_BYTES",
        value_parser = RangedU64ValueParser::<usize>::new().range(MIN_HEADER_BYTES..),
    )]
    pub max_header_bytes: Option<usize>,
    /// Largest request body in bytes (413 past it) [default: 10485760].
    #[arg(
        long,
        value_name = "BYTES",
        env = "STICKLESS_PROXY_MAX_BODY_BYTES",
        value_parser = positive::<u64>(),
    )]
    pub max_body_bytes: Option<u64>,
    /// Bound on connecting to a backend [default: 2s].
    #[arg(
        long,
        value_name = "DURATION",
        env = "STICKLESS_PROXY_CONNECT_TIMEOUT",
        value_parser = parse_setting::<Duration>,
    )]
    pub connect_timeout: Option<Duration>,
    /// Bound on a backend's response head (504 past it) [default: 30s].
    #[arg(
        long,
        value_name = "DURATION",
        env = "STICKLESS_PROXY_RESPONSE_TIMEOUT",
        value_parser = parse_setting::<Duration>,
    )]
    pub response_timeout: Option<Duration>,
    /// Most client connections at once (503 past it) [default: 10000].
    #[arg(
        long,
        value_name = "N",
        env = "STICKLESS_PROXY_MAX_CONNECTIONS",
        value_parser = positive::<usize>(),
    )]
    pub max_connections: Option<usize>,
    /// Most backends one request tries [default: 3].
    #[arg(
        long,
        value_name = "N",
        env = "STICKLESS_PROXY_MAX_TRIES",
        value_parser = positive::<u32>(),
    )]
    pub max_tries: Option<u32>,
    /// Largest request body kept so the request can be retried elsewhere [default: 65536].
    #[arg(long, value_name = "BYTES", env = "STICKLESS_PROXY_RETRY_BUFFER_BYTES")]
    pub retry_buffer_bytes: Option<usize>,
    /// Longest wait for the next piece of a request body: 408 (or the backend request ended
    /// if its response started), never held against the backend [default: 60s].
    #[arg(
        long,
        value_name = "DURATION",
        env = "STICKLESS_PROXY_BODY_READ_TIMEOUT",
        value_parser = parse_setting::<Duration>,
    )]
    pub body_read_timeout: Option<Duration>,
    /// Slowest request body in bytes per second (`500`, `1k`), averaged over the time spent
    /// waiting on the client: a body may take --body-read-timeout plus one second per RATE
    /// bytes received, then gets 408 like a stalled one; 0: off [default: 500].
    #[arg(
        long,
        value_name = "RATE",
        env = "STICKLESS_PROXY_MIN_UPLOAD_RATE",
        value_parser = byte_rate,
    )]
    pub min_upload_rate: Option<u64>,
    /// Longest a client may take none of its response before the connection is cut and the
    /// backend request ended [default: 60s].
    #[arg(
        long,
        value_name = "DURATION",
        env = "STICKLESS_PROXY_SEND_TIMEOUT",
        value_parser = parse_setting::<Duration>,
    )]
    pub send_timeout: Option<Duration>,
    /// Longest an HTTP/1 keep-alive connection waits for its next request, and an HTTP/2
    /// connection stays without an open stream (then GOAWAY), before being closed
    /// [default: 75s].
    #[arg(
        long,
        value_name = "DURATION",
        env = "STICKLESS_PROXY_IDLE_TIMEOUT",
        value_parser = parse_setting::<Duration>,
    )]
    pub idle_timeout: Option<Duration>,
    /// Most requests in flight at once from one client address (the trusted chain's; IPv6 by
    /// /64), each counted from its head to the end of its response body; 429 with
    /// Retry-After: 1 past it; 0: off [default: 0].
    #[arg(long, value_name = "N", env = "STICKLESS_PROXY_MAX_CONNS_PER_IP")]
    pub max_conns_per_ip: Option<u32>,
    /// Requests per second (`10`, `10/s`) or minute (`30/m`) from one client address, as a
    /// token bucket; past it and --burst, 429 with Retry-After; 0: off [default: off].
    #[arg(
        long,
        value_name = "R[/s|/m]",
        env = "STICKLESS_PROXY_RATE_PER_IP",
        value_parser = parse_setting::<RateSetting>,
    )]
    pub rate_per_ip: Option<RateSetting>,
    /// Requests over --rate-per-ip a client may send at once (nginx `burst` with `nodelay`:
    /// B + 1 at once) [default: 0].
    #[arg(long, value_name = "B", env = "STICKLESS_PROXY_BURST")]
    pub burst: Option<u32>,
    /// Session server URL; turns the session-lookup plugin on. Several servers over one store:
    /// repeat the flag or comma-separate (`http://a:50051,http://b:50051`); a host name is
    /// every address it resolves to, re-resolved every 30 s. `https://` is always TLS (see
    /// `--session-ca`), `http://` cleartext.
    #[arg(
        long,
        value_name = "URL[,URL...]",
        env = "STICKLESS_PROXY_SESSION_LOOKUP",
        value_parser = parse_setting::<LookupUrl>,
    )]
    pub session_lookup: Vec<LookupUrl>,
    /// Session namespace [default: default].
    #[arg(
        long,
        value_name = "NAMESPACE",
        env = "STICKLESS_PROXY_SESSION_NAMESPACE",
        value_parser = parse_setting::<Namespace>,
    )]
    pub session_namespace: Option<Namespace>,
    /// Cookie holding the session id [default: sid].
    #[arg(
        long,
        value_name = "NAME",
        env = "STICKLESS_PROXY_SESSION_COOKIE",
        value_parser = parse_setting::<CookieName>,
    )]
    pub session_cookie: Option<CookieName>,
    /// Request header carrying the session id too, for clients without cookies (as
    /// `session-client`'s header id source sends it, e.g. `x-session-token`): present and
    /// non-empty, it takes precedence over the cookie; it is forwarded to the backends, and a
    /// response carrying it empty ends the session like one clearing the cookie [default: none,
    /// cookie only].
    #[arg(
        long,
        value_name = "NAME",
        env = "STICKLESS_PROXY_SESSION_HEADER",
        value_parser = parse_setting::<SessionHeader>,
    )]
    pub session_header: Option<SessionHeader>,
    /// Session attribute forwarded as `x-session-attr-NAME`; repeat for more. Replaces the
    /// file's list [default: cart, the one `demo-app --sessions proxy` reads].
    #[arg(
        long = "session-attr",
        value_name = "NAME",
        env = "STICKLESS_PROXY_SESSION_ATTRS",
        value_delimiter = ',',
        value_parser = parse_setting::<AttrName>,
    )]
    pub session_attrs: Vec<AttrName>,
    /// When the session server is unreachable: open (forward without session) or closed (503)
    /// [default: open].
    #[arg(
        long,
        value_name = "open|closed",
        env = "STICKLESS_PROXY_SESSION_FAIL",
        value_parser = parse_setting::<LookupFailure>,
    )]
    pub session_fail: Option<LookupFailure>,
    /// Bound on one session lookup [default: 500ms].
    #[arg(
        long,
        value_name = "DURATION",
        env = "STICKLESS_PROXY_SESSION_TIMEOUT",
        value_parser = parse_setting::<Duration>,
    )]
    pub session_timeout: Option<Duration>,
    /// Bearer token for the session server.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "STICKLESS_AUTH_TOKEN",
        hide_env_values = true,
        value_parser = secret_arg,
    )]
    pub session_auth_token: Option<SecretArg>,
    /// CA bundle (PEM) the session server's certificate must chain to, for an `https://`
    /// `--session-lookup` [default: the system's roots]. Re-read on SIGHUP.
    #[arg(long, value_name = "PATH", env = "STICKLESS_PROXY_SESSION_CA")]
    pub session_ca: Option<PathBuf>,
    /// Client certificate (PEM) presented to a session server that requires mTLS; needs
    /// `--session-client-key`. Re-read on SIGHUP.
    #[arg(long, value_name = "PATH", env = "STICKLESS_PROXY_SESSION_CLIENT_CERT")]
    pub session_client_cert: Option<PathBuf>,
    /// Private key (PEM) of `--session-client-cert`. Re-read on SIGHUP.
    #[arg(long, value_name = "PATH", env = "STICKLESS_PROXY_SESSION_CLIENT_KEY")]
    pub session_client_key: Option<PathBuf>,
    /// Key of the signed session snapshot cookie, hex or base64, at least 32 bytes: the same
    /// material as the backends' `demo-app --cookie-key`. Repeat for rotation, signing key
    /// first. Turns on the outage fallback: while the session server is unreachable, a valid
    /// snapshot stands in for the session. Replaces the file's list.
    #[arg(
        long = "session-snapshot-key",
        value_name = "KEY",
        env = "STICKLESS_PROXY_SESSION_SNAPSHOT_KEYS",
        value_delimiter = ',',
        hide_env_values = true,
        value_parser = secret_arg,
    )]
    pub session_snapshot_keys: Vec<SecretArg>,
    /// Cookie holding the signed session snapshot [default: sid_snap].
    #[arg(
        long,
        value_name = "NAME",
        env = "STICKLESS_PROXY_SESSION_SNAPSHOT_COOKIE",
        value_parser = parse_setting::<CookieName>,
    )]
    pub session_snapshot_cookie: Option<CookieName>,
    /// How long past the session server's last confirmation a snapshot may stand in (or be
    /// pushed back with Restore); older ones are refused, whoever wrote them. Bounds how long
    /// cookies copied before a logout can bring the session back into a store that lost its
    /// data. Give the backends the same value [default: 1h].
    #[arg(
        long,
        value_name = "DURATION",
        env = "STICKLESS_PROXY_SNAPSHOT_MAX_AGE",
        value_parser = parse_setting::<Duration>,
    )]
    pub snapshot_max_age: Option<Duration>,
    /// A lookup that times out while the session server answered less than this long ago is
    /// an error (503 with Retry-After under --session-fail closed), not an outage: the snapshot
    /// stands in only for an unreachable server, or one silent for longer [default: 5s].
    #[arg(
        long,
        value_name = "DURATION",
        env = "STICKLESS_PROXY_SESSION_OUTAGE_GRACE",
        value_parser = parse_setting::<Duration>,
    )]
    pub session_outage_grace: Option<Duration>,
    /// Sessions the lookup cache holds at most (0: no cache). Entries are invalidated by a
    /// Watch stream of the namespace (the cache is emptied and bypassed while it is down) and
    /// at once by a response that ends or replaces the session, or answers an unsafe method;
    /// each is served within one touch window (1 s or 1% of the ttl) of the store's last
    /// touch, so expiry still slides. Needs a store whose Watch sees every server's writes
    /// (not mysql behind several servers) [default: 0].
    #[arg(long, value_name = "N", env = "STICKLESS_PROXY_SESSION_CACHE")]
    pub session_cache: Option<usize>,
}
