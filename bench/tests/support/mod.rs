//! Test support shared by the bench crate's integration tests: the skip rule for services a
//! test cannot find, and a plain HTTP/1.1 client (one connection per request, every header
//! kept) for probing proxies and backends. Each test binary uses part of it.
#![allow(dead_code)]

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Whether a missing service fails the test (`STICKLESS_REQUIRE_SERVICES=1`, as in CI) rather
/// than skipping it.
pub fn services_required() -> bool {
    std::env::var("STICKLESS_REQUIRE_SERVICES").is_ok_and(|v| v == "1")
}

/// The skip rule: prints `SKIPPED <test>: <why>`, or fails the test under
/// `STICKLESS_REQUIRE_SERVICES=1`.
pub fn skip_or_fail(test: &str, why: &str) {
    if services_required() {
        panic!("{test}: {why} (STICKLESS_REQUIRE_SERVICES=1, so this is a failure)");
    }
    // Written to the stderr handle itself: eprintln! is captured and hidden for passing tests.
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}

/// A response as the tests need it.
#[derive(Debug)]
pub struct Reply {
    /// The status code.
    pub status: u16,
    /// Header lines in order, names lower-cased (`set-cookie` may repeat).
    pub headers: Vec<(String, String)>,
    /// The body, as text.
    pub body: String,
}

impl Reply {
    /// The first header named `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `METHOD path` to `addr` with `headers` and, when given, a form body, on a connection of its
/// own (`Connection: close`), read to the end. Panics when there is no whole response within
/// 10 s.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    form: Option<&str>,
) -> Reply {
    try_request(addr, method, path, headers, form)
        .unwrap_or_else(|error| panic!("{method} http://{addr}{path}: {error}"))
}

/// [`request`], with a failed connection or a cut response as an error.
pub fn try_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    form: Option<&str>,
) -> std::io::Result<Reply> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(body) = form {
        head.push_str("Content-Type: application/x-www-form-urlencoded\r\n");
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    head.push_str(form.unwrap_or(""));
    stream.write_all(head.as_bytes())?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw)?;
    let cut = || std::io::Error::other(format!("not a whole response: {raw:?}"));
    let (head, body) = raw.split_once("\r\n\r\n").ok_or_else(cut)?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(cut)?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok(Reply {
        status,
        headers,
        body: body.to_owned(),
    })
}
