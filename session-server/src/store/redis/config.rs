//! The settings of the Redis store.

use super::codec::RecordFormat;
use crate::config::{ConfigError, Settings, StoreKind};
use crate::store::cap::SessionCap;
use crate::store::redact_url as redacted;
use ::redis::{Client, IntoConnectionInfo, RedisResult, TlsCertificates};
use std::time::Duration;

/// Settings of the Redis store.
#[derive(Clone)]
pub struct RedisConfig {
    /// Where Redis is: `redis://host:port[/db]`; with `cluster`, a comma-separated list of
    /// seed nodes (`redis://h1:p1,redis://h2:p2` or `redis://h1:p1,h2:p2`); with
    /// `sentinel_master`, the sentinels, listed the same way (`redis://s1:26379,s2:26379[/db]`:
    /// the first entry's credentials, database and TLS also reach the primary).
    pub url: String,
    /// Talk to a Redis Cluster (slot routing, MOVED/ASK redirects, failover) instead of one
    /// server.
    pub cluster: bool,
    /// Find the one server through Redis Sentinel: the name the sentinels of `url` monitor it
    /// under. Every (re)connect asks them for the current primary (see `sentinel`), so the store
    /// follows a failover. Not with `cluster`.
    pub sentinel_master: Option<String>,
    /// First part of every key and of the events channel, so several deployments (or tests)
    /// can share one Redis.
    pub key_prefix: String,
    /// Multiplexed connections that all calls share, round robin; each carries many concurrent
    /// calls, pipelined, so a few go a long way. Standalone only: a cluster store keeps one
    /// multiplexed connection per node.
    pub pool_size: usize,
    /// Bound on every store call, connecting and commands included.
    pub timeout: Duration,
    /// Limit on the total attribute size of a session (see [`crate::store::attrs_size`]).
    pub max_session_bytes: usize,
    /// PEM CA certificates that alone are trusted to have signed Redis's certificate, for a
    /// `rediss://` URL; `None`: the system's root certificates. A `rediss://` URL is always
    /// TLS, a `redis://` one never is, and a CA with a `redis://` URL is an error.
    pub tls_ca: Option<Vec<u8>>,
    /// The per-user session cap (see `cap`: kept by the write's own script on one server,
    /// under a per-user lease on a cluster).
    pub session_cap: SessionCap,
    /// The record format writes use (`--redis-record-format`); both formats are always read,
    /// and a record moves to this one on its next write (see `common.lua`).
    pub record_format: RecordFormat,
    /// Sessions the near cache holds (`--cache-capacity`; see `near_cache`); 0: no cache.
    /// Not with `cluster`.
    pub cache_capacity: usize,
}

impl RedisConfig {
    /// Settings with the defaults: prefix `stickless`, 32 connections, 2 s timeout.
    pub fn new(url: impl Into<String>, max_session_bytes: usize) -> Self {
        RedisConfig {
            url: url.into(),
            cluster: false,
            sentinel_master: None,
            key_prefix: "stickless".to_string(),
            pool_size: 32,
            timeout: Duration::from_secs(2),
            max_session_bytes,
            tls_ca: None,
            session_cap: SessionCap::UNLIMITED,
            record_format: RecordFormat::default(),
            cache_capacity: 0,
        }
    }

    /// The settings of the Redis store that `settings` describe: URL (seeds when
    /// `settings.store` is `redis-cluster`, which sets [`RedisConfig::cluster`]; sentinels when
    /// it is `redis-sentinel`, which sets [`RedisConfig::sentinel_master`]), key prefix,
    /// pool size, store timeout, session size limit, session cap and the `redis-ca` file's
    /// certificates.
    /// The one place they are read, for the server and for every test harness (which then
    /// changes what it needs, such as the key prefix). An unreadable CA file is an error.
    pub fn from_settings(settings: &Settings) -> Result<RedisConfig, ConfigError> {
        let tls_ca = match &settings.redis_ca {
            Some(path) => Some(std::fs::read(path).map_err(|e| {
                ConfigError::Invalid(format!("cannot read redis-ca {}: {e}", path.display()))
            })?),
            None => None,
        };
        Ok(RedisConfig {
            url: settings.redis_url.clone(),
            cluster: settings.store == StoreKind::RedisCluster,
            sentinel_master: match settings.store {
                StoreKind::RedisSentinel => settings.redis_sentinel_master.clone(),
                _ => None,
            },
            key_prefix: settings.redis_prefix.clone(),
            pool_size: settings.redis_pool_size,
            timeout: settings.store_timeout,
            max_session_bytes: settings.max_session_bytes,
            tls_ca,
            session_cap: SessionCap::from_settings(settings),
            cache_capacity: settings.cache_capacity,
            record_format: match settings.redis_record_format {
                1 => RecordFormat::Hash,
                2 => RecordFormat::Packed,
                other => {
                    return Err(ConfigError::Invalid(format!(
                        "redis-record-format {other}: expected 1 or 2"
                    )));
                }
            },
        })
    }

    /// A client of the server at `info` (a URL or a connection's settings): over TLS when the
    /// URL is `rediss://`, trusting [`RedisConfig::tls_ca`] when set. Errors are malformed
    /// URLs, an unusable CA, and a CA with a URL that is not `rediss://`.
    pub(crate) fn client(&self, info: impl IntoConnectionInfo) -> RedisResult<Client> {
        match &self.tls_ca {
            Some(pem) => Client::build_with_tls(info, self.tls_certificates(pem)),
            None => Client::open(info),
        }
    }

    /// The CA of [`RedisConfig::tls_ca`] as the Redis client takes it.
    pub(crate) fn tls_certificates(&self, pem: &[u8]) -> TlsCertificates {
        TlsCertificates {
            client_tls: None,
            root_cert: Some(pem.to_vec()),
        }
    }
}

impl std::fmt::Debug for RedisConfig {
    /// Like a derived Debug, with any password in the URL hidden.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redacted(&self.url))
            .field("cluster", &self.cluster)
            .field("sentinel_master", &self.sentinel_master)
            .field("key_prefix", &self.key_prefix)
            .field("pool_size", &self.pool_size)
            .field("timeout", &self.timeout)
            .field("max_session_bytes", &self.max_session_bytes)
            .field("tls_ca", &self.tls_ca.as_ref().map(|_| "set"))
            .field("session_cap", &self.session_cap)
            .field("cache_capacity", &self.cache_capacity)
            .finish()
    }
}

/// The seed node URLs of a cluster `url`: the comma-separated entries, each completed to a URL.
/// An entry without a scheme (`h2:p2`) takes the scheme and credentials of the first entry
/// (`redis://` if the first has none either), so `redis://:pw@h1:p1,h2:p2` means two seeds with
/// the same password. Empty entries are skipped; whether an entry parses is checked when the
/// cluster client is built.
pub(crate) fn seed_urls(url: &str) -> Vec<String> {
    let mut entries = url.split(',').map(str::trim).filter(|e| !e.is_empty());
    let Some(first) = entries.next() else {
        return Vec::new();
    };
    let first = if first.contains("://") {
        first.to_string()
    } else {
        format!("redis://{first}")
    };
    let base = match first.split_once("://") {
        Some((scheme, rest)) => {
            let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
            let userinfo = authority.rfind('@').map_or("", |at| &authority[..=at]);
            format!("{scheme}://{userinfo}")
        }
        None => "redis://".to_string(),
    };
    let rest = entries.map(|entry| {
        if entry.contains("://") {
            entry.to_string()
        } else {
            format!("{base}{entry}")
        }
    });
    std::iter::once(first).chain(rest).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_hides_the_password() {
        let config = RedisConfig::new("redis://app:s3cret@db.internal:6380/2", 10);
        let shown = format!("{config:?}");
        assert!(shown.contains("redis://***@db.internal:6380/2"), "{shown}");
        assert!(!shown.contains("s3cret"));
        assert_eq!(redacted("redis://127.0.0.1/0"), "redis://127.0.0.1/0");
        assert_eq!(
            redacted("redis://:a@h1:1,redis://:b@h2:2,h3:3,u:c@h4:4"),
            "redis://***@h1:1,redis://***@h2:2,h3:3,***@h4:4"
        );
    }

    #[test]
    fn cluster_seeds_are_split_and_completed() {
        assert_eq!(
            seed_urls("redis://h1:1,redis://h2:2"),
            vec!["redis://h1:1", "redis://h2:2"]
        );
        assert_eq!(
            seed_urls("rediss://u:pw@h1:1/0, h2:2,,"),
            vec!["rediss://u:pw@h1:1/0", "rediss://u:pw@h2:2"]
        );
        assert_eq!(seed_urls("h1:1,h2:2"), vec!["redis://h1:1", "redis://h2:2"]);
        assert!(seed_urls(" , ").is_empty());
    }
}
