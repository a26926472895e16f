//! Finding the real services tests need (Redis), with the project's skip rule: a missing service
//! prints why and skips, unless `STICKLESS_REQUIRE_SERVICES=1`, when it fails the test.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The Redis every backend test uses, as CI and developer machines run it.
pub const REDIS_URL: &str = "redis://127.0.0.1:6379";

/// True when `STICKLESS_REQUIRE_SERVICES=1`: missing services fail instead of skipping.
pub fn services_required() -> bool {
    std::env::var("STICKLESS_REQUIRE_SERVICES").is_ok_and(|v| v == "1")
}

/// Skips (returns `None` after printing why) or fails, by the skip rule.
pub fn skip_or_fail<T>(test: &str, why: &str) -> Option<T> {
    if services_required() {
        panic!("{test}: {why} (STICKLESS_REQUIRE_SERVICES=1, so this is a failure)");
    }
    // Written to the stderr handle itself, not through eprintln!, which the test harness
    // captures and hides for passing tests: a skip must show in every run's output.
    use std::io::Write as _;
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: {why} (set up the service, or see README)"
    );
    None
}

/// Whether a Redis answers PING at `addr` within a second.
pub fn redis_answers(addr: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(addr) = addr.parse::<SocketAddr>() else {
        return false;
    };
    let Ok(mut conn) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = conn.set_read_timeout(Some(Duration::from_secs(1)));
    if conn.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    conn.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

/// The URL of the shared test Redis, or `None` (skipped) when it is not running.
pub fn redis_url(test: &str) -> Option<String> {
    if redis_answers("127.0.0.1:6379") {
        Some(REDIS_URL.to_string())
    } else {
        skip_or_fail(test, "no Redis answers on 127.0.0.1:6379")
    }
}

/// A loopback port that nothing listened on a moment ago, released again. For what needs a
/// port nobody listens on (a "connection refused" test: `ports::RefusedPort` holds its port
/// and is safer) or a starting point for a server that cannot bind port 0 itself and is
/// retried on another port when it fails to bind ([`OwnRedis`], `mysql::OwnMariadb`,
/// `cluster`). Never a port for our own binaries: they take port 0 and report the address
/// (`process::ServerProcess`).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral loopback port")
}

/// Where `redis-server` is, or `None` (skipped) when it is not installed.
pub fn redis_server_binary(test: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("redis-server"))
            .find(|p| p.is_file())
    });
    match found {
        Some(path) => Some(path),
        None => skip_or_fail(test, "redis-server is not installed"),
    }
}

/// Ports a private server is tried on before the test gives up: each attempt whose server
/// exits (another process took the port between [`free_port`] and its bind) or turns out to
/// be someone else's moves to a fresh port.
pub const PORT_ATTEMPTS: usize = 10;

/// How long one `redis-server` gets to answer as itself: generous, for a loaded machine.
const REDIS_START_WITHIN: Duration = Duration::from_secs(15);

/// Starts of a restarted `redis-server` on its own port before the test gives up (the port
/// was ours, so a failed bind can only be a moment's overlap).
const RESTART_ATTEMPTS: usize = 5;

/// A private `redis-server` this test starts on its own port, killed when dropped.
pub struct OwnRedis {
    /// The running server process.
    child: Child,
    /// The port it listens on (kept across restarts).
    pub port: u16,
    /// The binary, to restart it.
    binary: PathBuf,
}

impl OwnRedis {
    /// Starts a throwaway Redis (no persistence) on a free port and waits until it answers as
    /// itself; a server that cannot bind (the port was taken meanwhile) is retried on another
    /// port, up to [`PORT_ATTEMPTS`] times.
    pub fn start(binary: PathBuf) -> OwnRedis {
        let mut failures = Vec::new();
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port();
            let mut child = Self::spawn(&binary, port);
            match answers_as(&mut child, port) {
                Ok(()) => {
                    return OwnRedis {
                        child,
                        port,
                        binary,
                    };
                }
                Err(why) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    failures.push(format!("port {port}: {why}"));
                }
            }
        }
        panic!("own redis-server did not start in {PORT_ATTEMPTS} attempts: {failures:?}");
    }

    fn spawn(binary: &PathBuf, port: u16) -> Child {
        Command::new(binary)
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", "no", "--protected-mode", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server")
    }

    /// The URL clients use.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (as a crash would) and waits for it to be gone.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same port (empty: it keeps nothing), retrying a few times should
    /// the bind fail, and waits until it answers as itself.
    pub fn restart(&mut self) {
        self.stop();
        let mut failures = Vec::new();
        for _ in 0..RESTART_ATTEMPTS {
            self.child = Self::spawn(&self.binary, self.port);
            match answers_as(&mut self.child, self.port) {
                Ok(()) => return,
                Err(why) => {
                    self.stop();
                    failures.push(why);
                    // A retry, not a synchronisation: give the port's last user a moment.
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
        panic!(
            "own redis-server did not restart on {} in {RESTART_ATTEMPTS} attempts: {failures:?}",
            self.port
        );
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits (up to [`REDIS_START_WITHIN`]) until the `redis-server` `child` answers on `port` and
/// reports its own process id (another server that holds the port would answer too); why not
/// otherwise (it exited, say, because the port was taken).
fn answers_as(child: &mut Child, port: u16) -> Result<(), String> {
    let pid = format!("process_id:{}", child.id());
    let deadline = Instant::now() + REDIS_START_WITHIN;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("exited ({status}) before answering"));
        }
        if let Some(info) = redis_info_server(port) {
            return if info.lines().any(|l| l.trim() == pid) {
                Ok(())
            } else {
                Err("another server answers there".into())
            };
        }
        if Instant::now() >= deadline {
            return Err(format!("no answer within {REDIS_START_WITHIN:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The reply to `INFO server` from a Redis on loopback `port`, or `None` when nothing answers
/// it within a second (or not with a bulk string).
fn redis_info_server(port: u16) -> Option<String> {
    use std::io::{Read, Write};
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut conn = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    conn.write_all(b"INFO server\r\n").ok()?;
    let mut reply = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = conn.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        reply.extend_from_slice(&chunk[..n]);
        // A bulk string: `$<len>\r\n<len bytes>\r\n` (anything else, such as `-LOADING`, is
        // no answer yet).
        if reply.first() != Some(&b'$') {
            return None;
        }
        let Some(header_end) = reply.windows(2).position(|w| w == b"\r\n") else {
            continue;
        };
        let len: usize = std::str::from_utf8(&reply[1..header_end])
            .ok()?
            .parse()
            .ok()?;
        let body = header_end + 2;
        if reply.len() >= body + len {
            return String::from_utf8(reply[body..body + len].to_vec()).ok();
        }
    }
}

/// A key prefix unique to this test process and call, so tests sharing one Redis never collide.
pub fn unique_prefix(test: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!(
        "sltest-{test}-{}-{nanos}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}
