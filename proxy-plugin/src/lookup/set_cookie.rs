//! Reading the `Set-Cookie` lines of a backend's response: whether it sets a cookie at all
//! (login, a backend keeping its own snapshot) and whether it clears one (logout).
//!
//! A line clears its cookie when the browser ends up without it (RFC 6265 §5.3): an empty
//! value, a `Max-Age` of zero or less, or, without a valid `Max-Age`, an `Expires` date in the
//! past. What session-client's layer writes on logout (tower-cookies' removal cookie:
//! `sid=; …; Max-Age=0; Expires=<a year ago>`) and what `demo-app --sessions proxy` writes
//! (`sid=; Path=/; Max-Age=0; …`) both count. Dates are read as RFC 6265 §5.1.1 says browsers
//! read them (so `Thu, 01 Jan 1970 00:00:00 GMT` and `Thu, 01-Jan-70 00:00:00 GMT` alike);
//! an unreadable date is ignored, as browsers ignore it.

use std::time::{SystemTime, UNIX_EPOCH};

use http::HeaderMap;
use http::header::SET_COOKIE;

/// Every `Set-Cookie` line of `headers` naming cookie `name`, in order.
fn lines_for<'a>(headers: &'a HeaderMap, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    headers
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .filter(move |line| {
            line.split_once('=')
                .is_some_and(|(key, _)| key.trim() == name)
        })
}

/// Whether a response sets (or deletes) cookie `name`.
pub(super) fn sets_cookie(headers: &HeaderMap, name: &str) -> bool {
    lines_for(headers, name).next().is_some()
}

/// The value the last `Set-Cookie` line naming cookie `name` sets (empty when it clears it
/// that way), if any.
pub(super) fn set_value<'a>(headers: &'a HeaderMap, name: &'a str) -> Option<&'a str> {
    let line = lines_for(headers, name).last()?;
    let pair = line.split(';').next().unwrap_or("");
    Some(pair.split_once('=').map_or("", |(_, value)| value.trim()))
}

/// Whether a response clears cookie `name` (at `now`): its last `Set-Cookie` line for that
/// name, the one a browser keeps, removes the cookie.
pub(super) fn clears_cookie(headers: &HeaderMap, name: &str, now: SystemTime) -> bool {
    lines_for(headers, name)
        .last()
        .is_some_and(|line| removes(line, now))
}

/// Whether one `Set-Cookie` line (`name=value; attributes`) removes its cookie at `now`.
fn removes(line: &str, now: SystemTime) -> bool {
    let mut parts = line.split(';');
    let value = parts
        .next()
        .and_then(|pair| pair.split_once('='))
        .map_or("", |(_, value)| value.trim());
    if value.is_empty() || value == "\"\"" {
        return true;
    }
    let (mut max_age, mut expires) = (None, None);
    for attribute in parts {
        let (key, value) = attribute.split_once('=').unwrap_or((attribute, ""));
        let (key, value) = (key.trim(), value.trim());
        if key.eq_ignore_ascii_case("max-age") {
            // RFC 6265 §5.2.2: an optional minus and digits, else the attribute is ignored.
            let digits = value.strip_prefix('-').unwrap_or(value);
            if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
                max_age = Some(value.starts_with('-') || digits.bytes().all(|b| b == b'0'));
            }
        } else if key.eq_ignore_ascii_case("expires")
            && let Some(at) = cookie_date(value)
        {
            expires = Some(at < unix_seconds(now));
        }
    }
    // Max-Age wins over Expires.
    max_age.or(expires).unwrap_or(false)
}

/// Seconds since the Unix epoch (negative before it).
fn unix_seconds(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_secs()).unwrap_or(i64::MAX),
        Err(before) => -i64::try_from(before.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// A cookie date (RFC 6265 §5.1.1) as seconds since the Unix epoch; `None` when it is not one.
fn cookie_date(text: &str) -> Option<i64> {
    let (mut time, mut day, mut month, mut year) = (None, None, None, None);
    let tokens = text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == ':'))
        .filter(|token| !token.is_empty());
    for token in tokens {
        if time.is_none()
            && let Some(hms) = clock(token)
        {
            time = Some(hms);
        } else if day.is_none()
            && let Some(d) = leading_number(token, 1, 2)
        {
            day = Some(d);
        } else if month.is_none()
            && let Some(m) = month_number(token)
        {
            month = Some(m);
        } else if year.is_none()
            && let Some(y) = leading_number(token, 2, 4)
        {
            year = Some(y);
        }
    }
    let (hour, minute, second) = time?;
    let (day, month, mut year) = (day?, month?, year?);
    year += match year {
        70..=99 => 1900,
        0..=69 => 2000,
        _ => 0,
    };
    if !(1..=31).contains(&day) || year < 1601 || hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + hour * 3_600 + minute * 60 + second)
}

/// `hh:mm:ss` (one or two digits each), possibly followed by non-digits.
fn clock(token: &str) -> Option<(i64, i64, i64)> {
    let mut fields = token.splitn(3, ':');
    let hour = leading_number(fields.next()?, 1, 2)?;
    let minute = fields.next()?;
    if !(1..=2).contains(&minute.len()) {
        return None;
    }
    let minute = leading_number(minute, 1, 2)?;
    let second = leading_number(fields.next()?, 1, 2)?;
    Some((hour, minute, second))
}

/// The `min..=max` digits `token` starts with, when no digit follows them.
fn leading_number(token: &str, min: usize, max: usize) -> Option<i64> {
    let digits = token.bytes().take_while(u8::is_ascii_digit).count();
    if !(min..=max).contains(&digits) {
        return None;
    }
    token[..digits].parse().ok()
}

/// The month (1 to 12) a token names by its first three letters.
fn month_number(token: &str) -> Option<i64> {
    const MONTHS: [&str; 12] = [
        "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
    ];
    let prefix = token.get(..3)?.to_ascii_lowercase();
    let index = MONTHS.iter().position(|month| *month == prefix)?;
    Some(index as i64 + 1)
}

/// Days from 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::HeaderValue;

    use super::*;

    /// 2023-11-14 22:13:20 UTC.
    const NOW: u64 = 1_700_000_000;

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(NOW)
    }

    fn response(lines: &[&'static str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for line in lines {
            headers.append(SET_COOKIE, HeaderValue::from_static(line));
        }
        headers
    }

    fn clears(lines: &[&'static str], name: &str) -> bool {
        clears_cookie(&response(lines), name, now())
    }

    #[test]
    fn the_value_set_is_the_last_lines() {
        let headers = response(&["sid=old; Path=/", "sid= new ; Max-Age=60", "sidx=z"]);
        assert_eq!(set_value(&headers, "sid"), Some("new"));
        assert_eq!(set_value(&response(&["sid=; Max-Age=0"]), "sid"), Some(""));
        assert_eq!(set_value(&headers, "theme"), None);
    }

    #[test]
    fn response_cookies_are_matched_by_exact_name() {
        let headers = response(&["sid_snap=x; Path=/", "theme=dark"]);
        assert!(sets_cookie(&headers, "sid_snap"));
        assert!(sets_cookie(&headers, "theme"));
        assert!(!sets_cookie(&headers, "sid"));
    }

    #[test]
    fn a_zero_or_negative_max_age_clears() {
        assert!(clears(&["sid=x; Path=/; Max-Age=0; HttpOnly"], "sid"));
        assert!(clears(&["sid=x; max-age=00"], "sid"));
        assert!(clears(&["sid=x; Max-Age=-1"], "sid"));
        // demo-app --sessions proxy's logout.
        assert!(clears(
            &["sid=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax"],
            "sid"
        ));
    }

    #[test]
    fn an_expires_in_the_past_clears() {
        assert!(clears(
            &["sid=x; Path=/; Expires=Thu, 01 Jan 1970 00:00:00 GMT"],
            "sid"
        ));
        assert!(clears(
            &["sid=x; expires=Tue, 14-Nov-23 22:13:19 GMT"],
            "sid"
        ));
        // session-client's layer (tower-cookies' removal cookie).
        assert!(clears(
            &[
                "sid=; HttpOnly; SameSite=Lax; Path=/; Max-Age=0; Expires=Mon, 14 Nov 2022 22:13:20 GMT"
            ],
            "sid"
        ));
        assert!(!clears(
            &["sid=x; Expires=Tue, 14 Nov 2023 22:13:21 GMT"],
            "sid"
        ));
        assert!(!clears(&["sid=x; Expires=yesterday"], "sid"), "unreadable");
    }

    #[test]
    fn max_age_wins_over_expires() {
        assert!(!clears(
            &["sid=x; Max-Age=60; Expires=Thu, 01 Jan 1970 00:00:00 GMT"],
            "sid"
        ));
        assert!(clears(
            &["sid=x; Max-Age=0; Expires=Fri, 01 Jan 2100 00:00:00 GMT"],
            "sid"
        ));
        assert!(
            !clears(&["sid=x; Max-Age=soon"], "sid"),
            "an invalid Max-Age is ignored"
        );
    }

    #[test]
    fn an_empty_value_clears() {
        assert!(clears(&["sid=; Path=/"], "sid"));
        assert!(clears(&["sid=\"\""], "sid"));
    }

    #[test]
    fn a_normal_set_or_another_cookie_does_not_clear() {
        assert!(!clears(&["sid=abc; Path=/; HttpOnly; SameSite=Lax"], "sid"));
        assert!(!clears(&["sid=abc; Path=/; Max-Age=1800"], "sid"));
        assert!(!clears(
            &["sid_snap=; Max-Age=0", "theme=; Max-Age=0"],
            "sid"
        ));
        assert!(!clears(&["sidx=; Max-Age=0"], "sid"));
        assert!(!clears(&[], "sid"));
        // The last line for the name is the one the browser keeps.
        assert!(!clears(&["sid=; Max-Age=0", "sid=new; Path=/"], "sid"));
        assert!(clears(&["sid=old; Path=/", "sid=; Max-Age=0"], "sid"));
    }

    #[test]
    fn cookie_dates_are_read_as_browsers_read_them() {
        assert_eq!(cookie_date("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(
            cookie_date("Tue, 14 Nov 2023 22:13:20 GMT"),
            Some(NOW as i64)
        );
        assert_eq!(
            cookie_date("Tuesday, 14-Nov-23 22:13:20 GMT"),
            Some(NOW as i64)
        );
        assert_eq!(cookie_date("Tue Nov 14 22:13:20 2023"), Some(NOW as i64));
        assert_eq!(
            cookie_date("Wed, 29 Feb 2000 00:00:00 GMT"),
            Some(951_782_400)
        );
        assert_eq!(cookie_date("Fri, 31 Dec 1969 23:59:59 GMT"), Some(-1));
        assert_eq!(cookie_date(""), None);
        assert_eq!(cookie_date("Thu, 01 Jan 1970"), None, "no time");
        assert_eq!(cookie_date("Thu, 32 Jan 1970 00:00:00 GMT"), None);
        assert_eq!(cookie_date("Thu, 01 Jan 1970 24:00:00 GMT"), None);
    }
}
