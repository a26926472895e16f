//! The `session-server` binary as a child process: started with port 0 in its listen flags, its
//! bound addresses read from the `listening <role> <ip:port>` lines it prints on stdout (the
//! address-reporting contract of `src/main.rs`), its stderr (logs) collected, killed on drop.
//! No free port is ever picked and released, so nothing can take it between check and bind.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::{BufRead as _, BufReader, Read as _};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a started binary gets to print its `listening` lines: generous, for a loaded
/// 2-core machine that is also compiling.
pub const START_WITHIN: Duration = Duration::from_secs(30);

/// How often a wait for the child's exit checks it.
const POLL_EVERY: Duration = Duration::from_millis(20);

/// A running server binary, killed (and reaped) when dropped.
pub struct ServerProcess {
    /// The process.
    child: Child,
    /// Bound addresses by role (`grpc`, `metrics`), as the binary reported them.
    addresses: HashMap<String, SocketAddr>,
    /// Every stdout line, in order, the `listening` ones included.
    stdout: Arc<Mutex<Vec<String>>>,
    /// Drains stdout (so the child never blocks on a full pipe); ends when the child does.
    stdout_reader: Option<JoinHandle<()>>,
    /// Everything written to stderr so far.
    stderr: Arc<Mutex<String>>,
    /// Drains stderr; ends when the child does.
    stderr_reader: Option<JoinHandle<()>>,
}

impl ServerProcess {
    /// Starts `binary` with `args` and an environment cleared of `STICKLESS_*` variables (so
    /// the caller's shell cannot change what is tested), and waits until it has reported an
    /// address for each of `roles`. Fails the test, with the child's exit status and stderr,
    /// when it exits first or [`START_WITHIN`] passes.
    pub fn start(binary: &Path, args: &[&str], roles: &[&str]) -> ServerProcess {
        let mut command = Command::new(binary);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        without_stickless_env(&mut command);
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", binary.display()));

        let stderr = Arc::new(Mutex::new(String::new()));
        let stderr_reader = {
            let mut pipe = child.stderr.take().expect("piped stderr");
            let stderr = stderr.clone();
            std::thread::spawn(move || {
                let mut chunk = [0u8; 4096];
                while let Ok(n @ 1..) = pipe.read(&mut chunk) {
                    let text = String::from_utf8_lossy(&chunk[..n]);
                    lock(&stderr).push_str(&text);
                }
            })
        };
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let (lines_tx, lines) = mpsc::channel();
        let stdout_reader = {
            let pipe = child.stdout.take().expect("piped stdout");
            let stdout = stdout.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    lock(&stdout).push(line.clone());
                    let _ = lines_tx.send(line);
                }
            })
        };

        let mut process = ServerProcess {
            child,
            addresses: HashMap::new(),
            stdout,
            stdout_reader: Some(stdout_reader),
            stderr,
            stderr_reader: Some(stderr_reader),
        };
        let deadline = Instant::now() + START_WITHIN;
        while !roles.iter().all(|r| process.addresses.contains_key(*r)) {
            match lines.recv_timeout(POLL_EVERY) {
                Ok(line) => {
                    if let Some((role, address)) = parse_listening(&line) {
                        process.addresses.insert(role, address);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                // stdout closed: the child is exiting; try_wait below tells.
                Err(RecvTimeoutError::Disconnected) => std::thread::sleep(POLL_EVERY),
            }
            if let Ok(Some(status)) = process.child.try_wait() {
                let stderr = process.stderr_after_exit();
                panic!(
                    "{} exited ({status}) before reporting {roles:?}; stderr:\n{stderr}",
                    binary.display()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} did not report {roles:?} within {START_WITHIN:?}; stdout so far: {:?}; \
                 stderr so far:\n{}",
                binary.display(),
                lock(&process.stdout),
                lock(&process.stderr)
            );
        }
        process
    }

    /// The address the binary reported for `role`; fails the test when it reported none.
    pub fn address(&self, role: &str) -> SocketAddr {
        *self
            .addresses
            .get(role)
            .unwrap_or_else(|| panic!("no `listening {role}` line was read"))
    }

    /// The gRPC endpoint URL (`http://ip:port`).
    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.address("grpc"))
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM, as an orchestrator stopping the server does.
    pub fn terminate(&self) {
        self.signal("TERM");
    }

    /// Sends SIGHUP, as an operator reloading the server does.
    pub fn hang_up(&self) {
        self.signal("HUP");
    }

    fn signal(&self, name: &str) {
        let sent = Command::new("kill")
            .args([&format!("-{name}"), &self.pid().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(sent, "kill -{name} {}", self.pid());
    }

    /// Everything the child has written to stderr so far (while it runs).
    pub fn stderr_so_far(&self) -> String {
        lock(&self.stderr).clone()
    }

    /// Waits (at most `within`) until the child's stderr contains `text`; fails the test with
    /// its stderr so far when it does not, or when the child exits first.
    pub fn wait_stderr(&mut self, text: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.stderr_so_far().contains(text) {
            if let Some(status) = self.child.try_wait().expect("poll the child") {
                panic!(
                    "the server exited ({status}) before logging {text:?}:\n{}",
                    self.stderr_so_far()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {text:?} in stderr within {within:?}:\n{}",
                self.stderr_so_far()
            );
            std::thread::sleep(POLL_EVERY);
        }
    }

    /// Waits (at most `within`) for the child to exit and gives its status; fails the test,
    /// with its stderr so far, when it is still running at the deadline.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll the child") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the server did not exit within {within:?}; stderr so far:\n{}",
                lock(&self.stderr)
            );
            std::thread::sleep(POLL_EVERY);
        }
    }

    /// Everything the child wrote to stderr, complete once it has exited (the reader is joined
    /// first).
    pub fn stderr_after_exit(&mut self) -> String {
        if let Some(reader) = self.stderr_reader.take() {
            let _ = reader.join();
        }
        lock(&self.stderr).clone()
    }

    /// Every line the child wrote to stdout, complete once it has exited.
    pub fn stdout_after_exit(&mut self) -> Vec<String> {
        if let Some(reader) = self.stdout_reader.take() {
            let _ = reader.join();
        }
        lock(&self.stdout).clone()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `Some((role, address))` for a line of the form `listening <role> <ip:port>`.
pub fn parse_listening(line: &str) -> Option<(String, SocketAddr)> {
    let mut words = line.strip_prefix("listening ")?.split(' ');
    let role = words.next()?;
    let address = words.next()?.parse().ok()?;
    words.next().is_none().then(|| (role.to_owned(), address))
}

/// The text behind a mutex, also after a reader thread panicked.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Bound on a run that should end by itself (a refused configuration); a binary still running
/// then is killed, so a regression that starts serving fails the test instead of hanging it.
pub const RUN_WITHIN: Duration = Duration::from_secs(30);

/// Runs `binary` with `args` and `env` as its only `STICKLESS_*` variables until it exits, or
/// for [`RUN_WITHIN`] and then kills it. Unless `args` or `env` say where to listen (or name a
/// config file), `--listen 127.0.0.1:0` comes first, so that a binary that starts instead of
/// refusing never binds a fixed port.
pub fn run_bounded<V: AsRef<OsStr>>(binary: &Path, args: &[&str], env: &[(&str, V)]) -> Output {
    let names_listen = args
        .iter()
        .any(|a| a.starts_with("--listen") || a.starts_with("--config"))
        || env
            .iter()
            .any(|(name, _)| *name == "STICKLESS_LISTEN" || *name == "STICKLESS_CONFIG");
    let mut command = Command::new(binary);
    if !names_listen {
        command.args(["--listen", "127.0.0.1:0"]);
    }
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    without_stickless_env(&mut command);
    command.envs(env.iter().map(|(name, value)| (name, value.as_ref())));
    let mut child = command.spawn().expect("run the binary");
    // Pipes are drained by wait_with_output only after the exit; a refusal writes one line,
    // far below a pipe's capacity.
    let deadline = Instant::now() + RUN_WITHIN;
    while child.try_wait().expect("poll the child").is_none() && Instant::now() < deadline {
        std::thread::sleep(POLL_EVERY);
    }
    let _ = child.kill();
    child.wait_with_output().expect("the child's output")
}

/// Removes every `STICKLESS_*` variable of the caller's environment from `command`, so the
/// caller's shell cannot change what is tested.
fn without_stickless_env(command: &mut Command) {
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("STICKLESS_") {
            command.env_remove(name);
        }
    }
}
