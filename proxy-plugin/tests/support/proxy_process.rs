//! The `session-proxy` binary as a child process, started as an operator (or the bench harness)
//! starts it: listeners on port 0, their addresses read from the `listening <role> <ip:port>`
//! lines it prints on stdout (the address-reporting contract of every Stickless binary), its
//! stderr (the logs) collected for assertions and failure messages.

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// The binary cargo built for these tests.
pub const BINARY: &str = env!("CARGO_BIN_EXE_session-proxy");

/// How long a child gets to report its addresses: start-up is milliseconds at idle, and a
/// loaded 2-core machine building beside the tests stretches it a lot.
const START_DEADLINE: Duration = Duration::from_secs(30);

/// Bound on a run that should end by itself (a refused configuration); a binary still running
/// then is killed, so a regression that starts serving fails the test instead of hanging it.
pub const RUN_WITHIN: Duration = Duration::from_secs(30);

/// Runs the binary (see [`command`]) with `args` until it exits, or for [`RUN_WITHIN`] and
/// then kills it. Unless `args` say where to listen or name a config file, `--listen
/// 127.0.0.1:0` comes first, so a binary that starts instead of refusing never binds 8080.
pub fn run_bounded<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    let names_listen = args.iter().any(|a| {
        let a = a.as_ref().to_string_lossy();
        a.starts_with("--listen") || a.starts_with("--config")
    });
    let mut command = command();
    if !names_listen {
        command.args(["--listen", "127.0.0.1:0"]);
    }
    command.args(args);
    run_command_bounded(command)
}

/// Runs `command` (see [`command`]; stdin closed, stdout and stderr collected) until it exits,
/// or for [`RUN_WITHIN`] and then kills it.
pub fn run_command_bounded(mut command: Command) -> Output {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("run session-proxy");
    let deadline = Instant::now() + RUN_WITHIN;
    while child.try_wait().expect("poll the child").is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    child.wait_with_output().expect("the child's output")
}

/// The binary with none of the environment twins a developer's shell might set (every
/// `STICKLESS_*` variable), logging at `info`.
pub fn command() -> Command {
    let mut command = Command::new(BINARY);
    for (var, _) in std::env::vars_os() {
        if var.to_string_lossy().starts_with("STICKLESS_") {
            command.env_remove(var);
        }
    }
    command.env("RUST_LOG", "info");
    command
}

/// A running `session-proxy`; killed on drop if still running.
pub struct ProxyProcess {
    /// The process.
    child: Child,
    /// Its stderr so far (appended by `log_reader`).
    logs: Arc<Mutex<String>>,
    /// The thread copying stderr into `logs`; it ends when the process closes stderr.
    log_reader: Option<JoinHandle<()>>,
    /// Lines printed on stdout after the `listening` ones (the contract says there are none).
    stdout: Receiver<String>,
    /// Where the proxy listens (`listening proxy`).
    pub addr: SocketAddr,
    /// Where the admin API listens (`listening admin`), when it was asked for.
    pub admin_addr: Option<SocketAddr>,
}

impl ProxyProcess {
    /// Starts the binary with `--listen 127.0.0.1:0 --admin-listen 127.0.0.1:0` and `args`,
    /// and returns once it reported both addresses.
    pub fn start(args: &[&str]) -> ProxyProcess {
        let mut command = command();
        command
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args(args);
        ProxyProcess::spawn(command, &["proxy", "admin"])
    }

    /// Spawns `command` (stdout and stderr piped here) and waits, at most 30 s, for a
    /// `listening <role> <ip:port>` line for each of `roles` (`proxy` must be one). Panics with
    /// the exit status and stderr if the process exits first, and with stderr on the deadline
    /// or on any other line on stdout.
    pub fn spawn(mut command: Command, roles: &[&str]) -> ProxyProcess {
        assert!(roles.contains(&"proxy"), "every session-proxy listens");
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn session-proxy");
        let logs = Arc::new(Mutex::new(String::new()));
        let log_reader = Some(collect(child.stderr.take().expect("piped stderr"), &logs));
        let stdout = lines(child.stdout.take().expect("piped stdout"));
        let mut process = ProxyProcess {
            child,
            logs,
            log_reader,
            stdout,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            admin_addr: None,
        };
        let mut addresses = process.wait_for_addresses(roles);
        process.addr = addresses.remove("proxy").expect("checked above");
        process.admin_addr = addresses.remove("admin");
        process
    }

    /// Reads stdout until every role reported its address.
    fn wait_for_addresses(&mut self, roles: &[&str]) -> HashMap<String, SocketAddr> {
        let deadline = Instant::now() + START_DEADLINE;
        let mut found = HashMap::new();
        while roles.iter().any(|role| !found.contains_key(*role)) {
            match self.stdout.recv_timeout(Duration::from_millis(20)) {
                Ok(line) => {
                    let (role, addr) = parse_listening(&line).unwrap_or_else(|| {
                        panic!(
                            "session-proxy printed {line:?} on stdout; logs: {}",
                            self.logs()
                        )
                    });
                    assert!(
                        found.insert(role.clone(), addr).is_none(),
                        "{role} reported twice; logs: {}",
                        self.logs()
                    );
                }
                Err(RecvTimeoutError::Timeout) => {}
                // Stdout closed: the process is exiting; its status comes below.
                Err(RecvTimeoutError::Disconnected) => {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                let logs = self.finish_logs();
                panic!("session-proxy exited ({status}) before reporting {roles:?}: {logs}");
            }
            if Instant::now() >= deadline {
                panic!(
                    "session-proxy reported {found:?} of {roles:?} within {START_DEADLINE:?}; \
                     logs: {}",
                    self.logs()
                );
            }
        }
        found
    }

    /// Its stderr so far.
    pub fn logs(&self) -> String {
        self.logs.lock().clone()
    }

    /// `http://{addr}{path}`, through the proxy.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `http://{admin_addr}{path}`, on the admin API.
    pub fn admin(&self, path: &str) -> String {
        let admin = self.admin_addr.expect("started with --admin-listen");
        format!("http://{admin}{path}")
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// Sends signal `name` (`HUP`, `TERM`) to it.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([format!("-{name}"), self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name}");
    }

    /// Waits (at most `within`) for it to exit and returns its status and every log line; fails
    /// if it printed anything but its `listening` lines on stdout.
    pub async fn wait_exit(mut self, within: Duration) -> (ExitStatus, String) {
        let deadline = Instant::now() + within;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "still running after {within:?}: {}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let logs = self.finish_logs();
        let extra: Vec<String> = self.stdout.try_iter().collect();
        assert!(extra.is_empty(), "more on stdout: {extra:?}; logs: {logs}");
        (status, logs)
    }

    /// Sends SIGTERM, expects exit status 0 within 30 s, and returns the logs.
    pub async fn terminate(self) -> String {
        self.signal("TERM");
        let (status, logs) = self.wait_exit(Duration::from_secs(30)).await;
        assert!(status.success(), "{status} after SIGTERM: {logs}");
        logs
    }

    /// The whole log once the process has exited: the reader thread has seen the end of stderr.
    fn finish_logs(&mut self) -> String {
        if let Some(reader) = self.log_reader.take() {
            reader.join().expect("stderr reader");
        }
        self.logs()
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `listening <role> <ip:port>` as `(role, address)`.
fn parse_listening(line: &str) -> Option<(String, SocketAddr)> {
    let mut words = line.trim_end().split(' ');
    let (Some("listening"), Some(role), Some(addr), None) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return None;
    };
    Some((role.to_owned(), addr.parse().ok()?))
}

/// A thread appending everything `pipe` yields to `sink`, until it closes.
fn collect(pipe: impl Read + Send + 'static, sink: &Arc<Mutex<String>>) -> JoinHandle<()> {
    let sink = sink.clone();
    std::thread::spawn(move || {
        let mut pipe = BufReader::new(pipe);
        let mut line = String::new();
        while pipe.read_line(&mut line).is_ok_and(|n| n > 0) {
            sink.lock().push_str(&line);
            line.clear();
        }
    })
}

/// A thread sending each line of `pipe` (without its newline) until it closes.
fn lines(pipe: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}
