//! The TOML file's shape: the same settings as the flags, grouped in tables, every key
//! optional and every unknown key an error (`deny_unknown_fields` on every table).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer};

use super::admin::AdminToken;
use super::client_limits::FileRate;
use super::values::{
    AtLeastOne, AttrName, ByteRate, CookieName, HeaderBytes, LookupUrl, Namespace, Parsed,
    SessionHeader, SnapshotKey, StickyKey, Token, backend, parse_setting,
};
use super::{BackendConfig, HealthCheckKind, LookupFailure};
use crate::balance::{BalanceMode, HashType};

/// The TOML file: the same settings as the flags, grouped in tables, every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileConfig {
    pub(super) listen: Option<SocketAddr>,
    pub(super) admin_listen: Option<SocketAddr>,
    pub(super) admin_token: Option<Parsed<AdminToken>>,
    /// The admin token's file (a path, relative to the working directory).
    pub(super) admin_token_file: Option<PathBuf>,
    pub(super) balance: Option<Parsed<BalanceMode>>,
    pub(super) hash_type: Option<Parsed<HashType>>,
    pub(super) trusted_proxies: Option<Vec<Parsed<IpNet>>>,
    /// `--allow-underscore-headers`.
    pub(super) allow_underscore_headers: Option<bool>,
    #[serde(default, rename = "backend")]
    pub(super) backends: Vec<FileBackend>,
    #[serde(default)]
    pub(super) health: FileHealth,
    #[serde(default)]
    pub(super) limits: FileLimits,
    #[serde(default)]
    pub(super) sticky: FileSticky,
    #[serde(default)]
    pub(super) tls: FileTls,
    /// CA bundle of `https://` backends (a path, relative to the working directory).
    pub(super) backend_ca: Option<PathBuf>,
    pub(super) session_lookup: Option<FileLookup>,
}

/// `[[backend]]`: checked as a whole, so a bad weight is reported at its table's line.
#[derive(Debug)]
pub(super) struct FileBackend(pub(super) BackendConfig);

impl<'de> Deserialize<'de> for FileBackend {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Table {
            url: String,
            weight: Option<u32>,
            name: Option<String>,
        }
        let t = Table::deserialize(d)?;
        backend(&t.url, t.weight, t.name)
            .map(FileBackend)
            .map_err(serde::de::Error::custom)
    }
}

/// `[health]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileHealth {
    pub(super) check: Option<Parsed<HealthCheckKind>>,
    pub(super) interval: Option<Parsed<Duration>>,
    pub(super) timeout: Option<Parsed<Duration>>,
    pub(super) rise: Option<AtLeastOne<u32>>,
    pub(super) fall: Option<AtLeastOne<u32>>,
    pub(super) max_fails: Option<u32>,
    pub(super) fail_timeout: Option<Parsed<Duration>>,
}

/// `[limits]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileLimits {
    pub(super) header_read_timeout: Option<Parsed<Duration>>,
    pub(super) max_header_bytes: Option<HeaderBytes>,
    pub(super) max_body_bytes: Option<AtLeastOne<u64>>,
    pub(super) connect_timeout: Option<Parsed<Duration>>,
    pub(super) response_timeout: Option<Parsed<Duration>>,
    pub(super) max_connections: Option<AtLeastOne<usize>>,
    pub(super) max_tries: Option<AtLeastOne<u32>>,
    pub(super) retry_buffer_bytes: Option<usize>,
    pub(super) body_read_timeout: Option<Parsed<Duration>>,
    /// Bytes per second: a number, or a string like `"1k"`.
    pub(super) min_upload_rate: Option<ByteRate>,
    pub(super) send_timeout: Option<Parsed<Duration>>,
    pub(super) idle_timeout: Option<Parsed<Duration>>,
    /// `--max-conns-per-ip` (0: off).
    pub(super) max_conns_per_ip: Option<u32>,
    /// `--rate-per-ip`: requests per second, or a string like `"30/m"`.
    pub(super) rate_per_ip: Option<FileRate>,
    /// `--burst`.
    pub(super) burst: Option<u32>,
}

/// `[sticky]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileSticky {
    pub(super) cookie: Option<Parsed<CookieName>>,
    pub(super) key: Option<Parsed<StickyKey>>,
}

/// `[tls]`: the client listener's certificate and key (paths, relative to the working
/// directory).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileTls {
    pub(super) cert: Option<PathBuf>,
    pub(super) key: Option<PathBuf>,
}

/// `[session_lookup] url`: one URL, a comma-separated list, or an array of URLs.
#[derive(Debug)]
pub(super) struct FileUrls(pub(super) Vec<String>);

impl<'de> Deserialize<'de> for FileUrls {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Shape {
            One(String),
            Many(Vec<String>),
        }
        let text = match Shape::deserialize(d)? {
            Shape::One(text) => text,
            Shape::Many(list) => list.join(","),
        };
        parse_setting::<LookupUrl>(&text)
            .map(|urls| FileUrls(urls.0))
            .map_err(D::Error::custom)
    }
}

/// `[session_lookup]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileLookup {
    pub(super) url: Option<FileUrls>,
    pub(super) namespace: Option<Parsed<Namespace>>,
    pub(super) cookie: Option<Parsed<CookieName>>,
    /// `--session-header`.
    pub(super) header: Option<Parsed<SessionHeader>>,
    pub(super) attrs: Option<Vec<Parsed<AttrName>>>,
    pub(super) on_failure: Option<Parsed<LookupFailure>>,
    pub(super) timeout: Option<Parsed<Duration>>,
    pub(super) auth_token: Option<Parsed<Token>>,
    pub(super) snapshot_keys: Option<Vec<Parsed<SnapshotKey>>>,
    pub(super) snapshot_cookie: Option<Parsed<CookieName>>,
    /// `--snapshot-max-age`.
    pub(super) snapshot_max_age: Option<Parsed<Duration>>,
    /// `--session-outage-grace`.
    pub(super) outage_grace: Option<Parsed<Duration>>,
    /// `--session-cache`.
    pub(super) cache: Option<usize>,
    /// CA bundle of an `https://` url (a path, relative to the working directory).
    pub(super) ca: Option<PathBuf>,
    /// Client certificate for mTLS (a path).
    pub(super) client_cert: Option<PathBuf>,
    /// Its private key (a path).
    pub(super) client_key: Option<PathBuf>,
}
