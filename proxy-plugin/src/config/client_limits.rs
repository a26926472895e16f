//! Per-client limits (nginx `limit_conn` and `limit_req`): `--max-conns-per-ip N`,
//! `--rate-per-ip R[/s|/m]` and `--burst B` (env `STICKLESS_PROXY_MAX_CONNS_PER_IP`,
//! `STICKLESS_PROXY_RATE_PER_IP`, `STICKLESS_PROXY_BURST`; `max_conns_per_ip`, `rate_per_ip`,
//! `burst` in the file's `[limits]` table), each flag over its key, all off by default. The
//! filter enforcing them is [`crate::filter::client_limits`].

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::file::FileLimits;
use super::values::ParseSetting;
use super::{Cli, ConfigError};

/// Most requests per second or minute `--rate-per-ip` takes: past a million a second, the
/// interval between two requests (a microsecond) is below what the proxy can tell apart.
const MAX_RATE: u32 = 1_000_000;

/// Per-client limits, keyed by the client address from the trusted chain
/// ([`FilterContext::client_ip`](crate::filter::FilterContext::client_ip)): an IPv4 address,
/// or the /64 of an IPv6 one. The default is every limit off.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientLimits {
    /// Most requests in flight at once from one client, from its request head to the end of
    /// its response body (429 with `Retry-After: 1` past it; nginx `limit_conn`, which counts
    /// requests, not connections, in HTTP); 0: off.
    pub max_conns_per_ip: u32,
    /// Sustained request rate of one client (429 past it and its burst; nginx `limit_req
    /// rate=`); `None`: off.
    pub rate_per_ip: Option<RequestRate>,
    /// Requests a client may send at once beyond its rate (nginx `burst=` with `nodelay`:
    /// `burst + 1` requests pass at once, then one every rate interval).
    pub burst: u32,
}

impl ClientLimits {
    /// Whether any limit is on.
    pub fn any(&self) -> bool {
        self.max_conns_per_ip > 0 || self.rate_per_ip.is_some()
    }
}

/// A request rate: `requests` per `per` (a second or a minute), as nginx writes `10r/s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestRate {
    /// Requests allowed per `per`, 1 to 1 000 000.
    pub requests: u32,
    /// One second or one minute.
    pub per: Duration,
}

impl RequestRate {
    /// `requests` a second.
    pub fn per_second(requests: u32) -> Self {
        RequestRate {
            requests,
            per: Duration::from_secs(1),
        }
    }

    /// `requests` a minute.
    pub fn per_minute(requests: u32) -> Self {
        RequestRate {
            requests,
            per: Duration::from_secs(60),
        }
    }

    /// The time one request takes from a client's allowance (at least a nanosecond).
    pub fn interval(&self) -> Duration {
        (self.per / self.requests.max(1)).max(Duration::from_nanos(1))
    }
}

impl fmt::Display for RequestRate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = if self.per >= Duration::from_secs(60) {
            "m"
        } else {
            "s"
        };
        write!(f, "{}/{unit}", self.requests)
    }
}

/// A rate as written: `R`, `R/s`, `R/m` (also nginx's `Rr/s`, `Rr/m`); `0` is off (`None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateSetting(pub Option<RequestRate>);

impl ParseSetting for RateSetting {
    fn parse_setting(text: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "bad rate {text:?}; write requests per second or minute, e.g. \"10\", \"10/s\" \
                 or \"30/m\" (\"0\": off)"
            )
        };
        let (number, minute) = match text.split_once('/') {
            None => (text, false),
            Some((number, unit)) => match unit.trim() {
                "s" | "sec" | "second" => (number, false),
                "m" | "min" | "minute" => (number, true),
                _ => return Err(bad()),
            },
        };
        let number = number.trim();
        let number = number.strip_suffix(['r', 'R']).unwrap_or(number);
        if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let requests = number.parse::<u32>().ok().filter(|n| *n <= MAX_RATE);
        let Some(requests) = requests else {
            return Err(format!(
                "rate {text:?} is over {MAX_RATE} requests per second or minute"
            ));
        };
        Ok(RateSetting((requests > 0).then(|| {
            if minute {
                RequestRate::per_minute(requests)
            } else {
                RequestRate::per_second(requests)
            }
        })))
    }
}

/// The file's `rate_per_ip`: a number of requests per second, or a string as the flag takes.
#[derive(Debug, Clone, Copy)]
pub(super) struct FileRate(pub(super) RateSetting);

impl<'de> Deserialize<'de> for FileRate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = FileRate;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("requests per second as a number, or a string like \"30/m\"")
            }

            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<FileRate, E> {
                self.visit_str(&n.to_string())
            }

            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<FileRate, E> {
                self.visit_str(&n.to_string())
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<FileRate, E> {
                RateSetting::parse_setting(text.trim())
                    .map(FileRate)
                    .map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// The limits from the flags, else from `[limits]`, else off. A burst without a rate is a
/// mistake worth reporting rather than ignoring.
pub(super) fn resolve(cli: &Cli, file: &FileLimits) -> Result<ClientLimits, ConfigError> {
    let rate_per_ip = cli
        .rate_per_ip
        .or(file.rate_per_ip.as_ref().map(|r| r.0))
        .and_then(|r| r.0);
    let burst = cli.burst.or(file.burst).unwrap_or(0);
    if burst > 0 && rate_per_ip.is_none() {
        return Err(ConfigError::Invalid(
            "--burst (limits.burst) is given without --rate-per-ip (limits.rate_per_ip): a \
             burst is a number of requests over a rate"
                .to_owned(),
        ));
    }
    Ok(ClientLimits {
        max_conns_per_ip: cli.max_conns_per_ip.or(file.max_conns_per_ip).unwrap_or(0),
        rate_per_ip,
        burst,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(text: &str) -> Result<Option<RequestRate>, String> {
        RateSetting::parse_setting(text).map(|r| r.0)
    }

    #[test]
    fn rates_are_per_second_by_default_per_minute_with_m_and_zero_is_off() {
        assert_eq!(rate("10"), Ok(Some(RequestRate::per_second(10))));
        assert_eq!(rate("10/s"), Ok(Some(RequestRate::per_second(10))));
        assert_eq!(rate("10r/s"), Ok(Some(RequestRate::per_second(10))));
        assert_eq!(rate("30/m"), Ok(Some(RequestRate::per_minute(30))));
        assert_eq!(rate("30r/m"), Ok(Some(RequestRate::per_minute(30))));
        assert_eq!(rate("0"), Ok(None));
        for bad in ["", "/s", "x", "-1", "1.5", "10/h", "10 per s", "2000000/s"] {
            assert!(rate(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            RequestRate::per_minute(30).interval(),
            Duration::from_secs(2)
        );
        assert_eq!(
            RequestRate::per_second(4).interval(),
            Duration::from_millis(250)
        );
        assert_eq!(RequestRate::per_minute(30).to_string(), "30/m");
    }
}
