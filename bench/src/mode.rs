//! The routing modes under comparison and the session stores behind them: what each mode
//! means in flags of `session-proxy` and `demo-app`, and what the session server is run on.

use std::fmt;
use std::str::FromStr;

use crate::external::ExternalKind;

/// Signing key of the demo's snapshot cookie and of the proxy's snapshot fallback: 32 bytes,
/// hex. A fixed key is fine here: the cluster lives on loopback for a few seconds.
pub(crate) const COOKIE_KEY: &str =
    "6b2f1c0e9a8d7b6c5a4f3e2d1c0b9a8f7e6d5c4b3a29181716151413121110ff";

/// A routing mode: one balancer plus one place for sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Round-robin, sessions inside each backend: the broken baseline.
    RrLocal,
    /// nginx-style `ip_hash` on the client address, sessions inside each backend.
    IpHash,
    /// A cookie pinning each user to a backend, sessions inside each backend.
    StickyCookie,
    /// Round-robin, sessions in the shared Stickless store.
    RrStore,
    /// Round-robin, shared store, plus the signed-cookie fallback for store outages.
    RrStoreFallback,
    /// Round-robin, the session resolved by the proxy's lookup plugin, stateless backends.
    ProxyLookup,
    /// A real nginx or HAProxy in front of local-session backends.
    External(ExternalKind),
}

/// Where a backend keeps its sessions (`demo-app --sessions`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendSessions {
    /// In the backend process.
    Local,
    /// In the session server; `fallback` adds the signed snapshot cookie.
    Store {
        /// `--fallback on-outage` with a cookie key.
        fallback: bool,
    },
    /// Injected by the proxy's lookup plugin; writes go to the session server.
    Proxy,
}

impl Mode {
    /// The six modes built from the project's own binaries, in table order.
    pub const OWN: [Mode; 6] = [
        Mode::RrLocal,
        Mode::IpHash,
        Mode::StickyCookie,
        Mode::RrStore,
        Mode::RrStoreFallback,
        Mode::ProxyLookup,
    ];

    /// The modes run against a real nginx.
    pub const NGINX: [Mode; 2] = [
        Mode::External(ExternalKind::NginxIpHash),
        Mode::External(ExternalKind::NginxCookieHash),
    ];

    /// The modes run against a real HAProxy.
    pub const HAPROXY: [Mode; 2] = [
        Mode::External(ExternalKind::HaproxySource),
        Mode::External(ExternalKind::HaproxyCookieInsert),
    ];

    /// The mode's name in flags, tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Mode::RrLocal => "rr-local",
            Mode::IpHash => "ip-hash",
            Mode::StickyCookie => "sticky-cookie",
            Mode::RrStore => "rr-store",
            Mode::RrStoreFallback => "rr-store-fallback",
            Mode::ProxyLookup => "proxy-lookup",
            Mode::External(ExternalKind::NginxIpHash) => "nginx-ip-hash",
            Mode::External(ExternalKind::NginxCookieHash) => "nginx-cookie-hash",
            Mode::External(ExternalKind::HaproxySource) => "haproxy-source",
            Mode::External(ExternalKind::HaproxyCookieInsert) => "haproxy-sticky",
        }
    }

    /// Where the backends keep sessions in this mode.
    pub fn sessions(self) -> BackendSessions {
        match self {
            Mode::RrStore => BackendSessions::Store { fallback: false },
            Mode::RrStoreFallback => BackendSessions::Store { fallback: true },
            Mode::ProxyLookup => BackendSessions::Proxy,
            Mode::RrLocal | Mode::IpHash | Mode::StickyCookie | Mode::External(_) => {
                BackendSessions::Local
            }
        }
    }

    /// Whether sessions live in the shared store (so no backend event may lose one).
    pub fn shares_sessions(self) -> bool {
        self.sessions() != BackendSessions::Local
    }

    /// `session-proxy --balance` of this mode (`None` for an external proxy).
    pub(crate) fn balance(self) -> Option<&'static str> {
        match self {
            Mode::IpHash => Some("ip-hash"),
            Mode::StickyCookie => Some("sticky-cookie"),
            Mode::RrLocal | Mode::RrStore | Mode::RrStoreFallback | Mode::ProxyLookup => {
                Some("round-robin")
            }
            Mode::External(_) => None,
        }
    }

    /// `demo-app` flags of this mode, given the session servers' URLs (comma-separated).
    pub(crate) fn demo_args(self, session_servers: &str) -> Vec<String> {
        let mut args: Vec<String> = Vec::new();
        let mut push = |list: &[&str]| args.extend(list.iter().map(|s| (*s).to_owned()));
        match self.sessions() {
            BackendSessions::Local => push(&["--sessions", "local"]),
            BackendSessions::Store { fallback } => {
                push(&["--sessions", "store", "--session-server", session_servers]);
                if fallback {
                    push(&["--fallback", "on-outage", "--cookie-key", COOKIE_KEY]);
                }
            }
            BackendSessions::Proxy => {
                // The key lets the app refresh the snapshot cookie after its own writes, so the
                // proxy's outage fallback never lags an acknowledged change.
                push(&["--sessions", "proxy", "--session-server", session_servers]);
                push(&["--cookie-key", COOKIE_KEY]);
            }
        }
        args
    }

    /// `session-proxy` flags of this mode besides listeners and backends, given the session
    /// servers' URLs (comma-separated). `snapshot_key`: the
    /// proxy binary has `--session-snapshot-key` (the lookup plugin's store-outage fallback).
    pub(crate) fn proxy_args(self, session_servers: &str, snapshot_key: bool) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(balance) = self.balance() {
            args.extend(["--balance".to_owned(), balance.to_owned()]);
        }
        if self == Mode::ProxyLookup {
            for arg in [
                "--session-lookup",
                session_servers,
                "--session-attr",
                "cart",
            ] {
                args.push(arg.to_owned());
            }
            if snapshot_key {
                args.extend(["--session-snapshot-key".to_owned(), COOKIE_KEY.to_owned()]);
            }
        }
        args
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Mode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Mode::OWN
            .iter()
            .chain(&Mode::NGINX)
            .chain(&Mode::HAPROXY)
            .copied()
            .find(|mode| mode.name() == text.trim())
            .ok_or_else(|| {
                format!(
                    "unknown mode {text:?}; expected rr-local, ip-hash, sticky-cookie, rr-store, \
                     rr-store-fallback, proxy-lookup, nginx-ip-hash, nginx-cookie-hash, \
                     haproxy-source or haproxy-sticky"
                )
            })
    }
}

/// The store the session server runs on (`session-server --store`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreChoice {
    /// The embedded in-memory store (lost when the server restarts).
    Memory,
    /// A standalone Redis at this URL.
    Redis(String),
    /// A Redis Cluster, comma-separated seed URLs.
    RedisCluster(String),
    /// MySQL/MariaDB at this URL.
    Mysql(String),
    /// A Redis primary with replicas, found through a Sentinel (`--store redis-sentinel`).
    RedisSentinel {
        /// The Sentinel's URL.
        url: String,
        /// The name the Sentinel knows the primary by.
        master: String,
    },
}

impl StoreChoice {
    /// Its `--store` name.
    pub fn name(&self) -> &'static str {
        match self {
            StoreChoice::Memory => "memory",
            StoreChoice::Redis(_) => "redis",
            StoreChoice::RedisCluster(_) => "redis-cluster",
            StoreChoice::Mysql(_) => "mysql",
            StoreChoice::RedisSentinel { .. } => "redis-sentinel",
        }
    }

    /// `session-server` flags for this store. `tag` keeps one harness run's data apart from
    /// other users of the same Redis (key prefix) or database (table).
    pub(crate) fn server_args(&self, tag: &str) -> Vec<String> {
        let mut args = vec!["--store".to_owned(), self.name().to_owned()];
        let prefix = [
            "--redis-prefix".to_owned(),
            format!("stickless-bench-{tag}"),
        ];
        match self {
            StoreChoice::Memory => {}
            StoreChoice::Redis(url) | StoreChoice::RedisCluster(url) => {
                args.extend(["--redis-url".to_owned(), url.clone()]);
                args.extend(prefix);
            }
            StoreChoice::RedisSentinel { url, master } => {
                args.extend(["--redis-url".to_owned(), url.clone()]);
                args.extend(["--redis-sentinel-master".to_owned(), master.clone()]);
                args.extend(prefix);
            }
            StoreChoice::Mysql(url) => {
                args.extend(["--mysql-url".to_owned(), url.clone()]);
                args.extend(["--mysql-table".to_owned(), "stickless_bench".to_owned()]);
            }
        }
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mode_parses_from_its_name() {
        for mode in Mode::OWN.iter().chain(&Mode::NGINX).chain(&Mode::HAPROXY) {
            assert_eq!(mode.name().parse::<Mode>(), Ok(*mode));
        }
        assert!("round-robin".parse::<Mode>().is_err());
    }

    #[test]
    fn only_shared_store_modes_share_sessions() {
        let shared: Vec<Mode> = Mode::OWN
            .into_iter()
            .filter(|m| m.shares_sessions())
            .collect();
        assert_eq!(
            shared,
            [Mode::RrStore, Mode::RrStoreFallback, Mode::ProxyLookup]
        );
    }
}
