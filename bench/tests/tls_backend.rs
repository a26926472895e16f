//! Every hop encrypted, end to end with the real binaries: `demo-app --tls-cert --tls-key`
//! behind `session-proxy --backend https://127.0.0.1:PORT --backend-ca ca.pem`, the
//! certificates from a test CA made here (test-pki). The proxy reaches the backend over TLS only:
//! the same backend given as `http://` gets no answer from it.
//!
//! (Here rather than in demo/tests because the bench crate locates, and builds when missing,
//! both binaries.)

mod support;

use std::io::Read as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bench::Binaries;
use bench::binaries::Reported;
use support::{Reply, try_request};
use test_pki::{Ca, PemDir};

/// Bound on a process reporting its address, or the proxy answering through its backend.
const WAIT: Duration = Duration::from_secs(60);
/// Pause between two polls.
const POLL: Duration = Duration::from_millis(50);

/// A child process killed (and reaped) on drop, with what it reported on stdout.
struct Proc {
    /// The process.
    child: Child,
    /// Its `listening <role> <addr>` lines.
    reported: Reported,
    /// Where its stderr goes.
    log: std::path::PathBuf,
}

impl Proc {
    /// Starts `program` with `args`, its stdout recorded and its stderr written to `log`.
    fn start(program: &Path, args: &[&str], log: &Path) -> Proc {
        // No environment: a developer's DEMO_* or STICKLESS_* variables must not change it.
        let mut child = Command::new(program)
            .env_clear()
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).expect("log file"))
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", program.display()));
        let reported = Reported::tee(child.stdout.take().expect("stdout"), std::io::sink());
        Proc {
            child,
            reported,
            log: log.to_owned(),
        }
    }

    /// The address it reports for `role`, waiting up to [`WAIT`]; panics with its stderr when
    /// it exits first or takes too long.
    fn listening(&mut self, role: &str) -> SocketAddr {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(addr) = self.reported.get(role) {
                return addr;
            }
            let exited = self.child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() > deadline {
                panic!(
                    "no `listening {role}` line (exit: {exited:?}); stderr: {}",
                    self.stderr()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// What it wrote on stderr so far.
    fn stderr(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = std::fs::File::open(&self.log) {
            let _ = file.read_to_string(&mut text);
        }
        text
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A path as a flag value.
fn arg(path: &Path) -> &str {
    path.to_str().expect("UTF-8 temporary path")
}

/// `GET /healthz` through `proxy` until it answers 200, within [`WAIT`]; the last reply.
fn healthz_until_ok(proxy: SocketAddr) -> Option<Reply> {
    let deadline = Instant::now() + WAIT;
    let mut last = None;
    while Instant::now() < deadline {
        if let Ok(reply) = try_request(proxy, "GET", "/healthz", &[], None) {
            if reply.status == 200 {
                return Some(reply);
            }
            last = Some(reply);
        }
        std::thread::sleep(POLL);
    }
    last
}

#[test]
fn session_proxy_serves_a_tls_demo_app_through_an_https_backend() {
    let bins = Binaries::locate().unwrap_or_else(|e| panic!("{e}"));
    let dir = PemDir::new("tls-backend");
    let pki = Ca::new("stickless backend test CA");
    let ca = dir.write_ca(&pki);
    let (cert, key) = dir.write_leaf(&pki.server(&["127.0.0.1"]), "server");

    let mut app = Proc::start(
        &bins.demo_app,
        &[
            "--listen",
            "127.0.0.1:0",
            "--sessions",
            "local",
            "--name",
            "tls-app",
            "--tls-cert",
            arg(&cert),
            "--tls-key",
            arg(&key),
        ],
        &dir.file("demo-app.log"),
    );
    let backend = app.listening("http");

    let https = format!("https://{backend},name=app");
    let mut proxy = Proc::start(
        &bins.session_proxy,
        &[
            "--listen",
            "127.0.0.1:0",
            "--backend",
            &https,
            "--backend-ca",
            arg(&ca),
        ],
        &dir.file("session-proxy.log"),
    );
    let door = proxy.listening("proxy");
    let reply = healthz_until_ok(door);
    let reply = reply.unwrap_or_else(|| {
        panic!(
            "no 200 through the https:// backend; proxy stderr: {}; demo-app stderr: {}",
            proxy.stderr(),
            app.stderr()
        )
    });
    assert_eq!(reply.header("x-served-by"), Some("tls-app"), "{reply:?}");

    // The same backend as http://: the proxy's cleartext request gets no answer from it.
    let http = format!("http://{backend},name=app");
    let mut cleartext = Proc::start(
        &bins.session_proxy,
        &["--listen", "127.0.0.1:0", "--backend", &http],
        &dir.file("session-proxy-cleartext.log"),
    );
    let door = cleartext.listening("proxy");
    let reply = try_request(door, "GET", "/healthz", &[], None).expect("the proxy answers");
    assert!(reply.status >= 500, "{reply:?}");
    assert_eq!(reply.header("x-served-by"), None, "{reply:?}");
}
