//! Parsers of single configuration values, shared by flags and file: the same text is accepted
//! or refused with the same message wherever it is written. Flags get them as clap value
//! parsers (the error names the flag), the file through [`Parsed`] (the error names the line).

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use clap::builder::RangedU64ValueParser;
use http::HeaderName;
use ipnet::IpNet;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer};
use session_client::cookie::MIN_KEY_BYTES;

use super::{
    BackendConfig, ConfigError, HealthCheckKind, LookupFailure, MAX_WEIGHT, MIN_HEADER_BYTES,
    MIN_STICKY_KEY_BYTES,
};
use crate::balance::{BalanceMode, HashType, StickyConfig};

/// A value read from one piece of text.
pub(super) trait ParseSetting: Sized {
    /// The value, or why the text is not one (a message for the operator).
    fn parse_setting(text: &str) -> Result<Self, String>;
}

/// [`ParseSetting::parse_setting`] as a function, for clap's `value_parser`.
pub(super) fn parse_setting<T: ParseSetting>(text: &str) -> Result<T, String> {
    T::parse_setting(text.trim())
}

/// A secret flag value (a token, key material) as given, checked when the configuration is
/// resolved (`SecretArg::parse`) rather than by clap, whose error would quote the value, even
/// one taken from the environment with `hide_env_values`. Its `Debug` shows nothing of it.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SecretArg(String);

impl fmt::Debug for SecretArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretArg(<hidden>)")
    }
}

impl SecretArg {
    /// The value, parsed like its file twin; the error names `flag` and says why, never the
    /// value.
    pub(super) fn parse<T: ParseSetting>(&self, flag: &str) -> Result<T, ConfigError> {
        parse_setting(&self.0).map_err(|why| ConfigError::Invalid(format!("{flag}: {why}")))
    }
}

/// Clap's parser of a [`SecretArg`]: any text, checked later.
pub(super) fn secret_arg(text: &str) -> Result<SecretArg, std::convert::Infallible> {
    Ok(SecretArg(text.to_owned()))
}

/// Clap's parser of a number that must be at least 1.
pub(super) fn positive<T: TryFrom<u64>>() -> RangedU64ValueParser<T> {
    RangedU64ValueParser::new().range(1..)
}

/// A file value written as a string and parsed like its flag.
#[derive(Debug)]
pub(super) struct Parsed<T>(pub(super) T);

impl<'de, T: ParseSetting> Deserialize<'de> for Parsed<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        parse_setting(&text).map(Parsed).map_err(D::Error::custom)
    }
}

/// A file number that must be at least 1.
#[derive(Debug)]
pub(super) struct AtLeastOne<T>(pub(super) T);

impl<'de, T: TryFrom<u64>> Deserialize<'de> for AtLeastOne<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = u64::deserialize(d)?;
        if n == 0 {
            return Err(D::Error::custom("must be at least 1"));
        }
        T::try_from(n)
            .map(AtLeastOne)
            .map_err(|_| D::Error::custom(format!("{n} is too large")))
    }
}

/// The file's `max_header_bytes`, at least [`MIN_HEADER_BYTES`].
#[derive(Debug)]
pub(super) struct HeaderBytes(pub(super) usize);

impl<'de> Deserialize<'de> for HeaderBytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = u64::deserialize(d)?;
        if n < MIN_HEADER_BYTES {
            return Err(D::Error::custom(format!(
                "max_header_bytes must be at least {MIN_HEADER_BYTES}, got {n}"
            )));
        }
        usize::try_from(n)
            .map(HeaderBytes)
            .map_err(|_| D::Error::custom(format!("{n} is too large")))
    }
}

impl ParseSetting for Duration {
    /// humantime syntax ("500ms", "5s", "1h 30m"); zero is refused, since every duration
    /// here bounds a wait or spaces out work.
    fn parse_setting(text: &str) -> Result<Self, String> {
        let duration = humantime::parse_duration(text)
            .map_err(|e| format!("bad duration {text:?} ({e}); write e.g. \"500ms\" or \"5s\""))?;
        if duration.is_zero() {
            return Err(format!("duration {text:?} must be above zero"));
        }
        Ok(duration)
    }
}

impl ParseSetting for IpNet {
    /// A CIDR (`10.0.0.0/8`, `fd00::/8`) or a single address.
    fn parse_setting(text: &str) -> Result<Self, String> {
        text.parse::<IpNet>()
            .map(|net| net.trunc())
            .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
            .map_err(|_| format!("{text:?} is not a CIDR (10.0.0.0/8) or an IP address"))
    }
}

impl ParseSetting for HashType {
    fn parse_setting(text: &str) -> Result<Self, String> {
        match text {
            "map" | "map-based" => Ok(HashType::Map),
            "consistent" => Ok(HashType::Consistent),
            _ => Err(format!("hash type {text:?} is not map or consistent")),
        }
    }
}

impl ParseSetting for LookupFailure {
    fn parse_setting(text: &str) -> Result<Self, String> {
        match text {
            "open" => Ok(LookupFailure::Open),
            "closed" => Ok(LookupFailure::Closed),
            _ => Err(format!(
                "session failure mode {text:?} is not open (forward without session) or closed \
                 (503)"
            )),
        }
    }
}

impl ParseSetting for HealthCheckKind {
    /// `off`, `tcp` or `http:/PATH`.
    fn parse_setting(text: &str) -> Result<Self, String> {
        match text {
            "off" => return Ok(HealthCheckKind::Off),
            "tcp" => return Ok(HealthCheckKind::Tcp),
            _ => {}
        }
        let Some(path) = text.strip_prefix("http:") else {
            return Err(format!(
                "health check {text:?} is not off, tcp or http:/PATH (e.g. http:/healthz)"
            ));
        };
        let valid = path.starts_with('/')
            && !path.starts_with("//")
            && path.parse::<http::uri::PathAndQuery>().is_ok();
        if !valid {
            return Err(format!(
                "health check path {path:?} must be an absolute path such as /healthz"
            ));
        }
        Ok(HealthCheckKind::Http(path.to_owned()))
    }
}

/// One of each balancing mode, as `--balance` gives it before `resolve` completes it with the
/// hash type and the sticky-cookie settings: hash type map, `:NAME` empty, no sticky settings.
const BALANCE_MODES: [BalanceMode; 11] = [
    BalanceMode::RoundRobin,
    BalanceMode::StaticRr,
    BalanceMode::LeastConn,
    BalanceMode::Random,
    BalanceMode::IpHash,
    BalanceMode::Source(HashType::Map),
    BalanceMode::Uri(HashType::Map),
    BalanceMode::UrlParam(String::new(), HashType::Map),
    BalanceMode::Header(String::new(), HashType::Map),
    BalanceMode::CookieHash(String::new(), HashType::Map),
    BalanceMode::StickyCookie(StickyConfig {
        cookie: String::new(),
        key: Vec::new(),
    }),
];

impl ParseSetting for BalanceMode {
    /// A mode by its [`BalanceMode::name`] (any case, `_` for `-`) or HAProxy's `roundrobin`,
    /// `leastconn`, `hdr` and `rdp-cookie`, with `:NAME` for the modes that hash one request
    /// field.
    fn parse_setting(text: &str) -> Result<Self, String> {
        let (written, given) = match text.split_once(':') {
            Some((mode, arg)) => (mode, Some(arg.trim())),
            None => (text, None),
        };
        let written = written.trim().to_ascii_lowercase().replace('_', "-");
        let name = match written.as_str() {
            "roundrobin" => "round-robin",
            "leastconn" => "least-conn",
            "hdr" => "header",
            "rdp-cookie" => "cookie-hash",
            name => name,
        };
        let Some(mut mode) = BALANCE_MODES.into_iter().find(|mode| mode.name() == name) else {
            return Err(format!(
                "unknown balance mode {text:?}; expected round-robin, static-rr, least-conn, \
                 random, ip-hash, source, uri, url-param:NAME, header:NAME, cookie-hash:NAME, \
                 rdp-cookie:NAME or sticky-cookie"
            ));
        };
        let arg = |kind: &str| match given {
            Some(arg) if !arg.is_empty() => Ok(arg),
            _ => Err(format!(
                "balance mode {written} needs the {kind}'s name: {written}:NAME"
            )),
        };
        match &mut mode {
            BalanceMode::UrlParam(param, _) => *param = url_param(arg("query parameter")?)?,
            BalanceMode::Header(header, _) => {
                *header = header_name(arg("header")?)?.as_str().to_owned();
            }
            BalanceMode::CookieHash(cookie, _) => {
                *cookie = CookieName::parse_setting(arg("cookie")?)?.0;
            }
            _ if given.is_some() => return Err(format!("balance mode {written} takes no :NAME")),
            _ => {}
        }
        Ok(mode)
    }
}

/// A query parameter name, as it appears before `=` in the query string.
fn url_param(name: &str) -> Result<String, String> {
    if name.contains(['&', '=', '#', '?']) || name.contains(char::is_whitespace) {
        return Err(format!(
            "query parameter name {name:?} has &, =, #, ? or a space"
        ));
    }
    Ok(name.to_owned())
}

/// A header name from the configuration, lowercased (header names are case-insensitive): the
/// one check of every configured header name (`header:NAME` balancing, the `x-session-attr-NAME`
/// of a session attribute), and how the balancer and the session lookup make `HeaderName`s of
/// them.
pub(crate) fn header_name(name: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("{name:?} is not a valid header name"))
}

#[cfg(test)]
mod balance_mode_tests {
    use super::{BALANCE_MODES, BalanceMode, ParseSetting};

    /// `--balance` takes every mode by the name logs print, so the two never drift apart.
    #[test]
    fn every_mode_parses_from_its_name() {
        for mode in BALANCE_MODES {
            let name = mode.name();
            let text = match mode {
                BalanceMode::UrlParam(..)
                | BalanceMode::Header(..)
                | BalanceMode::CookieHash(..) => {
                    format!("{name}:x")
                }
                _ => name.to_owned(),
            };
            let parsed = BalanceMode::parse_setting(&text);
            assert_eq!(parsed.as_ref().map(BalanceMode::name), Ok(name), "{text}");
        }
    }
}

impl ParseSetting for BackendConfig {
    /// The flag form, `http://host:port[,weight=N][,name=NAME]`.
    fn parse_setting(text: &str) -> Result<Self, String> {
        let mut parts = text.split(',').map(str::trim);
        let url = parts.next().unwrap_or_default();
        let (mut weight, mut name) = (None, None);
        for part in parts {
            match part.split_once('=') {
                Some(("weight", n)) => {
                    let n = n
                        .parse::<u32>()
                        .map_err(|_| format!("backend {url}: weight {n:?} is not a number"))?;
                    weight = Some(n);
                }
                Some(("name", n)) => name = Some(n.to_owned()),
                _ => {
                    return Err(format!(
                        "backend {url}: {part:?} is not weight=N or name=NAME \
                         (write http://host:port,weight=2,name=s1)"
                    ));
                }
            }
        }
        backend(url, weight, name)
    }
}

/// A backend from its URL, weight (default 1) and name (default `host:port`).
pub(super) fn backend(
    url: &str,
    weight: Option<u32>,
    name: Option<String>,
) -> Result<BackendConfig, String> {
    let (authority, tls) = backend_authority(url)?;
    let name = name.unwrap_or_else(|| authority.clone());
    let name_ok = (1..=255).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-:[]".contains(&b));
    if !name_ok {
        return Err(format!(
            "backend name {name:?} must be 1 to 255 characters of letters, digits and . _ - : [ ]"
        ));
    }
    let weight = weight.unwrap_or(1);
    if !(1..=MAX_WEIGHT).contains(&weight) {
        return Err(format!(
            "backend {name}: weight must be 1..={MAX_WEIGHT}, got {weight} (a weight of 0, to \
             drain a backend, is set at run time through the admin API)"
        ));
    }
    Ok(BackendConfig {
        name,
        authority,
        weight,
        tls,
    })
}

/// `host:port` of an `http://host[:port]` URL (port 80 when absent) or an
/// `https://host[:port]` one (port 443 when absent), and whether it is `https`.
fn backend_authority(url: &str) -> Result<(String, bool), String> {
    let shape =
        || format!("backend URL {url:?} must look like http://host:port or https://host:port");
    let uri: http::Uri = url.parse().map_err(|_| shape())?;
    let (tls, default_port) = match uri.scheme_str() {
        Some("http") => (false, 80),
        Some("https") => (true, 443),
        _ => return Err(shape()),
    };
    let authority = uri.authority().ok_or_else(shape)?;
    if authority.as_str().contains('@') || authority.host().is_empty() {
        return Err(shape());
    }
    if !matches!(uri.path_and_query().map(|p| p.as_str()), None | Some("/")) {
        return Err(format!(
            "backend URL {url:?} must not have a path or query: requests keep their own"
        ));
    }
    let authority = format!(
        "{}:{}",
        authority.host(),
        authority.port_u16().unwrap_or(default_port)
    );
    Ok((authority, tls))
}

/// A cookie name (an RFC 6265 token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CookieName(pub String);

impl ParseSetting for CookieName {
    fn parse_setting(text: &str) -> Result<Self, String> {
        let ok = (1..=128).contains(&text.len())
            && text
                .bytes()
                .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b));
        if !ok {
            return Err(format!(
                "{text:?} is not a cookie name (letters, digits and !#$%&'*+-.^_`|~)"
            ));
        }
        Ok(CookieName(text.to_owned()))
    }
}

/// The sticky-cookie signing key, decoded from hex or base64; at least 32 bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct StickyKey(pub Vec<u8>);

impl fmt::Debug for StickyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StickyKey(<{} bytes>)", self.0.len())
    }
}

impl ParseSetting for StickyKey {
    fn parse_setting(text: &str) -> Result<Self, String> {
        key_material(text, "sticky key", MIN_STICKY_KEY_BYTES).map(StickyKey)
    }
}

/// One key of the signed session snapshot cookie, decoded from hex or base64; at least 32
/// bytes. The same material as the backends' `demo-app --cookie-key`.
#[derive(Clone, PartialEq, Eq)]
pub struct SnapshotKey(pub Vec<u8>);

impl fmt::Debug for SnapshotKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SnapshotKey(<{} bytes>)", self.0.len())
    }
}

impl ParseSetting for SnapshotKey {
    fn parse_setting(text: &str) -> Result<Self, String> {
        key_material(text, "session snapshot key", MIN_KEY_BYTES).map(SnapshotKey)
    }
}

/// Secret key material written as hex or base64 (standard or url-safe, padded or not), at
/// least `min` bytes; `what` names the key in errors.
fn key_material(text: &str, what: &str, min: usize) -> Result<Vec<u8>, String> {
    session_client::cookie::key_material_from_text(text, min)
        .map_err(|error| format!("{what} {error}"))
}

/// Session server URLs, `http(s)://host[:port]`, comma-separated: several servers over one
/// store, which the plugin balances over and fails over between.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LookupUrl(pub Vec<String>);

impl ParseSetting for LookupUrl {
    fn parse_setting(text: &str) -> Result<Self, String> {
        let mut urls = Vec::new();
        for item in text.split(',').map(str::trim) {
            let shape = || format!("session server URL {item:?} must look like http://host:port");
            let uri: http::Uri = item.parse().map_err(|_| shape())?;
            let scheme_ok = matches!(uri.scheme_str(), Some("http" | "https"));
            let host_ok = uri
                .authority()
                .is_some_and(|a| !a.host().is_empty() && !a.as_str().contains('@'));
            let path_ok = matches!(uri.path_and_query().map(|p| p.as_str()), None | Some("/"));
            if !(scheme_ok && host_ok && path_ok) {
                return Err(shape());
            }
            let url = item.trim_end_matches('/').to_owned();
            if urls.contains(&url) {
                return Err(format!("session server URL {item:?} is given twice"));
            }
            urls.push(url);
        }
        Ok(LookupUrl(urls))
    }
}

/// A session namespace: 1 to 64 of `[A-Za-z0-9_.-]`, as the session server requires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace(pub String);

impl ParseSetting for Namespace {
    fn parse_setting(text: &str) -> Result<Self, String> {
        let ok = (1..=64).contains(&text.len())
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
        if !ok {
            return Err(format!(
                "session namespace {text:?} must be 1 to 64 characters of [A-Za-z0-9_.-]"
            ));
        }
        Ok(Namespace(text.to_owned()))
    }
}

/// A session attribute forwarded as the header `x-session-attr-NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttrName(pub String);

impl ParseSetting for AttrName {
    fn parse_setting(text: &str) -> Result<Self, String> {
        if text.is_empty() || header_name(&format!("x-session-attr-{text}")).is_err() {
            return Err(format!(
                "session attribute {text:?} cannot be a header name (x-session-attr-{text})"
            ));
        }
        Ok(AttrName(text.to_owned()))
    }
}

/// The request header carrying the session id (`--session-header`), read besides the session
/// cookie: a lower-case header name without `_` (the hygiene filter drops those), and none of
/// the headers the plugin sets itself (`x-session-id`, `x-session-user`, `x-session-degraded`,
/// `x-session-attr-*`), which a client must never be able to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionHeader(pub String);

impl ParseSetting for SessionHeader {
    fn parse_setting(text: &str) -> Result<Self, String> {
        let name = text.trim().to_ascii_lowercase();
        header_name(&name).map_err(|_| format!("session header {text:?} is not a header name"))?;
        if name.contains('_') {
            return Err(format!(
                "session header {text:?} contains `_`: such names are dropped from requests"
            ));
        }
        if crate::lookup::is_plugin_header(&name) {
            return Err(format!(
                "session header {text:?} is a header the session-lookup plugin sets itself"
            ));
        }
        Ok(SessionHeader(name))
    }
}

/// The session server's bearer token (never printed).
#[derive(Clone, PartialEq, Eq)]
pub struct Token(pub String);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<hidden>)")
    }
}

impl ParseSetting for Token {
    fn parse_setting(text: &str) -> Result<Self, String> {
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("session auth token must be non-empty visible ASCII".to_owned());
        }
        Ok(Token(text.to_owned()))
    }
}

/// A rate in bytes per second (`--min-upload-rate`): `500`, `1k` (1024), `2m` (2 MiB), an
/// optional `/s` after it; `0` turns the check off.
pub(super) fn byte_rate(text: &str) -> Result<u64, String> {
    let bad =
        || format!("bad rate {text:?}; write bytes per second, e.g. \"500\", \"1k\" or \"0\"");
    let number = text.trim().trim_end_matches("/s");
    let (digits, unit) = match number.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => number.split_at(at),
        None => (number, ""),
    };
    let factor: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1024,
        "m" | "mb" | "mib" => 1024 * 1024,
        _ => return Err(bad()),
    };
    digits
        .parse::<u64>()
        .map_err(|_| bad())?
        .checked_mul(factor)
        .ok_or_else(|| format!("rate {text:?} is too large"))
}

/// The file's `min_upload_rate`: a number of bytes per second, or a string as the flag takes.
#[derive(Debug)]
pub(super) struct ByteRate(pub(super) u64);

impl<'de> Deserialize<'de> for ByteRate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = ByteRate;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("bytes per second, as a number or a string like \"1k\"")
            }

            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<ByteRate, E> {
                Ok(ByteRate(n))
            }

            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<ByteRate, E> {
                u64::try_from(n)
                    .map(ByteRate)
                    .map_err(|_| E::custom(format!("rate {n} must not be negative")))
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<ByteRate, E> {
                byte_rate(text).map(ByteRate).map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod byte_rate_tests {
    use super::byte_rate;

    #[test]
    fn rates_take_plain_numbers_and_binary_suffixes() {
        assert_eq!(byte_rate("0"), Ok(0));
        assert_eq!(byte_rate("500"), Ok(500));
        assert_eq!(byte_rate("1k"), Ok(1024));
        assert_eq!(byte_rate("2M/s"), Ok(2 * 1024 * 1024));
        assert_eq!(byte_rate("10kb"), Ok(10 * 1024));
        for bad in ["", "k", "1x", "-1", "1.5k", "99999999999999999999m"] {
            assert!(byte_rate(bad).is_err(), "{bad:?} accepted");
        }
    }
}
