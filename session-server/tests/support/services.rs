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

/// A loopback port that nothing listens on right now.
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
    /// Starts a throwaway Redis (no persistence) on a free port and waits until it answers.
    pub fn start(binary: PathBuf) -> OwnRedis {
        let port = free_port();
        let child = Self::spawn(&binary, port);
        let redis = OwnRedis {
            child,
            port,
            binary,
        };
        redis.wait_ready();
        redis
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
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server")
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !redis_answers(&format!("127.0.0.1:{}", self.port)) {
            assert!(
                Instant::now() < deadline,
                "own redis-server did not start on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
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

    /// Starts it again on the same port (empty: it keeps nothing).
    pub fn restart(&mut self) {
        self.stop();
        self.child = Self::spawn(&self.binary, self.port);
        self.wait_ready();
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.stop();
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
