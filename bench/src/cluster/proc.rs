//! One child process of the cluster: spawned with its output in a log file, its reported
//! addresses collected, waited for with a deadline, killed (SIGKILL) and reaped when dropped.

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;

use super::{ClusterError, POLL, START_TIMEOUT, io_error};
use crate::binaries::Reported;

/// How much of the end of a log an error quotes.
const LOG_TAIL_BYTES: u64 = 4096;
/// Starts in all of a process that must come back on its old address, when that address is
/// taken: the port was free a moment before (its previous process just died), so whatever took
/// it may be gone again soon.
const REBIND_ATTEMPTS: u32 = 5;
/// Pause before the next of those starts (times the attempt number).
const REBIND_PAUSE: Duration = Duration::from_millis(200);

/// A child process, killed and reaped when dropped.
#[derive(Debug)]
pub(crate) struct Proc {
    /// What it is, for messages (`backend s2`).
    what: String,
    /// The process.
    child: Child,
    /// Its stdout and stderr (shared with its earlier starts, appended to).
    log: PathBuf,
    /// Length of the log when this process started: what it wrote comes after.
    log_start: u64,
    /// The addresses it has reported on stdout.
    reported: Reported,
}

impl Proc {
    /// Spawns `program args` with stderr appended to `log` and stdout copied there line by
    /// line (its `listening` lines recorded), without the environment variables the
    /// project's binaries read (a developer's shell may set them).
    pub(crate) fn spawn(
        program: &Path,
        args: &[String],
        what: &str,
        log: &Path,
    ) -> Result<Proc, ClusterError> {
        let opening = || io_error(format!("opening {}", log.display()));
        let file = File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(opening())?;
        let log_start = file.metadata().map_err(opening())?.len();
        let err_file = file.try_clone().map_err(opening())?;
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err_file)
            .env("RUST_LOG", "warn");
        let inherited: Vec<OsString> = std::env::vars_os()
            .map(|(key, _)| key)
            .filter(|key| {
                let key = key.to_string_lossy();
                key.starts_with("STICKLESS_") || key.starts_with("DEMO_")
            })
            .collect();
        for key in inherited {
            command.env_remove(key);
        }
        let mut child = command.spawn().map_err(|source| ClusterError::Spawn {
            what: format!("{what} ({})", program.display()),
            source,
        })?;
        let reported = match child.stdout.take() {
            Some(stdout) => Reported::tee(stdout, file),
            None => Reported::default(),
        };
        tracing::debug!(what, pid = child.id(), "started");
        Ok(Proc {
            what: what.to_owned(),
            child,
            log: log.to_owned(),
            log_start,
            reported,
        })
    }

    /// Spawns `program args` (which make it listen on one address, reported as `role`) and
    /// waits until it reports that address. With `same_address`, the address is a fixed one
    /// that a start can find taken: such a start is retried, `REBIND_ATTEMPTS` in all.
    pub(crate) async fn start_listening(
        program: &Path,
        args: &[String],
        what: &str,
        log: &Path,
        role: &str,
        same_address: bool,
    ) -> Result<(Proc, SocketAddr), ClusterError> {
        let mut attempt = 1;
        loop {
            let mut proc = Proc::spawn(program, args, what, log)?;
            match proc.wait_listening(role).await {
                Ok(addr) => return Ok((proc, addr)),
                Err(error)
                    if same_address && attempt < REBIND_ATTEMPTS && proc.lost_its_address() =>
                {
                    tracing::warn!(what, attempt, %error, "its address is taken; trying again");
                    drop(proc);
                    tokio::time::sleep(REBIND_PAUSE * attempt).await;
                    attempt += 1;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Waits until the process reports the address it listens on as `role`; an error when it
    /// exits first or `START_TIMEOUT` passes.
    pub(crate) async fn wait_listening(&mut self, role: &str) -> Result<SocketAddr, ClusterError> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(addr) = self.reported.get(role) {
                return Ok(addr);
            }
            self.check_alive()?;
            if Instant::now() >= deadline {
                return Err(self.not_ready(format!(
                    "did not report its {role} address (`listening {role} ...` on stdout) \
                     within {START_TIMEOUT:?}"
                )));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Polls `ready` until it holds, failing when the process exits or `START_TIMEOUT` passes.
    pub(crate) async fn wait_ready<F, Fut>(&mut self, mut ready: F) -> Result<(), ClusterError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            self.check_alive()?;
            if ready().await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(self.not_ready(format!("not ready within {START_TIMEOUT:?}")));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Sends SIGHUP (the proxy re-reads its configuration).
    pub(crate) fn hangup(&self) -> Result<(), ClusterError> {
        let pid = rustix::process::Pid::from_child(&self.child);
        rustix::process::kill_process(pid, rustix::process::Signal::HUP)
            .map_err(|errno| io_error(format!("SIGHUP to {}", self.what))(errno.into()))
    }

    /// Its process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// An error if the process has exited.
    pub(crate) fn check_alive(&mut self) -> Result<(), ClusterError> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(self.not_ready(format!("exited ({status})"))),
            Err(error) => Err(self.not_ready(format!("cannot be watched ({error})"))),
        }
    }

    /// The error saying it is not ready, and `why`, with the end of its log.
    pub(crate) fn not_ready(&self, why: String) -> ClusterError {
        ClusterError::NotReady {
            what: self.what.clone(),
            why,
            log: self.log.clone(),
            tail: self.log_tail(),
        }
    }

    /// Whether the process has exited because its listen address was taken (EADDRINUSE, as
    /// every one of our binaries words it in its last message).
    pub(crate) fn lost_its_address(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_))) && {
            let tail = self.log_tail();
            tail.contains("Address already in use") || tail.contains("os error 98")
        }
    }

    /// The end of what this start of the process wrote to its log.
    fn log_tail(&self) -> String {
        let read = || -> std::io::Result<String> {
            let mut file = File::open(&self.log)?;
            let len = file.metadata()?.len();
            file.seek(SeekFrom::Start(
                self.log_start.max(len.saturating_sub(LOG_TAIL_BYTES)),
            ))?;
            let mut bytes = Vec::new();
            file.read_to_end(&mut bytes)?;
            Ok(String::from_utf8_lossy(&bytes).trim().to_owned())
        };
        match read() {
            Ok(text) if text.is_empty() => "(empty)".to_owned(),
            Ok(text) => text,
            Err(error) => format!("(unreadable: {error})"),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SIGKILL: a crash, not a shutdown. Its connections are cut at once.
        let _ = self.child.kill();
        let _ = self.child.wait();
        tracing::debug!(what = %self.what, "killed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::binaries::Binaries;

    /// `demo-app` with sessions of its own (needs no session server) on `listen`.
    fn demo_args(listen: SocketAddr) -> Vec<String> {
        [
            "--listen",
            &listen.to_string(),
            "--name",
            "t",
            "--sessions",
            "local",
        ]
        .map(str::to_owned)
        .to_vec()
    }

    fn demo_app() -> PathBuf {
        Binaries::locate()
            .unwrap_or_else(|e| panic!("{e}"))
            .demo_app
    }

    #[tokio::test]
    async fn a_start_on_port_0_reports_the_port_it_got() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("app.log");
        let any = "127.0.0.1:0".parse().unwrap();
        let (_proc, addr) =
            Proc::start_listening(&demo_app(), &demo_args(any), "app", &log, "http", false)
                .await
                .unwrap();
        assert_ne!(addr.port(), 0);
        std::net::TcpStream::connect(addr).expect("it listens where it said");
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains(&format!("listening http {addr}")), "{text}");
    }

    #[tokio::test]
    async fn a_failed_start_quotes_what_the_child_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let log = dir.path().join("app.log");
        let error =
            Proc::start_listening(&demo_app(), &demo_args(addr), "app", &log, "http", false)
                .await
                .expect_err("the address is taken");
        let text = error.to_string();
        assert!(text.contains("app exited"), "{text}");
        assert!(text.contains("Address already in use"), "{text}");
    }

    /// A restarted backend must come back on its address: taken at first, it is tried again
    /// until the address is free.
    #[tokio::test]
    async fn a_restart_on_a_taken_address_succeeds_once_the_address_is_free() {
        let dir = tempfile::tempdir().unwrap();
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let log = dir.path().join("app.log");
        let start = tokio::spawn({
            let (program, args, log) = (demo_app(), demo_args(addr), log.clone());
            async move { Proc::start_listening(&program, &args, "app", &log, "http", true).await }
        });
        // The first start fails on the taken address; then the address is freed.
        let deadline = Instant::now() + START_TIMEOUT;
        while !std::fs::read_to_string(&log).is_ok_and(|t| t.contains("Address already in use")) {
            assert!(Instant::now() < deadline, "no failed start was logged");
            tokio::time::sleep(POLL).await;
        }
        drop(taken);
        let (_proc, got) = start.await.unwrap().expect("a later start succeeds");
        assert_eq!(got, addr);
    }
}
