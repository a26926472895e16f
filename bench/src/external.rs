//! The real nginx and HAProxy, run as local processes in front of the comparison's backends, so
//! the routing modes session-proxy re-implements are measured against the originals too.
//!
//! Each [`ExternalKind`] has a configuration template in `deploy/` (compiled in with
//! `include_str!`): [`start`] fills it in for the given backends and listen address, writes it
//! into a work directory, starts the proxy in the foreground with its pid file, logs and temp
//! files inside that directory, and waits (bounded) until it accepts connections. The
//! [`ExternalProxy`] it returns stops the process (and waits for it) when dropped. Neither
//! proxy can report the port it got from a port-0 bind, so [`start_retrying`] picks a free
//! port and starts again on another one when someone takes it first.
//!
//! Every template gets the same safety nets session-proxy has, so the comparison is fair:
//! health checks (nginx: passive, `max_fails=1 fail_timeout=2s`; HAProxy: active,
//! `check inter 500ms fall 1 rise 1`) and a retry on another backend when one refuses or times
//! out, and for idempotent requests also when one dies mid-request (`proxy_next_upstream error
//! timeout`; `retries 2`, `option redispatch 1`, `retry-on conn-failure empty-response
//! response-timeout`). nginx has no active checks: a backend that failed stays out for the
//! whole 2 s `fail_timeout`, even when it is back sooner.
//!
//! The harness sends every request from 127.0.0.1 and names each simulated user's address in
//! `X-Forwarded-For`; both address-hashing anchors believe that header from loopback only
//! (nginx `set_real_ip_from`/`real_ip_header`; HAProxy `http-request set-src`, so that `balance
//! source` itself hashes the user's address), so they hash it as they would a direct client's.
//! HAProxy's source hash is `consistent`: with the map-based default, a redispatched request
//! picks the refusing server again and fails until the health check marks it down.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use bench::external::{ExternalKind, available, start_retrying};
//! let backends = ["127.0.0.1:8081".parse()?, "127.0.0.1:8082".parse()?];
//! if available(ExternalKind::NginxIpHash).is_ok() {
//!     let dir = tempfile::tempdir()?;
//!     // On a free loopback port (another one when it is taken before nginx binds it).
//!     let nginx = start_retrying(ExternalKind::NginxIpHash, &backends, None, dir.path())?;
//!     // send requests to nginx.url; nginx stops when `nginx` is dropped
//! }
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read as _, Seek as _, SeekFrom};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, geteuid, kill_process};

mod template;

use template::{prepare_workdir, render};

/// Bound on a proxy's start-up, until it accepts connections. nginx retries a busy port for
/// ~2.5 s before giving up, so this leaves room for that and for a slow CI machine.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Starts in all of [`start_retrying`] when the listen address is taken.
const BIND_ATTEMPTS: u32 = 5;
/// Pause before [`start_retrying`] tries a taken fixed address again (times the attempt).
const REBIND_PAUSE: Duration = Duration::from_millis(200);
/// Time a proxy gets to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between two polls of a starting or stopping process.
const POLL: Duration = Duration::from_millis(20);
/// How much of the end of a proxy's log an error quotes.
const LOG_TAIL_BYTES: u64 = 4096;

/// The real proxies the comparison can put in front of the same backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExternalKind {
    /// nginx `ip_hash` (first three octets of the client's IPv4 address).
    NginxIpHash,
    /// nginx `hash $cookie_sid consistent` (the session cookie, ketama).
    NginxCookieHash,
    /// HAProxy `balance source` (the client's whole address, map-based).
    HaproxySource,
    /// HAProxy `cookie SRV insert indirect nocache` (a cookie naming the server).
    HaproxyCookieInsert,
}

impl ExternalKind {
    /// Every kind, in the order the comparison lists them.
    pub const ALL: [ExternalKind; 4] = [
        ExternalKind::NginxIpHash,
        ExternalKind::NginxCookieHash,
        ExternalKind::HaproxySource,
        ExternalKind::HaproxyCookieInsert,
    ];

    /// Short name for tables and logs (`nginx ip_hash`, `haproxy cookie insert`, ...).
    pub fn name(self) -> &'static str {
        match self {
            ExternalKind::NginxIpHash => "nginx ip_hash",
            ExternalKind::NginxCookieHash => "nginx hash $cookie_sid",
            ExternalKind::HaproxySource => "haproxy balance source",
            ExternalKind::HaproxyCookieInsert => "haproxy cookie insert",
        }
    }

    fn program(self) -> &'static Program {
        match self {
            ExternalKind::NginxIpHash | ExternalKind::NginxCookieHash => &NGINX,
            ExternalKind::HaproxySource | ExternalKind::HaproxyCookieInsert => &HAPROXY,
        }
    }

    /// The template in `deploy/`.
    fn template(self) -> &'static str {
        match self {
            ExternalKind::NginxIpHash => include_str!("../../deploy/nginx-ip-hash.conf"),
            ExternalKind::NginxCookieHash => include_str!("../../deploy/nginx-cookie-hash.conf"),
            ExternalKind::HaproxySource => include_str!("../../deploy/haproxy-source.cfg"),
            ExternalKind::HaproxyCookieInsert => include_str!("../../deploy/haproxy-sticky.cfg"),
        }
    }
}

impl fmt::Display for ExternalKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What differs between the two programs behind the four kinds.
#[derive(Debug, PartialEq, Eq)]
struct Program {
    /// Binary name, which is also the name of its Debian package.
    binary: &'static str,
    /// Environment variable naming the binary, for a build outside `PATH`.
    override_var: &'static str,
    /// The configuration file written into the work directory.
    config_file: &'static str,
    /// The file its own log goes to (nginx `error_log`, HAProxy's stderr).
    log_file: &'static str,
}

const NGINX: Program = Program {
    binary: "nginx",
    override_var: "STICKLESS_NGINX",
    config_file: "nginx.conf",
    log_file: "error.log",
};

const HAPROXY: Program = Program {
    binary: "haproxy",
    override_var: "STICKLESS_HAPROXY",
    config_file: "haproxy.cfg",
    log_file: "haproxy.log",
};

/// Why an external proxy could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ExternalError {
    /// The binary is missing or unusable; the text says why (and which package to install).
    #[error("{0}")]
    Unavailable(String),
    /// The request cannot be met: no backends, or a listen port of 0 (which nginx and HAProxy
    /// cannot report back).
    #[error("{kind}: {reason}")]
    Invalid {
        /// The proxy that was asked for.
        kind: ExternalKind,
        /// What is wrong.
        reason: String,
    },
    /// Something else already listens on the address.
    #[error("{kind}: cannot listen on {listen}: {source}")]
    ListenBusy {
        /// The proxy that was asked for.
        kind: ExternalKind,
        /// The address given.
        listen: SocketAddr,
        /// The bind error.
        #[source]
        source: io::Error,
    },
    /// The work directory, or a file in it, cannot be used.
    #[error("{path}: {reason}")]
    Workdir {
        /// The directory or file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The process could not be started.
    #[error("starting {binary}: {source}")]
    Spawn {
        /// The binary.
        binary: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The process exited during start-up, or did not accept connections in time (it has been
    /// stopped then).
    #[error("{kind} {why}; its log ({log_path}):\n{log}")]
    NotReady {
        /// The proxy.
        kind: ExternalKind,
        /// `exited during start-up (exit status: 1)`, `did not accept on ... within 10s`.
        why: String,
        /// Its log file.
        log_path: PathBuf,
        /// The end of its log.
        log: String,
    },
}

impl ExternalError {
    /// Whether the start failed because the listen address was taken (by the time the proxy
    /// tried to bind it): worth another try, on another port or later.
    pub fn address_in_use(&self) -> bool {
        match self {
            ExternalError::ListenBusy { .. } => true,
            // nginx: "bind() to ... failed (98: Address already in use)"; HAProxy: "cannot
            // bind socket (Address already in use)".
            ExternalError::NotReady { log, .. } => log.contains("Address already in use"),
            _ => false,
        }
    }
}

/// A running nginx or HAProxy; stopped (SIGTERM, then SIGKILL after 5 s) and waited for when
/// dropped.
#[derive(Debug)]
pub struct ExternalProxy {
    /// Where clients send requests, `http://<listen>`.
    pub url: String,
    /// The address it listens on.
    listen: SocketAddr,
    /// Which proxy this is.
    kind: ExternalKind,
    /// The proxy's (master) process; it is our child, so its pid cannot be reused before we
    /// reap it.
    child: Child,
    /// The directory holding its configuration, pid file, logs and temp files.
    workdir: PathBuf,
}

impl ExternalProxy {
    /// Which proxy this is.
    pub fn kind(&self) -> ExternalKind {
        self.kind
    }

    /// The address it listens on.
    pub fn listen(&self) -> SocketAddr {
        self.listen
    }

    /// The process id of the proxy (nginx's master process).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The proxy's log file (nginx's `error_log`, HAProxy's stderr), for a failing run.
    pub fn log_path(&self) -> PathBuf {
        self.workdir.join(self.kind.program().log_file)
    }

    /// The configuration file it runs with.
    pub fn config_path(&self) -> PathBuf {
        self.workdir.join(self.kind.program().config_file)
    }

    /// SIGTERM (nginx: fast shutdown, its workers stop with it; HAProxy: immediate stop), a
    /// bounded wait, then SIGKILL. Idempotent.
    fn stop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return; // already reaped (or unknowable): never signal a pid that may be reused
        }
        let pid = Pid::from_child(&self.child);
        if kill_process(pid, Signal::TERM).is_ok() && wait_bounded(&mut self.child, STOP_TIMEOUT) {
            return;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ExternalProxy {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Where the binary for `kind` is, or why it cannot be used (not installed: which Debian
/// package to install). `STICKLESS_NGINX` / `STICKLESS_HAPROXY` name a binary outside `PATH`.
pub fn available(kind: ExternalKind) -> Result<PathBuf, String> {
    let binary = find_binary(kind.program())?;
    // nginx -V prints its version and build options, haproxy -v its version.
    let flag = if kind.program() == &NGINX { "-V" } else { "-v" };
    let output = Command::new(&binary)
        .arg(flag)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{} cannot be run: {e}", binary.display()))?;
    if !output.status.success() {
        return Err(format!(
            "{} {flag} failed ({}): {}",
            binary.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    let build = String::from_utf8_lossy(&output.stderr); // where nginx prints it
    if kind == ExternalKind::NginxIpHash && !build.contains("--with-http_realip_module") {
        return Err(format!(
            "{} lacks the realip module that {kind} needs to hash the simulated client \
             addresses (Debian's nginx package has it)",
            binary.display()
        ));
    }
    Ok(binary)
}

/// Writes the configuration for `kind` from its template in `deploy/` into `workdir` (created
/// when missing), starts the proxy on `listen` in front of `backends`, and waits (at most 10 s)
/// until it accepts connections.
pub fn start(
    kind: ExternalKind,
    backends: &[SocketAddr],
    listen: SocketAddr,
    workdir: &Path,
) -> Result<ExternalProxy, ExternalError> {
    let invalid = |reason: &str| ExternalError::Invalid {
        kind,
        reason: reason.to_owned(),
    };
    if backends.is_empty() {
        return Err(invalid("no backends to proxy to"));
    }
    if listen.port() == 0 {
        return Err(invalid("the listen address needs a fixed port, not 0"));
    }
    let binary = available(kind).map_err(ExternalError::Unavailable)?;
    let program = kind.program();
    let workdir = prepare_workdir(workdir)?;
    let root = geteuid().is_root();
    let config = render(kind.template(), backends, listen, &workdir, root);
    let config_path = workdir.join(program.config_file);
    fs::write(&config_path, config).map_err(|e| workdir_error(&config_path, e))?;
    // A port someone else holds would look "ready" to the connect probe below.
    drop(
        TcpListener::bind(listen).map_err(|source| ExternalError::ListenBusy {
            kind,
            listen,
            source,
        })?,
    );

    let log_path = workdir.join(program.log_file);
    let mut command = Command::new(&binary);
    // nginx writes its own log (`-e` also covers what it logs before reading `error_log`);
    // anything it prints goes next to it. HAProxy's log is its output.
    let output = if program == &NGINX {
        command.arg("-p").arg(&workdir).arg("-c").arg(&config_path);
        command.arg("-e").arg(&log_path).args(["-g", "daemon off;"]);
        workdir.join("stderr.log")
    } else {
        command.arg("-f").arg(&config_path).arg("-db");
        log_path.clone()
    };
    // A fresh log for each start, so an error quotes this start's messages only.
    for path in [&log_path, &output] {
        fs::write(path, "").map_err(|e| workdir_error(path, e))?;
    }
    let file = OpenOptions::new()
        .append(true)
        .open(&output)
        .map_err(|e| workdir_error(&output, e))?;
    let file_too = file.try_clone().map_err(|e| workdir_error(&output, e))?;
    command.stdin(Stdio::null()).stdout(file_too).stderr(file);
    let child = command.spawn().map_err(|source| ExternalError::Spawn {
        binary: binary.clone(),
        source,
    })?;
    let mut proxy = ExternalProxy {
        url: format!("http://{listen}"),
        listen,
        kind,
        child,
        workdir,
    };
    let deadline = Instant::now() + START_TIMEOUT;
    let why = loop {
        if let Ok(Some(status)) = proxy.child.try_wait() {
            break format!("exited during start-up ({status})");
        }
        if TcpStream::connect_timeout(&listen, Duration::from_millis(200)).is_ok() {
            return Ok(proxy);
        }
        if Instant::now() >= deadline {
            proxy.stop();
            break format!("did not accept on {listen} within {START_TIMEOUT:?}");
        }
        thread::sleep(POLL);
    };
    Err(ExternalError::NotReady {
        kind,
        why,
        log: log_tail(&proxy),
        log_path: proxy.log_path(),
    })
}

/// [`start`], tried again when the listen address turns out to be taken, `BIND_ATTEMPTS` starts
/// in all. With `listen` `None`, on a free loopback port, another one each time: nginx and
/// HAProxy cannot report a port-0 bind, so a port is picked (bound and released) and someone
/// else may bind it first. With `Some(address)`, on that address each time, after a pause (a
/// restart that must keep its address: the clients know it).
pub fn start_retrying(
    kind: ExternalKind,
    backends: &[SocketAddr],
    listen: Option<SocketAddr>,
    workdir: &Path,
) -> Result<ExternalProxy, ExternalError> {
    let mut attempt = 1;
    loop {
        let address = match listen {
            Some(address) => address,
            None => TcpListener::bind("127.0.0.1:0")
                .and_then(|listener| listener.local_addr())
                .map_err(|error| ExternalError::Invalid {
                    kind,
                    reason: format!("cannot pick a loopback port: {error}"),
                })?,
        };
        match start(kind, backends, address, workdir) {
            Err(error) if attempt < BIND_ATTEMPTS && error.address_in_use() => {
                if listen.is_some() {
                    thread::sleep(REBIND_PAUSE * attempt);
                }
                attempt += 1;
            }
            result => return result,
        }
    }
}

/// The binary named by the override variable, or the first on `PATH` or in the sbin
/// directories (often missing from a non-root `PATH`).
fn find_binary(program: &Program) -> Result<PathBuf, String> {
    let (name, var) = (program.binary, program.override_var);
    if let Some(path) = std::env::var_os(var) {
        let path = PathBuf::from(path);
        return if is_executable(&path) {
            Ok(path)
        } else {
            Err(format!(
                "{var}={} is not an executable file (unset it to look for {name} on PATH; \
                 Debian: apt-get install {name})",
                path.display()
            ))
        };
    }
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    let sbin = ["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from);
    path_dirs
        .into_iter()
        .chain(sbin)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| {
            format!(
                "{name} is not installed (Debian: apt-get install {name}; or set {var} to its path)"
            )
        })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn workdir_error(path: &Path, error: io::Error) -> ExternalError {
    ExternalError::Workdir {
        path: path.to_owned(),
        reason: error.to_string(),
    }
}

/// Waits for `child` to exit, at most `limit`; true when it did.
fn wait_bounded(child: &mut Child, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return true,
            Ok(None) if Instant::now() < deadline => thread::sleep(POLL),
            _ => return false,
        }
    }
}

/// The last few KiB of the proxy's log files, for an error message.
fn log_tail(proxy: &ExternalProxy) -> String {
    let mut files = vec![proxy.log_path()];
    if proxy.kind.program() == &NGINX {
        files.push(proxy.workdir.join("stderr.log"));
    }
    let mut text = String::new();
    for path in files {
        let Ok(mut file) = File::open(&path) else {
            continue;
        };
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = file.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)));
        let mut bytes = Vec::new();
        let _ = file.read_to_end(&mut bytes);
        text.push_str(String::from_utf8_lossy(&bytes).trim());
        text.push('\n');
    }
    match text.trim_end() {
        "" => "(empty)".to_owned(),
        text => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unusable_requests_are_refused_before_anything_starts() {
        let dir = Path::new("/nonexistent-never-created");
        let listen = "127.0.0.1:9000".parse().unwrap();
        assert!(matches!(
            start(ExternalKind::HaproxySource, &[], listen, dir),
            Err(ExternalError::Invalid { .. })
        ));
        assert!(matches!(
            start(
                ExternalKind::NginxIpHash,
                &["127.0.0.1:8081".parse().unwrap()],
                "127.0.0.1:0".parse().unwrap(),
                dir
            ),
            Err(ExternalError::Invalid { .. })
        ));
    }
}
